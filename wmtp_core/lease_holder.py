"""Who holds a run's lease (:mod:`wmtp_core.lease`), whether to believe what its lease file says,
and whether the holder is still alive.

A lease file is written by other processes, perhaps other hosts and other versions, and anyone
with write access to the storage can change it: it is read as untrusted input. A lease that
cannot be believed (not JSON, a field missing or of the wrong type, a PID no system gives, a
heartbeat that is not a time or lies in the future beyond what clocks may differ by, printing
characters that would break a line) is stale: :meth:`Holder.believe` says why, and the lease is
taken over with a warning naming it.

Liveness: a lease is live while its heartbeat is younger than the timeout. Besides, a process
can see that the holder is gone only where it can see the holder's process: on the same host,
in the same boot and in the same PID namespace (two containers on one node share the hostname
and the boot, not the PID namespace), so the lease records the boot id and the PID namespace
with the PID and its start time. There a PID that does not run, or runs a process started at
another time (a reused PID), means the holder is gone. Anywhere else, and for a lease that does
not record them, only the heartbeat's age tells.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import socket
import time

import attrs

SKEW_S = 10.0
"""How far in the future a heartbeat may lie (clocks of two hosts differ by this much at most):
a lease whose heartbeat lies further ahead cannot be believed."""
PID_MAX = 4194304
"""The largest PID Linux gives (``PID_MAX_LIMIT`` on 64-bit)."""
TEXT_MAX = 256
"""The longest host, start time or token a lease may name."""


class Unbelievable(ValueError):
    """A lease file that cannot be believed; its message says why, in words."""


def _proc_start(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks since boot (field 22 of
    ``/proc/<pid>/stat``), to tell a reused PID from the process that wrote the lease; None
    where it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _boot_id() -> str | None:
    """This boot of this machine's kernel (Linux), None where it cannot be read."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _pid_ns() -> int | None:
    """The inode of this process's PID namespace (Linux), None where it cannot be read."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


_TYPES = {"host": str, "pid": int, "started_at": str, "heartbeat": (int, float), "token": str}
_OPTIONAL = {"proc_start": int, "boot_id": str, "pid_ns": int}
_WORDS = {str: "a string", int: "a whole number", (int, float): "a number"}


def _fields(raw: bytes) -> dict:
    """The lease's fields, each of the type it must have; raises :class:`Unbelievable`."""
    try:
        d = json.loads(raw)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise Unbelievable("it is not JSON") from None
    if not isinstance(d, dict):
        raise Unbelievable(f"it is not a JSON object but {type(d).__name__} {_show(d)}")
    out = {}
    for key, kind in {**_TYPES, **_OPTIONAL}.items():
        value = d.get(key)
        if value is None and key in _OPTIONAL:
            out[key] = None
        elif value is None:
            raise Unbelievable(f"it has no {key!r}")
        elif not isinstance(value, kind) or isinstance(value, bool):
            raise Unbelievable(f"its {key!r} is {_show(value)}, not {_WORDS[kind]}")
        elif isinstance(value, str) and (len(value) > TEXT_MAX or not value.isprintable()):
            raise Unbelievable(f"its {key!r} {_show(value)} is not a printable line of at most {TEXT_MAX} characters")
        else:
            out[key] = value
    return out


@attrs.frozen
class Holder:
    """Who holds a lease, as its lease file says."""

    host: str
    pid: int
    started_at: str
    heartbeat: float
    """POSIX time of the last heartbeat, by the holder's clock."""
    token: str
    proc_start: int | None = None
    boot_id: str | None = None
    pid_ns: int | None = None

    @classmethod
    def me(cls, token: str) -> Holder:
        """This process, as its lease names it."""
        return cls(host=socket.gethostname(), pid=os.getpid(),
                   started_at=dt.datetime.now(dt.timezone.utc).isoformat(), heartbeat=time.time(),
                   token=token, proc_start=_proc_start(os.getpid()), boot_id=_boot_id(), pid_ns=_pid_ns())

    @classmethod
    def believe(cls, raw: bytes, now: float | None = None) -> Holder:
        """The holder ``raw`` (a lease file's bytes) names; raises :class:`Unbelievable` saying
        why a lease cannot be believed."""
        d = _fields(raw)
        if not 1 <= d["pid"] <= PID_MAX:
            raise Unbelievable(f"its pid {_show(d['pid'])} is not a process id (1 to {PID_MAX})")
        try:
            heartbeat = float(d["heartbeat"])
        except OverflowError:
            heartbeat = math.inf
        if not math.isfinite(heartbeat):
            raise Unbelievable(f"its heartbeat {_show(d['heartbeat'])} is not a time")
        ahead = heartbeat - (time.time() if now is None else now)
        if ahead > SKEW_S:
            raise Unbelievable(f"its heartbeat is {ahead:.0f} s in the future (clocks may differ by "
                               f"{SKEW_S:.0f} s at most)")
        for key in ("proc_start", "pid_ns"):
            if d[key] is not None and not 0 <= d[key] < 2**64:
                raise Unbelievable(f"its {key!r} {_show(d[key])} is out of range")
        return cls(**{**d, "heartbeat": heartbeat})

    @classmethod
    def parse(cls, raw: bytes) -> Holder | None:
        """The holder ``raw`` names, None when it cannot be believed."""
        try:
            return cls.believe(raw)
        except Unbelievable:
            return None

    def to_bytes(self) -> bytes:
        d = attrs.asdict(self)
        d["heartbeat_at"] = dt.datetime.fromtimestamp(self.heartbeat, dt.timezone.utc).isoformat()
        return json.dumps(d, sort_keys=True).encode()

    def age(self, now: float | None = None) -> float:
        return (time.time() if now is None else now) - self.heartbeat

    def visible(self) -> bool:
        """True when this process can see the holder's process: same host, boot and PID
        namespace, as the lease records them."""
        return (self.host == socket.gethostname() and self.boot_id is not None and self.pid_ns is not None
                and (self.boot_id, self.pid_ns) == (_boot_id(), _pid_ns()))

    def gone(self) -> bool:
        """True when this process can see that the holder's process no longer runs: its PID
        does not run, or runs a process that started at another time (a reused PID)."""
        if not self.visible():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass  # someone else's process: alive
        except (OverflowError, ValueError):
            return False
        start = _proc_start(self.pid)
        return self.proc_start is not None and start is not None and start != self.proc_start

    def stale(self, timeout: float) -> str | None:
        """Why this lease is stale, in words; None while it is live."""
        if self.age() >= timeout:
            return f"its heartbeat is older than {timeout:.0f} s ({self.describe()})"
        if self.gone():
            return f"its process no longer runs ({self.describe()})"
        return None

    def describe(self) -> str:
        return (f"host {self.host}, pid {self.pid}, started {self.started_at[:19].replace('T', ' ')} UTC, "
                f"last heartbeat {max(self.age(), 0):.0f} s ago")
