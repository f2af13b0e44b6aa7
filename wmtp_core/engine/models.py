"""The models of a run, from ``paths.models``: the base model being trained (the byte-level
``MTPModel`` from scratch, or a pretrained Hugging Face causal LM with multi-token heads), its
tokenizer, and the frozen reference (rho1-wmtp) and reward (critic-wmtp) models.

Where a ``paths.models.*`` value leads (a folder, a registered model, a committed checkpoint) is
:mod:`wmtp_core.engine.model_sources`; its names are importable from here too.

Vocabularies are checked before step 1: a reference model must share the base model's (its
per-token losses are compared), a reward model scores whole sequences and so may re-tokenize
their text with its own tokenizer.
"""

from __future__ import annotations

from typing import Any, Mapping

import attrs
import torch
from torch import nn

from wmtp_core.engine import data, hf, model_size
from wmtp_core.engine.data import ByteTokenizer
from wmtp_core.engine.model import ModelConfig, MTPModel, model_from_weights
from wmtp_core.engine.model_sources import (  # noqa: F401  (also importable from here, as before)
    LoadModel,
    Source,
    describe,
    is_committed,
    is_folder,
    local_path,
    locate,
    options_for,
)
from wmtp_core.errors import ModelLoadError, WmtpError

DEFAULT_FUTURE = 4
BYTES = "byte-level tokens (256)"


@attrs.define
class Base:
    """The model being trained and what goes with it."""

    model: nn.Module
    tokenizer: Any
    """A Hugging Face tokenizer, or :class:`ByteTokenizer` for the byte-level model."""
    record: dict[str, Any]
    """What rebuilds the architecture: the byte-level ``ModelConfig`` fields, or for a Hugging
    Face model ``{"kind": "hf", "base", "n_future", "head", "config"}``."""
    source: Source | None = None
    notes: list[str] = attrs.Factory(list)
    """What the run says about its model under ``--verbose`` (heads loaded or started afresh)."""

    @property
    def is_hf(self) -> bool:
        return self.source is not None

    @property
    def eos_id(self) -> int | None:
        return data.eos_id(self.tokenizer)

    @property
    def pad_id(self) -> int:
        return data.pad_id(self.tokenizer)

    @property
    def max_positions(self) -> int:
        if not self.is_hf:
            return int(self.record["max_seq_len"])
        c = self.record["config"]
        return int(next((c[k] for k in ("max_position_embeddings", "n_positions", "n_ctx") if isinstance(c.get(k), int)),
                        1 << 30))

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size if self.is_hf else self.record["d_model"])

    def vocabulary(self) -> str:
        return hf.vocabulary(self.tokenizer) if self.is_hf else BYTES


def byte_config(settings: Any) -> ModelConfig:
    m = settings.recipe.model
    return ModelConfig(vocab_size=m.vocab_size, d_model=m.d_model, n_layers=m.n_layers,
                       n_heads=m.n_heads, n_future=m.n_future or DEFAULT_FUTURE, max_seq_len=m.max_seq_len,
                       dropout=m.dropout)


def n_future_for(settings: Any, info: hf.FolderInfo) -> int:
    return settings.recipe.model.n_future or info.declared_heads or DEFAULT_FUTURE


def build_base(settings: Any, load: LoadModel) -> Base:
    """The base model: ``paths.models.base`` fine-tuned with multi-token heads, or the byte-level
    model from scratch. Its size is checked against its weights and this machine's memory before
    anything is allocated."""
    uri = settings.config.paths.models.base
    if not uri:
        cfg = byte_config(settings)
        model_size.check_byte(cfg, settings.recipe_source, model_size.budget(settings))
        return Base(model=MTPModel(cfg), tokenizer=ByteTokenizer(), record=attrs.asdict(cfg))
    key = "paths.models.base"
    source = locate(uri, key, settings, load)
    try:
        return _pretrained(settings, source, key, uri)
    finally:
        source.release()


def _check_base(info: hf.FolderInfo, key: str, uri: str) -> None:
    if info.is_classifier:
        raise ModelLoadError(f"{key}: {uri} is a {info.architecture}, not a causal language model")
    if not info.has_tokenizer:
        raise ModelLoadError(f"{key}: {uri} has no tokenizer files (tokenizer.json, vocab.json or "
                             "tokenizer.model); the base model tokenizes the training data")


