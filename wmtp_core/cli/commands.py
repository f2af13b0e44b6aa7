"""The ``wmtp`` commands themselves: each takes the parsed arguments and two consoles and returns
the exit status. What they read about stored checkpoints comes from :mod:`.inventory`."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
from typing import Any

from rich.console import Console

from wmtp_core.cli.inventory import locate, scan
from wmtp_core.commit import (
    CheckpointState,
    check_run_name,
)
from wmtp_core.config import load_settings
from wmtp_core.console import error_line
from wmtp_core.errors import CheckpointError, UsageError
from wmtp_core.events import RunInfo
from wmtp_core.plugins import (
    CORE_PLUGINS,
    build_catalog,
    distributions,
    make_plugin_manager,
)
from wmtp_core.exits import EXIT_FAILED, EXIT_NOT_REGISTERED, EXIT_OK
from wmtp_core.report import (
    human,
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
        if stored is not None and stored.step >= manifest.step:
            out.print(f"the final model of run {run.name!r} (step {stored.step}) is already stored at "
                      f"{stored.uri}; the weights of a step are stored once, nothing to do")
            return EXIT_OK
        if stored is not None:
            out.print(f"the final model stored at {stored.uri} is of step {stored.step}; storing the one of "
                      f"step {manifest.step}, which supersedes it")
        final = settings.config.storage.final if settings.config.storage is not None else None
        payload = final_payload_from(args.uri, options, {"algo": algo, "step": manifest.step},
                                     final.max_shard_size if final is not None else None)
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


