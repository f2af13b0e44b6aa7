"""How big a model is, known before any of it is allocated, and whether this machine holds it.

A model folder's ``config.json`` says how big the model is, and nothing makes it tell the truth:
``vocab_size: 50000000`` beside 60 KB of weights makes ``from_pretrained`` allocate 13 GB before
it notices, and ``n_layer: 1000000`` makes even a meta-device layout take minutes and gigabytes.
So, before anything is allocated (the dry run and the run alike):

1. the config's sizes are checked as values: positive integers, at most :data:`MAX_LAYERS`
   layers or experts (a meta layout costs time per layer);
2. the model it describes is laid out on the meta device (no memory) and compared with what the
   safetensors headers say the weights hold (:mod:`wmtp_core.engine.weights_file`): a tensor of
   another shape, or a model mostly absent from its weights, is refused naming the config key;
3. its float32 weights (and, for the model being trained, their gradients and Adam's two moments:
   16 bytes a parameter) are compared with the memory this machine has available.

The byte-level model of the recipe is sized by formula (:func:`byte_parameters`) and checked
against the memory the same way.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Mapping

import attrs

from wmtp_core.engine.weights_file import Held, human, numel
from wmtp_core.errors import ConfigError, ModelLoadError, first_line

MAX_LAYERS = 1024
"""Layers (or experts) a model may declare: far above any real model (the largest have ~130)."""
COUNTS = ("n_layer", "n_layers", "num_hidden_layers", "num_layers", "encoder_layers", "decoder_layers",
          "num_encoder_layers", "num_decoder_layers", "num_local_experts", "num_experts", "n_routed_experts")
"""Config keys that multiply modules (each one more module to lay out)."""
SIZES = ("vocab_size", "hidden_size", "n_embd", "d_model", "dim", "hidden_dim", "intermediate_size", "n_inner",
         "ffn_dim", "n_positions", "n_ctx", "max_position_embeddings", "num_attention_heads", "n_head", "n_heads",
         "num_key_value_heads", "head_dim")
"""Config keys that size tensors: each must be a positive integer (or null)."""
TRAIN_BYTES, FROZEN_BYTES = 16, 4
"""Bytes a parameter needs: trained (float32 weight, gradient, Adam's two moments), frozen (weight)."""
SLACK = 1 << 20
"""Parameters a model may declare beyond twice what its weights hold (freshly started heads)."""
ACCEPTED = "Accepted: a config.json that describes the weights beside it"


# ----------------------------------------------------------------------------- the config's values
def _walk(config: Mapping[str, Any], path: str = ""):
    """``(dotted key, value)`` of every entry, nested objects (``text_config``) included."""
    stack = [(config, path)]
    while stack:
        node, prefix = stack.pop()
        for k, v in node.items():
            yield f"{prefix}{k}", v
            if isinstance(v, dict):
                stack.append((v, f"{prefix}{k}."))


def check_config(config: Mapping[str, Any], where: str, held: Held | None = None,
                 memory: str = "") -> None:
    """Each size in ``config`` (a model folder's or a stored record's) is a positive integer and
    no count of layers or experts is over :data:`MAX_LAYERS`; raises one line naming the key."""
    for dotted, value in _walk(config):
        key = dotted.rsplit(".", 1)[-1]
        if key not in COUNTS and key not in SIZES or value is None:
            continue
        count = key in COUNTS  # a count may be 0 (no experts)
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if count else 1):
            raise ModelLoadError(f"{where} says {dotted}: {json.dumps(value)[:80]}; accepted: "
                                 + (f"an integer from 0 to {MAX_LAYERS}" if count else "a positive integer"))
        if count and value > MAX_LAYERS:
            holds = f"; {held.describe()}" if held is not None else ""
            raise ModelLoadError(f"{where} says {dotted}: {value}; accepted: an integer from 0 to {MAX_LAYERS}"
                                 f"{holds}{memory}")


def check_type(config: Mapping[str, Any], where: str, code: bool) -> None:
    """``model_type`` names a model this transformers knows (a folder whose code may run may name
    its own)."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = config.get("model_type")
    if model_type is None or code and config.get("auto_map"):
        return
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise ModelLoadError(f"{where} says model_type: {json.dumps(model_type)[:80]}; accepted: a model type "
                             f"transformers {transformers.__version__} knows ({len(CONFIG_MAPPING.keys())} of them, such "
                             "as gpt2, llama, mistral or qwen2)")


# ----------------------------------------------------------------------------- the memory
def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read(1 << 16)
    except (OSError, ValueError):
        return None


def _cgroup_left() -> int | None:
    """What this process's cgroup (v2, else v1) still allows, if it sets a limit."""
    rel = next((line[3:].strip() for line in (_read("/proc/self/cgroup") or "").splitlines()
                if line.startswith("0::")), "")
    for limit, usage in ((f"/sys/fs/cgroup{rel}/memory.max", f"/sys/fs/cgroup{rel}/memory.current"),
                         ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        cap, used = (_read(limit) or "").strip(), (_read(usage) or "").strip()
        if cap.isdigit() and used.isdigit() and int(cap) < 1 << 60:
            return max(0, int(cap) - int(used))
    return None


def host_available() -> int | None:
    """Bytes of memory this machine has available (``MemAvailable``, within this process's
    cgroup limit); ``None`` where the system does not say."""
    known = []
    for line in (_read("/proc/meminfo") or "").splitlines():
        if line.startswith("MemAvailable:") and line.split()[1].isdigit():
            known.append(int(line.split()[1]) * 1024)
    if not known and hasattr(os, "sysconf"):
        try:
            known.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError):
            pass
    left = _cgroup_left()
    return min(known + ([left] if left is not None else [])) if known or left is not None else None


