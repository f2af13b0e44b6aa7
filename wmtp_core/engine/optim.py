"""Optimiser and learning-rate schedule from the recipe's ``optim`` section."""

from __future__ import annotations

import math

import torch

from wmtp_core.config.schema import Optim


def build_optimizer(params, cfg: Optim) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas), foreach=False
    )


class Schedule:
    """Linear warm-up, then constant, linear or cosine decay to 10% of the peak. Picklable-free:
    the scheduler's state is just its step counter."""

    def __init__(self, kind: str, total_steps: int, warmup_ratio: float) -> None:
        self.kind = kind
        self.total = max(1, total_steps)
        self.warmup = int(warmup_ratio * self.total)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        if self.kind == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        if self.kind == "linear":
            return 1.0 - 0.9 * progress
        return 0.1 + 0.45 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Optim, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, Schedule(cfg.scheduler, total_steps, cfg.warmup_ratio)
    )
