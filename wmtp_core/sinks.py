"""What a sink is: the typed interface the router calls, and the values it returns.

A sink is the object a :class:`~wmtp_core.catalog.SinkSpec` factory builds from a
:class:`~wmtp_core.events.SinkContext`: an instance of :class:`Sink` (or, for the resume role,
:class:`ResumableSink`), which declares every operation a caller may use, each optional one
with its default. The router and the resume service (:mod:`wmtp_core.resume`) call it during a
run; the ``wmtp`` command calls it to list, verify and remove.

Writing a file-like sink (files under a base path, any fsspec protocol) is a few lines with the
toolkit exported beside these: :class:`~wmtp_core.filesink.FileSink` over
:class:`~wmtp_core.commit.CheckpointStore` (see ``docs/plugins.md``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Protocol, runtime_checkable

import attrs

from wmtp_core.roles import Role

if TYPE_CHECKING:
    from wmtp_core.commit import CheckpointStore
    from wmtp_core.events import CheckpointEmitted, Payload, Receipt
    from wmtp_core.manifest import Manifest


@attrs.frozen
class LoadedCheckpoint:
    """A resume checkpoint a sink verified and loaded: what the engine restores from."""

    manifest: Manifest
    parts: Mapping[str, Any] = attrs.field(hash=False)
    """``model``, ``optimizer`` and ``trainer`` (plain state dicts); for a sharded checkpoint,
    ``trainer`` only (this rank's counters, RNG streams and data position)."""
    shards: Any = attrs.field(default=None, hash=False, eq=False)
    """For a sharded checkpoint: a ``torch.distributed.checkpoint`` storage reader that loads
    model and optimizer shards into any world size; ``None`` otherwise."""
    same_world: bool = True
    """Sharded only: written by as many ranks as read it (RNG streams are then restored
    exactly; otherwise each rank gets fresh, distinct streams)."""


@attrs.frozen
class Holding:
    """Something a sink holds for a run: a committed checkpoint or a registered model."""

    role: Role
    uri: str
    step: int | None
    nbytes: int | None
    """``None`` when the sink cannot tell."""


class Sink:
    """Base of every sink, whatever its role: subclass it (as fsspec filesystems subclass
    ``AbstractFileSystem``). ``store`` and ``location`` are required; every other operation is
    declared here with its default, so a sink overrides exactly what it supports and no caller
    ever asks whether a method exists. ``docs/plugins.md`` lists each operation, what it must
    guarantee and its default; :class:`wmtp_core.testing.SinkContract` checks each one a sink
    overrides.

    The factory of a :class:`~wmtp_core.catalog.SinkSpec` builds it from a
    :class:`~wmtp_core.events.SinkContext`; the run's router and its resume service
    (:mod:`wmtp_core.resume`) are its callers, and the ``wmtp`` command for what it lists.
    """

    @classmethod
    def overrides(cls, operation: str) -> bool:
        """Whether this sink implements the optional ``operation`` itself rather than taking
        the base class's default (what the contract tests check, and what ``wmtp plugins``
        shows). An operation neither base class declares is an ``AttributeError``."""
        for base in (Sink, ResumableSink):
            if operation in vars(base):
                return getattr(cls, operation) is not vars(base)[operation]
        raise AttributeError(f"{operation!r} is not an operation of a sink (see wmtp_core.sinks)")

    def store(self, event: CheckpointEmitted, payload: Payload) -> Receipt:
        """Required. Store the payload and commit it; return where it landed. Called with keyword
        arguments, once per emitted checkpoint, by the router only (possibly on a background
        thread)."""
        raise NotImplementedError(f"{type(self).__name__} must implement store(event=, payload=)")

    def location(self) -> str:
        """Required. Where this sink keeps this run's checkpoints, without credentials (shown to
        users, tagged in MLflow as the resume state's location)."""
        raise NotImplementedError(f"{type(self).__name__} must implement location()")

    def close(self) -> None:
        """Called once when the run (or the command) is done with the sink: wait for work in
        flight, release clients. Default: nothing to do."""

    def stored_final(self, run: Any) -> Receipt | None:
        """Final role: the newest final model this run's lineage already stored, as a
        :class:`~wmtp_core.Receipt` (its ``uri``, and in ``step`` the step of its weights), so
        that a resumed run that trained nothing new never stores it twice, and one that trained
        further stores the new weights (the event's ``supersedes`` names the old one). Default:
        ``None`` (the sink cannot tell; the router still stores at most once per router)."""
        return None

    def held(self, run_name: str, lineages: set[str] | None = None) -> list[Holding]:
        """What this sink holds for ``run_name`` (``lineages``: only these), for ``wmtp
        report``. Default: ``[]`` (the sink cannot list what it holds)."""
        return []


class ResumableSink(Sink):
    """Base of a sink for the resume role: it also lists, loads and deletes what it committed.
    ``committed``, ``load`` and ``delete`` are required; the rest have defaults that mean "not
    supported" (see each)."""

    def committed(self) -> list[tuple[str, Manifest]]:
        """Required. This run's committed resume checkpoints as ``(uri, manifest)``, oldest step
        first."""
        raise NotImplementedError(f"{type(self).__name__} must implement committed()")

    def load(self, uri: str) -> LoadedCheckpoint:
        """Required. Verify the checkpoint at ``uri`` and load it; raise ``CheckpointError``
        naming what failed (``CorruptError`` when a file does not match its manifest). A sharded
        checkpoint is loaded by every rank together, through ``context.coordinator``."""
        raise NotImplementedError(f"{type(self).__name__} must implement load(uri)")

    def delete(self, uri: str) -> None:
        """Required. Remove a committed checkpoint: uncommit first, so an interrupted delete
        never leaves a loadable checkpoint with missing files. Called by retention."""
        raise NotImplementedError(f"{type(self).__name__} must implement delete(uri)")

    def unverifiable(self) -> list[tuple[str, int, str]]:
        """Checkpoints whose manifest cannot be believed, as ``(uri, step, reason)``: ``--resume
        latest`` says why it skips them. Default: ``[]`` (the sink lists none)."""
        return []

    def quarantine(self, uri: str, reason: str) -> str | None:
        """Move the checkpoint at ``uri``, which failed verification, aside (never delete it):
        no longer committed, kept for inspection. Returns where it now is, or ``None`` when it
        stayed where it was. Default: ``None`` (not supported: a corrupt checkpoint is skipped,
        not moved)."""
        return None

    def quarantined(self) -> list[tuple[str, str]]:
        """This run's quarantined checkpoints as ``(uri, reason)``. Default: ``[]``."""
        return []

    def record_evaluation(self, uri: str, metrics: Mapping[str, float]) -> bool:
        """Keep the metrics of an evaluation of the committed checkpoint ``uri`` that finished
        after it committed (a committed manifest is never rewritten), so that ``keep_best`` and
        ``storage.final.from: best`` can rank by them; on rank 0, off the training loop. Returns
        whether they were kept. Default: ``False`` (the metrics still reach MLflow; retention
        ranks by what the manifests record)."""
        return False

    def evaluations(self) -> dict[tuple[int, str], dict[str, float]]:
        """What :meth:`record_evaluation` kept for this run, as ``{(step, lineage): metrics}``.
        Default: ``{}``."""
        return {}

    def lease_store(self) -> CheckpointStore | None:
        """The store that holds the run's lease (one writer per run, :mod:`wmtp_core.lease`).
        Default: ``None`` (no lease: the sink cannot make the conditional writes it needs)."""
        return None

    def clean_incomplete(self) -> list[Any]:
        """Remove this run's own saves that never finished (staging, incomplete uploads) and
        return what was removed (each with ``describe()``); never another run's. Called once, on
        rank 0, before the first save. Default: ``[]`` (nothing to clean)."""
        return []


@runtime_checkable
class FileLikeSink(Protocol):
    """A sink that keeps its checkpoints as files through WMTP's commit protocol (every
    :class:`~wmtp_core.filesink.FileSink` is one). The contract tests reach its files through
    ``checkpoints`` to corrupt one or leave staging behind."""

    checkpoints: CheckpointStore
    """The store the sink commits through."""
