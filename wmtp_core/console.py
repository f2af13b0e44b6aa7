"""The consoles both entry points print through: user text is never markup, secrets never show."""

from __future__ import annotations

import logging
import sys

from rich.console import Console
from rich.text import Text

from wmtp_core import redact


def consoles() -> tuple[Console, Console]:
    """stdout and stderr consoles that never read user text as markup (a run name or a path
    holding ``[/b]`` is printed as it is) and hide every secret (:mod:`wmtp_core.redact`) in
    what they print. Also hides secrets in log records from now on."""
    setup_logging()
    redact.remember_environment()
    return (Console(file=redact.RedactingStream(sys.stdout), soft_wrap=True, markup=False, highlight=False),
            Console(file=redact.RedactingStream(sys.stderr), soft_wrap=True, markup=False, highlight=False))


def setup_logging() -> None:
    """Log records go to the current stderr through the redaction rule. An application that
    configured logging itself (a notebook) keeps its handlers; they get the redacting filter."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(redact.RedactingStream(redact.CurrentStderr()))
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.WARNING)
    redact.install_logging_filter()


def error_line(message: object) -> Text:
    """``error: <message>``, the message shown exactly as it is."""
    return Text.assemble(("error: ", "bold red"), str(message))


def styled(prefix: str, style: str, message: object) -> Text:
    return Text.assemble((prefix, style), str(message))
