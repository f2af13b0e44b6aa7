"""Saving on preemption: the signals a scheduler sends before it takes the machine back.

While a run trains, each signal named in ``paths.checkpoints.save_on_signal`` (SIGTERM and
SIGUSR1 by default) only asks it to stop: the step in progress finishes, every rank agrees on
that step, its resume state is committed through the bound resume sink, and the process exits
with :data:`EXIT_PREEMPTED`. A second signal while that save runs changes nothing (the save is
not cut short), except SIGINT when it is in the list: a second Ctrl-C stops at once, and the
commit protocol leaves the interrupted save uncommitted.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

from wmtp_core.exits import EXIT_PREEMPTED

log = logging.getLogger("wmtp")


class Preemption:
    """Installs the handlers for the duration of a ``with`` block (main thread only) and says
    which signal asked the run to stop (:meth:`requested`)."""

    def __init__(self, names: list[str], say: Any = None) -> None:
        self.signals = [getattr(signal, n) for n in names]
        self.say = say or (lambda text: None)
        self.received: str | None = None
        self._saved: dict[int, Any] = {}

    def requested(self) -> str | None:
        return self.received

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = name
            self.say(f"{name} received: finishing this step and saving it, then exiting "
                     f"(status {EXIT_PREEMPTED}; continue with --resume latest)")
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt
        else:
            self.say(f"{name} received again: the save in progress goes on")

    def __enter__(self) -> Preemption:
        if threading.current_thread() is not threading.main_thread():
            log.debug("save_on_signal: not the main thread, no signal handlers installed")
            return self
        for sig in self.signals:
            self._saved[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self._saved.items():
            signal.signal(sig, previous)
        self._saved.clear()
