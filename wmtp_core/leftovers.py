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

from wmtp_core.bounded import read_bounded
from wmtp_core.errors import WmtpError
from wmtp_core.naming import (
    FINAL_NAME,
    MANIFEST,
    QUARANTINE_NOTE,
    QUARANTINED_DIR,
    STAGING_MARKER,
    step_of,
)
from wmtp_core.store_read import CheckpointState, Inspected

MAX_NOTE_BYTES = 1 << 20
"""The largest quarantine note read: WMTP's are a few hundred bytes (a reason of one line)."""


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
    """False for an upload that does not carry WMTP's mark (see
    :meth:`Leftovers.incomplete_uploads`): never aborted."""
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
        else:  # the note first: a copy cut short is WMTP's all the same (gc --quarantined removes it)
            self.fs.pipe_file(posixpath.join(target, QUARANTINE_NOTE), note)
            prefix = path.rstrip("/") + "/"
            for src in self._files(path):
                if src.startswith(prefix) and posixpath.basename(src) != STAGING_MARKER:
                    self.fs.copy(src, target + "/" + src[len(prefix):])
            self.delete(path)
        self.fs.invalidate_cache(posixpath.dirname(path))
        return target

    def quarantined(self, run: str) -> list[Inspected]:
        """``run``'s quarantined checkpoints (oldest step first), each with the reason its note
        gives: only directories carrying WMTP's own note (see :meth:`quarantine_dirs`)."""
        return [i for i in self.quarantine_dirs(run) if i.state is CheckpointState.QUARANTINED]

    def quarantine_dirs(self, run: str) -> list[Inspected]:
        """Every directory of ``run`` named like a quarantined checkpoint
        (``<name>.quarantined-<time>``), oldest step first: ``quarantined`` with the reason its
        note gives when it carries WMTP's note (:meth:`quarantine_note`), else ``foreign`` (made
        by hand or by another tool: never removed) with what is missing."""
        base = self.run_dir(run)
        self.fs.invalidate_cache(base)
        try:
            found = [e for e in self.fs.ls(base, detail=True) if e.get("type") == "directory" or e.get("islink")]
        except FileNotFoundError:
            return []
        out = []
        for entry in found:
            name = posixpath.basename(entry["name"].rstrip("/"))
            if not QUARANTINED_DIR.fullmatch(name):
                continue
            path = posixpath.join(base, name)
            if entry.get("islink") or (isinstance(self.fs, LocalFileSystem) and os.path.islink(path)):
                out.append(Inspected(path, CheckpointState.FOREIGN, problem="a link, not a directory WMTP "
                                     "moved aside"))
                continue
            reason = self.quarantine_note(path)
            out.append(Inspected(path, CheckpointState.QUARANTINED, problem=reason) if reason is not None
                       else Inspected(path, CheckpointState.FOREIGN, problem=f"no {QUARANTINE_NOTE} note"))

        def step(i: Inspected) -> int:  # step_4.quarantined-<time>: 4; final.quarantined-<time>: last
            found = step_of(posixpath.basename(i.path).partition(".")[0])
            return found if found is not None else 1 << 62

        return sorted(out, key=lambda i: (step(i), i.path))

    def quarantine_note(self, path: str) -> str | None:
        """The reason WMTP's note (``.wmtp-quarantine``) in the directory ``path`` gives, or
        ``None`` when there is no note WMTP wrote: none, not a regular file (on local disk: a
        link), larger than :data:`MAX_NOTE_BYTES`, or not the JSON object :meth:`quarantine`
        writes (``reason``, ``from``, ``at`` as text, ``at`` a time). Read bounded
        (:func:`~wmtp_core.bounded.read_bounded`): a FIFO or a link to ``/dev/zero`` is refused,
        never read."""
        note = posixpath.join(path, QUARANTINE_NOTE)
        try:
            if isinstance(self.fs, LocalFileSystem) and os.path.islink(note):
                return None
            data = json.loads(read_bounded(self.fs, note, MAX_NOTE_BYTES, "a quarantine note"))
            if not isinstance(data, dict) or not all(isinstance(data.get(k), str) for k in ("reason", "from", "at")):
                return None
            dt.datetime.fromisoformat(data["at"])
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, WmtpError,
                ValueError, RecursionError):
            return None
        return data["reason"]

    def incomplete_uploads(self, run: str | None = None) -> list[Incomplete]:
        """Hook: multipart uploads begun under ``<root>/<run>/`` (every run's: under ``<root>/``)
        that were never completed nor aborted: what a process killed while it wrote a large file
        to an object store leaves, stored (and billed) but shown by no listing. Each is an
        :class:`Incomplete` of kind ``upload``; it is WMTP's (``ours``) only when it carries
        WMTP's mark: it is for a file of a run's ``step_N`` or ``final`` directory and that
        directory holds WMTP's staging marker (a save began there and did not finish) or a
        manifest that passes every check. Else (a directory another tool writes, one that is
        gone, a key WMTP's layout does not name) ``ours`` is false and ``problem`` says why: it
        is never aborted. Another run's are never listed. Default: none (a filesystem without
        multipart uploads)."""
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
                        not self.fs.isfile(posixpath.join(item.path, STAGING_MARKER)):
                    continue
                if not dry_run:
                    self.fs.rm(item.path, recursive=True)
            done.append(item)
        return done
