"""The storage estimate shown before a run (``--dry-run``) and the report printed after it."""

from __future__ import annotations

import math
from typing import Iterable

import attrs
from rich.table import Table

from wmtp_core.bindings import Bindings
from wmtp_core.events import Receipt
from wmtp_core.roles import Role

TRAINER_STATE_BYTES = 16 << 10
"""RNG streams, data position, scheduler and counters: a few kilobytes per save."""


@attrs.frozen
class Estimate:
    params: int
    steps: int
    saves: int
    per_save: int
    """Bytes of one resume checkpoint: weights, AdamW moments, trainer state (fp32)."""
    retained: int
    """Resume bytes held at most at any time under the retention rule."""
    final: int
    """Bytes of the final model (weights only)."""

    @property
    def total(self) -> int:
        return self.retained + self.final

    @property
    def dual_writer(self) -> int:
        """What a trainer that also copied every save to the tracking store would hold."""
        return self.retained + self.saves * self.per_save + self.final


def estimate(params: int, steps: int, save_interval: int, keep_last: int, keep_every: int,
             save_final: bool) -> Estimate:
    regular = steps // save_interval if save_interval else 0
    saves = regular + (1 if not save_interval or steps % save_interval else 0)  # + the last step
    per_save = 3 * 4 * params + TRAINER_STATE_BYTES
    # the newest keep_last survive; of the older (all regular) saves, keep_every milestones do
    older = max(0, saves - keep_last)
    milestones = older // (keep_every // math.gcd(save_interval, keep_every)) if keep_every and save_interval else 0
    kept = min(keep_last, saves) + milestones
    return Estimate(params=params, steps=steps, saves=saves, per_save=per_save,
                    retained=kept * per_save, final=4 * params if save_final else 0)


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def bindings_lines(bindings: Bindings, descriptions: dict[str, str]) -> list[str]:
    """One line per binding: role, sink, what bound it, what the sink does."""
    lines = ["Role bindings (checked before the first step):"]
    for b in bindings.sinks:
        lines.append(f"  {b.role.value:<7} -> sink {b.sink:<16} bound by {b.origin}")
        if descriptions.get(b.sink):
            lines.append(f"  {'':<7}    {descriptions[b.sink]}")
    for p in bindings.policies:
        opts = ", ".join(f"{k}={v}" for k, v in p.options.items())
        lines.append(f"  {p.role.value:<7} -> policy {p.policy} ({opts}) bound by {p.origin}")
    return lines


def estimate_table(e: Estimate) -> Table:
    t = Table(title=f"Storage estimate ({e.params:,} parameters, {e.steps} steps, {e.saves} saves)",
              title_justify="left")
    t.add_column("")
    t.add_column("bytes", justify="right")
    t.add_row("resume: per save", human(e.per_save))
    t.add_row("resume: at most retained", human(e.retained))
    t.add_row("final model", human(e.final))
    t.add_row("total held by this run", human(e.total))
    t.add_row("a trainer that also copies every save to the tracking store",
              f"{human(e.dual_writer)} ({e.dual_writer / max(1, e.total):.1f}x)")
    return t


def summary_lines(receipts: Iterable[Receipt], deleted: Iterable[Receipt],
                  locations: dict[Role, str]) -> list[str]:
    """Where each role's bytes went, how many, and how long the saves took."""
    receipts, deleted = list(receipts), list(deleted)
    gone = {r.uri for r in deleted}
    lines = ["Where this run's bytes went:"]
    for role in Role:
        rs = [r for r in receipts if r.role is role]
        if not rs:
            lines.append(f"  {role.value:<7} nothing stored")
            continue
        kept = [r for r in rs if r.uri not in gone]
        secs = sum(r.seconds for r in rs)
        where = kept[-1].uri if role is Role.FINAL and kept else locations.get(role, rs[-1].uri)
        lines.append(
            f"  {role.value:<7} -> {rs[-1].sink}: {where}\n"
            f"  {'':<7}    {len(rs)} saved, {len(kept)} kept, {human(sum(r.nbytes for r in kept))} "
            f"kept; save time {secs:.2f} s ({secs / len(rs):.2f} s each)"
        )
    return lines
