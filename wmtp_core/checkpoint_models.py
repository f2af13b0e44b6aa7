"""The core's own answer to ``wmtp_load_model``: weights from a committed checkpoint.

Registered with every plugin manager as ``trylast``, so a plugin that understands a URI (the
MLflow registry's ``models:/``) answers first, and any other URI is read as a committed
checkpoint (a resume ``step_N`` or a ``final`` directory), validated and verified against its
manifest before anything is deserialised, weights-only. A committed Hugging Face final model
(its folder holds ``config.json``) is verified file by file and handed on as a folder.

A sharded (FSDP) resume checkpoint is read offline, in one process and without a process group:
every file is verified against the manifest, then torch's DCP loader rebuilds full tensors from
the shards through :func:`~wmtp_core.safe_load.safe_dcp_reader` (never torch's own unpickling
reader). :func:`convert_sharded` writes such a checkpoint as a single-process copy
(``wmtp checkpoints convert``).
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import posixpath
from typing import Any, Mapping

import fsspec

from wmtp_core.commit import CheckpointStore, check_run_name, verified_source
from wmtp_core.errors import CheckpointError, ConfigError, UsageError, first_line
from wmtp_core.events import LoadedModel
from wmtp_core.filesink import RANK_FILE, RANK_PART, json_writer, torch_writer
from wmtp_core.safe_load import load_part, safe_dcp_reader
from wmtp_core.hookspecs import hookimpl
from wmtp_core.manifest import Manifest
from wmtp_core.naming import FINAL_NAME, step_of
from wmtp_core.roles import Role

VALUE_HEAD = "value_head."
"""critic-wmtp's value head: under FSDP it is sharded and saved with the model's entries; it is
no part of the final model, and a single-process resume keeps it in the algorithm's state."""


def load_model_from_checkpoint(uri: str, storage_options: Mapping[str, Any] | None = None) -> LoadedModel:
    """Weights and architecture from a committed checkpoint, verified before deserialising."""
    import torch

    fs, path = fsspec.core.url_to_fs(uri, **dict(storage_options or {}))
    path = path.rstrip("/")
    if not fs.exists(path):
        raise CheckpointError(f"{uri!r} does not exist")
    store = CheckpointStore(fs, posixpath.dirname(posixpath.dirname(path)))
    manifest = store.read_manifest(path)
    if "config.json" in {e.path for e in manifest.files}:
        return LoadedModel(source=store.uri(path), folder=verified_folder(store, path))
    if manifest.meta.get("format") == "dcp":  # sharded (FSDP) resume state: its model.* entries
        state, trainer = read_sharded(store, path, manifest, storage_options, ("model",))
        return LoadedModel(weights=model_weights(state, store.uri(path)),
                           model_config=model_config_of(trainer, store.uri(path)), source=store.uri(path))
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


# -- sharded (DCP) checkpoints, offline ----------------------------------------------------
def verify_files(store: CheckpointStore, path: str, manifest: Manifest) -> None:
    """Every file of the checkpoint against its manifest entry (streamed, several at once);
    raises naming the first bad file in manifest order."""
    with cf.ThreadPoolExecutor(max_workers=4, thread_name_prefix="wmtp-verify-dcp") as pool:
        futures = [pool.submit(store.verify_entry, path, e) for e in manifest.files]
        for future in futures:
            future.result()


def read_sharded(store: CheckpointStore, path: str, manifest: Manifest,
                 storage_options: Mapping[str, Any] | None = None,
                 parts: tuple[str, ...] = ("model",)) -> tuple[dict[str, Any], dict[str, Any]]:
    """The full (unsharded) ``parts`` of a committed DCP checkpoint, read in this process
    without a process group, and rank 0's trainer state. Every file is verified first; the
    shards are read through the safe reader, so ``.metadata`` is never unpickled by torch and
    every non-tensor item must pass weights-only loading. Returns ``(state, trainer)``."""
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    where = store.uri(path)
    verify_files(store, path, manifest)
    names = {e.path for e in manifest.files}
    own = RANK_PART.format(part="trainer", rank=0)
    entry = next((e for e in manifest.files if e.path == own), None)
    if entry is None:
        raise CheckpointError(f"{where} holds no {own}: it does not record its model architecture")
    fpath = posixpath.join(path, own)
    trainer = load_part(verified_source(store.fs, fpath, entry, store.uri(fpath)), store.uri(fpath))
    if not isinstance(trainer, dict):
        raise CheckpointError(f"{store.uri(fpath)} is not WMTP trainer state")
    reader = safe_dcp_reader(where, where, names, **dict(storage_options or {}))
    metadata = reader.read_metadata()  # refused now, with a plain one-line error
    _check_claims(metadata, manifest, where)
    missing = [p for p in parts if not any(k == p or k.startswith(f"{p}.") for k in metadata.state_dict_metadata)]
    if missing:
        raise CheckpointError(f"{where} holds no {missing[0]} state")
    state: dict[str, Any] = {}
    try:
        _load_state_dict(state, storage_reader=reader, planner=_EmptyStateDictLoadPlanner(keys=set(parts)),
                         no_dist=True)
    except CheckpointException as e:  # a BaseException: it would escape every handler
        failures = [exc for exc, _ in e.failures.values()]
        first = next((f for f in failures if isinstance(f, CheckpointError)), failures[0] if failures else e)
        if isinstance(first, CheckpointError):
            raise first from None
        detail = first_line(first)
        raise CheckpointError(f"{where} could not be read ({type(first).__name__}: {detail})") from None
    return state, trainer


