"""WMTP: multi-token-prediction training whose checkpoints go through role-bound plugins."""

from wmtp_core.events import (
    CheckpointEmitted,
    FileEntry,
    LoadedModel,
    Manifest,
    Payload,
    Receipt,
    RunEnded,
    RunInfo,
    RunStarted,
    SinkContext,
    StepEnded,
)
from wmtp_core.hookspecs import hookimpl
from wmtp_core.roles import BindingError, PolicySpec, Role, SinkSpec

__version__ = "0.1.0"

__all__ = [
    "BindingError",
    "CheckpointEmitted",
    "FileEntry",
    "LoadedModel",
    "Manifest",
    "Payload",
    "PolicySpec",
    "Receipt",
    "Role",
    "RunEnded",
    "RunInfo",
    "RunStarted",
    "SinkContext",
    "SinkSpec",
    "StepEnded",
    "hookimpl",
]
