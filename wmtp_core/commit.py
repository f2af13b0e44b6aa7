"""The commit protocol over fsspec, shared by every file-like sink.

A checkpoint is a directory ``<root>/<run>/<name>/``. A save first writes the staging marker
``.wmtp-staging`` there (so that ``wmtp gc`` and a later save know WMTP wrote it), then the files;
``manifest.json`` (files, sizes, digests, step, lineage, format version) is written last and is
the commit, after which the marker is removed. A directory without a manifest is staging (with
the marker) or not WMTP's at all (without it): never listed, never loaded; ``wmtp gc`` removes
only the former. A manifest is untrusted input: it is validated against the schema, the
directory it lies in and the files beside it before anything believes it. Deletion removes the
manifest first, so a half-deleted checkpoint is never loadable.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import datetime as dt
import enum
import errno
import io
import json
import logging
import os
import posixpath
import re
import shutil
import socket
from typing import Any, BinaryIO, Callable, Mapping

import attrs
import fsspec
from fsspec.implementations.local import LocalFileSystem

from wmtp_core.errors import (
    CheckpointError,
    ConfigError,
    CorruptError,
    DiskFullError,
    ManifestError,
    SaveError,
    UnverifiableError,
)
from wmtp_core.manifest import (
    HASH,
    RUN_NAME,
    FileEntry,
    Manifest,
    digest_bytes,
    digest_file,
    new_hasher,
)
from wmtp_core.roles import Role

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
STAGING_MARKER = ".wmtp-staging"
"""Written first into every directory a save creates; only directories carrying it (and no
manifest) are ever cleared by WMTP."""
_OWN_FILES = frozenset({STAGING_MARKER, f".{MANIFEST}.tmp"})
"""WMTP's own bookkeeping files, never part of a checkpoint's contents."""
MAX_MANIFEST_BYTES = 16 << 20
_STEP_DIR = re.compile(r"step_(\d+)")
QUARANTINE_NOTE = ".wmtp-quarantine"
"""Written into a quarantined checkpoint: why and when it was moved aside, and from where."""
QUARANTINED_DIR = re.compile(r"(step_\d+|final)\.quarantined-(\d{8}T\d{6}Z)(?:-\d+)?")
FINAL_NAME = "final"
CHUNK = 8 << 20
_READERS = cf.ThreadPoolExecutor(max_workers=4, thread_name_prefix="wmtp-verify")


class CheckpointState(str, enum.Enum):
    """What a checkpoint directory is."""

    COMMITTED = "committed"
    """A manifest that passed every check: listed, resumed from, counted by retention."""
    UNVERIFIABLE = "unverifiable"
    """A manifest that cannot be believed: never resumed from, counted or deleted."""
    STAGING = "staging"
    """WMTP's marker and no manifest: a save that did not finish; ``wmtp gc`` removes it."""
    FOREIGN = "foreign"
    """Neither marker nor manifest: not written by WMTP, never touched."""
    QUARANTINED = "quarantined"
    """A checkpoint that failed verification, moved aside as ``<name>.quarantined-<time>``:
    never resumed from, counted or deleted by retention; ``wmtp gc --quarantined`` removes it."""

    def __str__(self) -> str:
        return self.value


@attrs.frozen
class Inspected:
    """What one checkpoint directory of a run is."""

    path: str
    state: CheckpointState = attrs.field(converter=CheckpointState)
    manifest: Manifest | None = None
    problem: str = ""
    """Why it is not committed."""


def check_run_name(name: str) -> str:
    """Refuse run names that could climb out of the base path or confuse listing."""
    if not isinstance(name, str) or not RUN_NAME.fullmatch(name) or ".." in name:
        raise ConfigError(
            f"run name {name!r} is not allowed: use letters, digits and '_.=+-' "
            "(at most 128 characters, no '/', no '..', not starting with '.')"
        )
    return name


def step_dirname(step: int) -> str:
    return f"step_{step}"


class HashingWriter(io.RawIOBase):
    """A write-only stream that hashes and counts what passes through to ``target``.

    Hashing runs on a helper thread, slice by slice, while this thread writes the same slice:
    both release the GIL, so a save costs about max(hash, write) instead of their sum.
    """

    SLICE = 8 << 20

    def __init__(self, target: BinaryIO, algorithm: str = HASH) -> None:
        self.target = target
        self.sha = new_hasher(algorithm)
        self.size = 0
        self._hashing: cf.Future | None = None

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        n = len(view)
        if n < self.SLICE:
            self._wait()
            self.sha.update(view)
            self.target.write(view)
        else:
            for i in range(0, n, self.SLICE):
                piece = view[i : i + self.SLICE]
                self._wait()
                self._hashing = _HASHER.submit(self.sha.update, piece)
                self.target.write(piece)
        self.size += n
        return n

    def _wait(self) -> None:
        if self._hashing is not None:
            self._hashing.result()
            self._hashing = None

    def hexdigest(self) -> str:
        self._wait()
        return self.sha.hexdigest()


_HASHER = cf.ThreadPoolExecutor(max_workers=4, thread_name_prefix="wmtp-hash")


