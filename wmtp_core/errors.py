"""Every error a user can cause, in one family.

Both entry points print a :class:`WmtpError` as one line with exit status 2, and a
:class:`StorageError` (storage that failed after the client's retries) as one line with exit
status 1; the exit statuses are in :mod:`wmtp_core.exits`. Any other exception is a bug in WMTP
or a plugin: it ends the process with its traceback and exit status 1. Raise one of these (or a
subclass) from a plugin for input the user can fix.
"""

from __future__ import annotations


class WmtpError(Exception):
    """Something the user can fix: the message says what and how."""


class ConfigError(WmtpError):
    """A configuration or recipe that cannot be used; names the file, the key, the value and
    what is accepted."""


class UsageError(WmtpError):
    """A command-line argument that cannot be used (a URI that does not exist, a bad option)."""


class BindingError(WmtpError):
    """A role binding that cannot work. Raised before the first training step."""


class CheckpointError(WmtpError):
    """A checkpoint that is missing, torn, refused, or does not match its manifest."""


class UnverifiableError(CheckpointError):
    """A directory whose manifest cannot be believed: not JSON, not the schema, at odds with the
    directory it lies in or with the files beside it. Such a checkpoint is never "committed"."""


class CorruptError(CheckpointError):
    """A committed checkpoint whose files do not match its manifest: a flipped byte, a truncated
    or missing file. It is quarantined (moved aside), never resumed from."""


class UnusableError(CorruptError):
    """A committed checkpoint whose files match its manifest but that no run can use: a part
    refused by weights-only loading or not a torch file at all, or state without the structure
    WMTP writes (a missing or mistyped key, a step other than its directory's, a scheduler
    state with keys its scheduler does not have, weights of other shapes than the model its
    own trainer state names). Quarantined (moved aside) exactly like a corrupt one, so that a
    run can commit that step again."""


class DiskFullError(CheckpointError):
    """A save that found its local disk full: names the path, the bytes it needed and the bytes
    free. Nothing of it was committed and its staging was removed. A synchronous save raises it
    (exit status 2); a background save's is wrapped in :class:`SaveError` (exit status 1)."""


class ManifestError(UnverifiableError):
    """A manifest that does not follow the schema."""


class DataError(WmtpError):
    """A data source that cannot be read or does not yield enough data."""


class TrainingError(WmtpError):
    """A run that cannot start or go on, with a message naming the cause and the fix."""


class DeviceError(TrainingError):
    """A device, precision or launcher setting this machine cannot honour."""


class ModelLoadError(WmtpError):
    """A reference, reward or registered model that cannot be loaded, or is refused because
    loading it could run code."""


class SaveError(Exception):
    """A checkpoint save that failed while training went on (a background save), or whose
    storage failed (on S3: once the clients' retries ran out), naming the operation, the URL and
    the last error. Not a :class:`WmtpError`: the run ends with exit status 1, naming the step,
    and nothing of that save was committed."""


class StorageError(Exception):
    """Storage that failed after the client's own retries while a run or a command read from it
    (listing checkpoints, reading a manifest, loading a checkpoint, retention, the lease): one
    line naming the operation, the URL and the last error, exit status 1. Not a
    :class:`WmtpError`: nothing the user wrote is wrong, and nothing committed was touched."""


def first_line(e: BaseException | str, limit: int = 300) -> str:
    """The first line of an error's message, at most ``limit`` characters: what a one-line
    error shows of an exception raised by a library (whose messages can run to pages)."""
    return (str(e).strip().splitlines() or [""])[0][:limit]
