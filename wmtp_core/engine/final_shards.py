"""The final model of a Hugging Face run under FSDP, gathered and written one shard at a time.

``save_pretrained(max_shard_size=...)`` splits a model into ``model-0000i-of-0000N.safetensors``
and ``model.safetensors.index.json``, but it wants the whole state dict in memory: under FSDP, a
gather of the whole model on rank 0. Here transformers' own functions decide, from shapes alone
(meta tensors), which tensors are saved under which names in which file (the ignored keys and
tied weights dropped, the weight conversions reverted, the split); then every rank gathers the
parameters one at a time in that order (each gather is a collective) and rank 0 keeps one
shard's worth, writes it with safetensors, frees it and goes on. What lands in the folder is what
``save_pretrained`` writes for the same weights: the same files, names, tensors and index.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from typing import Any, Mapping

import attrs
import torch

from wmtp_core.engine import hf

BASE, HEADS = "base.", "heads."
"""Where the causal LM's and the extra heads' entries sit in the state dict of an HFMTPModel."""


def limit(value: int | str | None) -> int:
    """``storage.final.max_shard_size`` in bytes; ``None``: the default of the installed
    transformers' ``save_pretrained``."""
    import inspect

    from transformers import PreTrainedModel
    from transformers.utils.hub import convert_file_size_to_int

    if value is None:
        value = inspect.signature(PreTrainedModel.save_pretrained).parameters["max_shard_size"].default
    return convert_file_size_to_int(value)


@attrs.frozen
class Plan:
    """Which tensor goes into which file, as ``save_pretrained`` decides it."""

    shards: tuple[tuple[str, tuple[tuple[str, str], ...]], ...]
    """``(file name, ((name in the file, state-dict key), ...))`` in writing order."""
    index: Mapping[str, Any] | None
    """``model.safetensors.index.json`` (``None``: one ``model.safetensors``, no index)."""


def plan(config: Any, state: Mapping[str, Any], dtype: torch.dtype, max_bytes: int) -> Plan | None:
    """The plan for the causal LM of ``config`` whose entries in ``state`` (an FSDP-sharded
    state dict) are ``base.*``, stored in ``dtype``: decided on the module the single-process
    path saves (the model rebuilt from its config, as :mod:`wmtp_core.engine.hf_record` does),
    laid out on the meta device. ``None`` when that module's entries are not ``state``'s, or a
    weight conversion of this model builds new tensors from several (no tensor could then be
    written as it is gathered)."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from transformers import AutoModelForCausalLM
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict
    from transformers.utils import SAFE_WEIGHTS_NAME

    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(copy.deepcopy(config)).to(dtype)
    meta = base.state_dict()
    if {BASE + k for k in meta} != {k for k in state if k.startswith(BASE)}:
        return None
    for key in base._keys_to_ignore_on_save or ():
        meta.pop(key, None)
    meta = remove_tied_weights_from_state_dict(meta, base)  # tied: by the parameters' identity
    key_of = {id(t): k for k, t in meta.items()}
    saved = revert_weight_conversion(base, meta)
    if any(id(t) not in key_of for t in saved.values()):
        return None
    split = split_torch_state_dict_into_shards(
        saved, filename_pattern=SAFE_WEIGHTS_NAME.replace(".safetensors", "{suffix}.safetensors"),
        max_shard_size=max_bytes)
    shards = tuple((name, tuple((t, BASE + key_of[id(saved[t])]) for t in tensors))
                   for name, tensors in split.filename_to_tensors.items())
    index = None
    if split.is_sharded:
        index = {"metadata": {"total_parameters": base.num_parameters(), **split.metadata},
                 "weight_map": dict(split.tensor_to_filename)}
    return Plan(shards=shards, index=index)


def gathered(value: Any, keep: bool, dtype: torch.dtype) -> torch.Tensor | None:
    """The full tensor of one entry, on CPU in ``dtype`` where ``keep`` (rank 0), else ``None``;
    a collective for a sharded (DTensor) entry: every rank calls it, in the same order. As
    ``get_model_state_dict(full_state_dict=True)`` gathers each entry, one entry at a time."""
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        if value.device.type != value.device_mesh.device_type:  # offloaded shards: gathered on the mesh's device
            value = value.to(value.device_mesh.device_type)
        value = value.full_tensor()
    if not keep:
        return None
    value = value.detach()
    return (value.to(dtype) if value.is_floating_point() else value).to("cpu").contiguous()


def write(model: Any, world: Any, dtype: torch.dtype, max_shard_size: int | str | None,
          tokenizer: Any, meta: Mapping[str, Any]) -> tuple[str, Plan] | bool:
    """The final model of the FSDP-sharded HFMTPModel ``model`` written as a Hugging Face folder
    (the layout :func:`wmtp_core.engine.hf.export` writes), one shard at a time; a collective:
    every rank calls it. Returns ``(folder, plan)`` on rank 0 and ``True`` on the others, or
    ``False`` on every rank when the model cannot be written this way (nothing gathered then)."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    hf.quiet()
    state = get_model_state_dict(model)  # sharded: DTensors, nothing gathered yet
    found = plan(model.base.config, state, dtype, limit(max_shard_size)) if world.is_main else None
    found = world.tell(found)  # rank 0's plan on every rank: the gathers go in one order
    if found is None:
        return False
    folder = tempfile.mkdtemp(prefix="wmtp-final-") if world.is_main else None
    try:
        for name, entries in found.shards:
            shard = {saved: gathered(state[key], world.is_main, dtype) for saved, key in entries}
            if world.is_main:
                save_file(shard, os.path.join(folder, name), metadata={"format": "pt"})
            del shard
        heads = {k: gathered(v, world.is_main, dtype) for k, v in state.items() if k.startswith(HEADS)}
        if not world.is_main:
            return True
        _config(model, folder, dtype, meta)
        if found.index is not None:
            with open(os.path.join(folder, hf.WEIGHTS_INDEX), "w", encoding="utf-8") as f:
                f.write(json.dumps(found.index, indent=2, sort_keys=True) + "\n")
        hf.finish(folder, tokenizer, heads, meta, model.n_future, model.head_kind)
    except BaseException:
        hf.remove(folder)
        raise
    return folder, found


def _config(model: Any, folder: str, dtype: torch.dtype, meta: Mapping[str, Any]) -> None:
    """``config.json`` and ``generation_config.json`` as ``save_pretrained`` writes them for the
    model in ``dtype`` (the model's own config is left as it is)."""
    base = model.base
    config = copy.deepcopy(base.config)
    config.mtp_config = hf.mtp_config(model, meta)
    config.dtype = str(dtype).split(".")[1]
    config.architectures = [type(base).__name__.removeprefix("FSDP")]  # FSDP2 renames the class
    if base.is_remote_code():
        from transformers.dynamic_module_utils import custom_object_save

        custom_object_save(base, folder, config=config)
    config.save_pretrained(folder)
    if base.can_generate():
        base.generation_config.save_pretrained(folder)


def folder_weights(folder: str, found: Plan) -> dict[str, torch.Tensor]:
    """The weights the folder holds, by state-dict key (tied weights once), memory-mapped from
    its files rather than read: the final payload's ``model`` part, for sinks that want tensors."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for name, entries in found.shards:
        held = load_file(os.path.join(folder, name))
        out.update({key: held[saved] for saved, key in entries})
    if os.path.exists(os.path.join(folder, hf.HEADS)):
        out.update(load_file(os.path.join(folder, hf.HEADS)))
    return out