def _fresh_pools() -> None:
    """A forked child (a data-loader worker, a test that forks) inherits these executors without
    their threads: give it its own, or its saves would wait forever for a hash."""
    global _HASHER, _READERS
    _HASHER = cf.ThreadPoolExecutor(max_workers=4, thread_name_prefix="wmtp-hash")
    _READERS = cf.ThreadPoolExecutor(max_workers=4, thread_name_prefix="wmtp-verify")


os.register_at_fork(after_in_child=_fresh_pools)


def _durable_digest(path: str) -> tuple[str, int]:
    """fsync a local file just written, then hash it (a read-only descriptor syncs on Linux and
    macOS alike: the data and the metadata of the file reach the disk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return digest_file(path, HASH)


def _check(entry: FileEntry, digest: str, size: int, uri: str) -> None:
    if size != entry.size or digest != entry.digest:
        raise CorruptError(
            f"{uri} does not match the manifest "
            f"(size {size} vs {entry.size}, {entry.algorithm} {digest[:12]}… vs {entry.digest[:12]}…)"
        )


def verified_source(fs: fsspec.AbstractFileSystem, path: str, entry: FileEntry, uri: str) -> str | bytes:
    """A file's verified content: on local disk its path (hashed in place, so a loader can map
    it), elsewhere its bytes (read once, hashed, returned only if they match)."""
    try:
        if isinstance(fs, LocalFileSystem):
            digest, size = digest_file(path, entry.algorithm)
            _check(entry, digest, size, uri)
            return path
        data = fs.cat_file(path)
    except FileNotFoundError:
        raise CorruptError(f"{uri} is missing") from None
    _check(entry, digest_bytes(data, entry.algorithm), len(data), uri)
    return data


def _fsync(f: Any) -> None:
    """Flush ``f`` to durable storage when it is a local file; object stores commit on close."""
    f.flush()
    fileno = getattr(f, "fileno", None)
    if fileno is None:
        return
    try:
        os.fsync(fileno())
    except (OSError, io.UnsupportedOperation, AttributeError, TypeError):
        pass


def digest_of(fs: fsspec.AbstractFileSystem, path: str, algorithm: str = HASH) -> tuple[str, int]:
    """Digest and size of a file on any filesystem, streamed in 8 MiB chunks."""
    sha = new_hasher(algorithm)
    size = 0
    with fs.open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            sha.update(chunk)
            size += len(chunk)
    return sha.hexdigest(), size


Writer = Callable[[BinaryIO], None]
"""Writes one file's content into an open binary stream."""


