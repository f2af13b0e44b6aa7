"""Tiered sink: resume state committed on a fast tier (local disk), copied in the background to
a durable tier (S3), where each copy commits with its own verified manifest.

``storage.resume: {sink: tiered, fast: <URL>, durable: <URL>, fast_keep_last: N}``. A save
commits on the fast tier (the commit protocol of :class:`~wmtp_core.FileSink`) and returns; one
background thread then streams the committed files to the durable tier, hashing every byte as
it passes and refusing a file that does not match the fast manifest, and commits the copy with
a manifest written last. After each copy the fast tier keeps its newest ``fast_keep_last``
checkpoints (never one that has no durable copy yet). The role's retention policy decides which
checkpoints exist at all: the router's deletions remove both copies, the durable one once a
checkpoint the policy keeps has committed there (the durable tier is never left without a
checkpoint while the kept ones are only on the fast tier). Resume takes the newest
checkpoint that verifies in either tier, preferring the fast copy. A copy that still fails
after the S3 client's own retries is raised as :class:`~wmtp_core.SaveError` at the next save
or when the run closes the sink. (After MosaicML Composer's ``RemoteUploader``.)

Every other ``storage.resume.options`` key is a storage option of the durable tier (for S3:
s3fs options; ``config_kwargs.retries`` sets botocore's retries, standard mode with 5 attempts
unless given). The options are read and checked in :mod:`wmtp_plugins._tiered_options`.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import posixpath
import threading
import uuid
from typing import Any

import attrs
from fsspec.core import split_protocol

from wmtp_core import (
    BindingError,
    CheckpointError,
    CorruptError,
    FileSink,
    ResumableSink,
    Role,
    SaveError,
    SinkSpec,
    StorageError,
    hookimpl,
)
from wmtp_core import eval_records
from wmtp_core.commit import CheckpointState, step_dirname
from wmtp_core.errors import first_line
from wmtp_core.naming import step_of
from wmtp_plugins import _tiered_nodes as nodes
from wmtp_plugins._tiered_copying import MAX_PENDING, Copying, fail  # noqa: F401
from wmtp_plugins._tiered_options import (  # noqa: F401  (also importable from here, as before)
    FAST_KEEP_LAST,
    RETRIES,
    TIER_KEYS,
    check,
    durable_options,
    scope,
    tiers,
)

log = logging.getLogger(__name__)


class TieredSink(Copying, ResumableSink):
    """Resume state on a fast tier, copied to a durable tier in the background (the module's
    docstring). Implements :class:`wmtp_core.ResumableSink` and ``unverifiable``. URIs are the
    durable tier's (``<durable>/<run>/step_<N>``), also while only the fast copy exists."""

    def __init__(self, context) -> None:
        if context.role is not Role.RESUME:
            raise BindingError(f"sink 'tiered' serves the resume role only, not {context.role.value!r}")
        options = dict(context.options)
        fast, durable, self.fast_keep_last = tiers(options)
        rest = {k: v for k, v in options.items() if k not in TIER_KEYS}
        self.node = nodes.this_node(context.coordinator)
        fast_scope, self.node_timeout = scope(options)
        self.spread = self.node.count > 1 and fast_scope == "node"
        """Each node's fast tier is its own disk (:mod:`wmtp_plugins._tiered_nodes`)."""
        fast = nodes.fast_url(fast, self.node, self.spread)
        self.fast = FileSink(attrs.evolve(context, base_path=fast, options={}))
        """The fast tier: where a save commits before it returns."""
        self.durable = FileSink(attrs.evolve(context, base_path=durable, options=durable_options(durable, rest)))
        """The durable tier: where each committed checkpoint is copied in the background."""
        self.run = context.run.name
        self.lineage = context.run.lineage
        self.coordinator = context.coordinator
        resumed = context.run.resumed_from
        self.resumed_from = self._own_step(resumed, strict=False) if resumed else None
        """The step this run resumed from, if it is one of this run's: never pruned."""
        self._copier = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="wmtp-tier-copy")
        self._copies: dict[int, cf.Future] = {}
        self._lock = threading.RLock()
        self._caught_up = False
        self._held: set[int] = set()
        self._heartbeat: nodes.Heartbeat | None = None
        """Steps retention deleted whose durable copy waits for a kept one to commit (see ``delete``)."""

    # -- the sink interface --------------------------------------------------------------
    def location(self) -> str:
        """The durable tier's run directory (no credentials)."""
        return self.durable.location()

    def store(self, event, payload):
        """Commit on the fast tier, queue the copy to the durable tier, return. A copy that
        failed since the last save is raised here, before anything of this step is written."""
        if event.role is not Role.RESUME:
            raise CheckpointError(f"sink 'tiered' serves the resume role only, not {event.role.value!r}")
        world = self.coordinator
        main = world.is_main  # under FSDP rank 0 alone copies and prunes
        failure = world.broadcast(self._failure() if main else None)  # every rank stops, or none
        if failure:
            raise SaveError(failure)
        if self.spread and payload.sharded:
            return self._store_parts(event, payload)
        if main:
            self._throttle()
        receipt = self.fast.store(event=event, payload=payload)
        if main:
            if not self._caught_up:
                self._catch_up(event.step)
            self._queue(event.step)
        return attrs.evolve(receipt, uri=self._uri(event.step))

    def _store_parts(self, event, payload):
        """Node-local fast tiers: every node commits its part there and copies it to the durable
        staging rank 0 opened for the step (:mod:`wmtp_plugins._tiered_nodes`)."""
        world, node, token = self.coordinator, self.node, None
        if world.is_main:
            try:
                nodes.open_durable(self.durable.checkpoints, self.run, event.step)
                token = uuid.uuid4().hex
            except Exception as e:  # said at the next save, as a failed copy is
                self._copies[event.step] = self._copier.submit(fail, e)
        token = world.broadcast(token)
        if node.leader:
            self._throttle()
            if self._heartbeat is None:
                self._heartbeat = nodes.Heartbeat(self.durable.checkpoints, self.run, node, self.node_timeout)
        receipt = nodes.store_part(self.fast, event, payload, world, node)
        if node.leader and token:
            self._queue(event.step, token)
        return attrs.evolve(receipt, uri=self._uri(event.step))

    def committed(self) -> list[tuple[str, Any]]:
        """This run's checkpoints committed in either tier, oldest first, under their durable
        URIs (the durable copy's manifest where there is one); not those retention deleted whose
        durable copy is still held (see :meth:`delete`)."""
        by_step = {m.step: m for _, m in self.fast.committed() if not nodes.is_part(m)}
        try:
            by_step.update({m.step: m for _, m in self.durable.committed()})
        except Exception as e:  # unreachable, no permission: say where, in one line (exit 1)
            if isinstance(e, (CheckpointError, StorageError)):
                raise
            raise StorageError(f"the durable tier {self.durable.location()} cannot be listed: "
                               f"{type(e).__name__}: {first_line(e)}") from None
        with self._lock:  # a durable copy retention deleted but that is still held: gone here
            held = set(self._held)
        return [(self._uri(step), by_step[step]) for step in sorted(by_step) if step not in held]

    def held(self, run_name: str, lineages: set[str] | None = None) -> list:
        """Every committed copy of ``run_name``'s resume checkpoints, durable tier first, each
        under its own tier's URI: both tiers hold bytes (``wmtp report`` counts both)."""
        out = []
        for tier in (self.durable, self.fast):
            out += [h for h in tier.held(run_name, lineages) if h.role is Role.RESUME]
        return out

    def unverifiable(self) -> list[tuple[str, int, str]]:
        """Step directories of either tier whose manifest cannot be believed."""
        return self.fast.unverifiable() + self.durable.unverifiable()

    def load(self, uri: str):
        """The fast copy of the step if it verifies, else the durable one; a checkpoint of
        another run through the tier whose protocol its URI names."""
        step = self._own_step(uri, strict=False)
        if step is None:
            return self._tier_of(uri).load(uri)
        with self._lock:
            if step in self._held:
                raise CheckpointError(f"{uri}: step {step} was deleted by the retention policy (its durable "
                                      "copy stays only until a newer one commits there)")
        errors, corrupt = [], True
        # node-local fast tiers hold a part each: every rank reads the durable copy
        for name, tier in (("fast", self.fast), ("durable", self.durable))[1 if self.spread else 0:]:
            path = tier.checkpoints.path_of(self.run, step_dirname(step))
            try:
                return tier.load(path)
            except CheckpointError as e:
                errors.append(f"{name}: {e}")
                # a tier without this step is not a corrupt copy of it
                corrupt = corrupt and (isinstance(e, CorruptError) or "never committed" in str(e))
        raise (CorruptError if corrupt else CheckpointError)(
            f"step {step} verifies in neither tier ({'; '.join(errors)})")

    def quarantine(self, uri: str, reason: str) -> str | None:
        """Move aside every copy of the step ``uri`` names whose files do not match its
        manifest (see :meth:`wmtp_core.FileSink.quarantine`); when every copy matches its
        manifest, what could not be used is their content, which each copy holds: move them all
        (an unusable checkpoint). Returns where the durable one went (else the fast one)."""
        step = self._own_step(uri, strict=False)
        if step is None:
            return self._tier_of(uri).quarantine(uri, reason)
        moved, intact = None, []
        with self._lock:
            for tier in (self.fast, self.durable):
                path = tier.checkpoints.path_of(self.run, step_dirname(step))
                try:
                    tier.checkpoints.verify(path)
                    intact.append((tier, path))
                except CorruptError as e:
                    moved = tier.quarantine(tier.checkpoints.uri(path), f"{reason} ({e})") or moved
                except CheckpointError:
                    pass  # no copy here, or one that is not in the way
            if moved is None:
                for tier, path in intact:
                    moved = tier.quarantine(tier.checkpoints.uri(path), reason) or moved
        return moved

    def quarantined(self) -> list[tuple[str, str]]:
        """Quarantined checkpoints of this run in either tier, as ``(uri, reason)``."""
        return self.fast.quarantined() + self.durable.quarantined()

    def record_evaluation(self, uri: str, metrics) -> bool:
        """On the durable tier, beside the durable copies (the URIs :meth:`committed` lists),
        whether or not this step's copy landed there yet."""
        step = self._own_step(uri)
        manifest = next((m for s, m in ((m.step, m) for _, m in self.committed()) if s == step), None)
        if manifest is None:
            raise CheckpointError(f"{uri} is not a committed checkpoint of run {self.run!r}")
        store = self.durable.checkpoints
        eval_records.write(store.fs, store.path_of(self.run, step_dirname(step)), manifest, metrics)
        return True

    def evaluations(self) -> dict:
        """The durable tier's records of the checkpoints :meth:`committed` lists (a durable copy
        retention deleted may be held a while longer, its record with it)."""
        steps = {m.step for _, m in self.committed()}
        return {key: v for key, v in self.durable.evaluations().items() if key[0] in steps}

    def lease_store(self):
        """The run's lease lives on the durable tier, the one every host of a job shares."""
        return self.durable.checkpoints

    def delete(self, uri: str) -> None:
        """Remove both copies; a copy still queued is dropped, one in flight finishes first.
        The durable copy goes once a checkpoint retention keeps has committed there (until then
        it is the only checkpoint a new machine could resume from). Called on the router's retention
        thread."""
        step = self._own_step(uri)
        with self._lock:
            copying = self._copies.get(step)
        if copying is not None and copying.cancel():
            with self._lock:
                self._copies.pop(step, None)
        elif copying is not None:
            cf.wait([copying])  # its failure, if any, still surfaces
        with self._lock:
            path = self.fast.checkpoints.path_of(self.run, step_dirname(step))
            if self.fast.checkpoints.inspect_dir(path).state is CheckpointState.COMMITTED:
                self.fast.checkpoints.delete(path)
            self._held.add(step)
            self._release_held()

    def _release_held(self) -> None:
        """Delete the durable copies retention asked for once the durable tier holds a
        checkpoint retention keeps; until then they stay: the durable tier is never left
        without a checkpoint while the kept ones are still only on the fast tier (a machine
        lost then would lose every step)."""
        with self._lock:
            if not self._held:
                return
            durable = self.durable.checkpoints
            if not {m.step for _, m in self.durable.committed()} - self._held:
                log.info("tiered: the durable copies of steps %s are kept until a newer one commits there",
                         ", ".join(map(str, sorted(self._held))))
                return
            for step in sorted(self._held):
                path = durable.path_of(self.run, step_dirname(step))
                if durable.inspect_dir(path).state is CheckpointState.COMMITTED:
                    durable.delete(path)
                self._held.discard(step)

    def clean_incomplete(self) -> list[Any]:
        """This run's saves that never finished, removed from both tiers (see
        :meth:`wmtp_core.FileSink.clean_incomplete`); called before the first save."""
        return [item for tier in (self.fast, self.durable) for item in tier.clean_incomplete()]

    def wait(self) -> None:
        """Block until every copy queued so far is done; raise :class:`SaveError` for one that
        failed (rank 0: another node's copy that failed is in its failure, and a rank that
        raised alone at the end would leave the others waiting in a collective)."""
        with self._lock:
            pending = list(self._copies.values())
        cf.wait(pending)
        failure = self._failure()
        if failure and self.coordinator.is_main:
            raise SaveError(failure)

    def close(self) -> None:
        """Wait for the copies still queued (the end of a run keeps the last checkpoint's
        durable copy), then raise any failure."""
        try:
            self.wait()
        finally:
            self._copier.shutdown(wait=True)
            if self._heartbeat is not None:
                self._heartbeat.stop()

    # -- URIs ------------------------------------------------------------------------------
    def _uri(self, step: int) -> str:
        store = self.durable.checkpoints
        return store.uri(store.path_of(self.run, step_dirname(step)))

    def _fast_uri(self, step: int) -> str:
        store = self.fast.checkpoints
        return store.uri(store.path_of(self.run, step_dirname(step)))

    def _own_step(self, uri: str, strict: bool = True) -> int | None:
        """The step of this run's checkpoint ``uri`` names in either tier."""
        for tier in (self.durable, self.fast):
            store = tier.checkpoints
            if (split_protocol(uri)[0] or "file") not in _protocols(store.fs):
                continue
            path = type(store.fs)._strip_protocol(uri).rstrip("/")
            step = step_of(path)
            if step is not None and posixpath.dirname(path) == store.run_dir(self.run):
                return step
        if strict:
            raise CheckpointError(f"{uri} is not a checkpoint of run {self.run!r} in either tier "
                                  f"({self.fast.location()}, {self.durable.location()})")
        return None

    def _tier_of(self, uri: str) -> FileSink:
        protocol = split_protocol(uri)[0] or "file"
        for tier in (self.durable, self.fast):
            if protocol in _protocols(tier.checkpoints.fs):
                return tier
        raise CheckpointError(f"{uri}: neither tier reads {protocol}:// ({self.fast.location()}, "
                              f"{self.durable.location()})")


def _protocols(fs: Any) -> set[str]:
    p = fs.protocol
    names = set(p) if isinstance(p, (tuple, list)) else {p}
    return names | {"file", "local"} if names & {"file", "local"} else names


@hookimpl
def wmtp_register_sinks(register):
    register(SinkSpec(
        name="tiered",
        roles={Role.RESUME},
        factory=TieredSink,
        protocols=(),
        description="resume state committed on a fast tier (local disk), copied in the background "
                    "to a durable tier (S3) with its own manifest",
        check=check,
    ))
