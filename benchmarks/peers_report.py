"""``benchmarks/peers.py``'s tables: medians over repeats per store, side and setup, the kill and
corruption outcomes, and WMTP's targets, pass or fail (``peers.md`` and ``peers.json``)."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
import subprocess
from pathlib import Path

MB = 1e6
WMTP = "wmtp/default"
ROWS = (  # key, label, unit, lower is better
    ("held_mb", "bytes held at the end", "MB", True),
    ("resume_mb", "  of which resume state", "MB", None),
    ("mlflow_ckpt_mb", "  of which checkpoint copies in MLflow", "MB", None),
    ("final_mb", "  of which final model", "MB", None),
    ("other_mb", "  of which other (MLflow store, logs)", "MB", None),
    ("twice_mb", "bytes stored twice", "MB", True),
    ("written_mb", "bytes written (local: /proc io; S3: PUT bytes)", "MB", True),
    ("saves", "saves", "", None),
    ("stall_p50_s", "save stall p50", "s", True),
    ("stall_p95_s", "save stall p95", "s", True),
    ("wall_s", "wall time", "s", True),
    ("registered", "final model versions registered", "", None),
    ("loadable", "loadable with mlflow.transformers.load_model", "", None),
    ("optimizer_free", "final model free of optimizer state", "", None),
    ("kill", "SIGKILL in a save, resumed, bit-exact", "", None),
)


def median(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def percentile(xs: list[float], p: float) -> float | None:
    """Nearest-rank percentile."""
    if not xs:
        return None
    xs = sorted(xs)
    return xs[max(0, math.ceil(p * len(xs)) - 1)]


def row_of(repeats: list[dict]) -> dict:
    """One side and setup's medians over repeats, its kill and corruption outcomes."""
    held = lambda k: median([r["held"].get(k, 0) / MB for r in repeats])  # noqa: E731
    final = [r.get("final") or {} for r in repeats]
    kills = [r["kill"] for r in repeats if r["kill"]]
    return {
        "held_mb": held("total"), "resume_mb": median([(r["held"]["resume"] + r["held"]["resume-mlflow"]) / MB
                                                        for r in repeats]),
        "mlflow_ckpt_mb": held("resume-mlflow"), "final_mb": held("final"), "other_mb": held("other"),
        "twice_mb": held("twice"), "written_mb": median([(r["written"] or 0) / MB for r in repeats]),
        "saves": median([len(r["stalls"]) for r in repeats]),
        "stall_p50_s": median([percentile(r["stalls"], 0.5) for r in repeats]),
        "stall_p95_s": median([percentile(r["stalls"], 0.95) for r in repeats]),
        "wall_s": median([r["wall_s"] for r in repeats]),
        "registered": median([f.get("registered", 0) for f in final]),
        "loadable": known_all([f.get("loadable") for f in final if f.get("uri")]),
        "optimizer_free": known_all([f.get("optimizer_free") for f in final if f.get("uri")]),
        "kill": f"{sum(1 for k in kills if k['equal'])}/{len(kills)}" if kills else None,
        "kills": kills, "corruption": {c["variant"]: c for r in repeats for c in r["corruption"]},
        "trained": all(not r["error"] and r["checkpoint_files"] > 0 for r in repeats),
        "errors": [r["error"] for r in repeats if r["error"]],
        "notes": sorted({n for r in repeats for n in r["notes"]}),
    }


def known_all(xs: list) -> bool | None:
    """``None`` when nothing is known (no registered model, or it could not be downloaded)."""
    return None if not xs or None in xs else all(xs)


def summarize(runs: dict, plan: dict) -> dict:
    return {store: {label: row_of(reps) for label, reps in sides.items()} for store, sides in runs.items()}


def targets(summary: dict) -> list[dict]:
    """WMTP's targets per store, each ``{store, target, wmtp, peer, pass}``."""
    out = []
    for store, rows in summary.items():
        w = rows.get(WMTP)
        if w is None:
            continue
        add = lambda t, a, b, ok, unit="": out.append({  # noqa: E731
            "store": store, "target": t, "wmtp": a, "peer": b, "unit": unit, "pass": bool(ok)})
        for label, row in rows.items():
            if label == WMTP:
                continue
            cap = row["held_mb"] / 3 if label.endswith("documented") else row["held_mb"]
            how = "1/3 of" if label.endswith("documented") else ""
            add(f"bytes held <= {how} {label}".replace("  ", " "), w["held_mb"], row["held_mb"],
                w["held_mb"] is not None and cap is not None and w["held_mb"] <= cap, "MB")
            add(f"save stall p50 <= {label}", w["stall_p50_s"], row["stall_p50_s"],
                None not in (w["stall_p50_s"], row["stall_p50_s"]) and w["stall_p50_s"] <= row["stall_p50_s"], "s")
        kills = w["kills"]
        if kills:
            add("resumes bit-exact (100%)", w["kill"], None, all(k["equal"] for k in kills))
        for variant, c in w["corruption"].items():
            add(f"corruption ({variant}) falls back and finishes", c["outcome"], None, c["outcome"] == "fallback")
        add("final model registered once (loadable, no optimizer state)", w["registered"], None,
            w["registered"] == 1 and w["loadable"] and w["optimizer_free"])
    return out


