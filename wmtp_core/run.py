"""``python -m wmtp_core.run``: train, storing checkpoints only through role-bound sinks."""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import sys
import time
import uuid
from typing import Any

import attrs
from rich.console import Console
from rich.text import Text
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from wmtp_core import redact
from wmtp_core.commit import CheckpointError, check_run_name
from wmtp_core.console import consoles, error_line
from wmtp_core.config import ConfigError, Settings, load_settings
from wmtp_core.config.bindings import bindings_for, required_roles, resume_base
from wmtp_core.engine.data import DataError
from wmtp_core.engine.errors import TrainingError
from wmtp_core.engine.trainer import autocast_dtype, check_source, choose_device
from wmtp_core.events import RunEnded, RunInfo, RunStarted, SinkContext
from wmtp_core.plugins import build_catalog, make_plugin_manager
from wmtp_core.roles import BindingError, Role, validate
from wmtp_core.router import Router, SaveError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NOT_REGISTERED = 0, 1, 2, 3
USER_ERRORS = (ConfigError, BindingError, CheckpointError, DataError, TrainingError)

log = logging.getLogger("wmtp")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m wmtp_core.run", description=__doc__)
    p.add_argument("--config", help="config YAML (where): paths, mlflow, devices, storage")
    p.add_argument("--recipe", help="recipe YAML (what): run, train, optim, data, loss, model")
    p.add_argument("--run-name", help="overrides recipe run.name")
    p.add_argument("--tags", help="comma-separated tags, each NAME or NAME=VALUE")
    p.add_argument("--resume", "--resume-checkpoint", dest="resume", metavar="latest|URI",
                   help="continue from the newest committed checkpoint of the run, or from URI")
    p.add_argument("--dry-run", action="store_true",
                   help="validate, show bindings and a storage estimate; write nothing")
    p.add_argument("--verbose", "-v", action="store_true")
    return p


def parse_tags(recipe_tags: list[str], cli: str | None) -> dict[str, str]:
    tags: dict[str, str] = {}
    for item in list(recipe_tags) + [t for t in (cli or "").split(",") if t.strip()]:
        name, _, value = item.strip().partition("=")
        if not name:
            raise ConfigError(f"--tags: {item!r} is not accepted; use NAME or NAME=VALUE")
        tags[name] = value or "true"
    return tags


def run_name_for(settings: Settings, cli: str | None) -> str:
    """``--run-name``, else ``run.name``, else ``<algo>-<YYYYmmdd-HHMMSS>``. An empty name is
    refused rather than silently replaced."""
    name, where = (cli, "--run-name") if cli is not None else (settings.recipe.run.name, "run.name")
    if name == "":
        raise ConfigError(f"{where}: '' is not accepted; give a name, or leave run.name null (and "
                          "--run-name out) for the default <algo>-<YYYYmmdd-HHMMSS>")
    if name is None:
        name = f"{settings.recipe.train.algo}-{dt.datetime.now():%Y%m%d-%H%M%S}"
    try:
        return check_run_name(name)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


def main(argv: list[str] | None = None, *, plugins: tuple[object, ...] = ()) -> int:
    """Run from the command line. ``plugins``: extra plugin objects to register (for embedding
    WMTP in a notebook or a test); installed plugins are always loaded from entry points."""
    args = parser().parse_args(argv)
    args.plugins = plugins
    out, err = consoles()
    # --verbose is about WMTP's own decisions; third-party debug logs (botocore's request
    # headers among them) stay off so credentials never reach the console.
    logging.getLogger("wmtp").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    logging.getLogger("wmtp_core").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    try:
        return _main(args, out, err)
    except USER_ERRORS as e:
        err.print(error_line(e))
        return EXIT_USAGE


