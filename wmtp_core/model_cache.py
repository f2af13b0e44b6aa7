"""A node-local cache of the models a run reads from object storage or a registry, so that the
ranks of a node download each model once, not once per rank.

Where: ``$WMTP_CACHE_DIR/models/<sha256 of the source>/`` (default ``~/.cache/wmtp/models/``),
on the node's own disk; give it room for the largest model a node reads. An entry holds
``files/`` (the model's files, as the loader reads them), ``record.json`` (written last, aside,
fsynced and renamed into place: the commit) and ``lock``.

One download per node: the first process takes an exclusive ``fcntl.flock`` on the entry's
``lock``, downloads, hashes (sha256, in pieces, from the page cache right after each file
landed), fsyncs and writes the record; the others block on the lock, then find the record and
reuse the entry. An entry is reused only when its record names the source's current listing
(every name, size and ETag/version) and every local file still has the size and modification
time the record names (a truncated or rewritten file is found with one ``stat``); otherwise it is
downloaded again. The sha256 in the record is for ``sha256sum``-style audits: checking it on
every reuse would read the whole model once per rank. A download that fails leaves no record and
no partial files.

Entries not used for :data:`KEEP_DAYS` days (``WMTP_MODEL_CACHE_DAYS``; 0: never) are removed
when another entry is read; clear the whole cache with ``rm -rf $WMTP_CACHE_DIR/models``.
Nothing here imports a filesystem: callers hand in the listing and a function that downloads
one file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import time
from typing import Any, Callable, Iterator, Mapping

from wmtp_core.errors import ModelLoadError

RECORD = "record.json"
FILES = "files"
LOCK = "lock"
KEEP_DAYS = 30
"""An entry no run read for this many days is removed (``WMTP_MODEL_CACHE_DAYS`` overrides)."""
CHUNK = 8 << 20
PART = 64 << 20
"""The largest range s3fs's download asks for at once."""
PARALLEL = 2
"""Ranged GETs s3fs holds at once per file: with :data:`PART`, what one download holds in memory."""
STAMPS = ("ETag", "etag", "VersionId", "md5Hash", "generation", "mtime", "LastModified", "last_modified")
"""What names an object's version in an fsspec listing, in order of preference."""

Fetch = Callable[[str, str], None]
"""``fetch(name, local_path)``: downloads the listing's file ``name`` to ``local_path``."""


def cache_dir() -> str:
    """``$WMTP_CACHE_DIR``, else ``$XDG_CACHE_HOME/wmtp``, else ``~/.cache/wmtp``."""
    explicit = os.environ.get("WMTP_CACHE_DIR")
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "wmtp")


def root() -> str:
    return os.path.join(cache_dir(), "models")


def holds(folder: str | None) -> bool:
    """True when ``folder`` is a cache entry's (never removed by a reader)."""
    if not folder:
        return False
    return os.path.realpath(folder).startswith(os.path.realpath(root()) + os.sep)


def stamp(info: Mapping[str, Any]) -> dict[str, Any]:
    """The size and version of one object, from its fsspec ``info``."""
    version = next((info[k] for k in STAMPS if info.get(k) not in (None, "")), None)
    return {"size": info.get("size"), "version": None if version is None else str(version)}


def cached(source: str, listing: Mapping[str, Mapping[str, Any]], fetch: Fetch, what: str) -> str:
    """The local folder holding the files ``listing`` names (``{name: stamp(...)}``) of
    ``source`` (what the entry is keyed by: never a secret), downloaded by ``fetch`` once per
    node and reused while the listing and the local files match the entry's record. ``what``
    names the model in errors."""
    entry = os.path.join(root(), hashlib.sha256(source.encode()).hexdigest())
    try:
        os.makedirs(entry, exist_ok=True)
    except OSError as e:
        raise ModelLoadError(f"the model cache {root()} cannot be used ({type(e).__name__}: {e}); set "
                             "WMTP_CACHE_DIR to a local directory with room for the model") from None
    evict(keep=entry)
    wanted = {name: dict(s) for name, s in sorted(listing.items())}
    with _locked(os.path.join(entry, LOCK)):
        if not _reusable(entry, source, wanted):
            _download(entry, source, wanted, fetch, what)
        os.utime(os.path.join(entry, RECORD))  # used now: kept from eviction
    return os.path.join(entry, FILES)


@contextlib.contextmanager
def _locked(path: str, blocking: bool = True) -> Iterator[bool]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            held = True
        except BlockingIOError:
            held = False
        yield held
    finally:
        os.close(fd)  # the lock goes with the descriptor


def _read_record(entry: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(entry, RECORD)) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _reusable(entry: str, source: str, wanted: Mapping[str, Mapping[str, Any]]) -> bool:
    """The record names ``source`` and exactly ``wanted``'s files, sizes and versions, and each
    local file still has the size and modification time it had when the record was written."""
    record = _read_record(entry)
    if record is None or record.get("source") != source or not isinstance(record.get("files"), dict):
        return False
    files = record["files"]
    if set(files) != set(wanted):
        return False
    for name, s in wanted.items():
        kept = files[name]
        if not isinstance(kept, dict) or kept.get("source_size") != s.get("size") or \
                kept.get("source_version") != s.get("version"):
            return False
        try:
            st = os.stat(os.path.join(entry, FILES, name))
        except OSError:
            return False
        if st.st_size != kept.get("size") or st.st_mtime_ns != kept.get("mtime_ns"):
            return False
    return True


