"""Training objectives: per-head cross-entropy and the weighting each algorithm chooses.

Per position t the loss is l_t = sum_k w_tk m_tk CE_tk / sum_k w_tk m_tk, averaged over the
positions where some head has a target; ``m`` masks heads whose target lies past the end of the
sequence (its length, when a batch holds padded sequences). Weights never carry gradient.

Every statistic of a batch is one of the global batch, whichever ranks hold its rows: the mean
over positions, the mean weight of ``mean1.0_clip`` and the rewards' z-score sum over all ranks
(:class:`Ranks`). Each rank's loss is its share of the global mean, scaled so that the mean of
the ranks' gradients (what FSDP reduces) is the gradient of the global mean: two ranks train
exactly what one process trains on the whole batch, however the rows' lengths fall.

A model here is any module with ``forward(ids) -> [B, K, T, V]``, ``next_token_logits(ids)``,
``hidden(ids) -> [B, T, d]`` and ``logits_and_hidden(ids)``: the byte-level ``MTPModel`` and the
Hugging Face ``HFMTPModel`` alike.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from wmtp_core.engine.global_batch import ONE, Ranks, global_mean, zscore

ALGORITHMS = ("baseline-mtp", "rho1-wmtp", "critic-wmtp")


# --------------------------------------------------------------------------- shared pieces
def valid_positions(ids: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """``[B, T]``: True where the position holds a real token (not padding)."""
    b, t = ids.shape
    if lengths is None:
        return torch.ones(b, t, dtype=torch.bool, device=ids.device)
    return torch.arange(t, device=ids.device).unsqueeze(0) < lengths.to(ids.device).unsqueeze(1)


def head_targets(ids: torch.Tensor, n_future: int,
                 lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets ``[B, K, T]`` (head k at t -> ids[t+k+1]) and the mask of those that exist (within
    each sequence's ``lengths`` when given)."""
    b, t = ids.shape
    real = valid_positions(ids, lengths)
    targets = torch.zeros(b, n_future, t, dtype=ids.dtype, device=ids.device)
    mask = torch.zeros(b, n_future, t, dtype=torch.bool, device=ids.device)
    for k in range(n_future):
        shift = k + 1
        if shift < t:
            targets[:, k, : t - shift] = ids[:, shift:]
            mask[:, k, : t - shift] = real[:, shift:]
    return targets, mask


def head_ce(logits: torch.Tensor, ids: torch.Tensor,
            lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy per head and position ``[B, K, T]`` (0 where masked), and the mask."""
    b, k, t, v = logits.shape
    targets, mask = head_targets(ids, k, lengths)
    ce = F.cross_entropy(logits.float().reshape(-1, v), targets.reshape(-1), reduction="none").view(b, k, t)
    return ce * mask, mask


def next_token_ce(logits: torch.Tensor, ids: torch.Tensor,
                  lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy ``[B, T]`` from head-0 logits ``[B, T, V]`` (0 at the last
    position, and wherever the target is padding)."""
    b, t, v = logits.shape
    ce = torch.zeros(b, t, device=ids.device)
    if t > 1:
        ce[:, :-1] = F.cross_entropy(logits[:, :-1].float().reshape(-1, v), ids[:, 1:].reshape(-1),
                                     reduction="none").view(b, t - 1)
        if lengths is not None:
            ce[:, :-1] = ce[:, :-1] * valid_positions(ids, lengths)[:, 1:]
    return ce


def weighted_loss(ce: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor,
                  epsilon: float = 1e-12, ranks: Ranks = ONE) -> torch.Tensor:
    """The WMTP loss for given weights ``[B, K, T]`` (this rank's share of the global batch's,
    :func:`global_mean`); ``epsilon`` guards the denominator."""
    wm = weights.detach() * mask
    denom = wm.sum(dim=1)
    valid = denom > 0
    per_pos = (wm * ce).sum(dim=1) / denom.clamp_min(max(epsilon, 1e-12))
    share, _ = global_mean((per_pos * valid).sum(), valid.sum(), ranks)
    return share


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor, temperature: float,
                   max_weight: float | None = None) -> torch.Tensor:
    """Softmax over heads (dim 1) of ``scores / temperature``; masked heads get 0; each weight
    is capped at ``max_weight`` (``loss.max_weight``) when given."""
    x = (scores / temperature).masked_fill(~mask, float("-inf"))
    w = torch.softmax(x, dim=1)
    w = torch.where(mask, w, torch.zeros_like(w))
    return w.clamp(max=max_weight) if max_weight is not None else w


