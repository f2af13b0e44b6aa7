"""The manifest: the commit record of a checkpoint and its strict schema (its hashes: :mod:`wmtp_core.hashing`).

A manifest is untrusted input until it passes: every field is validated when one is built, and
:meth:`Manifest.from_json` is strict (exact keys, exact types). Two formats are read:

- version 2 (written since hashing moved to BLAKE3): ``"hash": "blake3"`` names the algorithm
  and every file entry carries ``path``, ``size`` and ``digest``;
- version 1: every entry carries ``path``, ``size`` and ``sha256``. Checkpoints written before
  keep verifying.
"""

from __future__ import annotations

import datetime as dt
import posixpath
import re
from typing import Any, Mapping

import attrs

from wmtp_core.errors import ManifestError
from wmtp_core.hashing import HASH, HASHES
from wmtp_core.roles import Role
from wmtp_core.validators import frozen_copy, is_int

FORMAT_VERSION = 2
"""Version of the manifest format written now. Bumped on any incompatible change."""
READABLE = (1, 2)
MANIFEST_KEYS = {1: frozenset({"format_version", "run", "step", "role", "lineage", "created_at", "files", "meta"}),
                 2: frozenset({"format_version", "hash", "run", "step", "role", "lineage", "created_at",
                               "files", "meta"})}
SAVE_REASONS = ("interval", "timed", "preempted", "last")
"""Why the engine saved a resume checkpoint (``meta.saved_because``): a multiple of
``save_interval``, ``save_every`` of training time, a preemption signal, the last step of a run
that ended otherwise. A manifest written before the field existed has none."""
ENTRY_KEYS = {1: frozenset({"path", "size", "sha256"}), 2: frozenset({"path", "size", "digest"})}

RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.=+-]{0,127}")
"""Letters, digits and ``_.=+-``, at most 128 characters, not starting with ``.``: a run name
can never climb out of its base path or hide from listings."""
_LINEAGE = re.compile(r"[A-Za-z0-9_.=+-]{1,128}")
_HEX64 = re.compile(r"[0-9a-f]{64}")