def _pretrained(settings: Any, source: Source, key: str, uri: str) -> Base:
    """The base model from the folder ``source`` led to (released by the caller)."""
    trust = settings.config.paths.models.trust_remote_code
    if source.info is None:
        raise ModelLoadError(f"{key}: {uri!r} is a WMTP byte-level model; paths.models.base names a "
                             "Hugging Face causal LM folder (config.json, safetensors, tokenizer files)")
    info = source.info
    _check_base(info, key, uri)
    n_future = n_future_for(settings, info)
    head = settings.recipe.model.head
    model_size.check_folder(info, key, model_size.budget(settings), folder=source.folder, trust=trust,
                            heads=(n_future, head))
    tokenizer = hf.load_tokenizer(source.folder, key, trust, info.uri)
    model, loaded_heads = hf.build_mtp(info, source.folder, n_future, head, key, trust)
    if len(tokenizer) > model.base.get_output_embeddings().weight.shape[0]:
        raise ModelLoadError(f"{key}: its tokenizer ({hf.vocabulary(tokenizer)}) has more tokens than its "
                             f"model's vocabulary ({model.base.get_output_embeddings().weight.shape[0]})")
    notes = [f"base model: {info.describe()}, {n_future} heads "
             f"({'extra heads loaded from ' + hf.HEADS if loaded_heads else 'extra heads started from its LM head' if head == 'linear' else 'extra transformer-layer heads started afresh'})"]
    if info.declared_heads and info.declared_heads != n_future:
        notes.append(f"the folder declares {info.declared_heads} heads; model.n_future {n_future} is used")
    config = model.base.config.to_dict()
    record = {"kind": "hf", "base": uri, "n_future": n_future, "head": head, "config": config}
    return Base(model=model, tokenizer=tokenizer, record=record, source=source, notes=notes)


def _byte_model(source: Source, key: str) -> MTPModel:
    loaded = source.loaded
    try:
        model = model_from_weights(dict(loaded.model_config), dict(loaded.weights), source.uri)
    except WmtpError as e:
        raise ModelLoadError(f"{key}: {e}") from None
    return model.eval().requires_grad_(False)


def _refuse_vocab(key: str, uri: str, theirs: str, base: Base, why: str) -> ModelLoadError:
    return ModelLoadError(f"{key}: {uri} uses {theirs}, the base model {base.vocabulary()}; {why}")


def build_reference(settings: Any, load: LoadModel, base: Base) -> nn.Module:
    """rho1-wmtp's frozen reference: anything with ``next_token_logits(ids)`` over the base
    vocabulary (its per-token losses are compared with the base model's, token for token)."""
    key, uri = "paths.models.ref", settings.config.paths.models.ref
    source = locate(uri, key, settings, load)
    try:
        return _reference(settings, source, key, uri, base)
    finally:
        source.release()


def _reference(settings: Any, source: Source, key: str, uri: str, base: Base) -> nn.Module:
    why = "a reference model must share the base model's vocabulary (rho1-wmtp compares per-token losses)"
    if source.info is None:
        if base.is_hf:
            raise _refuse_vocab(key, uri, BYTES, base, why)
        return _byte_model(source, key)
    info, trust = source.info, settings.config.paths.models.trust_remote_code
    if not base.is_hf:
        raise _refuse_vocab(key, uri, f"a vocabulary of {info.vocab_size or '?'} tokens ({info.architecture})",
                            base, why)
    if info.is_classifier:
        raise ModelLoadError(f"{key}: {uri} is a {info.architecture}; rho1-wmtp's reference is a causal LM")
    model_size.check_folder(info, key, model_size.budget(settings), folder=source.folder, trust=trust)
    if info.has_tokenizer:
        tok = hf.load_tokenizer(source.folder, key, trust, info.uri)
        if tok.get_vocab() != base.tokenizer.get_vocab():
            raise _refuse_vocab(key, uri, hf.vocabulary(tok), base, why)
    elif (info.vocab_size or 0) < len(base.tokenizer):
        raise _refuse_vocab(key, uri, f"a vocabulary of {info.vocab_size or '?'} tokens and no tokenizer",
                            base, why)
    from transformers import AutoModelForCausalLM

    lm = hf.from_pretrained(AutoModelForCausalLM, source.folder, key, trust, info.uri)
    return hf.ReferenceLM(lm).eval().requires_grad_(False)


def build_reward(settings: Any, load: LoadModel, base: Base) -> nn.Module:
    """critic-wmtp's reward model: anything with ``score(ids, lengths) -> [B]``. A Hugging Face
    sequence classifier scores the text re-tokenized with its own tokenizer; a causal LM scores
    minus its mean next-token loss, on the base tokens when it shares their vocabulary, else on
    the text re-tokenized with its own tokenizer."""
    from wmtp_core.engine.algorithms import LMReward

    key, uri = "paths.models.rm", settings.config.paths.models.rm
    source = locate(uri, key, settings, load)
    if source.info is None:
        if base.is_hf:
            raise _refuse_vocab(key, uri, BYTES, base, "a byte-level reward model cannot read the base "
                                "model's tokens, and has no tokenizer to re-tokenize the text with")
        return LMReward(_byte_model(source, key))
    try:
        return _reward(source, key, uri, settings, base)
    finally:
        source.release()


