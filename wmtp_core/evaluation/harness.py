"""A model evaluated on code tasks: completions generated problem after problem while a bounded
pool of sandboxed programs scores the ones already generated; pass@k per task, named as WMTP
logs them (``eval/<task>/pass_at_<k>``: MLflow refuses ``@`` in a metric's name)."""

from __future__ import annotations

import concurrent.futures as cf
import os
import zlib
from typing import Callable, Iterable, Mapping

from wmtp_core.evaluation import sandbox, score, tasks
from wmtp_core.evaluation.generation import Model, Sampling, Speed, complete


def problem_seed(seed: int, task_id: str) -> int:
    """The seed of one problem's samples: the same whichever problems run with it."""
    return (seed * 1_000_003 + zlib.crc32(task_id.encode())) % (1 << 62)


def run(model: Model, problems: Mapping[str, tasks.Problem], sampling: Sampling, limits: sandbox.Limits,
        workers: int | None = None, speed: Speed | None = None,
        done: Callable[[str], None] | None = None) -> list[score.Sample]:
    """Every problem's ``sampling.n`` completions, each run in the sandbox; in problem order."""
    futures: list[cf.Future] = []
    with cf.ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1, thread_name_prefix="wmtp-eval") as pool:
        for tid, problem in problems.items():
            task = score.task_of(tid)
            for text in complete(model, problem.prompt, sampling, tasks.STOPS[task],
                                 problem_seed(sampling.seed, tid), speed):
                futures.append(pool.submit(score.one, tid, text, problem, limits))
            if done is not None:
                done(tid)
        return [f.result() for f in futures]


def metrics(summary: Mapping[str, dict], speed: Speed | None = None) -> dict[str, float]:
    """``{"eval/mbpp/pass_at_1": ..., ...}`` from :func:`score.summary`; with speculative decoding
    also the mean accepted length (tokens per forward pass of the base model)."""
    out = {f"eval/{task}/pass_at_{k}": float(v) for task, s in summary.items() for k, v in s["pass@k"].items()}
    if speed is not None and speed.forwards:
        out["eval/tokens_per_forward"] = round(speed.accepted, 4)
    return out


def limited(problems: Mapping[str, tasks.Problem], limit: int | None) -> dict[str, tasks.Problem]:
    """The first ``limit`` problems of each task (all of them when ``limit`` is None)."""
    if not limit:
        return dict(problems)
    kept: dict[str, tasks.Problem] = {}
    seen: dict[str, int] = {}
    for tid, p in problems.items():
        task = score.task_of(tid)
        if seen.get(task, 0) < limit:
            kept[tid], seen[task] = p, seen.get(task, 0) + 1
    return kept


def task_names(names: Iterable[str]) -> list[str]:
    return [n.strip() for n in names if n.strip()]
