"""Evaluation records: the metrics of an evaluation that finished after its checkpoint committed.

A committed manifest is never rewritten, so an evaluation's result cannot go into it. It lives
beside the checkpoints instead, one small JSON file per evaluated checkpoint::

    <base_path>/<run>/evaluations/step_<N>.json
    {"step": N, "lineage": "...", "metrics": {"eval/mbpp/pass_at_1": 0.25, ...}, "evaluated_at": ...}

written whole (local disk: aside, fsync, rename; an object store: one PUT). Retention
(``keep_best``) and ``storage.final.from: best`` rank a checkpoint by its manifest's metrics and
its record's together (:func:`merged`); a record whose lineage differs from the checkpoint's
(another run's step of the same number) is ignored. The ``evaluations`` folder is no checkpoint:
listing, verification and ``wmtp gc`` pass it by. Deleting a checkpoint deletes its record.
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import time
from typing import Any, Iterable, Mapping

import attrs
from fsspec.implementations.local import LocalFileSystem

from wmtp_core.bounded import read_bounded
from wmtp_core.conditional import write_local
from wmtp_core.errors import CheckpointError
from wmtp_core.manifest import Manifest
from wmtp_core.naming import step_of

FOLDER = "evaluations"
MAX_RECORD = 1 << 20


def path_of(checkpoint_path: str) -> str:
    """Where the record of the checkpoint at ``checkpoint_path`` lives."""
    run_dir, name = posixpath.split(checkpoint_path.rstrip("/"))
    return posixpath.join(run_dir, FOLDER, f"{name}.json")


def clean(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of ``metrics`` (a record never carries anything else)."""
    return {str(k): float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def write(fs: Any, checkpoint_path: str, manifest: Manifest, metrics: Mapping[str, Any]) -> str:
    """Write the record of the committed checkpoint ``manifest`` describes; returns its path."""
    target = path_of(checkpoint_path)
    data = json.dumps({"step": manifest.step, "lineage": manifest.lineage, "run": manifest.run,
                       "metrics": clean(metrics), "evaluated_at": time.time()}, indent=2, sort_keys=True).encode()
    if isinstance(fs, LocalFileSystem):
        os.makedirs(posixpath.dirname(target), exist_ok=True)
        write_local(target, data)
    else:
        fs.pipe_file(target, data)
    return target


def remove(fs: Any, checkpoint_path: str) -> None:
    try:
        fs.rm_file(path_of(checkpoint_path))
    except FileNotFoundError:
        pass


def read(fs: Any, run_dir: str) -> dict[tuple[int, str], dict[str, float]]:
    """The records of a run: ``{(step, lineage): metrics}``. A record that cannot be read or
    believed is skipped (it only ranks; the checkpoint stays as it is)."""
    folder = posixpath.join(run_dir.rstrip("/"), FOLDER)
    try:
        names = fs.ls(folder, detail=False)
    except (FileNotFoundError, NotADirectoryError):
        return {}
    out: dict[tuple[int, str], dict[str, float]] = {}
    for name in names:
        base = posixpath.basename(name.rstrip("/"))
        if not base.endswith(".json") or step_of(base.removesuffix(".json")) is None:
            continue
        try:
            record = json.loads(read_bounded(fs, name, MAX_RECORD, "an evaluation record", where=name,
                                             error=CheckpointError))
        except (CheckpointError, ValueError, OSError):
            continue
        if isinstance(record, dict) and isinstance(record.get("metrics"), dict) and \
                isinstance(record.get("lineage"), str) and record.get("step") == step_of(base.removesuffix(".json")):
            out[(record["step"], record["lineage"])] = clean(record["metrics"])
    return out


def merged(committed: Iterable[tuple[str, Manifest]],
           records: Mapping[tuple[int, str], Mapping[str, float]]) -> list[tuple[str, Manifest]]:
    """``committed`` with each manifest's metrics joined by its record's (in memory only: the
    stored manifest is untouched); a record's value wins over the manifest's of the same name."""
    out = []
    for uri, m in committed:
        extra = records.get((m.step, m.lineage))
        if extra:
            meta = dict(m.meta)
            meta["metrics"] = {**dict(meta.get("metrics") or {}), **dict(extra)}
            m = attrs.evolve(m, meta=meta)
        out.append((uri, m))
    return out
