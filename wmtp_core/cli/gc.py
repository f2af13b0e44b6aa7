"""``wmtp gc``: remove what WMTP wrote and no run needs (staging of saves that never finished,
quarantined checkpoints, incomplete uploads); never a committed checkpoint, never what WMTP did
not write."""

from __future__ import annotations

import posixpath
import time

import attrs
from rich.console import Console

from wmtp_core.cli.inventory import leftovers, locate
from wmtp_core.commit import (
    MANIFEST,
    QUARANTINE_NOTE,
    QUARANTINED_DIR,
    STAGING_MARKER,
    CheckpointState,
    CheckpointStore,
)
from wmtp_core.leftovers import Incomplete
from wmtp_core.errors import UsageError
from wmtp_core.lease import live_writer
from wmtp_core.exits import EXIT_OK
from wmtp_core.report import (
    human,
)


from wmtp_core.cli.commands import _count, storage_options


def cmd_gc(args, out: Console, err: Console) -> int:
    """Remove what WMTP wrote and no run needs, in three subjects: staging directories of saves
    that never finished, quarantined checkpoints (``--quarantined``) and incomplete uploads
    (``--incomplete``); never a committed checkpoint, never what WMTP did not write."""
    if args.min_age < 0:
        raise UsageError(f"--min-age: {args.min_age:g} is not accepted; use a number of seconds >= 0")
    loc = locate(args.uri, storage_options(args.storage_option))
    if loc.kind == "checkpoint":
        raise UsageError(f"{args.uri} is one checkpoint; gc takes a run directory or a base path")
    verb = "would remove" if args.dry_run else "removed"
    # uploads first: a staging directory's marker is what makes the uploads into it WMTP's
    listed = loc.store.incomplete_uploads(loc.runs[0] if loc.kind == "run" else None)
    uploads, pending = _gc_uploads(args, listed, loc.store, out) if args.incomplete else \
        (Freed(), [u for u in listed if u.ours])
    staged = quarantined = Freed()
    for run in loc.runs:
        staged += _gc_staging(args, loc.store, run, out, verb, pending)
        quarantined += _gc_quarantined(args, loc.store, run, out, verb)
    freed = staged.bytes + quarantined.bytes + uploads.bytes
    out.print(f"{verb} {_count(staged.count, 'staging directory', 'staging directories')}"
              + (f", {'would abort' if args.dry_run else 'aborted'} {_count(uploads.count, 'incomplete upload')}"
                 if args.incomplete else "")
              + (f", {verb} {_count(quarantined.count, 'quarantined checkpoint')}" if args.quarantined else "")
              + f"; {'would free' if args.dry_run else 'freed'} {human(freed)} ({freed} bytes)")
    return EXIT_OK


@attrs.frozen
class Freed:
    """What one subject of ``wmtp gc`` removed (or would remove): how many, how many bytes."""

    count: int = 0
    bytes: int = 0

    def __add__(self, other: Freed) -> Freed:
        return Freed(self.count + other.count, self.bytes + other.bytes)


def _young(args, age: float | None, seen: str) -> str | None:
    """Why something under ``--min-age`` is kept (a save may still be in flight), ``seen``
    formatted with its age, or ``None``."""
    if args.min_age > 0 and (age is None or age < args.min_age):
        return "age unknown" if age is None else seen.format(age=age)
    return None