def _main(args: argparse.Namespace, out: Console, err: Console) -> int:
    from wmtp_core import report
    from wmtp_core.engine.model import count_parameters
    from wmtp_core.engine.trainer import model_config

    settings = load_settings(args.config, args.recipe)
    if args.verbose:
        for key in settings.unused:
            err.print(Text.assemble(("unused: ", "yellow"), f"{key} is accepted for compatibility but has no effect here"))
    pm = make_plugin_manager()
    for plugin in getattr(args, "plugins", ()):
        pm.register(plugin)
    pm.check_pending()
    catalog = build_catalog(pm)
    bindings = bindings_for(settings, catalog)
    required = required_roles(settings)
    validate(bindings, catalog, required)
    policies = build_policies(bindings, catalog)
    name = run_name_for(settings, args.run_name)
    tags = parse_tags(settings.recipe.run.tags, args.tags)
    try:
        mcfg = model_config(settings)
    except ValueError as e:
        raise ConfigError(f"{settings.recipe_source}: {e}") from None
    devices = settings.config.devices
    autocast_dtype(devices.mixed_precision, choose_device(devices.compute_backend))
    for split in ("train", "eval"):
        data = getattr(settings.recipe.data, split)
        if data is not None:
            for source in data.sources:
                check_source(settings, source, f"data.{split}.sources")
        if data is not None and data.max_length > mcfg.max_seq_len:
            raise ConfigError(
                f"{settings.recipe_source}: data.{split}.max_length: {data.max_length} is not accepted; "
                f"it must be <= model.max_seq_len ({mcfg.max_seq_len})"
            )

    descriptions = {n: s.description for n, s in catalog.sinks.items()}
    if args.dry_run or args.verbose:
        out.print("\n".join(report.bindings_lines(bindings, descriptions)), highlight=False, soft_wrap=True)
    if args.dry_run:
        ck = settings.config.paths.checkpoints
        steps = settings.recipe.train.max_steps or 0
        keeper = policies.get(Role.RESUME)
        est = report.estimate(count_parameters(mcfg), steps, ck.save_interval,
                              getattr(keeper, "keep_last", 10**9), getattr(keeper, "keep_every", 0),
                              ck.save_final)
        out.print(report.estimate_table(est))
        out.print(f"dry run: run {name!r} is valid; nothing was written.")
        return EXIT_OK
    return _train(settings, pm, catalog, bindings, required, name, tags, args, out, err)


def _train(settings, pm, catalog, bindings, required, name, tags, args, out, err) -> int:

    from wmtp_core.engine import distributed

    cfg = settings.config
    world = distributed.setup(cfg.devices, choose_device(cfg.devices.compute_backend))
    try:
        return _train_in(world, settings, pm, catalog, bindings, required, name, tags, args, out, err)
    finally:
        world.close()


OBSERVER_HOOKS = {"wmtp_run_started", "wmtp_step_ended", "wmtp_run_ended", "wmtp_checkpoint_committed",
                  "wmtp_checkpoint_deleted", "wmtp_resume_checkpoint_emitted", "wmtp_final_model_emitted"}


def _observers_off(pm) -> None:
    """On ranks other than 0: observers (tracking, progress, reports) see the run once, on rank 0."""
    for plugin in list(pm.get_plugins()):
        if {h.name for h in pm.get_hookcallers(plugin) or []} & OBSERVER_HOOKS:
            pm.unregister(plugin)


