"""Retention: keep the last N committed resume checkpoints, every M-th step forever, and the K
best by a metric their manifests record.

The policy only chooses; the router deletes, after the commit, off the training loop, and never
touches the newest committed checkpoint, the one this run resumed from, or another run's.
"""

from __future__ import annotations

from typing import Any, Iterable

import attrs

from wmtp_core import Manifest, PolicySpec, Role, hookimpl
from wmtp_core.manifest import best
from wmtp_core.validators import count, count_or_zero, shown


def _named(validator):
    """The shared validator, with the option's name and value in the message."""

    def check(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        try:
            validator(instance, attribute, value)
        except ValueError as e:
            raise ValueError(f"{attribute.name}: {shown(value)} is not accepted; {e}") from None

    return check


_positive = _named(count)
_non_negative = _named(count_or_zero)


@attrs.frozen
class KeepBest:
    k: int = attrs.field(validator=_positive)
    monitor: str = "eval_loss"
    mode: str = attrs.field(default="min", validator=attrs.validators.in_(("min", "max")))

    def best(self, committed: Iterable[Manifest]) -> list[Manifest]:
        """The ``k`` best checkpoints by the metric their manifests record, best first."""
        return best(committed, self.monitor, self.mode, self.k)


@attrs.frozen
class KeepLast:
    keep_last: int = attrs.field(validator=_positive)
    """How many of the newest committed checkpoints to keep."""
    keep_every: int = attrs.field(default=0, validator=_non_negative)
    """Also keep every checkpoint whose step is a multiple of this (0: none)."""
    keep_best: KeepBest | None = None
    """Also keep the ``k`` best by a recorded metric."""

    def select(self, committed: Iterable[Manifest]) -> list[int]:
        """Steps to delete: all but the newest ``keep_last``, sparing ``keep_every`` milestones
        and the ``keep_best`` ones."""
        committed = list(committed)
        steps = sorted({m.step for m in committed})
        doomed = steps[: max(0, len(steps) - self.keep_last)]
        if self.keep_every:
            doomed = [s for s in doomed if s % self.keep_every]
        if self.keep_best is not None:
            best = {m.step for m in self.keep_best.best(committed)}
            doomed = [s for s in doomed if s not in best]
        return doomed


def make_keep_last(options: dict) -> KeepLast:
    unknown = set(options) - {"keep_last", "keep_every", "keep_best"}
    if unknown:
        raise ValueError(f"keep_last policy: unknown option(s) {sorted(unknown)}; accepted: keep_last, "
                         "keep_every, keep_best")
    if "keep_last" not in options:
        raise ValueError("keep_last policy: option 'keep_last' is required (an integer >= 1)")
    best = options.get("keep_best")
    if best is not None:
        if not isinstance(best, dict) or set(best) - {"k", "monitor", "mode"} or "k" not in best:
            raise ValueError(f"keep_best: {best!r} is not accepted; accepted: a mapping with k (an integer "
                             ">= 1), monitor (a metric name) and mode (min or max)")
        best = KeepBest(**best)
    return KeepLast(keep_last=options["keep_last"], keep_every=options.get("keep_every", 0), keep_best=best)


@hookimpl
def wmtp_register_policies(register):
    register(PolicySpec(
        name="keep_last",
        roles={Role.RESUME},
        factory=make_keep_last,
        description="keep the newest N committed checkpoints (and optional keep_every milestones and "
                    "keep_best: the K best by a metric)",
    ))
