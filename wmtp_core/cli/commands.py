"""The ``wmtp`` commands themselves: each takes the parsed arguments and two consoles and returns
the exit status. What they read about stored checkpoints comes from :mod:`.inventory`."""

from __future__ import annotations

import contextlib
import json
import math
import os
import posixpath
import shlex
import time
from typing import Any

import attrs
import fsspec
from rich.console import Console

from wmtp_core.cli.inventory import leftovers, locate, scan
from wmtp_core.commit import (
    MANIFEST,
    STAGING_MARKER,
    CheckpointState,
    CheckpointStore,
    check_run_name,
)
from wmtp_core.config import load_settings
from wmtp_core.config.routing import resume_base
from wmtp_core.console import error_line
from wmtp_core.errors import CheckpointError, UsageError, WmtpError
from wmtp_core.lease import live_writer
from wmtp_core.events import RunInfo
from wmtp_core.plugins import (
    CORE_PLUGINS,
    build_catalog,
    distributions,
    make_plugin_manager,
)
from wmtp_core.exits import EXIT_FAILED, EXIT_NOT_REGISTERED, EXIT_OK
from wmtp_core.report import (
    DEFAULT_PRICE_PER_GB_MONTH,
    cost_lines,
    figure_png,
    human,
    reconstruct,
    require_matplotlib,
    storage_summary,
)
from wmtp_core.resume import verify_checkpoint
from wmtp_core.roles import Role
from wmtp_core.tensors import tensor_bytes


def storage_options(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs; ``true``/``false`` become booleans. Values never appear in errors."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError("--storage-option expects NAME=VALUE, e.g. endpoint_url=http://127.0.0.1:9000")
        out[key.strip()] = {"true": True, "false": False}.get(value.lower(), value)
    return out


def cmd_plugins(args, out: Console, err: Console) -> int:
    pm = make_plugin_manager()
    catalog = build_catalog(pm)  # validates names across plugins
    dists = distributions(pm)
    sinks = _contributions(pm.hook.wmtp_register_sinks)
    policies = _contributions(pm.hook.wmtp_register_policies)
    plugins = sorted(pm.list_name_plugin(), key=lambda np: str(np[0]))
    out.print(f"{len(plugins)} plugins; sinks: {catalog.describe_sinks()}")
    for name, plugin in plugins:
        origin = "(part of wmtp_core)" if name in CORE_PLUGINS else "(not installed from a distribution)"
        out.print(f"\n{name}  {dists.get(name, origin)}")
        for s in sinks.get(name, []):
            protocols = f"; protocols {', '.join(s.protocols)}" if s.protocols else ""
            out.print(f"  sink {s.name}: serves {_roles(s.roles)}{protocols}")
            if s.description:
                out.print(f"    {s.description}")
        for p in policies.get(name, []):
            out.print(f"  policy {p.name}: prunes {_roles(p.roles)}")
            if p.description:
                out.print(f"    {p.description}")
        if name not in sinks and name not in policies:
            out.print("  observer: hooks only, stores no checkpoint bytes")
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [])
        out.print(f"  hooks: {', '.join(hooks) or 'none'}")
    return EXIT_OK


def _contributions(hook) -> dict[str, list]:
    """Plugin name -> the specs it registers: each implementation is called on its own, so the
    listing can say which plugin contributed what."""
    out: dict[str, list] = {}
    for impl in hook.get_hookimpls():
        impl.function(register=out.setdefault(impl.plugin_name, []).append)
    return out


def _roles(roles) -> str:
    return ", ".join(sorted(r.value for r in roles))


def cmd_ls(args, out: Console, err: Console) -> int:
    loc = locate(args.uri, storage_options(args.storage_option))
    if loc.kind == "checkpoint":
        raise UsageError(f"{args.uri} is one checkpoint; list its run directory or the base path")
    entries = [e for run in loc.runs for e in scan(loc.store, run)]
    if args.json:
        out.out(json.dumps([e.to_json() for e in entries], indent=2))
        return EXIT_OK
    if not entries:
        out.print(f"no checkpoints under {args.uri}")
        return EXIT_OK
    rows = [[e.run, e.name, "" if e.step is None else str(e.step), e.role or "-", e.state.value,
             str(e.files), human(e.bytes), e.metric, (e.created_at or "-")[:19].replace("T", " "),
             (e.lineage or "-")[:8]] for e in entries]
    header = ["run", "name", "step", "role", "state", "files", "bytes", "metric", "created_at", "lineage"]
    out.print("\n".join(_columns([header, *rows])))
    for e in entries:
        if e.problem and e.state is not CheckpointState.STAGING:
            out.print(f"{e.state.value}: {e.uri}: {e.problem}")
    return EXIT_OK


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"


