"""The sink every file-like plugin builds on: the commit protocol plus torch serialisation.

A plugin for another fsspec protocol registers ``FileSink`` (or a subclass) with its protocols;
it inherits staging, validated manifests, verified loading, listing and safe deletion. Its
:class:`~wmtp_core.commit.CheckpointStore` is the public ``checkpoints`` attribute.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any, BinaryIO, Mapping

import concurrent.futures as cf

from wmtp_core import eval_records

from wmtp_core.commit import CheckpointState, CheckpointStore, step_dirname
from wmtp_core.errors import CheckpointError, CorruptError, SaveError, first_line
from wmtp_core.events import CheckpointEmitted, Payload, Receipt, SinkContext
from wmtp_core.manifest import Manifest
from wmtp_core.naming import FINAL_NAME, step_of
from wmtp_core.safe_load import load_part, safe_dcp_reader
from wmtp_core.roles import Role
from wmtp_core.sinks import Holding, LoadedCheckpoint, ResumableSink
from wmtp_core.staging import Staging

FINAL_DIR = FINAL_NAME
RANK_PART = "{part}_rank{rank}.pt"
"""A part of a sharded checkpoint that each rank keeps whole (its counters, RNG streams and
data position: ``trainer``), one file per rank."""
RANK_FILE = re.compile(r"(?P<part>\w+?)_rank(?P<rank>\d+)\.pt")


class torch_writer:
    """Serialise ``obj`` with torch.save: into a stream, or straight to a local path."""

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def __call__(self, stream: BinaryIO) -> None:
        import torch

        torch.save(self.obj, stream)

    def save_to_path(self, path: str) -> None:
        """Write the file with torch's own writer. The caller makes it durable (``fsync``)."""
        import torch

        with open(path, "wb") as f:
            torch.save(self.obj, f)


class file_copier:
    """A local file into the store: in chunks into a stream, or to a local path as a hard link
    when it can (the file must not change afterwards), else the OS's own copy."""

    def __init__(self, source: str) -> None:
        self.source = source

    def __call__(self, stream: BinaryIO) -> None:
        with open(self.source, "rb") as f:
            shutil.copyfileobj(f, stream, 16 << 20)

    def save_to_path(self, path: str) -> None:
        # the source is a folder written for this store and removed after it: on the same
        # filesystem a hard link stores its bytes without writing them again
        try:
            os.link(self.source, path)
        except OSError:
            shutil.copyfile(self.source, path)


def json_writer(obj: Any):
    def write(stream: BinaryIO) -> None:
        stream.write(json.dumps(obj, indent=2, sort_keys=True).encode())

    return write


def shard_sizes(metadata: Any) -> dict[str, int]:
    """The files a sharded save wrote, each with the least size DCP's ``metadata`` needs of it
    (``.metadata`` itself included)."""
    expected: dict[str, int] = {}
    for info in metadata.storage_data.values():
        expected[info.relative_path] = max(expected.get(info.relative_path, 0), info.offset + info.length)
    expected[".metadata"] = 1
    return expected


