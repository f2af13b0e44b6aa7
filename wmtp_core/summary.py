"""How a run ended and what it did: the values a run session leaves for the face to print
(:mod:`wmtp_core.run`) once the run is over."""

from __future__ import annotations

from typing import Any, Mapping

import attrs

from wmtp_core.events import Receipt, RunStatus
from wmtp_core.exits import EXIT_FAILED, EXIT_OK, EXIT_PREEMPTED
from wmtp_core.roles import Role


@attrs.frozen
class Ending:
    """How a run ended: its status (for observers), why, and the exit status."""

    status: RunStatus = RunStatus.FAILED
    reason: str = ""
    code: int = EXIT_FAILED

    @classmethod
    def of(cls, outcome: Any) -> Ending:
        """What the training loop's outcome means: a diverged run fails (its state is never
        committed as "latest"), a preempted one is resumable, every other one finished."""
        status = RunStatus(outcome.status)
        code = {RunStatus.FAILED: EXIT_FAILED, RunStatus.PREEMPTED: EXIT_PREEMPTED}.get(status, EXIT_OK)
        return cls(status, outcome.reason, code)

    @classmethod
    def failed(cls, reason: str, code: int = EXIT_FAILED) -> Ending:
        return cls(RunStatus.FAILED, reason, code)


@attrs.frozen
class Summary:
    """What a run did, for the face to print once it ended (``wmtp_core.run``)."""

    run: str
    ending: Ending
    step: int
    elapsed: float
    receipts: tuple[Receipt, ...]
    deleted: tuple[Receipt, ...]
    locations: Mapping[Role, str]
    losses: tuple[float, float] | None
    """The first and last loss, when the run trained a step."""
    async_stats: tuple[Any, ...] = ()
    timings: Mapping[str, float] = attrs.field(factory=dict)
    resumed_from: str | None = None
    """The checkpoint the run resumed from (``None``: it started fresh)."""

    @property
    def last_resume(self) -> str | None:
        """The URI of the last resume checkpoint this run committed."""
        return next((r.uri for r in reversed(self.receipts) if r.role is Role.RESUME), None)
