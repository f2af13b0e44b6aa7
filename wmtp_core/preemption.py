"""Signals, from the command's start until the process exits: saving on preemption, Ctrl-C, and
whatever arrives while the run ends.

Each signal named in ``paths.checkpoints.save_on_signal`` (SIGTERM and SIGUSR1 by default) only
asks the run to stop, whenever it arrives before training ended: while the run starts (the
plan, the model, the lease, the resume's verification, the MLflow run), it stops before its
first step; while it trains, the step in progress finishes, every rank agrees on that step, and
its resume state is committed. Either way the process exits with :data:`EXIT_PREEMPTED`. Once
training ended (the last step's save, the final model's store, the end of the run) nothing is
cut short: the run ends as it would have, and says the signal came late. A second signal changes
nothing, except SIGINT when it is in the list: a second Ctrl-C stops at once, and the commit
protocol leaves the interrupted save uncommitted.

SIGINT outside the list is Ctrl-C: it raises :class:`KeyboardInterrupt` at once (exit status
130). From then on, and once the run ends (its router closed, its lease released), every signal
is said and ignored: the clean-up it interrupted would otherwise leave the lease, an MLflow run
or an unfinished registered model behind, or turn the exit status into the signal's.

Before the configuration is read, the default list applies; a signal that arrived then and that
the configuration does not list is delivered again once it is known, with its usual effect.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any, Callable

from wmtp_core.exits import EXIT_PREEMPTED

log = logging.getLogger("wmtp")

DEFAULT = ("SIGTERM", "SIGUSR1")
"""``paths.checkpoints.save_on_signal`` when the configuration does not say."""

STARTING, TRAINING, FINISHING, ENDING = "starting", "training", "finishing", "ending"
"""The phases a signal can land in (:attr:`Preemption.phase`)."""


class Preemption:
    """The process's signal handlers while a run lives (main thread only): :meth:`install` them,
    :meth:`configure` the list once the configuration is read, move the :attr:`phase` on as the
    run goes, :meth:`uninstall` (or let the process exit with them)."""

    def __init__(self, names: tuple[str, ...] | list[str] = DEFAULT, say: Callable[[str], None] | None = None) -> None:
        self.names = set(names)
        self.say = say or (lambda text: None)
        """How a message reaches the user (:func:`plain_line` for the console)."""
        self.phase = STARTING
        self.received: str | None = None
        """The first listed signal that arrived before training ended: the run stops for it."""
        self.late: str | None = None
        """The first listed signal that arrived after training ended: it changes nothing."""
        self.interrupted = False
        """Ctrl-C raised :class:`KeyboardInterrupt`: from then on every signal is ignored."""
        self._saved: dict[int, Any] = {}
        self._installed = False

    # -- what the run asks -------------------------------------------------------------------
    def requested(self) -> str | None:
        return self.received

    def looked(self) -> str | None:
        """:meth:`requested`, by the training loop: from its first look on, a signal is taken in
        at the end of the step in progress."""
        self.phase = TRAINING if self.phase == STARTING else self.phase
        return self.received

    def finishing(self) -> None:
        """Training ended: from now on a signal cuts nothing short."""
        if self.phase in (STARTING, TRAINING):
            self.phase = FINISHING

    def ending(self) -> None:
        """The run is ending (its router closes, its lease is released): every signal is ignored."""
        self.phase = ENDING

    # -- the handler ---------------------------------------------------------------------------
    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.phase == ENDING or self.interrupted:
            self._tell(f"{name} received while the run ends: ignored; it ends as it was ending")
            return
        if name not in self.names:  # SIGINT outside the list: Ctrl-C
            self.interrupted = True
            raise KeyboardInterrupt
        if self.received is None and self.late is None:
            self._first(name)
        elif signum == signal.SIGINT:
            self.interrupted = True
            raise KeyboardInterrupt
        elif self.phase == STARTING:
            self._tell(f"{name} received again: the run's start goes on; it stops before its first step")
        else:
            self._tell(f"{name} received again: the save in progress goes on")

    def _tell(self, text: str) -> None:
        """Say ``text`` from the handler. The handler runs between any two steps of the main
        thread, perhaps inside a print or an import a first signal's message began: a message
        that cannot be written then is dropped, never turned into the run's exception."""
        try:
            self.say(text)
        except Exception:  # noqa: BLE001 - see above
            log.debug("could not say %r from the signal handler", text, exc_info=True)

    def _first(self, name: str) -> None:
        then = f"then exiting (status {EXIT_PREEMPTED}; continue with --resume latest)"
        if self.phase == STARTING:
            self.received = name
            self._tell(f"{name} received while the run starts: it stops before its first step, {then}")
        elif self.phase == TRAINING:
            self.received = name
            self._tell(f"{name} received: finishing this step and saving it, {then}")
        else:
            self.late = name
            self._tell(f"{name} received after the last step: nothing is cut short; the run ends as it "
                     "would have (its last save and its final model are finished)")

    # -- installing ----------------------------------------------------------------------------
    def handled(self) -> set[int]:
        """The signals this object answers: the list, and SIGINT."""
        return {getattr(signal, n) for n in self.names} | {signal.SIGINT}

    def install(self) -> Preemption:
        if threading.current_thread() is not threading.main_thread():
            log.debug("save_on_signal: not the main thread, no signal handlers installed")
            return self
        for sig in self.handled():
            if sig not in self._saved:
                self._saved[sig] = signal.signal(sig, self._handle)
        self._installed = True
        return self

    def configure(self, names: list[str] | tuple[str, ...]) -> None:
        """The list the configuration gives: handlers for new names, the previous handler back
        for names it leaves out, and a signal of those that arrived already delivered again."""
        dropped = self.names - set(names) - {"SIGINT"}
        self.names = set(names)
        again = self.received if self.received in dropped else None
        if again:
            self.received = None
        for name in dropped:
            sig = getattr(signal, name)
            if sig in self._saved:
                signal.signal(sig, self._saved.pop(sig))
        if self._installed:
            self.install()
        if again:
            os.kill(os.getpid(), getattr(signal, again))

    def uninstall(self) -> None:
        for sig, previous in self._saved.items():
            signal.signal(sig, previous)
        self._saved.clear()
        self._installed = False

    def __enter__(self) -> Preemption:
        return self.install()

    def __exit__(self, *exc: Any) -> None:
        self.uninstall()


def plain_line(fallback: Callable[[str], None]) -> Callable[[str], None]:
    """A ``say`` for the handler: one line written straight to the standard error's descriptor
    (``os.write``: no buffer, no console, no lazy import that a second signal could re-enter),
    or through ``fallback`` (the console) when standard error has no descriptor (a test's
    capture). The messages name signals only: nothing in them needs redacting."""

    def say(text: str) -> None:
        import sys

        try:
            fd = sys.stderr.fileno()
        except (AttributeError, OSError, ValueError):
            fallback(text)
            return
        try:  # what the console wrote before goes first, unless the handler interrupted that write
            sys.stderr.flush()
        except (OSError, RuntimeError, ValueError):
            pass
        data = (text + "\n").encode()
        while data:
            data = data[os.write(fd, data):]

    return say
