"""One writer per run: a lease on the run's directory, renewed by a heartbeat.

A run that writes checkpoints holds ``<base>/<run>/.wmtp-lease`` on its resume storage (local
disk or S3, through fsspec like every other byte) for as long as it writes: a small JSON object
naming the host, the process, when it started and its last heartbeat. A second process that
starts or resumes the same run while that lease is live is refused at start, with a message
naming the holder, before it trains a step.

A lease is live while its heartbeat is younger than :data:`TIMEOUT_S` (the holder renews it
every :data:`HEARTBEAT_S`). An older one is taken over with a warning: its holder is gone, or
cannot reach the storage and will find out at its next save. Where the holder's process can be
seen (same host, boot and PID namespace) a lease whose process no longer runs is taken over at
once (a crashed or killed run is resumed without waiting). A lease that cannot be believed is
stale, and taken over with a warning saying why (:mod:`wmtp_core.lease_holder`). Hosts compare
heartbeats by their clocks: keep them in sync (NTP) to well within the timeout.

Taking a lease is atomic: it goes through the store's conditional writes
(:mod:`wmtp_core.conditional`: create where there is none, replace only the version read before).
On local disk every change happens under an exclusive ``flock`` on the run directory; on S3 the
``s3`` plugin's store writes conditionally (``If-None-Match: *`` to create one, ``If-Match`` on
the ETag to renew or take over a stale one). A holder whose lease was taken over learns it at its
next heartbeat and stops at its next save with :class:`LeaseLostError`; it never overwrites the
new holder.
"""

from __future__ import annotations

import logging
import posixpath
import threading
import time
import uuid
from typing import Any, Callable

import attrs

from wmtp_core.conditional import NotAFileError
from wmtp_core.errors import CheckpointError
from wmtp_core.lease_holder import Holder, Unbelievable


LEASE_FILE = ".wmtp-lease"
HEARTBEAT_S = 10.0
"""How often the holder renews its lease."""
TIMEOUT_S = 60.0
"""A lease whose last heartbeat is older than this is stale and taken over."""

log = logging.getLogger("wmtp")


class LeaseHeldError(CheckpointError):
    """Another live process holds the run's lease: this one is refused at start."""


class LeaseLostError(CheckpointError):
    """This process's lease was taken over by another one: it must stop writing."""


