"""``wmtp``: list plugins; list, verify and clean stored checkpoints; register a final model
later; report the bytes a run holds. Every byte of storage is read through fsspec.

Nothing here imports torch or MLflow at module level: listing and cleaning checkpoints must
start fast. ``register`` imports what it needs when it runs.
"""

from __future__ import annotations

import argparse

from wmtp_core.cli import commands, evaluate, gc, holdings
from wmtp_core.exits import EXIT_FAILED, EXIT_NOT_REGISTERED, EXIT_OK, EXIT_USAGE
from wmtp_core.console import consoles, error_line
from wmtp_core.errors import StorageError, WmtpError

__all__ = ["EXIT_FAILED", "EXIT_NOT_REGISTERED", "EXIT_OK", "EXIT_USAGE", "main", "parser"]


def parser() -> argparse.ArgumentParser:
    """The ``wmtp`` command line: ``plugins``, then each command its ``_add_*`` function adds."""
    p = argparse.ArgumentParser(prog="wmtp", description=__doc__.split("\n\n")[0].replace("``", ""))
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    storage = argparse.ArgumentParser(add_help=False)
    storage.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                         help="fsspec storage option for remote URIs (repeatable; never printed)")

    sub.add_parser("plugins", help="installed plugins, their sinks, policies and hooks"
                   ).set_defaults(func=commands.cmd_plugins)
    _add_checkpoints(sub, storage)
    _add_gc(sub, storage)
    _add_register(sub, storage)
    _add_report(sub, storage)
    evaluate.add_parser(sub)
    return p


def _add_checkpoints(sub: argparse._SubParsersAction, storage: argparse.ArgumentParser) -> None:
    """``wmtp checkpoints ls|verify|convert``."""
    ck = sub.add_parser("checkpoints", help="list or verify stored checkpoints")
    cks = ck.add_subparsers(dest="action", required=True, metavar="ACTION")
    ls = cks.add_parser("ls", parents=[storage],
                        help="checkpoints of a run, or of every run under a base path")
    ls.add_argument("uri", help="a run directory <base>/<run> or a base path")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=commands.cmd_ls)
    v = cks.add_parser("verify", parents=[storage], help="check every file against its manifest")
    v.add_argument("uri", help="one checkpoint directory, or a run directory (all committed ones)")
    v.add_argument("--no-quarantine", action="store_true",
                   help="only report a checkpoint whose files do not match its manifest; by default "
                        "it is moved aside as <name>.quarantined-<time>")
    v.set_defaults(func=commands.cmd_verify)
    cv = cks.add_parser("convert", parents=[storage],
                        help="write a sharded (FSDP) checkpoint as a single-process one, offline")
    cv.add_argument("uri", help="a committed sharded step_N directory")
    cv.add_argument("out", help="the new checkpoint directory, <dir>/<run>/<name> (default: the model "
                               "weights, e.g. .../final; with --full: the resume state)")
    cv.add_argument("--full", action="store_true",
                    help="the full resume state (model, optimizer, trainer), which --resume continues "
                         "on one process")
    cv.set_defaults(func=commands.cmd_convert)


def _add_gc(sub: argparse._SubParsersAction, storage: argparse.ArgumentParser) -> None:
    """``wmtp gc``."""
    gc_ = sub.add_parser("gc", parents=[storage], help="remove staging left by crashed saves")
    gc_.add_argument("uri", help="a run directory or a base path")
    gc_.add_argument("--min-age", type=float, default=3600.0, metavar="SECONDS",
                     help="only remove staging whose newest file is older than this (default 3600)")
    gc_.add_argument("--dry-run", action="store_true", help="show what would be removed")
    gc_.add_argument("--incomplete", action="store_true",
                     help="also abort incomplete S3 multipart uploads of killed saves")
    gc_.add_argument("--quarantined", action="store_true",
                     help="also remove quarantined checkpoints (ones that failed verification and were "
                          "moved aside); never removed otherwise")
    gc_.set_defaults(func=gc.cmd_gc)


def _add_register(sub: argparse._SubParsersAction, storage: argparse.ArgumentParser) -> None:
    """``wmtp register``."""
    reg = sub.add_parser("register", parents=[storage],
                         help="store the final model from a committed checkpoint through the final sink")
    reg.add_argument("uri", help="a committed step_N or final checkpoint directory")
    reg.add_argument("--config", help="config YAML (mlflow, storage); omitted: embedded defaults")
    reg.add_argument("--run-name", help="the run to register it for (default: the manifest's run)")
    reg.add_argument("-C", dest="directory", metavar="DIR",
                     help="run as if started in DIR, where the config's relative paths and stores "
                          "(sqlite:///mlflow.db) resolve; the command a run prints sets it when needed")
    reg.set_defaults(func=commands.cmd_register)


def _add_report(sub: argparse._SubParsersAction, storage: argparse.ArgumentParser) -> None:
    """``wmtp report``."""
    rep = sub.add_parser("report", parents=[storage], help="bytes a run holds, per role and sink")
    rep.add_argument("run", metavar="RUN_OR_URI",
                     help="a run directory, or a run name under the config's checkpoint base path")
    rep.add_argument("--config", help="config YAML (paths, mlflow); omitted: embedded defaults")
    rep.add_argument("--json", action="store_true", help="machine-readable output")
    rep.add_argument("--plot", metavar="PNG",
                     help="draw the bytes held per role over the steps, beside a trainer that copies "
                          "every save to the tracking store, into this PNG (needs wmtp[plot])")
    rep.add_argument("--price-per-gb-month", type=float, metavar="USD",
                     help="price the bytes held at the end, both ways "
                          "(default with --plot: 0.023, S3 Standard)")
    rep.set_defaults(func=holdings.cmd_report)


def main(argv: list[str] | None = None) -> int:
    """The ``wmtp`` command. A :class:`~wmtp_core.errors.WmtpError` is one line on stderr and
    exit status 2; any other exception is a bug and keeps its traceback (exit 1)."""
    try:
        args = parser().parse_args(argv)
    except SystemExit as e:  # --help, or a usage error argparse already printed
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    out, err = consoles()
    try:
        return args.func(args, out, err)
    except WmtpError as e:
        err.print(error_line(e))
        return EXIT_USAGE
    except StorageError as e:
        err.print(error_line(e))
        return 1
    except KeyboardInterrupt:
        err.print(error_line("interrupted (Ctrl-C)"))
        return 130
    except Exception as e:  # the storage a command reads failed: one line, exit 1
        line = _storage_failure(args, e)
        if line is None:
            raise
        err.print(error_line(line))
        return EXIT_FAILED


def _storage_failure(args: argparse.Namespace, e: Exception) -> str | None:
    """One line for an error of the storage (unreachable, refused, timed out) that ``args``'s
    command read, once its client's retries ran out: the command, the URI, the error. ``None``
    for any other exception (a bug, which keeps its traceback)."""
    from wmtp_core.cli.inventory import reading
    from wmtp_core.commit import store_class_of
    from wmtp_core.save_failures import first_line, is_storage_error, not_retried

    uri = reading()
    if uri is None or not is_storage_error(e):
        return None
    command = " ".join(str(w) for w in (args.command, getattr(args, "action", None)) if w)
    retries, why = store_class_of(uri).client_retries, not_retried(e)
    after = f" ({why})" if why else f" (after {retries})" if retries else ""
    return f"wmtp {command}: reading {uri} failed: {type(e).__name__}: {first_line(e)}{after}"