class FileSink(ResumableSink):
    """Stores checkpoints as files under ``<base_path>/<run>/`` through fsspec: resume state in
    ``step_<N>/``, the final model in ``final/``. Implements :class:`wmtp_core.sinks.ResumableSink`
    and the optional ``stored_final``, ``held`` and ``unverifiable``."""

    store_class: type[CheckpointStore] = CheckpointStore
    """The store this sink commits through. ``CheckpointStore`` itself picks, by the base path's
    protocol, the class the installed plugins registered for it (``SinkSpec.store``); a sink for
    one protocol names its own subclass (the ``s3`` sink: its ``S3CheckpointStore``)."""

    def __init__(self, context: SinkContext) -> None:
        self.context = context
        self.checkpoints = self.store_class.from_url(context.base_path, **dict(context.options))
        """Where and how this sink commits: list, verify, read and delete its checkpoints."""
        self.run = context.run.name

    # -- the sink interface --------------------------------------------------------------
    def location(self) -> str:
        """Where this run's checkpoints live (no credentials)."""
        return self.checkpoints.uri(self.checkpoints.run_dir(self.run))

    def store(self, event: CheckpointEmitted, payload: Payload) -> Receipt:
        import torch

        from wmtp_core.tensors import tensor_bytes

        if payload.sharded and event.role is Role.RESUME:
            return self._store_sharded(event, payload)
        if event.role is Role.FINAL and event.supersedes:
            # one final model per run here: the one of an earlier step goes (uncommitted first),
            # then the new one is committed in its place; its manifest names what it superseded
            path = self.checkpoints.path_of(self.run, FINAL_DIR)
            if self.checkpoints.fs.exists(path):
                self.checkpoints.delete(path)
        if event.role is Role.FINAL and payload.folder:
            # a Hugging Face folder: its files as they are, so from_pretrained reads final/ directly
            name = FINAL_DIR
            paths = [os.path.join(payload.folder, f) for f in os.listdir(payload.folder)]
            paths = sorted(filter(os.path.isfile, paths), key=lambda p: -os.path.getsize(p))
            files = {os.path.basename(p): file_copier(p) for p in paths}
            nbytes = sum(os.path.getsize(p) for p in paths)
        elif event.role is Role.FINAL:
            name = FINAL_DIR
            files = {"model.pt": torch_writer(dict(payload.parts["model"]))}
            files["model_config.json"] = json_writer(dict(payload.model_config))
            nbytes = tensor_bytes(payload.parts["model"], storages=True)
        else:
            name = step_dirname(event.step)
            # largest first: each file is hashed while the next ones are written
            order = sorted(payload.parts.items(), key=lambda kv: -tensor_bytes(kv[1]))
            files = {f"{part}.pt": torch_writer(obj) for part, obj in order}
            nbytes = tensor_bytes(payload.parts, storages=True)
        # a failure commits nothing, removes the staging and names what failed (a full disk:
        # DiskFullError; storage that failed once the clients' retries ran out: SaveError)
        manifest = self.checkpoints.write(
            self.run,
            name,
            files,
            step=event.step,
            role=event.role,
            lineage=event.run.lineage,
            meta={"algo": event.run.algo, "metrics": dict(event.metrics),
                  "resumed_from": event.run.resumed_from, "torch": torch.__version__,
                  **({"supersedes": event.supersedes} if event.supersedes else {}),
                  **({"saved_because": event.saved_because} if event.saved_because else {})},
            nbytes=nbytes,
        )
        path = self.checkpoints.path_of(self.run, name)
        return Receipt(role=event.role, run=self.run, step=event.step, uri=self.checkpoints.uri(path),
                       nbytes=manifest.nbytes)

    def _store_sharded(self, event: CheckpointEmitted, payload: Payload) -> Receipt:
        """Every rank writes its shards of the payload's ``sharded`` parts through DCP's fsspec
        writer and its own copy of every other part; once all are done, rank 0 hashes what
        landed and commits the manifest. The ranks agree through the context's coordinator."""
        world = self.context.coordinator
        name = step_dirname(event.step)
        path = self.checkpoints.path_of(self.run, name)
        failure = None
        if world.is_main:
            try:
                self.checkpoints.prepare(self.run, name)
            except Exception as e:  # every rank must learn of it, or the others wait forever
                failure = f"{type(e).__name__}: {e}"
        failure = world.broadcast(failure)
        if failure:
            raise CheckpointError(failure)
        metadata = self.write_shards(path, payload, world, step=event.step, cleanup=world.is_main)
        nbytes = self._commit_sharded(event, name, metadata, world).nbytes if world.is_main else None
        nbytes = world.broadcast(nbytes)  # a plain value: receipts hold read-only mappings
        if nbytes is None:
            raise CheckpointError(f"rank 0 could not commit {self.checkpoints.uri(path)}")
        return Receipt(role=event.role, run=self.run, step=event.step, uri=self.checkpoints.uri(path),
                       nbytes=nbytes, meta={"world_size": world.size})

    def write_shards(self, path: str, payload: Payload, world: Any, *, step: int, cleanup: bool) -> Any:
        """Every rank: write its shards of the payload's ``sharded`` parts into ``path`` through
        DCP's fsspec writer, and its own copy of every other part (``<part>_rank<N>.pt``).
        Returns DCP's metadata (every rank gets it). A failure on any rank is raised on every
        rank as :class:`SaveError`, the staging at ``path`` removed first where ``cleanup``."""
        import torch
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

        # Every rank reaches the check below whether its own part failed or not, so a failure on
        # one rank stops the others as soon as they finish their own writes, never after the
        # process group's timeout. (DCP itself gathers every rank's write result.)
        metadata, failure = None, None
        try:
            writer = FsspecWriter(self.checkpoints.uri(path), sync_files=True, **dict(self.context.options))
            metadata = dcp.save({part: payload.parts[part] for part in payload.sharded},
                                storage_writer=writer, process_group=world.group)
            for part, obj in payload.parts.items():
                if part not in payload.sharded:
                    with self.checkpoints.fs.open(f"{path}/{RANK_PART.format(part=part, rank=world.rank)}", "wb") as f:
                        torch.save(obj, f)
        except Exception as e:
            failure = f"rank {world.rank}: {type(e).__name__}: {first_line(e)}"
        failures = [f for f in world.gather(failure) if f]
        if failures:
            if cleanup:  # nothing of this save is committed: its staging goes at once
                try:
                    self.checkpoints.fs.rm(path, recursive=True)
                except Exception:
                    pass  # the next run's clean start removes it
            raise SaveError(f"the sharded save of step {step} to {self.checkpoints.uri(path)} "
                            f"failed, nothing of it was committed: {failures[0]}")
        return metadata

    def _commit_sharded(self, event: CheckpointEmitted, name: str, metadata: Any, world: Any, *,
                        expected: Mapping[str, int] | None = None, meta: Mapping[str, Any] | None = None) -> Manifest:
        """Once every rank wrote its part: hash what landed, check it against the sizes DCP's
        metadata needs (``expected``: those of the files this store holds, when not all of
        them), commit the manifest (``meta``: more to record in it)."""
        import torch

        return self.checkpoints.commit_existing(
            self.run, name, step=event.step, role=event.role, lineage=event.run.lineage,
            expected=shard_sizes(metadata) if expected is None else expected,
            meta={"algo": event.run.algo, "metrics": dict(event.metrics), "format": "dcp",
                  "world_size": world.size, "resumed_from": event.run.resumed_from,
                  "torch": torch.__version__,
                  **({"saved_because": event.saved_because} if event.saved_because else {}), **(meta or {})})

    def stored_final(self, run) -> Receipt | None:
        """This run's committed final model (``<run>/final``), if there is one, with the step
        of its weights."""
        path = self.checkpoints.path_of(run.name, FINAL_DIR)
        try:
            m = self.checkpoints.read_manifest(path)
        except CheckpointError:
            return None
        return Receipt(role=Role.FINAL, run=run.name, step=m.step, uri=self.checkpoints.uri(path), nbytes=m.nbytes,
                       meta=dict(m.meta))

    def held(self, run_name: str, lineages: set[str] | None = None) -> list[Holding]:
        """What this sink holds for ``run_name``: its committed final model (file-like sinks
        keep it in ``<run>/final``) and its committed resume checkpoints."""
        out = []
        final = self.checkpoints.path_of(run_name, FINAL_DIR)
        state = self.checkpoints.inspect_dir(final) if self.checkpoints.fs.isdir(final) else None
        if state is not None and state.state is CheckpointState.COMMITTED:
            m = state.manifest
            if lineages is None or m.lineage in lineages:
                out.append(Holding(role=Role.FINAL, uri=self.checkpoints.uri(final), step=m.step, nbytes=m.nbytes))
        for path, m in self.checkpoints.list(run_name):
            if lineages is None or m.lineage in lineages:
                out.append(Holding(role=Role.RESUME, uri=self.checkpoints.uri(path), step=m.step, nbytes=m.nbytes))
        return out

    def committed(self) -> list[tuple[str, Manifest]]:
        """This run's committed resume checkpoints as ``(uri, manifest)``, oldest first."""
        return [(self.checkpoints.uri(p), m) for p, m in self.checkpoints.list(self.run)]

    def unverifiable(self) -> list[tuple[str, int, str]]:
        """This run's step directories whose manifest cannot be believed, as
        ``(uri, step, reason)``: never resumed from, never counted by retention."""
        return [(self.checkpoints.uri(i.path), step_of(i.path), i.problem)
                for i in self.checkpoints.inspect(self.run) if i.state is CheckpointState.UNVERIFIABLE]

    def delete(self, uri: str) -> None:
        self.checkpoints.delete(self._path(uri))

    def quarantine(self, uri: str, reason: str) -> str | None:
        """Move the checkpoint ``uri`` names aside, as one that failed verification (see
        :meth:`wmtp_core.commit.CheckpointStore.quarantine`). Returns where it now is, or None
        when it is no longer there."""
        moved = self.checkpoints.quarantine(self._path(uri), reason)
        return self.checkpoints.uri(moved) if moved else None

    def quarantined(self) -> list[tuple[str, str]]:
        """This run's quarantined checkpoints as ``(uri, reason)``."""
        return [(self.checkpoints.uri(i.path), i.problem) for i in self.checkpoints.quarantined(self.run)]

    def record_evaluation(self, uri: str, metrics: Mapping[str, float]) -> bool:
        """The record beside the run's checkpoints (:mod:`wmtp_core.eval_records`)."""
        path = self._path(uri)
        eval_records.write(self.checkpoints.fs, path, self.checkpoints.read_manifest(path), metrics)
        return True

    def evaluations(self) -> dict[tuple[int, str], dict[str, float]]:
        return eval_records.read(self.checkpoints.fs, self.checkpoints.run_dir(self.run))

    def lease_store(self) -> CheckpointStore:
        """Where the run's lease lives (:mod:`wmtp_core.lease`): beside its checkpoints."""
        return self.checkpoints

    def load(self, uri: str) -> LoadedCheckpoint:
        """Validate the manifest, verify every file against it, then deserialise the parts
        (weights-only). A sharded (DCP) checkpoint gives this rank's trainer state and a reader
        the engine loads the shards through, into whatever world it runs in."""
        path = self._path(uri)
        manifest = self.checkpoints.read_manifest(path)
        if manifest.role is not Role.RESUME:
            raise CheckpointError(
                f"{self.checkpoints.uri(path)} is the {manifest.role.value} model of run {manifest.run!r}: "
                "it holds weights only, no optimizer or training state; resume from one of the "
                "run's step_N checkpoints")
        if manifest.meta.get("format") == "dcp":
            return self._load_sharded(path, manifest)
        with Staging() as staging:  # an object store's large files: verified staging copies, memory-mapped
            manifest, pending = self.checkpoints.verify_async(path, manifest, staging)
            try:
                # each part is deserialised as soon as its own bytes verified
                parts = {name.removesuffix(".pt"): load_part(fut.result(), self.checkpoints.uri(f"{path}/{name}"))
                         for name, fut in pending.items() if name.endswith(".pt")}
            finally:
                for fut in pending.values():
                    fut.cancel()
                cf.wait(list(pending.values()))  # nothing still writes into the staging folder it removes
        return LoadedCheckpoint(manifest=manifest, parts=parts)

    def _load_sharded(self, path: str, manifest: Manifest) -> LoadedCheckpoint:
        """Every rank of the context's coordinator calls this together: each verifies a share of
        the files and every rank learns of any failure. Returns this rank's own parts (another
        world size: rank 0's) and a DCP reader for the sharded ones."""
        world = self.context.coordinator
        rank, size = world.rank, world.size
        errors = []
        for e in [e for i, e in enumerate(manifest.files) if i % size == rank]:
            try:
                self.checkpoints.verify_entry(path, e)
            except CheckpointError as err:
                errors.append((isinstance(err, CorruptError), str(err)))
        errors = [m for ms in world.gather(errors) for m in ms]
        if errors:
            corrupt, message = errors[0]
            raise (CorruptError if corrupt else CheckpointError)(message)
        names = {e.path for e in manifest.files}
        same_world = manifest.meta.get("world_size") == size
        own = {}
        for name in sorted(names):
            found = RANK_FILE.fullmatch(name)
            if found and int(found["rank"]) == (rank if same_world else 0):  # else rank 0's position
                own[found["part"]] = load_part(self.checkpoints.fs.cat_file(f"{path}/{name}"),
                                               self.checkpoints.uri(f"{path}/{name}"))
        where = self.checkpoints.uri(path)
        reader = safe_dcp_reader(where, where, names, **dict(self.context.options))
        self._check_objects(path, reader.read_metadata())  # refuse now, with a plain error
        return LoadedCheckpoint(manifest=manifest, parts=own, shards=reader, same_world=same_world)

    def _check_objects(self, path: str, metadata: Any) -> None:
        """Every non-tensor item (optimizer settings, counters) must pass weights-only loading."""
        from torch.distributed.checkpoint.metadata import BytesStorageMetadata

        byte_items = {fqn for fqn, md in metadata.state_dict_metadata.items()
                      if isinstance(md, BytesStorageMetadata)}
        for index, info in metadata.storage_data.items():
            if index.fqn not in byte_items or getattr(info, "transform_descriptors", None):
                continue  # transformed items are still checked as DCP reads them
            # the item's own bytes, one ranged read (an open file would read ahead a whole block:
            # 256 MiB on S3, once per item)
            data = self.checkpoints.fs.cat_file(f"{path}/{info.relative_path}", start=info.offset,
                                                end=info.offset + info.length)
            load_part(data, f"{self.checkpoints.uri(path)} ({index.fqn})")

    def _path(self, uri: str) -> str:
        prefix = f"{self.checkpoints.protocol}://"
        return uri[len(prefix):] if uri.startswith(prefix) else uri

    def clean_incomplete(self) -> list[Any]:
        """Remove this run's own saves that never finished: its staging directories and its
        incomplete multipart uploads (on object stores whose store lists them, S3's), as a killed
        process leaves them. Call it once, on
        rank 0, after the resume point is found and before the first save: no save of this run
        can be in flight then. Never touches another run's leftovers, a committed checkpoint or
        a directory WMTP did not write. Returns what was removed
        (:class:`~wmtp_core.leftovers.Incomplete`; ``describe()`` says what each was)."""
        return self.checkpoints.clean_incomplete(self.run)
