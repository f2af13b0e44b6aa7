"""Conditional writes of one small object: created only where there is none, replaced only while
it is the version read before. A run's lease (:mod:`wmtp_core.lease`) is built on them.

These are hooks of :class:`~wmtp_core.commit.CheckpointStore`: what differs between protocols.
The implementation here serves local disk, where every change happens under an exclusive
``flock`` on the object's directory (so a read, a check and a write are one step, and no lock
file is left), and, at best effort, any other filesystem. A store for an object store overrides
them with the store's own conditional requests (the ``s3`` plugin: ``If-None-Match`` and
``If-Match``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import posixpath
import stat
import uuid
from typing import Iterator

from fsspec.implementations.local import LocalFileSystem

from wmtp_core.bounded import kind

MAX_OBJECT_BYTES = 1 << 20
"""A conditionally written object (the lease) is small: what is read of one, at most, plus a
byte (a longer one is cut, and then cannot be believed)."""


class NotAFileError(OSError):
    """Something that is not a regular file is where the object should be (a directory, a FIFO):
    it is never opened (a FIFO would block). ``tag`` names its version, for
    :meth:`ConditionalWrites.put_if_unchanged`, which moves it aside to ``aside``."""

    def __init__(self, path: str, kind: str, tag: str) -> None:
        super().__init__(f"{path} is {kind}, not a file")
        self.path, self.kind, self.tag = path, kind, tag
        self.aside = f"{path}.not-a-file-{hashlib.sha256(tag.encode()).hexdigest()[:8]}"


class ConditionalWrites:
    """Conditional writes of a :class:`~wmtp_core.commit.CheckpointStore` (mixed into it: uses
    its ``fs``)."""

    def read_tagged(self, path: str) -> tuple[bytes, str] | None:
        """Hook: the object at ``path`` and a tag of its version, read fresh (no listing cache);
        ``None`` when there is none. A tag must change whenever the content does, and be read
        before the content, so that a content newer than the tag makes a later
        :meth:`put_if_unchanged` fail. Raises :class:`NotAFileError` where something that is
        not a regular file is there (never opened). Default: a digest of the content."""
        try:
            if isinstance(self.fs, LocalFileSystem):
                raw = _read_local(path)
            else:
                self.fs.invalidate_cache(path)
                kind = self.fs.info(path).get("type")
                if kind != "file":
                    raise NotAFileError(path, f"a {kind}", f"{kind}:{path}")
                raw = self.fs.cat_file(path)
        except FileNotFoundError:
            return None
        return raw, hashlib.sha256(raw).hexdigest()

    def put_if_absent(self, path: str, data: bytes) -> bool:
        """Hook: write ``data`` at ``path`` only where there is nothing yet, atomically with
        respect to every other writer of the store; False when something is there. Default: on
        local disk under the directory's ``flock`` (the directories missing are made, and
        removed again by :meth:`remove_if_unchanged`); elsewhere a check, then a write."""
        if isinstance(self.fs, LocalFileSystem):
            with self._locked(posixpath.dirname(path)):
                if os.path.exists(path):
                    return False
                write_local(path, data)
                return True
        if self.fs.exists(path):
            return False
        self.fs.pipe_file(path, data)
        return True

    def put_if_unchanged(self, path: str, data: bytes, tag: str | None) -> bool:
        """Hook: replace the object at ``path`` with ``data`` only while it is the version
        ``tag`` (from :meth:`read_tagged`); False when it changed or went meanwhile. A write
        whose response was lost may report False although it landed: callers look again.
        Something that is not a file there (:class:`NotAFileError`, of version ``tag``) is moved
        aside first. Default: on local disk under the directory's ``flock``; elsewhere an
        unconditional write."""
        if isinstance(self.fs, LocalFileSystem):
            with self._locked(posixpath.dirname(path)):
                if not self._unchanged(path, tag):
                    return False
                write_local(path, data)
                return True
        self._unchanged(path, tag)
        self.fs.pipe_file(path, data)
        return True

    def _unchanged(self, path: str, tag: str | None) -> bool:
        """True when the object at ``path`` is the version ``tag``; something that is not a file
        of that version is moved aside to its :attr:`NotAFileError.aside`."""
        try:
            current = self.read_tagged(path)
        except NotAFileError as e:
            if e.tag != tag:
                return False
            if isinstance(self.fs, LocalFileSystem):
                os.rename(path, e.aside)
            else:
                self.fs.mv(path, e.aside, recursive=True)
            return True
        return (current[1] if current else None) == tag

    def remove_if_unchanged(self, path: str, tag: str | None) -> bool:
        """Hook: remove the object at ``path`` if it is still the version ``tag`` (``None``:
        there is none, nothing to remove); False when it changed. Directories
        :meth:`put_if_absent` made for it go too once empty. Default: on local disk under the
        directory's ``flock``; elsewhere a check, then a delete."""
        if not isinstance(self.fs, LocalFileSystem):
            current = self._file_tagged(path)
            if current is None or current[1] != tag:
                return False
            self.fs.rm_file(path)
            return True
        directory = posixpath.dirname(path)
        with self._locked(directory):
            current = self._file_tagged(path)
            removed = current is not None and current[1] == tag
            if removed:
                os.unlink(path)
        for d in self._made_dirs.pop(directory, []):  # deepest first
            try:
                os.rmdir(d)
            except OSError:  # not empty: it holds checkpoints (or anything else)
                break
        return removed

    def _file_tagged(self, path: str) -> tuple[bytes, str] | None:
        """:meth:`read_tagged`, None where something that is not a file is there (not ours)."""
        try:
            return self.read_tagged(path)
        except NotAFileError:
            return None

    @contextlib.contextmanager
    def _locked(self, directory: str) -> Iterator[None]:
        """An exclusive ``flock`` on ``directory`` (made if missing, remembered for removal)."""
        if not os.path.isdir(directory):
            missing, d = [], directory
            while d and not os.path.isdir(d):
                missing.append(d)
                d = os.path.dirname(d)
            os.makedirs(directory, exist_ok=True)
            self._made_dirs[directory] = missing
        fd = os.open(directory, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def _read_local(path: str) -> bytes:
    """The regular file at ``path``; :class:`NotAFileError` for anything else (not followed
    through a symbolic link, never opened blocking)."""
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        what = kind(st.st_mode)
        raise NotAFileError(path, what, f"{what}:{st.st_dev}:{st.st_ino}:{st.st_mtime_ns}")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # replaced since the look
            raise NotAFileError(path, "not a regular file", f"changed:{st.st_ino}")
        return f.read(MAX_OBJECT_BYTES + 1)


def write_local(path: str, data: bytes) -> None:
    """Write aside, fsync, rename: a reader sees the old object or the new one, never half."""
    tmp = f"{path}.{uuid.uuid4().hex}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
