"""How a checkpoint is laid out: the names of its directories and of WMTP's own files.

A checkpoint is the directory ``<root>/<run>/<name>/``: ``step_<N>`` for resume state,
``final`` for the final model, ``<name>.quarantined-<time>`` once it failed verification.
"""

from __future__ import annotations

import re

from wmtp_core.errors import ConfigError
from wmtp_core.manifest import RUN_NAME

MANIFEST = "manifest.json"
STAGING_MARKER = ".wmtp-staging"
"""Written first into every directory a save creates; only directories carrying it (and no
manifest) are ever cleared by WMTP."""
OWN_FILES = frozenset({STAGING_MARKER, f".{MANIFEST}.tmp"})
"""WMTP's own bookkeeping files, never part of a checkpoint's contents."""
STEP_DIR = re.compile(r"step_(\d+)")
FINAL_NAME = "final"
QUARANTINE_NOTE = ".wmtp-quarantine"
"""Written into a quarantined checkpoint: why and when it was moved aside, and from where."""
QUARANTINED_DIR = re.compile(r"(step_\d+|final)\.quarantined-(\d{8}T\d{6}Z)(?:-\d+)?")


def check_run_name(name: str) -> str:
    """Refuse run names that could climb out of the base path or confuse listing."""
    if not isinstance(name, str) or not RUN_NAME.fullmatch(name) or ".." in name:
        raise ConfigError(
            f"run name {name!r} is not allowed: use letters, digits and '_.=+-' "
            "(at most 128 characters, no '/', no '..', not starting with '.')"
        )
    return name


def step_dirname(step: int) -> str:
    """The directory name of the resume checkpoint of ``step``."""
    return f"step_{step}"


def step_of(name: str) -> int | None:
    """The step a directory name (or a path ending in one) names: ``step_12`` -> 12; ``None``
    for anything else (``final``, a quarantined or foreign directory)."""
    found = STEP_DIR.fullmatch(name.rstrip("/").rpartition("/")[2])
    return int(found.group(1)) if found else None
