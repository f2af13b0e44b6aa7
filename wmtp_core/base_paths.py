"""Where a file-like sink may keep checkpoints: checked before anything is written, under
``--dry-run`` too, without creating anything.

A base path on local disk must be a directory of a regular filesystem, or a path that can be
created as one: what exists of it must be a directory (following links), and it must not lie
under ``/proc``, ``/sys`` or ``/dev`` (``/dev/shm``, a tmpfs, is accepted). An ``s3://`` base path
must name a bucket. Other protocols are left to their sink.
"""

from __future__ import annotations

import os
import re
import stat

from fsspec.core import split_protocol

from wmtp_core.bounded import kind
from wmtp_core.errors import BindingError

SPECIAL = ("/proc", "/sys", "/dev")
"""Pseudo-filesystems of the kernel: never a place for checkpoints."""
SPECIAL_OK = ("/dev/shm",)
"""Directories under :data:`SPECIAL` that are regular (tmpfs) filesystems."""
LOCAL = ("file", "local")
S3 = ("s3", "s3a")
_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
"""A bucket name: today's rules (3 to 63 lowercase letters, digits, dots and hyphens) and the
older ones some stores still serve (uppercase, underscores, up to 255 characters)."""

ACCEPTED_LOCAL = ("accepted: a directory on a regular filesystem, or a path where one can be created "
                  "(e.g. file://./checkpoints)")
ACCEPTED_S3 = "accepted: s3://BUCKET or s3://BUCKET/PREFIX"


def check_base_path(url: str, where: str) -> None:
    """Raise :class:`BindingError` when ``url`` cannot hold checkpoints: one line naming the
    path (``where``: what it is, e.g. ``"c.yaml: paths.checkpoints.base_path: the resume base
    path"``), what it is and what is accepted."""
    protocol, rest = split_protocol(url)
    protocol = protocol or "file"
    if protocol in LOCAL:
        problem, accepted = local_problem(_local_path(url)), ACCEPTED_LOCAL
    elif protocol in S3:
        bucket = rest.split("/", 1)[0]
        accepted = ACCEPTED_S3
        problem = None if _BUCKET.fullmatch(bucket) else (
            "names no bucket" if not bucket else f"names the bucket {bucket!r}, which is not a bucket name")
    else:
        return
    if problem:
        raise BindingError(f"{where} {url!r} {problem}; {accepted}")


def _local_path(url: str) -> str:
    from fsspec.implementations.local import LocalFileSystem

    return LocalFileSystem._strip_protocol(url)  # absolute, as the sink will use it


def local_problem(path: str) -> str | None:
    """Why the local ``path`` cannot be a base path, in words (``None``: it can)."""
    real = os.path.realpath(path)
    for top in SPECIAL:
        if (real == top or real.startswith(top + "/")) and not any(
                real == ok or real.startswith(ok + "/") for ok in SPECIAL_OK):
            return f"lies under {top}, a filesystem of the kernel" + (f" (it resolves to {real})" if real != path else "")
    existing = path
    while not os.path.lexists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    try:
        mode = os.stat(existing).st_mode
    except OSError as e:  # a loop of links, a folder this user cannot search
        return f"cannot be looked at ({e.strerror or type(e).__name__}: {existing})"
    if stat.S_ISDIR(mode):
        return None
    found = "a regular file" if stat.S_ISREG(mode) else kind(mode)
    if existing == path:
        return f"is {found}, not a directory"
    return f"cannot be created: {existing} is {found}, not a directory"
