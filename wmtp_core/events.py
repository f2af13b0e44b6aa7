"""Frozen values that travel through hooks and come back from sinks.

No class here holds checkpoint bytes: the bytes go from the router to the bound sink only.
"""

from __future__ import annotations

import datetime as dt
import posixpath
import re
import types
from typing import Any, Mapping

import attrs

from wmtp_core.roles import Role

FORMAT_VERSION = 1
"""Version of the manifest format. Bumped on any incompatible change."""


def _frozen_map(value: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return types.MappingProxyType(dict(value or {}))


def _non_negative(instance: Any, attribute: attrs.Attribute, value: int) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name} must be >= 0, got {value!r}")


@attrs.frozen
class RunInfo:
    """Who is running: identical in every event of one run."""

    name: str
    """The run name: the folder under the base path and the MLflow run name."""
    algo: str
    """The training algorithm (``baseline-mtp``, ``rho1-wmtp``, ``critic-wmtp``)."""
    lineage: str
    """An id shared by a run and every resume of it; retention only touches its own lineage."""
    experiment: str = "wmtp"
    """MLflow experiment name."""
    resumed_from: str | None = None
    """URI of the checkpoint this run resumed from, if any."""
    tags: Mapping[str, str] = attrs.field(factory=dict, converter=_frozen_map, hash=False)
    """Tags from ``--tags`` and the recipe."""


@attrs.frozen
class SinkContext:
    """What a sink factory gets to build a sink for one run."""

    role: Role
    """The role the sink will serve."""
    run: RunInfo
    base_path: str
    """Where resume state lives (``paths.checkpoints.base_path`` or ``storage.<role>.base_path``)."""
    options: Mapping[str, Any] = attrs.field(factory=dict, converter=_frozen_map, hash=False)
    """Sink options from ``storage.<role>.options`` (for file-like sinks: fsspec storage options)."""
    mlflow: Mapping[str, Any] = attrs.field(factory=dict, converter=_frozen_map, hash=False)
    """The ``mlflow`` config section: ``experiment``, ``tracking_uri``, ``registry_uri``."""


@attrs.frozen
class RunStarted:
    run: RunInfo
    params: Mapping[str, Any] = attrs.field(factory=dict, converter=_frozen_map, hash=False)
    """The flattened configuration, secrets redacted."""
    bindings: Mapping[str, str] = attrs.field(factory=dict, converter=_frozen_map, hash=False)
    """Role name -> sink name."""
    start_step: int = 0
    """0 for a new run; the restored step for a resumed one."""
    mlflow: Mapping[str, Any] = attrs.field(factory=dict, converter=_frozen_map, hash=False)
    """The ``mlflow`` config section (``experiment``, ``tracking_uri``, ``registry_uri``)."""


@attrs.frozen
class StepEnded:
    run: RunInfo
    step: int = attrs.field(validator=_non_negative)
    metrics: Mapping[str, float] = attrs.field(factory=dict, converter=_frozen_map, hash=False)


@attrs.frozen
class CheckpointEmitted:
    """The engine asked for a checkpoint to be stored. Describes it; does not carry it."""

    run: RunInfo
    role: Role
    step: int = attrs.field(validator=_non_negative)
    parts: tuple[str, ...] = attrs.field(converter=tuple)
    """Names of the state parts (``model``, ``optimizer``, ``trainer``...)."""
    nbytes: int = attrs.field(validator=_non_negative)
    """Tensor bytes in the payload (an estimate of what will be stored)."""
    metrics: Mapping[str, float] = attrs.field(factory=dict, converter=_frozen_map, hash=False)
    resume_location: str | None = None
    """For the final model: where this run's resume state lives, as a reference."""


class ManifestError(ValueError):
    """A manifest that does not follow the schema: the checkpoint cannot be verified."""


