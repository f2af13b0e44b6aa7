"""File hashes: the algorithms a manifest names, and hashing while bytes are written or read.

Every digest WMTP computes comes from here: a file on local disk is hashed in place (memory-
mapped), a stream is hashed as it passes, slice by slice on a helper thread, so a save costs about
max(hash, write) rather than their sum.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import io
import mmap
import os
from typing import Any, BinaryIO, Callable

import fsspec
from fsspec.implementations.local import LocalFileSystem

from wmtp_core.errors import ManifestError

HASH = "blake3"
"""The hash new manifests use: BLAKE3, several times faster than SHA-256 on one core, so hashing
a checkpoint never costs more than writing it."""
HASHES = ("sha256", "blake3")
PARALLEL_BYTES = 16 << 20
"""Files at least this large are hashed by BLAKE3 on every core (its own thread pool)."""
CHUNK = 8 << 20
"""How much of a stream is read (and hashed) at a time."""

_forked = False
"""True in a process forked from one that may have started BLAKE3's thread pool."""
_HASHER = cf.ThreadPoolExecutor(max_workers=4, thread_name_prefix="wmtp-hash")


def _after_fork() -> None:
    """A forked child (a data-loader worker, a test that forks) inherits the executor without its
    threads: give it its own, or its saves would wait forever for a hash."""
    global _forked, _HASHER
    _forked = True
    _HASHER = cf.ThreadPoolExecutor(max_workers=4, thread_name_prefix="wmtp-hash")


os.register_at_fork(after_in_child=_after_fork)


def new_hasher(algorithm: str, size: int = 0) -> Any:
    """A streaming hasher with ``update`` and ``hexdigest``. BLAKE3 runs on the calling thread
    (7 GB/s on one core here), or on every core for a file of ``PARALLEL_BYTES`` or more: the
    hash of the last file of a save is the one no write can hide. Its thread pool does not
    survive a fork, so a forked child always hashes on its own thread."""
    if algorithm == "blake3":
        import blake3

        if size >= PARALLEL_BYTES and not _forked:
            return blake3.blake3(max_threads=blake3.blake3.AUTO)
        return blake3.blake3()
    if algorithm == "sha256":
        return hashlib.sha256()
    raise ManifestError(f"hash {algorithm!r} is not known (accepted: {', '.join(HASHES)})")


def digest_file(path: str, algorithm: str) -> tuple[str, int]:
    """Digest and size of a local file, hashed straight from the page cache (memory-mapped)."""
    if algorithm == "blake3":
        size = os.path.getsize(path)
        return new_hasher("blake3", size).update_mmap(path).hexdigest() if size else new_hasher("blake3").hexdigest(), size
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return hashlib.sha256(b"").hexdigest(), 0
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return hashlib.sha256(m).hexdigest(), size


def digest_bytes(data: bytes, algorithm: str) -> str:
    h = new_hasher(algorithm)
    h.update(data)
    return h.hexdigest()


def digest_of(fs: fsspec.AbstractFileSystem, path: str, algorithm: str = HASH) -> tuple[str, int]:
    """Digest and size of a file on any filesystem, streamed in ``CHUNK`` pieces."""
    sha = new_hasher(algorithm)
    size = 0
    with fs.open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            sha.update(chunk)
            size += len(chunk)
    return sha.hexdigest(), size


def digest_path(fs: fsspec.AbstractFileSystem, path: str, algorithm: str = HASH) -> tuple[str, int]:
    """Digest and size of a file: hashed in place on local disk, streamed elsewhere."""
    return digest_file(path, algorithm) if isinstance(fs, LocalFileSystem) else digest_of(fs, path, algorithm)


def durable_digest(path: str) -> tuple[str, int]:
    """fsync a local file just written, then hash it (a read-only descriptor syncs on Linux and
    macOS alike: the data and the metadata of the file reach the disk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return digest_file(path, HASH)


def in_background(fn: Callable[..., Any], *args: Any) -> cf.Future:
    """Run ``fn(*args)`` on the hashing threads (hashing releases the GIL while a write goes on)."""
    return _HASHER.submit(fn, *args)


def landed_size(fs: fsspec.AbstractFileSystem, path: str) -> int:
    """The size of ``path`` as the store reports it now, never from fsspec's listings cache:
    another thread's listing (a retention pass, a resume scan) can cache the directory as it
    was before this file landed, and s3fs then says the file does not exist, or gives the size
    of an older file of that name."""
    fs.invalidate_cache(path)
    try:
        info = fs.info(path, refresh=True)
    except TypeError:  # a filesystem whose ``info`` takes no ``refresh``
        info = fs.info(path)
    return int(info["size"])


def fsync(f: Any) -> None:
    """Flush ``f`` to durable storage when it is a local file; object stores commit on close."""
    f.flush()
    fileno = getattr(f, "fileno", None)
    if fileno is None:
        return
    try:
        os.fsync(fileno())
    except (OSError, io.UnsupportedOperation, AttributeError, TypeError, ValueError):
        pass


class HashingWriter(io.RawIOBase):
    """A write-only stream that hashes and counts what passes through to ``target``.

    Hashing runs on a helper thread, slice by slice, while this thread writes the same slice:
    both release the GIL, so a save costs about max(hash, write) instead of their sum.
    """

    SLICE = 8 << 20

    def __init__(self, target: BinaryIO, algorithm: str = HASH) -> None:
        self.target = target
        self.sha = new_hasher(algorithm)
        self.size = 0
        self._hashing: cf.Future | None = None

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        n = len(view)
        if n < self.SLICE:
            self._wait()
            self.sha.update(view)
            self.target.write(view)
        else:
            for i in range(0, n, self.SLICE):
                piece = view[i : i + self.SLICE]
                self._wait()
                self._hashing = _HASHER.submit(self.sha.update, piece)
                self.target.write(piece)
        self.size += n
        return n

    def _wait(self) -> None:
        if self._hashing is not None:
            self._hashing.result()
            self._hashing = None

    def hexdigest(self) -> str:
        self._wait()
        return self.sha.hexdigest()
