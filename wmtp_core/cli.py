"""``wmtp``: list plugins; list, verify and clean stored checkpoints; register a final model
later; report the bytes a run holds. Every byte of storage is read through fsspec."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import posixpath
import re
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import attrs
import fsspec
from rich.console import Console
from rich.text import Text

# Nothing here imports torch at module level (wmtp_core.run, filesink and the engine do): listing
# and cleaning checkpoints must start fast. ``register`` imports them when it needs them.
from wmtp_core.commit import MANIFEST, STAGING_MARKER, CheckpointError, CheckpointStore, check_run_name
from wmtp_core.config import ConfigError, load_settings
from wmtp_core.console import consoles
from wmtp_core.config.bindings import bindings_for, resume_base
from wmtp_core.engine.errors import TrainingError
from wmtp_core.events import Manifest, Payload, RunInfo, SinkContext
from wmtp_core.report import logged_model_bytes
from wmtp_core.plugins import build_catalog, distributions, make_plugin_manager
from wmtp_core.report import human
from wmtp_core.roles import BindingError, Bindings, Role
from wmtp_core.router import Router

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NOT_REGISTERED = 0, 1, 2, 3
"""The same meanings as ``python -m wmtp_core.run``'s exit codes."""
FINAL_DIR = "final"
"""``wmtp_core.filesink.FINAL_DIR``: where a file-like sink commits a run's final model."""
USER_ERRORS = (ConfigError, BindingError, CheckpointError, TrainingError, FileNotFoundError,
               ValueError, ImportError)
_CHECKPOINT_DIR = re.compile(rf"^(step_\d+|{FINAL_DIR})$")
EXAMPLE_LENGTH = 128
"""Tokens per row of the example input: the recipe's default ``data.*.max_length``, so a model
registered later accepts what one registered at the end of a default run accepts."""


