"""The sink every file-like plugin builds on: the commit protocol plus torch serialisation.

A plugin for another fsspec protocol registers ``FileSink`` (or a subclass) with its protocols;
it inherits staging, manifests, sha256 verification, listing and safe deletion.
"""

from __future__ import annotations

import io
import json
import os
import time
from typing import Any, BinaryIO, Mapping

import torch

from wmtp_core.commit import CheckpointError, CheckpointStore, step_dirname
from wmtp_core.engine.state import tensor_bytes
from wmtp_core.events import CheckpointEmitted, Manifest, Payload, Receipt, SinkContext
from wmtp_core.roles import Role

FINAL_DIR = "final"


class torch_writer:
    """Serialise ``obj`` with torch.save: into a stream, or straight to a local path."""

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def __call__(self, stream: BinaryIO) -> None:
        torch.save(self.obj, stream)

    def save_to_path(self, path: str) -> None:
        with open(path, "wb") as f:
            torch.save(self.obj, f)
            f.flush()
            os.fsync(f.fileno())


def json_writer(obj: Any):
    def write(stream: BinaryIO) -> None:
        stream.write(json.dumps(obj, indent=2, sort_keys=True).encode())

    return write


def load_part(source: str | bytes) -> Any:
    """Deserialise one verified part: a local path (memory-mapped, copy-on-write) or bytes.
    Checkpoints are untrusted: ``weights_only``, never arbitrary pickle."""
    if isinstance(source, str):
        return torch.load(source, map_location="cpu", weights_only=True, mmap=True)
    return torch.load(io.BytesIO(source), map_location="cpu", weights_only=True)


class FileSink:
    """Stores checkpoints as files under ``<base_path>/<run>/`` through fsspec."""

    name = "file"

    def __init__(self, context: SinkContext, *, sink_name: str | None = None) -> None:
        self.context = context
        self.name = sink_name or type(self).name
        self.store_ = CheckpointStore.from_url(context.base_path, **dict(context.options))
        self.run = context.run.name

    # -- the sink interface --------------------------------------------------------------
    def location(self) -> str:
        """Where this run's checkpoints live (no credentials)."""
        return self.store_.uri(self.store_.run_dir(self.run))

    def store(self, event: CheckpointEmitted, payload: Payload) -> Receipt:
        t0 = time.perf_counter()
        if event.role is Role.FINAL:
            name = FINAL_DIR
            files = {"model.pt": torch_writer(dict(payload.parts["model"]))}
            files["model_config.json"] = json_writer(dict(payload.model_config))
        else:
            name = step_dirname(event.step)
            # largest first: each file is hashed while the next ones are written
            order = sorted(payload.parts.items(), key=lambda kv: -tensor_bytes(kv[1]))
            files = {f"{part}.pt": torch_writer(obj) for part, obj in order}
        manifest = self.store_.write(
            self.run,
            name,
            files,
            step=event.step,
            role=event.role,
            lineage=event.run.lineage,
            meta={"algo": event.run.algo, "metrics": dict(event.metrics),
                  "resumed_from": event.run.resumed_from, "torch": torch.__version__},
        )
        path = self.store_.path_of(self.run, name)
        return Receipt(
            role=event.role,
            sink=self.name,
            run=self.run,
            step=event.step,
            uri=self.store_.uri(path),
            nbytes=manifest.nbytes,
            seconds=time.perf_counter() - t0,
        )

    def stored_final(self, run) -> str | None:
        """The URI of this run's committed final model, if there is one."""
        path = self.store_.path_of(run.name, FINAL_DIR)
        try:
            self.store_.read_manifest(path)
        except CheckpointError:
            return None
        return self.store_.uri(path)

    def committed(self) -> list[tuple[str, Manifest]]:
        """This run's committed resume checkpoints as ``(uri, manifest)``, oldest first."""
        return [(self.store_.uri(p), m) for p, m in self.store_.list(self.run)]

    def delete(self, uri: str) -> None:
        self.store_.delete(self._path(uri))

    def load(self, uri: str) -> tuple[Manifest, dict[str, Any]]:
        """Verify every file against the manifest, then deserialise the parts."""
        manifest, pending = self.store_.verify_async(self._path(uri))
        try:
            # each part is deserialised as soon as its own bytes verified
            parts = {name.removesuffix(".pt"): load_part(fut.result())
                     for name, fut in pending.items() if name.endswith(".pt")}
        finally:
            for fut in pending.values():
                fut.cancel()
        return manifest, parts

    def close(self) -> None:
        pass

    def _path(self, uri: str) -> str:
        prefix = f"{self.store_.protocol}://"
        return uri[len(prefix):] if uri.startswith(prefix) else uri


def load_model_from_checkpoint(uri: str, storage_options: Mapping[str, Any] | None = None):
    """Weights and architecture from a committed checkpoint (resume ``step_N`` or ``final``),
    verified against its manifest before anything is deserialised."""
    import posixpath

    import fsspec

    from wmtp_core.events import LoadedModel

    fs, path = fsspec.core.url_to_fs(uri, **dict(storage_options or {}))
    path = path.rstrip("/")
    store = CheckpointStore(fs, posixpath.dirname(posixpath.dirname(path)))
    manifest, blobs = store.read_verified(path)
    if "model.pt" not in blobs:
        raise CheckpointError(f"{uri} holds no model.pt")
    if "model_config.json" in blobs:
        config = json.loads(blobs["model_config.json"])
    elif "trainer.pt" in blobs:
        config = load_part(blobs["trainer.pt"]).get("model_config")
    else:
        config = None
    if not config:
        raise CheckpointError(f"{uri} does not record its model architecture")
    return LoadedModel(weights=load_part(blobs["model.pt"]), model_config=config,
                       source=store.uri(path))
