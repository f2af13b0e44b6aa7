"""Training progress on the console: a live bar on a terminal, plain lines everywhere else.

With stderr redirected to a file (CI, a cluster job, ``nohup``) a live bar would print nothing
until the end. There, one plain line is printed at a steady rhythm instead: every tenth of the
run or every 30 seconds, whichever comes first, and at the last step. A resumed run keeps the
rhythm of the whole run.
"""

from __future__ import annotations

import time
from typing import Mapping

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

LINE_EVERY_S = 30.0
"""Seconds between two plain progress lines at most."""


def _info(metrics: Mapping[str, float]) -> str:
    """The training objective (the algorithm's weighted loss, scaled by ``loss.lambda``) and the
    held-out cross-entropy (every head weighing 1, unscaled) under names that do not invite
    comparing them: they measure different things."""
    info = f"objective {metrics['loss']:.3f}"
    if "eval_loss" in metrics:
        info += f", held-out CE {metrics['eval_loss']:.3f}"
    return info


class LiveBar:
    """The rich progress bar, for a terminal."""

    def __init__(self, console: Console, name: str, total: int, start: int) -> None:
        self._progress = Progress(TextColumn("{task.description}", style="bold", markup=False), BarColumn(),
                                  MofNCompleteColumn(), TextColumn("{task.fields[info]}", markup=False),
                                  TimeElapsedColumn(), console=console, transient=False)
        self._task = self._progress.add_task(name, total=total, completed=start, info="")

    def __enter__(self) -> LiveBar:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)

    def update(self, step: int, metrics: Mapping[str, float]) -> None:
        self._progress.update(self._task, completed=step, info=_info(metrics))


class PlainLines:
    """``<run> step 40/100 objective 3.210, held-out CE 3.400, 2.4 steps/s, 25 s left``, at a
    steady rhythm: every tenth of the whole run (a resumed part keeps the run's rhythm, on the
    same multiples), every ``every_s`` seconds, at the first step of this part and at the last."""

    def __init__(self, console: Console, name: str, total: int, start: int, *,
                 every_s: float = LINE_EVERY_S, clock=time.monotonic) -> None:
        self.console, self.name, self.total, self.start = console, name, total, start
        self.every_steps = max(1, total // 10)
        self.every_s = every_s
        self.clock = clock
        self.t0 = self.last_t = clock()
        self.last_step = start

    def __enter__(self) -> PlainLines:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def update(self, step: int, metrics: Mapping[str, float]) -> None:
        now = self.clock()
        due = (step // self.every_steps > self.last_step // self.every_steps or now - self.last_t >= self.every_s
               or step >= self.total or step == self.start + 1)
        if not due:
            return
        rate = (step - self.start) / max(now - self.t0, 1e-9)
        left = (self.total - step) / rate if rate > 0 else float("nan")
        self.console.print(f"{self.name} step {step}/{self.total} {_info(metrics)}, {rate:.2f} steps/s, "
                           f"{left:.0f} s left", highlight=False)
        self.last_t, self.last_step = now, step


def for_console(console: Console, name: str, total: int, start: int):
    """The bar on a terminal, plain lines otherwise."""
    cls = LiveBar if console.is_terminal else PlainLines
    return cls(console, name, total, start)
