"""The process a run's background evaluation runs in (:mod:`wmtp_core.evaluating`): started once
per run, it reads one job after another (JSON files named on stdin: the checkpoint URI, the
run's config and recipe, where to write the result), evaluates the checkpoint as ``wmtp
evaluate`` would with the recipe's ``eval:`` settings, and writes ``{"metrics": {...}}`` or
``{"error": "one line"}`` to the result file. It runs niced, with one torch thread, so the
training process keeps the machine."""

from __future__ import annotations

import json
import os
import sys


def evaluate(job: dict) -> dict:
    import torch

    from wmtp_core.config import load_settings
    from wmtp_core.evaluation import harness, passk, sandbox, score
    from wmtp_core.evaluation.generation import Sampling, Speed, open_model
    from wmtp_core.plugins import make_plugin_manager
    from wmtp_core.cli.evaluate import loader

    torch.set_num_threads(1)
    settings = load_settings(job.get("config"), job.get("recipe"))
    section = settings.recipe.eval
    s = section.sampling
    sampling = Sampling(n=s.n, temperature=s.temperature, top_p=s.top_p, max_new_tokens=s.max_new_tokens,
                        seed=s.seed, speculative=section.speculative)
    ks = passk.parse_ks(",".join(str(k) for k in section.k))
    datasets = settings.config.paths.datasets
    names = [t for t in section.task_list() if t != "codecontests" or datasets.get("codecontests")]
    problems = harness.limited(score.resolve(names, datasets.get("mbpp"), datasets.get("codecontests")), section.limit)
    pm = make_plugin_manager()
    model = open_model(job["uri"], settings, loader(pm, settings))
    speed = Speed()
    results = harness.run(model, problems, sampling, sandbox.Limits(timeout=section.timeout), section.workers, speed)
    summary = score.summary(results, ks)
    return {"metrics": harness.metrics(summary, speed if sampling.speculative else None),
            "problems": {task: v["problems"] for task, v in summary.items()}}


def one(path: str) -> None:
    """The job in the file ``path``: its result file written whole, whatever happens."""
    with open(path) as f:
        job = json.load(f)
    try:
        out = evaluate(job)
    except Exception as e:  # noqa: BLE001 - reported to the run in one line
        from wmtp_core.errors import first_line

        out = {"error": f"{type(e).__name__}: {first_line(e, 300)}"}
    tmp = job["result"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f)
    os.replace(tmp, job["result"])


def main() -> int:
    """Jobs, one file name a line on stdin, each acknowledged on stdout once its result is
    written; the run closes stdin (or kills the process group) when it is done."""
    try:
        os.nice(10)
    except OSError:
        pass
    for line in sys.stdin:
        if line.strip():
            one(line.strip())
            sys.stdout.write(line)
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
