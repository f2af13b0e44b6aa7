"""What the MLflow plugins share: pointing the client at the configured stores."""

from __future__ import annotations

import logging
from typing import Any, Mapping

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


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
    tracking = settings.get("tracking_uri") or DEFAULT_TRACKING_URI
    mlflow.set_tracking_uri(tracking)
    mlflow.set_registry_uri(settings.get("registry_uri") or tracking)
    mlflow.set_experiment(settings.get("experiment") or "wmtp")