class CheckpointStore:
    """Stage, commit, list, verify and delete checkpoints under ``root`` on ``fs``."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str) -> None:
        self.fs = fs
        self.root = root.rstrip("/") or "/"

    @classmethod
    def from_url(cls, url: str, **storage_options: Any) -> CheckpointStore:
        fs, root = fsspec.core.url_to_fs(url, **storage_options)
        return cls(fs, root)

    @property
    def protocol(self) -> str:
        p = self.fs.protocol
        return p[0] if isinstance(p, (tuple, list)) else p

    def uri(self, path: str) -> str:
        return path if self.protocol in ("file", "local") else f"{self.protocol}://{path}"

    def run_dir(self, run: str) -> str:
        return posixpath.join(self.root, check_run_name(run))

    def path_of(self, run: str, name: str) -> str:
        return posixpath.join(self.run_dir(run), name)

    # --- writing -----------------------------------------------------------------------------
    def write(
        self,
        run: str,
        name: str,
        files: Mapping[str, Writer],
        *,
        step: int,
        role: Role,
        lineage: str,
        meta: Mapping[str, Any] | None = None,
        nbytes: int | None = None,
    ) -> Manifest:
        """Write ``files`` under ``<run>/<name>/``, then commit them with a manifest.

        A staging directory left by an earlier crash at the same name is cleared first; a
        committed checkpoint at that name is never overwritten. ``nbytes``: at least what the
        files will hold (the payload's tensor bytes), when known; on local disk a save that
        cannot fit is refused before a file is written.

        A save that fails commits nothing and removes its own staging, then raises naming the
        operation, the URL and the error: :class:`~wmtp_core.errors.DiskFullError` for a full
        local disk, :class:`~wmtp_core.errors.SaveError` for a storage failure (on S3: once the
        clients' retries ran out).
        """
        path = self.path_of(run, name)
        doing = _Doing(f"preparing the staging directory {self.uri(path)}")
        try:
            self.prepare(run, name)
        except CheckpointError:
            raise  # committed, or not WMTP's: nothing of this save to remove
        except Exception:
            with self._failing_as_a_save(doing, path, step, nbytes):
                raise
        with self._failing_as_a_save(doing, path, step, nbytes):
            entries = self._write_files(path, files, doing, nbytes)
            return self._commit(path, doing, entries, run=run, step=step, role=role, lineage=lineage, meta=meta)

    @contextlib.contextmanager
    def _failing_as_a_save(self, doing: _Doing, path: str, step: int, nbytes: int | None):
        """A failure inside removes the staging at ``path`` and is raised as a save's failure
        naming what was being done (see :func:`_failed`)."""
        try:
            yield
        except Exception as e:
            failure = _failed(self, e, doing, path, step, nbytes)
            if failure is e:
                raise
            raise failure from e

    def _commit(self, path: str, doing: _Doing, entries: list[FileEntry], *, run: str, step: int, role: Role,
                lineage: str, meta: Mapping[str, Any] | None) -> Manifest:
        """Write the manifest naming ``entries`` into the staging directory ``path``: the
        checkpoint is committed."""
        manifest = Manifest(run=run, step=step, role=role, lineage=lineage, files=entries,
                            created_at=dt.datetime.now(dt.timezone.utc).isoformat(), meta=meta or {})
        doing.now(f"committing the manifest {self.uri(posixpath.join(path, MANIFEST))}")
        self._write_manifest(path, manifest)
        return manifest

    def _write_files(self, path: str, files: Mapping[str, Writer], doing: _Doing,
                     nbytes: int | None) -> list[FileEntry]:
        """Write every file into the staging directory ``path``; returns their entries."""
        entries, hashing = [], {}
        local = isinstance(self.fs, LocalFileSystem)
        if local and nbytes:
            doing.now(f"checking the free space at {path}")
            free = _free_bytes(path)
            if free is not None and free < nbytes:
                raise _NoRoom(nbytes, free)
        for fname, writer in files.items():
            if fname == MANIFEST or "/" in fname or fname.startswith("."):
                raise CheckpointError(f"file name {fname!r} is reserved or not allowed")
            fpath = posixpath.join(path, fname)
            doing.now(f"writing {fname} to {self.uri(fpath)}")
            if local and hasattr(writer, "save_to_path"):
                # Local disk: the serialiser writes the file itself (its fast path); while the next
                # file is being written, this one is made durable (fsync) and hashed from the page
                # cache. The manifest waits for both.
                writer.save_to_path(fpath)
                hashing[fname] = _HASHER.submit(_durable_digest, fpath)
                continue
            f = self.fs.open(fpath, "wb")
            try:
                hw = HashingWriter(f)
                writer(hw)
                _fsync(f)
                f.close()  # an object store's upload completes (or its last part fails) here
            except BaseException as e:
                # never let closing complete an upload of what was written so far; abort it
                # (a request to the store) unless the process is being interrupted
                _abandon(f, abort=isinstance(e, Exception))
                raise
            # Object-store writers have dropped buffered bytes silently before: check what landed.
            doing.now(f"checking the size of {fname} at {self.uri(fpath)}")
            landed = self.fs.size(fpath)
            if landed != hw.size:
                raise CheckpointError(f"{self.uri(fpath)}: wrote {hw.size} bytes but {landed} landed")
            hashing[fname] = hw
        for fname, h in hashing.items():
            doing.now(f"writing {fname} to {self.uri(posixpath.join(path, fname))}")
            digest, size = h.result() if isinstance(h, cf.Future) else (h.hexdigest(), h.size)
            entries.append(FileEntry(path=fname, size=size, digest=digest, algorithm=HASH))
        return entries

    def prepare(self, run: str, name: str) -> str:
        """The staging directory for ``<run>/<name>``, marked as WMTP's before anything else is
        written. A leftover of a crashed WMTP save there is cleared; a committed checkpoint, or a
        directory WMTP did not write, is never overwritten."""
        path = self.path_of(run, name)
        self.fs.invalidate_cache(path)
        if self.fs.exists(posixpath.join(path, MANIFEST)):
            raise CheckpointError(f"{self.uri(path)} is already committed; refusing to overwrite it")
        if self.fs.exists(path):
            if self._files(path) and not self.fs.exists(posixpath.join(path, STAGING_MARKER)):
                raise CheckpointError(
                    f"{self.uri(path)} exists and was not written by WMTP (it has no "
                    f"{STAGING_MARKER} marker); refusing to overwrite it: move it away or use "
                    "another base path or run name")
            self.fs.rm(path, recursive=True)
        self.fs.makedirs(path, exist_ok=True)
        marker = json.dumps({"run": run, "name": name, "host": socket.gethostname(), "pid": os.getpid(),
                             "created_at": dt.datetime.now(dt.timezone.utc).isoformat()}).encode()
        self.fs.pipe_file(posixpath.join(path, STAGING_MARKER), marker)
        return path

    def _files(self, path: str) -> list[str]:
        try:
            return self.fs.find(path)
        except FileNotFoundError:
            return []

    def commit_existing(self, run: str, name: str, *, step: int, role: Role, lineage: str,
                        expected: Mapping[str, int] | None = None,
                        meta: Mapping[str, Any] | None = None) -> Manifest:
        """Commit files that other writers (every rank, through DCP) already put in the staging
        directory: hash what landed, check it against ``expected`` minimum sizes, then write
        the manifest. Call it once every writer is done: a failure removes the staging and
        raises as :meth:`write` does."""
        path = self.path_of(run, name)
        doing = _Doing(f"listing {self.uri(path)}")
        with self._failing_as_a_save(doing, path, step, None):
            self.fs.invalidate_cache(path)
            names = sorted(n for n in (posixpath.relpath(p, path) for p in self.fs.find(path))
                           if n != MANIFEST and n not in _OWN_FILES)
            entries = []
            hashing = {n: _HASHER.submit(self._hash, posixpath.join(path, n)) for n in names}
            for n in names:
                doing.now(f"reading {n} at {self.uri(posixpath.join(path, n))}")
                digest, size = hashing[n].result()
                if expected and size < expected.get(n, 0):
                    raise CheckpointError(f"{self.uri(posixpath.join(path, n))}: {size} bytes landed, "
                                          f"the checkpoint's metadata needs {expected[n]}")
                entries.append(FileEntry(path=n, size=size, digest=digest, algorithm=HASH))
            missing = set(expected or {}) - set(names)
            if missing:
                raise CheckpointError(f"{self.uri(path)}: shard files missing: {sorted(missing)}")
            return self._commit(path, doing, entries, run=run, step=step, role=role, lineage=lineage, meta=meta)

    def _hash(self, path: str, algorithm: str = HASH) -> tuple[str, int]:
        return digest_file(path, algorithm) if isinstance(self.fs, LocalFileSystem) \
            else digest_of(self.fs, path, algorithm)

    def _write_manifest(self, path: str, manifest: Manifest) -> None:
        data = json.dumps(manifest.to_json(), indent=2, sort_keys=True).encode()
        target = posixpath.join(path, MANIFEST)
        if isinstance(self.fs, LocalFileSystem):
            # Local disk: write aside, fsync, then rename, so a crash never leaves half a manifest.
            tmp = posixpath.join(path, f".{MANIFEST}.tmp")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        else:
            # Object stores make a single PUT visible atomically.
            self.fs.pipe_file(target, data)
        try:  # committed: the marker has done its work (a crash here leaves a harmless file)
            self.fs.rm_file(posixpath.join(path, STAGING_MARKER))
        except FileNotFoundError:
            pass
        except Exception as e:  # so does a failure: the checkpoint is committed all the same
            if not _is_storage_error(e):
                raise
            log.warning("%s is committed; its staging marker stays (%s: %s)", self.uri(path),
                        type(e).__name__, _first_line(e))

    # --- reading -----------------------------------------------------------------------------
    def read_manifest(self, path: str, *, contents: list[dict[str, Any]] | None = None) -> Manifest:
        """The manifest of the checkpoint at ``path``, validated before it is believed.

        Raises :class:`CheckpointError` when there is none (never committed) and
        :class:`UnverifiableError` naming the reason when it is not JSON, does not follow the
        schema, says another step, role or run than the directory it lies in, or when the files
        beside it are not exactly the ones it names (or are links leading elsewhere).
        ``contents``: the directory's file listing (fsspec ``find(detail=True)`` values), when
        the caller already has it.
        """
        where = self.uri(path)
        try:
            raw = self.fs.cat_file(posixpath.join(path, MANIFEST))
        except FileNotFoundError:
            raise CheckpointError(f"{where} has no {MANIFEST}: it was never committed") from None
        except IsADirectoryError:
            raise UnverifiableError(f"{where}/{MANIFEST} is a directory, not a file") from None
        if len(raw) > MAX_MANIFEST_BYTES:
            raise UnverifiableError(f"{where}/{MANIFEST} is {len(raw)} bytes; a manifest is at most "
                                    f"{MAX_MANIFEST_BYTES}")
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise UnverifiableError(f"{where}/{MANIFEST} is not valid JSON ({str(e)[:200]})") from None
        try:
            manifest = Manifest.from_json(data)
        except (ManifestError, RecursionError) as e:
            raise UnverifiableError(f"{where}/{MANIFEST}: {e}") from None
        self._check_location(path, manifest)
        self._check_contents(path, manifest, contents)
        return manifest

    def _check_location(self, path: str, manifest: Manifest) -> None:
        name = posixpath.basename(path)
        run = posixpath.basename(posixpath.dirname(path))
        where = f"{self.uri(path)}/{MANIFEST}"
        if manifest.run != run:
            raise UnverifiableError(f"{where} says run {manifest.run!r} but lies under run {run!r}")
        step = _STEP_DIR.fullmatch(name)
        if step and (manifest.step != int(step.group(1)) or manifest.role is not Role.RESUME):
            raise UnverifiableError(f"{where} says {manifest.role.value} step {manifest.step} but "
                                    f"the directory is {name} (resume step {int(step.group(1))})")
        if name == FINAL_NAME and manifest.role is not Role.FINAL:
            raise UnverifiableError(f"{where} says role {manifest.role.value!r} but the directory "
                                    f"is {FINAL_NAME!r}")

    def _check_contents(self, path: str, manifest: Manifest,
                        contents: list[dict[str, Any]] | None) -> None:
        """The directory holds exactly the files the manifest names: a dropped entry or an
        extra file is not a checkpoint WMTP wrote. On local disk no file may be a link."""
        if contents is None:
            self.fs.invalidate_cache(path)
            try:
                contents = list(self.fs.find(path, detail=True).values())
            except FileNotFoundError:
                contents = []
        prefix = path.rstrip("/") + "/"
        found = {}
        for info in contents:
            rel = info["name"][len(prefix):] if info["name"].startswith(prefix) else info["name"]
            if rel != MANIFEST and rel not in _OWN_FILES:
                found[rel] = info
        named = {f.path for f in manifest.files}
        where = self.uri(path)
        extra, missing = sorted(set(found) - named), sorted(named - set(found))
        if missing:
            raise CorruptError(f"{where}/{missing[0]} is missing (named by the manifest)")
        if extra:
            raise UnverifiableError(f"{where} holds {extra[0]!r}, which its manifest does not name "
                                    "(an entry was dropped, or something else wrote here)")
        if isinstance(self.fs, LocalFileSystem):
            root = os.path.realpath(path)
            for rel, info in found.items():
                full = posixpath.join(path, rel)
                if info.get("islink") or os.path.islink(full) or \
                        not os.path.realpath(full).startswith(root + os.sep):
                    raise UnverifiableError(f"{where}/{rel} is a link; a checkpoint holds plain files only")

    def inspect(self, run: str) -> list[Inspected]:
        """Every ``step_N`` directory of ``run``, oldest step first, with what it is: committed
        (a manifest that passed every check), unverifiable, staging or foreign."""
        base = self.run_dir(run)
        self.fs.invalidate_cache(base)
        try:
            listing = list(self.fs.find(base, detail=True, withdirs=True).values())
        except FileNotFoundError:
            return []
        by_dir: dict[str, list[dict[str, Any]]] = {}
        for info in listing:
            rel = posixpath.relpath(info["name"].rstrip("/"), base)
            top = rel.split("/", 1)[0]
            if _STEP_DIR.fullmatch(top):
                entries = by_dir.setdefault(top, [])
                if "/" in rel and info.get("type") != "directory":
                    entries.append(info)
        out = []
        for name in sorted(by_dir, key=lambda n: int(n[5:])):
            out.append(self.inspect_dir(posixpath.join(base, name), by_dir[name]))
        return out

    def inspect_dir(self, path: str, contents: list[dict[str, Any]] | None = None) -> Inspected:
        """What the checkpoint directory at ``path`` is (see :class:`Inspected`)."""
        if contents is None:
            self.fs.invalidate_cache(path)
            try:
                contents = [i for i in self.fs.find(path, detail=True).values()]
            except FileNotFoundError:
                contents = []
        names = {posixpath.basename(i["name"]) for i in contents
                 if posixpath.dirname(i["name"].rstrip("/")) == path.rstrip("/")}
        if MANIFEST not in names:
            if STAGING_MARKER in names:
                return Inspected(path, CheckpointState.STAGING, problem="a save that did not finish (no manifest)")
            return Inspected(path, CheckpointState.FOREIGN, problem=f"no {MANIFEST} and no {STAGING_MARKER}: not "
                             "written by WMTP")
        try:
            return Inspected(path, CheckpointState.COMMITTED, self.read_manifest(path, contents=contents))
        except CheckpointError as e:
            return Inspected(path, CheckpointState.UNVERIFIABLE, problem=str(e))

    def list(self, run: str, role: Role | None = Role.RESUME) -> list[tuple[str, Manifest]]:
        """Committed checkpoints of ``run`` as ``(path, manifest)``, oldest step first.

        Staging, foreign and unverifiable directories are never listed (``inspect`` tells them
        apart), so retention never counts them and "latest" never names them.
        """
        return [(i.path, i.manifest) for i in self.inspect(run)
                if i.state is CheckpointState.COMMITTED and (role is None or i.manifest.role is role)]

    def staging(self, run: str) -> list[str]:
        """Step directories of ``run`` that WMTP began and never committed."""
        return [i.path for i in self.inspect(run) if i.state is CheckpointState.STAGING]

    def verify_entry(self, path: str, entry: FileEntry) -> None:
        """Check one file of a checkpoint against its manifest entry (streamed, never held whole)."""
        fpath = posixpath.join(path, entry.path)
        try:
            digest, size = self._hash(fpath, entry.algorithm)
        except FileNotFoundError:
            raise CorruptError(f"{self.uri(fpath)} is missing") from None
        _check(entry, digest, size, self.uri(fpath))

    def verify(self, path: str) -> Manifest:
        """Check every file against the manifest's size and digest; raise naming the first bad one."""
        manifest = self.read_manifest(path)
        for entry in manifest.files:
            self.verify_entry(path, entry)
        return manifest

    def read_verified(self, path: str) -> tuple[Manifest, dict[str, bytes]]:
        """Read every file of a committed checkpoint, each checked against the manifest;
        raises naming the first file that does not match."""
        manifest, futures = self.verify_async(path)
        out = {}
        for name, fut in futures.items():
            src = fut.result()
            if isinstance(src, str):
                with open(src, "rb") as f:
                    src = f.read()
            out[name] = src
        return manifest, out

    def verify_async(self, path: str, manifest: Manifest | None = None
                     ) -> tuple[Manifest, dict[str, cf.Future]]:
        """Verify every file in parallel, largest first. Each future yields the verified source
        (a local path or the bytes), so a caller can deserialise one file while the others are
        still being checked; nothing is deserialised before its own check passed. ``manifest``:
        one the caller just read with :meth:`read_manifest` (validated)."""
        manifest = manifest if manifest is not None else self.read_manifest(path)
        futures = {
            e.path: _READERS.submit(verified_source, self.fs, posixpath.join(path, e.path), e,
                                    self.uri(posixpath.join(path, e.path)))
            for e in sorted(manifest.files, key=lambda e: -e.size)
        }
        return manifest, {e.path: futures[e.path] for e in manifest.files}

    # --- deleting ----------------------------------------------------------------------------
    def delete(self, path: str) -> None:
        """Mark the directory as WMTP's staging, uncommit it (manifest first), then remove the
        files: a crash at any point leaves a checkpoint, or staging that ``wmtp gc`` removes."""
        self.fs.pipe_file(posixpath.join(path, STAGING_MARKER), b'{"deleting": true}')
        try:
            self.fs.rm_file(posixpath.join(path, MANIFEST))
        except FileNotFoundError:
            pass
        self.fs.rm(path, recursive=True)

    # --- quarantine: a committed checkpoint that failed verification -----------------------
    def quarantine(self, path: str, reason: str) -> str | None:
        """Move the checkpoint at ``path`` aside as ``<name>.quarantined-<UTC time>`` beside it,
        with a note (``.wmtp-quarantine``) saying why, when and from where: a rename on local
        disk; on object stores a copy of every object, then the original is uncommitted (its
        manifest first) and removed. Nothing is deleted before its copy exists, and the step can
        be committed again. Returns the new path, or None when ``path`` holds no manifest any
        more (deleted meanwhile: nothing to quarantine)."""
        self.fs.invalidate_cache(path)
        if not self.fs.exists(posixpath.join(path, MANIFEST)):
            return None
        now = dt.datetime.now(dt.timezone.utc)
        target = base = f"{path.rstrip('/')}.quarantined-{now.strftime('%Y%m%dT%H%M%SZ')}"
        n = 1
        while self.fs.exists(target):
            n += 1
            target = f"{base}-{n}"
        note = json.dumps({"reason": reason, "from": self.uri(path), "at": now.isoformat(),
                           "host": socket.gethostname(), "pid": os.getpid()}, indent=2).encode()
        if isinstance(self.fs, LocalFileSystem):
            os.rename(path, target)
            self.fs.pipe_file(posixpath.join(target, QUARANTINE_NOTE), note)
        else:
            prefix = path.rstrip("/") + "/"
            for src in self._files(path):
                if src.startswith(prefix) and posixpath.basename(src) != STAGING_MARKER:
                    self.fs.copy(src, target + "/" + src[len(prefix):])
            self.fs.pipe_file(posixpath.join(target, QUARANTINE_NOTE), note)
            self.delete(path)
        self.fs.invalidate_cache(posixpath.dirname(path))
        return target

    def quarantined(self, run: str) -> list[Inspected]:
        """``run``'s quarantined checkpoints (oldest step first), each with the reason its note
        gives."""
        base = self.run_dir(run)
        self.fs.invalidate_cache(base)
        try:
            names = [posixpath.basename(e["name"].rstrip("/")) for e in self.fs.ls(base, detail=True)
                     if e.get("type") == "directory"]
        except FileNotFoundError:
            return []
        out = []
        for name in names:
            m = QUARANTINED_DIR.fullmatch(name)
            if not m:
                continue
            path = posixpath.join(base, name)
            try:
                reason = str(json.loads(self.fs.cat_file(posixpath.join(path, QUARANTINE_NOTE)))["reason"])
            except (FileNotFoundError, ValueError, KeyError, TypeError):
                reason = "failed verification (no note)"
            out.append(Inspected(path, CheckpointState.QUARANTINED, problem=reason))
        step = lambda i: int(_STEP_DIR.match(posixpath.basename(i.path)).group(1)) \
            if posixpath.basename(i.path).startswith("step_") else 1 << 62
        return sorted(out, key=lambda i: (step(i), i.path))

    # --- incomplete saves: what a killed save leaves behind ---------------------------------
    def incomplete_uploads(self, run: str | None = None) -> list[Incomplete]:
        """Multipart uploads begun under ``<root>/<run>/`` (every run's: under ``<root>/``) that
        were never completed nor aborted: what a process killed while it wrote a large file to S3
        leaves. Their parts are stored (and billed) but no listing shows them. An upload is
        WMTP's (``ours``) when it is for a file of a run's ``step_N`` or ``final`` directory and
        that directory is WMTP's (its marker or its manifest) or is gone; one into a directory
        another tool wrote is listed with ``ours`` false. Empty on filesystems without multipart
        uploads."""
        call = getattr(self.fs, "call_s3", None)
        if call is None or self.protocol not in ("s3", "s3a"):
            return []
        bucket, root_key, _ = self.fs.split_path(self.root)
        root_key = f"{root_key.strip('/')}/" if root_key.strip("/") else ""
        prefix = root_key + (f"{check_run_name(run)}/" if run is not None else "")
        kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
        out, dirs = [], {}
        while True:
            page = call("list_multipart_uploads", **kwargs)
            for upload in page.get("Uploads") or []:
                key = upload.get("Key", "")
                if not key.startswith(prefix):  # another run's: never ours
                    continue
                parts = key[len(root_key):].split("/")
                problem = ""
                if len(parts) < 3 or not RUN_NAME.fullmatch(parts[0]) or ".." in parts[0] or \
                        not (_STEP_DIR.fullmatch(parts[1]) or parts[1] == FINAL_NAME):
                    problem = "not a file of a run's step_N or final directory"
                else:
                    directory = posixpath.join(self.root, parts[0], parts[1])
                    if directory not in dirs:
                        self.fs.invalidate_cache(directory)
                        dirs[directory] = self.fs.isdir(directory) and \
                            self.inspect_dir(directory).state is CheckpointState.FOREIGN
                    if dirs[directory]:
                        problem = (f"{self.uri(directory)} has no {MANIFEST} and no {STAGING_MARKER}: "
                                   "WMTP did not write it")
                started = upload.get("Initiated")
                path = f"{bucket}/{key}"
                out.append(Incomplete(kind="upload", uri=self.uri(path), path=path,
                                      bytes=self._uploaded(bucket, key, upload["UploadId"]),
                                      started=started.timestamp() if isinstance(started, dt.datetime) else None,
                                      upload_id=upload["UploadId"], ours=not problem, problem=problem))
            if not page.get("IsTruncated"):
                return out
            kwargs.update(KeyMarker=page.get("NextKeyMarker", ""),
                          UploadIdMarker=page.get("NextUploadIdMarker", ""))

    def _uploaded(self, bucket: str, key: str, upload_id: str) -> int | None:
        """Bytes of the parts an incomplete upload holds (its first 1000 parts)."""
        try:
            page = self.fs.call_s3("list_parts", Bucket=bucket, Key=key, UploadId=upload_id)
        except (FileNotFoundError, OSError):
            return None
        return sum(int(p.get("Size") or 0) for p in page.get("Parts") or [])

    def abort_upload(self, upload: Incomplete) -> None:
        """Abort one incomplete upload: its parts are deleted. One that completed or was aborted
        meanwhile is left as it is."""
        bucket, key = upload.path.split("/", 1)
        try:
            self.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload.upload_id)
        except FileNotFoundError:  # NoSuchUpload: completed or aborted since it was listed
            pass

    def incomplete(self, run: str) -> list[Incomplete]:
        """``run``'s own saves that never finished: its incomplete multipart uploads (WMTP's, see
        :meth:`incomplete_uploads`) and its staging directories (``step_N`` and ``final``).
        Committed, unverifiable and foreign directories, and every other run's leftovers, are
        not listed."""
        found = [i for i in self.inspect(run) if i.state is CheckpointState.STAGING]
        final = self.path_of(run, FINAL_NAME)
        if self.fs.isdir(final):
            state = self.inspect_dir(final)
            if state.state is CheckpointState.STAGING:
                found.append(state)
        # uploads first: removing a staging directory first would hide whose an upload was
        return [u for u in self.incomplete_uploads(run) if u.ours] + \
            [Incomplete(kind="staging", uri=self.uri(i.path), path=i.path) for i in found]

    def clean_incomplete(self, run: str, *, dry_run: bool = False) -> list[Incomplete]:
        """Remove ``run``'s own saves that never finished (see :meth:`incomplete`): what a run does
        before its first save, since no save of its own can be in flight then. A staging directory
        is looked at again just before it is removed (the marker present, no manifest). Nothing of
        another run, and no directory WMTP did not write, is touched. Returns what was removed."""
        done = []
        for item in self.incomplete(run):
            if item.kind == "upload":
                if not dry_run:
                    self.abort_upload(item)
            else:
                self.fs.invalidate_cache(item.path)
                if self.fs.exists(posixpath.join(item.path, MANIFEST)) or \
                        not self.fs.exists(posixpath.join(item.path, STAGING_MARKER)):
                    continue
                if not dry_run:
                    self.fs.rm(item.path, recursive=True)
            done.append(item)
        return done


@attrs.frozen
class Incomplete:
    """A save of a run that never finished: a staging directory (WMTP's marker, no manifest),
    or an object-store multipart upload that was begun and never completed."""

    kind: str
    """``staging`` or ``upload``."""
    uri: str
    path: str = attrs.field(repr=False)
    """The directory, or the object key (with its bucket) the upload was for."""
    bytes: int | None = None
    """What it holds: the staging files, or the parts uploaded so far."""
    started: float | None = None
    """An upload's initiation time (POSIX timestamp)."""
    upload_id: str | None = attrs.field(default=None, repr=False)
    ours: bool = True
    """False for an upload into a directory WMTP did not write: never removed."""
    problem: str = ""
    """Why it is not ours."""

    def describe(self) -> str:
        if self.kind == "upload":
            return f"incomplete upload of {self.uri}"
        return f"staging {self.uri}"


# --- a save that fails: what it did, what it leaves, what it says ------------------------------
class _Doing:
    """What a save is doing, so that its failure names the operation and the URL."""

    def __init__(self, what: str) -> None:
        self.what = what

    def now(self, what: str) -> None:
        self.what = what


class _NoRoom(Exception):
    """A local disk without room for the save: found before a file was written."""

    def __init__(self, needed: int, free: int) -> None:
        super().__init__(f"{needed} bytes needed, {free} free")
        self.needed, self.free = needed, free


def _free_bytes(path: str) -> int | None:
    """Bytes free to this process on the local filesystem holding ``path`` (``None``: unknown)."""
    while path and not os.path.exists(path):
        parent = os.path.dirname(path.rstrip("/"))
        if parent == path:
            break
        path = parent
    try:
        return shutil.disk_usage(path or "/").free
    except OSError:
        return None


def _is_storage_error(e: BaseException) -> bool:
    """An error of the storage rather than of WMTP: an OS or network error, an S3 client's error
    once its retries ran out, or torch's writer failing on a short write (it drops the errno)."""
    if isinstance(e, OSError):
        return True
    if isinstance(e, RuntimeError) and "inline_container" in str(e):
        return True
    return type(e).__module__.split(".", 1)[0] in ("botocore", "aiobotocore", "aiohttp", "s3fs", "fsspec")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]