def _gc_staging(args, store: CheckpointStore, run: str, out: Console, verb: str,
                pending: list[Incomplete]) -> Freed:
    """This run's staging directories, unless the run is being written; what cannot be
    believed and what WMTP did not write are kept and named, and so is staging that WMTP's
    incomplete uploads (``pending``) still go into: its marker is their mark."""
    live, freed = live_writer(store, run), Freed()
    for e in leftovers(store, run):
        if e.state is CheckpointState.QUARANTINED or QUARANTINED_DIR.fullmatch(e.name):
            continue  # quarantine-like directories are _gc_quarantined's
        into = [u for u in pending if u.path.startswith(e.path.rstrip("/") + "/")]
        if e.state is CheckpointState.UNVERIFIABLE:
            out.print(f"kept    {e.uri}: its {MANIFEST} cannot be believed ({e.problem}); "
                      "inspect it before deleting it by hand")
        elif live is not None:
            out.print(f"kept    {e.uri}: run {run!r} is being written ({live}); a save may be in flight")
        elif e.state is CheckpointState.FOREIGN:
            out.print(f"kept    {e.uri}: not ours (no {MANIFEST} and no {STAGING_MARKER}: WMTP did not "
                      "write it); left in place")
        elif young := _young(args, time.time() - e.modified if e.modified is not None else None,
                             "newest file {age:.0f} s old"):
            # young staging may be a save still in flight in another process
            out.print(f"kept    {e.uri}: {young}, under --min-age {args.min_age:g} s")
        elif into:
            out.print(f"kept    {e.uri}: {_count(len(into), 'incomplete upload')} of a killed save into it "
                      "(its marker is their mark); `wmtp gc --incomplete` aborts them, then removes it")
        # the save may have committed since the listing: look again just before removing
        elif not store.fs.exists(posixpath.join(e.path, MANIFEST)) and \
                store.fs.isfile(posixpath.join(e.path, STAGING_MARKER)):
            if not args.dry_run:
                store.fs.rm(e.path, recursive=True)
            freed += Freed(1, e.bytes)
            out.print(f"{verb} {e.uri} ({_count(e.files, 'file')}, {human(e.bytes)})")
    return freed


def _gc_quarantined(args, store: CheckpointStore, run: str, out: Console, verb: str) -> Freed:
    """This run's quarantined checkpoints: named, and removed with ``--quarantined``; only a
    directory carrying WMTP's note (``.wmtp-quarantine``) is one, others are named and kept."""
    freed = Freed()
    for e in leftovers(store, run):
        if e.state is CheckpointState.FOREIGN and QUARANTINED_DIR.fullmatch(e.name):
            out.print(f"kept    {e.uri}: not WMTP's ({e.problem}); left in place")
            continue
        if e.state is not CheckpointState.QUARANTINED:
            continue
        if not args.quarantined:
            out.print(f"kept    {e.uri}: quarantined ({e.problem}); --quarantined removes it")
            continue
        if store.quarantine_note(e.path) is None:  # the note is looked at again just before removing
            out.print(f"kept    {e.uri}: not WMTP's (no {QUARANTINE_NOTE} note); left in place")
            continue
        if not args.dry_run:
            store.fs.rm(e.path, recursive=True)
        freed += Freed(1, e.bytes)
        out.print(f"{verb} quarantined {e.uri} ({_count(e.files, 'file')}, {human(e.bytes)})")
    return freed


def _gc_uploads(args, listed: list[Incomplete], store: CheckpointStore,
                out: Console) -> tuple[Freed, list[Incomplete]]:
    """Uploads of killed saves (``listed``: under the run, or under every run of the base):
    aborted when they carry WMTP's mark and are older than ``--min-age``; the others are named
    and left in place. Returns what was aborted and WMTP's uploads that were kept."""
    freed, kept = Freed(), []
    for upload in listed:
        if not upload.ours:
            out.print(f"kept    incomplete upload of {upload.uri}: not ours ({upload.problem}); left in place")
            continue
        if young := _young(args, time.time() - upload.started if upload.started is not None else None,
                           "begun {age:.0f} s ago"):
            out.print(f"kept    incomplete upload of {upload.uri}: {young}, under --min-age {args.min_age:g} s")
            kept.append(upload)
            continue
        if not args.dry_run:
            store.abort_upload(upload)
        freed += Freed(1, upload.bytes or 0)
        out.print(f"{'would abort' if args.dry_run else 'aborted'} incomplete upload of {upload.uri} "
                  f"({human(upload.bytes or 0)} in parts)")
    return freed, kept
