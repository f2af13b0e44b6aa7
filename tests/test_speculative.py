"""Self-speculative greedy decoding (wmtp_core.evaluation.speculative): token-identical to plain
greedy decoding of the base model (Hugging Face's own ``generate`` for an HFMTPModel), whatever
the extra heads draft, and really faster (fewer base forwards) when they draft right.

Every model here is float64 in eval mode: a many-token forward (verifying drafts) and a
one-token forward (greedy) round differently, and in float32 a near-tie of two logits could
flip an argmax between them; in float64 rounding never does, so any difference is a bug."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from wmtp_core.engine.hf import HFMTPModel
from wmtp_core.engine.model import ModelConfig, MTPModel
from wmtp_core.evaluation.speculative import Stats, greedy, speculative

VOCAB = 97
KINDS = [(n, kind) for n in (2, 3, 4) for kind in ("linear", "transformer")]


def _gpt2(seed: int) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    # no bos/eos of GPT-2's real vocabulary (50256): generate() stops only at the eos a test names
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=128, vocab_size=VOCAB,
                        bos_token_id=None, eos_token_id=None)
    return GPT2LMHeadModel(config).double().eval()


@pytest.fixture(scope="module")
def hf_models() -> dict:
    """One random GPT-2 under heads of every number and kind. The linear heads start as copies of
    the LM head and the transformer heads are residual, so perturbed they draft the base's own
    next token: right when the base repeats itself (a random model often does), else wrong. The
    noise is sized so that about half the drafts are accepted."""
    base = _gpt2(0)
    models = {}
    for n, kind in KINDS:
        model = HFMTPModel(base, n, kind)
        with torch.no_grad():
            for p in model.heads.parameters():
                if p.dim() > 1:
                    p.add_(torch.randn_like(p) * p.std()) if kind == "linear" else nn.init.normal_(p, std=0.15)
        models[n, kind] = model.double().eval()
    return models


@pytest.fixture(scope="module")
def byte_model() -> MTPModel:
    torch.manual_seed(1)
    model = MTPModel(ModelConfig(d_model=32, n_layers=1, n_heads=2, n_future=3, max_seq_len=64))
    with torch.no_grad():
        for p in model.heads[1:].parameters():
            if p.dim() > 1:
                nn.init.normal_(p, std=0.05)
    return model.double().eval()


def _generate(base: nn.Module, prompt: list[int], n: int, eos: int | None) -> list[int]:
    """Hugging Face's greedy decoding: nothing but argmax (no minimum length, no penalties)."""
    ids = torch.tensor([prompt])
    out = base.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=1,
                        max_new_tokens=n, min_new_tokens=0, repetition_penalty=1.0, no_repeat_ngram_size=0,
                        eos_token_id=eos, pad_token_id=0 if eos is None else eos)
    return out[0, len(prompt):].tolist()


def _check(out: list[int], stats: Stats, expected: list[int], n: int) -> None:
    assert out == expected
    assert len(out) <= n and stats.tokens == len(out)
    assert stats.accepted >= 1 and stats.forwards <= len(out)


prompts = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=20)
# no eos; an eos the base does emit (the token at a position of its output without one); any id
eos_choice = st.one_of(st.none(), st.tuples(st.just("at"), st.integers(0, 23)),
                       st.tuples(st.just("id"), st.integers(0, 255)))


def _eos(eos, plain: list[int], vocab: int) -> int | None:
    if eos is None:
        return None
    return plain[min(eos[1], len(plain) - 1)] if eos[0] == "at" else eos[1] % vocab


@settings(max_examples=20, deadline=None)
@given(kind=st.sampled_from(KINDS), prompt=prompts, n=st.integers(1, 24), eos=eos_choice)
def test_hf_speculative_is_generate(hf_models, kind, prompt, n, eos):
    model = hf_models[kind]
    plain = _generate(model.base, prompt, n, None) if eos and eos[0] == "at" else []
    eos_id = _eos(eos, plain, VOCAB)
    _check(*speculative(model, prompt, n, eos_id=eos_id), _generate(model.base, prompt, n, eos_id), n)


