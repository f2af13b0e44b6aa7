"""The storage estimate shown before a run (``--dry-run``), the summary printed after it, and
the picture of the bytes a run held over its steps (``wmtp report --plot``, and the MLflow run's
storage picture). matplotlib is optional and imported only to draw."""

from __future__ import annotations

import json
import math
import re
from typing import Any, Iterable

import attrs
from rich.table import Table

from wmtp_core.bindings import Bindings
from wmtp_core.errors import UsageError
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
             save_final: bool, final_bytes_per_param: int = 4, keep_best: int = 0) -> Estimate:
    """``final_bytes_per_param``: 4 for fp32, 2 for ``storage.final.dtype`` bf16 or fp16;
    ``keep_best``: the K best kept besides (at most K more than the newest and the milestones)."""
    regular = steps // save_interval if save_interval else 0
    saves = regular + (1 if not save_interval or steps % save_interval else 0)  # + the last step
    per_save = 3 * 4 * params + TRAINER_STATE_BYTES
    # the newest keep_last survive; of the older (all regular) saves, keep_every milestones do
    older = max(0, saves - keep_last)
    milestones = older // (keep_every // math.gcd(save_interval, keep_every)) if keep_every and save_interval else 0
    kept = min(saves, min(keep_last, saves) + milestones + keep_best)
    return Estimate(params=params, steps=steps, saves=saves, per_save=per_save,
                    retained=kept * per_save, final=final_bytes_per_param * params if save_final else 0)


def human(n: float) -> str:
    if isinstance(n, int) and abs(n) >= 10**18:  # beyond a float's reach for the largest counts
        return f"{n / 10**12:.3g} TB" if n.bit_length() < 1000 else "more than 10^288 TB"
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


# -- the picture: bytes held over the steps ------------------------------------------------
DEFAULT_PRICE_PER_GB_MONTH = 0.023
"""USD per GB-month: Amazon S3 Standard, first 50 TB a month, us-east-1 (``--price-per-gb-month``
overrides it)."""
GB = 10**9
"""The GB of a price: decimal, like every size WMTP prints."""
PLOT_INSTALL_HINT = "pip install 'wmtp[plot]' (in a checkout: uv sync --extra plot)"
DUAL_WRITER = "a trainer that also copies every save to the tracking store"
PNG_SUMMARY_KEY = "wmtp-storage"
"""The PNG text chunk holding the picture's numbers (:func:`storage_summary`, as JSON)."""


@attrs.frozen
class Saved:
    """One checkpoint a run stored, and when retention removed it."""

    role: Role
    step: int
    """The step it was saved at (for a final model, the run's last step)."""
    nbytes: int
    """Its bytes, as its manifest or its sink's receipt counts them."""
    deleted_at: int | None = None
    """The step after whose save retention removed it; ``None``: still held."""
    inferred: bool = False
    """No longer held and known only from the save schedule: its size is the nearest kept one's."""
    copy: bool = False
    """A second copy of a save of the same step, held in another place (the ``tiered`` sink's
    fast tier): bytes held, not another save."""


@attrs.frozen
class StorageHistory:
    """What a run stored, step by step: enough to say what it held after each step."""

    run: str
    saves: tuple[Saved, ...] = attrs.field(converter=tuple)
    note: str = ""
    """How the history was obtained, when not from the run's own receipts."""

    def steps(self) -> list[int]:
        return sorted({0} | {s.step for s in self.saves}
                      | {s.deleted_at for s in self.saves if s.deleted_at is not None})

    def held(self, step: int, role: Role | None = None) -> int:
        """Bytes held after ``step``'s saves and the retention that followed them."""
        return sum(s.nbytes for s in self.saves if (role is None or s.role is role) and s.step <= step
                   and (s.deleted_at is None or s.deleted_at > step))

    def dual_writer(self, step: int) -> int:
        """What :data:`DUAL_WRITER` would hold: the same, plus a copy of every resume save so far
        (as :attr:`Estimate.dual_writer` counts it before a run)."""
        return self.held(step) + sum(s.nbytes for s in self.saves
                                     if s.role is Role.RESUME and not s.copy and s.step <= step)

    @property
    def last_step(self) -> int:
        return self.steps()[-1]

    @property
    def inferred(self) -> int:
        return sum(s.inferred for s in self.saves)