@attrs.frozen
class Budget:
    """The memory a run's models may take."""

    host: int | None
    """Bytes available on this machine (``None``: unknown, nothing refused)."""
    gpu: int | None = None
    """Bytes of the CUDA device the model trains on (``None``: it trains in host memory)."""
    shards: int = 1
    """Ranks that share the training state on the GPUs (FSDP)."""

    def says(self) -> str:
        return f"this machine has {human(self.host)} of memory available" if self.host is not None else ""


def budget(settings: Any) -> Budget:
    """What this machine offers the run ``settings`` describes."""
    from wmtp_core.engine.parts import choose_device
    from wmtp_core.errors import WmtpError

    devices = settings.config.devices
    try:
        device = choose_device(devices.compute_backend).type
    except WmtpError:  # the dry run says so on its own
        device = "cpu"
    gpu = None
    if device == "cuda":
        import torch

        gpu = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return Budget(host=host_available(), gpu=gpu, shards=max(1, world) if devices.fsdp.enabled else 1)


def check_memory(where: str, parameters: int, buffers: int, trained: bool, plan: Budget) -> None:
    """Refuse a model whose weights (and training state) cannot fit: ``where`` names it. The
    model is loaded in host memory first (float32 weights); it is trained (weights, gradients,
    Adam's two moments) where it runs: on the GPU, shared by the FSDP ranks, or in host memory."""
    weights = FROZEN_BYTES * parameters + buffers
    train = TRAIN_BYTES * parameters + buffers
    state = ("float32 weights, their gradients and Adam's two moments: 16 bytes a parameter" if trained
             else "float32 weights: 4 bytes a parameter")
    if plan.gpu is not None:
        per_gpu = train // plan.shards if trained else weights
        if per_gpu > plan.gpu:
            raise ModelLoadError(f"{where} is a model of {parameters:,} parameters; {'training' if trained else 'loading'} "
                                 f"it needs {human(per_gpu)} on each GPU ({state}), but the GPU has {human(plan.gpu)}")
    in_host = plan.gpu is None and trained
    need = train if in_host else weights
    if plan.host is not None and need > plan.host:
        raise ModelLoadError(f"{where} is a model of {parameters:,} parameters; {'training' if in_host else 'loading'} "
                             f"it needs {human(need)} ({state if in_host else 'float32 weights: 4 bytes a parameter'}), "
                             f"but {plan.says()}")


# ----------------------------------------------------------------------------- the byte-level model
def byte_parameters(cfg: Any) -> int:
    """Parameters of :class:`~wmtp_core.engine.model.MTPModel` for ``cfg``, by formula (laying out
    a thousand blocks, even on the meta device, takes seconds)."""
    d, blocks = cfg.d_model, cfg.n_layers + cfg.n_future
    block = 12 * d * d + 13 * d  # qkv, proj, the MLP's two linears, two layer norms
    return 2 * cfg.vocab_size * d + cfg.max_seq_len * d + blocks * block + 2 * d


def check_byte(cfg: Any, source: str, plan: Budget) -> int:
    """The byte-level model's parameters, refused in one line when this machine cannot train it."""
    params = byte_parameters(cfg)
    try:
        check_memory(f"model: d_model {cfg.d_model}, n_layers {cfg.n_layers}, n_future {cfg.n_future}, "
                     f"max_seq_len {cfg.max_seq_len}", params, 0, True, plan)
    except ModelLoadError as e:
        raise ConfigError(f"{source}: {e}") from None
    return params


# ----------------------------------------------------------------------------- a Hugging Face folder
@attrs.frozen
class Declared:
    """The model a ``config.json`` describes, laid out on the meta device."""

    parameters: int
    """Every parameter of the module built (extra heads included), a tied one once."""
    buffers: int
    """Bytes of its buffers."""
    shapes: Mapping[str, tuple[int, ...]] = attrs.field(hash=False)
    """The base model's own parameters: what its weights file should hold."""
    prefix: str = ""


def _config(info: Any, folder: str | None, trust: bool):
    """The transformers config of ``info``: from its folder when its own code defines it, else
    from the ``config.json`` already read (and checked)."""
    from transformers import AutoConfig

    if info.code and folder is not None:
        return AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=trust)
    with tempfile.TemporaryDirectory(prefix="wmtp-config-") as tmp:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(dict(info.config), f)
        return AutoConfig.from_pretrained(tmp, local_files_only=True)


