"""Hugging Face models in the engine: a pretrained causal LM with WMTP's multi-token heads on top,
its tokenizer, reference and reward models (their modules in :mod:`wmtp_core.engine.hf_frozen`),
and the final model as a Hugging Face folder.

A model folder is untrusted input. It is read only in formats that cannot run code: its
``config.json``, safetensors weights and tokenizer files. A folder that ships Python code
(``*.py``, or an ``auto_map`` in its config) is refused unless ``paths.models.trust_remote_code``
allows it; one whose weights exist only as pickles (``pytorch_model.bin``) is refused outright.
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
from typing import Any, Mapping

import attrs
import torch
from torch import nn

from wmtp_core.engine.hf_frozen import ReferenceLM, TextReward  # noqa: F401  (also importable from here, as before)
from wmtp_core import model_cache
from wmtp_core.bounded import read_bounded
from wmtp_core.engine import weights_file
from wmtp_core.engine.weights_file import Held
from wmtp_core.errors import ModelLoadError, first_line

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
HEADS = "mtp_heads.safetensors"
"""The extra heads of a WMTP final model: keys ``heads.<i>.*``, where ``heads.0`` is head 1
(it predicts token t+2) and ``heads.<n_future-2>`` the last."""
METADATA = "wmtp.json"
"""What a WMTP final model folder says about itself: n_future, head kind, algorithm."""
MAX_CONFIG_BYTES = 16 << 20
"""A model folder's config.json is at most 16 MiB (real ones are a few kilobytes)."""
PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "vocab.txt",
                   "spm.model", "tokenizer.model", "special_tokens_map.json", "added_tokens.json")
FOLDER_FILES = ("config.json", "generation_config.json", WEIGHTS, WEIGHTS_INDEX, HEADS, METADATA,
                *TOKENIZER_FILES)
"""Every file WMTP reads from a model folder; anything else stays where it is."""


def quiet() -> None:
    """Transformers' progress bars and advice are not WMTP's output."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


_quiet = quiet  # the name benchmarks/hf.py knows


@attrs.frozen
class FolderInfo:
    """A model folder, read from its listing and ``config.json`` only (no weights)."""

    uri: str
    config: Mapping[str, Any] = attrs.field(hash=False)
    files: tuple[str, ...]
    code: tuple[str, ...] = ()
    """Files or config entries that would run Python code when loaded."""
    held: Held | None = attrs.field(default=None, hash=False)
    """What its weights files hold, from their safetensors headers (``None``: not read)."""
    heads: Held | None = attrs.field(default=None, hash=False)
    """What its ``mtp_heads.safetensors`` holds, from its header, when it has one."""

    @property
    def architecture(self) -> str:
        names = self.config.get("architectures") or []
        return names[0] if names else f"{self.config.get('model_type', 'unknown')} model"

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", "unknown"))

    @property
    def vocab_size(self) -> int | None:
        v = self.config.get("vocab_size")
        return v if isinstance(v, int) else None

    @property
    def declared_heads(self) -> int | None:
        """``mtp_config.n_future_tokens`` (a folder that carries multi-token heads)."""
        mtp = self.config.get("mtp_config") or {}
        n = mtp.get("n_future_tokens") if isinstance(mtp, Mapping) else None
        return n if isinstance(n, int) and n >= 1 else None

    @property
    def has_tokenizer(self) -> bool:
        return any(f in self.files for f in ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer.model"))

    @property
    def is_classifier(self) -> bool:
        return any("SequenceClassification" in a for a in self.config.get("architectures") or [])

    def weights(self) -> tuple[str, ...]:
        """The safetensors files ``from_pretrained`` reads: ``model.safetensors``, else the shards
        its index names (read by :func:`inspect`)."""
        return self.held.files if self.held is not None else ((WEIGHTS,) if WEIGHTS in self.files else ())

    def describe(self) -> str:
        layers = next((self.config[k] for k in ("num_hidden_layers", "n_layer", "n_layers") if k in self.config), "?")
        return (f"{self.architecture} ({self.model_type}, {layers} layers, vocabulary "
                f"{self.vocab_size or '?'})")


def inspect(uri: str, key: str, trust_remote_code: bool = False,
            storage_options: Mapping[str, Any] | None = None, need_weights: bool = True) -> FolderInfo:
    """What the folder at ``uri`` (any fsspec URL) holds, checked: a ``config.json``, safetensors
    weights, no pickled weights only, no code unless allowed. Reads the listing and the config."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(uri, **dict(storage_options or {}))
        path = path.rstrip("/")
        if not fs.exists(path):
            raise ModelLoadError(f"{key}: {uri!r} does not exist")
        if not fs.isdir(path):
            raise ModelLoadError(f"{key}: {uri!r} is a file; name the model's folder")
        files = tuple(sorted(posixpath.relpath(p, path) for p in fs.find(path)))
        if "config.json" not in files:
            raise ModelLoadError(f"{key}: {uri!r} has no config.json: it is not a Hugging Face model folder")
        config = weights_file.load_json(read_bounded(fs, posixpath.join(path, "config.json"), MAX_CONFIG_BYTES,
                                                     "a model's config.json", where=f"{key}: {uri}/config.json",
                                                     error=ModelLoadError), f"{key}: {uri}/config.json", "a config.json")
        _check_shape(config, f"{key}: {uri}/config.json")
        if "generation_config.json" in files:  # from_pretrained reads it too
            weights_file.load_json(read_bounded(fs, posixpath.join(path, "generation_config.json"), MAX_CONFIG_BYTES,
                                                "a generation_config.json", where=f"{key}: {uri}/generation_config.json",
                                                error=ModelLoadError),
                                   f"{key}: {uri}/generation_config.json", "a generation_config.json")
        code = tuple(f for f in files if f.endswith(".py")) + (("config.json: auto_map",) if config.get("auto_map") else ())
        if code and not trust_remote_code:
            raise ModelLoadError(
                f"{key}: {uri}/{code[0]} is Python code that would run when the model is loaded; WMTP "
                "runs a model folder's code only with paths.models.trust_remote_code: true")
        info = FolderInfo(uri=uri, config=config, files=files, code=code)
        return _read_weights(info, fs, path, f"{key}: {uri}") if need_weights else info
    except (ImportError, ValueError, OSError) as e:
        raise ModelLoadError(f"{key}: {uri!r} cannot be read ({type(e).__name__}: {first_line(e)})") from None


