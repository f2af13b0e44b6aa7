"""The frozen Hugging Face models a run consults beside the one it trains: a causal LM asked for
next-token logits (rho1-wmtp's reference, or a reward LM that shares the base vocabulary) and a
reward model that reads the text with its own tokenizer (critic-wmtp).
:mod:`wmtp_core.engine.models` builds them from their folders."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class ReferenceLM(nn.Module):
    """A frozen causal LM asked for next-token logits (rho1-wmtp's reference)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def next_token_logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=ids, use_cache=False).logits


class TextReward(nn.Module):
    """A reward model with its own tokenizer: each sequence's text (its real tokens, decoded with
    the base tokenizer) re-tokenized with the reward model's tokenizer and scored. A sequence
    classifier's score is its first logit; a causal LM's is minus its mean next-token loss."""

    def __init__(self, model: nn.Module, tokenizer: Any, base_tokenizer: Any, causal: bool) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.base_tokenizer = base_tokenizer
        self.causal = causal
        if getattr(tokenizer, "pad_token_id", None) is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        cfg = model.config
        limit = next((getattr(cfg, k) for k in ("max_position_embeddings", "n_positions")
                      if isinstance(getattr(cfg, k, None), int)), 512)
        self.max_length = min(int(limit), int(getattr(tokenizer, "model_max_length", limit) or limit))

    def score(self, ids: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        from wmtp_core.engine.algorithms import next_token_ce, valid_positions

        n = lengths.tolist() if lengths is not None else [ids.shape[1]] * ids.shape[0]
        texts = [self.base_tokenizer.decode(row[:k].tolist(), skip_special_tokens=True)
                 for row, k in zip(ids.cpu(), n)]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                             max_length=self.max_length)
        device = next(self.model.parameters()).device
        enc = {k: v.to(device) for k, v in enc.items()}
        if not self.causal:
            return self.model(**enc).logits[:, 0].float().to(ids.device)
        tokens, real = enc["input_ids"], enc["attention_mask"].sum(dim=1)
        ce = next_token_ce(self.model(input_ids=tokens, attention_mask=enc["attention_mask"]).logits,
                           tokens, real)
        count = valid_positions(tokens, real)[:, 1:].sum(dim=1).clamp_min(1)
        return (-ce[:, :-1].sum(dim=1) / count).float().to(ids.device)