# ----------------------------------------------------------------------------- arguments
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wmtp", description=__doc__.replace("``", ""))
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    storage = argparse.ArgumentParser(add_help=False)
    storage.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                         help="fsspec storage option for remote URIs (repeatable; never printed)")

    sub.add_parser("plugins", help="installed plugins, their sinks, policies and hooks"
                   ).set_defaults(func=cmd_plugins)
    ck = sub.add_parser("checkpoints", help="list or verify stored checkpoints")
    cks = ck.add_subparsers(dest="action", required=True, metavar="ACTION")
    ls = cks.add_parser("ls", parents=[storage],
                        help="checkpoints of a run, or of every run under a base path")
    ls.add_argument("uri", help="a run directory <base>/<run> or a base path")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=cmd_ls)
    v = cks.add_parser("verify", parents=[storage], help="check every file against its manifest")
    v.add_argument("uri", help="one checkpoint directory, or a run directory (all committed ones)")
    v.set_defaults(func=cmd_verify)

    gc = sub.add_parser("gc", parents=[storage], help="remove staging left by crashed saves")
    gc.add_argument("uri", help="a run directory or a base path")
    gc.add_argument("--min-age", type=float, default=3600.0, metavar="SECONDS",
                    help="only remove staging whose newest file is older than this (default 3600)")
    gc.add_argument("--dry-run", action="store_true", help="show what would be removed")
    gc.set_defaults(func=cmd_gc)

    reg = sub.add_parser("register", parents=[storage],
                         help="store the final model from a committed checkpoint through the final sink")
    reg.add_argument("uri", help="a committed step_N or final checkpoint directory")
    reg.add_argument("--config", help="config YAML (mlflow, storage); omitted: embedded defaults")
    reg.add_argument("--run-name", help="the run to register it for (default: the manifest's run)")
    reg.set_defaults(func=cmd_register)

    rep = sub.add_parser("report", parents=[storage], help="bytes a run holds, per role and sink")
    rep.add_argument("run", metavar="RUN_OR_URI",
                     help="a run directory, or a run name under the config's checkpoint base path")
    rep.add_argument("--config", help="config YAML (paths, mlflow); omitted: embedded defaults")
    rep.add_argument("--json", action="store_true", help="machine-readable output")
    rep.set_defaults(func=cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
    except SystemExit as e:  # --help, or a usage error argparse already printed
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    out, err = consoles()
    try:
        return args.func(args, out, err)
    except Exception as e:
        if not isinstance(e, user_errors()):
            raise
        err.print(Text.assemble(("error: ", "bold red"), str(e)))
        return EXIT_USAGE


def user_errors() -> tuple[type[Exception], ...]:
    """Errors the user can fix. ``DataError`` can only come from code that loaded the engine's
    data module; importing it here would load torch for every command."""
    data = sys.modules.get("wmtp_core.engine.data")
    return USER_ERRORS + ((data.DataError,) if data is not None else ())


def storage_options(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs; ``true``/``false`` become booleans. Values never appear in errors."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError("--storage-option expects NAME=VALUE, e.g. endpoint_url=http://127.0.0.1:9000")
        out[key.strip()] = {"true": True, "false": False}.get(value.lower(), value)
    return out


# ----------------------------------------------------------------------------- locating
class Located(NamedTuple):
    store: CheckpointStore
    kind: str
    """``checkpoint``, ``run`` or ``base``."""
    runs: list[str]
    checkpoint: str | None = None
    """The checkpoint's path when ``kind`` is ``checkpoint``."""


def locate(uri: str, options: dict[str, Any]) -> Located:
    """What ``uri`` names: one checkpoint, one run directory, or a base path holding runs."""
    try:
        fs, path = fsspec.core.url_to_fs(uri, **options)
    except TypeError:  # its message could quote a value; name the keys only
        raise ValueError(f"{uri}: this filesystem does not accept the storage options "
                         f"{', '.join(sorted(options))}") from None
    except ImportError as e:  # a known protocol whose fsspec implementation is not installed
        raise ImportError(f"{uri}: {e}") from None
    fs.invalidate_cache()  # a CLI must see what other processes wrote since fsspec listed it
    path = path.rstrip("/") or "/"
    if not fs.isdir(path):
        what = "is a file, not a directory" if fs.exists(path) else "does not exist"
        raise FileNotFoundError(f"{uri} {what}")
    name = posixpath.basename(path)
    if fs.exists(posixpath.join(path, MANIFEST)) or (
            _CHECKPOINT_DIR.match(name) and not _holds_checkpoints(fs, path)):
        run_dir = posixpath.dirname(path)
        return Located(CheckpointStore(fs, posixpath.dirname(run_dir)), "checkpoint",
                       [posixpath.basename(run_dir)], path)
    if _holds_checkpoints(fs, path):
        return Located(CheckpointStore(fs, posixpath.dirname(path)), "run", [name])
    runs = sorted(posixpath.basename(d) for d in _subdirs(fs, path)
                  if _valid_run(posixpath.basename(d)) and _holds_checkpoints(fs, d))
    return Located(CheckpointStore(fs, path), "base", runs)


def _subdirs(fs, path: str) -> list[str]:
    return [e["name"].rstrip("/") for e in fs.ls(path, detail=True) if e.get("type") == "directory"]


def _holds_checkpoints(fs, path: str) -> bool:
    return any(_CHECKPOINT_DIR.match(posixpath.basename(d)) for d in _subdirs(fs, path))


def _valid_run(name: str) -> bool:
    try:
        check_run_name(name)
    except ValueError:
        return False
    return True


# ----------------------------------------------------------------------------- scanning
STATES = ("committed", "unverifiable", "staging", "foreign")


@attrs.frozen
class Entry:
    """One checkpoint directory of a run, committed or not."""

    run: str
    name: str
    step: int | None
    role: str | None
    state: str
    """``committed``; ``unverifiable`` (a manifest that cannot be believed: never resumed from,
    never counted, never deleted); ``staging`` (WMTP's marker, no manifest: a save that did not
    finish, which ``gc`` removes); ``foreign`` (neither: not written by WMTP, never touched)."""
    files: int
    bytes: int
    created_at: str | None
    lineage: str | None
    uri: str
    path: str = attrs.field(repr=False)
    modified: float | None = None
    """Not committed only: the newest file's modification time (the age ``gc`` tests)."""
    problem: str = ""
    """Not committed only: why."""

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self, filter=lambda a, _: a.name != "path")


def scan(store: CheckpointStore, run: str) -> list[Entry]:
    """Every ``step_N`` and ``final`` directory of ``run``, by step, with what it is."""
    found = store.inspect(run)
    final = store.path_of(run, FINAL_DIR)
    if store.fs.isdir(final):
        found.append(store.inspect_dir(final))
    entries = [_entry(store, run, i) for i in found]
    # final after the step_N of its step; a final without a step last
    return sorted(entries, key=lambda e: (e.step is None, e.step or 0, e.name == FINAL_DIR))


def committed(store: CheckpointStore, run: str) -> list[Entry]:
    """Committed checkpoints of ``run``: every ``step_N`` and ``final`` whose manifest holds."""
    return [e for e in scan(store, run) if e.state == "committed"]


def leftovers(store: CheckpointStore, run: str) -> list[Entry]:
    """Checkpoint directories of ``run`` that are not committed, with their size and age."""
    return [e for e in scan(store, run) if e.state != "committed"]


def _entry(store: CheckpointStore, run: str, i) -> Entry:
    name = posixpath.basename(i.path)
    if i.state == "committed":
        m = i.manifest
        return Entry(run=run, name=name, step=m.step, role=m.role.value, state="committed",
                     files=len(m.files), bytes=m.nbytes, created_at=m.created_at, lineage=m.lineage,
                     uri=store.uri(i.path), path=i.path)
    files, nbytes, newest = _contents(store.fs, i.path)
    step = int(name.removeprefix("step_")) if name.startswith("step_") else None
    return Entry(run=run, name=name, step=step, role=None, state=i.state, files=files, bytes=nbytes,
                 created_at=None, lineage=None, uri=store.uri(i.path), path=i.path, modified=newest,
                 problem=i.problem)


def _contents(fs, path: str) -> tuple[int, int, float | None]:
    """Files, bytes and the newest modification time under ``path``."""
    infos = list(fs.find(path, detail=True).values())
    times = [t for t in (_mtime(fs, i) for i in infos) if t is not None]
    if not times:  # an empty directory: its own time, where the filesystem keeps one
        times = [t for t in [_mtime(fs, fs.info(path))] if t is not None]
    return len(infos), sum(i.get("size") or 0 for i in infos), max(times, default=None)


def _mtime(fs, info: dict[str, Any]) -> float | None:
    """A POSIX timestamp from an fsspec info dict: local ``mtime``, S3 ``LastModified``, or
    ``fs.modified`` for other filesystems."""
    for key in ("mtime", "LastModified", "last_modified", "updated"):
        if info.get(key) is not None:
            return _timestamp(info[key])
    try:
        return _timestamp(fs.modified(info["name"]))
    except (NotImplementedError, OSError, KeyError, ValueError, TypeError):
        return None


def _timestamp(value: Any) -> float:
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    if value.tzinfo is None:  # object stores report UTC
        value = value.replace(tzinfo=dt.timezone.utc)
    return value.timestamp()


# ----------------------------------------------------------------------------- commands
def cmd_plugins(args, out: Console, err: Console) -> int:
    pm = make_plugin_manager()
    catalog = build_catalog(pm)  # validates names across plugins
    dists = distributions(pm)
    sinks = _contributions(pm.hook.wmtp_register_sinks)
    policies = _contributions(pm.hook.wmtp_register_policies)
    plugins = sorted(pm.list_name_plugin(), key=lambda np: str(np[0]))
    out.print(f"{len(plugins)} plugins; sinks: {catalog.describe_sinks()}")
    for name, plugin in plugins:
        out.print(f"\n{name}  {dists.get(name, '(not installed from a distribution)')}")
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
        raise ValueError(f"{args.uri} is one checkpoint; list its run directory or the base path")
    entries = [e for run in loc.runs for e in scan(loc.store, run)]
    if args.json:
        out.out(json.dumps([e.to_json() for e in entries], indent=2))
        return EXIT_OK
    if not entries:
        out.print(f"no checkpoints under {args.uri}")
        return EXIT_OK
    rows = [[e.run, e.name, "" if e.step is None else str(e.step), e.role or "-", e.state,
             str(e.files), human(e.bytes), (e.created_at or "-")[:19].replace("T", " "),
             (e.lineage or "-")[:8]] for e in entries]
    header = ["run", "name", "step", "role", "state", "files", "bytes", "created_at", "lineage"]
    out.print("\n".join(_columns([header, *rows])))
    for e in entries:
        if e.problem and e.state != "staging":
            out.print(f"{e.state}: {e.uri}: {e.problem}")
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
        e.path for run in loc.runs for e in scan(store, run) if e.state in ("committed", "unverifiable")]
    if not paths:
        raise CheckpointError(f"{args.uri} holds no committed checkpoint to verify")
    failed = 0
    for path in paths:
        try:
            m = store.verify(path)
            out.print(f"OK      {store.uri(path)}  ({_count(len(m.files), 'file')}, {human(m.nbytes)})")
        except CheckpointError as e:
            failed += 1
            out.print(f"FAILED  {store.uri(path)}: {e}")
    out.print(f"{len(paths) - failed} of {_count(len(paths), 'checkpoint')} verified")
    return EXIT_FAILED if failed else EXIT_OK