def _check_shape(config: Any, where: str) -> None:
    """The entries :class:`FolderInfo` reads have the types it reads them as."""
    if not isinstance(config, dict):
        raise ModelLoadError(f"{where} is not a JSON object")
    names = config.get("architectures")
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise ModelLoadError(f"{where} says architectures: {json.dumps(names)[:80]}; accepted: a list of class names")
    for k in ("model_type", "auto_map", "mtp_config"):
        if k in config and not isinstance(config[k], (str, dict, type(None))):
            raise ModelLoadError(f"{where} says {k}: {json.dumps(config[k])[:80]}; accepted: "
                                 + ("a string" if k == "model_type" else "an object"))
    heads = config["mtp_config"].get("n_future_tokens") if isinstance(config.get("mtp_config"), dict) else None
    if heads is not None and not (isinstance(heads, int) and not isinstance(heads, bool) and 1 <= heads <= 256):
        raise ModelLoadError(f"{where} says mtp_config.n_future_tokens: {json.dumps(heads)[:80]}; accepted: "
                             "an integer from 1 to 256")


def _read_weights(info: FolderInfo, fs: Any, path: str, where: str) -> FolderInfo:
    """``info`` with what its weights hold, read from their safetensors headers (checked)."""
    files = info.files
    if WEIGHTS not in files and WEIGHTS_INDEX not in files:
        pickled = [f for f in files if f.endswith(PICKLED)]
        if pickled:
            raise ModelLoadError(f"{where} holds its weights only as {pickled[0]}, a pickle that can "
                                 f"run code when loaded; WMTP reads safetensors ({WEIGHTS})")
        raise ModelLoadError(f"{where} holds no weights ({WEIGHTS} or {WEIGHTS_INDEX})")
    names = (WEIGHTS,) if WEIGHTS in files else weights_file.shard_names(fs, path, files, where, WEIGHTS_INDEX)
    held = weights_file.read_held(fs, path, names, where)
    heads = weights_file.read_held(fs, path, (HEADS,), where) if HEADS in files else None
    return attrs.evolve(info, held=held, heads=heads)