def _columns(rows: list[list[str]]) -> list[str]:
    """Plain aligned columns: stays readable in a pipe and at any terminal width."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def cmd_verify(args, out: Console, err: Console) -> int:
    loc = locate(args.uri, storage_options(args.storage_option))
    store = loc.store
    # every directory that claims to be a checkpoint (it has a manifest), believable or not
    paths = [loc.checkpoint] if loc.checkpoint else [
        e.path for run in loc.runs for e in scan(store, run)
        if e.state in (CheckpointState.COMMITTED, CheckpointState.UNVERIFIABLE)]
    if not paths:
        raise CheckpointError(f"{args.uri} holds no committed checkpoint to verify")
    failed = 0
    for path in paths:  # the resume path's verified read, and its quarantine
        verdict = verify_checkpoint(store, path, quarantine=not args.no_quarantine)
        if verdict.manifest is not None:
            m = verdict.manifest
            out.print(f"OK      {store.uri(path)}  ({_count(len(m.files), 'file')}, {human(m.nbytes)})")
            continue
        failed += 1
        out.print(f"FAILED  {store.uri(path)}: {verdict.problem}")
        if verdict.quarantined:
            out.print(f"        quarantined as {verdict.quarantined} (wmtp gc --quarantined removes it)")
    out.print(f"{len(paths) - failed} of {_count(len(paths), 'checkpoint')} verified")
    return EXIT_FAILED if failed else EXIT_OK


def cmd_convert(args, out: Console, err: Console) -> int:
    """A sharded (FSDP) checkpoint as a single-process one, offline: the model weights (a
    committed final model), or with ``--full`` the whole resume state. The source is verified
    first."""
    from wmtp_core.checkpoint_models import convert_sharded

    options = storage_options(args.storage_option)
    loc = locate(args.uri, options)
    if loc.kind != "checkpoint":
        raise UsageError(f"{args.uri} is not a checkpoint directory; name a sharded step_N directory")
    source = loc.store.uri(loc.checkpoint)
    what = "the resume state (model, optimizer, trainer)" if args.full else "the model weights"
    err.print(f"verifying {source}, then writing {what} as a single-process checkpoint ...", highlight=False)
    uri, manifest = convert_sharded(source, args.out, full=args.full, storage_options=options)
    out.print(f"wrote {what} of {source} (step {manifest.step}) to {uri} "
              f"({_count(len(manifest.files), 'file')}, {human(manifest.nbytes)})")
    if args.full:
        out.print(f"continue it on one process with: python -m wmtp_core.run ... --resume {uri}")
    else:
        out.print(f"use it as paths.models.ref or rm, or store it as the final model with: wmtp register {uri}")
    return EXIT_OK


def cmd_gc(args, out: Console, err: Console) -> int:
    """Remove what WMTP wrote and no run needs, in three subjects: staging directories of saves
    that never finished, quarantined checkpoints (``--quarantined``) and incomplete uploads
    (``--incomplete``); never a committed checkpoint, never what WMTP did not write."""
    if args.min_age < 0:
        raise UsageError(f"--min-age: {args.min_age:g} is not accepted; use a number of seconds >= 0")
    loc = locate(args.uri, storage_options(args.storage_option))
    if loc.kind == "checkpoint":
        raise UsageError(f"{args.uri} is one checkpoint; gc takes a run directory or a base path")
    verb = "would remove" if args.dry_run else "removed"
    staged = quarantined = Freed()
    for run in loc.runs:
        staged += _gc_staging(args, loc.store, run, out, verb)
        quarantined += _gc_quarantined(args, loc.store, run, out, verb)
    uploads = _gc_uploads(args, loc, out) if args.incomplete else Freed()
    freed = staged.bytes + quarantined.bytes + uploads.bytes
    out.print(f"{verb} {_count(staged.count, 'staging directory', 'staging directories')}"
              + (f", {'would abort' if args.dry_run else 'aborted'} {_count(uploads.count, 'incomplete upload')}"
                 if args.incomplete else "")
              + (f", {verb} {_count(quarantined.count, 'quarantined checkpoint')}" if args.quarantined else "")
              + f"; {'would free' if args.dry_run else 'freed'} {human(freed)} ({freed} bytes)")
    return EXIT_OK


@attrs.frozen
class Freed:
    """What one subject of ``wmtp gc`` removed (or would remove): how many, how many bytes."""

    count: int = 0
    bytes: int = 0

    def __add__(self, other: Freed) -> Freed:
        return Freed(self.count + other.count, self.bytes + other.bytes)


def _young(args, age: float | None, seen: str) -> str | None:
    """Why something under ``--min-age`` is kept (a save may still be in flight), ``seen``
    formatted with its age, or ``None``."""
    if args.min_age > 0 and (age is None or age < args.min_age):
        return "age unknown" if age is None else seen.format(age=age)
    return None


def _gc_staging(args, store: CheckpointStore, run: str, out: Console, verb: str) -> Freed:
    """This run's staging directories, unless the run is being written; what cannot be
    believed and what WMTP did not write are kept and named."""
    live, freed = live_writer(store, run), Freed()
    for e in leftovers(store, run):
        if e.state is CheckpointState.QUARANTINED:
            continue
        if e.state is CheckpointState.UNVERIFIABLE:
            out.print(f"kept    {e.uri}: its {MANIFEST} cannot be believed ({e.problem}); "
                      "inspect it before deleting it by hand")
        elif live is not None:
            out.print(f"kept    {e.uri}: run {run!r} is being written ({live}); a save may be in flight")
        elif e.state is CheckpointState.FOREIGN:
            out.print(f"kept    {e.uri}: not ours (no {MANIFEST} and no {STAGING_MARKER}: WMTP did not write it)")
        elif young := _young(args, time.time() - e.modified if e.modified is not None else None,
                             "newest file {age:.0f} s old"):
            # young staging may be a save still in flight in another process
            out.print(f"kept    {e.uri}: {young}, under --min-age {args.min_age:g} s")
        # the save may have committed since the listing: look again just before removing
        elif not store.fs.exists(posixpath.join(e.path, MANIFEST)) and \
                store.fs.exists(posixpath.join(e.path, STAGING_MARKER)):
            if not args.dry_run:
                store.fs.rm(e.path, recursive=True)
            freed += Freed(1, e.bytes)
            out.print(f"{verb} {e.uri} ({_count(e.files, 'file')}, {human(e.bytes)})")
    return freed


def _gc_quarantined(args, store: CheckpointStore, run: str, out: Console, verb: str) -> Freed:
    """This run's quarantined checkpoints: named, and removed with ``--quarantined``."""
    freed = Freed()
    for e in leftovers(store, run):
        if e.state is not CheckpointState.QUARANTINED:
            continue
        if not args.quarantined:
            out.print(f"kept    {e.uri}: quarantined ({e.problem}); --quarantined removes it")
            continue
        if not args.dry_run:
            store.fs.rm(e.path, recursive=True)
        freed += Freed(1, e.bytes)
        out.print(f"{verb} quarantined {e.uri} ({_count(e.files, 'file')}, {human(e.bytes)})")
    return freed


