"""What the MLflow plugins share: pointing the client at the configured stores."""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
STORE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks", "databricks-uc",
                 "file", "uc")
"""What MLflow accepts as a tracking store or model registry (database drivers such as
``postgresql+psycopg2`` included); object stores like ``s3://`` hold artifacts only."""


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
    tracking = settings.get("tracking_uri") or DEFAULT_TRACKING_URI
    mlflow.set_tracking_uri(tracking)
    mlflow.set_registry_uri(settings.get("registry_uri") or tracking)
    mlflow.set_experiment(settings.get("experiment") or "wmtp")
