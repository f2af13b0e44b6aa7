"""``wmtp report``: the bytes a run holds, where, and over its steps what they cost."""

from __future__ import annotations

import json
import math
import posixpath
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
    catalog = build_catalog(make_plugin_manager())  # one plugin manager for the whole report
    uri = args.run
    bare = "/" not in uri and "://" not in uri
    placed = _placed_resume_sink(settings, catalog, check_run_name(uri)) if bare else None
    if placed is not None:  # a bare run name, where the bound sink keeps it (tiered: the durable tier)
        store, run = _sink_run(placed, uri)
    else:
        if bare:  # a bare run name, under the configured base path
            uri = f"{resume_base(settings).rstrip('/')}/{uri}"
        loc = locate(uri, storage_options(args.storage_option))
        if loc.kind == "base":
            held = f"it holds the runs {', '.join(loc.runs)}; name one" if loc.runs else "it holds no checkpoint"
            raise UsageError(f"{uri} is not a run directory: {held}")
        store, run = loc.store, loc.runs[0]
        placed = _placed_resume_sink(settings, catalog, run)
        if placed is not None and placed[1].location().rstrip("/") != store.uri(store.run_dir(run)).rstrip("/"):
            placed = None  # a run directory the bound sink does not keep: read as it is
    report = _holdings(settings, catalog, store, run, err, placed)
    history = None
    if price is not None:
        history = _storage_history(settings, catalog, store, run, report["final"], placed)
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


def _placed_resume_sink(settings, catalog: Any, run: str) -> tuple[str, Any] | None:
    """``(name, sink)`` when the config binds the resume role to a sink that keeps a run in
    places of its own rather than under a base path of one protocol (``tiered``: a fast and a
    durable tier), built for ``run``; ``None`` otherwise."""
    from wmtp_core.bindings import build_sink
    from wmtp_core.config.routing import bindings_for

    binding = bindings_for(settings, catalog).sink_for(Role.RESUME)
    spec = catalog.sinks.get(binding.sink) if binding is not None else None
    if spec is None or spec.protocols:
        return None
    sink = build_sink(catalog, bindings_for(settings, catalog), Role.RESUME,
                      RunInfo(name=run, algo="-", lineage="-"), settings.mlflow)
    return (binding.sink, sink) if sink.lease_store() is not None else None


def _sink_run(placed: tuple[str, Any], run: str) -> tuple[CheckpointStore, str]:
    """The store a placed sink shares between machines (its lease store: the durable tier), and
    the run, which it must hold."""
    name, sink = placed
    store = sink.lease_store()
    store.fs.invalidate_cache()  # a CLI must see what other processes wrote
    if not store.fs.isdir(store.run_dir(run)) and not _copies(placed, run):
        raise UsageError(f"{sink.location()} does not exist (the run {run!r} of the {name!r} sink the config binds)")
    return store, run


def _copies(placed: tuple[str, Any] | None, run: str) -> list[Any]:
    """Every committed resume checkpoint a placed sink holds for ``run``, each copy (each tier)."""
    if placed is None:
        return []
    return [h for h in placed[1].held(run, None) if h.role is Role.RESUME]


def _holdings(settings, catalog: Any, store: CheckpointStore, run: str, err: Console,
              placed: tuple[str, Any] | None = None) -> dict[str, Any]:
    """What ``wmtp report`` prints: the run's checkpoints by state, from the inventory, and the
    final models the final sink holds for the run's lineages. With a placed resume sink
    (``tiered``), its committed copies in every place it keeps them are counted."""
    entries = scan(store, run)
    spec = catalog.sink_for_protocol(store.protocol)  # what a run would bind
    sink = placed[0] if placed is not None else spec.name if spec is not None else store.protocol
    resume = [e for e in entries if e.state is CheckpointState.COMMITTED and e.role == Role.RESUME.value]
    staging = [e for e in entries if e.state is CheckpointState.STAGING]
    others = {state: [e for e in entries if e.state is state]
              for state in (CheckpointState.UNVERIFIABLE, CheckpointState.FOREIGN)}
    finals = [{"sink": sink, "uri": e.uri, "step": e.step, "bytes": e.bytes}
              for e in entries if e.state is CheckpointState.COMMITTED and e.role == Role.FINAL.value]
    lineages = {e.lineage for e in entries if e.lineage}
    if lineages:
        finals += _final_holdings(settings, catalog, run, lineages, {f["uri"] for f in finals}, err)
    held = ([(posixpath.dirname(h.uri.rstrip("/")), h.step, h.nbytes or 0) for h in _copies(placed, run)]
            if placed is not None else [(store.uri(store.run_dir(run)), e.step, e.bytes) for e in resume])
    places = {}
    for where, step, nbytes in held:  # each place the copies are kept in (tiered: durable, then fast)
        place = places.setdefault(where, {"uri": where, "committed": 0, "bytes": 0, "newest_step": None})
        place["committed"] += 1
        place["bytes"] += nbytes
        place["newest_step"] = max(step, place["newest_step"] or 0)
    report = {
        "run": run,
        "uri": store.uri(store.run_dir(run)),
        "resume": {"sink": sink, "committed": len(held), "bytes": sum(n for _, _, n in held),
                   "newest_step": max((step for _, step, _ in held), default=None),
                   "places": list(places.values())},
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


def _storage_history(settings, catalog: Any, store: CheckpointStore, run: str, finals: list[dict[str, Any]],
                     placed: tuple[str, Any] | None = None):
    """What the run held over its steps, reconstructed from its kept checkpoints, the final
    models found, and the save schedule and retention policy of the config (no file of its own:
    the run directory holds checkpoints only). With a placed resume sink (``tiered``): its
    checkpoints, one per step, and the second copies of a step as copies held."""
    from wmtp_core.bindings import build_policies
    from wmtp_core.config.routing import bindings_for

    policy = build_policies(bindings_for(settings, catalog), catalog).get(Role.RESUME)
    copies = []
    if placed is not None:
        kept = [m for _, m in placed[1].committed()]
        steps = [h.step for h in _copies(placed, run)]
        copies = [(m.step, m.nbytes) for m in kept for _ in range(max(0, steps.count(m.step) - 1))]
    else:
        kept = [m for _, m in store.list(run)]
    held = [(f["step"], f["bytes"] or 0) for f in finals]
    return reconstruct(run, kept, held, settings.config.paths.checkpoints.save_interval, policy, copies)


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
    rows = []
    for place in res["places"] if len(res["places"]) > 1 else [res]:  # one row per place (tiered: each tier)
        newest = f", newest step {place['newest_step']}" if place["newest_step"] is not None else ""
        where = f" in {place['uri']}" if len(res["places"]) > 1 else ""
        rows.append(["resume", res["sink"], f"{place['committed']} committed{newest}{where}", human(place["bytes"])])
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
