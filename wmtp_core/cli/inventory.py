"""The checkpoint inventory the ``wmtp`` commands read: what a URI names (one checkpoint, a run
directory, a base path), and what every checkpoint directory of a run is, with its size and age.
Every byte is read through fsspec."""

from __future__ import annotations

import contextvars
import datetime as dt
import posixpath
import re
from typing import Any, Mapping, NamedTuple

import attrs
import fsspec

from wmtp_core.commit import (
    FINAL_NAME,
    MANIFEST,
    CheckpointState,
    CheckpointStore,
    Inspected,
    check_run_name,
    protocol_of,
    store_class,
    store_class_of,
)
from wmtp_core.errors import ConfigError, UsageError
from wmtp_core.naming import step_of

FINAL_DIR = FINAL_NAME
_CHECKPOINT_DIR = re.compile(rf"(step_\d+|{FINAL_DIR})")


class Located(NamedTuple):
    store: CheckpointStore
    kind: str
    """``checkpoint``, ``run`` or ``base``."""
    runs: list[str]
    checkpoint: str | None = None
    """The checkpoint's path when ``kind`` is ``checkpoint``."""


_READING: contextvars.ContextVar[str | None] = contextvars.ContextVar("wmtp_reading", default=None)


def reading() -> str | None:
    """The URI the command in this context last located (:func:`locate`), if any: the storage
    its failure is about."""
    return _READING.get()


def locate(uri: str, options: dict[str, Any]) -> Located:
    """What ``uri`` names: one checkpoint, one run directory, or a base path holding runs. It is
    read with the settings of the sink that serves its protocol (for ``s3://``: the ``s3``
    sink's retries and timeouts) under the ``options`` given."""
    _READING.set(uri)
    problem = store_class_of(uri).options_problem(options, lambda key: f"--storage-option {key}")
    if problem:
        raise UsageError(f"reading {uri}: {problem}")
    options = store_class_of(uri).with_defaults(options)
    try:
        fs, path = fsspec.core.url_to_fs(uri, **options)
    except TypeError:  # its message could quote a value; name the keys only
        raise UsageError(f"{uri}: this filesystem does not accept the storage options "
                         f"{', '.join(sorted(options))}") from None
    except (ImportError, ValueError) as e:  # an unknown protocol, or one not installed
        raise UsageError(f"{uri}: {e}") from None
    fs.invalidate_cache()  # a CLI must see what other processes wrote since fsspec listed it
    path = path.rstrip("/") or "/"
    if not fs.isdir(path):
        what = "is a file, not a directory" if fs.exists(path) else "does not exist"
        raise UsageError(f"{uri} {what}")
    name = posixpath.basename(path)
    store = store_class(protocol_of(fs))  # the protocol's own (for s3://: one that sees incomplete uploads)
    if fs.exists(posixpath.join(path, MANIFEST)) or (
            _CHECKPOINT_DIR.match(name) and not _holds_checkpoints(fs, path)):
        run_dir = posixpath.dirname(path)
        return Located(store(fs, posixpath.dirname(run_dir)), "checkpoint",
                       [posixpath.basename(run_dir)], path)
    if _holds_checkpoints(fs, path):
        return Located(store(fs, posixpath.dirname(path)), "run", [name])
    runs = sorted(posixpath.basename(d) for d in _subdirs(fs, path)
                  if _valid_run(posixpath.basename(d)) and _holds_checkpoints(fs, d))
    return Located(store(fs, path), "base", runs)


def _subdirs(fs, path: str) -> list[str]:
    return [e["name"].rstrip("/") for e in fs.ls(path, detail=True) if e.get("type") == "directory"]


def _holds_checkpoints(fs, path: str) -> bool:
    return any(_CHECKPOINT_DIR.match(posixpath.basename(d)) for d in _subdirs(fs, path))


def _valid_run(name: str) -> bool:
    try:
        check_run_name(name)
    except ConfigError:
        return False
    return True


@attrs.frozen
class Entry:
    """One checkpoint directory of a run, committed or not."""

    run: str
    name: str
    step: int | None
    role: str | None
    state: CheckpointState = attrs.field(converter=CheckpointState)
    """``committed``; ``unverifiable`` (a manifest that cannot be believed: never resumed from,
    never counted, never deleted); ``staging`` (WMTP's marker, no manifest: a save that did not
    finish, which ``gc`` removes); ``foreign`` (neither, or a ``<name>.quarantined-<time>``
    directory without WMTP's note: not written by WMTP, never touched);
    ``quarantined`` (failed verification and moved aside as ``<name>.quarantined-<time>``: never
    resumed from, counted or deleted by retention; ``gc --quarantined`` removes it)."""
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
    metrics: dict[str, float] = attrs.field(factory=dict)
    """Committed only: the metrics its manifest records (``keep_best`` ranks by one of them)."""

    @property
    def metric(self) -> str:
        """The metric ``ls`` shows: ``eval_loss`` if recorded, else ``loss``."""
        for name in ("eval_loss", "loss"):
            if isinstance(self.metrics.get(name), (int, float)):
                return f"{name}={self.metrics[name]:.4f}"
        return "-"

    def to_json(self) -> dict[str, Any]:
        out = attrs.asdict(self, filter=lambda a, _: a.name != "path")
        out["state"] = self.state.value
        return out


def scan(store: CheckpointStore, run: str) -> list[Entry]:
    """Every ``step_N`` and ``final`` directory of ``run``, by step, with what it is."""
    found = store.inspect(run)
    final = store.path_of(run, FINAL_DIR)
    if store.fs.isdir(final):
        found.append(store.inspect_dir(final))
    found.extend(store.quarantine_dirs(run))  # quarantined, or foreign: no note of WMTP's
    entries = [_entry(store, run, i) for i in found]
    # final after the step_N of its step; a final without a step last
    return sorted(entries, key=lambda e: (e.step is None, e.step or 0, e.name == FINAL_DIR))


def committed(store: CheckpointStore, run: str) -> list[Entry]:
    """Committed checkpoints of ``run``: every ``step_N`` and ``final`` whose manifest holds."""
    return [e for e in scan(store, run) if e.state is CheckpointState.COMMITTED]


def leftovers(store: CheckpointStore, run: str) -> list[Entry]:
    """Checkpoint directories of ``run`` that are not committed, with their size and age."""
    return [e for e in scan(store, run) if e.state is not CheckpointState.COMMITTED]


def _entry(store: CheckpointStore, run: str, i: Inspected) -> Entry:
    name = posixpath.basename(i.path)
    if i.state is CheckpointState.COMMITTED:
        m = i.manifest
        metrics = m.meta.get("metrics") if isinstance(m.meta, Mapping) else None
        return Entry(run=run, name=name, step=m.step, role=m.role.value, state="committed",
                     files=len(m.files), bytes=m.nbytes, created_at=m.created_at, lineage=m.lineage,
                     uri=store.uri(i.path), path=i.path,
                     metrics={k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float))})
    files, nbytes, newest = _contents(store.fs, i.path)
    step = step_of(name.partition(".")[0])  # step_8.quarantined-<time>: 8
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