def _train_in(world, settings, pm, catalog, bindings, required, name, tags, args, out, err) -> int:
    from wmtp_core import report
    from wmtp_core.engine.trainer import Trainer

    cfg = settings.config
    if world.size > 1 and not cfg.devices.fsdp.enabled:
        raise TrainingError(f"{world.size} processes were launched but devices.fsdp.enabled is false: "
                            "each rank would train its own copy; enable fsdp")
    if not world.is_main:
        out, err = Console(quiet=True), Console(stderr=True, quiet=True)
        _observers_off(pm)
        bindings = attrs.evolve(bindings, policies=())  # retention runs once, on rank 0
    mlflow_settings = attrs.asdict(cfg.mlflow) if cfg.mlflow is not None else {}
    name, lineage = world.broadcast((name, uuid.uuid4().hex))
    run = RunInfo(name=name, algo=settings.recipe.train.algo, lineage=lineage,
                  experiment=mlflow_settings.get("experiment", "wmtp"), tags=tags)

    def context(role: Role, options: dict[str, Any]) -> SinkContext:
        st = cfg.storage
        base = resume_base(settings)
        role_cfg = getattr(st, role.value, None) if st is not None else None
        if role_cfg is not None and role_cfg.base_path:
            base = role_cfg.base_path
        return SinkContext(role=role, run=router.run, base_path=base, options=options,
                           mlflow=mlflow_settings)

    protected: set[tuple[str, int]] = set()  # (run, step) retention must keep: the resumed-from one
    router = Router(pm, catalog, bindings, run, required=required, context=context,
                    protected=lambda: protected)
    router.open()
    resume_sink = router.sink(Role.RESUME)
    if not args.resume and resume_sink.committed():
        raise CheckpointError(
            f"run {name!r} already has committed checkpoints at {resume_sink.location()}; "
            "continue it with --resume latest, or choose another --run-name"
        )
    trainer = Trainer(settings, run, pm, router)
    if args.resume:
        uri, manifest = _find_resume(resume_sink, args.resume, err, world, restore=trainer.restore)
        protected.add((manifest.run, manifest.step))
        run = attrs.evolve(run, lineage=manifest.lineage, resumed_from=redact.text(uri))
        router.run = trainer.run = run
        err.print(f"resuming {name!r} from {uri} (step {manifest.step})")
    try:
        pm.hook.wmtp_run_started(event=RunStarted(
            run=run, params=settings.params(), start_step=trainer.step, mlflow=mlflow_settings,
            bindings={b.role.value: b.sink for b in bindings.sinks},
        ))
    except Exception as e:  # e.g. a tracking server that cannot be reached: nothing was trained yet
        raise TrainingError(f"a plugin failed as the run started, before any step: "
                            f"{type(e).__name__}: {redact.text((str(e).splitlines() or [''])[0][:500])}") from None
    status, reason, code = "failed", "", EXIT_FAILED
    outcome = None
    t0 = time.perf_counter()
    try:
        outcome = _loop(trainer, err)
        status, reason, code = outcome.status, outcome.reason, EXIT_OK
        if outcome.status == "failed":
            code = EXIT_FAILED  # a diverged state is never committed as "latest"
        else:
            trainer.save_resume(outcome.metrics)
            router.wait()  # the last step's resume state is durable before the final model
        if code == EXIT_OK and Role.FINAL in required:
            # rank 0 asks the final sink; every rank then takes part in gathering the weights
            stored = failure = None
            if world.is_main:
                try:
                    stored = router.stored_final()
                except Exception as e:
                    failure = e
            stored, failed = world.broadcast((stored, failure is not None))
            try:
                if failure is not None:
                    raise failure
                if failed:
                    raise SaveError("rank 0 could not reach the final sink")
                if stored:
                    err.print(f"the final model of {name!r} is already stored at {stored}; "
                              "not storing it again", highlight=False)
                else:
                    trainer.save_final(outcome.metrics)
            except Exception as e:  # the resume state is committed: nothing is lost
                status, code = "failed", EXIT_NOT_REGISTERED
                reason = f"final model not stored ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:500]})"
                log.debug("final store failed", exc_info=True)
        router.wait()
    except SaveError as e:
        status, reason, code = "failed", str(e), EXIT_FAILED
    except KeyboardInterrupt:
        reason = "interrupted"
        raise
    except Exception as e:
        reason = f"{type(e).__name__}: {e}"
        raise
    finally:
        try:
            router.close()
        except SaveError as e:
            status, reason, code = "failed", str(e), EXIT_FAILED
        finally:
            try:
                pm.hook.wmtp_run_ended(event=RunEnded(
                    run=run, status=status, last_step=trainer.step, reason=redact.text(reason),
                    metrics=outcome.metrics if outcome else {}, receipts=router.receipts,
                ))
            except Exception as e:  # an observer's failure must not mask the run's outcome
                log.warning("a plugin failed in wmtp_run_ended: %s: %s", type(e).__name__, e)
    elapsed = time.perf_counter() - t0
    locations = {role: router.sink(role).location() for role in required}
    out.print("\n".join(report.summary_lines(router.receipts, router.deleted, locations)),
              highlight=False, soft_wrap=True)
    if outcome and outcome.losses:
        out.print(f"run {name!r}: {status} at step {trainer.step} in {elapsed:.1f} s; "
                  f"loss {outcome.first_loss:.3f} -> {outcome.last_loss:.3f}"
                  + (f"; {reason}" if reason else ""), highlight=False, soft_wrap=True)
    if router.async_stats:
        stats = router.async_stats
        out.print(f"asynchronous saves: {len(stats)}; training paused {sum(s.staged_s for s in stats):.2f} s "
                  f"to stage them and waited {sum(s.waited_s for s in stats):.2f} s for saves in flight",
                  highlight=False)
    if code == EXIT_FAILED and reason:
        err.print(error_line(reason))
    if code == EXIT_NOT_REGISTERED:
        last = next((r for r in reversed(router.receipts) if r.role is Role.RESUME), None)
        err.print(error_line(f"{reason}. The resume state of step {trainer.step} is "
                  f"committed at {last.uri if last else '?'}; register it later with:\n"
                  f"  wmtp register {last.uri if last else '<checkpoint URI>'}"))
    return code


