"""Verifying checkpoints: every file checked against its manifest entry (size and digest)
before anything believes it or deserialises it.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import posixpath
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from wmtp_core.errors import CorruptError
from wmtp_core.hashing import CHUNK, digest_bytes, digest_file, digest_path, new_hasher
from wmtp_core.manifest import FileEntry, Manifest
from wmtp_core.staging import SMALL, Staging, fetch

_READERS = cf.ThreadPoolExecutor(max_workers=4, thread_name_prefix="wmtp-verify")


def _fresh_readers() -> None:
    """A forked child inherits the executor without its threads: give it its own."""
    global _READERS
    _READERS = cf.ThreadPoolExecutor(max_workers=4, thread_name_prefix="wmtp-verify")


os.register_at_fork(after_in_child=_fresh_readers)


def _check(entry: FileEntry, digest: str, size: int, uri: str) -> None:
    if size != entry.size or digest != entry.digest:
        raise CorruptError(
            f"{uri} does not match the manifest "
            f"(size {size} vs {entry.size}, {entry.algorithm} {digest[:12]}… vs {entry.digest[:12]}…)"
        )


def verified_source(fs: fsspec.AbstractFileSystem, path: str, entry: FileEntry, uri: str,
                    staging: Staging | None = None) -> str | bytes:
    """A file's verified content: on local disk its path (hashed in place, so a loader can map
    it); elsewhere, with ``staging``, a large file's verified staging copy (fetched in ranges,
    never held whole: :mod:`wmtp_core.staging`), else its bytes (read once, hashed, returned
    only if they match)."""
    try:
        if isinstance(fs, LocalFileSystem):
            digest, size = digest_file(path, entry.algorithm)
            _check(entry, digest, size, uri)
            return path
        if staging is not None and entry.size > SMALL:
            return fetch(fs, path, entry, uri, staging)
        data = fs.cat_file(path)
    except FileNotFoundError:
        raise CorruptError(f"{uri} is missing") from None
    _check(entry, digest_bytes(data, entry.algorithm), len(data), uri)
    return data


class verified_copy:
    """A writer (see :data:`wmtp_core.commit.Writer`) that streams one file of a committed
    checkpoint into another store's file, hashing it as it passes: a file that does not match its
    manifest entry raises :class:`CorruptError` once streamed, so the copy is never committed.
    Each byte is read once: what is checked is exactly what was copied. ``note`` ends the error's
    message (what was not done)."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, entry: FileEntry, uri: str,
                 note: str = "") -> None:
        self.fs, self.path, self.entry, self.uri, self.note = fs, path, entry, uri, note

    def __call__(self, stream: Any) -> None:
        sha = new_hasher(self.entry.algorithm, self.entry.size)
        size = 0
        try:
            source = self.fs.open(self.path, "rb")
        except FileNotFoundError:
            raise CorruptError(f"{self.uri} is missing{self.note}") from None
        with source:
            while chunk := source.read(CHUNK):
                sha.update(chunk)
                stream.write(chunk)
                size += len(chunk)
        digest = sha.hexdigest()
        if size != self.entry.size or digest != self.entry.digest:
            raise CorruptError(f"{self.uri} does not match its manifest (size {size} vs {self.entry.size}, "
                               f"{self.entry.algorithm} {digest[:12]}… vs {self.entry.digest[:12]}…){self.note}")


class Verifying:
    """Verification of a :class:`~wmtp_core.commit.CheckpointStore` (mixed into it: uses its
    ``fs``, ``uri`` and ``read_manifest``)."""

    def verify_entry(self, path: str, entry: FileEntry) -> None:
        """Check one file of a checkpoint against its manifest entry (streamed, never held whole)."""
        fpath = posixpath.join(path, entry.path)
        try:
            digest, size = digest_path(self.fs, fpath, entry.algorithm)
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

    def verify_async(self, path: str, manifest: Manifest | None = None, staging: Staging | None = None
                     ) -> tuple[Manifest, dict[str, cf.Future]]:
        """Verify every file in parallel, largest first. Each future yields the verified source
        (a local path, a staging copy with ``staging``, or the bytes), so a caller can
        deserialise one file while the others are still being checked; nothing is deserialised
        before its own check passed. ``manifest``: one the caller just read with
        :meth:`read_manifest` (validated)."""
        manifest = manifest if manifest is not None else self.read_manifest(path)
        futures = {
            e.path: _READERS.submit(verified_source, self.fs, posixpath.join(path, e.path), e,
                                    self.uri(posixpath.join(path, e.path)), staging)
            for e in sorted(manifest.files, key=lambda e: -e.size)
        }
        return manifest, {e.path: futures[e.path] for e in manifest.files}
