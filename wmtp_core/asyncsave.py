"""Asynchronous saving: stage the state in one short pause, write it in the background.

At most one save is in flight. A second one first waits for it (the wait is recorded), and a
save that failed raises :class:`~wmtp_core.errors.SaveError` at the next save or at the end:
a failure always surfaces.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import time
from typing import Any, Callable

import attrs

from wmtp_core.errors import SaveError
from wmtp_core.tensors import StagingBuffers

log = logging.getLogger(__name__)


@attrs.frozen
class AsyncStats:
    step: int
    staged_s: float
    """How long training paused to stage the state."""
    waited_s: float
    """How long it waited for the previous save still in flight."""


class BackgroundSaver:
    """One writer thread, one save in flight, staging buffers reused between saves."""

    def __init__(self) -> None:
        self._writer = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="wmtp-async-save")
        self._inflight: tuple[int, cf.Future] | None = None
        self._buffers = StagingBuffers()
        self.stats: list[AsyncStats] = []

    def drain(self) -> None:
        """Wait for the save in flight, if any; raise :class:`SaveError` if it failed."""
        if self._inflight is None:
            return
        step, future = self._inflight
        self._inflight = None
        try:
            future.result()
        except SaveError as e:  # already names the step, the operation and the error
            raise SaveError(f"the background save of step {step} failed: {e}") from e
        except Exception as e:
            raise SaveError(f"the background save of step {step} failed, nothing of it was "
                            f"committed: {type(e).__name__}: {e}") from e

    def submit(self, step: int, parts: dict[str, Any], write: Callable[[dict[str, Any]], Any]) -> cf.Future:
        """Stage ``parts`` (training pauses only for this copy), then run ``write(staged)`` in
        the background."""
        t0 = time.perf_counter()
        self.drain()
        waited = time.perf_counter() - t0
        staged = self._buffers.copy(parts)
        self.stats.append(AsyncStats(step=step, staged_s=time.perf_counter() - t0 - waited, waited_s=waited))
        if waited > 0.01:
            log.info("async save of step %d waited %.2f s for the previous save", step, waited)
        future = self._writer.submit(write, staged)
        self._inflight = (step, future)
        return future

    def close(self) -> None:
        try:
            self.drain()
        finally:
            self._writer.shutdown(wait=True)
