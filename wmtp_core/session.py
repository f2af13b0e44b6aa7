"""A run session: the life of one run, from a preflight plan to the summary.

open → restore → start → train → store final → end. The session is the only place that joins
the engine (it trains), the router (it stores) and the plugins (they observe). Every value it
builds is built once, complete: the run's identity is known before the router and its sinks
exist, and neither is told about the run afterwards.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any, Callable, Mapping

import attrs
import pluggy
from rich.console import Console

from wmtp_core import progress, redact
from wmtp_core.bindings import Bindings, build_sink
from wmtp_core.errors import (
    ModelLoadError,
    SaveError,
    StorageError,
    TrainingError,
    WmtpError,
    first_line,
)
from wmtp_core.lease import Lease, LeaseLostError
from wmtp_core.events import (
    LoadedModel,
    RunEnded,
    RunInfo,
    RunStarted,
    RunStatus,
    StepEnded,
)
from wmtp_core.manifest import best, metric_of
from wmtp_core import eval_records, evaluating
from wmtp_core.plan import Plan
from wmtp_core.exits import EXIT_NOT_REGISTERED, EXIT_OK
from wmtp_core.preemption import Preemption
from wmtp_core.registering import discard
from wmtp_core.resume import open_resume
from wmtp_core.roles import Role
from wmtp_core.router import Router
from wmtp_core.summary import Ending, Summary
from wmtp_core.tensors import tensor_bytes

OBSERVER_HOOKS = {"wmtp_run_started", "wmtp_step_ended", "wmtp_run_ended", "wmtp_checkpoint_committed",
                  "wmtp_checkpoint_deleted", "wmtp_resume_checkpoint_emitted", "wmtp_final_model_emitted"}

log = logging.getLogger("wmtp")


def model_loader(pm: pluggy.PluginManager, mlflow: Mapping[str, Any]) -> Callable[[str], LoadedModel]:
    """Resolve a model URI through ``wmtp_load_model`` (plugins first, the core's committed
    checkpoint reader last)."""

    def load(uri: str) -> LoadedModel:
        try:
            loaded = pm.hook.wmtp_load_model(uri=uri, mlflow_config=dict(mlflow))
        except (LookupError, FileNotFoundError) as e:  # the hook's documented refusals
            raise ModelLoadError(str(e)) from None
        if loaded is None:
            raise ModelLoadError(f"{uri!r}: no plugin can load it")
        return loaded

    return load


def _scalars(metrics: Mapping[str, float] | None) -> dict[str, float]:
    return {k: float(v) for k, v in (metrics or {}).items()}


class RunSession:
    """The life of one run. :meth:`run` returns the exit status."""

    def __init__(self, plan: Plan, pm: pluggy.PluginManager, out: Console, err: Console, *,
                 verbose: bool = False, signals: Preemption | None = None) -> None:
        self.plan = plan
        self.signals = signals if signals is not None else Preemption()
        """The process's signal handlers (``python -m wmtp_core.run`` installs them before the
        run starts); without them, none: the run is never asked to stop."""
        self.pm = pm
        self.out, self.err = out, err
        self.verbose = verbose
        self.timings: dict[str, float] = {}
        self.last_saved = -1
        self.lease: Lease | None = None
        """This run's lease on its resume storage (rank 0 holds it for the job)."""
        self.world: Any = None
        self.summary: Summary | None = None
        self.evals: Any = evaluating.NoEvaluation()
        """What the run did, once :meth:`run` returned (``None`` if it stopped before training)."""

    def _phase(self, name: str, t0: float) -> float:
        now = time.perf_counter()
        self.timings[name] = self.timings.get(name, 0.0) + now - t0
        return now

    def run(self) -> int:
        from wmtp_core.engine import distributed

        cfg = self.plan.settings.config
        world = self.world = distributed.setup(cfg.devices, self._device())
        code = None
        try:
            code = self._run(world)
            return code
        finally:
            self.signals.ending()  # a signal from here on would only cut the clean-up short
            try:
                if self.lease is not None:
                    self.lease.release()
            finally:
                try:
                    if code is not None:
                        # no rank leaves before rank 0 has released the lease: a launcher stops
                        # the other ranks as soon as one exits with a status other than 0
                        world.barrier()
                finally:
                    world.close()

    def _device(self):
        import torch

        return torch.device(self.plan.device)

    # -- the phases ------------------------------------------------------------------------
    def _run(self, world: Any) -> int:
        t = time.perf_counter()
        trainer, fresh, bindings = self._open(world)
        t = self._phase("open", t)
        # the resume point decides the run's lineage before the router exists
        run, protected = self._restore(trainer, fresh, bindings, world)
        router = Router(self.pm, self.plan.catalog, bindings, run, required=self.plan.required,
                        mlflow=self.plan.mlflow, protected=protected, coordinator=world,
                        policies=self.plan.policies if world.is_main else {}).open()
        self.last_saved = trainer.step if run.resumed_from else -1
        t = self._phase("restore", t)
        self._start(router, run, trainer, bindings)
        self.evals = evaluating.begin(self.plan, router, self.pm, run, self.err, world)
        self._phase("start", t)
        return self._train_to_the_end(trainer, router, run)

    def _open(self, world: Any):
        """Who this process is in the job, a fresh identity, the trainer. Returns
        ``(trainer, fresh run, bindings)``."""
        from wmtp_core.engine.trainer import Trainer

        plan = self.plan
        bindings = plan.bindings
        if not world.is_main:
            self.out, self.err = Console(quiet=True), Console(stderr=True, quiet=True)
            self._observers_off()
            bindings = attrs.evolve(bindings, policies=())  # retention runs once, on rank 0
        name, lineage = world.broadcast((plan.run_name, uuid.uuid4().hex))
        fresh = RunInfo(name=name, algo=plan.settings.recipe.train.algo, lineage=lineage,
                        experiment=plan.mlflow.get("experiment", "wmtp"), tags=plan.tags)
        trainer = Trainer(plan.settings, world, model_loader(self.pm, plan.mlflow))
        if self.verbose:
            for note in trainer.base.notes:
                self.err.print(note, highlight=False)
        return trainer, fresh, bindings

    def _start(self, router: Router, run: RunInfo, trainer: Any, bindings: Bindings) -> None:
        plan = self.plan
        try:
            self.pm.hook.wmtp_run_started(event=RunStarted(
                run=run, params=plan.settings.params(), start_step=trainer.step, mlflow=plan.mlflow,
                bindings={b.role.value: b.sink for b in bindings.sinks},
            ))
        except BaseException as e:  # a tracking server that cannot be reached, or Ctrl-C
            self._abandon(router, run, trainer, "interrupted" if isinstance(e, KeyboardInterrupt) else str(e))
            if isinstance(e, Exception):  # nothing was trained yet
                raise TrainingError(f"a plugin failed as the run started, before any step: "
                                    f"{type(e).__name__}: {redact.text(first_line(e, 500))}") from None
            raise

    def _train_to_the_end(self, trainer: Any, router: Router, run: RunInfo) -> int:
        """Train, commit the last step, store the final model, end: whatever happens, the router
        is closed and the observers hear how the run ended. Leaves :attr:`summary` for the face."""
        ending, outcome = Ending(), None
        t0 = t = time.perf_counter()
        try:
            outcome = self._train(trainer, router, run)
            self._trained(outcome)
            t = self._phase("train", t)
            ending = Ending.of(outcome)
            if ending.status is not RunStatus.FAILED and trainer.step > 0:  # a signal before step 1: no save
                why = "preempted" if ending.status is RunStatus.PREEMPTED else "last"
                self._checkpoint(trainer, router, trainer.step, outcome.metrics, why)
                router.wait()  # the last step's resume state is durable before the final model
            if ending.code == EXIT_OK:  # every pending evaluation in before the best is chosen
                self.evals.before_final()
            if ending.code == EXIT_OK and Role.FINAL in self.plan.required:
                ending = self._store_final(trainer, router, outcome, ending)  # never while preempted
                self.evals.after_final(router.receipts)
            router.wait()
            t = self._phase("final", t)
        except SaveError as e:
            ending = Ending.failed(str(e))
        except KeyboardInterrupt:
            ending = Ending.failed("interrupted")
            raise
        except Exception as e:
            ending = attrs.evolve(ending, reason=f"{type(e).__name__}: {e}")
            raise
        finally:
            self.signals.ending()
            ending = self._end(router, run, trainer, outcome, ending)
        self._phase("end", t)
        losses = (outcome.first_loss, outcome.last_loss) if outcome and outcome.losses else None
        self.summary = Summary(
            run=run.name, ending=ending, step=trainer.step, elapsed=time.perf_counter() - t0,
            receipts=tuple(router.receipts), deleted=tuple(router.deleted),
            locations={role: router.sink(role).location() for role in self.plan.required},
            losses=losses, async_stats=tuple(router.async_stats), timings=dict(self.timings),
            resumed_from=run.resumed_from)
        return ending.code

    def _trained(self, outcome: Any) -> None:
        """Training ended: from now on a signal cuts nothing short. One that arrived after the
        ranks last agreed whether to stop was not acted on: say so."""
        self.signals.finishing()
        late = self.signals.requested()
        if late and outcome.status not in ("preempted", "failed"):
            self.err.print(f"{late} arrived after the last step had begun: the run ends as it would have "
                           "(nothing is cut short)", highlight=False)

    def _end(self, router: Router, run: RunInfo, trainer: Any, outcome: Any, ending: Ending) -> Ending:
        try:
            self.evals.close()
            router.close()
        except SaveError as e:
            ending = Ending.failed(str(e))
        finally:
            try:
                self.pm.hook.wmtp_run_ended(event=RunEnded(
                    run=run, status=ending.status, last_step=trainer.step, reason=redact.text(ending.reason),
                    metrics=outcome.metrics if outcome else {}, receipts=router.receipts,
                    held=self._held(router, run, ending),
                ))
            except Exception as e:  # an observer's failure must not mask the run's outcome
                log.warning("a plugin failed in wmtp_run_ended: %s: %s", type(e).__name__, redact.text(e))
        return ending

    def _held(self, router: Router, run: RunInfo, ending: Ending) -> tuple:
        """What the resume sink holds for this lineage now that its saves and retention are done
        (rank 0; nothing for a failed run): the observers' picture of the whole run. A listing
        that fails is a warning, never the run's outcome."""
        if ending.status is RunStatus.FAILED or not router.bound(Role.RESUME) or (
                self.world is not None and not self.world.is_main):
            return ()
        try:
            return tuple(h for h in router.sink(Role.RESUME).held(run.name, {run.lineage}) if h.role is Role.RESUME)
        except Exception as e:
            log.warning("could not list what the resume sink holds for run %r: %s: %s", run.name,
                        type(e).__name__, redact.text(first_line(e)))
            return ()

    def _abandon(self, router: Router, run: RunInfo, trainer: Any, reason: str) -> None:
        """A run that stops before its first step: the router closed, observers told (an MLflow
        run that was opened is ended, not left running). A second Ctrl-C here is not caught."""
        try:
            router.close()
        finally:
            try:
                self.pm.hook.wmtp_run_ended(event=RunEnded(run=run, status=RunStatus.FAILED,
                                                           last_step=trainer.step, reason=redact.text(reason)))
            except Exception as e:
                log.warning("a plugin failed in wmtp_run_ended: %s: %s", type(e).__name__, redact.text(e))

    def _restore(self, trainer: Any, fresh: RunInfo, bindings: Bindings, world: Any):
        """The resume point (if any) and the run's identity: its lineage continues the
        checkpoint's. One call to the resume service (:mod:`wmtp_core.resume`), through the
        resume sink the bindings name. Returns ``(run, protected)``."""
        plan = self.plan
        probe = build_sink(plan.catalog, bindings, Role.RESUME, fresh, plan.mlflow, coordinator=world)

        def restore(loaded, uri: str) -> None:
            trainer.restore(loaded.parts, shards=loaded.shards, same_world=loaded.same_world, source=uri,
                            step=loaded.manifest.step)

        try:
            point = open_resume(probe, fresh.name, plan.resume, self.err, coordinator=world, restore=restore)
            self.lease = point.lease  # released by run(), however the run ends from here
        except (WmtpError, KeyboardInterrupt):
            raise
        except Exception as e:  # storage that failed after the client's retries: one line, exit 1
            raise StorageError(f"reading the resume storage {probe.location()} failed (taking the run's "
                               f"lease, finding or loading its checkpoint): {type(e).__name__}: "
                               f"{redact.text(first_line(e, 500))}") from e
        finally:
            probe.close()
        if point.manifest is None:
            return fresh, frozenset()
        self.err.print(f"resuming {fresh.name!r} from {point.uri} (step {point.manifest.step})")
        run = attrs.evolve(fresh, lineage=point.manifest.lineage, resumed_from=redact.text(point.uri))
        return run, frozenset({(point.manifest.run, point.manifest.step)})

    def _check_lease(self) -> None:
        """Before a save: stop if another process took this run's lease over (every rank)."""
        lost = None
        if self.lease is not None:
            try:
                self.lease.check()
            except LeaseLostError as e:
                lost = str(e)
        if self.world is not None and self.world.size > 1:
            # the training loop's group: the previous save may still be in flight on the
            # checkpoint group, in a thread of its own
            lost = self.world.tell(lost)
        if lost:
            raise LeaseLostError(lost)

    def _train(self, trainer: Any, router: Router, run: RunInfo):
        with progress.for_console(self.err, run.name, trainer.total_steps, trainer.step) as shown:

            def on_step(step: int, metrics: Mapping[str, float]) -> None:
                self.pm.hook.wmtp_step_ended(event=StepEnded(run=run, step=step, metrics=metrics))
                if "loss" in metrics:
                    shown.update(step, metrics)

            interval = self.plan.settings.config.paths.checkpoints.save_interval

            def due(step: int, metrics: Mapping[str, float]) -> None:  # on the schedule, or on the clock
                why = "interval" if interval and step % interval == 0 else "timed"
                self._checkpoint(trainer, router, step, metrics, why)

            return trainer.train(on_step, due, stop=self.signals.looked)

    def _checkpoint(self, trainer: Any, router: Router, step: int, metrics: Mapping[str, float] | None,
                    why: str) -> None:
        """Emit this step's resume state, once per step; ``why``: its manifest's
        ``meta.saved_because``."""
        if not router.bound(Role.RESUME) or self.last_saved == step:
            return
        self._check_lease()
        payload = trainer.resume_payload()
        router.emit(Role.RESUME, step=step, payload=payload, metrics=_scalars(metrics),
                    nbytes=tensor_bytes(payload.parts),
                    background=self.plan.settings.config.paths.checkpoints.async_, saved_because=why)
        self.last_saved = step

    def _store_final(self, trainer: Any, router: Router, outcome: Any, ending: Ending) -> Ending:
        """Store the final model through the router, which stores the weights of a step once: a
        resumed run that trained nothing new stores nothing, one that trained past the stored
        final model stores the new weights, superseding it. The resume state is committed
        already: a failure here loses nothing (exit 3)."""
        try:
            stored = router.final_stored()
            storage = self.plan.settings.config.storage
            final = storage.final if storage is not None else None
            last, metrics = trainer.step, _scalars(outcome.metrics)
            if final is not None and final.from_ == "best" and (stored is None or stored.step < last):
                metrics = self._best_into(trainer, router) or metrics  # trainer.step: the best's
            if stored is not None and stored.step >= trainer.step:  # nothing new was trained
                self.err.print(f"the final model of {router.run.name!r} (step {stored.step}) is already stored at "
                               f"{stored.uri}; not storing it again", highlight=False)
                trainer.step = last
                return ending
            if stored is not None:
                self.err.print(f"the run trained past step {stored.step} of its final model at {stored.uri}: "
                               f"storing the final model of step {trainer.step}, which supersedes it",
                               highlight=False)
            # a collective under FSDP: every rank takes part
            payload = trainer.final_payload(final.dtype if final is not None else "fp32",
                                            final.max_shard_size if final is not None else None)
            try:
                if payload is not None:
                    router.emit(Role.FINAL, step=trainer.step, payload=payload, metrics=metrics,
                                nbytes=tensor_bytes(payload.parts))
                    router.wait()
            finally:
                discard(payload)
                trainer.step = last  # the run ended here, whichever weights it stored
        except Exception as e:  # the resume state is committed: nothing is lost
            log.debug("final store failed", exc_info=True)
            return Ending.failed(f"final model not stored ({type(e).__name__}: {first_line(e, 500)})",
                                 EXIT_NOT_REGISTERED)
        return ending

    def _best_into(self, trainer: Any, router: Router) -> dict[str, float] | None:
        """``storage.final.from: best``: put the weights of this lineage's best committed
        checkpoint (``paths.checkpoints.keep_best`` ranks them) back into the trainer; returns its
        metrics, or ``None`` (and says so) when no checkpoint records the metric."""
        keep = self.plan.settings.config.paths.checkpoints.keep_best
        world, sink = trainer.world, router.sink(Role.RESUME)
        choice = None
        if world.is_main:
            mine = eval_records.merged([(u, m) for u, m in sink.committed() if m.lineage == router.run.lineage],
                                       sink.evaluations() if router.ranks_by_records else {})
            top = best([m for _, m in mine], keep.monitor, keep.mode)
            if top:
                choice = (next(u for u, m in mine if m is top[0]), top[0].step, metric_of(top[0], keep.monitor),
                          dict(top[0].meta.get("metrics") or {}))
        choice = world.broadcast(choice)  # every rank loads the same checkpoint (shards: together)
        if choice is None:
            self.err.print(f"storage.final.from: best, but no committed checkpoint records {keep.monitor}; "
                           "storing the last step's weights", highlight=False)
            return None
        uri, step, value, metrics = choice
        loaded = sink.load(uri)  # a sharded checkpoint: every rank together
        trainer.restore(loaded.parts, shards=loaded.shards, same_world=loaded.same_world, source=uri,
                        step=loaded.manifest.step)
        self.err.print(f"the final model is the best checkpoint, step {step} ({keep.monitor} {value:.4f}): "
                       f"{uri}", highlight=False)
        return _scalars(metrics)

    def _observers_off(self) -> None:
        """On ranks other than 0: observers (tracking, progress, reports) see the run once, on rank 0."""
        for plugin in list(self.pm.get_plugins()):
            if {h.name for h in self.pm.get_hookcallers(plugin) or []} & OBSERVER_HOOKS:
                self.pm.unregister(plugin)
