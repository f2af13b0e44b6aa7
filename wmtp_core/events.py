"""Frozen values that travel through hooks and come back from sinks.

No class here holds checkpoint bytes: the bytes go from the router to the bound sink only.
"""

from __future__ import annotations

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


@attrs.frozen
class FileEntry:
    """One file of a committed checkpoint, as its manifest records it."""

    path: str
    """Relative to the checkpoint directory."""
    size: int = attrs.field(validator=_non_negative)
    sha256: str = attrs.field(validator=attrs.validators.matches_re(r"^[0-9a-f]{64}$"))


@attrs.frozen
class Manifest:
    """The commit record: written last; a checkpoint without one does not exist."""

    run: str
    step: int = attrs.field(validator=_non_negative)
    role: Role = attrs.field(converter=Role)
    lineage: str
    files: tuple[FileEntry, ...] = attrs.field(converter=tuple)
    created_at: str
    format_version: int = FORMAT_VERSION
    meta: Mapping[str, Any] = attrs.field(factory=dict, converter=_frozen_map, hash=False)

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
    def from_json(cls, data: Mapping[str, Any]) -> Manifest:
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"manifest format_version {version!r} is not supported (this WMTP reads {FORMAT_VERSION})"
            )
        return cls(
            run=data["run"],
            step=int(data["step"]),
            role=data["role"],
            lineage=data["lineage"],
            files=[FileEntry(**f) for f in data["files"]],
            created_at=data["created_at"],
            format_version=version,
            meta=data.get("meta", {}),
        )


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