def history_from_receipts(run: str, receipts: Iterable[Receipt],
                          deleted: Iterable[tuple[Receipt, int]]) -> StorageHistory:
    """The history of a run from its own receipts: every commit, and every deletion with the
    newest step committed when it happened (what the tracking observer sees, in order)."""
    gone = {r.uri: (r, at) for r, at in deleted}
    saves = [Saved(r.role, r.step, r.nbytes, gone.pop(r.uri, (None, None))[1]) for r in receipts]
    # deleted here, stored by an earlier part of the run (before a resume)
    saves += [Saved(r.role, r.step, r.nbytes, at) for r, at in gone.values()]
    return StorageHistory(run, sorted(saves, key=lambda s: (s.step, s.role.value)))


def history_of_run(run: str, receipts: Iterable[Receipt], deleted: Iterable[tuple[Receipt, int]],
                   held: Iterable[Any] = (), *, start_step: int = 0,
                   save_interval: int | None = None) -> StorageHistory:
    """The whole run as the part that ends it knows it (the MLflow run's picture): this part's
    receipts and deletions (:func:`history_from_receipts`), and every resume checkpoint the
    resume sink holds at the end (``held``: its :class:`~wmtp_core.Holding` listing, the one
    ``wmtp report`` reads) that no receipt of this part names: those the earlier parts of a
    resumed run committed, drawn at their steps (and a second copy a sink keeps, such as the fast
    tier's). What is held after the last step is then what the sink lists, as ``wmtp report``
    counts it. Saves an earlier part deleted itself leave no receipt here: with ``save_interval``
    and the step this part started from, the note says how many are not drawn."""
    receipts, deleted = list(receipts), list(deleted)
    history = history_from_receipts(run, receipts, deleted)
    named = {_same(r.uri) for r in receipts} | {_same(r.uri) for r, _ in deleted}
    known = {s.step for s in history.saves if s.role is Role.RESUME}
    earlier = []
    for h in held:
        if h.role is Role.RESUME and h.step is not None and _same(h.uri) not in named:
            earlier.append(Saved(Role.RESUME, h.step, h.nbytes or 0, copy=h.step in known))
            known.add(h.step)
    unseen = [s for s in range(save_interval, start_step + 1, save_interval) if s not in known] \
        if save_interval else []
    note = (f"{len(unseen)} saves an earlier part of the run deleted itself (steps {unseen}) are not drawn; "
            "wmtp report --plot replays them") if unseen else ""
    return StorageHistory(run, sorted(history.saves + tuple(earlier), key=lambda s: (s.step, s.role.value)),
                          note=note)


def _same(uri: str) -> str:
    return uri.rstrip("/")


def reconstruct(run: str, kept: list, finals: list[tuple[int | None, int]], save_interval: int,
                policy: Any = None, copies: Iterable[tuple[int, int]] = ()) -> StorageHistory:
    """The history of a run after the fact, from what it holds and the config that ran it.

    :param kept: the manifests of its committed resume checkpoints.
    :param finals: ``(step, bytes)`` of its final models (a registry records no step: ``None``
        stands for the run's last step).
    :param save_interval: the config's; with ``policy``, the retention bound to the resume role.
    :param copies: ``(step, bytes)`` of second copies of kept checkpoints held in another place
        (the ``tiered`` sink's fast tier), drawn as held from their step.

    The saves the schedule implies but that are gone are replayed through the policy as the
    router applies it (the newest, and the one a resumed part started from, are never deleted);
    their sizes are the nearest kept checkpoint's. A kept checkpoint off the schedule is the run's
    own when its manifest says it was saved on a signal, on the clock or at the last step of a
    part (``meta.saved_because``: ``preempted``, ``timed``, ``last``), or, for a manifest older
    than that field, when a later part resumed from it (their manifests' ``resumed_from``). If
    another kept checkpoint than the newest is off the schedule, or the replay does not end with
    exactly the kept checkpoints, the config does not describe this run: only what it holds is
    drawn, and the note says why.
    """
    kept = sorted(kept, key=lambda m: m.step)
    last = kept[-1].step if kept else 0
    out = [Saved(Role.FINAL, last if step is None else step, nbytes) for step, nbytes in finals]
    out += [Saved(Role.RESUME, step, nbytes, copy=True) for step, nbytes in copies]
    if not kept:
        return StorageHistory(run, out, note="it holds no resume checkpoint")
    by_step = {m.step: m for m in kept}
    schedule = sorted(set(range(save_interval, last + 1, save_interval) if save_interval else ()) | set(by_step))
    alive, deleted_at = _replay(run, kept, schedule, policy)
    lineages = {m.lineage for m in kept}
    resumed = _resumed_steps(run, kept)
    off = [m for m in kept[:-1] if (not save_interval or m.step % save_interval)  # the last may be off
           and not _explained(m, resumed)]
    if alive != set(by_step) or len(lineages) > 1 or off:
        claimed = sorted({str(m.meta.get("saved_because")) for m in off if m.meta.get("saved_because")})
        said = (f"; their manifests say {', '.join(claimed)}" if claimed else " and no manifest says why")
        why = (f"{len(lineages)} lineages" if len(lineages) > 1 else
               f"it holds steps {[m.step for m in off]}, which save_interval {save_interval} does not save{said}"
               if off else
               f"save_interval {save_interval} and its retention would keep steps {sorted(alive)}, "
               f"it holds {sorted(by_step)}")
        return StorageHistory(run, out + [Saved(Role.RESUME, m.step, m.nbytes) for m in kept],
                              note=f"the config does not describe this run ({why}): only what it holds is drawn")
    out += [Saved(Role.RESUME, step, (by_step.get(step) or _stand_in(kept, step)).nbytes,
                  deleted_at.get(step), inferred=step not in by_step) for step in schedule]
    inferred = len(schedule) - len(kept)
    note = (f"{inferred} deleted saves inferred from save_interval {save_interval} and the retention "
            "policy, sized as the nearest kept checkpoint") if inferred else ""
    return StorageHistory(run, sorted(out, key=lambda s: (s.step, s.role.value)), note=note)


