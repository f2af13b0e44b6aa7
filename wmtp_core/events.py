"""Frozen values that travel through hooks and come back from sinks.

No class here holds checkpoint bytes: the bytes go from the router to the bound sink only.
"""

from __future__ import annotations

import enum
import types
from typing import Any, Mapping

import attrs

from wmtp_core.coordination import ALONE
from wmtp_core.manifest import SAVE_REASONS
from wmtp_core.roles import Role
from wmtp_core.sinks import Holding
from wmtp_core.validators import check, frozen_copy, is_int


def _view(value: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """A read-only view of a copy of the top level (tensors are never copied)."""
    return types.MappingProxyType(dict(value or {}))


_step = check(lambda v: is_int(v) and v >= 0, "a step is an integer >= 0")


class RunStatus(str, enum.Enum):
    """How a run ended."""

    FINISHED = "finished"
    STOPPED_EARLY = "stopped_early"
    FAILED = "failed"
    PREEMPTED = "preempted"
    """Stopped by a signal after committing its last step: resumable with ``--resume latest``."""

    def __str__(self) -> str:
        return self.value


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
    tags: Mapping[str, str] = attrs.field(factory=dict, converter=frozen_copy, hash=False)
    """Tags from ``--tags`` and the recipe."""


@attrs.frozen
class SinkContext:
    """What a sink factory gets to build a sink for one run. The router builds it from the
    role's binding."""

    role: Role
    """The role the sink will serve."""
    run: RunInfo
    base_path: str
    """Where a file-like sink keeps the role's checkpoints (``paths.checkpoints.base_path`` or
    ``storage.<role>.base_path``)."""
    options: Mapping[str, Any] = attrs.field(factory=dict, converter=frozen_copy, hash=False)
    """Sink options from ``storage.<role>.options`` (for file-like sinks: fsspec storage options)."""
    mlflow: Mapping[str, Any] = attrs.field(factory=dict, converter=frozen_copy, hash=False)
    """The ``mlflow`` config section: ``experiment``, ``tracking_uri``, ``registry_uri``."""
    coordinator: Any = attrs.field(factory=lambda: ALONE, hash=False, eq=False)
    """How the ranks of this job agree (:class:`~wmtp_core.coordination.Coordinator`): a sharded
    save or load goes through it; :data:`~wmtp_core.coordination.ALONE` for one process."""


@attrs.frozen
class RunStarted:
    run: RunInfo
    params: Mapping[str, Any] = attrs.field(factory=dict, converter=frozen_copy, hash=False)
    """The flattened configuration, secrets redacted."""
    bindings: Mapping[str, str] = attrs.field(factory=dict, converter=frozen_copy, hash=False)
    """Role name -> sink name."""
    start_step: int = 0
    """0 for a new run; the restored step for a resumed one."""
    mlflow: Mapping[str, Any] = attrs.field(factory=dict, converter=frozen_copy, hash=False)
    """The ``mlflow`` config section (``experiment``, ``tracking_uri``, ``registry_uri``)."""


@attrs.frozen
class StepEnded:
    run: RunInfo
    step: int = attrs.field(validator=_step)
    metrics: Mapping[str, float] = attrs.field(factory=dict, converter=_view, hash=False)


@attrs.frozen
class CheckpointEmitted:
    """The engine asked for a checkpoint to be stored. Describes it; does not carry it."""

    run: RunInfo
    role: Role
    step: int = attrs.field(validator=_step)
    parts: tuple[str, ...] = attrs.field(converter=tuple)
    """Names of the state parts (``model``, ``optimizer``, ``trainer``...)."""
    nbytes: int = attrs.field(validator=_step)
    """Tensor bytes in the payload (an estimate of what will be stored)."""
    metrics: Mapping[str, float] = attrs.field(factory=dict, converter=_view, hash=False)
    resume_location: str | None = None
    """For the final model: where this run's resume state lives, as a reference."""
    supersedes: str | None = None
    """For the final model: the URI of the final model of an earlier step of this lineage that
    this one replaces (the run trained further after storing it); ``None`` for the first."""
    saved_because: str | None = attrs.field(default=None, validator=attrs.validators.optional(
        attrs.validators.in_(SAVE_REASONS)))
    """For resume state: why the engine saved this step, one of :data:`SAVE_REASONS`
    (``interval``: a multiple of ``save_interval``; ``timed``: ``save_every`` of training time
    passed; ``preempted``: a signal stopped the run here; ``last``: the last step of a run that
    ended otherwise). Sinks record it in the manifest's ``meta.saved_because``, so ``wmtp report``
    can tell a save of the run's own from one its config does not explain. ``None``: not said."""


@attrs.frozen
class Receipt:
    """What a sink returns after a commit: where and how much. The router stamps the sink's
    registered name and the time the store took; a sink leaves them out."""

    role: Role
    run: str
    step: int
    uri: str
    """Where it landed: a checkpoint directory URI or a ``models:/NAME/VERSION`` URI."""
    nbytes: int
    meta: Mapping[str, Any] = attrs.field(factory=dict, converter=frozen_copy, hash=False)
    sink: str = ""
    """The sink's registered name (stamped by the router)."""
    seconds: float = 0.0
    """Wall time of the store call, commit included (stamped by the router)."""


@attrs.frozen
class CheckpointEvaluated:
    """A committed checkpoint, final model or model folder was evaluated on code tasks
    (``wmtp evaluate``, or a run's ``eval:`` section in the background)."""

    uri: str
    """What was evaluated: a checkpoint directory URI, ``models:/NAME/VERSION`` or a folder."""
    step: int | None
    """The step of its weights (``None``: not a WMTP checkpoint)."""
    metrics: Mapping[str, float] = attrs.field(factory=dict, converter=_view, hash=False)
    """``eval/<task>/pass_at_<k>`` (and ``eval/tokens_per_forward`` with speculative decoding)."""
    role: Role | None = None
    lineage: str | None = None
    """The run lineage that produced it: its MLflow run receives the metrics."""
    run: RunInfo | None = None
    """The run in progress, when the run's own evaluation reports (``None``: ``wmtp evaluate``)."""
    mlflow: Mapping[str, Any] = attrs.field(factory=dict, converter=_view, hash=False)
    """The ``mlflow`` config section, for a plugin that reports outside a run."""
    error: str = ""
    """One line when the evaluation failed (``metrics`` is then empty)."""


@attrs.frozen
class RunEnded:
    run: RunInfo
    status: RunStatus = attrs.field(converter=RunStatus)
    last_step: int = 0
    metrics: Mapping[str, float] = attrs.field(factory=dict, converter=_view, hash=False)
    receipts: tuple[Receipt, ...] = attrs.field(default=(), converter=tuple)
    reason: str = ""
    """Why the run stopped (early stopping, an error), empty when it simply finished."""
    held: tuple[Holding, ...] = attrs.field(default=(), converter=tuple)
    """The resume checkpoints the resume sink holds for this run's lineage once the run's saves
    and retention are done (its :meth:`~wmtp_core.Sink.held` listing, what ``wmtp report``
    counts): with ``receipts``, what earlier parts of a resumed run committed. Empty when the
    run failed, the sink cannot list, or listing failed (a warning says so)."""


@attrs.frozen
class Payload:
    """What the router hands to the bound sink, and to nothing else.

    ``parts`` maps a part name (``model``, ``optimizer``, ``trainer``...) to an object made of
    tensors, numbers, strings, lists, tuples and dicts: loadable with ``weights_only=True``.
    """

    parts: Mapping[str, Any] = attrs.field(converter=_view, hash=False)
    model: Any = attrs.field(default=None, hash=False, eq=False)
    """For the final role: the trained module on CPU, for sinks that export a runnable model
    (``None`` for a Hugging Face model written shard by shard under FSDP: its ``folder`` is the
    model, and ``parts["model"]`` its tensors, memory-mapped from the folder's files)."""
    example_input: Any = attrs.field(default=None, hash=False, eq=False)
    """For the final role: a batch of token ids the model accepts (used to trace or sign it)."""
    model_config: Mapping[str, Any] = attrs.field(factory=dict, converter=frozen_copy, hash=False)
    """For the final role: the architecture, enough to rebuild the module from the weights."""
    sharded: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    """The parts every rank holds a shard of (under FSDP: ``model``, ``optimizer``): every rank
    hands its shards to the sink together, through the sink context's coordinator, and the
    manifest is committed once, by rank 0. Every other part is this rank's own. Empty: nothing
    is sharded."""
    folder: str | None = None
    """For the final role of a Hugging Face model: a local directory holding the model as a
    Hugging Face folder (safetensors weights, ``config.json``, tokenizer files, the extra heads
    and ``wmtp.json``). File-like sinks store its files instead of ``model.pt``; the registry
    logs it with MLflow's transformers flavor."""


@attrs.frozen
class LoadedModel:
    """Weights and architecture loaded from a registry or a committed checkpoint."""

    weights: Mapping[str, Any] = attrs.field(factory=dict, converter=_view, hash=False)
    """A state dict of tensors, loadable into ``MTPModel(ModelConfig(**model_config))``."""
    model_config: Mapping[str, Any] = attrs.field(factory=dict, converter=frozen_copy, hash=False)
    source: str = ""
    """The URI it came from, resolved (``models:/NAME/latest`` -> the version loaded)."""
    folder: str | None = None
    """Set instead of ``weights`` for a Hugging Face model: a local directory holding only the
    files that cannot run code (``config.json``, safetensors, tokenizer files)."""