_LINEAGE = re.compile(r"[A-Za-z0-9_.=+-]{1,128}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
MANIFEST_KEYS = frozenset({"format_version", "run", "step", "role", "lineage", "created_at", "files", "meta"})


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _count(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not _int(value) or value < 0:
        raise ManifestError(f"{attribute.name}: {value!r} is not an integer >= 0")


def _relative_path(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """A file of the checkpoint: a plain relative path inside its directory, nothing else."""
    if not isinstance(value, str) or not value:
        raise ManifestError(f"file path {value!r} is not a non-empty string")
    parts = value.split("/")
    if (value.startswith("/") or "\\" in value or any(p in ("", ".", "..") for p in parts)
            or posixpath.normpath(value) != value or ":" in parts[0] or "\x00" in value
            or posixpath.basename(value) == "manifest.json"):
        raise ManifestError(f"file path {value!r} is not a relative path inside the checkpoint")


def _sha256(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise ManifestError(f"sha256 {value!r} is not 64 lowercase hex digits")


@attrs.frozen
class FileEntry:
    """One file of a committed checkpoint, as its manifest records it."""

    path: str = attrs.field(validator=_relative_path)
    """Relative to the checkpoint directory; never absolute, never ``..``."""
    size: int = attrs.field(validator=_count)
    sha256: str = attrs.field(validator=_sha256)


def _files(instance: Any, attribute: attrs.Attribute, value: tuple) -> None:
    if not value:
        raise ManifestError("files: a committed checkpoint lists at least one file")
    if not all(isinstance(f, FileEntry) for f in value):
        raise ManifestError("files: every entry must be a FileEntry")
    seen = set()
    for f in value:
        if f.path in seen:
            raise ManifestError(f"files: {f.path!r} is listed twice")
        seen.add(f.path)


def _lineage(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, str) or not _LINEAGE.fullmatch(value):
        raise ManifestError(f"lineage {value!r} is not an id of letters, digits and '_.=+-'")


def _timestamp(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    try:
        dt.datetime.fromisoformat(value)
    except (TypeError, ValueError):
        raise ManifestError(f"created_at {value!r} is not an ISO 8601 timestamp") from None


def _format_version(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not _int(value) or value != FORMAT_VERSION:
        raise ManifestError(f"format_version {value!r} is not supported (this WMTP reads "
                            f"{FORMAT_VERSION})")


def _meta(instance: Any, attribute: attrs.Attribute, value: Mapping[str, Any]) -> None:
    """The keys WMTP acts on are typed; others are a sink's own notes."""
    fmt = value.get("format")
    if fmt is not None and fmt != "dcp":
        raise ManifestError(f"meta.format {fmt!r} is not known (accepted: 'dcp' or absent)")
    if fmt == "dcp" and not (_int(value.get("world_size")) and value["world_size"] >= 1):
        raise ManifestError(f"meta.world_size {value.get('world_size')!r} is not an integer >= 1")
    for key in ("algo", "resumed_from", "torch"):
        if value.get(key) is not None and not isinstance(value[key], str):
            raise ManifestError(f"meta.{key} {value[key]!r} is not a string")
    metrics = value.get("metrics", {})
    if not isinstance(metrics, Mapping) or not all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
            for k, v in metrics.items()):
        raise ManifestError("meta.metrics is not a mapping of names to numbers")


def _role(value: Any) -> Role:
    try:
        return Role(value)
    except ValueError:
        raise ManifestError(f"role {value!r} is not one of {', '.join(r.value for r in Role)}") from None


def _run_name(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, str) or not RUN_NAME.fullmatch(value) or ".." in value:
        raise ManifestError(f"run {value!r} is not a run name")


RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.=+-]{0,127}")
"""Letters, digits and ``_.=+-``, at most 128 characters, not starting with ``.``: a run name
can never climb out of its base path or hide from listings."""


@attrs.frozen
class Manifest:
    """The commit record: written last; a checkpoint without one does not exist.

    Every field is validated when a manifest is built, and :meth:`from_json` is strict (exact
    types, no unknown keys): a manifest is untrusted input until it passes.
    """

    run: str = attrs.field(validator=_run_name)
    step: int = attrs.field(validator=_count)
    role: Role = attrs.field(converter=_role)
    lineage: str = attrs.field(validator=_lineage)
    files: tuple[FileEntry, ...] = attrs.field(converter=tuple, validator=_files)
    created_at: str = attrs.field(validator=_timestamp)
    format_version: int = attrs.field(default=FORMAT_VERSION, validator=_format_version)
    meta: Mapping[str, Any] = attrs.field(factory=dict, converter=_frozen_map, hash=False,
                                          validator=_meta)

    @property
    def nbytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "run": self.run,
            "step": self.step,
            "role": self.role.value,
            "lineage": self.lineage,
            "created_at": self.created_at,
            "files": [attrs.asdict(f) for f in self.files],
            "meta": dict(self.meta),
        }

    @classmethod
    def from_json(cls, data: Any) -> Manifest:
        """Parse and validate; raises :class:`ManifestError` naming the first problem."""
        if not isinstance(data, Mapping):
            raise ManifestError(f"the manifest is a {type(data).__name__}, not a JSON object")
        missing = sorted(MANIFEST_KEYS - {"meta"} - set(data))
        if missing:
            raise ManifestError(f"required key {missing[0]!r} is missing")
        unknown = sorted(set(data) - MANIFEST_KEYS)
        if unknown:
            raise ManifestError(f"unknown key {unknown[0]!r}")
        _format_version(None, None, data["format_version"])
        files = data["files"]
        if not isinstance(files, list):
            raise ManifestError(f"files is {files!r}, not a list")
        entries = []
        for i, f in enumerate(files):
            if not isinstance(f, Mapping) or set(f) != {"path", "size", "sha256"}:
                raise ManifestError(f"files[{i}] is not an object with exactly path, size and sha256")
            entries.append(FileEntry(path=f["path"], size=f["size"], sha256=f["sha256"]))
        meta = data.get("meta", {})
        if not isinstance(meta, Mapping):
            raise ManifestError(f"meta is {meta!r}, not an object")
        try:
            return cls(run=data["run"], step=data["step"], role=data["role"], lineage=data["lineage"],
                       files=entries, created_at=data["created_at"],
                       format_version=data["format_version"], meta=meta)
        except TypeError as e:  # a value of a type no validator expects (a list as role...)
            raise ManifestError(str(e)) from None


@attrs.frozen
class Receipt:
    """What a sink returns after a commit: where, how much, how long."""

    role: Role
    sink: str
    run: str
    step: int
    uri: str
    """Where it landed: a checkpoint directory URI or a ``models:/NAME/VERSION`` URI."""
    nbytes: int
    seconds: float
    """Wall time of the store call, commit included."""
    meta: Mapping[str, Any] = attrs.field(factory=dict, converter=_frozen_map, hash=False)


@attrs.frozen
class RunEnded:
    run: RunInfo
    status: str = attrs.field(validator=attrs.validators.in_(("finished", "stopped_early", "failed")))
    last_step: int = 0
    metrics: Mapping[str, float] = attrs.field(factory=dict, converter=_frozen_map, hash=False)
    receipts: tuple[Receipt, ...] = attrs.field(default=(), converter=tuple)
    reason: str = ""
    """Why the run stopped (early stopping, an error), empty when it simply finished."""


@attrs.frozen
class Payload:
    """What the router hands to the bound sink, and to nothing else.

    ``parts`` maps a part name (``model``, ``optimizer``, ``trainer``...) to an object made of
    tensors, numbers, strings, lists, tuples and dicts: loadable with ``weights_only=True``.
    """

    parts: Mapping[str, Any] = attrs.field(converter=_frozen_map, hash=False)
    model: Any = attrs.field(default=None, hash=False, eq=False)
    """For the final role: the trained module on CPU, for sinks that export a runnable model."""
    example_input: Any = attrs.field(default=None, hash=False, eq=False)
    """For the final role: a batch of token ids the model accepts (used to trace or sign it)."""
    model_config: Mapping[str, Any] = attrs.field(factory=dict, converter=_frozen_map, hash=False)
    """For the final role: the architecture, enough to rebuild the module from the weights."""
    world: Any = attrs.field(default=None, hash=False, eq=False)
    """Set when the state is sharded across ranks: every rank hands its shards to the sink
    (``torch.distributed.checkpoint``) and the manifest is committed once, by rank 0."""


@attrs.frozen
class LoadedModel:
    """Weights and architecture loaded from a registry or a committed checkpoint."""

    weights: Mapping[str, Any] = attrs.field(converter=_frozen_map, hash=False)
    """A state dict of tensors, loadable into ``MTPModel(ModelConfig(**model_config))``."""
    model_config: Mapping[str, Any] = attrs.field(converter=_frozen_map, hash=False)
    source: str = ""
    """The URI it came from, resolved (``models:/NAME/latest`` -> the version loaded)."""
