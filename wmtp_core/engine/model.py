"""A multi-token-prediction transformer (Gloeckle et al. 2024).

A shared trunk of causal transformer blocks, ``n_future`` heads of one block each, and one
shared unembedding. Head ``k`` (0-based) at position ``t`` predicts token ``t + k + 1``.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from wmtp_core.errors import ModelLoadError
from wmtp_core.validators import positive_int

_positive = positive_int


@attrs.frozen
class ModelConfig:
    """The architecture. The defaults train on a laptop CPU in seconds."""

    vocab_size: int = attrs.field(default=256, validator=_positive)
    """Byte-level: 256 token ids."""
    d_model: int = attrs.field(default=128, validator=_positive)
    n_layers: int = attrs.field(default=2, validator=_positive)
    """Blocks in the shared trunk."""
    n_heads: int = attrs.field(default=4, validator=_positive)
    """Attention heads per block (``d_model`` must be divisible by it)."""
    n_future: int = attrs.field(default=4, validator=_positive)
    """Prediction heads: head k predicts token t+k+1."""
    max_seq_len: int = attrs.field(default=256, validator=_positive)
    dropout: float = attrs.field(default=0.0)

    def __attrs_post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(
                f"model.d_model: {self.d_model} is not divisible by model.n_heads {self.n_heads}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout: {self.dropout!r} is not accepted; use 0 <= dropout < 1")


class Block(nn.Module):
    """Pre-norm causal self-attention and MLP."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.dropout = cfg.dropout
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, 4 * cfg.d_model), nn.GELU(), nn.Linear(4 * cfg.d_model, cfg.d_model)
        )
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, t, d)))
        return x + self.drop(self.mlp(self.ln2(x)))


class MTPModel(nn.Module):
    """``forward(ids [B, T]) -> logits [B, n_future, T, vocab]``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.trunk = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.heads = nn.ModuleList(Block(cfg) for _ in range(cfg.n_future))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.unembed = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def trunk_hidden(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        if t > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {t} tokens is longer than model.max_seq_len {self.cfg.max_seq_len}")
        x = self.tok(ids) + self.pos(torch.arange(t, device=ids.device))
        for block in self.trunk:
            x = self._run(block, x)
        return x

    activation_checkpointing = False
    """Recompute block activations during backward instead of keeping them (devices.fsdp.activation_ckpt)."""

    def _run(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(block, x, use_reentrant=False)
        return block(x)

    def head_hidden(self, h: torch.Tensor) -> torch.Tensor:
        """Per-head final hidden states ``[B, n_future, T, d]``."""
        return torch.stack([self.norm(self._run(head, h)) for head in self.heads], dim=1)

    float_logits = False
    """Return float32 logits whatever the weights' dtype: a final model stored in bf16 or fp16
    is served with float32 outputs (what its signature says; numpy has no bfloat16)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        logits = self.unembed(self.head_hidden(self.trunk_hidden(ids)))
        return logits.float() if self.float_logits else logits

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        """The trunk's last hidden states ``[B, T, d]`` (what the critic's value head reads)."""
        return self.trunk_hidden(ids)

    def logits_and_hidden(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward(ids)`` and ``hidden(ids)`` from one pass."""
        h = self.trunk_hidden(ids)
        return self.unembed(self.head_hidden(h)), h

    def next_token_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Head 0 only ``[B, T, vocab]``: what a reference or reward model is asked for."""
        return self.unembed(self.norm(self.heads[0](self.trunk_hidden(ids))))


LIMITS = {"vocab_size": (1, 1 << 20), "d_model": (1, 65536), "n_layers": (1, 1024),
          "n_heads": (1, 1024), "n_future": (1, 256), "max_seq_len": (1, 1 << 20)}
"""What an architecture read from a stored model may say (it is untrusted input)."""


def model_from_weights(config: Any, weights: Any, source: str) -> MTPModel:
    """Rebuild a model from a stored architecture and weights, both untrusted.

    The architecture is checked key by key, the model is laid out on the meta device and every
    weight's name and shape compared with it before any memory is allocated: a stored model
    that lies about its size is refused, not built. Raises ``ValueError`` naming ``source``.
    """
    if not isinstance(config, dict):
        raise ModelLoadError(f"{source}: its architecture is not a mapping")
    known = {f.name for f in attrs.fields(ModelConfig)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ModelLoadError(f"{source}: its architecture has an unknown key {unknown[0]!r} "
                         f"(known: {', '.join(sorted(known))})")
    for key, (lo, hi) in LIMITS.items():
        v = config.get(key)
        if key in config and not (isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi):
            raise ModelLoadError(f"{source}: its architecture says {key}={v!r}; accepted: an integer "
                             f"from {lo} to {hi}")
    if "dropout" in config and not isinstance(config["dropout"], (int, float)):
        raise ModelLoadError(f"{source}: its architecture says dropout={config['dropout']!r}")
    try:
        cfg = ModelConfig(**config)
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"{source}: its architecture is not accepted ({e})") from None
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in MTPModel(cfg).state_dict().items()}
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise ModelLoadError(f"{source}: its weights are not a mapping of names to tensors")
    got = {k: tuple(v.shape) for k, v in weights.items()}
    if got != expected:
        diff = sorted(set(got) ^ set(expected)) or sorted(k for k in got if got[k] != expected[k])
        k = diff[0]
        raise ModelLoadError(f"{source}: its weights do not fit the architecture it records "
                         f"({k}: {got.get(k, 'missing')} vs {expected.get(k, 'not in the model')})")
    model = MTPModel(cfg)
    model.load_state_dict(weights)
    return model


def count_parameters(cfg: ModelConfig) -> int:
    """Parameter count without allocating the model (built on the meta device)."""
    with torch.device("meta"):
        return sum(p.numel() for p in MTPModel(cfg).parameters())