OFF_SCHEDULE = frozenset({"preempted", "timed", "last"})
"""``meta.saved_because`` values that explain a save at a step ``save_interval`` does not name."""


def _resumed_steps(run: str, kept: list) -> set[int]:
    """The steps of this run that a later part resumed from, as its manifests name them."""
    named = re.compile(rf"/{re.escape(run)}/step_(\d+)/?$")
    return {int(x.group(1)) for m in kept if (x := named.search(str(m.meta.get("resumed_from") or "")))}


def _explained(manifest: Any, resumed: set[int]) -> bool:
    """Whether a checkpoint off the save schedule is one the run saved: its manifest says it was
    a signal, clock or last-step save; or, written before manifests said why, a later part of
    the run resumed from it (the last step of a part, where a signal save is made)."""
    reason = manifest.meta.get("saved_because")
    return reason in OFF_SCHEDULE if reason is not None else manifest.step in resumed


def _replay(run: str, kept: list, schedule: list[int], policy: Any) -> tuple[set[int], dict[int, int]]:
    """Retention over the saves of ``schedule``, as the router prunes after each commit.
    Returns the steps left and, for the others, the step whose commit deleted them."""
    by_step = {m.step: m for m in kept}
    # a resumed part never deletes the checkpoint it resumed from, which its manifests name
    resumed = _resumed_steps(run, kept)
    alive: dict[int, Any] = {}
    deleted_at: dict[int, int] = {}
    for step in schedule:
        alive[step] = by_step.get(step) or _stand_in(kept, step)
        spared = {step, max((r for r in resumed if r < step), default=step)}
        for doomed in set(policy.select(list(alive.values())) if policy else ()) & set(alive) - spared:
            del alive[doomed]
            deleted_at[doomed] = step
    return set(alive), deleted_at


def _stand_in(kept: list, step: int) -> Any:
    """A manifest for a save that is gone: the nearest kept one's, at ``step``, with no metrics
    (a policy that ranks by a metric cannot be replayed; the check in :func:`reconstruct` sees it)."""
    nearest = min(kept, key=lambda m: (abs(m.step - step), m.step))
    return attrs.evolve(nearest, step=step, meta={k: v for k, v in nearest.meta.items() if k != "metrics"})


def monthly_cost(nbytes: int, price_per_gb_month: float) -> float:
    return nbytes / GB * price_per_gb_month


def usd(amount: float) -> str:
    """Cents from 1 USD up; below, four significant digits, never in exponent notation."""
    if amount >= 1 or amount <= 0:
        return f"{amount:,.2f} USD"
    return f"{amount:.{3 - math.floor(math.log10(amount))}f} USD"


