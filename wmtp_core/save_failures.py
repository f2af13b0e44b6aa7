"""A save that fails: what it was doing, what it leaves, what it says.

A failed save commits nothing and removes its own staging, then raises naming the operation, the
URL and the error: :class:`~wmtp_core.errors.DiskFullError` for a full local disk,
:class:`~wmtp_core.errors.SaveError` for a storage failure (once the clients' retries ran out).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import posixpath
import shutil
from typing import TYPE_CHECKING, Any, Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem

from wmtp_core.errors import DiskFullError, SaveError
from wmtp_core.naming import MANIFEST, STAGING_MARKER

if TYPE_CHECKING:
    from wmtp_core.commit import CheckpointStore

log = logging.getLogger("wmtp_core.commit")


class Doing:
    """What a save is doing, so that its failure names the operation and the URL."""

    def __init__(self, what: str) -> None:
        self.what = what

    def now(self, what: str) -> None:
        self.what = what


class NoRoom(Exception):
    """A local disk without room for the save: found before a file was written."""

    def __init__(self, needed: int, free: int) -> None:
        super().__init__(f"{needed} bytes needed, {free} free")
        self.needed, self.free = needed, free


def free_bytes(path: str) -> int | None:
    """Bytes free to this process on the local filesystem holding ``path`` (``None``: unknown)."""
    while path and not os.path.exists(path):
        parent = os.path.dirname(path.rstrip("/"))
        if parent == path:
            break
        path = parent
    try:
        return shutil.disk_usage(path or "/").free
    except OSError:
        return None


def is_storage_error(e: BaseException) -> bool:
    """An error of the storage rather than of WMTP: an OS or network error, an S3 client's error
    once its retries ran out, or torch's writer failing on a short write (it drops the errno)."""
    if isinstance(e, OSError):
        return True
    if isinstance(e, RuntimeError) and "inline_container" in str(e):
        return True
    return type(e).__module__.split(".", 1)[0] in ("botocore", "aiobotocore", "aiohttp", "s3fs", "fsspec")


_CREDENTIALS = ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError",
                "ProfileNotFound", "NoAuthTokenError", "UnauthorizedSSOTokenError", "TokenRetrievalError")
"""botocore's errors of credentials: raised before any request is sent, never retried."""


def not_retried(e: BaseException) -> str | None:
    """Why no client retried the storage error ``e``, in words; ``None`` for an error clients
    retry (5xx, throttling, timeouts, broken connections). Credentials that are missing or
    incomplete, access refused (S3's ``AccessDenied``, ``InvalidAccessKeyId``,
    ``SignatureDoesNotMatch``: s3fs raises ``PermissionError``) and a bucket that does not exist
    fail at the first attempt: saying "after the client's retries" of them would mislead."""
    names = {c.__name__ for c in type(e).__mro__}
    if names & set(_CREDENTIALS):
        return "an error of credentials: not retried"
    if isinstance(e, PermissionError):
        return "access refused: not retried"
    if isinstance(e, FileNotFoundError) and "bucket" in str(e).lower():
        return "no such bucket: not retried"
    return None


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]


def abandon(f: Any, abort: bool = True) -> None:
    """Give up a file being written after a failure: an object store's file is marked closed,
    so that closing it later cannot complete an upload of what was written so far, and with
    ``abort`` its multipart upload is aborted (``discard``; a failure to is the original
    failure's echo: the run's next start aborts it)."""
    if isinstance(f, fsspec.spec.AbstractBufferedFile):
        if abort:
            try:
                f.discard()
            except Exception as e:
                log.debug("could not abort the upload of %s: %s", getattr(f, "path", "?"), e)
        f.closed = True
        return
    try:
        f.close()
    except Exception:
        pass


def _disk_full(store: CheckpointStore, e: BaseException, path: str, nbytes: int | None) -> bool:
    """Whether a local save failed because its disk is full: ENOSPC or EDQUOT, or torch's writer
    failing with the disk then fuller than the save needs."""
    if not isinstance(store.fs, LocalFileSystem):
        return False
    if isinstance(e, NoRoom):
        return True
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    if isinstance(e, RuntimeError) and "inline_container" in str(e):
        free = free_bytes(path)
        return free is not None and free < max(nbytes or 0, 1 << 20)
    return False


def _discard_staging(store: CheckpointStore, path: str) -> str:
    """Remove a failed save's staging directory (its marker present, no manifest), and abort
    the multipart uploads into it. Returns what became of it, for the failure's message."""
    try:
        store.fs.invalidate_cache(path)
        if store.fs.exists(posixpath.join(path, MANIFEST)):
            return (f"its manifest may have landed, so nothing was removed: `wmtp checkpoints verify "
                    f"{store.uri(path)}` tells whether it is committed")
        for upload in store.incomplete_uploads(posixpath.basename(posixpath.dirname(path))):
            if upload.path.startswith(path.rstrip("/") + "/"):
                store.abort_upload(upload)
        contents = store._files(path)
        if contents and not store.fs.isfile(posixpath.join(path, STAGING_MARKER)):
            return "its directory holds files WMTP did not write, so nothing was removed"
        if store.fs.exists(path):
            store.fs.rm(path, recursive=True)
        return "its staging was removed"
    except Exception as e:
        if not is_storage_error(e):
            raise
        return (f"its staging could not be removed ({type(e).__name__}: {first_line(e)}); the run's "
                "next start removes it, or `wmtp gc`")


def failed(store: CheckpointStore, e: Exception, doing: Doing, path: str, step: int,
            nbytes: int | None) -> Exception:
    """The error a failed save raises, once its staging is removed: a full local disk becomes
    :class:`DiskFullError` (the path, the bytes needed, the bytes free), another storage failure
    :class:`SaveError` (the operation, the URL, the last error); anything else stays as it is."""
    full = _disk_full(store, e, path, nbytes)
    left = _discard_staging(store, path)
    if full:
        free = free_bytes(path)
        if isinstance(e, NoRoom):
            free = free if free is not None else e.free
            need = f"needs {e.needed:,} bytes and {free:,} bytes are free"
        else:  # it failed part-way with what is free now (its staging removed) at its disposal
            need = (f"needs more than the {free:,} bytes free" if free is not None else "needs more space") + \
                (f" (its tensors alone hold {nbytes:,} bytes)" if nbytes else "")
        return DiskFullError(
            f"{path}: the disk is full: the save of step {step} {need}"
            f"{'' if isinstance(e, NoRoom) else f'; {doing.what} failed'}; nothing of step {step} "
            f"was committed and {left}; committed checkpoints are intact. Free some "
            "space (or keep fewer checkpoints: paths.checkpoints.keep_last) and continue with "
            "--resume latest")
    if not is_storage_error(e):
        return e
    why = not_retried(e)
    retried = f" after {store.client_retries}" if store.client_retries and why is None else ""
    return SaveError(f"step {step} was not saved: {doing.what} failed{retried} ({type(e).__name__}: "
                     f"{first_line(e)}{f'; {why}' if why else ''}); nothing of step {step} was committed "
                     f"and {left}")


@contextlib.contextmanager
def failing_as_a_save(store: CheckpointStore, doing: Doing, path: str, step: int,
                      nbytes: int | None) -> Iterator[None]:
    """A failure inside removes the staging at ``path`` and is raised as a save's failure
    naming what was being done (see :func:`failed`)."""
    try:
        yield
    except Exception as e:
        failure = failed(store, e, doing, path, step, nbytes)
        if failure is e:
            raise
        raise failure from e