def _gc_uploads(args, loc: Any, out: Console) -> Freed:
    """Uploads of killed saves, under the run or under every run of the base: aborted when
    they are WMTP's and older than ``--min-age``."""
    freed = Freed()
    for upload in loc.store.incomplete_uploads(loc.runs[0] if loc.kind == "run" else None):
        if not upload.ours:
            out.print(f"kept    incomplete upload of {upload.uri}: not ours ({upload.problem})")
            continue
        if young := _young(args, time.time() - upload.started if upload.started is not None else None,
                           "begun {age:.0f} s ago"):
            out.print(f"kept    incomplete upload of {upload.uri}: {young}, under --min-age {args.min_age:g} s")
            continue
        if not args.dry_run:
            loc.store.abort_upload(upload)
        freed += Freed(1, upload.bytes or 0)
        out.print(f"{'would abort' if args.dry_run else 'aborted'} incomplete upload of {upload.uri} "
                  f"({human(upload.bytes or 0)} in parts)")
    return freed


def cmd_register(args, out: Console, err: Console) -> int:
    """Store the final model from a committed checkpoint through the final sink the config binds,
    exactly as the end of a run does: the same router decides that it is stored at most once."""
    with working_directory(vars(args).get("directory")):
        return _register(args, out, err)


def _register(args, out: Console, err: Console) -> int:
    from wmtp_core.registering import discard, final_payload_from, final_router

    settings = load_settings(args.config)
    # the checkpoint is read as the run wrote it: the config's storage options, unless given here
    options = storage_options(args.storage_option) or _resume_options(settings)
    loc = locate(args.uri, options)
    if loc.kind != "checkpoint":
        raise UsageError(f"{args.uri} is not a checkpoint directory; name a step_N or final directory")
    manifest = loc.store.read_manifest(loc.checkpoint)  # refuses staging before anything else
    algo = manifest.meta.get("algo")
    if not algo:
        raise CheckpointError(f"{args.uri}: its manifest records no algo (meta.algo)")
    mlflow_settings = settings.mlflow
    run = RunInfo(name=check_run_name(args.run_name or manifest.run), algo=algo,
                  lineage=manifest.lineage, experiment=mlflow_settings.get("experiment", "wmtp"))
    source = loc.store.uri(loc.checkpoint)
    err.print(f"registering the final model of run {run.name!r} from {source} ...")
    router = final_router(settings, run)
    try:
        try:
            stored = router.final_stored()
        except Exception as e:  # the sink could not be asked: it is unreachable or broken
            return _not_registered(err, e, source)
        if stored:
            out.print(f"the final model of run {run.name!r} is already stored at {stored}; "
                      "it is stored once, nothing to do")
            return EXIT_OK
        payload = final_payload_from(args.uri, options, {"algo": algo, "step": manifest.step})
        metrics = {k: float(v) for k, v in manifest.meta.get("metrics", {}).items()}
        try:
            receipt = router.emit(Role.FINAL, step=manifest.step, payload=payload, metrics=metrics,
                                  nbytes=tensor_bytes(payload.parts))
        except Exception as e:
            return _not_registered(err, e, source)
        finally:
            discard(payload)
    finally:
        router.close()
    out.print(f"stored the final model of run {run.name!r} (step {manifest.step}) from {source}")
    out.print(f"{receipt.uri}  via {receipt.sink}, {human(receipt.nbytes)}")
    return EXIT_OK


