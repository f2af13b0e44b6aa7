"""A run's own evaluation (the recipe's ``eval:`` section): each committed checkpoint it names
evaluated in the background, without stopping or slowing the training loop much.

- **Where**: in a separate process (``python -m wmtp_core.cli.eval_worker``, niced, one torch
  thread), started by rank 0 only, so once per job under torchrun. It reads the committed
  checkpoint through the verified path (:func:`wmtp_core.evaluation.generation.open_model`), as
  ``wmtp evaluate`` does, and runs every program in the sandbox.
- **When**: ``eval.every: checkpoint`` (each committed resume checkpoint), a number of steps
  (the checkpoints of those steps), or ``final``; the final model is always evaluated, once it
  is stored, before the run ends.
- **One at a time**: at most one evaluation runs. A checkpoint that commits while one runs
  waits; a newer one replaces the waiting one (which is then not evaluated: a run that saves
  faster than it evaluates has its newest checkpoints evaluated, never a growing queue). The
  run's end waits for the running and the waiting one.
- **Retention waits for it**: a checkpoint whose evaluation is running or waiting is pinned
  (:meth:`~wmtp_core.router.Router.pin`): ``keep_best`` cannot rank it before its metrics exist.
- **The result** goes to the resume sink as a record beside the checkpoint
  (:mod:`wmtp_core.eval_records`; the committed manifest is never rewritten), where ``keep_best``
  and ``storage.final.from: best`` read it, and to every plugin through
  ``wmtp_checkpoint_evaluated`` (MLflow: the metrics at the checkpoint's step; a registered
  version: tags).
- **A failure** (the process crashed, was killed, could not read the checkpoint) is one line on
  the console and the MLflow tag ``wmtp.eval.failed``; training and every checkpoint go on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
from typing import Any


from wmtp_core.errors import first_line
from wmtp_core.events import CheckpointEvaluated, Receipt
from wmtp_core.hookspecs import hookimpl
from wmtp_core.roles import Role

WORKER = "wmtp_core.cli.eval_worker"


def check(settings: Any) -> None:
    """The ``eval:`` section against the rest of the configuration, before anything runs: one
    line naming the key, the value and what is accepted."""
    from wmtp_core.errors import ConfigError
    from wmtp_core.evaluation import score, tasks

    section, where = settings.recipe.eval, settings.recipe_source
    keep = settings.config.paths.checkpoints.keep_best
    if keep is not None and keep.monitor.startswith("eval/") and (
            section is None or not section.allow_code_execution or section.every == "final"):
        raise ConfigError(f"{settings.config_source}: paths.checkpoints.keep_best.monitor {keep.monitor!r} is measured "
                          "by the run's evaluation; accepted: an eval: section with allow_code_execution: true and "
                          "every: checkpoint (or a number of steps), or a monitor such as eval_loss")
    if section is None or not section.allow_code_execution:
        return
    if max(section.k) > section.sampling.n:
        raise ConfigError(f"{where}: eval.k {section.k}: pass@{max(section.k)} needs at least {max(section.k)} samples "
                          f"a problem; accepted: k at most eval.sampling.n ({section.sampling.n}), or a larger n")
    if section.speculative and section.sampling.temperature > 0:
        raise ConfigError(f"{where}: eval.speculative with eval.sampling.temperature {section.sampling.temperature}: "
                          "lossless for greedy decoding only; accepted: temperature 0, or speculative: false")
    datasets = settings.config.paths.datasets
    for name in section.task_list():
        task, _, split = name.partition(":")
        if task == "mbpp" and split in ("", *tasks.SPLITS) and not datasets.get("mbpp"):
            raise ConfigError(f"{where}: eval.tasks {name}: no MBPP data; accepted: paths.datasets.mbpp in the config "
                              "(a folder of train.json, validation.json, test.json, or one file)")
    # the origin's contest_exact without data: not evaluated (said when the run starts)
    names = [n for n in section.task_list() if n != "codecontests" or datasets.get("codecontests")]
    try:  # reads the problems: a bad file or task name is one line now, not in the background later
        score.resolve(names, datasets.get("mbpp"), datasets.get("codecontests"))
    except ConfigError as e:
        raise ConfigError(f"{where}: eval.tasks: {e}") from None


class NoEvaluation:
    """A run without evaluation: every call does nothing."""

    def before_final(self) -> None:
        pass

    def after_final(self, receipts: Any) -> None:
        pass

    def close(self) -> None:
        pass


def begin(plan: Any, router: Any, pm: Any, run: Any, err: Any, world: Any) -> Any:
    """The run's evaluations (rank 0, an ``eval:`` section that allows code execution), or
    :class:`NoEvaluation`."""
    section = plan.settings.recipe.eval
    if section is None or not world.is_main:
        return NoEvaluation()
    if not section.allow_code_execution:
        err.print("eval: not run: it executes the code the model writes; set eval.allow_code_execution: "
                  "true to run it (docs/evaluation.md)", highlight=False)
        return NoEvaluation()
    if "codecontests" in section.task_list() and not plan.settings.config.paths.datasets.get("codecontests"):
        err.print("eval: codecontests not evaluated: no data given (paths.datasets.codecontests)", highlight=False)
    evaluations = Evaluations(plan, router, pm, run, err)
    pm.register(evaluations, name="wmtp-evaluations")
    router.ranks_by_records = True
    return evaluations


class Evaluations:
    """The background evaluations of one run (see the module's docstring)."""

    def __init__(self, plan: Any, router: Any, pm: Any, run: Any, err: Any) -> None:
        self.section = plan.settings.recipe.eval
        self.plan, self.router, self.pm, self.run, self.err = plan, router, pm, run, err
        self._lock = threading.Condition()
        self._running: tuple[Receipt, subprocess.Popen | None] | None = None
        self._worker: subprocess.Popen | None = None
        self._waiting: Receipt | None = None
        self._closed = False
        self.folder = tempfile.mkdtemp(prefix="wmtp-eval-")
        self.failures: list[str] = []

    def wanted(self, step: int) -> bool:
        every = self.section.every
        return every == "checkpoint" or (isinstance(every, int) and step % every == 0)

    @hookimpl
    def wmtp_checkpoint_committed(self, receipt: Receipt) -> None:
        if receipt.role is Role.RESUME and self.wanted(receipt.step):
            self.submit(receipt)

    def submit(self, receipt: Receipt) -> None:
        with self._lock:
            if self._closed:
                return
            if receipt.role is Role.RESUME:
                self.router.pin(receipt.step)
            if self._running is None:
                self._start(receipt)
                return
            if self._waiting is not None:
                self.router.unpin(self._waiting.step)
                self.err.print(f"eval: step {self._waiting.step} not evaluated: step {receipt.step} replaces it "
                               "while the evaluation of an earlier one runs", highlight=False)
            self._waiting = receipt

    def _start(self, receipt: Receipt) -> None:
        """Called with the lock held. The job (what to read; the worker reads the run's own config
        for the rest) goes in a file of the run's private folder, its name down the worker's
        stdin; a worker that is gone is started again, one that cannot start fails this job."""
        settings = self.plan.settings
        result = os.path.join(self.folder, f"{receipt.role.value}-{receipt.step}.json")
        job = {"uri": receipt.uri, "config": _source(settings.config_source),
               "recipe": _source(settings.recipe_source), "result": result}
        error = ""
        try:
            with open(os.open(result + ".job", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
                json.dump(job, f)
            worker = self._worker_for_job()
            worker.stdin.write(f"{result}.job\n".encode())
            worker.stdin.flush()
        except OSError as e:  # it could not start, or died as the job was sent (a broken pipe)
            worker, error = None, f"the evaluation process could not take it ({type(e).__name__}: {first_line(e)})"
        self._running = (receipt, worker)
        threading.Thread(target=self._watch, args=(receipt, worker, result, error), daemon=True,
                         name=f"wmtp-eval-{receipt.step}").start()

    def _worker_for_job(self) -> subprocess.Popen:
        """The run's evaluation process (started once, and again only after it died)."""
        if self._worker is None or self._worker.poll() is not None:
            with open(os.path.join(self.folder, "worker.err"), "ab") as stderr:
                self._worker = subprocess.Popen([sys.executable, "-m", WORKER], stdin=subprocess.PIPE,
                                                stdout=subprocess.PIPE, stderr=stderr, start_new_session=True)
        return self._worker

    def _watch(self, receipt: Receipt, worker: subprocess.Popen | None, result: str, error: str) -> None:
        metrics: dict[str, float] = {}
        if worker is not None:
            done = worker.stdout.readline()  # the worker names the job it finished; nothing: it died
            code = 0 if done else worker.wait()
            metrics, error = _outcome(code, result, os.path.join(self.folder, "worker.err"))
        try:
            if not self._closed:
                self._report(receipt, metrics, error)
        finally:
            with self._lock:
                if receipt.role is Role.RESUME:
                    self.router.unpin(receipt.step)
                self._running = None
                waiting, self._waiting = self._waiting, None
                if waiting is not None and not self._closed:
                    self._start(waiting)
                self._lock.notify_all()

    def _report(self, receipt: Receipt, metrics: dict[str, float], error: str) -> None:
        what = "the final model" if receipt.role is Role.FINAL else f"step {receipt.step}"
        if error:
            self.failures.append(f"{what}: {error}")
            self.err.print(f"eval: the evaluation of {what} failed ({error}); training and its checkpoints "
                           "are not affected", highlight=False)
        else:
            self.err.print(f"eval: {what}: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())),
                           highlight=False)
            if receipt.role is Role.RESUME:
                try:
                    self.router.sink(Role.RESUME).record_evaluation(receipt.uri, metrics)
                except Exception as e:  # noqa: BLE001 - the metrics still reach MLflow
                    self.err.print(f"eval: the metrics of {what} could not be recorded beside it "
                                   f"({type(e).__name__}: {first_line(e)}); keep_best cannot rank it", highlight=False)
        event = CheckpointEvaluated(uri=receipt.uri, step=receipt.step, metrics=metrics, role=receipt.role,
                                    lineage=self.run.lineage, run=self.run, mlflow=self.plan.mlflow, error=error)
        try:
            self.pm.hook.wmtp_checkpoint_evaluated(event=event)
        except Exception as e:  # noqa: BLE001 - an observer's failure is not the run's
            self.err.print(f"eval: a plugin failed to take the metrics of {what}: {type(e).__name__}: "
                           f"{first_line(e)}", highlight=False)

    def drain(self) -> None:
        """Wait for the running evaluation and the waiting one."""
        with self._lock:
            if self._running is not None or self._waiting is not None:
                last = self._waiting or self._running[0]
                what = "the final model" if last.role is Role.FINAL else f"step {last.step}"
                self.err.print(f"eval: waiting for the evaluation of {what} to finish", highlight=False)
            while self._running is not None or self._waiting is not None:
                self._lock.wait(1.0)

    def before_final(self) -> None:
        """Before ``storage.final.from: best`` ranks the checkpoints: every pending result in,
        then retention once more (the checkpoints it spared while they were evaluated)."""
        self.drain()
        self.router.retain(Role.RESUME)
        self.router.wait()

    def after_final(self, receipts: Any) -> None:
        """The final model this run stored, evaluated (and its registered version tagged)."""
        final = [r for r in receipts if r.role is Role.FINAL]
        if final:
            self.submit(final[-1])
        self.drain()

    def close(self) -> None:
        """The run is over (or failed): an evaluation still running is stopped, its group killed."""
        import shutil
        import signal

        with self._lock:
            self._closed = True
            self._waiting = None
            worker = self._worker
        if worker is not None and worker.poll() is None:
            try:
                os.killpg(worker.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            worker.wait()
        try:
            self.pm.unregister(self)
        except ValueError:
            pass
        shutil.rmtree(self.folder, ignore_errors=True)


def _source(source: str) -> str | None:
    return None if source == "<defaults>" else source


def _outcome(code: int, result: str, log: str) -> tuple[dict[str, float], str]:
    """The metrics the worker wrote, or one line saying why there are none."""
    try:
        with open(result) as f:
            data = json.load(f)
    except (OSError, ValueError):
        data = None
    if code == 0 and isinstance(data, dict) and isinstance(data.get("metrics"), dict):
        return {k: float(v) for k, v in data["metrics"].items()}, ""
    if isinstance(data, dict) and data.get("error"):
        return {}, str(data["error"])[:500]
    try:
        with open(log, "rb") as f:
            lines = [ln for ln in f.read()[-4000:].decode("utf-8", "replace").splitlines() if ln.strip()]
    except OSError:
        lines = []
    why = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
    return {}, f"the evaluation process ended with {why}" + (f": {lines[-1][:300]}" if lines else "")


__all__ = ["Evaluations", "NoEvaluation", "begin", "check"]