def build_policies(bindings, catalog) -> dict[Role, Any]:
    """Build each bound policy now, so bad options fail before training (and in --dry-run)."""
    out = {}
    for p in bindings.policies:
        try:
            out[p.role] = catalog.policies[p.policy].factory(dict(p.options))
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{p.origin}: policy {p.policy!r}: {e}") from None
    return out


def _load(sink, uri: str, world):
    # sharded checkpoints are verified by all ranks together; other sinks take the URI alone
    return sink.load(uri, world=world) if world is not None and world.size > 1 else sink.load(uri)


def _find_resume(sink, spec: str, err: Console, world=None, restore=lambda parts, uri: None):
    """Load and restore the checkpoint ``spec`` names; for ``latest``, the newest one that
    verifies and restores, saying why each newer one was skipped (a directory whose manifest
    cannot be believed included). ``restore(parts, uri)`` raises CheckpointError to refuse."""
    if spec != "latest":
        manifest, parts = _load(sink, spec, world)
        restore(parts, spec)
        return spec, manifest
    committed = sink.committed()
    if not committed:
        raise CheckpointError(f"--resume latest: no committed checkpoint under {sink.location()}")
    unverifiable = getattr(sink, "unverifiable", lambda: [])()
    newest = committed[-1][1].step
    for uri, step, reason in unverifiable:  # newer than anything committed: say why it is not used
        if step > newest:
            err.print(Text.assemble(("skipping ", "yellow"), f"{uri}: {reason}"))
    for uri, _ in reversed(committed):
        try:
            manifest, parts = _load(sink, uri, world)
            restore(parts, uri)
            return uri, manifest
        except CheckpointError as e:
            err.print(Text.assemble(("skipping ", "yellow"), f"{uri}: {e}"))
    raise CheckpointError(f"--resume latest: no checkpoint under {sink.location()} verifies")


def _loop(trainer, err: Console):
    with Progress(TextColumn("{task.description}", style="bold", markup=False), BarColumn(),
                  MofNCompleteColumn(), TextColumn("{task.fields[info]}", markup=False),
                  TimeElapsedColumn(), console=err,
                  transient=False) as progress:
        task = progress.add_task(trainer.run.name, total=trainer.total_steps,
                                 completed=trainer.step, info="")

        def on_step(step, metrics):
            info = f"loss {metrics['loss']:.3f}"
            if "eval_loss" in metrics:
                info += f" eval {metrics['eval_loss']:.3f}"
            progress.update(task, completed=step, info=info)

        trainer.on_step = on_step
        return trainer.train()


if __name__ == "__main__":
    sys.exit(main())