@settings(max_examples=14, deadline=None)
@given(prompt=st.lists(st.integers(0, 255), min_size=1, max_size=20), n=st.integers(1, 24), eos=eos_choice)
def test_byte_speculative_is_greedy(byte_model, prompt, n, eos):
    plain, stats = greedy(byte_model, prompt, n)
    assert len(plain) == n and stats.forwards == n and stats.accepted == 1
    eos_id = _eos(eos, plain, 256)
    expected = greedy(byte_model, prompt, n, eos_id)[0] if eos_id is not None else plain
    _check(*speculative(byte_model, prompt, n, eos_id=eos_id), expected, n)


def test_the_drafts_are_sometimes_right_and_sometimes_wrong(hf_models):
    """The fixtures test both branches: some drafts accepted, some rejected (and greedy, the
    one-token-a-forward reference, is generate's too)."""
    model = hf_models[2, "linear"]
    assert greedy(model, [1, 2, 3], 12)[0] == _generate(model.base, [1, 2, 3], 12, None)
    some_right, some_wrong = set(), set()
    for (n, kind), model in hf_models.items():
        for prompt in ([1, 2, 3], [50, 7]):
            out, stats = speculative(model, prompt, 12)
            if stats.forwards < 12:  # greedy's count: no draft accepted
                some_right.add(kind)
            if stats.forwards > 1 + math.ceil(11 / n):  # the least: every draft accepted
                some_wrong.add(kind)
    assert some_right == some_wrong == {"linear", "transformer"}


@pytest.mark.parametrize("kind", ["linear", "transformer"])
@pytest.mark.parametrize("n_future", [2, 3, 4])
def test_drafts_always_right_are_all_accepted(n_future, kind):
    """A GPT-2 whose final layer norm has weight 0 predicts the same token everywhere (its LM head
    applied to the norm's bias); heads that copy the LM head (linear) or pass the hidden state
    through unchanged (transformer, all weights 0) draft it too. The prompt's forward gives the
    first token; each later forward verifies n_future - 1 drafts and gives the next token."""
    base = _gpt2(2)
    with torch.no_grad():
        base.transformer.ln_f.weight.zero_()
        base.transformer.ln_f.bias.copy_(torch.randn(32, dtype=torch.float64))
    model = HFMTPModel(base, n_future, kind).double().eval()
    if kind == "transformer":
        with torch.no_grad():
            for p in model.heads.parameters():
                p.zero_()
    token = int(base.lm_head(base.transformer.ln_f.bias).argmax())
    assert _generate(base, [5, 6, 7], 12, None) == [token] * 12
    for n in (1, 2, 9, 1 + 8 * n_future):
        out, stats = speculative(model, [5, 6, 7], n)
        assert out == [token] * n
        assert stats.forwards == 1 + math.ceil((n - 1) / n_future)
        assert stats.accepted == n / stats.forwards
    assert stats.forwards == 9 and stats.accepted > n_future - 1  # (1 + 8 n) / 9 tokens a forward
    assert speculative(model, [5], 24, eos_id=token)[0] == [token]


@pytest.mark.parametrize("length", [40, 60, 63, 64])
def test_byte_model_decodes_up_to_its_window(byte_model, length):
    """A forward reads at most max_seq_len (64) tokens, so the output ends at 65 tokens in all,
    with fewer drafts verified near the end."""
    prompt = [(7 * i) % 256 for i in range(length)]
    out, stats = speculative(byte_model, prompt, 24)
    assert out == greedy(byte_model, prompt, 24)[0]
    assert len(out) == min(24, 65 - length) and stats.forwards <= len(out)


def test_byte_model_refuses_a_prompt_longer_than_its_window(byte_model):
    for decode in (greedy, speculative):
        with pytest.raises(ValueError, match="prompt of 65 tokens.*max_seq_len 64"):
            decode(byte_model, list(range(65)), 4)


def test_nothing_to_decode():
    stats = Stats(tokens=0, forwards=0, seconds=0.0)
    assert stats.accepted == 0.0
    with pytest.raises(ValueError, match="at least one token"):
        speculative(MTPModel(ModelConfig(d_model=8, n_layers=1, n_heads=2, n_future=2, max_seq_len=8)), [], 4)
