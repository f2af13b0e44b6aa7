"""MLflow tracking observer: params, per-step metrics and tags. Stores no checkpoint bytes.

It owns the MLflow run of a WMTP run: started at ``wmtp_run_started``, ended at
``wmtp_run_ended``; the registry sink logs the final model into that same run. At the end it
logs one small PNG artifact, the bytes the run held over its steps (when matplotlib is
installed): a picture drawn from the receipts, not a checkpoint.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time

from wmtp_core import hookimpl, redact, report
from wmtp_plugins._mlflow import check_uris, configure

FLUSH_EVERY = 50
"""Metrics are sent in batches of this many steps..."""
FLUSH_SECONDS = 5.0
"""...or this often, whichever comes first: a run's curves show up while it trains."""
MAX_PARAM = 6000
MAX_BUFFER = 200_000
STORAGE_PICTURE = "wmtp-storage.png"
"""The run's artifact drawn by ``wmtp_core.report.figure_png`` from this part's receipts."""
log = logging.getLogger("wmtp.tracking")


class MlflowTracking:
    def __init__(self) -> None:
        self.run_id: str | None = None
        self.client = None
        self._buffer: list = []  # mlflow.entities.Metric values not yet logged
        self._flushed_at = time.monotonic()
        self._logged_through = -1
        """After a resume: the last step the MLflow run already holds. Resume is bit-exact, so
        the steps replayed since the checkpoint are the same values: they are not sent twice."""
        self._lock = threading.Lock()  # saves and retention report from background threads
        self._newest: dict = {}  # role -> the newest step committed so far
        self._deleted: list = []  # (receipt, the newest step of its role when it was deleted)

    @hookimpl
    def wmtp_check_config(self, config):
        """MLflow must be able to use the tracking (and registry) URI as a store."""
        check_uris(config.get("mlflow"))

    @hookimpl
    def wmtp_run_started(self, event):
        self._logged_through, self._buffer, self._flushed_at = -1, [], time.monotonic()
        self._newest, self._deleted = {}, []
        if not event.mlflow:
            return  # no mlflow section: nothing to track into
        import mlflow
        from mlflow.entities import Param

        configure(event.mlflow)
        previous = self._previous_run(event.run) if event.run.resumed_from else None
        if previous is not None:
            # a resumed run continues its MLflow run: same params, metrics carry on
            mlflow.start_run(run_id=previous)
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
        self.run_id = run.info.run_id
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
        self._buffer.extend(Metric(k, float(v), now, event.step) for k, v in event.metrics.items())
        if (len(self._buffer) >= FLUSH_EVERY * max(1, len(event.metrics))
                or time.monotonic() - self._flushed_at >= FLUSH_SECONDS):
            self._safely("log metrics", self._flush)

    @hookimpl
    def wmtp_checkpoint_committed(self, receipt):
        with self._lock:
            self._newest[receipt.role] = max(self._newest.get(receipt.role, receipt.step), receipt.step)
        if self.run_id is not None and receipt.role.value == "resume":
            self._safely("tag the latest resume checkpoint",
                         self.client.set_tag, self.run_id, "wmtp.latest_resume", redact.text(receipt.uri))

    @hookimpl
    def wmtp_checkpoint_deleted(self, receipt):
        with self._lock:
            self._deleted.append((receipt, max(self._newest.get(receipt.role, receipt.step), receipt.step)))

    @hookimpl
    def wmtp_run_ended(self, event):
        if self.run_id is None:
            return
        import mlflow

        try:
            self._safely("log metrics", self._flush)
            self._safely("log the storage picture", self._log_storage_picture, event)
            self._safely("tag the run status", self.client.set_tag, self.run_id, "wmtp.status",
                         str(event.status))
            if event.reason:
                self._safely("tag the run", self.client.set_tag, self.run_id, "wmtp.reason",
                             redact.text(event.reason)[:5000])
            else:  # the tags describe the latest state: an earlier interruption is over
                self._safely("untag the run", self._untag, "wmtp.reason")
        finally:
            # a preempted run is resumable: KILLED, and its next part continues this MLflow run
            status = {"failed": "FAILED", "preempted": "KILLED"}.get(str(event.status), "FINISHED")
            active = mlflow.active_run()
            if active is not None and active.info.run_id == self.run_id:
                self._safely("end the MLflow run", mlflow.end_run, status=status)
            else:
                self._safely("end the MLflow run", self.client.set_terminated, self.run_id, status=status)
            if self._buffer:
                log.warning("tracking: %d metric values could not be logged to MLflow", len(self._buffer))
            self.run_id = None
            self._buffer = []

    @staticmethod
    def _previous_run(run) -> str | None:
        import mlflow

        found = mlflow.search_runs(
            filter_string=f"tags.`wmtp.lineage` = '{run.lineage}'", output_format="list",
            order_by=["attributes.start_time ASC"], max_results=1,
        )
        return found[0].info.run_id if found else None

    def _log_storage_picture(self, event) -> None:
        """The bytes this part of the run held over its steps, beside a trainer that also copies
        every save here, as one PNG artifact. Only when matplotlib (``wmtp[plot]``) is there."""
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            return
        with self._lock:
            deleted = list(self._deleted)
        history = report.history_from_receipts(event.run.name, event.receipts, deleted)
        if not history.saves:
            return
        with tempfile.TemporaryDirectory(prefix="wmtp-storage-") as folder:
            path = os.path.join(folder, STORAGE_PICTURE)
            with open(path, "wb") as f:
                f.write(report.figure_png(history, report.DEFAULT_PRICE_PER_GB_MONTH))
            self.client.log_artifact(self.run_id, path)

    def _flush(self) -> None:
        self._flushed_at = time.monotonic()
        while self._buffer:
            self.client.log_batch(self.run_id, metrics=self._buffer[:1000])
            del self._buffer[:1000]

    def _untag(self, key: str) -> None:
        if key in (self.client.get_run(self.run_id).data.tags or {}):
            self.client.delete_tag(self.run_id, key)

    def _safely(self, what: str, fn, *args, **kwargs):
        """Tracking is an observer: an unreachable server must not stop training or lose the
        checkpoints, but it is never silent. Unlogged metrics stay buffered for the next try."""
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # MLflow and HTTP errors alike
            if len(self._buffer) > MAX_BUFFER:
                del self._buffer[: len(self._buffer) - MAX_BUFFER]
            log.warning("tracking: could not %s in MLflow run %s: %s", what, self.run_id,
                        redact.text((str(e).splitlines() or [""])[0][:300]))
            return None


plugin = MlflowTracking()