def cmd_gc(args, out: Console, err: Console) -> int:
    if args.min_age < 0:
        raise ValueError(f"--min-age: {args.min_age:g} is not accepted; use a number of seconds >= 0")
    loc = locate(args.uri, storage_options(args.storage_option))
    if loc.kind == "checkpoint":
        raise ValueError(f"{args.uri} is one checkpoint; gc takes a run directory or a base path")
    fs, now, freed, removed = loc.store.fs, time.time(), 0, 0
    verb = "would remove" if args.dry_run else "removed"
    for run in loc.runs:
        for e in leftovers(loc.store, run):
            if e.state == "unverifiable":
                out.print(f"kept    {e.uri}: its {MANIFEST} cannot be believed ({e.problem}); "
                          "inspect it before deleting it by hand")
                continue
            if e.state == "foreign":
                out.print(f"kept    {e.uri}: not ours (no {MANIFEST} and no {STAGING_MARKER}: "
                          "WMTP did not write it)")
                continue
            age = now - e.modified if e.modified is not None else None
            if args.min_age > 0 and (age is None or age < args.min_age):
                # young staging may be a save still in flight in another process
                seen = "age unknown" if age is None else f"newest file {age:.0f} s old"
                out.print(f"kept    {e.uri}: {seen}, under --min-age {args.min_age:g} s")
                continue
            # the save may have committed since the listing: look again just before removing
            if fs.exists(posixpath.join(e.path, MANIFEST)) or \
                    not fs.exists(posixpath.join(e.path, STAGING_MARKER)):
                continue
            if not args.dry_run:
                fs.rm(e.path, recursive=True)
            freed, removed = freed + e.bytes, removed + 1
            out.print(f"{verb} {e.uri} ({_count(e.files, 'file')}, {human(e.bytes)})")
    out.print(f"{verb} {_count(removed, 'staging directory', 'staging directories')}; "
              f"{'would free' if args.dry_run else 'freed'} {human(freed)} ({freed} bytes)")
    return EXIT_OK


