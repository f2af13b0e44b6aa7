"""The router: the only path from an emitted checkpoint to a sink.

It checks every binding before the first training step (:func:`wmtp_core.bindings.validate`),
builds exactly one sink per bound role from its binding, hands each payload to that sink alone,
stores the final model at most once, and prunes through the role's policy after the commit, in
the background, protecting what must stay.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import threading
import time
from typing import Any, Mapping

import attrs
import pluggy

from wmtp_core import eval_records
from wmtp_core.asyncsave import AsyncStats, BackgroundSaver
from wmtp_core.bindings import Bindings, build_policies, build_sink, validate
from wmtp_core.catalog import Catalog
from wmtp_core.coordination import ALONE, Coordinator
from wmtp_core.errors import BindingError, SaveError, WmtpError, first_line
from wmtp_core.events import CheckpointEmitted, Payload, Receipt, RunInfo
from wmtp_core.roles import Role

log = logging.getLogger(__name__)


class Router:
    """Dispatch emitted checkpoints to the sinks the configuration bound.

    :param required: roles this run will emit; each must be bound (checked at construction).
    :param mlflow: the ``mlflow`` config section, handed to every sink in its context.
    :param protected: ``(run, step)`` pairs retention must never delete (the resumed-from one).
    :param policies: the retention policy of each role, as the plan built them (built here from
        the bindings when not given).
    :param coordinator: how the ranks agree (:class:`~wmtp_core.coordination.Coordinator`),
        handed to every sink in its context: rank 0 alone asks the final sink whether the final
        model is stored and every rank learns the answer, so all of them take part in gathering
        the weights, or none does.
    """

    def __init__(
        self,
        pm: pluggy.PluginManager,
        catalog: Catalog,
        bindings: Bindings,
        run: RunInfo,
        *,
        required: frozenset[Role],
        mlflow: Mapping[str, Any] | None = None,
        protected: frozenset[tuple[str, int]] = frozenset(),
        coordinator: Coordinator = ALONE,
        policies: Mapping[Role, Any] | None = None,
    ) -> None:
        if bindings.checked_for != frozenset(required):  # a plan's bindings were checked once
            bindings = validate(bindings, catalog, required)
        self.pm = pm
        self.catalog = catalog
        self.bindings = bindings
        self.run = run
        self.mlflow = dict(mlflow or {})
        self.protected = frozenset(protected)
        self.coordinator = coordinator
        self._sinks: dict[Role, Any] = {}
        self._policies: dict[Role, Any] = dict(policies) if policies is not None else build_policies(bindings, catalog)
        self.receipts: list[Receipt] = []
        self.deleted: list[Receipt] = []
        self._pruner = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="wmtp-retention")
        self._pending: list[cf.Future] = []
        self._lock = threading.Lock()
        self._opened = False
        self._saver = BackgroundSaver()
        self._pinned: set[int] = set()
        self.ranks_by_records = False
        """Retention ranks by evaluation records too (:mod:`wmtp_core.eval_records`): set by a
        run whose checkpoints are evaluated in the background."""

    # -- life cycle ------------------------------------------------------------------------
    def open(self) -> Router:
        """Build each bound sink (from its binding: :func:`wmtp_core.bindings.build_sink`) and
        policy. Called after validation, before the first step."""
        for b in self.bindings.sinks:
            self._sinks[b.role] = build_sink(self.catalog, self.bindings, b.role, self.run, self.mlflow,
                                             coordinator=self.coordinator)
        self._opened = True
        return self

    def pin(self, step: int) -> None:
        """Retention spares this run's checkpoint of ``step`` until :meth:`unpin` (its
        evaluation is pending: ``keep_best`` cannot rank it yet)."""
        with self._lock:
            self._pinned.add(step)

    def unpin(self, step: int) -> None:
        with self._lock:
            self._pinned.discard(step)

    def retain(self, role: Role) -> None:
        """Apply the role's retention again (after evaluations unpinned checkpoints, or recorded
        the metrics ``keep_best`` ranks by), in the background like the pruning after a commit."""
        if role in self._policies:
            self._pending.append(self._pruner.submit(self._prune, role))

    def sink(self, role: Role) -> Any:
        try:
            return self._sinks[role]
        except KeyError:
            raise BindingError(f"role {role.value!r} has no sink in this run") from None

    def bound(self, role: Role) -> bool:
        return self.bindings.sink_for(role) is not None

    @property
    def async_stats(self) -> list[AsyncStats]:
        return self._saver.stats

    def close(self) -> None:
        """Wait for background saves and retention, surface their failures, close the sinks."""
        try:
            self.wait()
        finally:
            self._saver.close()
            self._pruner.shutdown(wait=True)
            for sink in self._sinks.values():
                sink.close()

    def wait(self) -> None:
        """Block until every save and prune started so far is done; raise the first failure."""
        self._saver.drain()
        pending, self._pending = self._pending, []
        errors = []
        for fut in pending:
            try:
                fut.result()
            except Exception as e:  # surfaced, never swallowed
                errors.append(e)
        if errors:
            raise errors[0]

    # -- the final model, once -------------------------------------------------------------
    def final_stored(self) -> Receipt | None:
        """The newest final model of this run's lineage already stored: by this router, or, for
        a resumed run, found by its sink (``stored_final``); its ``step`` is the step of its
        weights. The one place that decides "once per set of weights" (:meth:`emit` stores a
        final model only past that step); under several ranks every rank gets rank 0's
        answer."""
        answer: tuple[Receipt | None, str | None] = (None, None)
        if self.coordinator.is_main:
            try:
                answer = (self._final_stored(), None)
            except Exception as e:  # the sink cannot be asked: every rank must learn it
                answer = (None, f"{type(e).__name__}: {e}")
        stored, failure = self.coordinator.broadcast(answer)
        if failure is not None:
            raise BindingError(f"the final sink could not tell whether the final model is stored: {failure}")
        return stored

    def _final_stored(self) -> Receipt | None:
        mine = [r for r in self.receipts if r.role is Role.FINAL]
        if mine:
            return max(mine, key=lambda r: r.step)
        stored = self._sinks[Role.FINAL].stored_final(self.run) if Role.FINAL in self._sinks else None
        if stored is not None and not isinstance(stored, Receipt):
            name = self.bindings.sink_for(Role.FINAL).sink
            raise TypeError(f"sink {name!r}: stored_final() returned {stored!r}, not a Receipt or None")
        return stored

    # -- dispatch --------------------------------------------------------------------------
    def emit(
        self,
        role: Role,
        *,
        step: int,
        payload: Payload,
        metrics: Mapping[str, float] | None = None,
        nbytes: int = 0,
        background: bool = False,
        saved_because: str | None = None,
    ) -> Receipt | cf.Future:
        """Store one checkpoint through the sink bound to ``role``, and only there.

        The final model is refused if this run's lineage already stored one of this step or a
        later one; one of a later step supersedes the stored one. ``background``:
        stage the payload in memory and return at once with a future; the write, the commit,
        the ``wmtp_checkpoint_committed`` hook and retention follow in a background thread, at
        most one save in flight (:mod:`wmtp_core.asyncsave`). ``saved_because``: why the engine
        saves this resume state (:data:`wmtp_core.manifest.SAVE_REASONS`), for its manifest.
        """
        if not self._opened:
            raise RuntimeError("Router.open() must be called before emit()")
        sink = self.sink(role)
        stored = self._final_stored() if role is Role.FINAL else None
        if stored is not None and stored.step >= step:
            raise BindingError(f"the final model of run {self.run.name!r} is already stored for step "
                               f"{stored.step} ({stored.uri}); the weights of a step are stored once")
        event = CheckpointEmitted(
            run=self.run,
            role=role,
            step=step,
            parts=tuple(payload.parts),
            nbytes=nbytes,
            metrics=metrics or {},
            resume_location=self._resume_location() if role is Role.FINAL else None,
            supersedes=stored.uri if stored is not None else None,
            saved_because=saved_because if role is Role.RESUME else None,
        )
        emitted = self.pm.hook.wmtp_final_model_emitted if role is Role.FINAL else self.pm.hook.wmtp_resume_checkpoint_emitted
        emitted(event=event)
        if not background:
            self._saver.drain()  # a synchronous save never overtakes one in flight
            return self._store(role, sink, event, payload)
        return self._saver.submit(step, dict(payload.parts),
                                  lambda staged: self._store(role, sink, event, attrs.evolve(payload, parts=staged)))

    def _store(self, role: Role, sink: Any, event: CheckpointEmitted, payload: Payload) -> Receipt:
        name = self.bindings.sink_for(role).sink
        t0 = time.perf_counter()
        receipt = sink.store(event=event, payload=payload)
        seconds = time.perf_counter() - t0
        if not isinstance(receipt, Receipt):
            raise TypeError(f"sink {name!r} returned {receipt!r}, not a Receipt")
        receipt = attrs.evolve(receipt, sink=name, seconds=seconds)
        with self._lock:
            self.receipts.append(receipt)
        self.pm.hook.wmtp_checkpoint_committed(receipt=receipt)
        log.debug("stored %s step %d via %s in %.3fs", role.value, event.step, name, seconds)
        if role in self._policies:
            self._pending.append(self._pruner.submit(self._prune, role))
        return receipt

    def _resume_location(self) -> str | None:
        sink = self._sinks.get(Role.RESUME)
        return sink.location() if sink is not None else None

    def _prune(self, role: Role) -> None:
        """Apply the role's policy to this lineage's committed checkpoints, never the protected.
        A storage failure (after the client's retries) is a :class:`SaveError` naming it: a
        deletion that stopped midway left staging, which the next start removes."""
        try:
            self._prune_now(role)
        except (WmtpError, SaveError):
            raise
        except Exception as e:
            raise SaveError(f"retention of the {role.value} checkpoints at {self._sinks[role].location()} "
                            f"failed: {type(e).__name__}: {first_line(e)}; every "
                            "committed checkpoint it did not delete is intact") from e

    def _prune_now(self, role: Role) -> None:
        sink = self._sinks[role]
        policy = self._policies[role]
        committed = [(u, m) for u, m in sink.committed() if m.lineage == self.run.lineage]
        if not committed:
            return
        if self.ranks_by_records:
            committed = eval_records.merged(committed, sink.evaluations())
        newest = max(m.step for _, m in committed)
        with self._lock:
            pinned = {(self.run.name, step) for step in self._pinned}
        keep = {(self.run.name, newest)} | set(self.protected) | pinned
        chosen = set(policy.select([m for _, m in committed]))
        name = self.bindings.sink_for(role).sink
        for uri, m in committed:
            if m.step not in chosen or (m.run, m.step) in keep:
                continue
            sink.delete(uri)
            receipt = Receipt(role=role, sink=name, run=m.run, step=m.step, uri=uri, nbytes=m.nbytes)
            with self._lock:
                self.deleted.append(receipt)
            self.pm.hook.wmtp_checkpoint_deleted(receipt=receipt)
