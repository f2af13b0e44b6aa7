"""Restoring from object storage in bounded memory: each large file of a checkpoint is
downloaded by the filesystem's own ``get_file`` into a node-local staging file (s3fs: ranged
GETs, :data:`PARALLEL` at a time, each an eighth of the object between 8 MiB and :data:`PART`,
written at its offset as it lands, with botocore's retries), hashed there in pieces, and handed
to the loader as a path it memory-maps, only once the whole file matched its manifest entry. The
process never holds a whole object: a download holds at most ``PARALLEL * PART`` bytes at once,
whatever the checkpoint's size.

The staging directory is ``$WMTP_CACHE_DIR/restore/`` (default ``~/.cache/wmtp/restore/``), on
the node's own disk: give it room for the largest checkpoint a node restores, or point
``WMTP_CACHE_DIR`` at a local disk that has it (a restore that would not fit is refused in one
line before it starts). Each restore stages into a fresh private folder there and removes it
once the parts are loaded (a memory-mapped file stays readable after its name is gone); a folder
a killed process left is removed by the next restore on that node once its process is gone.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

from wmtp_core.errors import CorruptError, StorageError
from fsspec.implementations.local import LocalFileSystem

from wmtp_core.hashing import digest_of
from wmtp_core.manifest import FileEntry
# the one cache directory (also the models'), and s3fs's download bounded as the models' are
from wmtp_core.model_cache import PARALLEL, PART, cache_dir, download_options  # noqa: F401
SMALL = 4 << 20
"""Files at most this large are read into memory as they are (a trainer state, a manifest)."""


class Staging:
    """A private staging folder for one restore; :meth:`close` removes it (also as a context
    manager). Created lazily: a restore from local disk never makes one."""

    def __init__(self) -> None:
        self.folder: str | None = None
        self._count = 0

    def _ensure(self) -> str:
        if self.folder is None:
            root = os.path.join(cache_dir(), "restore")
            try:
                os.makedirs(root, exist_ok=True)
                _remove_orphans(root)
                self.folder = tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=root)
            except OSError as e:
                raise StorageError(f"the staging directory {root} cannot be used ({type(e).__name__}: {e}); set "
                                   "WMTP_CACHE_DIR to a local directory with room for a checkpoint") from None
        return self.folder

    def target(self, name: str, size: int) -> str:
        folder = self._ensure()
        free = shutil.disk_usage(folder).free
        if free < size:
            raise StorageError(f"the staging directory {folder} has {free} bytes free, and {name} needs {size}; "
                               "set WMTP_CACHE_DIR to a local directory with room for a checkpoint")
        self._count += 1
        return os.path.join(folder, f"{self._count}-{os.path.basename(name)}")

    def close(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None
            _give_back()

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _give_back() -> None:
    """The download's buffers (freed on s3fs's I/O thread, whose malloc arena keeps them) given
    back to the system once a restore is over: without it, a restore from S3 stays up to about
    100 MB above the same restore from local disk for the rest of the run (glibc only)."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to give back this way
        pass


def _remove_orphans(root: str) -> None:
    """Folders of restores whose process is gone (``<pid>-...``), from a process that was killed."""
    for name in os.listdir(root):
        pid = name.partition("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not os.path.exists(f"/proc/{pid}"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _get(fs: Any, path: str, start: int, end: int) -> bytes:
    """One ranged GET (keywords: s3fs's second positional parameter is a version id)."""
    return fs.cat_file(path, start=start, end=end)


def fetch(fs: Any, path: str, entry: FileEntry, uri: str, staging: Staging) -> str:
    """The object at ``path`` in a staging file, verified: its size first (one HEAD), then the
    object downloaded to the file by the filesystem's own ``get_file`` (s3fs: parallel ranged
    GETs, each part written as it lands), then the file hashed from the page cache.
    Raises :class:`CorruptError` naming ``uri`` when it does not match ``entry``; the file goes
    with the staging folder."""
    actual = fs.size(path)
    if actual != entry.size:
        raise CorruptError(f"{uri} does not match the manifest (size {actual} vs {entry.size})")
    target = staging.target(uri, entry.size)
    fs.get_file(path, target, **download_options(fs, entry.size))
    digest, size = digest_of(LocalFileSystem(), target, entry.algorithm)  # read in pieces: no mapping of the whole
    if size != entry.size or digest != entry.digest:
        raise CorruptError(f"{uri} does not match the manifest (size {size} vs {entry.size}, {entry.algorithm} "
                           f"{digest[:12]}… vs {entry.digest[:12]}…)")
    return target
