"""Completions from a model: any source a run could start from (a committed checkpoint, resume
state or final model, sharded ones included, read through the verified path; ``models:/NAME/VERSION``;
a Hugging Face folder), sampled as the benchmarks' authors sample them.

A Hugging Face model generates through ``transformers``' own ``generate`` (its KV cache, its
temperature and top-p warpers, the task's stop strings); the byte-level model through the same
warpers in a loop of its own (it has no KV cache). Each problem's samples are drawn from a
generator seeded with ``seed`` and the problem's place in its task, so a result does not depend
on which other problems ran (``--limit``) or in what order.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import attrs
import torch

from wmtp_core.errors import ConfigError, ModelLoadError

KEY = "SOURCE"


@attrs.frozen
class Sampling:
    """How completions are drawn."""

    n: int = 1
    temperature: float = 0.0
    """0: greedy (one completion, repeated ``n`` times: they would all be the same)."""
    top_p: float = 1.0
    max_new_tokens: int = 512
    seed: int = 0
    speculative: bool = False
    """Greedy only: draft with the extra heads, verify with head 0 (lossless)."""

    def __attrs_post_init__(self) -> None:
        checks = (("--n", self.n, 1, 10_000, "an integer from 1 to 10000"),
                  ("--temperature", self.temperature, 0, 100, "a number from 0 (greedy) to 100"),
                  ("--top-p", self.top_p, 1e-9, 1, "a number above 0, at most 1"),
                  ("--max-new-tokens", self.max_new_tokens, 1, 1 << 20, "an integer from 1 to 1048576"))
        for key, value, lo, hi, accepted in checks:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
                raise ConfigError(f"{key} {value!r}: out of range; accepted: {accepted}")
        if self.speculative and self.temperature > 0:
            raise ConfigError(f"--speculative with --temperature {self.temperature}: speculative decoding is "
                              "lossless for greedy decoding only here; accepted: --temperature 0, or no --speculative")


@attrs.define
class Model:
    """A model ready to complete prompts."""

    module: torch.nn.Module
    tokenizer: Any
    source: str
    n_future: int
    max_positions: int

    @property
    def is_hf(self) -> bool:
        return hasattr(self.module, "base")

    @property
    def eos_id(self) -> int | None:
        return getattr(self.tokenizer, "eos_token_id", None)

    def encode(self, text: str) -> list[int]:
        if self.is_hf:
            return list(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        if self.is_hf:
            return self.tokenizer.decode(list(ids), skip_special_tokens=True)
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def open_model(uri: str, settings: Any, load: Callable[[str], Any]) -> Model:
    """The model at ``uri``, verified where it is a committed checkpoint; one line naming the
    source when it cannot be used."""
    from wmtp_core.engine import hf, model_sources

    if not isinstance(uri, str) or not uri.strip():
        raise ConfigError(f"{KEY} {uri!r}: empty; accepted: a committed checkpoint URI, models:/NAME/VERSION, "
                          "or a Hugging Face model folder")
    trust = settings.config.paths.models.trust_remote_code
    source = model_sources.locate(uri, KEY, settings, load)
    try:
        if source.info is not None:
            tokenizer = hf.load_tokenizer(source.folder, KEY, trust, uri)
            n_future, head = _declared(source.info)
            module, _ = hf.build_mtp(source.info, source.folder, n_future, head, KEY, trust)
            return _ready(module, tokenizer, uri, n_future)
        loaded = source.loaded
        return _rebuilt(uri, dict(loaded.model_config or {}), loaded.weights, settings, load)
    finally:
        source.release()


def _declared(info: Any) -> tuple[int, str]:
    """How many heads a folder carries (``mtp_config``; a plain causal LM: one) and their kind."""
    mtp = info.config.get("mtp_config") or {}
    head = mtp.get("head") if isinstance(mtp, dict) and mtp.get("head") in ("linear", "transformer") else "linear"
    return info.declared_heads or 1, head


def _rebuilt(uri: str, record: dict, weights: Any, settings: Any, load: Callable[[str], Any]) -> Model:
    """A checkpoint's weights with their architecture record; a fine-tuned Hugging Face model's
    tokenizer comes from the base folder the record names."""
    from wmtp_core.engine import hf, model_sources, models
    from wmtp_core.engine.data import ByteTokenizer

    module = models.rebuild(record, weights, uri)
    if record.get("kind") != "hf":
        return _ready(module, ByteTokenizer(), uri, int(record.get("n_future", 1)))
    base = record.get("base")
    if not isinstance(base, str) or not base:
        raise ModelLoadError(f"{KEY}: {uri} records no base model folder to read its tokenizer from")
    source = model_sources.locate(base, f"{KEY} (its base model, for the tokenizer)", settings, load)
    try:
        if source.folder is None:
            raise ModelLoadError(f"{KEY}: {uri} names base model {base}, which holds no tokenizer")
        tokenizer = hf.load_tokenizer(source.folder, KEY, settings.config.paths.models.trust_remote_code, base)
    finally:
        source.release()
    return _ready(module, tokenizer, uri, int(record["n_future"]))


def _ready(module: torch.nn.Module, tokenizer: Any, uri: str, n_future: int) -> Model:
    module = module.float().eval().requires_grad_(False)
    if hasattr(module, "base"):
        c = module.base.config
        positions = next((getattr(c, k) for k in ("max_position_embeddings", "n_positions", "n_ctx")
                          if isinstance(getattr(c, k, None), int)), 1 << 20)
    else:
        positions = module.cfg.max_seq_len
    return Model(module=module, tokenizer=tokenizer, source=uri, n_future=n_future, max_positions=int(positions))


@attrs.define
class Speed:
    """What decoding cost: base-model forward passes, tokens, seconds."""

    forwards: int = 0
    tokens: int = 0
    seconds: float = 0.0

    @property
    def accepted(self) -> float:
        """Tokens per forward pass of the base model (1 without speculative decoding)."""
        return self.tokens / self.forwards if self.forwards else 0.0


def complete(model: Model, prompt: str, sampling: Sampling, stops: Sequence[str], index: int,
             speed: Speed | None = None) -> list[str]:
    """``sampling.n`` completions of ``prompt``, each cut at the first stop."""
    ids = model.encode(prompt)
    room = model.max_positions - sampling.max_new_tokens
    if room < 1:
        raise ConfigError(f"--max-new-tokens {sampling.max_new_tokens}: the model reads at most "
                          f"{model.max_positions} positions; accepted: fewer new tokens than that")
    ids = ids[-room:]  # a prompt too long for the model keeps its end (the part next to the completion)
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(sampling.seed * 1_000_003 + index)
    with torch.inference_mode():
        if sampling.temperature == 0:
            new, forwards = _greedy(model, ids, sampling, stops)
            texts = [model.decode(new)] * sampling.n
            used = len(new)
        else:
            texts, used = _sample(model, ids, sampling, stops, generator)
            forwards = used  # one token of each sequence per forward pass (the n run as one batch)
    if speed is not None:
        speed.forwards += forwards
        speed.tokens += used
        speed.seconds += time.perf_counter() - started
    return [_cut(t, stops) for t in texts]


def _cut(text: str, stops: Sequence[str]) -> str:
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


def _greedy(model: Model, ids: list[int], sampling: Sampling, stops: Sequence[str]) -> tuple[list[int], int]:
    """Greedy new tokens (stopping at a stop string or the end of text) and the base model's
    forward passes. Speculative decoding drafts with the extra heads and keeps what head 0 would
    have chosen; its tokens are those of plain greedy decoding."""
    from wmtp_core.evaluation import speculative as spec

    decode = spec.speculative if sampling.speculative and model.n_future > 1 else spec.greedy
    new, stats = decode(model.module, ids, sampling.max_new_tokens, model.eos_id,
                        stop=lambda row: _stopped(model, row, stops))
    return new, stats.forwards


def _sample(model: Model, ids: list[int], sampling: Sampling, stops: Sequence[str],
            generator: torch.Generator) -> tuple[list[str], int]:
    if model.is_hf:
        return _sample_hf(model, ids, sampling, stops, generator)
    return _sample_bytes(model, ids, sampling, stops, generator)


def _warp(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """Temperature, then nucleus (top-p) filtering, as ``transformers``' warpers do."""
    logits = logits.float() / sampling.temperature
    if sampling.top_p < 1:
        ordered, order = torch.sort(logits, descending=False, dim=-1)
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= (1 - sampling.top_p)
        drop[..., -1:] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def _sample_hf(model: Model, ids: list[int], sampling: Sampling, stops: Sequence[str],
               generator: torch.Generator) -> tuple[list[str], int]:
    """Sampled completions with the base model's KV cache, ``n`` at once."""
    base = model.module.base
    batch = torch.tensor([ids] * sampling.n)
    out = base(input_ids=batch, use_cache=True)
    cache, logits = out.past_key_values, out.logits[:, -1]
    rows: list[list[int]] = [[] for _ in range(sampling.n)]
    done = [False] * sampling.n
    for _ in range(sampling.max_new_tokens):
        pick = torch.multinomial(_warp(logits, sampling).softmax(-1), 1, generator=generator)[:, 0]
        for r, token in enumerate(pick.tolist()):
            if not done[r]:
                rows[r].append(token)
                done[r] = token == model.eos_id or _stopped(model, rows[r], stops)
        if all(done):
            break
        out = base(input_ids=pick[:, None], past_key_values=cache, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1]
    return [model.decode(r) for r in rows], sum(len(r) for r in rows)


def _sample_bytes(model: Model, ids: list[int], sampling: Sampling, stops: Sequence[str],
                  generator: torch.Generator) -> tuple[list[str], int]:
    """Sampled completions of the byte-level model (the whole window recomputed each token)."""
    m = model.module
    batch = torch.tensor([ids] * sampling.n)
    rows: list[list[int]] = [[] for _ in range(sampling.n)]
    done = [False] * sampling.n
    for _ in range(sampling.max_new_tokens):
        logits = m.next_token_logits(batch[:, -m.cfg.max_seq_len:])[:, -1]
        pick = torch.multinomial(_warp(logits, sampling).softmax(-1), 1, generator=generator)
        batch = torch.cat([batch, pick], dim=1)
        for r, token in enumerate(pick[:, 0].tolist()):
            if not done[r]:
                rows[r].append(token)
                done[r] = _stopped(model, rows[r], stops)
        if all(done):
            break
    return [model.decode(r) for r in rows], sum(len(r) for r in rows)


def _stopped(model: Model, row: list[int], stops: Sequence[str]) -> bool:
    tail = model.decode(row[-64:])
    return any(s in tail for s in stops)
