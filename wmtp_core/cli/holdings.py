"""``wmtp report``: the bytes a run holds, where, and over its steps what they cost."""

from __future__ import annotations

import json
import math
from typing import Any

import fsspec
from rich.console import Console

from wmtp_core.cli.inventory import locate, scan
from wmtp_core.commit import (
    CheckpointState,
    CheckpointStore,
    check_run_name,
)
from wmtp_core.config import load_settings
from wmtp_core.config.routing import resume_base
from wmtp_core.errors import UsageError, WmtpError
from wmtp_core.events import RunInfo
from wmtp_core.plugins import (
    build_catalog,
    make_plugin_manager,
)
from wmtp_core.exits import EXIT_OK
from wmtp_core.report import (
    DEFAULT_PRICE_PER_GB_MONTH,
    cost_lines,
    figure_png,
    human,
    reconstruct,
    require_matplotlib,
    storage_summary,
)
from wmtp_core.roles import Role


from wmtp_core.cli.commands import _columns, storage_options


def cmd_report(args, out: Console, err: Console) -> int:
    """The bytes a run holds: its resume checkpoints (from the inventory of the URI) and what
    the final sink the config binds holds for the run's lineages (asked, not guessed). With
    ``--plot`` or a price: those bytes over the steps, and what they cost a month."""
    price = _price(args)
    if args.plot:
        require_matplotlib()  # before any work: one line saying how to install it
    settings = load_settings(args.config)
    uri = args.run
    if "/" not in uri and "://" not in uri:  # a bare run name, under the configured base path
        uri = f"{resume_base(settings).rstrip('/')}/{check_run_name(uri)}"
    loc = locate(uri, storage_options(args.storage_option))
    if loc.kind == "base":
        held = f"it holds the runs {', '.join(loc.runs)}; name one" if loc.runs else "it holds no checkpoint"
        raise UsageError(f"{uri} is not a run directory: {held}")
    store, run = loc.store, loc.runs[0]
    catalog = build_catalog(make_plugin_manager())  # one plugin manager for the whole report
    report = _holdings(settings, catalog, store, run, err)
    history = None
    if price is not None:
        history = _storage_history(settings, catalog, store, run, report["final"])
        report["storage"] = storage_summary(history, price)
    if args.json:
        out.out(json.dumps(report, indent=2))
    else:
        out.print("\n".join(_report_lines(report) + (cost_lines(history, price) if history else [])))
    if args.plot:
        png = figure_png(history, price)
        try:
            with fsspec.open(args.plot, "wb") as f:
                f.write(png)
        except (OSError, ValueError, ImportError) as e:  # no such folder, an unknown protocol
            raise UsageError(f"--plot {args.plot}: cannot be written ({type(e).__name__}: {e})") from None
        err.print(f"wrote {args.plot}", highlight=False)
    return EXIT_OK


def _holdings(settings, catalog: Any, store: CheckpointStore, run: str, err: Console) -> dict[str, Any]:
    """What ``wmtp report`` prints: the run's checkpoints by state, from the inventory, and the
    final models the final sink holds for the run's lineages."""
    entries = scan(store, run)
    spec = catalog.sink_for_protocol(store.protocol)  # what a run would bind
    sink = spec.name if spec is not None else store.protocol
    resume = [e for e in entries if e.state is CheckpointState.COMMITTED and e.role == Role.RESUME.value]
    staging = [e for e in entries if e.state is CheckpointState.STAGING]
    others = {state: [e for e in entries if e.state is state]
              for state in (CheckpointState.UNVERIFIABLE, CheckpointState.FOREIGN)}
    finals = [{"sink": sink, "uri": e.uri, "step": e.step, "bytes": e.bytes}
              for e in entries if e.state is CheckpointState.COMMITTED and e.role == Role.FINAL.value]
    lineages = {e.lineage for e in entries if e.lineage}
    if lineages:
        finals += _final_holdings(settings, catalog, run, lineages, {f["uri"] for f in finals}, err)
    report = {
        "run": run,
        "uri": store.uri(store.run_dir(run)),
        "resume": {"sink": sink, "committed": len(resume), "bytes": sum(e.bytes for e in resume),
                   "newest_step": max((e.step for e in resume), default=None)},
        "staging": {"count": len(staging), "bytes": sum(e.bytes for e in staging)},
        **{state.value: {"count": len(es), "bytes": sum(e.bytes for e in es)} for state, es in others.items()},
        "final": finals,
    }
    report["total_bytes"] = (report["resume"]["bytes"] + report["staging"]["bytes"]
                             + report["unverifiable"]["bytes"] + sum(f["bytes"] or 0 for f in finals))
    return report