def storage_summary(history: StorageHistory, price: float) -> dict[str, Any]:
    """The end of the picture in numbers: bytes held and their monthly cost, both ways."""
    end = history.last_step
    held, dual = history.held(end), history.dual_writer(end)
    return {"price_per_gb_month": price, "last_step": end, "held_bytes": held,
            "resume_bytes": history.held(end, Role.RESUME), "dual_writer_bytes": dual,
            "held_usd_per_month": monthly_cost(held, price),
            "dual_writer_usd_per_month": monthly_cost(dual, price),
            "saves": sum(not s.copy for s in history.saves), "inferred": history.inferred, "note": history.note}


def cost_lines(history: StorageHistory, price: float) -> list[str]:
    s = storage_summary(history, price)
    ratio = f" ({s['dual_writer_bytes'] / s['held_bytes']:.1f}x)" if s["held_bytes"] else ""
    rows = [["this run (resume + final)", human(s["held_bytes"]), f"{usd(s['held_usd_per_month'])} a month"],
            [DUAL_WRITER, human(s["dual_writer_bytes"]),
             f"{usd(s['dual_writer_usd_per_month'])} a month{ratio}"]]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"Held after step {s['last_step']}, at {price:g} USD per GB-month (GB = 10^9 bytes):"]
    lines += ["  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) if i == 1 else c
                               for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    return lines + ([f"  note: {history.note}"] if history.note else [])


def require_matplotlib() -> None:
    """Drawing needs the optional extra; say how to install it, in one line."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError(f"--plot needs matplotlib, which is not installed: {PLOT_INSTALL_HINT}") from None


def figure_png(history: StorageHistory, price: float) -> bytes:
    """The picture as PNG bytes: the bytes held per role over the steps, and beside them what
    :data:`DUAL_WRITER` would hold. Drawn without pyplot, so no global backend is touched."""
    import io

    from matplotlib.figure import Figure

    steps = history.steps()
    pad = max(1, round(0.03 * steps[-1]))
    xs = steps + [steps[-1] + pad]  # the state after the last step, given some width
    resume = [history.held(s, Role.RESUME) for s in steps]
    total = [history.held(s) for s in steps]
    dual = [history.dual_writer(s) for s in steps]
    top = max(dual + [1])
    unit, scale = next(((u, 1000 ** i) for i, u in enumerate(("B", "KB", "MB", "GB", "TB"))
                        if top < 1000 ** (i + 1) or u == "TB"))
    scaled = {name: [v / scale for v in vals + vals[-1:]]
              for name, vals in (("resume", resume), ("total", total), ("dual", dual))}
    s = storage_summary(history, price)
    fig = Figure(figsize=(7.2, 3.8), dpi=100)
    ax = fig.subplots()
    ax.fill_between(xs, 0, scaled["resume"], step="post", alpha=0.55, color="#4c72b0",
                    label=f"resume held ({human(resume[-1])} now)")
    ax.fill_between(xs, scaled["resume"], scaled["total"], step="post", alpha=0.55, color="#55a868",
                    label=f"final held ({human(total[-1] - resume[-1])} now)")
    ax.step(xs, scaled["total"], where="post", color="black", linewidth=1.2,
            label=f"this run: {human(s['held_bytes'])}, {usd(s['held_usd_per_month'])}/month")
    ax.step(xs, scaled["dual"], where="post", color="#c44e52", linestyle="--", linewidth=1.4,
            label=f"{DUAL_WRITER}: {human(s['dual_writer_bytes'])}, {usd(s['dual_writer_usd_per_month'])}/month")
    ax.set_xlim(0, xs[-1])
    ax.set_ylim(0, top / scale * 1.08)
    ax.set_xlabel("step")
    ax.set_ylabel(f"bytes held ({unit})")
    ax.set_title(f"Bytes held by run {history.run!r} (at {price:g} USD per GB-month)", fontsize=10)
    ax.legend(loc="upper left", fontsize=7.5, frameon=False)
    ax.grid(alpha=0.3)
    if history.note:
        fig.text(0.01, 0.01, f"note: {history.note}", fontsize=6.5, color="#555555")
    fig.tight_layout(rect=(0, 0.04 if history.note else 0, 1, 1))
    buf = io.BytesIO()
    # the numbers drawn, as a text chunk of the PNG itself (PNG_SUMMARY_KEY): what it shows can be
    # read back and compared, not only looked at
    fig.savefig(buf, format="png", metadata={"Software": None, PNG_SUMMARY_KEY: json.dumps(s, sort_keys=True)})
    return buf.getvalue()
