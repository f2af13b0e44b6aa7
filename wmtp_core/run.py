"""``python -m wmtp_core.run``: train, storing checkpoints only through role-bound sinks."""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import sys
import time
from typing import Any, NoReturn

from rich.console import Console
from rich.text import Text

from wmtp_core import report
from wmtp_core.console import consoles, error_line
from wmtp_core.errors import StorageError, WmtpError
from wmtp_core.plan import count_steps, describe, final_outlook, preflight
from wmtp_core.plugins import make_plugin_manager
from wmtp_core.preemption import Preemption, plain_line
from wmtp_core.exits import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_NOT_REGISTERED,
    EXIT_OK,
    EXIT_PREEMPTED,
    EXIT_USAGE,
)
from wmtp_core.session import RunSession, Summary

__all__ = ["EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_NOT_REGISTERED", "EXIT_OK", "EXIT_PREEMPTED", "EXIT_USAGE",
           "leave", "main", "parser"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m wmtp_core.run", description=__doc__)
    p.add_argument("--config", help="config YAML (where): paths, mlflow, devices, storage")
    p.add_argument("--recipe", help="recipe YAML (what): run, train, optim, data, loss, model")
    p.add_argument("--run-name", help="overrides recipe run.name")
    p.add_argument("--tags", help="comma-separated tags, each NAME or NAME=VALUE")
    p.add_argument("--resume", "--resume-checkpoint", dest="resume", metavar="auto|latest|URI",
                   help="latest: continue from the run's newest committed checkpoint that verifies "
                        "(an error when it has none); auto: the same, or start fresh when the run has "
                        "no committed checkpoint (for a scheduler that reruns one command); URI: that "
                        "checkpoint")
    p.add_argument("--dry-run", action="store_true",
                   help="validate, show bindings and a storage estimate; write nothing")
    p.add_argument("--verbose", "-v", action="store_true")
    return p


def main(argv: list[str] | None = None, *, plugins: tuple[object, ...] = (),
         signals: Preemption | None = None) -> int:
    """Run from the command line. ``plugins``: extra plugin objects to register (for embedding
    WMTP in a notebook or a test); installed plugins are always loaded from entry points.
    ``signals``: handlers the caller installed and keeps until the process exits (``python -m
    wmtp_core.run`` does); without them, main installs its own for the run and removes them on
    return.

    A :class:`~wmtp_core.errors.WmtpError` (something the user can fix) is one line on stderr and
    exit status 2. Any other exception is a bug: it propagates with its traceback (exit 1).
    """
    args = parser().parse_args(argv)
    out, err = consoles()
    # --verbose is about WMTP's own decisions; third-party debug logs (botocore's request
    # headers among them) stay off so credentials never reach the console.
    logging.getLogger("wmtp").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    logging.getLogger("wmtp_core").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    own = signals is None
    signals = (signals or Preemption()).install()
    try:
        signals.say = plain_line(lambda text: err.print(text, highlight=False))
        if args.dry_run:  # writes nothing: a signal has its usual effect (Ctrl-C: one line, 130)
            signals.configure([])
        return _main(args, out, err, plugins, signals)
    except WmtpError as e:
        err.print(error_line(e))
        return EXIT_USAGE
    except StorageError as e:
        err.print(error_line(e))
        return EXIT_FAILED
    except KeyboardInterrupt:
        err.print(error_line("interrupted (Ctrl-C): committed checkpoints are intact; continue with "
                             "--resume latest"))
        return EXIT_INTERRUPTED
    finally:
        signals.ending()
        if own:
            signals.uninstall()


def _main(args: argparse.Namespace, out: Console, err: Console, plugins: tuple[object, ...],
          signals: Preemption) -> int:
    t0 = time.perf_counter()
    pm = make_plugin_manager()
    for plugin in plugins:
        pm.register(plugin)
    pm.check_pending()
    plan = preflight(pm, config=args.config, recipe=args.recipe, run_name=args.run_name,
                     tags=args.tags, resume=args.resume)
    for note in plan.settings.deprecated:
        err.print(Text.assemble(("deprecated: ", "yellow"), note), highlight=False)
    if args.verbose:
        for key in plan.settings.unused:
            err.print(Text.assemble(("unused: ", "yellow"),
                                    f"{key} is accepted for compatibility but has no effect here"))
    if args.dry_run:
        return dry_run(plan, out)
    signals.configure(plan.settings.config.paths.checkpoints.save_on_signal)
    if args.verbose:
        out.print(describe(plan)[0])
    session = RunSession(plan, pm, out, err, verbose=args.verbose, signals=signals)
    session.timings["preflight"] = time.perf_counter() - t0
    code = session.run()
    if session.summary is not None:
        summarise(session.summary, plan.settings, session.out, session.err, verbose=args.verbose)
    return code


def dry_run(plan: Any, out: Console) -> int:
    """Print what the run would do (the steps counted from its data, the bindings, the storage
    estimate, what it does with the final model); write nothing."""
    counted = count_steps(plan)
    lines = describe(counted)
    outlook = final_outlook(counted)
    for line in [*lines[:-1], *([outlook] if outlook else []), lines[-1]]:
        out.print(line)
    return EXIT_OK


def summarise(summary: Summary, settings: Any, out: Console, err: Console, *, verbose: bool = False) -> None:
    """What a run prints when it ended: where each role's checkpoints went, the loss, the
    asynchronous saves, and for an exit other than 0 the one line that says what to do next."""
    ending = summary.ending
    out.print("\n".join(report.summary_lines(summary.receipts, summary.deleted, summary.locations)))
    if summary.losses:
        out.print(f"run {summary.run!r}: {ending.status.value} at step {summary.step} in {summary.elapsed:.1f} s; "
                  f"objective {summary.losses[0]:.3f} -> {summary.losses[1]:.3f}"
                  + (f"; {ending.reason}" if ending.reason else ""))
    stats = summary.async_stats
    if stats:
        out.print(f"asynchronous saves: {len(stats)}; training paused {sum(s.staged_s for s in stats):.2f} s "
                  f"to stage them and waited {sum(s.waited_s for s in stats):.2f} s for saves in flight")
    if verbose and summary.timings:
        out.print("phases: " + ", ".join(f"{k} {v:.2f} s" for k, v in summary.timings.items()))
    last = summary.last_resume
    if ending.code == EXIT_FAILED and ending.reason:
        err.print(error_line(ending.reason))
    if ending.code == EXIT_PREEMPTED:
        err.print(preempted_line(summary), highlight=False)
    if ending.code == EXIT_NOT_REGISTERED:
        from wmtp_core.cli.commands import register_command  # with this run's registry settings

        err.print(error_line(f"{ending.reason}. The resume state of step {summary.step} is "
                             f"committed at {last or '?'}; register it later with:\n"
                             f"  {register_command(last or '<checkpoint URI>', settings)}"))


def preempted_line(summary: Summary) -> str:
    """What a preempted run says last: the step committed and where, and how to continue."""
    last = summary.last_resume or summary.resumed_from
    then = f"continue with --resume latest (exit status {EXIT_PREEMPTED})"
    if last is None:
        return (f"preempted before its first step: nothing was trained or committed; run the same "
                f"command again (exit status {EXIT_PREEMPTED})")
    trained = "" if summary.last_resume else " (where it resumed from: it trained no step)"
    return f"preempted: step {summary.step} is committed at {last}{trained}; {then}"


def leave(code: int) -> NoReturn:
    """Exit the process with ``code``, as ``python -m wmtp_core.run`` does after :func:`main`.

    A preempted run (:data:`EXIT_PREEMPTED`) leaves at once: by then its checkpoint is committed
    and every sink, tracker and lease is closed, so once the exit handlers have run (MLflow's
    among them) and the streams are flushed, the interpreter's teardown is skipped. That
    teardown (unloading torch and its libraries: about 0.75 s here) is time a scheduler's
    grace period would otherwise spend after the save. Every other status exits as usual.
    """
    if code == EXIT_PREEMPTED:
        atexit._run_exitfuncs()
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed or broken pipe: nothing left to say
                pass
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    # installed before anything else and never removed: a signal that arrives after main
    # returned, while the process leaves, is ignored rather than ending it with its own status
    leave(main(signals=Preemption().install()))