def _price(args) -> float | None:
    """USD per GB-month to price the report at: given, the default under ``--plot``, or none."""
    price = args.price_per_gb_month
    if price is not None and not (math.isfinite(price) and price >= 0):
        raise UsageError(f"--price-per-gb-month: {price:g} is not accepted; use a price in USD >= 0, "
                         f"e.g. {DEFAULT_PRICE_PER_GB_MONTH} (S3 Standard)")
    return DEFAULT_PRICE_PER_GB_MONTH if price is None and args.plot else price


def _storage_history(settings, catalog: Any, store: CheckpointStore, run: str, finals: list[dict[str, Any]]):
    """What the run held over its steps, reconstructed from its kept checkpoints, the final
    models found, and the save schedule and retention policy of the config (no file of its own:
    the run directory holds checkpoints only)."""
    from wmtp_core.bindings import build_policies
    from wmtp_core.config.routing import bindings_for

    policy = build_policies(bindings_for(settings, catalog), catalog).get(Role.RESUME)
    kept = [m for _, m in store.list(run)]
    held = [(f["step"], f["bytes"] or 0) for f in finals]
    return reconstruct(run, kept, held, settings.config.paths.checkpoints.save_interval, policy)


def _final_holdings(settings, catalog: Any, run: str, lineages: set[str], seen: set[str],
                    err: Console) -> list[dict[str, Any]]:
    """Ask the final sink the config binds what it holds for these lineages."""
    from wmtp_core.bindings import build_sink
    from wmtp_core.config.routing import bindings_for

    bindings = bindings_for(settings, catalog)
    binding = bindings.sink_for(Role.FINAL)
    if binding is None or binding.sink not in catalog.sinks:
        return []
    mlflow = settings.mlflow
    info = RunInfo(name=run, algo="-", lineage=sorted(lineages)[0])
    sink = build_sink(catalog, bindings, Role.FINAL, info, mlflow)
    try:
        found = sink.held(run, lineages)
    except WmtpError as e:
        err.print(f"note: could not ask the final sink {binding.sink!r}: {e}")
        return []
    return [{"sink": binding.sink, "uri": h.uri, "step": h.step, "bytes": h.nbytes}
            for h in found if h.role is Role.FINAL and h.uri not in seen]


def _report_lines(r: dict[str, Any]) -> list[str]:
    res, stg = r["resume"], r["staging"]
    newest = f", newest step {res['newest_step']}" if res["newest_step"] is not None else ""
    rows = [["resume", res["sink"], f"{res['committed']} committed{newest}", human(res["bytes"])]]
    if stg["count"]:
        rows.append(["resume", res["sink"], f"{stg['count']} staging (wmtp gc removes)", human(stg["bytes"])])
    if r["unverifiable"]["count"]:
        rows.append(["resume", res["sink"], f"{r['unverifiable']['count']} unverifiable (kept; see "
                     "wmtp checkpoints verify)", human(r["unverifiable"]["bytes"])])
    rows += [["final", f["sink"], f["uri"], "?" if f["bytes"] is None else human(f["bytes"])]
             for f in r["final"]]
    if not r["final"]:
        rows.append(["final", "-", "nothing stored", human(0)])
    rows.append(["total", "", "", human(r["total_bytes"])])
    return [f"Bytes held by run {r['run']!r} ({r['uri']}):"] + ["  " + line for line in _columns(rows)]