def _reward(source: Source, key: str, uri: str, settings: Any, base: Base) -> nn.Module:
    from wmtp_core.engine.algorithms import LMReward

    info, trust = source.info, settings.config.paths.models.trust_remote_code
    model_size.check_folder(info, key, model_size.budget(settings), folder=source.folder, trust=trust)
    tok = hf.load_tokenizer(source.folder, key, trust, info.uri) if info.has_tokenizer else None
    shares = base.is_hf and (tok.get_vocab() == base.tokenizer.get_vocab() if tok is not None
                             else (info.vocab_size or 0) >= len(base.tokenizer))
    if info.is_classifier:
        from transformers import AutoModelForSequenceClassification

        if tok is None and not base.is_hf:
            raise _refuse_vocab(key, uri, f"a vocabulary of {info.vocab_size or '?'} tokens and no tokenizer",
                                base, "it cannot be given the text to score")
        model = hf.from_pretrained(AutoModelForSequenceClassification, source.folder, key, trust, info.uri)
        return hf.TextReward(model, tok or base.tokenizer, base.tokenizer, causal=False).eval()
    from transformers import AutoModelForCausalLM

    lm = hf.from_pretrained(AutoModelForCausalLM, source.folder, key, trust, info.uri)
    if shares:
        return LMReward(hf.ReferenceLM(lm))
    if tok is None:
        raise _refuse_vocab(key, uri, f"a vocabulary of {info.vocab_size or '?'} tokens and no tokenizer",
                            base, "it can neither read the base tokens nor re-tokenize the text")
    return hf.TextReward(lm, tok, base.tokenizer, causal=True).eval()


def rebuild(record: Mapping[str, Any], weights: Mapping[str, torch.Tensor], source: str) -> nn.Module:
    """The trained module from a stored architecture record and its weights (both untrusted)."""
    if isinstance(record, Mapping) and record.get("kind") == "hf":
        from wmtp_core.engine.hf_record import rebuild as rebuild_hf

        return rebuild_hf(record, weights, source)
    return model_from_weights(dict(record), dict(weights), source)


@attrs.frozen
class Checked:
    """What the dry run knows of a run's models without loading any of them."""

    descriptions: Mapping[str, str]
    """``paths.models.*`` key (or ``model``) -> what it is."""
    parameters: int | None
    """Parameters of the model being trained (``None`` for a registered base model: it is
    resolved when the run starts)."""
    max_positions: int
    vocab: int | None


def _check_base_folder(settings: Any, uri: str) -> tuple[int, int, int | None, str]:
    """``(parameters, positions, vocabulary, description)`` of a base model folder, checked
    from its listing, ``config.json`` and safetensors headers (nothing allocated)."""
    key, trust = "paths.models.base", settings.config.paths.models.trust_remote_code
    if not is_folder(uri, key, settings):
        describe(uri, key, settings)  # does not exist, or the reason it is not a folder
        raise ModelLoadError(f"{key}: {uri} is a WMTP byte-level checkpoint; paths.models.base "
                             "names a Hugging Face causal LM folder (config.json, safetensors, tokenizer files)")
    info = hf.inspect(uri, key, trust, options_for(uri, settings))
    _check_base(info, key, uri)
    n_future, head = n_future_for(settings, info), settings.recipe.model.head
    params = model_size.check_folder(info, key, model_size.budget(settings), folder=local_path(uri), trust=trust,
                                     heads=(n_future, head))
    positions = next((info.config[k] for k in ("max_position_embeddings", "n_positions", "n_ctx")
                      if isinstance(info.config.get(k), int)), 1 << 30)
    return params, positions, info.vocab_size, (f"{info.describe()}, {n_future} heads"
                                                + (" (its code runs: trust_remote_code)" if info.code else ""))


def check(settings: Any) -> Checked:
    """Check every model a run uses from listings and ``config.json`` files only: each path
    exists, names an architecture WMTP can train or consult, holds safetensors weights, runs no
    code without ``trust_remote_code``, and, where the configs tell, shares the vocabulary it
    must. Loads no model."""
    paths, algo = settings.config.paths.models, settings.recipe.train.algo
    out: dict[str, str] = {}
    if not paths.base:
        cfg = byte_config(settings)
        params = model_size.check_byte(cfg, settings.recipe_source, model_size.budget(settings))
        positions, vocab = cfg.max_seq_len, cfg.vocab_size
        out["model"] = f"WMTP byte-level model ({cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_future} heads)"
    elif paths.base.startswith("models:/"):
        params, positions, vocab = None, 1 << 30, None
        out["paths.models.base"] = describe(paths.base, "paths.models.base", settings)
    else:
        params, positions, vocab, out["paths.models.base"] = _check_base_folder(settings, paths.base)
    for key, uri, used in (("paths.models.ref", paths.ref, algo == "rho1-wmtp"),
                           ("paths.models.rm", paths.rm, algo == "critic-wmtp")):
        if not used or not uri:
            continue
        out[key] = describe(uri, key, settings)
        if key.endswith("ref") and paths.base and not uri.startswith("models:/") and not is_folder(uri, key, settings):
            raise ModelLoadError(f"{key}: {uri} is a WMTP byte-level model (byte-level tokens), the base model "
                                 f"a Hugging Face model; a reference model must share the base model's vocabulary")
        if key.endswith("ref") and not paths.base and is_folder(uri, key, settings):
            raise ModelLoadError(f"{key}: {uri} is a Hugging Face model, the base model the byte-level one "
                                 f"({BYTES}); a reference model must share the base model's vocabulary")
    return Checked(descriptions=out, parameters=params, max_positions=positions, vocab=vocab)