def cmd_register(args, out: Console, err: Console) -> int:
    options = storage_options(args.storage_option)
    loc = locate(args.uri, options)
    if loc.kind != "checkpoint":
        raise ValueError(f"{args.uri} is not a checkpoint directory; name a step_N or final directory")
    manifest = loc.store.read_manifest(loc.checkpoint)  # refuses staging before anything else
    algo = manifest.meta.get("algo")
    if not algo:
        raise CheckpointError(f"{args.uri}: its manifest records no algo (meta.algo)")
    settings = load_settings(args.config)
    mlflow_settings = attrs.asdict(settings.config.mlflow) if settings.config.mlflow is not None else {}
    run = RunInfo(name=check_run_name(args.run_name or manifest.run), algo=algo,
                  lineage=manifest.lineage, experiment=mlflow_settings.get("experiment", "wmtp"))
    router = final_router(settings, run, mlflow_settings)
    source = loc.store.uri(loc.checkpoint)
    try:
        try:
            stored = router.stored_final()
        except Exception as e:  # the sink could not be asked: it is unreachable or broken
            return _not_registered(err, e, source)
        if stored:
            out.print(f"the final model of run {run.name!r} is already stored at {stored}; "
                      "it is stored once, nothing to do")
            return EXIT_OK
        payload = final_payload(args.uri, options)
        metrics = {k: float(v) for k, v in manifest.meta.get("metrics", {}).items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        try:
            receipt = router.emit(Role.FINAL, step=manifest.step, payload=payload, metrics=metrics,
                                  nbytes=_tensor_bytes(payload))
        except Exception as e:
            return _not_registered(err, e, source)
    finally:
        router.close()
    out.print(f"stored the final model of run {run.name!r} (step {manifest.step}) from {source}")
    out.print(f"{receipt.uri}  via {receipt.sink}, {human(receipt.nbytes)}")
    return EXIT_OK


def final_router(settings, run: RunInfo, mlflow_settings: dict[str, Any]) -> Router:
    """A router for the final role alone, bound exactly as a run with this config binds it."""
    pm = make_plugin_manager()
    catalog = build_catalog(pm)
    binding = bindings_for(settings, catalog).sink_for(Role.FINAL)
    bindings = Bindings(sinks=[binding] if binding else [])  # the Router refuses an unbound final

    def context(role: Role, options) -> SinkContext:
        # the same base path a run gives its final sink (wmtp_core.run._train)
        st = settings.config.storage
        base = st.final.base_path if st is not None and st.final is not None and st.final.base_path \
            else resume_base(settings)
        return SinkContext(role=role, run=run, base_path=base, options=options, mlflow=mlflow_settings)

    router = Router(pm, catalog, bindings, run, required=frozenset({Role.FINAL}), context=context)
    router.open()
    return router


def final_payload(uri: str, options: dict[str, Any]) -> Payload:
    """What ``Trainer.final_payload`` hands the final sink, rebuilt from verified weights."""
    import torch

    from wmtp_core.engine.model import model_from_weights
    from wmtp_core.filesink import load_model_from_checkpoint

    loaded = load_model_from_checkpoint(uri, options)
    try:  # the stored architecture and weights are untrusted: checked before anything is built
        module = model_from_weights(dict(loaded.model_config), dict(loaded.weights), uri)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    cfg = module.cfg
    module.eval()
    # two rows, so the exported program keeps a dynamic batch dimension
    generator = torch.Generator().manual_seed(0)
    example = torch.randint(0, cfg.vocab_size, (2, min(EXAMPLE_LENGTH, cfg.max_seq_len)),
                            generator=generator)
    return Payload(parts={"model": dict(loaded.weights)}, model=module, example_input=example,
                   model_config=attrs.asdict(cfg))


def _tensor_bytes(payload: Payload) -> int:
    from wmtp_core.engine.state import tensor_bytes

    return tensor_bytes(dict(payload.parts))


def _not_registered(err: Console, e: Exception, source: str) -> int:
    err.print(Text.assemble(("error: ", "bold red"),
                            f"final model not stored ({type(e).__name__}: {e}). {source} is unchanged; "
                            "run this command again once the final sink is reachable"))
    return EXIT_NOT_REGISTERED


def cmd_report(args, out: Console, err: Console) -> int:
    settings = load_settings(args.config)
    uri = args.run
    if "/" not in uri and "://" not in uri:  # a bare run name, under the configured base path
        uri = f"{resume_base(settings).rstrip('/')}/{check_run_name(uri)}"
    loc = locate(uri, storage_options(args.storage_option))
    if loc.kind == "base":
        held = f"it holds the runs {', '.join(loc.runs)}; name one" if loc.runs else "it holds no checkpoint"
        raise FileNotFoundError(f"{uri} is not a run directory: {held}")
    store, run = loc.store, loc.runs[0]
    entries = scan(store, run)
    sink = _file_sink_name(store)
    resume = [e for e in entries if e.state == "committed" and e.role == Role.RESUME.value]
    staging = [e for e in entries if e.state == "staging"]
    others = {state: [e for e in entries if e.state == state] for state in ("unverifiable", "foreign")}
    finals = [{"sink": sink, "uri": e.uri, "step": e.step, "bytes": e.bytes}
              for e in entries if e.state == "committed" and e.role == Role.FINAL.value]
    lineages = {e.lineage for e in entries if e.lineage}
    if settings.config.mlflow is not None and lineages:
        finals += registered(settings.config.mlflow, lineages, err)
    report = {
        "run": run,
        "uri": store.uri(store.run_dir(run)),
        "resume": {"sink": sink, "committed": len(resume), "bytes": sum(e.bytes for e in resume),
                   "newest_step": max((e.step for e in resume), default=None)},
        "staging": {"count": len(staging), "bytes": sum(e.bytes for e in staging)},
        **{state: {"count": len(es), "bytes": sum(e.bytes for e in es)} for state, es in others.items()},
        "final": finals,
    }
    report["total_bytes"] = (report["resume"]["bytes"] + report["staging"]["bytes"]
                             + report["unverifiable"]["bytes"] + sum(f["bytes"] or 0 for f in finals))
    if args.json:
        out.out(json.dumps(report, indent=2))
    else:
        out.print("\n".join(_report_lines(report)))
    return EXIT_OK


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


def _file_sink_name(store: CheckpointStore) -> str:
    """The installed sink that serves this filesystem's protocol (what a run would bind)."""
    spec = build_catalog(make_plugin_manager()).sink_for_protocol(store.protocol)
    return spec.name if spec is not None else store.protocol


def registered(mlflow_cfg, lineages: set[str], err: Console) -> list[dict[str, Any]]:
    """Registered versions of ``wmtp_*`` models made from one of ``lineages``, with their bytes."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    tracking = mlflow_cfg.tracking_uri
    registry = mlflow_cfg.registry_uri or tracking
    for uri in {tracking, registry}:
        # opening a sqlite URI creates the file: a report must not leave a store behind
        if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
            err.print(f"note: no MLflow store at {uri}; registered models not counted")
            return []
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    client = MlflowClient(tracking_uri=tracking, registry_uri=registry)
    found = []
    try:
        for model in client.search_registered_models(filter_string="name LIKE 'wmtp_%'"):
            found += [(model.name, int(v.version), _model_id(v))
                      for v in client.search_model_versions(f"name='{model.name}'")
                      if (v.tags or {}).get("wmtp.lineage") in lineages]
        return [{"sink": "mlflow_registry", "uri": f"models:/{name}/{version}", "step": None,
                 "bytes": logged_model_bytes(client, model_id)}
                for name, version, model_id in sorted(found)]
    except MlflowException as e:
        err.print(f"note: could not read the MLflow registry at {registry}: {e.message}")
        return []


def _model_id(version) -> str | None:
    """The logged model behind a version: MLflow 3 leaves ``model_id`` empty on versions it
    registered from a logged model, whose ``source`` is then ``models:/<model id>``."""
    source = version.source or ""
    return version.model_id or (source.removeprefix("models:/") if source.startswith("models:/m-") else None)