def declared(info: Any, folder: str | None, trust: bool, where: str, heads: tuple[int, str] | None) -> Declared:
    """The model ``info``'s config describes, on the meta device: a causal LM (with ``heads``,
    ``(n_future, kind)``, the one trained) or a sequence classifier."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.initialization import no_init_weights

    from wmtp_core.engine import hf

    hf.quiet()
    cls = AutoModelForSequenceClassification if info.is_classifier else AutoModelForCausalLM
    try:
        config = _config(info, folder, trust)
        # no initialisation: on the meta device it computes nothing and took three quarters of
        # the layout's time (3.3 s of a thousand GPT-2 blocks, 1.2 s without)
        with torch.device("meta"), no_init_weights():
            base = cls.from_config(config, trust_remote_code=trust)
            base.tie_weights()  # what the skipped initialisation would have done: a tied weight counts once
            module = hf.HFMTPModel(base, *heads) if heads else base
    except Exception as e:  # noqa: BLE001 - transformers' refusals of a config have no common type
        raise ModelLoadError(f"{where} describes a model transformers cannot build ({type(e).__name__}: "
                             f"{first_line(e, 200)}); accepted: a config.json that from_pretrained accepts") from None
    parameters = sum(p.numel() for p in module.parameters())
    buffers = sum(b.numel() * b.element_size() for b in module.buffers())
    shapes = {n: tuple(p.shape) for n, p in base.named_parameters()}
    return Declared(parameters, buffers, shapes, str(getattr(base, "base_model_prefix", "") or ""))


def _key_for(config: Mapping[str, Any], value: int) -> str | None:
    """The config key whose value is ``value`` (a size key first)."""
    found = [k for k, v in _walk(config) if v == value and isinstance(v, int) and not isinstance(v, bool)]
    return next((k for k in found if k.rsplit(".", 1)[-1] in COUNTS + SIZES), found[0] if found else None)


def _says(config: Mapping[str, Any], value: int) -> str:
    key = _key_for(config, value)
    return f"says {key} {value}" if key else "describes"


def _held_name(name: str, held: Held, prefix: str) -> str | None:
    for candidate in (name, name.removeprefix(f"{prefix}.") if prefix else name, f"{prefix}.{name}"):
        if candidate in held.shapes:
            return candidate
    return None


def mismatch(config: Mapping[str, Any], model: Declared, held: Held) -> str | None:
    """Why ``held`` cannot be the weights of the model ``config`` describes, or ``None``."""
    names = {n: _held_name(n, held, model.prefix) for n in model.shapes}
    for name, there in sorted(names.items(), key=lambda kv: -numel(model.shapes[kv[0]])):
        want = model.shapes[name]
        if there is not None and numel(held.shapes[there]) != numel(want):  # a reshape is transformers' business
            got = held.shapes[there]
            odd = next((w for w, g in zip(want, got) if w != g), want[0] if want else 0)
            return (f"{_says(config, odd)}, but {name} is {list(want)} in the model it describes and {list(got)} "
                    f"in its weights; {held.describe()}")
    base = sum(numel(s) for s in model.shapes.values())
    if base <= 2 * held.parameters + SLACK:
        return None
    layers, theirs = Held((), model.shapes, 0).layers(), held.layers()
    missing = sorted((n for n, there in names.items() if there is None), key=lambda n: -numel(model.shapes[n]))
    if layers and layers[1] > (theirs[1] if theirs else 0):
        says = _says(config, layers[1])
    else:
        says = _says(config, max(model.shapes[missing[0]], default=0)) if missing else "describes"
    absent = f" ({missing[0]} {list(model.shapes[missing[0]])} is not among them)" if missing else ""
    return f"{says}: a model of {base:,} parameters, but {held.describe()}{absent}"


def check_folder(info: Any, key: str, plan: Budget, *, folder: str | None = None, trust: bool = False,
                 heads: tuple[int, str] | None = None) -> int:
    """Refuse, in one line and before anything is allocated, a model folder whose config does not
    describe its weights or that this machine cannot hold (``heads``: the model is trained with
    those extra heads; else it is consulted, frozen). Returns its parameters."""
    where = f"{key}: {info.uri}/config.json"
    memory = f"; {plan.says()}" if plan.says() else ""
    check_config(info.config, where, info.held, memory)
    check_type(info.config, where, bool(info.code))
    if info.code and folder is None:  # its own code describes it: laid out once the run has a local copy
        params = info.held.parameters if info.held is not None else 0
        check_memory(f"{key}: {info.uri}", params, 0, heads is not None, plan)
        return params
    model = declared(info, folder, trust, where, heads)
    if info.held is not None:
        why = mismatch(info.config, model, info.held)
        if why is not None:
            train = TRAIN_BYTES * model.parameters if heads else FROZEN_BYTES * model.parameters
            raise ModelLoadError(f"{where} {why}. {ACCEPTED} ({'training' if heads else 'loading'} the model it "
                                 f"describes would need {human(train)}{memory})")
    check_memory(f"{key}: {info.uri}", model.parameters, model.buffers, heads is not None, plan)
    return model.parameters
