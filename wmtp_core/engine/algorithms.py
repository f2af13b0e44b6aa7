"""Training objectives: per-head cross-entropy and the weighting each algorithm chooses.

Per position t the loss is l_t = sum_k w_tk m_tk CE_tk / sum_k w_tk m_tk, averaged over the
positions where some head has a target; ``m`` masks heads whose target lies past the end.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F


def head_targets(ids: torch.Tensor, n_future: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets ``[B, K, T]`` (head k at t -> ids[t+k+1]) and the mask of those that exist."""
    b, t = ids.shape
    targets = torch.zeros(b, n_future, t, dtype=ids.dtype, device=ids.device)
    mask = torch.zeros(b, n_future, t, dtype=torch.bool, device=ids.device)
    for k in range(n_future):
        shift = k + 1
        if shift < t:
            targets[:, k, : t - shift] = ids[:, shift:]
            mask[:, k, : t - shift] = True
    return targets, mask


def head_ce(logits: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy per head and position ``[B, K, T]`` (0 where masked), and the mask."""
    b, k, t, v = logits.shape
    targets, mask = head_targets(ids, k)
    ce = F.cross_entropy(logits.reshape(-1, v), targets.reshape(-1), reduction="none").view(b, k, t)
    return ce * mask, mask


def weighted_loss(ce: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The WMTP loss for given weights ``[B, K, T]`` (weights carry no gradient)."""
    wm = weights.detach() * mask
    denom = wm.sum(dim=1)
    valid = denom > 0
    per_pos = (wm * ce).sum(dim=1) / denom.clamp_min(1e-12)
    return per_pos[valid].mean()


def head_metrics(ce: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    per_head = ce.sum(dim=(0, 2)) / mask.sum(dim=(0, 2)).clamp_min(1)
    return {f"ce_head_{k}": float(v) for k, v in enumerate(per_head)}


class BaselineMTP:
    """baseline-mtp: every head weighs 1; the loss is scaled by ``loss.lambda``."""

    name = "baseline-mtp"

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale

    def loss(self, model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        ce, mask = head_ce(model(ids), ids)
        loss = self.scale * weighted_loss(ce, mask, torch.ones_like(ce))
        return loss, head_metrics(ce.detach(), mask)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


ALGORITHMS = ("baseline-mtp", "rho1-wmtp", "critic-wmtp")