def _abandon(f: Any, abort: bool = True) -> None:
    """Give up a file being written after a failure: an object store's file is marked closed,
    so that closing it later cannot complete an upload of what was written so far, and with
    ``abort`` its multipart upload is aborted (``discard``; a failure to is the original
    failure's echo: the run's next start aborts it)."""
    if isinstance(f, fsspec.spec.AbstractBufferedFile):
        if abort:
            try:
                f.discard()
            except Exception as e:
                log.debug("could not abort the upload of %s: %s", getattr(f, "path", "?"), e)
        f.closed = True
        return
    try:
        f.close()
    except Exception:
        pass


def _disk_full(store: CheckpointStore, e: BaseException, path: str, nbytes: int | None) -> bool:
    """Whether a local save failed because its disk is full: ENOSPC or EDQUOT, or torch's writer
    failing with the disk then fuller than the save needs."""
    if not isinstance(store.fs, LocalFileSystem):
        return False
    if isinstance(e, _NoRoom):
        return True
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    if isinstance(e, RuntimeError) and "inline_container" in str(e):
        free = _free_bytes(path)
        return free is not None and free < max(nbytes or 0, 1 << 20)
    return False


def _discard_staging(store: CheckpointStore, path: str) -> str:
    """Remove a failed save's staging directory (its marker present, no manifest), and abort
    the multipart uploads into it. Returns what became of it, for the failure's message."""
    try:
        store.fs.invalidate_cache(path)
        if store.fs.exists(posixpath.join(path, MANIFEST)):
            return (f"its manifest may have landed, so nothing was removed: `wmtp checkpoints verify "
                    f"{store.uri(path)}` tells whether it is committed")
        if store.protocol in ("s3", "s3a"):
            for upload in store.incomplete_uploads(posixpath.basename(posixpath.dirname(path))):
                if upload.path.startswith(path.rstrip("/") + "/"):
                    store.abort_upload(upload)
        contents = store._files(path)
        if contents and not store.fs.exists(posixpath.join(path, STAGING_MARKER)):
            return "its directory holds files WMTP did not write, so nothing was removed"
        if store.fs.exists(path):
            store.fs.rm(path, recursive=True)
        return "its staging was removed"
    except Exception as e:
        if not _is_storage_error(e):
            raise
        return (f"its staging could not be removed ({type(e).__name__}: {_first_line(e)}); the run's "
                "next start removes it, or `wmtp gc`")


