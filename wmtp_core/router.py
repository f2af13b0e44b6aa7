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

import attrs
import pluggy

from wmtp_core.events import CheckpointEmitted, Payload, Receipt, RunInfo, SinkContext
from wmtp_core.roles import BindingError, Bindings, Catalog, Role, validate

log = logging.getLogger(__name__)

_EMIT_HOOK = {
    Role.RESUME: "wmtp_resume_checkpoint_emitted",
    Role.FINAL: "wmtp_final_model_emitted",
}


class SaveError(RuntimeError):
    """A checkpoint save failed (in the background for asynchronous saves)."""


class Stager:
    """Copies a payload's tensors into buffers it keeps between saves: the one short pause of an
    asynchronous save. Reusing the buffers avoids allocating (and faulting in) fresh memory each
    time; it is safe because at most one save is in flight and it has finished before restaging.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, Any] = {}

    def stage(self, payload: Payload) -> Payload:
        import torch

        from torch.distributed.tensor import DTensor

        def copy(obj: Any, key: str) -> Any:
            if isinstance(obj, DTensor):  # a shard: stage the local part, keep the layout
                local = copy(obj.to_local(), key)
                return DTensor.from_local(local, obj.device_mesh, obj.placements, run_check=False,
                                          shape=obj.shape, stride=obj.stride())
            if isinstance(obj, torch.Tensor):
                buf = self._buffers.get(key)
                if buf is None or buf.shape != obj.shape or buf.dtype != obj.dtype or buf.device.type != "cpu":
                    buf = torch.empty(obj.shape, dtype=obj.dtype, device="cpu",
                                      pin_memory=obj.is_cuda and torch.cuda.is_available())
                    self._buffers[key] = buf
                buf.copy_(obj.detach(), non_blocking=obj.is_cuda)
                return buf
            if isinstance(obj, Mapping):
                return {k: copy(v, f"{key}/{k}") for k, v in obj.items()}
            if isinstance(obj, (list, tuple)):
                return type(obj)(copy(v, f"{key}/{i}") for i, v in enumerate(obj))
            return obj  # numbers and strings are immutable

        parts = {name: copy(obj, name) for name, obj in payload.parts.items()}
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return attrs.evolve(payload, parts=parts)


@attrs.define
class AsyncStats:
    step: int
    staged_s: float
    """How long training paused to stage the state."""
    waited_s: float
    """How long it waited for the previous save still in flight."""


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
        self._writer = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="wmtp-async-save")
        self._inflight: tuple[int, cf.Future] | None = None
        self._stager = Stager()
        self.async_stats: list[AsyncStats] = []

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
        """Wait for background saves and retention, surface their failures, close the sinks."""
        try:
            self.wait()
        finally:
            self._writer.shutdown(wait=True)
            self._pruner.shutdown(wait=True)
            for sink in self._sinks.values():
                close = getattr(sink, "close", None)
                if close:
                    close()

    def wait(self) -> None:
        """Block until every save and prune started so far is done; raise the first failure."""
        self._drain()
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
        background: bool = False,
    ) -> Receipt | cf.Future:
        """Store one checkpoint through the sink bound to ``role``, and only there.

        ``background``: stage the payload in memory and return at once with a future; the
        write, the commit, the ``wmtp_checkpoint_committed`` hook and retention follow in a
        background thread. At most one save is in flight: a second one first waits (the wait is
        recorded in :attr:`async_stats`), and a failed save raises :class:`SaveError` at the
        next emit or at :meth:`wait`.
        """
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
        if not background:
            self._drain()  # a synchronous save never overtakes one in flight
            return self._store(role, sink, event, payload)
        t0 = time.perf_counter()
        self._drain()
        waited = time.perf_counter() - t0
        staged = self._stager.stage(payload)
        self.async_stats.append(AsyncStats(step=step, staged_s=time.perf_counter() - t0 - waited,
                                           waited_s=waited))
        if waited > 0.01:
            log.info("async save of step %d waited %.2f s for the previous save", step, waited)
        future = self._writer.submit(self._store, role, sink, event, staged)
        self._inflight = (step, future)
        return future

    def _drain(self) -> None:
        if self._inflight is None:
            return
        step, future = self._inflight
        self._inflight = None
        try:
            future.result()
        except Exception as e:
            raise SaveError(f"the background save of step {step} failed, nothing of it was "
                            f"committed: {type(e).__name__}: {e}") from e

    def _store(self, role: Role, sink: Any, event: CheckpointEmitted, payload: Payload) -> Receipt:
        step = event.step
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
