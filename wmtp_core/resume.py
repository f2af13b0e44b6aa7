"""The resume service: where a run starts, read through its resume sink.

One call, :func:`open_resume`, before the run's router exists: take the run's lease (one writer
per run), find the checkpoint ``--resume`` names (for ``latest``, the newest one that verifies,
moving aside every corrupt one in the way), let the engine restore it, and remove this run's own
saves that never finished. ``wmtp checkpoints verify`` and ``wmtp register`` check a checkpoint
through :func:`verify_checkpoint`, the same verified read with the same quarantine.

Storage layer: it talks to sinks and stores, and to the ranks only through a
:class:`~wmtp_core.coordination.Coordinator`.
"""

from __future__ import annotations

from typing import Any, Callable

import attrs
from rich.console import Console
from rich.text import Text

from wmtp_core.coordination import ALONE, Coordinator
from wmtp_core.errors import CheckpointError, CorruptError, UnusableError
from wmtp_core.lease import Lease, LeaseHeldError
from wmtp_core.manifest import Manifest
from wmtp_core.sinks import LoadedCheckpoint, ResumableSink

SPECS = ("auto", "latest")
"""What ``--resume`` takes besides a checkpoint's URI."""

Restore = Callable[[LoadedCheckpoint, str], None]
"""The engine's restore: raises :class:`CheckpointError` to refuse a checkpoint."""


@attrs.frozen
class ResumePoint:
    """Where the run starts: a checkpoint (``uri``, ``manifest``), or fresh (both ``None``)."""

    uri: str | None = None
    manifest: Manifest | None = None
    lease: Lease | None = attrs.field(default=None, eq=False)
    """The run's lease, held and renewed by rank 0 until the run releases it."""


def open_resume(sink: ResumableSink, run_name: str, spec: str | None, err: Console, *,
                coordinator: Coordinator = ALONE, restore: Restore = lambda loaded, uri: None) -> ResumePoint:
    """Everything before a run's first save, through its resume sink: the lease, the resume point
    ``spec`` names (``None``: a fresh run, refused when the run has committed checkpoints;
    ``auto``: ``latest`` when it has one, else fresh; ``latest``; a URI), then the clean start.
    Every rank calls it; rank 0 alone takes the lease, quarantines and cleans."""
    lease = take_lease(sink, run_name, err, coordinator)
    try:
        if spec == "auto":
            spec = "latest" if sink.committed() else None
            if spec is None:
                err.print(f"--resume auto: run {run_name!r} has no committed checkpoint at {sink.location()}; "
                          "starting fresh", highlight=False)
        point = ResumePoint(lease=lease)
        if not spec:
            if sink.committed():
                raise CheckpointError(
                    f"run {run_name!r} already has committed checkpoints at {sink.location()}; "
                    "continue it with --resume latest, or choose another --run-name")
        else:
            uri, manifest = find_resume(sink, spec, err, restore=restore, quarantine=coordinator.is_main)
            point = ResumePoint(uri=uri, manifest=manifest, lease=lease)
        if coordinator.is_main:
            clean_incomplete(sink, err)
        return point
    except BaseException:
        if lease is not None:
            lease.release()
        raise


def find_resume(sink: ResumableSink, spec: str, err: Console, *,
                restore: Restore = lambda loaded, uri: None, quarantine: bool = False) -> tuple[str, Manifest]:
    """Load and restore the checkpoint ``spec`` names; for ``latest``, the newest one that
    verifies and restores, saying why each newer one was skipped (a directory whose manifest
    cannot be believed included). ``quarantine`` (rank 0 of a run that will write): move aside,
    through the sink, every checkpoint whose files do not match its manifest or that cannot be
    used (:class:`~wmtp_core.errors.UnusableError`: refused by weights-only loading, or state
    the engine refuses to restore for what it holds rather than for this run's settings), and
    every unbelievable directory at a step after the resume point, so the run can commit those
    steps again. Returns ``(uri, manifest)``."""
    user = _User(sink, err, quarantine)
    if spec != "latest":
        return spec, user.use(spec, restore).manifest
    committed = sink.committed()
    if not committed:
        raise CheckpointError(f"--resume latest: no committed checkpoint under {sink.location()}")
    unverifiable = sink.unverifiable()
    newest = committed[-1][1].step
    for uri, step, reason in unverifiable:  # newer than anything committed: say why it is not used
        if step > newest:
            err.print(Text.assemble(("skipping ", "yellow"), f"{uri}: {reason}"))
    for uri, _ in reversed(committed):
        try:
            loaded = user.use(uri, restore)
        except CheckpointError as e:
            err.print(Text.assemble(("skipping ", "yellow"), f"{uri}: {e}"))
            continue
        if quarantine:  # in the way of the steps this run commits next
            for other, step, reason in unverifiable:
                if step > loaded.manifest.step:
                    _quarantine(sink, other, reason, err)
        return uri, loaded.manifest
    raise CheckpointError(f"--resume latest: no checkpoint under {sink.location()} verifies"
                          + (f" ({len(user.moved)} quarantined)" if user.moved else ""))