def _check_claims(metadata: Any, manifest: Manifest, where: str) -> None:
    """The loader allocates what ``.metadata`` describes before it reads a byte of the shards:
    a metadata file that claims more tensor bytes than the checkpoint's files hold, or nests
    its entries in lists longer than it has entries, is refused before anything is allocated."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    entries = metadata.state_dict_metadata
    if not isinstance(entries, dict):
        raise CheckpointError(f"{where}/.metadata lists no entries")
    claimed = 0
    for fqn, md in entries.items():
        if isinstance(md, TensorStorageMetadata):
            sizes = list(md.size)
            if not all(isinstance(n, int) and n >= 0 for n in sizes):
                raise CheckpointError(f"{where}/.metadata gives {fqn!r} the shape {sizes}")
            numel = 1
            for n in sizes:
                numel *= n
            claimed += numel * md.properties.dtype.itemsize
        path = (getattr(metadata, "planner_data", None) or {}).get(fqn, ())
        if any(isinstance(k, int) and not 0 <= k < len(entries) for k in path):
            raise CheckpointError(f"{where}/.metadata places {fqn!r} at {path!r}")
    stored = sum(e.size for e in manifest.files if not RANK_FILE.fullmatch(e.path))
    if claimed > stored:
        raise CheckpointError(f"{where}/.metadata describes {claimed} bytes of tensors, more than the "
                              f"{stored} bytes its shard files hold")


def model_config_of(trainer: Any, where: str) -> dict[str, Any]:
    config = trainer.get("model_config") if isinstance(trainer, dict) else None
    if not config or not isinstance(config, dict):
        raise CheckpointError(f"{where} does not record its model architecture")
    return dict(config)


def model_weights(state: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The model's weights from sharded resume state: a plain state dict of tensors, without
    critic-wmtp's value head (FSDP saves it with the model's entries)."""
    import torch

    model = state.get("model")
    if not isinstance(model, dict) or not model:
        raise CheckpointError(f"{where} holds no model weights")
    weights = {k: v for k, v in model.items() if not k.startswith(VALUE_HEAD)}
    bad = next((k for k, v in weights.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise CheckpointError(f"{where}: model entry {bad!r} is not a tensor")
    return weights


def single_process_optimizer(state: Any, where: str) -> dict[str, Any]:
    """DCP's optimizer state (keyed by parameter names, as ``get_state_dict`` gives it) as
    ``torch.optim.Optimizer.state_dict()`` gives it: parameters numbered across the param
    groups in their order, which is the order the optimizer was built with."""
    groups = state.get("param_groups") if isinstance(state, dict) else None
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise CheckpointError(f"{where}: the optimizer state has no param groups")
    ids: dict[str, int] = {}
    out_groups = []
    for group in groups:
        params = group.get("params")
        if not isinstance(params, list) or not all(isinstance(p, str) for p in params):
            raise CheckpointError(f"{where}: an optimizer param group does not name its parameters")
        out_groups.append({**group, "params": [ids.setdefault(p, len(ids)) for p in params]})
    out_state = {}
    for name, value in (state.get("state") or {}).items():
        if name not in ids:
            raise CheckpointError(f"{where}: optimizer state for {name!r}, which no param group names")
        out_state[ids[name]] = value
    return {"state": out_state, "param_groups": out_groups}


def convert_sharded(source: str, target: str, *, full: bool = False,
                    storage_options: Mapping[str, Any] | None = None) -> tuple[str, Manifest]:
    """Write the sharded checkpoint ``source`` as a single-process, committed WMTP checkpoint at
    the directory ``target`` (any fsspec URL), offline. By default the final model: ``model.pt``
    and ``model_config.json`` (role final), which ``verify``, ``register`` and
    ``paths.models.ref``/``rm`` accept. ``full``: the whole resume state as ``model.pt``,
    ``optimizer.pt`` and ``trainer.pt`` (role resume), which ``--resume`` continues on one
    process. The source is verified against its manifest before a byte of it is read.
    ``target``'s parent directory names the run in the copy's manifest (a manifest must agree
    with where it lies). Returns ``(target URI, manifest)``."""
    import torch

    options = dict(storage_options or {})
    fs, path = fsspec.core.url_to_fs(source, **options)
    path = path.rstrip("/")
    if not fs.isdir(path):
        raise UsageError(f"{source} {'is a file, not a directory' if fs.exists(path) else 'does not exist'}")
    store = CheckpointStore(fs, posixpath.dirname(posixpath.dirname(path)))
    manifest = store.read_manifest(path)
    where = store.uri(path)
    if manifest.meta.get("format") != "dcp":
        raise UsageError(f"{where} is not a sharded (FSDP) checkpoint: it already is a single-process "
                         "checkpoint; use it as it is")
    out_store, run, name = _target(target, full, manifest, options)
    state, trainer = read_sharded(store, path, manifest, options, ("model", "optimizer") if full else ("model",))
    meta = {"algo": manifest.meta.get("algo"), "metrics": dict(manifest.meta.get("metrics") or {}),
            "resumed_from": manifest.meta.get("resumed_from"), "torch": torch.__version__,
            "saved_because": manifest.meta.get("saved_because") if full else None, "converted_from": where, "converted_world_size": manifest.meta.get("world_size")}
    meta = {k: v for k, v in meta.items() if v is not None}
    if full:
        model = dict(state["model"])
        trainer = dict(trainer)
        head = {k[len(VALUE_HEAD):]: model.pop(k) for k in [k for k in model if k.startswith(VALUE_HEAD)]}
        if head:  # one process keeps critic-wmtp's value head in the algorithm's state
            algo = dict(trainer.get("algo") or {})
            algo.setdefault("value_head", head)
            trainer["algo"] = algo
        files = {"model.pt": torch_writer(model),
                 "optimizer.pt": torch_writer(single_process_optimizer(state["optimizer"], where)),
                 "trainer.pt": torch_writer(trainer)}
        role = Role.RESUME
    else:
        files = {"model.pt": torch_writer(model_weights(state, where)),
                 "model_config.json": json_writer(model_config_of(trainer, where))}
        role = Role.FINAL
    written = out_store.write(run, name, files, step=manifest.step, role=role, lineage=manifest.lineage,
                              meta=meta)
    return out_store.uri(out_store.path_of(run, name)), written


def _target(target: str, full: bool, manifest: Manifest,
            options: Mapping[str, Any]) -> tuple[CheckpointStore, str, str]:
    """Where the copy goes: ``(store, run, name)``, refused before anything is read when its
    manifest could not agree with where it lies, or when something is committed there."""
    try:
        fs, path = fsspec.core.url_to_fs(target, **options)
    except TypeError:  # its message could quote a value; name the keys only
        raise UsageError(f"{target}: this filesystem does not accept the storage options "
                         f"{', '.join(sorted(options))}") from None
    except (ImportError, ValueError) as e:
        raise UsageError(f"{target}: {e}") from None
    path = path.rstrip("/")
    name, run = posixpath.basename(path), posixpath.basename(posixpath.dirname(path))
    try:
        check_run_name(run)
        check_run_name(name)
    except ConfigError:
        raise UsageError(f"{target}: the copy is a checkpoint directory <run>/<name> and its parent "
                         f"directory names the run in its manifest; {run!r}/{name!r} is not allowed "
                         "(letters, digits and '_.=+-', not starting with '.')") from None
    step = step_of(name)
    if full and name == FINAL_NAME:
        raise UsageError(f"{target}: a directory named 'final' holds a final model; the full resume "
                         "state (--full) goes in a directory of another name, e.g. step_N or single")
    if not full and step is not None:
        raise UsageError(f"{target}: a directory named {name} holds resume state; the weights-only copy "
                         "goes in a directory of another name, e.g. <run>/final (or use --full)")
    if step is not None and step != manifest.step:
        raise UsageError(f"{target}: a directory named {name} must hold step {step}, "
                         f"the source is step {manifest.step}")
    store = CheckpointStore(fs, posixpath.dirname(posixpath.dirname(path)))
    if fs.exists(posixpath.join(path, "manifest.json")):
        raise UsageError(f"{store.uri(path)} is already committed; refusing to overwrite it")
    return store, run, name
