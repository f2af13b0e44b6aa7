"""Reading checkpoints back: a manifest validated before it is believed, and what each
checkpoint directory of a run is (committed, unverifiable, staging, foreign).

A manifest is untrusted input: it is validated against the schema, the directory it lies in and
the files beside it. A directory without a manifest is staging (with WMTP's marker) or not WMTP's
at all (without it): never listed, never loaded.
"""

from __future__ import annotations

import enum
import json
import os
import posixpath
import stat
from typing import Any

import attrs
from fsspec.implementations.local import LocalFileSystem

from wmtp_core.bounded import kind, read_bounded
from wmtp_core.errors import CheckpointError, CorruptError, ManifestError, UnverifiableError
from wmtp_core.manifest import Manifest
from wmtp_core.naming import FINAL_NAME, MANIFEST, OWN_FILES, STAGING_MARKER, STEP_DIR
from wmtp_core.roles import Role

MAX_MANIFEST_BYTES = 16 << 20


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




class Reading:
    """Reading and inventory of a :class:`~wmtp_core.commit.CheckpointStore` (mixed into it:
    uses its ``fs``, ``uri`` and ``run_dir``)."""

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
        if isinstance(self.fs, LocalFileSystem) and os.path.islink(path.rstrip("/")):
            raise UnverifiableError(f"{where} is a link; a checkpoint is a plain directory")
        try:  # a FIFO or a link to /dev/zero here is refused, never read
            raw = read_bounded(self.fs, posixpath.join(path, MANIFEST), MAX_MANIFEST_BYTES, "a manifest",
                               where=f"{where}/{MANIFEST}", error=UnverifiableError)
        except FileNotFoundError:
            raise CheckpointError(f"{where} has no {MANIFEST}: it was never committed") from None
        except IsADirectoryError:  # pragma: no cover - object storage that says so on open
            raise UnverifiableError(f"{where}/{MANIFEST} is a directory, not a file") from None
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
        step = STEP_DIR.fullmatch(name)
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
            if rel != MANIFEST and rel not in OWN_FILES:
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
                mode = os.lstat(full).st_mode
                if not stat.S_ISREG(mode):  # a FIFO would block the digest's read forever
                    raise UnverifiableError(f"{where}/{rel} is {kind(mode)}; a checkpoint holds plain files only")

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
            if STEP_DIR.fullmatch(top):
                entries = by_dir.setdefault(top, [])
                if "/" in rel and info.get("type") != "directory":
                    entries.append(info)
        out = []
        for name in sorted(by_dir, key=lambda n: int(n[5:])):
            out.append(self.inspect_dir(posixpath.join(base, name), by_dir[name]))
        return out

    def inspect_dir(self, path: str, contents: list[dict[str, Any]] | None = None) -> Inspected:
        """What the checkpoint directory at ``path`` is (see :class:`Inspected`). A directory
        that is a link, or whose ``manifest.json`` is not a file, is unverifiable: it claims a
        step that a save of that step could not overwrite."""
        if isinstance(self.fs, LocalFileSystem) and os.path.islink(path.rstrip("/")):
            return Inspected(path, CheckpointState.UNVERIFIABLE,
                             problem=f"{self.uri(path)} is a link; a checkpoint is a plain directory")
        if contents is None:
            self.fs.invalidate_cache(path)
            try:
                contents = [i for i in self.fs.find(path, detail=True).values()]
            except FileNotFoundError:
                contents = []
        names = {posixpath.basename(i["name"]) for i in contents
                 if posixpath.dirname(i["name"].rstrip("/")) == path.rstrip("/")}
        if MANIFEST not in names:
            if self.fs.exists(posixpath.join(path, MANIFEST)):
                return Inspected(path, CheckpointState.UNVERIFIABLE,
                                 problem=f"{self.uri(path)}/{MANIFEST} is a directory, not a file")
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

    def _files(self, path: str) -> list[str]:
        try:
            return self.fs.find(path)
        except FileNotFoundError:
            return []