def _download(entry: str, source: str, wanted: Mapping[str, Mapping[str, Any]], fetch: Fetch, what: str) -> None:
    """Every file of ``wanted`` into ``entry/files/``, hashed and fsynced, then the record;
    whatever stops it, no record and no file stays."""
    record, folder = os.path.join(entry, RECORD), os.path.join(entry, FILES)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(record)
    shutil.rmtree(folder, ignore_errors=True)
    need = sum(int(s.get("size") or 0) for s in wanted.values())
    free = shutil.disk_usage(entry).free
    if free < need:
        raise _no_room(free, need, what)
    try:
        files = {}
        for name, s in wanted.items():
            local = os.path.join(folder, name)
            os.makedirs(os.path.dirname(local), exist_ok=True)
            fetch(name, local)
            files[name] = _landed(local, name, s, what)
        _write_record(record, {"source": source, "written": time.time(), "files": files})
    except BaseException as e:
        shutil.rmtree(folder, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(record)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise _no_room(shutil.disk_usage(entry).free, need, what) from None
        raise


def _no_room(free: int, need: int, what: str) -> ModelLoadError:
    return ModelLoadError(f"the model cache {root()} has {free} bytes free, and {what} needs {need}; set "
                          "WMTP_CACHE_DIR to a local directory with room for the model, or clear the cache "
                          f"(rm -rf {root()})")


def _landed(local: str, name: str, s: Mapping[str, Any], what: str) -> dict[str, Any]:
    """A downloaded file hashed in pieces, fsynced, its size checked against the listing."""
    digest = hashlib.sha256()
    with open(local, "rb") as f:
        while piece := f.read(CHUNK):
            digest.update(piece)
        os.fsync(f.fileno())
        st = os.fstat(f.fileno())
    if s.get("size") is not None and st.st_size != s["size"]:
        raise ModelLoadError(f"{what}: {name} arrived with {st.st_size} bytes, and its listing says {s['size']}")
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest.hexdigest(),
            "source_size": s.get("size"), "source_version": s.get("version")}


def _write_record(path: str, record: Mapping[str, Any]) -> None:
    aside = f"{path}.{os.getpid()}.tmp"
    with open(aside, "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(aside, path)
    fd = os.open(os.path.dirname(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def keep_days() -> float:
    try:
        return float(os.environ.get("WMTP_MODEL_CACHE_DAYS", KEEP_DAYS))
    except ValueError:
        return float(KEEP_DAYS)


def evict(keep: str | None = None, now: float | None = None) -> list[str]:
    """Remove the files and record of every entry (but ``keep``) not read for :func:`keep_days`
    days and not locked by a reader now; returns the entries emptied. Its lock file stays (a
    process that opened it waits on the same file)."""
    days = keep_days()
    if days <= 0 or not os.path.isdir(root()):
        return []
    cutoff, out = (now or time.time()) - days * 86400, []
    for name in os.listdir(root()):
        entry = os.path.join(root(), name)
        try:
            if entry == keep or os.stat(os.path.join(entry, RECORD)).st_mtime >= cutoff:
                continue
        except OSError:
            continue
        with _locked(os.path.join(entry, LOCK), blocking=False) as held:
            if held:
                os.unlink(os.path.join(entry, RECORD))
                shutil.rmtree(os.path.join(entry, FILES), ignore_errors=True)
                out.append(entry)
    return out


def download_options(fs: Any, size: int) -> dict[str, int]:
    """s3fs's download keeps a batch of ranges in memory until each is written: bounded to
    :data:`PARALLEL` ranges of an eighth of the object each (8 to :data:`PART` MiB)."""
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    if not {"s3", "s3a"} & set(protocols):
        return {}
    return {"chunksize": min(PART, max(8 << 20, size // 8)), "max_concurrency": PARALLEL}


def from_filesystem(fs: Any, path: str, names: list[str] | tuple[str, ...], source: str) -> str:
    """The files ``names`` of the folder ``path`` on the fsspec filesystem ``fs`` (the URI
    ``source``), through the cache: the listing from ``fs.info``, each file streamed to disk by
    ``fs.get_file`` (s3fs: ranged GETs). The listing is asked anew (one HEAD a file on S3): a
    listing this process cached earlier must not vouch for an entry after the source changed."""
    import posixpath

    fs.invalidate_cache(path)
    listing = {n: stamp(fs.info(posixpath.join(path, n))) for n in names}

    def fetch(name: str, local: str) -> None:
        fs.get_file(posixpath.join(path, name), local, **download_options(fs, int(listing[name]["size"] or 0)))

    return cached(f"{source_key(fs)} {source}", listing, fetch, source)


def source_key(fs: Any) -> str:
    """The endpoint a filesystem talks to, when it says (the same bucket on two endpoints is
    two sources); never its credentials."""
    kwargs = getattr(fs, "client_kwargs", None) or {}
    endpoint = getattr(fs, "endpoint_url", None) or (kwargs.get("endpoint_url") if isinstance(kwargs, dict) else None)
    if endpoint is None and {"s3", "s3a"} & set(fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return str(endpoint or "")
