"""What is left beside committed checkpoints: checkpoints moved aside after failing
verification (quarantine), and saves that never finished (staging directories, and multipart
uploads an object store still holds for a killed save).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import posixpath
import socket

import attrs
from fsspec.implementations.local import LocalFileSystem

from wmtp_core.naming import (
    FINAL_NAME,
    MANIFEST,
    QUARANTINE_NOTE,
    QUARANTINED_DIR,
    STAGING_MARKER,
    step_of,
)
from wmtp_core.store_read import CheckpointState, Inspected


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


class Leftovers:
    """Quarantine and incomplete saves of a :class:`~wmtp_core.commit.CheckpointStore` (mixed
    into it: uses its ``fs``, ``uri``, paths, ``inspect`` and ``delete``)."""

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
        def step(i: Inspected) -> int:  # step_4.quarantined-<time>: 4; final.quarantined-<time>: last
            found = step_of(posixpath.basename(i.path).partition(".")[0])
            return found if found is not None else 1 << 62

        return sorted(out, key=lambda i: (step(i), i.path))

    def incomplete_uploads(self, run: str | None = None) -> list[Incomplete]:
        """Hook: multipart uploads begun under ``<root>/<run>/`` (every run's: under ``<root>/``)
        that were never completed nor aborted: what a process killed while it wrote a large file
        to an object store leaves, stored (and billed) but shown by no listing. Each is an
        :class:`Incomplete` of kind ``upload``; it is WMTP's (``ours``) when it is for a file of a
        run's ``step_N`` or ``final`` directory and that directory is WMTP's (its marker or its
        manifest) or is gone, else ``ours`` is false and ``problem`` says why. Another run's are
        never listed. Default: none (a filesystem without multipart uploads)."""
        return []

    def abort_upload(self, upload: Incomplete) -> None:
        """Hook: abort one upload :meth:`incomplete_uploads` listed, deleting its parts; one that
        completed or was aborted meanwhile is left as it is (no error). Default: nothing."""

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