class _User:
    """Loads and restores checkpoints for :func:`find_resume`; with ``quarantine``, moves aside
    (through the sink) each one that is corrupt or cannot be used."""

    def __init__(self, sink: ResumableSink, err: Console, quarantine: bool) -> None:
        self.sink, self.err, self.quarantine = sink, err, quarantine
        self.moved: set[str] = set()

    def use(self, uri: str, restore: Restore) -> LoadedCheckpoint:
        try:
            loaded = self.sink.load(uri)  # a sharded checkpoint: every rank together, by the sink's coordinator
            restore(loaded, uri)  # an UnusableError: its content, not this run's settings
        except CorruptError as e:
            if self.quarantine and uri not in self.moved:
                _quarantine(self.sink, uri, str(e), self.err, unusable=isinstance(e, UnusableError))
                self.moved.add(uri)
            raise
        return loaded


def _quarantine(sink: ResumableSink, uri: str, reason: str, err: Console, *, unusable: bool = False) -> None:
    where = sink.quarantine(uri, reason)
    if where:
        why = "it cannot be used" if unusable else "it failed verification"
        err.print(Text.assemble(("quarantined ", "yellow"), f"{uri} as {where}: {why}; "
                                "kept for inspection, `wmtp gc --quarantined` removes it"))


def take_lease(sink: ResumableSink, run_name: str, err: Console, coordinator: Coordinator = ALONE) -> Lease | None:
    """One writer per run: rank 0 takes the run's lease on the resume storage (refused while
    another live process holds it) and renews it until the run releases it; every rank learns
    the refusal. A sink whose ``lease_store()`` is ``None`` has no lease."""
    failure, lease = None, None
    store = sink.lease_store() if coordinator.is_main else None
    if store is not None:
        lease = Lease(store, run_name,
                      warn=lambda text: err.print(Text.assemble(("warning: ", "yellow"), text)))
        try:
            lease.acquire()
            lease = lease.start()
        except LeaseHeldError as e:
            failure, lease = str(e), None
        except BaseException as e:  # Ctrl-C while taking it: never leave a lease that was just written
            if not isinstance(e, Exception):  # (storage that fails is said as it is: nothing to remove)
                lease.release()
            raise
    failure = coordinator.broadcast(failure)
    if failure:
        if lease is not None:
            lease.release()
        raise LeaseHeldError(failure)
    return lease


def clean_incomplete(sink: ResumableSink, err: Console) -> None:
    """Before the first save: remove this run's own saves that never finished (staging
    directories, uploads never completed); never another run's. Rank 0 only: the other ranks'
    first sharded save waits on rank 0's ``prepare`` anyway."""
    for item in sink.clean_incomplete():
        err.print(f"removed {item.describe()}: a save of this run that never finished", highlight=False)


@attrs.frozen
class Verdict:
    """What :func:`verify_checkpoint` found: the manifest when every file verified, else the
    problem, and where a corrupt checkpoint was moved (``None``: left in place)."""

    manifest: Manifest | None
    problem: str = ""
    quarantined: str | None = None


def verify_checkpoint(store: Any, path: str, *, quarantine: bool = True) -> Verdict:
    """Verify every file of the committed checkpoint at ``path`` of ``store`` (a
    :class:`~wmtp_core.commit.CheckpointStore`) against its manifest, then deserialise it as a
    run would and check its structure (:func:`~wmtp_core.store_usable.verify_usable`). One
    whose files do not match it, or that no run could use, is moved aside (quarantined) unless
    ``quarantine`` is false, exactly as a resume moves it."""
    from wmtp_core.store_usable import verify_usable

    try:
        return Verdict(manifest=verify_usable(store, path))
    except CorruptError as e:
        moved = store.quarantine(path, str(e)) if quarantine else None
        return Verdict(manifest=None, problem=str(e), quarantined=store.uri(moved) if moved else None)
    except CheckpointError as e:
        return Verdict(manifest=None, problem=str(e))
