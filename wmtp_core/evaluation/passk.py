"""pass@k with the unbiased estimator of Chen et al. 2021 ("Evaluating Large Language Models
Trained on Code", section 2.1): from ``n`` samples of a problem of which ``c`` pass,

    pass@k = 1 - C(n - c, k) / C(n, k)

the probability that at least one of ``k`` samples drawn without replacement from the ``n``
passes. Computed as the paper's numerically stable product, averaged over problems."""

from __future__ import annotations

from typing import Iterable, Mapping

from wmtp_core.errors import ConfigError


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate for one problem: ``n`` samples, ``c`` correct, ``k`` drawn."""
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"pass@k needs 0 <= c <= n and k >= 1, not n={n}, c={c}, k={k}")
    if k > n:
        raise ConfigError(f"--k {k}: a problem has {n} samples; accepted: k from 1 to n ({n})")
    if n - c < k:
        return 1.0
    estimate = 1.0
    for i in range(n - c + 1, n + 1):
        estimate *= 1.0 - k / i
    return 1.0 - estimate


def parse_ks(text: str) -> tuple[int, ...]:
    """``"1,10"`` -> ``(1, 10)``; a value that is not a positive integer is one line naming it."""
    ks = []
    for part in str(text).split(","):
        part = part.strip()
        if not part.isdigit() or int(part) < 1:
            raise ConfigError(f"--k {text}: {part!r} is not a positive integer; accepted: positive integers "
                              "separated by commas, e.g. 1,10")
        ks.append(int(part))
    return tuple(sorted(set(ks)))


def summarize(results: Mapping[str, Iterable[bool]], ks: Iterable[int]) -> dict:
    """``{task id: [passed, ...]}`` -> ``{"problems", "n", "pass@k": {k: mean over problems}}``.
    Every problem must have at least ``max(ks)`` samples (one line naming the first that has
    fewer); ``n`` is the fewest samples of a problem."""
    counts = {tid: (len(r), sum(r)) for tid, r in ((t, list(v)) for t, v in results.items())}
    if not counts:
        return {"problems": 0, "n": 0, "pass@k": {}}
    ks = sorted(set(ks))
    for tid, (n, _) in counts.items():
        if ks and ks[-1] > n:
            raise ConfigError(f"--k {ks[-1]}: {tid} has {n} samples; accepted: k from 1 to the samples of "
                              f"every problem ({min(n for n, _ in counts.values())})")
    scores = {k: sum(pass_at_k(n, c, k) for n, c in counts.values()) / len(counts) for k in ks}
    return {"problems": len(counts), "n": min(n for n, _ in counts.values()), "pass@k": scores}
