"""The router: the only path from an emitted checkpoint to a sink.

It checks every binding before the first training step (:func:`wmtp_core.roles.validate`),
builds exactly one sink per bound role, hands each payload to that sink alone, and prunes
through the role's policy after the commit, in the background, protecting what must stay.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import threading
import time
from typing import Any, Callable, Mapping

import pluggy

from wmtp_core.events import CheckpointEmitted, Payload, Receipt, RunInfo, SinkContext
from wmtp_core.roles import BindingError, Bindings, Catalog, Role, validate

log = logging.getLogger(__name__)

_EMIT_HOOK = {
    Role.RESUME: "wmtp_resume_checkpoint_emitted",
    Role.FINAL: "wmtp_final_model_emitted",
}


class Router:
    """Dispatch emitted checkpoints to the sinks the configuration bound.

    :param required: roles this run will emit; each must be bound (checked at construction).
    :param protected: ``(run, step)`` pairs retention must never delete (the resumed-from one).
    :param context: builds the :class:`SinkContext` for a role's sink.
    """

    def __init__(
        self,
        pm: pluggy.PluginManager,
        catalog: Catalog,
        bindings: Bindings,
        run: RunInfo,
        *,
        required: frozenset[Role],
        context: Callable[[Role, Mapping[str, Any]], SinkContext],
        protected: Callable[[], set[tuple[str, int]]] = set,
    ) -> None:
        validate(bindings, catalog, required)
        self.pm = pm
        self.catalog = catalog
        self.bindings = bindings
        self.run = run
        self._context = context
        self._protected = protected
        self._sinks: dict[Role, Any] = {}
        self._policies: dict[Role, Any] = {}
        self.receipts: list[Receipt] = []
        self.deleted: list[Receipt] = []
        self._pruner = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="wmtp-retention")
        self._pending: list[cf.Future] = []
        self._lock = threading.Lock()
        self._opened = False

    # -- life cycle ------------------------------------------------------------------------
    def open(self) -> None:
        """Build each bound sink and policy. Called after validation, before the first step."""
        for b in self.bindings.sinks:
            spec = self.catalog.sinks[b.sink]
            self._sinks[b.role] = spec.factory(self._context(b.role, b.options))
        for p in self.bindings.policies:
            self._policies[p.role] = self.catalog.policies[p.policy].factory(dict(p.options))
        self._opened = True

    def sink(self, role: Role) -> Any:
        try:
            return self._sinks[role]
        except KeyError:
            raise BindingError(f"role {role.value!r} has no sink in this run") from None

    def bound(self, role: Role) -> bool:
        return self.bindings.sink_for(role) is not None

    def close(self) -> None:
        """Wait for background retention, surface its failures, close the sinks."""
        try:
            self.wait()
        finally:
            self._pruner.shutdown(wait=True)
            for sink in self._sinks.values():
                close = getattr(sink, "close", None)
                if close:
                    close()

    def wait(self) -> None:
        pending, self._pending = self._pending, []
        errors = []
        for fut in pending:
            try:
                fut.result()
            except Exception as e:  # surfaced, never swallowed
                errors.append(e)
        if errors:
            raise errors[0]

    # -- dispatch --------------------------------------------------------------------------
    def emit(
        self,
        role: Role,
        *,
        step: int,
        payload: Payload,
        metrics: Mapping[str, float] | None = None,
        nbytes: int = 0,
    ) -> Receipt:
        """Store one checkpoint through the sink bound to ``role``, and only there."""
        if not self._opened:
            raise RuntimeError("Router.open() must be called before emit()")
        sink = self.sink(role)
        if role is Role.FINAL and any(r.role is Role.FINAL for r in self.receipts):
            raise BindingError(
                f"the final model of run {self.run.name!r} is already stored "
                f"({next(r.uri for r in self.receipts if r.role is Role.FINAL)}); it is stored once"
            )
        event = CheckpointEmitted(
            run=self.run,
            role=role,
            step=step,
            parts=tuple(payload.parts),
            nbytes=nbytes,
            metrics=metrics or {},
            resume_location=self._resume_location() if role is Role.FINAL else None,
        )
        getattr(self.pm.hook, _EMIT_HOOK[role])(event=event)
        t0 = time.perf_counter()
        receipt = sink.store(event=event, payload=payload)
        if not isinstance(receipt, Receipt):
            raise TypeError(f"sink {self.bindings.sink_for(role).sink!r} returned {receipt!r}, not a Receipt")
        self.receipts.append(receipt)
        self.pm.hook.wmtp_checkpoint_committed(receipt=receipt)
        log.debug("stored %s step %d via %s in %.3fs", role.value, step, receipt.sink,
                  time.perf_counter() - t0)
        if role in self._policies:
            self._pending.append(self._pruner.submit(self._prune, role))
        return receipt

    def stored_final(self) -> str | None:
        """Where this run's final model already is, if its sink can tell (a resumed run that
        had finished must not store it twice)."""
        sink = self._sinks.get(Role.FINAL)
        find = getattr(sink, "stored_final", None)
        return find(self.run) if find is not None else None

    def _resume_location(self) -> str | None:
        sink = self._sinks.get(Role.RESUME)
        return sink.location() if sink is not None else None

    def _prune(self, role: Role) -> None:
        """Apply the role's policy to this lineage's committed checkpoints, never the protected."""
        sink = self._sinks[role]
        policy = self._policies[role]
        committed = [(u, m) for u, m in sink.committed() if m.lineage == self.run.lineage]
        if not committed:
            return
        newest = max(m.step for _, m in committed)
        keep = {(self.run.name, newest)} | set(self._protected())
        chosen = set(policy.select([m for _, m in committed]))
        for uri, m in committed:
            if m.step not in chosen or (m.run, m.step) in keep:
                continue
            sink.delete(uri)
            receipt = Receipt(role=role, sink=self.bindings.sink_for(role).sink, run=m.run,
                              step=m.step, uri=uri, nbytes=m.nbytes, seconds=0.0)
            with self._lock:
                self.deleted.append(receipt)
            self.pm.hook.wmtp_checkpoint_deleted(receipt=receipt)