def local_copy(info: FolderInfo, storage_options: Mapping[str, Any] | None = None) -> str:
    """A local directory holding the folder's readable files: the folder itself when it is
    local, else the node's cached copy of only the files WMTP reads (never a pickle), downloaded
    once per node and checked against the source's listing (:mod:`wmtp_core.model_cache`)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(info.uri, **dict(storage_options or {}))
    path = path.rstrip("/")
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        return path
    wanted = {f for f in info.files if f in FOLDER_FILES or (f.startswith("model-") and f.endswith(".safetensors"))}
    wanted |= set(info.weights())
    if info.code:
        wanted |= {f for f in info.files if f.endswith(".py")}
    return model_cache.from_filesystem(fs, path, sorted(wanted), info.uri)


TOKENIZER_JSON = tuple(f for f in TOKENIZER_FILES if f.endswith(".json"))
MAX_TOKENIZER_BYTES = 512 << 20
"""A tokenizer file is at most 512 MiB (the largest real ones are tens of megabytes)."""


def load_tokenizer(folder: str, key: str, trust_remote_code: bool = False, name: str | None = None):
    """The tokenizer of the local folder ``folder`` (``name``: what the user called it). Its JSON
    files are checked first (regular files, nesting), and whatever ``transformers`` refuses is
    one line naming the folder."""
    quiet()
    import fsspec
    from transformers import AutoTokenizer

    fs = fsspec.filesystem("file")
    for f in TOKENIZER_JSON:
        if os.path.exists(os.path.join(folder, f)):
            where = f"{key}: {name or folder}/{f}"
            weights_file.load_json(read_bounded(fs, os.path.join(folder, f), MAX_TOKENIZER_BYTES, "a tokenizer file",
                                                where=where, error=ModelLoadError), where, "a tokenizer file")
    try:
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - the folder is untrusted input; its refusals have no common type
        raise ModelLoadError(f"{key}: the tokenizer in {name or folder} cannot be loaded ({type(e).__name__}: "
                             f"{first_line(e)})") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def from_pretrained(cls, folder: str, key: str, trust_remote_code: bool, name: str | None = None):
    """``cls.from_pretrained`` of the local folder ``folder``, safetensors only, float32;
    whatever ``transformers`` refuses is one line naming the folder (``name``)."""
    quiet()
    try:
        return cls.from_pretrained(folder, local_files_only=True, use_safetensors=True,
                                   trust_remote_code=trust_remote_code, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - SafetensorError, ValueError, RuntimeError, dataclass errors...
        raise ModelLoadError(f"{key}: the model in {name or folder} cannot be loaded ({type(e).__name__}: "
                             f"{first_line(e)})") from None


def vocabulary(tokenizer: Any) -> str:
    return f"{type(tokenizer).__name__} with {len(tokenizer)} tokens"


class HFMTPModel(nn.Module):
    """A Hugging Face causal LM with ``n_future - 1`` extra heads on its last hidden state.

    Head 0 is the base model's own LM head; head k (k >= 1) predicts token t+k+1 from the last
    hidden state at t: a Linear from the hidden size to the vocabulary (the origin's heads,
    started as copies of the LM head) or one transformer layer feeding the base LM head.
    """

    def __init__(self, base: nn.Module, n_future: int, head: str = "linear") -> None:
        super().__init__()
        self.base = base
        self.n_future = n_future
        self.head_kind = head
        d = base.config.hidden_size
        lm_head = base.get_output_embeddings()
        if head == "linear":
            self.heads = nn.ModuleList(nn.Linear(d, lm_head.weight.shape[0], bias=False) for _ in range(n_future - 1))
            with torch.no_grad():
                for h in self.heads:
                    if lm_head.weight.device.type != "meta":
                        h.weight.copy_(lm_head.weight)
        else:
            layer = nn.TransformerEncoderLayer(d, nhead=_heads_for(d), dim_feedforward=4 * d, dropout=0.0,
                                               batch_first=True, norm_first=True)
            self.heads = nn.ModuleList(_clone(layer) for _ in range(n_future - 1))
        self.activation_checkpointing = False

    @property
    def config(self) -> Any:
        return self.base.config

    def _base(self, ids: torch.Tensor):
        return self.base(input_ids=ids, output_hidden_states=True, use_cache=False)

    def _extra(self, h: torch.Tensor) -> list[torch.Tensor]:
        if self.head_kind == "linear":
            return [head(h) for head in self.heads]
        t = h.shape[1]
        causal = nn.Transformer.generate_square_subsequent_mask(t, device=h.device, dtype=h.dtype)
        lm_head = self.base.get_output_embeddings()
        return [lm_head(head(h, src_mask=causal, is_causal=True)) for head in self.heads]

    def logits_and_hidden(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self._base(ids)
        h = _own(out.hidden_states[-1])
        return torch.stack([out.logits, *self._extra(h)], dim=1), h

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.logits_and_hidden(ids)[0]

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        return _own(self._base(ids).hidden_states[-1])

    def next_token_logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.base(input_ids=ids, use_cache=False).logits

    def blocks(self) -> list[nn.Module]:
        """The decoder layers (``_no_split_modules``) and the extra heads: the FSDP units."""
        names = set(getattr(self.base, "_no_split_modules", None) or [])
        layers = [m for m in self.base.modules() if type(m).__name__ in names]
        return layers + list(self.heads)


def _own(h: torch.Tensor) -> torch.Tensor:
    """``h`` as a tensor of its own. Many Hugging Face models hand back their last hidden state as
    a view (GPT-2: ``hidden_states.view(output_shape)``); returned from an FSDP2 unit's forward, a
    view loses FSDP's pre-backward hook to any in-place op on it, and FSDP2 warns that gradients
    may be wrong. A copy of ``[B, T, d]`` is small beside the logits."""
    return h.clone() if h._base is not None else h


def _heads_for(d: int) -> int:
    return next(h for h in (16, 12, 8, 4, 2, 1) if d % h == 0)


def _clone(module: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(module)


def build_mtp(info: FolderInfo, folder: str, n_future: int, head: str, key: str,
              trust_remote_code: bool = False) -> tuple[HFMTPModel, bool]:
    """The base causal LM from its folder, with the extra heads: loaded from ``mtp_heads.safetensors``
    when the folder carries them for this many heads and this kind, else started afresh.
    Returns ``(model, heads loaded)``."""
    from transformers import AutoModelForCausalLM

    base = from_pretrained(AutoModelForCausalLM, folder, key, trust_remote_code, info.uri)
    model = HFMTPModel(base, n_future, head)
    if HEADS not in info.files:
        return model, False
    import fsspec
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    held = info.heads or weights_file.read_held(fsspec.filesystem("file"), folder, (HEADS,), f"{key}: {info.uri}")
    expected = {f"heads.{k}": tuple(v.shape) for k, v in model.heads.state_dict().items()}
    if dict(held.shapes) != expected:  # other heads (a number, a kind): started afresh, never read
        return model, False
    try:
        heads = load_file(os.path.join(folder, HEADS))
    except (SafetensorError, OSError) as e:
        raise ModelLoadError(f"{key}: {info.uri}/{HEADS} cannot be read ({first_line(e)})") from None
    model.heads.load_state_dict({k.removeprefix("heads."): v for k, v in heads.items()})
    return model, True


def export(model: HFMTPModel, tokenizer: Any, target: str, meta: Mapping[str, Any],
           max_shard_size: int | str | None = None) -> str:
    """Write the final model as a Hugging Face folder at ``target``: ``model.safetensors`` (or, past
    ``max_shard_size``, shards and their index; ``None``: transformers' default) and
    ``config.json`` (head 0, loadable by ``from_pretrained`` as a plain causal LM), the
    tokenizer, ``mtp_heads.safetensors`` (the extra heads) and ``wmtp.json`` (n_future, head
    kind, algorithm). The config declares the heads as the origin's folders do
    (``mtp_config.n_future_tokens``)."""
    quiet()
    base = model.base
    base.config.mtp_config = mtp_config(model, meta)
    split = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    base.save_pretrained(target, safe_serialization=True, **split)
    heads = {f"heads.{k}": v.detach().to("cpu").contiguous() for k, v in model.heads.state_dict().items()}
    return finish(target, tokenizer, heads, meta, model.n_future, model.head_kind)


def mtp_config(model: Any, meta: Mapping[str, Any]) -> dict[str, Any]:
    """What a final model's ``config.json`` says of its heads, and the base model as the run
    named it (what ``wmtp.json`` says too), not the folder it was read from."""
    named = meta.get("base_model") or getattr(model.base.config, "_name_or_path", "") or ""
    return {"n_future_tokens": model.n_future, "head": model.head_kind, "base_model": str(named)}


def finish(target: str, tokenizer: Any, heads: Mapping[str, torch.Tensor], meta: Mapping[str, Any],
           n_future: int, head_kind: str) -> str:
    """The rest of a final model's folder, beside its weights and config: the tokenizer, the
    extra heads and ``wmtp.json``."""
    from safetensors.torch import save_file

    if tokenizer is not None:
        tokenizer.save_pretrained(target)
    if heads:
        save_file(dict(heads), os.path.join(target, HEADS))
    with open(os.path.join(target, METADATA), "w") as f:
        json.dump({"n_future": n_future, "head": head_kind, **dict(meta)}, f, indent=2, sort_keys=True)
    return target


def remove(folder: str | None) -> None:
    if folder and os.path.basename(folder).startswith("wmtp-"):
        shutil.rmtree(folder, ignore_errors=True)
