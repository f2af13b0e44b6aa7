"""Statistics of the global batch, whichever ranks hold its rows. A data-parallel step must
compute what one process computes on the whole batch: every sum, count and spread that a loss
or its weights use is summed over the ranks (one collective each), and each rank's loss is its
share of the global mean, scaled so that the mean of the ranks' gradients (what FSDP reduces)
is the gradient of the global mean."""

from __future__ import annotations

import torch


class Ranks:
    """The ranks that hold a batch's rows: here one process holds the whole batch. The trainer
    gives an algorithm its world instead (:class:`wmtp_core.engine.distributed.World`), whose
    ``total`` sums over every rank."""

    size = 1

    def total(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the ranks (no gradient)."""
        return t.detach()


ONE = Ranks()


def global_mean(total: torch.Tensor, count: torch.Tensor, ranks: Ranks = ONE) -> tuple[torch.Tensor, float]:
    """This rank's share of a mean over the global batch, given this rank's sum of the values and
    their count: ``total * size / global count``, so that averaging the ranks' shares (and
    their gradients) gives the global mean; and the global mean's value. Every rank calls it
    (one collective), whether or not it holds values. A global count of 0 gives 0."""
    both = ranks.total(torch.stack([total.detach().float(), count.detach().float()]))
    n = float(both[1])
    if n == 0:
        return total * 0.0, 0.0
    return total * (ranks.size / n), float(both[0]) / n


def zscore(x: torch.Tensor, ranks: Ranks = ONE) -> torch.Tensor:
    """``x`` standardised over the global batch: its mean, then the spread about it (two passes,
    in float64: rewards close together lose their spread to cancellation in one)."""
    x64 = x.double()
    count = torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device)
    total, n = ranks.total(torch.stack([x64.sum(), count])).tolist()
    if n < 2:
        return x
    centred = x64 - total / n
    spread = float(ranks.total(torch.stack([(centred * centred).sum()]))[0])
    return (centred / ((spread / (n - 1)) ** 0.5 + 1e-6)).to(x.dtype)
