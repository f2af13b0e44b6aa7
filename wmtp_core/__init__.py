"""WMTP: multi-token-prediction training whose checkpoints go through role-bound plugins.

What a plugin needs is importable from here: the hook marker, roles, the specs plugins register,
the events, receipts and payloads that travel through hooks, the sink interface, the file-sink
toolkit (``FileSink`` over ``CheckpointStore``) and the error family.
"""

from wmtp_core.catalog import PolicySpec, SinkSpec
from wmtp_core.commit import CheckpointStore
from wmtp_core.coordination import ALONE, Coordinator
from wmtp_core.errors import (
    BindingError,
    CheckpointError,
    ConfigError,
    CorruptError,
    DiskFullError,
    DataError,
    DeviceError,
    ModelLoadError,
    SaveError,
    StorageError,
    TrainingError,
    UnverifiableError,
    UsageError,
    WmtpError,
)
from wmtp_core.events import (
    CheckpointEmitted,
    CheckpointEvaluated,
    LoadedModel,
    Payload,
    Receipt,
    RunEnded,
    RunInfo,
    RunStarted,
    RunStatus,
    SinkContext,
    StepEnded,
)
from wmtp_core.hookspecs import hookimpl
from wmtp_core.manifest import FileEntry, Manifest
from wmtp_core.roles import Role
from wmtp_core.sinks import FileLikeSink, Holding, LoadedCheckpoint, ResumableSink, Sink

__version__ = "0.1.0"


def __getattr__(name: str):
    """``FileSink`` loads torch: imported on first use, so ``import wmtp_core`` (and the
    ``wmtp`` command) stays light."""
    if name == "FileSink":
        from wmtp_core.filesink import FileSink

        return FileSink
    raise AttributeError(f"module 'wmtp_core' has no attribute {name!r}")


__all__ = [
    "ALONE",
    "BindingError",
    "CheckpointEmitted",
    "CheckpointEvaluated",
    "CheckpointError",
    "CheckpointStore",
    "ConfigError",
    "Coordinator",
    "CorruptError",
    "DiskFullError",
    "DataError",
    "DeviceError",
    "FileEntry",
    "FileLikeSink",
    "FileSink",
    "Holding",
    "LoadedCheckpoint",
    "LoadedModel",
    "Manifest",
    "ModelLoadError",
    "Payload",
    "PolicySpec",
    "Receipt",
    "ResumableSink",
    "Role",
    "RunEnded",
    "RunInfo",
    "RunStarted",
    "RunStatus",
    "SaveError",
    "Sink",
    "SinkContext",
    "SinkSpec",
    "StepEnded",
    "StorageError",
    "TrainingError",
    "UnverifiableError",
    "UsageError",
    "WmtpError",
    "hookimpl",
]
