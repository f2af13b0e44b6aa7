"""The commit protocol over fsspec, shared by every file-like sink.

A checkpoint is a directory ``<root>/<run>/<name>/``. A save first writes the staging marker
``.wmtp-staging`` there (so that ``wmtp gc`` and a later save know WMTP wrote it), then the files;
``manifest.json`` (files, sizes, digests, step, lineage, format version) is written last and is
the commit, after which the marker is removed. A directory without a manifest is staging (with
the marker) or not WMTP's at all (without it): never listed, never loaded; ``wmtp gc`` removes
only the former. Deletion removes the manifest first, so a half-deleted checkpoint is never
loadable.

This module is the commit protocol (write, commit, delete) and :class:`CheckpointStore`, which
mixes in reading (:mod:`wmtp_core.store_read`), verifying (:mod:`wmtp_core.store_verify`) and
leftovers (:mod:`wmtp_core.leftovers`); a failed save is translated by
:mod:`wmtp_core.save_failures`, names live in :mod:`wmtp_core.naming`, hashes in
:mod:`wmtp_core.hashing`.
"""

from __future__ import annotations

import concurrent.futures as cf
import datetime as dt
import functools
import json
import logging
import os
import posixpath
import socket
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Mapping

import fsspec
from fsspec.implementations.local import LocalFileSystem

from wmtp_core import eval_records
from wmtp_core.conditional import ConditionalWrites
from wmtp_core.errors import CheckpointError
from wmtp_core.hashing import HASH, HashingWriter, digest_path, durable_digest, fsync, in_background, landed_size
from wmtp_core.leftovers import Incomplete, Leftovers
from wmtp_core.manifest import FileEntry, Manifest
from wmtp_core.naming import (
    FINAL_NAME,
    MANIFEST,
    OWN_FILES,
    QUARANTINE_NOTE,
    QUARANTINED_DIR,
    STAGING_MARKER,
    check_run_name,
    step_dirname,
)
from wmtp_core.roles import Role
from wmtp_core.save_failures import Doing, NoRoom, abandon, failing_as_a_save, first_line, free_bytes, is_storage_error
from wmtp_core.store_read import MAX_MANIFEST_BYTES, CheckpointState, Inspected, Reading
from wmtp_core.store_verify import Verifying, verified_copy, verified_source

__all__ = [
    "FINAL_NAME", "MANIFEST", "MAX_MANIFEST_BYTES", "QUARANTINED_DIR", "QUARANTINE_NOTE", "STAGING_MARKER",
    "CheckpointError", "CheckpointState", "CheckpointStore", "Incomplete", "Inspected", "Writer",
    "check_run_name", "protocol_of", "step_dirname", "store_class", "verified_copy", "verified_source",
]
"""What other modules import from here: the commit protocol and the names of the format."""

if TYPE_CHECKING:
    from wmtp_core.catalog import Catalog

log = logging.getLogger(__name__)

Writer = Callable[[BinaryIO], None]
"""Writes one file's content into an open binary stream."""