def _not_registered(err: Console, e: Exception, source: str) -> int:
    err.print(error_line(f"final model not stored ({type(e).__name__}: {e}). {source} is unchanged; "
                         "run this command again once the final sink is reachable"))
    return EXIT_NOT_REGISTERED


@contextlib.contextmanager
def working_directory(path: str | None):
    """``-C DIR``: run as if started in ``DIR`` (relative paths and stores resolve there)."""
    if not path:
        yield
        return
    before = os.getcwd()
    try:
        os.chdir(path)
    except OSError as e:
        raise UsageError(f"-C: {path!r} is not a directory this process can enter ({e.strerror})") from None
    try:
        yield
    finally:
        os.chdir(before)


def _resume_options(settings: Any) -> dict[str, Any]:
    st = settings.config.storage
    return dict(st.resume.options) if st is not None and st.resume is not None else {}


def register_command(uri: str, settings: Any, cwd: str | None = None) -> str:
    """The ``wmtp register`` command that stores the final model of the checkpoint ``uri``
    where the run itself would have: with the run's config file (an absolute path), and ``-C``
    with the run's working directory when that config names a store relative to it (the
    default ``sqlite:///mlflow.db``). Names no secret: credentials stay in the config or the
    environment."""
    cwd = cwd or os.getcwd()

    def here(path: str) -> str:
        return path if "://" in path or os.path.isabs(path) else os.path.join(cwd, path)

    args = ["wmtp", "register", here(uri)]
    if settings.config_source != "<defaults>":
        args += ["--config", here(settings.config_source)]
    mlflow = settings.config.mlflow
    if mlflow is not None and any(_relative_store(u) for u in (mlflow.tracking_uri, mlflow.registry_uri) if u):
        args += ["-C", cwd]
    return " ".join(shlex.quote(a) for a in args)


def _relative_store(uri: str) -> bool:
    """A tracking or registry URI that means a different store in another working directory."""
    for prefix in ("sqlite:///", "file://", "file:"):
        if uri.startswith(prefix):
            return not uri[len(prefix):].startswith("/")
    return "://" not in uri and not os.path.isabs(uri)


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

