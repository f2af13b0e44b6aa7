"""Lossless self-speculative greedy decoding with a multi-token model's extra heads.

A model trained to predict ``n_future`` tokens has, besides head 0 (the ordinary next-token
head), heads 1..n-1 that guess the tokens after it. Blockwise parallel decoding (Stern, Shazeer
and Uszkoreit 2018, "Blockwise Parallel Decoding for Deep Autoregressive Models") uses such
guesses to emit several tokens per forward pass without changing the output; Gloeckle et al.
2024 ("Better & Faster Large Language Models via Multi-token Prediction", section 3.2) apply it
to multi-token models, whose extra heads are the drafter (self-speculative decoding).

Each iteration starts from the logits of the last base forward at the last accepted position:

1. ``y`` = argmax of head 0: the base model's own greedy token, always right; it is emitted.
2. ``d_k`` = argmax of extra head ``k`` (k = 1..n-1): drafts of the tokens after ``y``.
3. One base forward over ``[y, d_1, ..., d_{n-1}]`` (a Hugging Face model reuses its KV cache;
   the byte-level model, which has none, recomputes the sequence) gives the base's greedy
   choice ``g_i`` after each of them. Draft ``d_k`` is accepted while ``d_k == g_{k-1}``: the
   longest prefix of drafts the base would itself have chosen. The cache is cropped back to the
   accepted tokens.
4. The same forward's logits at the last accepted position give the next iteration's ``y``
   (``g_j``, head 0) and drafts (the extra heads, from the same hidden state), so every
   iteration costs one base forward and emits between 1 and ``n_future`` tokens.

Decoding stops after ``eos_id`` (emitted) or ``max_new_tokens``, never later; drafts past
either limit are not verified. Every emitted token is the base's argmax given the tokens before
it, so the output is token-identical to plain greedy decoding in exact arithmetic. In floating
point a many-token forward may round differently from a one-token one, so on a near-tie of two
logits (float16/bfloat16, rarely float32) the two can part; in float64 they do not.

The byte-level :class:`MTPModel` reads at most ``cfg.max_seq_len`` tokens per forward (as a
training window holds ``max_seq_len + 1`` tokens, the last one only a target): a longer prompt
is refused, fewer drafts are verified near the limit, and decoding stops when the sequence
would outgrow it.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator

import attrs
import torch
from torch import nn

from wmtp_core.engine.hf import HFMTPModel
from wmtp_core.engine.model import MTPModel


@attrs.frozen
class Stats:
    """What one decoding cost."""

    tokens: int
    """Tokens emitted."""
    forwards: int
    """Forward passes of the base model (the prompt's included)."""
    seconds: float

    @property
    def accepted(self) -> float:
        """Mean tokens emitted per base forward: 1 for plain greedy decoding, up to ``n_future``
        (approached on long generations) for speculative decoding; 0.0 when none ran."""
        return self.tokens / self.forwards if self.forwards else 0.0


class _HFRunner:
    """A Hugging Face :class:`HFMTPModel`'s base with its KV cache, and its extra heads."""

    def __init__(self, model: HFMTPModel, drafts: bool) -> None:
        self.model, self.drafts = model, drafts
        self.device = next(model.parameters()).device
        self.cache = None
        self.hidden: torch.Tensor | None = None  # the last hidden state of every accepted position
        self.out = None

    def room(self) -> int | None:
        return None  # as base.generate: the base model's own limit, if any, is its to enforce

    def step(self, block: list[int]) -> list[int]:
        """Feed ``block`` after the accepted tokens; the base's greedy choice after each."""
        ids = torch.tensor([block], device=self.device)
        self.out = self.model.base(input_ids=ids, past_key_values=self.cache, use_cache=True,
                                   output_hidden_states=self.drafts)
        self.cache = self.out.past_key_values
        return self.out.logits[0].argmax(-1).tolist()

    def keep(self, j: int) -> list[int]:
        """Keep the last block's first ``j + 1`` tokens; the extra heads' drafts after them."""
        fed = self.out.logits.shape[1]
        if fed > j + 1:
            self.cache.crop(-(fed - j - 1))  # negative: how many to remove (transformers >= 4.38)
        if not self.drafts or not self.model.heads:
            return []
        h = self.out.hidden_states[-1][:, : j + 1]
        if self.model.head_kind == "linear":
            return [int(head(h[0, -1]).argmax()) for head in self.model.heads]
        self.hidden = h if self.hidden is None else torch.cat([self.hidden, h], dim=1)
        t = self.hidden.shape[1]
        causal = nn.Transformer.generate_square_subsequent_mask(t, device=h.device, dtype=h.dtype)
        lm_head = self.model.base.get_output_embeddings()
        return [int(lm_head(head(self.hidden, src_mask=causal, is_causal=True)[0, -1]).argmax())
                for head in self.model.heads]


class _ByteRunner:
    """The byte-level :class:`MTPModel`: no cache, every forward recomputes the sequence."""

    def __init__(self, model: MTPModel, drafts: bool) -> None:
        self.model, self.drafts = model, drafts
        self.device = next(model.parameters()).device
        self.seq: list[int] = []
        self.block: list[int] = []
        self.logits: torch.Tensor | None = None

    def room(self) -> int | None:
        return self.model.cfg.max_seq_len - len(self.seq)

    def step(self, block: list[int]) -> list[int]:
        ids = torch.tensor([self.seq + block], device=self.device)
        if self.drafts:
            self.logits = self.model(ids)[0, :, -len(block):]  # [n_future, len(block), vocab]
            base = self.logits[0]
        else:
            base = self.model.next_token_logits(ids)[0, -len(block):]
        self.block = block
        return base.argmax(-1).tolist()

    def keep(self, j: int) -> list[int]:
        self.seq += self.block[: j + 1]
        if not self.drafts:
            return []
        return self.logits[1:, j].argmax(-1).tolist()


def _runner(model: nn.Module, prompt_ids: list[int], max_new_tokens: int, drafts: bool):
    """The runner for ``model`` and how many tokens it may emit (checked)."""
    if not prompt_ids:
        raise ValueError("decoding needs a prompt of at least one token")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: {max_new_tokens}; accepted: 0 or more")
    if isinstance(model, HFMTPModel):
        return _HFRunner(model, drafts), max_new_tokens
    if not isinstance(model, MTPModel):
        raise TypeError(f"{type(model).__name__} is not a WMTP model (HFMTPModel or MTPModel)")
    window = model.cfg.max_seq_len
    if len(prompt_ids) > window:
        raise ValueError(f"a prompt of {len(prompt_ids)} tokens is longer than the model reads "
                         f"(model.max_seq_len {window}); shorten it to at most {window} tokens")
    return _ByteRunner(model, drafts), min(max_new_tokens, window + 1 - len(prompt_ids))


@contextlib.contextmanager
def _inference(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) and no autograd for the call; the model's mode is restored."""
    training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(training)


def greedy(model: nn.Module, prompt_ids: list[int], max_new_tokens: int,
           eos_id: int | None = None, stop: Callable[[list[int]], bool] | None = None) -> tuple[list[int], Stats]:
    """Plain greedy decoding by head 0, one base forward per token (the reference). ``stop``:
    decoding ends once it holds for the tokens so far (a task's stop sequence was written)."""
    start = time.perf_counter()
    runner, limit = _runner(model, prompt_ids, max_new_tokens, drafts=False)
    out: list[int] = []
    block = list(prompt_ids)
    with _inference(model):
        while len(out) < limit:
            y = runner.step(block)[-1]
            runner.keep(len(block) - 1)
            out.append(y)
            if y == eos_id or stop is not None and stop(out):
                break
            block = [y]
    return out, Stats(len(out), len(out), time.perf_counter() - start)


def speculative(model: nn.Module, prompt_ids: list[int], max_new_tokens: int,
                eos_id: int | None = None, stop: Callable[[list[int]], bool] | None = None) -> tuple[list[int], Stats]:
    """Greedy decoding that verifies the extra heads' drafts: the same tokens as :func:`greedy`,
    in fewer base forwards (see the module's docstring). ``stop`` is checked after each block, so
    the output may run a few tokens past where :func:`greedy` stopped (a caller cuts the text at
    the stop sequence; up to there the two are the same)."""
    start = time.perf_counter()
    runner, limit = _runner(model, prompt_ids, max_new_tokens, drafts=True)
    out: list[int] = []
    if limit == 0:
        return out, Stats(0, 0, time.perf_counter() - start)
    with _inference(model):
        y = runner.step(list(prompt_ids))[-1]
        drafts, forwards = runner.keep(len(prompt_ids) - 1), 1
        while True:
            out.append(y)
            if y == eos_id or len(out) >= limit or stop is not None and stop(out):
                break
            room = runner.room()
            m = min(len(drafts), limit - len(out), len(drafts) if room is None else room - 1)
            block = [y, *drafts[:m]]
            choices = runner.step(block)
            forwards += 1
            j = _accepted(block, choices, eos_id)
            out.extend(block[1: j + 1])
            if block[j] == eos_id or len(out) >= limit or stop is not None and stop(out):
                break
            y, drafts = choices[j], runner.keep(j)
    return out, Stats(len(out), forwards, time.perf_counter() - start)


def _accepted(block: list[int], choices: list[int], eos_id: int | None) -> int:
    """How many drafts of ``block = [y, d_1, ...]`` the base agrees with (``choices[i]``: its
    greedy token after ``block[i]``), up to and including an ``eos_id``."""
    j = 0
    while j + 1 < len(block) and block[j + 1] == choices[j]:
        j += 1
        if block[j] == eos_id:
            break
    return j