def fmt(v, unit: str = "") -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        v = f"{v:,.3f}" if unit == "s" else f"{v:,.1f}" if unit == "MB" else f"{v:g}"
    return f"{v} {unit}".strip()


def beats(rows: dict, key: str, lower: bool | None) -> str:
    """The peers whose value beats WMTP's on a row."""
    w = rows.get(WMTP, {}).get(key)
    if lower is None or w is None:
        return ""
    better = [label for label, r in rows.items() if label != WMTP and r.get(key) is not None
              and (r[key] < w if lower else r[key] > w)]
    return ", ".join(better)


def table(store: str, rows: dict) -> list[str]:
    labels = list(rows)
    lines = [f"### {store}", "", "| measure | " + " | ".join(labels) + " | beats WMTP |",
             "|---|" + "---|" * (len(labels) + 1)]
    for key, name, unit, lower in ROWS:
        cells = [fmt(rows[label].get(key), unit) for label in labels]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {beats(rows, key, lower)} |")
    lines += ["", "| outcome | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    if any(rows[label]["kills"] for label in labels):
        lines.append("| kill: resumed from step (bit-exact) | " + " | ".join(
            ", ".join(killed(k) for k in rows[label]["kills"]) for label in labels) + " |")
    variants = sorted({v for label in labels for v in rows[label]["corruption"]})
    for v in variants:
        lines.append(f"| corruption: {v} | " + " | ".join(
            describe(rows[label]["corruption"].get(v)) for label in labels) + " |")
    lines.append("| trained and saved | " + " | ".join(fmt(rows[label]["trained"]) for label in labels) + " |")
    return lines + [""]


def killed(k: dict) -> str:
    """One kill's outcome: crash, started over or the step resumed from, and the weights."""
    if k.get("error") or k.get("rc") != 0:
        return "crash"
    start = "started over" if k["resumed_from_step"] is None else f"step {k['resumed_from_step']}"
    return f"{start} ({'equal' if k['equal'] else 'differs' if k['equal'] is False else 'n/a'})"


def describe(c: dict | None) -> str:
    if c is None:
        return "n/a"
    if "resumed_from_step" not in c:
        return c["outcome"]
    return f"{c['outcome']} (step {c['corrupted_step']} corrupted, resumed from {c['resumed_from_step']})"


def header(plan: dict, command: str, seconds: float) -> list[str]:
    root = Path(__file__).resolve().parents[1]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                            text=True).stdout.strip()
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return ["# WMTP against its peers", "",
            f"- date: {now}; commit: {commit}; machine: {platform.platform()}, {platform.processor() or ''} "
            f"{os.cpu_count()} CPUs, Python {platform.python_version()}",
            f"- command: `{command}` ({seconds:.0f} s)",
            f"- {plan['steps']} steps, a save every {plan['save_every']}, keep_last {plan['keep_last']}, "
            f"{plan['repeat']['local']} repeat(s) on local disk and {plan['repeat']['s3']} on S3 (medians), "
            f"the kill in save {plan['kill_save']}, corruption at step "
            f"{plan['midpoint']} ({', '.join(plan['variants'])}, first repeat), stores: {', '.join(plan['stores'])}",
            ""]


def write(out: Path, summary: dict, runs: dict, plan: dict, command: str, seconds: float) -> bool:
    """Writes ``peers.md`` and ``peers.json``; whether a WMTP target was missed."""
    goals = targets(summary)
    lines = header(plan, command, seconds)
    for store, rows in summary.items():
        lines += table(store, rows)
    lines += ["### WMTP's targets", "", "| store | target | WMTP | peer | |", "|---|---|---|---|---|"]
    lines += [f"| {g['store']} | {g['target']} | {fmt(g['wmtp'], g['unit'])} | {fmt(g['peer'], g['unit'])} | "
              f"{'pass' if g['pass'] else '**FAIL**'} |" for g in goals]
    notes = [f"- {store} {label}: {n}" for store, rows in summary.items() for label, r in rows.items()
             for n in r["notes"]]
    if notes:
        lines += ["", "What each runner noted (uninterrupted runs):", *notes]
    errors = [f"- {store} {label}: {e}" for store, rows in summary.items() for label, r in rows.items()
              for e in r["errors"]]
    if errors:
        lines += ["", "Errors:", *errors]
    (out / "peers.md").write_text("\n".join(lines) + "\n")
    (out / "peers.json").write_text(json.dumps({"plan": plan, "command": command, "seconds": seconds,
                                                "summary": summary, "targets": goals, "runs": runs},
                                               indent=2, default=str))
    return not all(g["pass"] for g in goals) or not goals
