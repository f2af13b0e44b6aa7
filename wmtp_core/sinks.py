"""What a sink is: the typed interface the router calls, and the values it returns.

A sink is the object a :class:`~wmtp_core.catalog.SinkSpec` factory builds from a
:class:`~wmtp_core.events.SinkContext`. The router is its only caller. Methods marked optional
may be left out; the router and the commands check for them with ``getattr``.

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


@runtime_checkable
class Sink(Protocol):
    """Every sink, whatever its role.

    Optional: ``close()`` (called once when the run ends); for the final role
    ``stored_final(run) -> str | None`` (the URI of the final model this run's lineage already
    stored, so a resumed run that had finished never stores it twice) and
    ``held(run_name, lineages) -> list[Holding]`` (what ``wmtp report`` lists).
    """

    def store(self, event: CheckpointEmitted, payload: Payload) -> Receipt:
        """Store the payload and commit it; return where it landed. Called with keyword
        arguments, once per emitted checkpoint, by the router only (possibly on a background
        thread)."""
        ...

    def location(self) -> str:
        """Where this sink keeps this run's checkpoints, without credentials (shown to users,
        tagged in MLflow as the resume state's location)."""
        ...


@runtime_checkable
class ResumableSink(Sink, Protocol):
    """A sink for the resume role: it also lists, loads and deletes what it committed.

    Optional: ``unverifiable() -> list[tuple[uri, step, reason]]`` (checkpoints whose manifest
    cannot be believed: ``--resume latest`` says why it skips them).
    """

    def committed(self) -> list[tuple[str, Manifest]]:
        """This run's committed resume checkpoints as ``(uri, manifest)``, oldest step first."""
        ...

    def load(self, uri: str, world: Any = None) -> LoadedCheckpoint:
        """Verify the checkpoint at ``uri`` and load it; raise ``CheckpointError`` naming what
        failed. ``world``: the process group when several ranks load a sharded checkpoint."""
        ...

    def delete(self, uri: str) -> None:
        """Remove a committed checkpoint: uncommit first, so an interrupted delete never leaves
        a loadable checkpoint with missing files. Called by retention."""
        ...


@runtime_checkable
class FileLikeSink(Protocol):
    """A sink that keeps its checkpoints as files through WMTP's commit protocol (every
    :class:`~wmtp_core.filesink.FileSink` is one). The contract tests reach its files through
    ``checkpoints`` to corrupt one or leave staging behind."""

    checkpoints: CheckpointStore
    """The store the sink commits through."""
