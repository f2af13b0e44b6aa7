"""The recipe's ``eval:`` section: pass@k on code tasks while a run trains and of its final model
(docs/evaluation.md). The origin's ``protocol``, ``sampling`` and ``metrics`` keys are read."""

from __future__ import annotations

from typing import Any

import attrs

from wmtp_core.validators import check, count_or_null, int_range, is_int, is_number, one_of

_num = is_number
_int = is_int


def _every_ok(v: Any) -> bool:
    return v in ("checkpoint", "final") or (_int(v) and 1 <= v <= 2**31)


@attrs.frozen
class EvalSampling:
    """How each problem's completions are drawn (the origin's ``eval.sampling``)."""

    temperature: float = attrs.field(default=0.0, validator=check(lambda v: _num(v) and 0 <= v <= 100,
                                                                  "accepted: a number from 0 (greedy) to 100"))
    top_p: float = attrs.field(default=1.0, validator=check(lambda v: _num(v) and 0 < v <= 1,
                                                            "accepted: a number above 0, at most 1"))
    n: int = attrs.field(default=1, validator=int_range(1, 10_000))
    """Completions per problem (pass@k needs n >= k)."""
    max_new_tokens: int = attrs.field(default=512, validator=int_range(1, 1 << 20))
    seed: int = attrs.field(default=0, validator=int_range(0, 2**31))


ORIGIN_METRICS = {"mbpp_exact": "mbpp", "humaneval_exact": "humaneval", "contest_exact": "codecontests"}
"""The origin's ``eval.metrics`` names and the tasks they become (pass@k on each)."""


@attrs.frozen
class EvalSection:
    """pass@k of the model on code tasks, in a background process while the run trains
    (docs/evaluation.md). The origin's ``protocol``, ``sampling`` and ``metrics`` keys are read."""

    every: str | int = attrs.field(default="final", validator=check(
        _every_ok, "accepted: checkpoint (each committed resume checkpoint), final (the final model only), "
                   "or a number of steps (the checkpoints of those steps)"))
    """Which committed checkpoints are evaluated; the final model always is."""
    tasks: list[str] = attrs.field(factory=list, validator=check(
        lambda v: isinstance(v, list) and all(isinstance(t, str) for t in v),
        "accepted: a list such as [mbpp, humaneval] (mbpp[:split], humaneval)"))
    """Tasks: ``mbpp[:split]``, ``humaneval``. Empty: from ``metrics``, else ``[mbpp]``."""
    sampling: EvalSampling = attrs.field(factory=EvalSampling)
    k: list[int] = attrs.field(factory=lambda: [1], validator=check(
        lambda v: isinstance(v, list) and v and all(_int(x) and x >= 1 for x in v),
        "accepted: a list of integers >= 1, such as [1, 10]"))
    limit: int | None = attrs.field(default=None, validator=count_or_null)
    """The first N problems of each task (null: all)."""
    timeout: float = attrs.field(default=3.0, validator=check(lambda v: _num(v) and 0 < v <= 600,
                                                              "accepted: seconds, above 0, at most 600"))
    """Seconds one program may run."""
    workers: int = attrs.field(default=1, validator=int_range(1, 256))
    """Programs run at once (the trainer keeps the other cores)."""
    speculative: bool = False
    """Greedy decoding drafted by the extra heads (same completions, faster); greedy only."""
    allow_code_execution: bool = False
    """Required: the evaluation runs the programs the model writes, which nobody reviewed."""
    protocol: str = attrs.field(default="meta-mtp", validator=one_of("meta-mtp", "pass@k"))
    """The origin's name for pass@k with the unbiased estimator; the only protocol."""
    metrics: list[str] = attrs.field(factory=list, validator=check(
        lambda v: isinstance(v, list) and all(m in ORIGIN_METRICS for m in v),
        f"accepted: a list of {', '.join(ORIGIN_METRICS)} (each becomes pass@k on its task)"))

    def task_list(self) -> list[str]:
        if self.tasks:
            return list(self.tasks)
        return [ORIGIN_METRICS[m] for m in self.metrics] or ["mbpp"]