def _count(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not is_int(value) or value < 0:
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


def _digest(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, str) or not _HEX64.fullmatch(value):
        raise ManifestError(f"digest {value!r} is not 64 lowercase hex digits")


def _algorithm(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value not in HASHES:
        raise ManifestError(f"hash {value!r} is not known (accepted: {', '.join(HASHES)})")


@attrs.frozen
class FileEntry:
    """One file of a committed checkpoint, as its manifest records it."""

    path: str = attrs.field(validator=_relative_path)
    """Relative to the checkpoint directory; never absolute, never ``..``."""
    size: int = attrs.field(validator=_count)
    digest: str = attrs.field(validator=_digest)
    """The file's hash, hex, by ``algorithm``."""
    algorithm: str = attrs.field(default=HASH, validator=_algorithm)

    @property
    def sha256(self) -> str:  # manifests of format 1
        return self.digest if self.algorithm == "sha256" else ""


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
    if len({f.algorithm for f in value}) > 1:
        raise ManifestError("files: every entry must use the same hash")


def _lineage(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, str) or not _LINEAGE.fullmatch(value):
        raise ManifestError(f"lineage {value!r} is not an id of letters, digits and '_.=+-'")


def _timestamp(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    try:
        dt.datetime.fromisoformat(value)
    except (TypeError, ValueError):
        raise ManifestError(f"created_at {value!r} is not an ISO 8601 timestamp") from None


def _format_version(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not is_int(value) or value not in READABLE:
        raise ManifestError(f"format_version {value!r} is not supported (this WMTP reads "
                            f"{', '.join(map(str, READABLE))})")


def _meta(instance: Any, attribute: attrs.Attribute, value: Mapping[str, Any]) -> None:
    """The keys WMTP acts on are typed; others are a sink's own notes."""
    fmt = value.get("format")
    if fmt is not None and fmt != "dcp":
        raise ManifestError(f"meta.format {fmt!r} is not known (accepted: 'dcp' or absent)")
    if fmt == "dcp" and not (is_int(value.get("world_size")) and value["world_size"] >= 1):
        raise ManifestError(f"meta.world_size {value.get('world_size')!r} is not an integer >= 1")
    # (saved_because: informational, so a reason a newer WMTP adds does not make it unverifiable)
    for key in ("algo", "resumed_from", "torch", "saved_because"):
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


@attrs.frozen
class Manifest:
    """The commit record: written last; a checkpoint without one does not exist."""

    run: str = attrs.field(validator=_run_name)
    step: int = attrs.field(validator=_count)
    role: Role = attrs.field(converter=_role)
    lineage: str = attrs.field(validator=_lineage)
    files: tuple[FileEntry, ...] = attrs.field(converter=tuple, validator=_files)
    created_at: str = attrs.field(validator=_timestamp)
    format_version: int = attrs.field(default=FORMAT_VERSION, validator=_format_version)
    meta: Mapping[str, Any] = attrs.field(factory=dict, converter=frozen_copy, hash=False,
                                          validator=_meta)

    def __attrs_post_init__(self) -> None:
        algorithms = {f.algorithm for f in self.files}
        if self.format_version == 1 and algorithms != {"sha256"}:
            raise ManifestError("format_version 1 records sha256 digests only")

    @property
    def nbytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def algorithm(self) -> str:
        return self.files[0].algorithm

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format_version": self.format_version,
            "run": self.run,
            "step": self.step,
            "role": self.role.value,
            "lineage": self.lineage,
            "created_at": self.created_at,
            "meta": dict(self.meta),
        }
        if self.format_version == 1:
            out["files"] = [{"path": f.path, "size": f.size, "sha256": f.digest} for f in self.files]
        else:
            out["hash"] = self.algorithm
            out["files"] = [{"path": f.path, "size": f.size, "digest": f.digest} for f in self.files]
        return out

    @classmethod
    def from_json(cls, data: Any) -> Manifest:
        """Parse and validate; raises :class:`ManifestError` naming the first problem."""
        if not isinstance(data, Mapping):
            raise ManifestError(f"the manifest is a {type(data).__name__}, not a JSON object")
        if "format_version" not in data:
            raise ManifestError("required key 'format_version' is missing")
        version = data["format_version"]
        _format_version(None, None, version)
        keys = MANIFEST_KEYS[version]
        missing = sorted(keys - {"meta"} - set(data))
        if missing:
            raise ManifestError(f"required key {missing[0]!r} is missing")
        unknown = sorted(set(data) - keys)
        if unknown:
            raise ManifestError(f"unknown key {unknown[0]!r}")
        algorithm = data["hash"] if version == 2 else "sha256"
        _algorithm(None, None, algorithm)
        files = data["files"]
        if not isinstance(files, list):
            raise ManifestError(f"files is {files!r}, not a list")
        field = "digest" if version == 2 else "sha256"
        entries = []
        for i, f in enumerate(files):
            if not isinstance(f, Mapping) or set(f) != ENTRY_KEYS[version]:
                raise ManifestError(f"files[{i}] is not an object with exactly "
                                    f"{', '.join(sorted(ENTRY_KEYS[version]))}")
            entries.append(FileEntry(path=f["path"], size=f["size"], digest=f[field], algorithm=algorithm))
        meta = data.get("meta", {})
        if not isinstance(meta, Mapping):
            raise ManifestError(f"meta is {meta!r}, not an object")
        try:
            return cls(run=data["run"], step=data["step"], role=data["role"], lineage=data["lineage"],
                       files=entries, created_at=data["created_at"], format_version=version, meta=meta)
        except TypeError as e:  # a value of a type no validator expects (a list as role...)
            raise ManifestError(str(e)) from None


def metric_of(manifest: Manifest, name: str) -> float | None:
    """The value of metric ``name`` a manifest records (``meta.metrics``), if it is a finite number."""
    import math

    metrics = manifest.meta.get("metrics") if isinstance(manifest.meta, Mapping) else None
    value = metrics.get(name) if isinstance(metrics, Mapping) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def best(manifests: Any, monitor: str, mode: str, k: int = 1) -> list[Manifest]:
    """The ``k`` best of ``manifests`` by the metric they record, best first (``mode``: ``min`` or
    ``max``); one without a finite value of it is never among them; ties go to the newer step.
    Retention (``keep_best``) and ``storage.final.from: best`` both choose with this."""
    scored = [(value, m) for m in manifests if (value := metric_of(m, monitor)) is not None]
    scored.sort(key=lambda vm: ((vm[0] if mode == "min" else -vm[0]), -vm[1].step))
    return [m for _, m in scored[:k]]
