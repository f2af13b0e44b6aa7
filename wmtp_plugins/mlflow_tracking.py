"""MLflow tracking observer: params, per-step metrics and tags. Stores no checkpoint bytes.

It owns the MLflow run of a WMTP run: started at ``wmtp_run_started``, ended at
``wmtp_run_ended``; the registry sink logs the final model into that same run. At the end it
logs one small PNG artifact, the bytes the run held over its steps (when matplotlib is
installed): a picture drawn from the receipts and the resume sink's listing, not a checkpoint.

A tracking server that cannot be reached at the start stops the run before its first step (exit
status 2, naming the URI). One that goes away during the run does not stop it: metric values
and tags are kept in memory, a background thread tries again every few seconds while training
goes on, and everything kept is sent once the server answers. What still cannot be sent at the
end is counted and reported; nothing is dropped silently.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time

from wmtp_core import TrainingError, hookimpl, redact, report
from wmtp_core.errors import first_line
from wmtp_plugins._mlflow import (
    DEFAULT_TRACKING_URI,
    check_uris,
    configure,
    lineage_run,
    one_try,
    request_bounds,
    unreachable,
    where_to_browse,
)

FLUSH_EVERY = 50
"""Metrics are sent in batches of this many steps..."""
FLUSH_SECONDS = 5.0
"""...or this often, whichever comes first: a run's curves show up while it trains. While the
server cannot be reached, a background thread tries again this often."""
MAX_PARAM = 6000
MAX_BUFFER = 200_000
"""Metric values kept while the server cannot be reached; beyond it the oldest are dropped,
counted, and reported at the end."""
BATCH = 1000
"""Metric values per request (MLflow's ``log_batch`` limit)."""
STORAGE_PICTURE = "wmtp-storage.png"
"""The run's artifact drawn by ``wmtp_core.report.figure_png``: the whole run, from this part's
receipts and what the resume sink holds at the end."""
log = logging.getLogger("wmtp.tracking")


class MlflowTracking:
    def __init__(self) -> None:
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.client = None
        self.uri = DEFAULT_TRACKING_URI
        self._buffer: list = []  # mlflow.entities.Metric values not yet sent, oldest first
        self._tags: dict[str, str] = {}  # run tags not yet sent
        self._flushed_at = time.monotonic()
        self._logged_through = -1
        """After a resume: the last step the MLflow run already holds. Resume is bit-exact, so
        the steps replayed since the checkpoint are the same values: they are not sent twice."""
        self._lock = threading.Lock()  # saves and retention report from background threads
        self._sending = threading.Lock()  # one request at a time, whichever thread sends
        self._newest: dict = {}  # role -> the newest step committed so far
        self._deleted: list = []  # (receipt, the newest step of its role when it was deleted)
        self._outage: dict | None = None  # since when, and why, the server cannot be reached
        self._retrier: threading.Thread | None = None
        self._stop = threading.Event()
        self._dropped = 0
        self._removed = 0  # values ever taken from the head of the buffer (sent or dropped)
        self._schedule: tuple = (0, None)  # the step this part started from, and save_interval

    @hookimpl
    def wmtp_check_config(self, config):
        """MLflow must be able to use the tracking (and registry) URI as a store."""
        check_uris(config.get("mlflow"))

    @hookimpl
    def wmtp_run_started(self, event):
        self._logged_through, self._buffer, self._tags, self._flushed_at = -1, [], {}, time.monotonic()
        self._newest, self._deleted, self._outage, self._dropped, self._removed = {}, [], None, 0, 0
        interval = event.params.get("config.paths.checkpoints.save_interval")
        self._schedule = (event.start_step, interval if isinstance(interval, int) and interval > 0 else None)
        self._stop.clear()
        if not event.mlflow:
            return  # no mlflow section: nothing to track into
        self.uri = event.mlflow.get("tracking_uri") or DEFAULT_TRACKING_URI
        try:
            self._start(event)
        except Exception as e:
            why = unreachable(e)
            if why is None:
                raise
            raise TrainingError(
                f"mlflow.tracking_uri: the MLflow server at {redact.text(self.uri)} cannot be reached "
                f"({why}; gave up after {request_bounds()}); start it, or fix the URI") from None

    def _start(self, event) -> None:
        import mlflow
        from mlflow.entities import Param

        configure(event.mlflow)
        previous = self._previous_run(event.run) if event.run.resumed_from else None
        if previous is not None:
            # a resumed run continues its MLflow run: same params, metrics carry on
            self.experiment_id = mlflow.start_run(run_id=previous).info.experiment_id
            mlflow.set_tag("wmtp.resumed_from", redact.text(event.run.resumed_from))
            mlflow.set_tag("wmtp.status", "running")
            self.run_id = previous
            self.client = mlflow.MlflowClient()
            history = self._safely("read the logged loss", self.client.get_metric_history, previous, "loss")
            self._logged_through = max((m.step for m in history or []), default=-1)
            return
        run = mlflow.start_run(run_name=event.run.name, tags=redact.mapping({
            "wmtp.status": "running",
            "wmtp.run": event.run.name,
            "wmtp.algo": event.run.algo,
            "wmtp.lineage": event.run.lineage,
            **{f"wmtp.binding.{role}": sink for role, sink in event.bindings.items()},
            **dict(event.run.tags),
        }))
        self.run_id, self.experiment_id = run.info.run_id, run.info.experiment_id
        self.client = mlflow.MlflowClient()
        params = [Param(k, str(v)[:MAX_PARAM]) for k, v in sorted(redact.mapping(event.params).items())]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    @hookimpl
    def wmtp_step_ended(self, event):
        if self.run_id is None:
            return
        from mlflow.entities import Metric

        if event.step <= self._logged_through and "pretrain_value_loss" not in event.metrics:
            return  # replayed after a resume: the MLflow run already holds this step
        now = int(time.time() * 1000)
        with self._lock:
            self._buffer.extend(Metric(k, float(v), now, event.step) for k, v in event.metrics.items())
            if len(self._buffer) > MAX_BUFFER:  # a very long outage: the oldest go, counted
                extra = len(self._buffer) - MAX_BUFFER
                self._dropped, self._removed = self._dropped + extra, self._removed + extra
                del self._buffer[:extra]
            pending = len(self._buffer)
        if self._outage is not None:
            return  # the background thread sends them once the server answers again
        if (pending >= FLUSH_EVERY * max(1, len(event.metrics))
                or time.monotonic() - self._flushed_at >= FLUSH_SECONDS):
            self._send_or_keep(event.step)

    @hookimpl
    def wmtp_checkpoint_committed(self, receipt):
        with self._lock:
            self._newest[receipt.role] = max(self._newest.get(receipt.role, receipt.step), receipt.step)
            if self.run_id is not None and receipt.role.value == "resume":
                self._tags["wmtp.latest_resume"] = redact.text(receipt.uri)
        if self.run_id is not None and receipt.role.value == "resume" and self._outage is None:
            self._send_or_keep(receipt.step)

    @hookimpl
    def wmtp_checkpoint_evaluated(self, event):
        """The run's background evaluation (kept and sent like any metric, at the checkpoint's
        step; the final model's as ``final_eval/...``; a failure as the tag ``wmtp.eval.failed``),
        or ``wmtp evaluate`` with a config: logged into the MLflow run of the checkpoint's lineage."""
        from mlflow.entities import Metric

        if event.step is None:
            return
        prefix = "final_" if event.role is not None and event.role.value == "final" else ""
        now = int(time.time() * 1000)
        values = [Metric(prefix + k, float(v), now, event.step) for k, v in sorted(event.metrics.items())]
        if self.run_id is not None and event.run is not None:
            with self._lock:
                self._buffer.extend(values)
                if event.error:
                    self._tags["wmtp.eval.failed"] = redact.text(f"step {event.step}: {event.error}")[:5000]
            if self._outage is None:
                self._send_or_keep(event.step)
            return
        if event.run is None and event.lineage and event.mlflow and values:
            import mlflow

            configure(event.mlflow)
            found = lineage_run(event.lineage)
            if found is None:
                log.warning("tracking: no MLflow run of lineage %s to log the evaluation of %s into",
                            event.lineage, redact.text(event.uri))
                return
            mlflow.MlflowClient().log_batch(found.info.run_id, metrics=values)

    @hookimpl
    def wmtp_checkpoint_deleted(self, receipt):
        with self._lock:
            self._deleted.append((receipt, max(self._newest.get(receipt.role, receipt.step), receipt.step)))

    @hookimpl
    def wmtp_run_ended(self, event):
        if self.run_id is None:
            return
        import mlflow

        self._stop_retrying()
        status = str(event.status)
        with self._lock:
            self._tags["wmtp.status"] = status
            if event.reason:
                self._tags["wmtp.reason"] = redact.text(event.reason)[:5000]
        reachable = True
        try:
            try:
                self._send()  # the values kept, the latest tags and the status in as few requests as it takes
            except Exception as e:
                reachable = unreachable(e) is None
                if reachable:  # otherwise the report below says what MLflow does not hold
                    self._warn("send the run's metrics and status", e)
            if reachable:
                self._safely("log the storage picture", self._log_storage_picture, event)
                if not event.reason:  # the tags describe the latest state: an earlier interruption is over
                    self._safely("untag the run", self._untag, "wmtp.reason")
        finally:
            # a preempted run is resumable: KILLED, and its next part continues this MLflow run
            ended = {"failed": "FAILED", "preempted": "KILLED"}.get(status, "FINISHED")
            active = mlflow.active_run()
            if active is not None and active.info.run_id == self.run_id:
                if reachable:
                    self._safely("end the MLflow run", mlflow.end_run, status=ended)
                else:  # leave the run in this process (its first act), without waiting on the server again
                    with one_try():
                        self._safely("end the MLflow run", mlflow.end_run, status=ended, quiet=True)
            elif reachable:
                self._safely("end the MLflow run", self.client.set_terminated, self.run_id, status=ended)
            self._report_unsent(ended if not reachable else None)
            if reachable:
                self._say_where()
            self.run_id = None
            self._buffer, self._tags = [], {}

    def _say_where(self) -> None:
        """One line: the MLflow run, and where its experiment opens on its training runs."""
        where = where_to_browse(self.uri, self.experiment_id)
        if where:
            log.info("MLflow run %s; its experiment's training runs: %s", self.run_id, redact.text(where))

    # -- sending, and keeping what cannot be sent ----------------------------------------------
    def _send(self) -> None:
        """Send the kept metric values (oldest first) and tags; what was sent is forgotten, what
        was not stays kept. Raises the request's failure."""
        from mlflow.entities import RunTag

        with self._sending:
            self._flushed_at = time.monotonic()
            while True:
                with self._lock:
                    metrics, tags, removed = self._buffer[:BATCH], dict(self._tags), self._removed
                if not metrics and not tags:
                    return
                self.client.log_batch(self.run_id, metrics=metrics,
                                      tags=[RunTag(k, v) for k, v in list(tags.items())[:100]])
                with self._lock:  # appended at the tail, dropped at the head: what is left of the batch
                    sent = max(0, len(metrics) - (self._removed - removed))
                    del self._buffer[:sent]
                    self._removed += sent
                    for key, value in list(tags.items())[:100]:
                        if self._tags.get(key) == value:
                            del self._tags[key]

    def _send_or_keep(self, step: int) -> None:
        """Send now, from the training thread; if the server cannot be reached, keep everything
        and let a background thread try again, so that training does not wait for it."""
        try:
            self._send()
        except Exception as e:
            why = unreachable(e)
            if why is None:
                self._warn("log metrics", e)
                return
            with self._lock:  # a save's thread and the training thread may both find it down
                if self._outage is not None or self._stop.is_set():
                    return
                self._outage = {"since": step, "why": why}
                self._retrier = threading.Thread(target=self._retry, name="wmtp-tracking-retry", daemon=True)
                self._retrier.start()
            log.warning("tracking: the MLflow server at %s cannot be reached (%s); training goes on, "
                        "and metric values are kept and sent once it answers again",
                        redact.text(self.uri), why)

    def _retry(self) -> None:
        while not self._stop.wait(FLUSH_SECONDS):
            try:
                with self._lock:
                    kept = len(self._buffer)
                self._send()
            except Exception as e:
                if unreachable(e) is None:
                    self._warn("log metrics", e)
                continue
            log.warning("tracking: the MLflow server at %s answers again; sent %d metric values kept "
                        "since step %d", redact.text(self.uri), kept, self._outage["since"])
            self._outage = None
            return

    def _stop_retrying(self) -> None:
        with self._lock:
            self._stop.set()
            retrier, self._retrier = self._retrier, None
        if retrier is not None:
            retrier.join()  # at most one request in flight: bounded by MLflow's retry settings

    def _report_unsent(self, status: str | None) -> None:
        """Never silent: the values (and tags) the MLflow run does not hold, and why."""
        with self._lock:
            values, tags = len(self._buffer), sorted(self._tags)
            steps = sorted({m.step for m in self._buffer})
        if not values and not tags and not self._dropped and status is None:
            return
        what = []
        if values:
            what.append(f"{values} metric values (steps {steps[0]}-{steps[-1]})")
        if self._dropped:
            what.append(f"{self._dropped} older metric values dropped while it was unreachable "
                        f"(more than {MAX_BUFFER} kept)")
        if tags:
            what.append("the tags " + ", ".join(tags))
        if status is not None:
            what.append(f"the run's end (status {status})")
        log.warning("tracking: not sent to the MLflow server at %s: %s; MLflow run %s does not hold them",
                    redact.text(self.uri), "; ".join(what), self.run_id)

    @staticmethod
    def _previous_run(run) -> str | None:
        found = lineage_run(run.lineage)
        return found.info.run_id if found is not None else None

    def _log_storage_picture(self, event) -> None:
        """The bytes the whole run held over its steps, beside a trainer that also copies every
        save here, as one PNG artifact: this part's receipts and deletions, and what earlier
        parts of a resumed run committed that the resume sink still holds (``event.held``), so
        that it ends on what ``wmtp report`` counts. Only when matplotlib (``wmtp[plot]``) is
        there."""
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            return
        with self._lock:
            deleted = list(self._deleted)
        start, interval = self._schedule
        history = report.history_of_run(event.run.name, event.receipts, deleted, event.held,
                                        start_step=start, save_interval=interval)
        if not history.saves:
            return
        with tempfile.TemporaryDirectory(prefix="wmtp-storage-") as folder:
            path = os.path.join(folder, STORAGE_PICTURE)
            with open(path, "wb") as f:
                f.write(report.figure_png(history, report.DEFAULT_PRICE_PER_GB_MONTH))
            self.client.log_artifact(self.run_id, path)

    def _untag(self, key: str) -> None:
        if key in (self.client.get_run(self.run_id).data.tags or {}):
            self.client.delete_tag(self.run_id, key)

    def _safely(self, what: str, fn, *args, quiet: bool = False, **kwargs):
        """Tracking is an observer: an unreachable server must not stop training or lose the
        checkpoints, but it is never silent (``quiet``: another line reports it)."""
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # MLflow and HTTP errors alike
            if not quiet:
                self._warn(what, e)
            return None

    def _warn(self, what: str, e: Exception) -> None:
        log.warning("tracking: could not %s in MLflow run %s: %s", what, self.run_id,
                    redact.text(first_line(e)))


plugin = MlflowTracking()