class CheckpointStore(Reading, Verifying, Leftovers, ConditionalWrites):
    """Stage, commit, list, verify and delete checkpoints under ``root`` on ``fs``. Reading
    (:class:`~wmtp_core.store_read.Reading`), verifying (:class:`~wmtp_core.store_verify.Verifying`),
    leftovers (:class:`~wmtp_core.leftovers.Leftovers`) and conditional writes
    (:class:`~wmtp_core.conditional.ConditionalWrites`) are its mixins; this class is the commit
    protocol.

    What differs between protocols are hooks with a default here that serves local disk (and
    any fsspec filesystem at best effort); a store for another protocol is a subclass that
    overrides them, registered as its sink's ``SinkSpec.store`` (see ``docs/plugins.md``):
    :meth:`incomplete_uploads`, :meth:`abort_upload`, :meth:`read_tagged`,
    :meth:`put_if_absent`, :meth:`put_if_unchanged`, :meth:`remove_if_unchanged`,
    :meth:`with_defaults`, :meth:`options_problem` and :attr:`client_retries`."""

    client_retries = ""
    """Hook: who retried a storage request before a save failed, as its error says ("after
    <client_retries>"); empty (the default) when nobody did."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str) -> None:
        self.fs = fs
        self.root = root.rstrip("/") or "/"
        self._made_dirs: dict[str, list[str]] = {}

    @classmethod
    def from_url(cls, url: str, **storage_options: Any) -> CheckpointStore:
        """The store for ``url``: of this class, or, called on ``CheckpointStore`` itself, of the
        class the installed plugins registered for the URL's protocol (:func:`store_class`)."""
        fs, root = fsspec.core.url_to_fs(url, **storage_options)
        return (store_class(protocol_of(fs)) if cls is CheckpointStore else cls)(fs, root)

    @classmethod
    def with_defaults(cls, options: Mapping[str, Any], *,
                      retries: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Hook: the storage ``options`` with what this protocol's client needs under them (a
        value the user gives wins): its sink's own settings (for S3: the ``s3`` sink's retries,
        timeouts and block size), so that a command reads a store exactly as the sink writes
        it; ``retries``, other retry settings wanted instead of the sink's. Default: the options
        unchanged."""
        return dict(options)

    @classmethod
    def options_problem(cls, options: Mapping[str, Any], name: Callable[[str], str]) -> str | None:
        """Hook: why the storage ``options`` cannot work with this protocol's client before any
        request is made (for S3: a key without its secret), in words naming each option with
        ``name(option)`` and never quoting a value; ``None`` when nothing is wrong. Default:
        ``None``."""
        return None

    @property
    def protocol(self) -> str:
        return protocol_of(self.fs)

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
        doing = Doing(f"preparing the staging directory {self.uri(path)}")
        try:
            self.prepare(run, name)
        except CheckpointError:
            raise  # committed, or not WMTP's: nothing of this save to remove
        except Exception:
            with failing_as_a_save(self, doing, path, step, nbytes):
                raise
        with failing_as_a_save(self, doing, path, step, nbytes):
            entries = self._write_files(path, files, doing, nbytes)
            return self._commit(path, doing, entries, run=run, step=step, role=role, lineage=lineage, meta=meta)

    def _commit(self, path: str, doing: Doing, entries: list[FileEntry], *, run: str, step: int, role: Role,
                lineage: str, meta: Mapping[str, Any] | None) -> Manifest:
        """Write the manifest naming ``entries`` into the staging directory ``path``: the
        checkpoint is committed."""
        manifest = Manifest(run=run, step=step, role=role, lineage=lineage, files=entries,
                            created_at=dt.datetime.now(dt.timezone.utc).isoformat(), meta=meta or {})
        doing.now(f"committing the manifest {self.uri(posixpath.join(path, MANIFEST))}")
        self._write_manifest(path, manifest)
        return manifest

    def _write_files(self, path: str, files: Mapping[str, Writer], doing: Doing,
                     nbytes: int | None) -> list[FileEntry]:
        """Write every file into the staging directory ``path``; returns their entries."""
        entries, hashing = [], {}
        local = isinstance(self.fs, LocalFileSystem)
        if local and nbytes:
            doing.now(f"checking the free space at {path}")
            free = free_bytes(path)
            if free is not None and free < nbytes:
                raise NoRoom(nbytes, free)
        try:
            self._write_each(path, files, doing, local, hashing)
        except BaseException:
            # the files already written are being hashed (each open) on helper threads: let them
            # finish before the staging is removed, or a removed file's space stays in use
            cf.wait([h for h in hashing.values() if isinstance(h, cf.Future)])
            raise
        for fname, h in hashing.items():
            doing.now(f"writing {fname} to {self.uri(posixpath.join(path, fname))}")
            digest, size = h.result() if isinstance(h, cf.Future) else (h.hexdigest(), h.size)
            entries.append(FileEntry(path=fname, size=size, digest=digest, algorithm=HASH))
        return entries

    def _write_each(self, path: str, files: Mapping[str, Writer], doing: Doing, local: bool,
                    hashing: dict[str, Any]) -> None:
        """Write each file into ``path``; its hash (or the future of it) lands in ``hashing``."""
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
                hashing[fname] = in_background(durable_digest, fpath)
                continue
            hashing[fname] = self._write_stream(fpath, fname, writer, doing)

    def _write_stream(self, fpath: str, fname: str, writer: Writer, doing: Doing) -> HashingWriter:
        """Write one file through a stream, hashed as it passes; check the size that landed."""
        f = self.fs.open(fpath, "wb")
        try:
            hw = HashingWriter(f)
            writer(hw)
            fsync(f)
            f.close()  # an object store's upload completes (or its last part fails) here
        except BaseException as e:
            # never let closing complete an upload of what was written so far; abort it
            # (a request to the store) unless the process is being interrupted
            abandon(f, abort=isinstance(e, Exception))
            raise
        # Object-store writers have dropped buffered bytes silently before: check what landed.
        doing.now(f"checking the size of {fname} at {self.uri(fpath)}")
        landed = landed_size(self.fs, fpath)
        if landed != hw.size:
            raise CheckpointError(f"{self.uri(fpath)}: wrote {hw.size} bytes but {landed} landed")
        return hw

    def prepare(self, run: str, name: str) -> str:
        """The staging directory for ``<run>/<name>``, marked as WMTP's before anything else is
        written. A leftover of a crashed WMTP save there is cleared; a committed checkpoint, or a
        directory WMTP did not write, is never overwritten."""
        path = self.path_of(run, name)
        self.fs.invalidate_cache(path)
        if self.fs.exists(posixpath.join(path, MANIFEST)):
            raise CheckpointError(f"{self.uri(path)} is already committed; refusing to overwrite it")
        if self.fs.exists(path):
            if self._files(path) and not self.fs.isfile(posixpath.join(path, STAGING_MARKER)):
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

    def commit_existing(self, run: str, name: str, *, step: int, role: Role, lineage: str,
                        expected: Mapping[str, int] | None = None,
                        meta: Mapping[str, Any] | None = None) -> Manifest:
        """Commit files that other writers (every rank, through DCP) already put in the staging
        directory: hash what landed, check it against ``expected`` minimum sizes, then write
        the manifest. Call it once every writer is done: a failure removes the staging and
        raises as :meth:`write` does."""
        path = self.path_of(run, name)
        doing = Doing(f"listing {self.uri(path)}")
        with failing_as_a_save(self, doing, path, step, None):
            self.fs.invalidate_cache(path)
            names = sorted(n for n in (posixpath.relpath(p, path) for p in self.fs.find(path))
                           if n != MANIFEST and n not in OWN_FILES)
            entries = []
            hashing = {n: in_background(digest_path, self.fs, posixpath.join(path, n)) for n in names}
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
            if not is_storage_error(e):
                raise
            log.warning("%s is committed; its staging marker stays (%s: %s)", self.uri(path),
                        type(e).__name__, first_line(e))

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
        eval_records.remove(self.fs, path)  # what an evaluation recorded of it (if anything)


def protocol_of(fs: fsspec.AbstractFileSystem) -> str:
    """The protocol a filesystem names itself by (its first one)."""
    p = fs.protocol
    return p[0] if isinstance(p, (tuple, list)) else p


def store_class(protocol: str, catalog: Catalog | None = None) -> type[CheckpointStore]:
    """The store class for ``protocol``: the ``SinkSpec.store`` of the sink that serves it in
    ``catalog`` (by default the installed plugins'), else :class:`CheckpointStore`. For
    ``s3://`` with the built-in plugins: the ``s3`` plugin's ``S3CheckpointStore``, which lists
    and aborts incomplete multipart uploads and writes the lease conditionally."""
    found = (catalog or _installed_catalog()).store_for_protocol(protocol)
    return found if found is not None else CheckpointStore


def store_class_of(url: str) -> type[CheckpointStore]:
    """:func:`store_class` for the protocol of ``url`` (a bare path: ``file``)."""
    return store_class(fsspec.core.split_protocol(url)[0] or "file")


@functools.cache
def _installed_catalog() -> Catalog:
    """The installed plugins' catalog, built once per process."""
    from wmtp_core.plugins import build_catalog, make_plugin_manager

    return build_catalog(make_plugin_manager())