def _failed(store: CheckpointStore, e: Exception, doing: _Doing, path: str, step: int,
            nbytes: int | None) -> Exception:
    """The error a failed save raises, once its staging is removed: a full local disk becomes
    :class:`DiskFullError` (the path, the bytes needed, the bytes free), another storage failure
    :class:`SaveError` (the operation, the URL, the last error); anything else stays as it is."""
    full = _disk_full(store, e, path, nbytes)
    left = _discard_staging(store, path)
    if full:
        free = _free_bytes(path)
        if isinstance(e, _NoRoom):
            free = free if free is not None else e.free
            need = f"needs {e.needed:,} bytes and {free:,} bytes are free"
        else:  # it failed part-way with what is free now (its staging removed) at its disposal
            need = (f"needs more than the {free:,} bytes free" if free is not None else "needs more space") + \
                (f" (its tensors alone hold {nbytes:,} bytes)" if nbytes else "")
        return DiskFullError(
            f"{path}: the disk is full: the save of step {step} {need}"
            f"{'' if isinstance(e, _NoRoom) else f'; {doing.what} failed'}; nothing of step {step} "
            f"was committed and {left}; committed checkpoints are intact. Free some "
            "space (or keep fewer checkpoints: paths.checkpoints.keep_last) and continue with "
            "--resume latest")
    if not _is_storage_error(e):
        return e
    retried = " after the S3 client's retries" if store.protocol in ("s3", "s3a") else ""
    return SaveError(f"step {step} was not saved: {doing.what} failed{retried} ({type(e).__name__}: "
                     f"{_first_line(e)}); nothing of step {step} was committed and {left}")
