"""What the MLflow plugins share: pointing the client at the configured stores."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Mapping

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
STORE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks", "databricks-uc",
                 "file", "uc")
"""What MLflow accepts as a tracking store or model registry (database drivers such as
``postgresql+psycopg2`` included); object stores like ``s3://`` hold artifacts only."""
REQUEST_BOUNDS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
"""MLflow's own retry settings for every request to a tracking server or registry, where the
environment does not set them. MLflow's defaults (7 retries, backoff factor 2, 120 s) make an
unreachable server take minutes per request to report; these give up on a refused connection
within about 10 s (3 retries after 0, 2 and 4 s, plus up to 1 s of jitter each), and on a
server that accepts but never answers within about 2 minutes (4 tries of 30 s)."""


def check_uris(section: Mapping[str, Any] | None) -> None:
    """Refuse a tracking or registry URI MLflow cannot use as a store, naming the key."""
    from wmtp_core import ConfigError

    if not section:
        return
    for key in ("tracking_uri", "registry_uri"):
        uri = section.get(key)
        if not uri:
            continue
        local = "://" not in uri and ":" not in uri.split("/", 1)[0]  # a path: a file store
        scheme = "file" if local else uri.split(":", 1)[0].split("+", 1)[0].lower()
        if scheme == "file" and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in ("true", "1"):
            raise ConfigError(
                f"mlflow.{key}: {uri!r} is a file store, which MLflow {_version()} refuses unless the "
                "environment sets MLFLOW_ALLOW_FILE_STORE=true; set it, or use a database such as "
                "sqlite:///mlflow.db ('mlflow migrate-filestore' moves existing runs)")
        if scheme not in STORE_SCHEMES:
            raise ConfigError(
                f"mlflow.{key}: {uri!r} cannot be used by MLflow as a tracking store or model "
                f"registry ({scheme}:// holds artifacts only); accepted: a database URI "
                "(sqlite:///mlflow.db, postgresql://...) or an MLflow server (http://host:5000). "
                "To keep artifacts on S3, start the server with --artifacts-destination s3://...")


@contextlib.contextmanager
def one_try():
    """Requests get a single try: for a server that has just failed every retry, when nothing
    else is talking to MLflow (the end of a run)."""
    saved = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES", None)
        else:
            os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = saved


def request_bounds() -> str:
    """The retry settings in force, for messages: ``3 retries, 30 s timeout``."""
    return (f"{os.environ.get('MLFLOW_HTTP_REQUEST_MAX_RETRIES', '7')} retries, "
            f"{os.environ.get('MLFLOW_HTTP_REQUEST_TIMEOUT', '120')} s timeout")


UNREACHABLE = ("Connection refused", "timed out", "Name or service not known",
               "Temporary failure in name resolution", "Connection reset by peer", "Connection aborted",
               "Remote end closed connection", "too many 5")
"""What a request that never reached a working server says, the first one found is reported."""


def unreachable(error: BaseException) -> str | None:
    """Why a server could not be reached (``Connection refused``, ``timed out``, ...), when that
    is what ``error`` says (an MLflow or HTTP error, or one it was raised from); ``None`` for any
    other failure: a request the server refused, a bad value."""
    import requests

    chain: list[BaseException] = []
    while error is not None and all(error is not seen for seen in chain):
        chain.append(error)
        error = error.__cause__ or error.__context__
    if not any(isinstance(e, (requests.ConnectionError, requests.Timeout))
               or "Max retries exceeded" in str(e) or "failed with timeout exception" in str(e) for e in chain):
        return None
    text = " ".join(str(e) for e in chain)
    found = next((k for k in UNREACHABLE if k in text), "no answer")
    return "too many error responses" if found == "too many 5" else found


def _version() -> str:
    from importlib.metadata import version

    return version("mlflow")


def configure(settings: Mapping[str, Any]) -> None:
    """Point MLflow at the configured tracking and registry stores and experiment."""
    import mlflow

    from wmtp_core import redact

    # MLflow logs through handlers of its own (not the root's): they get the redaction rule too
    redact.install_logging_filter()
    # MLflow logs an INFO line per migration and run; keep the console for WMTP's own summary.
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # uv environments have no pip; MLflow warns about it on every model it logs.
    logging.getLogger("mlflow.utils.environment").setLevel(logging.ERROR)
    # torch.export notes that the example batch size was specialised; the model is served as such.
    logging.getLogger("torch._export").setLevel(logging.ERROR)
    # its download progress bars are not WMTP's output (a user's own setting wins)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # MLflow writes "View run ... at: <tracking URI>" straight to stdout, credentials and all; the
    # tracking plugin says where the run is instead, without them (``where_to_browse``)
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    # an unreachable server is reported in seconds, not after minutes of retries, and once: by
    # WMTP with the outcome, not by urllib3 at every retry (a level the user set wins)
    for key, value in REQUEST_BOUNDS.items():
        os.environ.setdefault(key, value)
    retries = logging.getLogger("urllib3.connectionpool")
    if retries.level == logging.NOTSET:
        retries.setLevel(logging.ERROR)
    tracking = settings.get("tracking_uri") or DEFAULT_TRACKING_URI
    mlflow.set_tracking_uri(tracking)
    mlflow.set_registry_uri(settings.get("registry_uri") or tracking)
    experiment = mlflow.set_experiment(settings.get("experiment") or "wmtp")
    if EXPERIMENT_KIND not in (experiment.tags or {}):  # a kind someone set stays
        mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND, TRAINING)


EXPERIMENT_KIND = "mlflow.experimentKind"
TRAINING = "custom_model_development"
"""The experiment's kind, as MLflow 3 marks classic model training: its UI lists "Training runs"
for it. It does not choose the page the UI opens on (MLflow 3.17 keeps GenAI vs. model training
in the browser, or reads it from the address): see :func:`where_to_browse`."""


def where_to_browse(tracking_uri: str, experiment_id: str) -> str | None:
    """Where a user sees the experiment's training runs in MLflow's UI, or ``None`` for a store
    it cannot name. MLflow 3's UI opens every experiment in its GenAI mode (a choice kept in the
    browser, not in the experiment) unless the address asks for ``workflowType=machine_learning``:
    the address given here does. A server's address drops its credentials; a database store is
    served by ``mlflow server`` first (its UI on 127.0.0.1:5000)."""
    from urllib.parse import urlsplit, urlunsplit

    page = f"#/experiments/{experiment_id}?workflowType=machine_learning"
    parts = urlsplit(tracking_uri)
    if parts.scheme in ("http", "https"):
        host = parts.netloc.rpartition("@")[2]
        base = urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", ""))
        return f"{base}/{page}"
    if parts.scheme.startswith("databricks"):
        return None
    return f"`mlflow server --backend-store-uri {tracking_uri}`, then http://127.0.0.1:5000/{page}"


def lineage_run(lineage: str):
    """The MLflow run of a lineage: the first one started with its ``wmtp.lineage`` tag (a run
    resumed later logs into it), or ``None``. The tracking plugin resumes into it and the
    registry logs a model registered later into it: both look it up here, the same way."""
    import mlflow

    found = mlflow.search_runs(filter_string=f"tags.`wmtp.lineage` = '{lineage}'", output_format="list",
                               order_by=["attributes.start_time ASC"], max_results=1)
    return found[0] if found else None
