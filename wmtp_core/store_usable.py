"""Whether a committed checkpoint can be used, not only whether its bytes are its manifest's.

``wmtp checkpoints verify`` (through :func:`wmtp_core.resume.verify_checkpoint`) reads each file
once: hashed against its manifest entry, then deserialised the way a run would read it
(weights-only, the sharded metadata through its allow-list) and its structure checked
(:mod:`wmtp_core.state_shape`). A checkpoint that fails is :class:`~wmtp_core.errors.UnusableError`,
quarantined like a corrupt one.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import posixpath
from typing import Any

from wmtp_core.errors import CheckpointError, CorruptError, UnusableError
from wmtp_core.manifest import Manifest
from wmtp_core.roles import Role
from wmtp_core.safe_load import load_part
from wmtp_core.staging import Staging
from wmtp_core.state_shape import check_resume_parts, check_trainer, check_weights


def verify_usable(store: Any, path: str) -> Manifest:
    """Verify every file of the committed checkpoint at ``path`` of ``store`` against its
    manifest and deserialise it as a run would; raise :class:`CorruptError` for bytes that do
    not match, :class:`UnusableError` for content no run can use. Returns the manifest."""
    manifest = store.read_manifest(path)
    try:
        if manifest.meta.get("format") == "dcp":
            _sharded(store, path, manifest)
        else:
            _plain(store, path, manifest)
    except CorruptError:
        raise
    except CheckpointError as e:  # what a run could not use, though every byte matches
        raise UnusableError(str(e)) from None
    return manifest


def _plain(store: Any, path: str, manifest: Manifest) -> None:
    with Staging() as staging:
        _plain_parts(store, path, manifest, staging)


def _plain_parts(store: Any, path: str, manifest: Manifest, staging: Staging) -> None:
    manifest, pending = store.verify_async(path, manifest, staging)
    where = store.uri(path)
    parts: dict[str, Any] = {}
    try:
        for name, future in pending.items():
            source = future.result()  # raises CorruptError first: nothing unverified is read
            uri = store.uri(posixpath.join(path, name))
            if name.endswith(".pt"):
                parts[name.removesuffix(".pt")] = load_part(source, uri)
            elif name.endswith(".safetensors"):
                _safetensors(source, uri)
            elif name.endswith(".json"):
                _json(source, uri)
    finally:
        for future in pending.values():
            future.cancel()
        cf.wait(list(pending.values()))
    if manifest.role is Role.RESUME:
        check_resume_parts(parts, manifest.step, where)
    elif "model" in parts:
        check_weights(parts["model"], f"{where}/model.pt")


def _sharded(store: Any, path: str, manifest: Manifest) -> None:
    from wmtp_core.checkpoint_models import read_sharded

    parts = ("model", "optimizer") if manifest.role is Role.RESUME else ("model",)
    _, trainer = read_sharded(store, path, manifest, dict(store.fs.storage_options), parts)
    if manifest.role is Role.RESUME:
        check_trainer(trainer, manifest.step, f"{store.uri(path)}/trainer_rank0.pt")


def _safetensors(source: str | bytes, uri: str) -> None:
    """Its header read and its tensors laid out as safetensors itself reads them."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load

    try:
        if isinstance(source, str):
            with safe_open(source, framework="pt") as f:
                list(f.keys())
        else:
            load(source)
    except (SafetensorError, ValueError, OSError) as e:
        raise UnusableError(f"{uri} cannot be read as safetensors ({type(e).__name__}: {e})") from None


def _json(source: str | bytes, uri: str) -> None:
    try:
        if isinstance(source, str):
            with open(source, "rb") as f:
                source = f.read()
        json.loads(source)
    except (ValueError, RecursionError) as e:
        raise UnusableError(f"{uri} is not valid JSON ({type(e).__name__})") from None