class Lease:
    """The lease of one run on one store (a :class:`~wmtp_core.commit.CheckpointStore`).

    ``acquire()`` takes it or raises :class:`LeaseHeldError`; ``start()`` begins the heartbeat;
    ``check()`` raises :class:`LeaseLostError` once another process took it over; ``release()``
    stops the heartbeat and removes the lease if it is still this process's.
    """

    def __init__(self, store: Any, run: str, *, timeout: float = TIMEOUT_S, heartbeat: float = HEARTBEAT_S,
                 warn: Callable[[str], None] = log.warning) -> None:
        self.store = store
        self.fs = store.fs
        self.run = run
        self.path = posixpath.join(store.run_dir(run), LEASE_FILE)
        self.uri = store.uri(self.path)
        self.timeout = timeout
        self.interval = heartbeat
        self.warn = warn
        self.me = Holder.me(uuid.uuid4().hex)
        self.doubt = ""
        """Why the lease last read could not be believed (empty when it could)."""
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- taking and giving back ----------------------------------------------------------
    def acquire(self) -> Holder | None:
        """Take the lease. Returns the previous holder when a stale lease was taken over (after
        warning), None when there was none. Raises :class:`LeaseHeldError` naming a live holder."""
        for _ in range(5):  # another process may be doing the same: look again after a race
            if self._create():
                return None
            current, tag = self._read()
            if current is None and tag is None:
                continue  # removed since: try to create it again
            if current is not None and current.token == self.me.token:
                return None
            why = current.stale(self.timeout) if current is not None else \
                f"a lease that cannot be believed is stale: {self.doubt}"
            if why is None:
                raise LeaseHeldError(
                    f"run {self.run!r} is being written by another process ({current.describe()}; "
                    f"lease {self.uri}). Only one process may write a run: wait for it to end or stop "
                    f"it, or choose another --run-name. A lease whose heartbeat is older than "
                    f"{self.timeout:.0f} s is taken over.")
            if self._take_over(tag):
                self.warn(f"taking over the lease of run {self.run!r} at {self.uri}: {why}")
                return current
        raise LeaseHeldError(f"run {self.run!r}: could not take its lease at {self.uri}: other "
                             "processes keep taking it at the same time")

    def start(self) -> Lease:
        """Renew the lease every ``heartbeat`` seconds until :meth:`release`."""
        self._thread = threading.Thread(target=self._beat, name="wmtp-lease", daemon=True)
        self._thread.start()
        return self

    def check(self) -> None:
        """Raise :class:`LeaseLostError` if another process took this run's lease over. Reads
        the lease (one small read): called before each save, it does not wait for a heartbeat.
        A lease file that vanished is written again; storage that cannot be read now is left to
        the heartbeat."""
        if not self._lost:
            try:
                current, _ = self._read()
                if current is None and not self._create():
                    current, _ = self._read()
                if current is not None and current.token != self.me.token:
                    self._lost = (f"run {self.run!r}: another process took over its lease "
                                  f"({current.describe()}; {self.uri}); this process stops writing")
            except Exception as e:
                log.warning("could not read the lease %s: %s: %s", self.uri, type(e).__name__, e)
        if self._lost:
            raise LeaseLostError(self._lost)

    def release(self) -> None:
        """Stop the heartbeat; remove the lease if it is still this process's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval + 30)
        if self._lost:
            return
        try:
            self._remove()
        except Exception as e:  # storage unreachable at the very end: the lease goes stale
            log.warning("could not remove the lease %s: %s: %s", self.uri, type(e).__name__, e)

    def __enter__(self) -> Lease:
        self.acquire()
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    # -- the heartbeat --------------------------------------------------------------------
    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.renew()
            except LeaseLostError as e:
                self._lost = str(e)
                self.warn(str(e))
                return
            except Exception as e:  # storage briefly unreachable: the next beat tries again
                log.warning("lease heartbeat of run %r failed: %s: %s", self.run, type(e).__name__, e)

    def renew(self) -> None:
        """Write a fresh heartbeat, only over this process's own lease."""
        current, tag = self._read()
        if current is None or current.token != self.me.token:
            who = current.describe() if current is not None else "its lease file is gone or unreadable"
            raise LeaseLostError(f"run {self.run!r}: another process took over its lease ({who}; "
                                 f"{self.uri}); this process stops writing")
        self.me = attrs.evolve(self.me, heartbeat=time.time())
        if not self._replace(tag) and not self._landed():
            raise LeaseLostError(f"run {self.run!r}: another process took over its lease at {self.uri} "
                                 "during a heartbeat; this process stops writing")

    def _landed(self) -> bool:
        """True when the lease holds exactly this process's last write: a conditional write whose
        response was lost and whose retry then failed its own condition did land."""
        current, _ = self._read()
        return current is not None and current.token == self.me.token and current.heartbeat == self.me.heartbeat

    # -- atomic operations: the store's conditional writes ------------------------------
    def _read(self) -> tuple[Holder | None, str | None]:
        """The current holder (None if it cannot be believed: :attr:`doubt` says why) and a
        version tag (None if there is no lease): the store's
        (:meth:`~wmtp_core.conditional.ConditionalWrites.read_tagged`)."""
        try:
            got = self.store.read_tagged(self.path)
        except NotAFileError as e:
            self.doubt = f"it is {e.kind}, not a file (moved aside to {posixpath.basename(e.aside)})"
            return None, e.tag
        if got is None:
            return None, None
        raw, tag = got
        try:
            return Holder.believe(raw), tag
        except Unbelievable as e:
            self.doubt = str(e)
            return None, tag

    def _create(self) -> bool:
        """Write this process's lease where there is none; False if there is one."""
        self.me = attrs.evolve(self.me, heartbeat=time.time())
        return self.store.put_if_absent(self.path, self.me.to_bytes())

    def _replace(self, tag: str | None) -> bool:
        """Write this process's lease over the version ``tag`` read just before; False if it
        changed meanwhile."""
        return self.store.put_if_unchanged(self.path, self.me.to_bytes(), tag)

    def _take_over(self, tag: str | None) -> bool:
        """Replace a stale lease (version ``tag``); False when another process got there first."""
        return self._replace(tag)

    def _remove(self) -> None:
        """Remove the lease if it is still this process's (with the directories made for it, when
        they hold nothing else: a run that stopped before its first save leaves no trace)."""
        current, tag = self._read()
        if current is None or current.token == self.me.token:
            self.store.remove_if_unchanged(self.path, tag)


def live_writer(store: Any, run: str, timeout: float = TIMEOUT_S) -> str | None:
    """Who is writing ``run`` now (its lease is live), described in words; None if nobody is."""
    try:
        holder, _ = Lease(store, run, timeout=timeout)._read()
    except Exception:  # unreadable lease storage: nobody known to be writing
        return None
    if holder is None or holder.stale(timeout) is not None:
        return None
    return holder.describe()
