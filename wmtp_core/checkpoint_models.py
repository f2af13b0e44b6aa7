"""The core's own answer to ``wmtp_load_model``: weights from a committed checkpoint.

Registered with every plugin manager as ``trylast``, so a plugin that understands a URI (the
MLflow registry's ``models:/``) answers first, and any other URI is read as a committed
checkpoint (a resume ``step_N`` or a ``final`` directory), validated and verified against its
manifest before anything is deserialised, weights-only. A committed Hugging Face final model
(its folder holds ``config.json``) is verified file by file and handed on as a folder.
"""

from __future__ import annotations

import json
import posixpath
from typing import Any, Mapping

import fsspec

from wmtp_core.commit import CheckpointStore
from wmtp_core.errors import CheckpointError
from wmtp_core.events import LoadedModel
from wmtp_core.filesink import load_part
from wmtp_core.hookspecs import hookimpl


def load_model_from_checkpoint(uri: str, storage_options: Mapping[str, Any] | None = None) -> LoadedModel:
    """Weights and architecture from a committed checkpoint, verified before deserialising."""
    import torch

    fs, path = fsspec.core.url_to_fs(uri, **dict(storage_options or {}))
    path = path.rstrip("/")
    if not fs.exists(path):
        raise CheckpointError(f"{uri!r} does not exist")
    store = CheckpointStore(fs, posixpath.dirname(posixpath.dirname(path)))
    if "config.json" in {e.path for e in store.read_manifest(path).files}:
        return LoadedModel(source=store.uri(path), folder=verified_folder(store, path))
    manifest, blobs = store.read_verified(path)
    if "model.pt" not in blobs:
        raise CheckpointError(f"{uri} holds no model.pt")
    config = None
    if "model_config.json" in blobs:
        try:
            config = json.loads(blobs["model_config.json"])
        except ValueError:
            raise CheckpointError(f"{uri}/model_config.json is not valid JSON") from None
    elif "trainer.pt" in blobs:
        trainer = load_part(blobs["trainer.pt"], f"{uri}/trainer.pt")
        config = trainer.get("model_config") if isinstance(trainer, dict) else None
    if not config or not isinstance(config, dict):
        raise CheckpointError(f"{uri} does not record its model architecture")
    weights = load_part(blobs["model.pt"], f"{uri}/model.pt")
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise CheckpointError(f"{uri}/model.pt is not a state dict of tensors")
    return LoadedModel(weights=weights, model_config=config, source=store.uri(path))


def verified_folder(store: CheckpointStore, path: str) -> str:
    """A committed Hugging Face folder (a final model WMTP stored), every file checked against
    its manifest: on local disk the folder itself, its files hashed in parallel; elsewhere a
    private copy (``wmtp-model-*``), checked as it landed."""
    import os
    import tempfile

    from fsspec.implementations.local import LocalFileSystem

    if isinstance(store.fs, LocalFileSystem):
        _, futures = store.verify_async(path)
        for future in futures.values():
            future.result()
        return path
    manifest = store.read_manifest(path)
    target = tempfile.mkdtemp(prefix="wmtp-model-")
    local = CheckpointStore(LocalFileSystem(), os.path.dirname(target))
    for entry in manifest.files:
        store.fs.get(posixpath.join(path, entry.path), os.path.join(target, entry.path))
        local.verify_entry(target, entry)
    return target


@hookimpl(trylast=True)
def wmtp_load_model(uri: str, mlflow_config: Mapping[str, Any]) -> LoadedModel:
    """Any URI no plugin claimed: a committed checkpoint on any fsspec filesystem."""
    return load_model_from_checkpoint(uri)