def finish_weights(scores: torch.Tensor, mask: torch.Tensor, temperature: float,
                   max_weight: float | None, norm: str = "softmax", ranks: Ranks = ONE) -> torch.Tensor:
    """Head weights from scores, as ``loss.weight_norm`` says: ``softmax`` over heads with each
    weight capped at ``max_weight``; ``mean1.0_clip``: the softmax weights scaled so their mean over
    every valid (position, head) of the global batch is 1, then clipped at ``max_weight``;
    ``none``: the softmax weights, uncapped."""
    if norm == "softmax":
        return masked_softmax(scores, mask, temperature, max_weight)
    w = masked_softmax(scores, mask, temperature)
    if norm == "mean1.0_clip":
        _, mean = global_mean((w * mask).sum(), mask.sum(), ranks)
        if mean > 0:
            w = w / max(mean, 1e-12)
            if max_weight is not None:
                w = w.clamp(max=max_weight)
    return w


def head_metrics(ce: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    per_head = ce.sum(dim=(0, 2)) / mask.sum(dim=(0, 2)).clamp_min(1)
    return {f"ce_head_{k}": float(v) for k, v in enumerate(per_head)}


def weight_metrics(w: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    v = w[mask].float()
    if v.numel() == 0:
        return {}
    return {"weight_mean": float(v.mean()), "weight_std": float(v.std()) if v.numel() > 1 else 0.0,
            "weight_min": float(v.min()), "weight_max": float(v.max()),
            "weight_zero_frac": float((v == 0).float().mean())}


def shifted(x: torch.Tensor, n_future: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``out[b, k, t] = x[b, t + k + offset]`` where that index exists, and its validity."""
    b, t = x.shape
    out = torch.zeros(b, n_future, t, dtype=x.dtype, device=x.device)
    ok = torch.zeros(b, n_future, t, dtype=torch.bool, device=x.device)
    for k in range(n_future):
        s = k + offset
        if s < t:
            out[:, k, : t - s] = x[:, s:]
            ok[:, k, : t - s] = True
    return out, ok


class Algorithm:
    """What the trainer asks of an objective. Extras (``param_groups``, ``state_dict``) are part
    of the resume state."""

    name = ""
    ranks: Ranks = ONE
    """Which ranks hold the batch's rows: the trainer sets its world here."""

    def loss(self, model: nn.Module, ids: torch.Tensor,
             lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """The weighted loss of a batch and its metrics; ``lengths``: each sequence's real tokens
        when the batch is padded."""
        raise NotImplementedError

    def param_groups(self) -> list[dict[str, Any]]:
        return []

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass

    def to(self, device: torch.device) -> Algorithm:
        return self


# --------------------------------------------------------------------------- baseline
class BaselineMTP(Algorithm):
    """baseline-mtp: every head weighs 1; the loss is scaled by ``loss.lambda``."""

    name = "baseline-mtp"

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale

    def loss(self, model, ids, lengths=None):
        ce, mask = head_ce(model(ids), ids, lengths)
        loss = self.scale * weighted_loss(ce, mask, torch.ones_like(ce), ranks=self.ranks)
        return loss, head_metrics(ce.detach(), mask)


# --------------------------------------------------------------------------- rho-1
class Rho1WMTP(Algorithm):
    """rho1-wmtp: weight each head's token by how much the model's CE differs from a frozen
    reference's CE on the same target token.

    The reference is asked for next-token CE only: its prediction at position ``t + k`` has the
    same target (token ``t + k + 1``) as head ``k`` at position ``t``.
    """

    name = "rho1-wmtp"

    def __init__(self, reference: nn.Module, *, mode: str, min_ce_diff: float,
                 skip_percentile: float, temperature: float, max_weight: float | None = None,
                 epsilon: float = 1e-8, norm: str = "softmax") -> None:
        self.reference = reference.eval().requires_grad_(False)
        self.max_weight = max_weight
        self.norm = norm
        self.epsilon = epsilon
        self.mode = mode
        self.min_ce_diff = min_ce_diff
        self.skip_percentile = skip_percentile
        self.temperature = temperature

    def to(self, device):
        self.reference.to(device)
        return self

    def weights(self, ce: torch.Tensor, mask: torch.Tensor, ids: torch.Tensor,
                lengths: torch.Tensor | None = None) -> torch.Tensor:
        with torch.no_grad():
            ref0 = next_token_ce(self.reference.next_token_logits(ids), ids, lengths)
            ref, ok = shifted(ref0, ce.shape[1], 0)
            excess = (ce.detach() - ref).abs() * (mask & ok)
            excess = torch.where(excess < self.min_ce_diff, torch.zeros_like(excess), excess)
            if self.mode == "weighted":
                return finish_weights(excess, mask, self.temperature, self.max_weight, self.norm, self.ranks)
            return self._skip(excess, mask)

    def _skip(self, excess: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Drop each sample's lowest ``skip_threshold_percentile`` of excess values (rank-based,
        so ties never drop more than that share)."""
        w = mask.float()
        flat_e, flat_m, flat_w = excess.flatten(1), mask.flatten(1), w.flatten(1)
        for b in range(excess.shape[0]):
            idx = flat_m[b].nonzero().squeeze(1)
            n_drop = int(self.skip_percentile * idx.numel())
            if n_drop:
                order = torch.argsort(flat_e[b, idx], stable=True)
                flat_w[b, idx[order[:n_drop]]] = 0.0
        return flat_w.view_as(w)

    def loss(self, model, ids, lengths=None):
        ce, mask = head_ce(model(ids), ids, lengths)
        w = self.weights(ce, mask, ids, lengths)
        metrics = {**head_metrics(ce.detach(), mask), **weight_metrics(w, mask)}
        return weighted_loss(ce, mask, w, self.epsilon, self.ranks), metrics


# --------------------------------------------------------------------------- critic
class ValueHead(nn.Module):
    """Linear d -> d/2, ReLU, Linear -> 1 on the trunk's hidden states."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_model, max(1, d_model // 2)), nn.ReLU(),
                                 nn.Linear(max(1, d_model // 2), 1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # a new tensor rather than a view (squeeze): FSDP hooks its backward on the output
        return self.net(h).sum(dim=-1)


def gae_returns(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """Generalised advantage estimation per sequence; returns = advantages + values ``[B, T]``."""
    b, t = rewards.shape
    adv = torch.zeros_like(rewards)
    running = torch.zeros(b, device=rewards.device)
    for i in reversed(range(t)):
        next_v = values[:, i + 1] if i + 1 < t else torch.zeros(b, device=rewards.device)
        delta = rewards[:, i] + gamma * next_v - values[:, i]
        running = delta + gamma * lam * running
        adv[:, i] = running
    return adv + values


def lm_score(lm: nn.Module, ids: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """A sequence's score under a causal LM (anything with ``next_token_logits``): minus its mean
    next-token CE over its real tokens ``[B]``. Leaves ``lm``'s mode and gradients as they are."""
    ce = next_token_ce(lm.next_token_logits(ids), ids, lengths)
    if ids.shape[1] < 2:
        return -ce.mean(dim=1)
    n = (valid_positions(ids, lengths)[:, 1:].sum(dim=1) if lengths is not None
         else torch.full((ids.shape[0],), ids.shape[1] - 1, device=ids.device))
    return -ce[:, :-1].sum(dim=1) / n.clamp_min(1)


class LMReward(nn.Module):
    """A frozen causal LM as a reward model: :func:`lm_score`."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm.eval().requires_grad_(False)

    def score(self, ids: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        return lm_score(self.lm, ids, lengths)


class CriticWMTP(Algorithm):
    """critic-wmtp: a value head learns GAE returns of sequence rewards; head weights follow
    δ_t = V_t − λ_d V_{t−1} at each head's target position.

    Rewards: a sequence's reward is the reward model's score of it (``paths.models.rm``: minus its
    mean next-token CE for a causal LM, the classifier's score for a sequence-classification
    model), or, without one (pseudo-rewards), minus its mean next-token CE under the model being
    trained, measured without gradient. ``critic.normalize`` standardises rewards over the batch;
    ``critic.token_spread`` spreads each reward uniformly over the real tokens or puts it on the
    last one (``gae``: on the last one, for GAE to carry back).
    """

    name = "critic-wmtp"

    def __init__(self, d_model: int, critic: Any, temperature: float, reward: nn.Module | None = None,
                 max_weight: float | None = None, epsilon: float = 1e-8, norm: str = "softmax"):
        self.cfg = critic
        self.temperature = temperature
        self.max_weight = max_weight
        self.epsilon = epsilon
        self.norm = norm
        self.value_head = ValueHead(d_model)
        self.reward = reward.eval().requires_grad_(False) if reward is not None else None
        self.pretrained = False

    def to(self, device):
        self.value_head.to(device)
        if self.reward is not None:
            self.reward.to(device)
        return self

    def param_groups(self):
        return [{"params": list(self.value_head.parameters()), "lr": self.cfg.value_lr}]

    value_head_in_model = False
    """Under FSDP the value head is sharded as a unit of the model and saved with its shards, so
    it is not part of this state."""

    def state_dict(self):
        if self.value_head_in_model:
            return {"pretrained": self.pretrained}
        return {"value_head": self.value_head.state_dict(), "pretrained": self.pretrained}

    def load_state_dict(self, state):
        if not self.value_head_in_model:
            self.value_head.load_state_dict(state["value_head"])
        self.pretrained = bool(state["pretrained"])

    def rewards(self, model: nn.Module, ids: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Per-token rewards ``[B, T]`` (0 on padding)."""
        with torch.no_grad():
            seq = (self.reward.score(ids, lengths) if self.reward is not None
                   else lm_score(model, ids, lengths)).float()
            if self.cfg.normalize == "zscore":  # over the global batch (every rank calls these)
                seq = zscore(seq, self.ranks)
            b, t = ids.shape
            real = valid_positions(ids, lengths)
            n = real.sum(dim=1).clamp_min(1)
            r = torch.zeros(b, t, device=ids.device)
            if self.cfg.token_spread in ("last", "gae"):
                r[torch.arange(b, device=ids.device), n - 1] = seq
            else:
                r = (seq / n).unsqueeze(1) * real
        return r

    def value_loss(self, model: nn.Module, ids: torch.Tensor, h: torch.Tensor | None = None,
                   lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
        """This rank's share of the value loss (:func:`global_mean`), the values, and the global
        batch's value loss."""
        if h is None:
            with torch.no_grad():
                h = model.hidden(ids)
        v = self.value_head(h)
        returns = gae_returns(self.rewards(model, ids, lengths), v.detach(), self.cfg.gamma, self.cfg.gae_lambda)
        real = valid_positions(ids, lengths)
        share, value = global_mean(((v - returns) ** 2 * real).sum(), real.sum(), self.ranks)
        return share, v, value

    def loss(self, model, ids, lengths=None):
        logits, h = model.logits_and_hidden(ids)
        ce, mask = head_ce(logits, ids, lengths)
        vloss, v, vvalue = self.value_loss(model, ids, h, lengths)
        with torch.no_grad():
            vd = v.detach()
            prev = torch.cat([torch.zeros_like(vd[:, :1]), vd[:, :-1]], dim=1)
            delta = vd - self.cfg.discount_lambda * prev
            score, ok = shifted(delta, ce.shape[1], 1)
            w = finish_weights(score, mask & ok, self.temperature, self.max_weight, self.norm, self.ranks)
        loss = weighted_loss(ce, mask, w, self.epsilon, self.ranks) + self.cfg.auxiliary_loss_coef * vloss
        metrics = {**head_metrics(ce.detach(), mask), **weight_metrics(w, mask),
                   "value_loss": vvalue}
        return loss, metrics
