"""Reading a file WMTP did not write: a regular file only, and never more than a cap.

A manifest, a config or recipe, a dataset file are input someone else may have placed: a FIFO
there would block the read forever, a link to ``/dev/zero`` would fill memory. On local disk the
file is opened with ``O_NONBLOCK`` (a FIFO's open returns at once) and its type is checked on the
opened descriptor (``fstat``: no window between the check and the read); then at most ``cap + 1``
bytes are read. On any other fsspec filesystem (object storage) an object is a regular file: its
listed type and size are checked first, and the read is capped the same way.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Any

from wmtp_core.errors import WmtpError

_CHUNK = 1 << 20

KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
         (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
         (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link"))


def kind(mode: int) -> str:
    """What a non-regular file's ``st_mode`` says it is, in words."""
    return next((name for test, name in KINDS if test(mode)), "not a regular file")


def refused(where: str, found: str, what: str, error: type[Exception] = WmtpError) -> Exception:
    """The one-line refusal of a non-regular file at ``where``."""
    return error(f"{where} is {found}; {what} must be a regular file")


def too_large(where: str, cap: int, what: str, error: type[Exception] = WmtpError) -> Exception:
    """The one-line refusal of a file over ``cap`` bytes."""
    return error(f"{where} is larger than {cap} bytes; {what} is at most {cap} bytes")


def _is_local(fs: Any) -> bool:
    protocol = getattr(fs, "protocol", ())
    return "file" in ((protocol,) if isinstance(protocol, str) else protocol)


def read_bounded(fs: Any, path: str, cap: int | None, what: str, *, where: str | None = None,
                 error: type[Exception] = WmtpError) -> bytes:
    """The bytes of the regular file at ``path`` on the fsspec filesystem ``fs``, at most
    ``cap`` of them (``None``: a regular file of any size, read whole).

    Raises ``error`` (a :class:`~wmtp_core.errors.WmtpError` the caller picks: ``ConfigError``,
    ``DataError``, ...) for a file that is not regular (a FIFO, a device, a directory: never
    opened for a blocking read) or holds more than ``cap`` bytes (never more than ``cap + 1``
    read), in one line naming ``where`` (default ``path``), what was found and what ``what``
    (``"a manifest"``) must be. ``FileNotFoundError`` and other ``OSError`` pass through."""
    where = path if where is None else where
    if _is_local(fs):
        return _read_local(path, cap, what, where, error)
    info = fs.info(path)
    found = info.get("type")
    if found not in ("file", None):
        raise refused(where, "a directory" if found == "directory" else f"of type {found!r}", what, error)
    if cap is not None and (info.get("size") or 0) > cap:
        raise too_large(where, cap, what, error)
    with fs.open(path, "rb") as f:
        data = f.read() if cap is None else f.read(cap + 1)
    if cap is not None and len(data) > cap:
        raise too_large(where, cap, what, error)
    return data


def _read_local(path: str, cap: int | None, what: str, where: str, error: type[Exception]) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        if e.errno in (errno.ENXIO, errno.EOPNOTSUPP):  # a socket cannot be opened
            raise refused(where, kind(os.stat(path).st_mode), what, error) from None
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise refused(where, kind(mode), what, error)
        os.set_blocking(fd, True)
        parts, total = [], 0
        limit = None if cap is None else cap + 1
        while limit is None or total < limit:
            chunk = os.read(fd, _CHUNK if limit is None else min(_CHUNK, limit - total))
            if not chunk:
                break
            parts.append(chunk)
            total += len(chunk)
    finally:
        os.close(fd)
    if cap is not None and total > cap:
        raise too_large(where, cap, what, error)
    return b"".join(parts)


def read_head(fs: Any, path: str, start: int, length: int, what: str, *, where: str | None = None,
              error: type[Exception] = WmtpError) -> tuple[bytes, int]:
    """``(at most length bytes of the regular file at path from byte start, the file's size)``:
    a part of a file WMTP did not write (a safetensors header), refused like :func:`read_bounded`
    when it is not a regular file. Never reads more than ``length`` bytes."""
    where = path if where is None else where
    if not _is_local(fs):
        info = fs.info(path)
        if info.get("type") not in ("file", None):
            found = "a directory" if info.get("type") == "directory" else f"of type {info.get('type')!r}"
            raise refused(where, found, what, error)
        size = int(info.get("size") or 0)
        end = min(size, start + length)
        return (fs.cat_file(path, start=start, end=end) if end > start else b""), size
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        if e.errno in (errno.ENXIO, errno.EOPNOTSUPP):
            raise refused(where, kind(os.stat(path).st_mode), what, error) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise refused(where, kind(st.st_mode), what, error)
        os.set_blocking(fd, True)
        length = max(0, min(length, st.st_size - start))
        parts, total = [], 0
        while total < length:
            chunk = os.pread(fd, min(_CHUNK, length - total), start + total)
            if not chunk:
                break
            parts.append(chunk)
            total += len(chunk)
        return b"".join(parts), st.st_size
    finally:
        os.close(fd)
