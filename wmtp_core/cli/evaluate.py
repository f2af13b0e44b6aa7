"""``wmtp evaluate`` and ``wmtp generate``.

``wmtp evaluate SOURCE`` samples completions from a model (a committed checkpoint, resume state
or final model, on any sink; ``models:/NAME/VERSION``; a Hugging Face folder) and scores them
on MBPP and HumanEval, every program run in the sandbox of :mod:`wmtp_core.evaluation.sandbox`;
``--samples`` scores completions written elsewhere, ``--canonical`` the benchmarks' own
solutions. ``wmtp generate SOURCE`` prints a completion. See docs/evaluation.md.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console

from wmtp_core.errors import ConfigError


def add_parser(sub) -> None:
    ev = sub.add_parser("evaluate", help="pass@k on MBPP and HumanEval, every program run in a sandbox")
    ev.add_argument("source", nargs="?", metavar="SOURCE",
                    help="a committed checkpoint URI, models:/NAME/VERSION, or a Hugging Face model folder")
    ev.add_argument("--samples", metavar="FILE.jsonl",
                    help="score these completions instead (one JSON object a line with task_id and completion)")
    ev.add_argument("--canonical", action="store_true", help="score the benchmarks' own solutions")
    ev.add_argument("--tasks", default="mbpp,humaneval",
                    help="mbpp[:split], humaneval, codecontests[:split], comma-separated")
    ev.add_argument("--mbpp", metavar="PATH", help="MBPP: a folder of train/validation/test.json, or one file")
    ev.add_argument("--codecontests", metavar="PATH", help="CodeContests: a folder of <split>.jsonl files, or one")
    ev.add_argument("--config", metavar="PATH",
                    help="a config: paths.datasets.mbpp, the storage options, and the MLflow run to log to")
    ev.add_argument("--k", default="1", help="pass@k for these k, comma-separated (default 1)")
    _sampling_options(ev, n=True)
    ev.add_argument("--limit", type=int, metavar="N", help="the first N problems of each task")
    ev.add_argument("--timeout", type=float, default=3.0, metavar="S", help="seconds a program may run (3)")
    ev.add_argument("--workers", type=int, metavar="N", help="programs run at once (default: the CPUs)")
    ev.add_argument("--out", metavar="FILE.jsonl", help="every sample with its result (default: none)")
    ev.add_argument("--json", action="store_true", help="the summary as one JSON object on stdout")
    ev.add_argument("--allow-code-execution", action="store_true",
                    help="run the generated programs (required: they are code nobody reviewed)")
    ev.set_defaults(func=cmd_evaluate)
    gen = sub.add_parser("generate", help="complete a prompt with a model (optionally speculative decoding)")
    gen.add_argument("source", metavar="SOURCE",
                     help="a committed checkpoint URI, models:/NAME/VERSION, or a Hugging Face model folder")
    what = gen.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", metavar="TEXT", help="the prompt")
    what.add_argument("--prompts", metavar="FILE", help="a file of prompts, one JSON string or object "
                      '{"prompt": ...} a line')
    gen.add_argument("--config", metavar="PATH", help="a config: storage options, MLflow registry")
    _sampling_options(gen, n=False)
    gen.set_defaults(func=cmd_generate)


def _sampling_options(p, n: bool) -> None:
    if n:
        p.add_argument("--n", type=int, default=1, metavar="N", help="completions per problem (default 1)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0: greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling (default 1)")
    p.add_argument("--max-new-tokens", type=int, default=512, metavar="N", help="at most N new tokens (512)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="the samples' seed (default 0)")
    p.add_argument("--speculative", action="store_true",
                   help="greedy decoding drafted by the extra heads, verified by the base model (lossless)")


def _settings(args):
    from wmtp_core.config import load_settings

    return load_settings(args.config)


def _check(args) -> None:
    chosen = [name for name, given in (("SOURCE", args.source), ("--samples", args.samples),
                                       ("--canonical", args.canonical)) if given]
    if len(chosen) != 1:
        raise ConfigError(f"wmtp evaluate: {' and '.join(chosen) or 'nothing to evaluate'}; accepted: one of "
                          "SOURCE (a model), --samples FILE.jsonl, --canonical")
    if not args.allow_code_execution:
        raise ConfigError("wmtp evaluate runs the programs it scores, which nobody reviewed; accepted: "
                          "--allow-code-execution (read docs/evaluation.md on what the sandbox does not stop)")
    for key, value in (("--timeout", args.timeout), ("--limit", args.limit), ("--workers", args.workers)):
        if value is not None and not 0 < value <= 10_000:
            raise ConfigError(f"{key} {value}: out of range; accepted: a number above 0, at most 10000")


def _sampling(args, n: int):
    from wmtp_core.evaluation.generation import Sampling

    return Sampling(n=n, temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                    seed=args.seed, speculative=args.speculative)


def loader(pm, settings):
    """How a source is read: through ``wmtp_load_model`` (plugins first: ``models:/``), except a
    committed checkpoint on a protocol the config's storage binds with options (an S3 endpoint,
    credentials), read by the core's verified reader with those options."""
    from wmtp_core.checkpoint_models import load_model_from_checkpoint
    from wmtp_core.engine.model_sources import options_for
    from wmtp_core.session import model_loader

    hook = model_loader(pm, settings.mlflow or {})

    def load(uri: str):
        options = {} if uri.startswith("models:/") else options_for(uri, settings)
        return load_model_from_checkpoint(uri, options) if options else hook(uri)

    return load


def _model(args, settings):
    from wmtp_core.evaluation.generation import open_model
    from wmtp_core.plugins import make_plugin_manager

    pm = make_plugin_manager()
    return pm, open_model(args.source, settings, loader(pm, settings))


def cmd_evaluate(args, out: Console, err: Console) -> int:
    from wmtp_core.evaluation import harness, passk, sandbox, score
    from wmtp_core.evaluation.generation import Speed

    _check(args)
    ks = passk.parse_ks(args.k)
    settings = _settings(args)
    sampling = _sampling(args, args.n) if args.source else None
    if sampling is not None and max(ks) > sampling.n:
        raise ConfigError(f"--k {args.k}: pass@{max(ks)} needs at least {max(ks)} samples a problem; "
                          f"accepted: k at most --n {sampling.n}, or a larger --n")
    datasets = settings.config.paths.datasets
    problems = harness.limited(score.resolve(harness.task_names(args.tasks.split(",")), args.mbpp or datasets.get("mbpp"),
                                             args.codecontests or datasets.get("codecontests")), args.limit)
    isolated, how = sandbox.isolation()
    err.print(f"sandbox: {how}", highlight=False)
    limits, speed = sandbox.Limits(timeout=args.timeout), Speed()
    if args.source:
        pm, model = _model(args, settings)
        err.print(f"evaluating {args.source} ({len(problems)} problems, {sampling.n} "
                  f"sample{'s' if sampling.n > 1 else ''} each)", highlight=False)
        results = harness.run(model, problems, sampling, limits, args.workers, speed)
    else:
        samples = [(tid, p.canonical) for tid, p in problems.items()] if args.canonical else \
            [s for s in score.read_samples(args.samples) if s[0] in problems or not args.limit]
        results = score.score(samples, problems, limits, args.workers, cut=not args.canonical)
    summary = score.summary(results, ks)
    if args.out:
        import fsspec

        with fsspec.open(args.out, "w") as f:
            f.writelines(json.dumps(s.record()) + "\n" for s in results)
    if args.source:
        _report(pm, args, settings, harness.metrics(summary, speed if sampling.speculative else None), err)
    if args.json:
        sys.stdout.write(json.dumps({"tasks": summary, "sandbox": {"namespaces": isolated, "isolation": how},
                                     **_speed(speed, args)}) + "\n")
        return 0
    _table(out, summary, ks)
    if args.source:
        err.print(f"decoding: {speed.tokens} tokens in {speed.seconds:.1f} s, {speed.accepted:.2f} tokens per "
                  "forward pass of the base model", highlight=False)
    return 0


def _speed(speed, args) -> dict:
    if not args.source:
        return {}
    return {"source": args.source, "decoding": {"tokens": speed.tokens, "forwards": speed.forwards,
                                                "seconds": round(speed.seconds, 3),
                                                "tokens_per_forward": round(speed.accepted, 4)}}


def _report(pm, args, settings, metrics: dict, err: Console) -> None:
    """With a config (or a registered version): the metrics to the MLflow run that produced the
    checkpoint, at its step; a registered version is tagged with them."""
    from wmtp_core.events import CheckpointEvaluated
    from wmtp_core.roles import Role

    if not (args.config or args.source.startswith("models:/")) or not settings.mlflow:
        return
    manifest = checkpoint_of(args.source, settings)
    role = Role(manifest.role) if manifest is not None and manifest.role in ("resume", "final") else None
    event = CheckpointEvaluated(uri=args.source, step=manifest.step if manifest is not None else None,
                                metrics=metrics, role=role, lineage=manifest.lineage if manifest else None,
                                mlflow=dict(settings.mlflow))
    pm.hook.wmtp_checkpoint_evaluated(event=event)
    err.print(f"logged {', '.join(sorted(metrics))} to MLflow", highlight=False)


def checkpoint_of(uri: str, settings: Any) -> Any:
    """The manifest of the committed checkpoint at ``uri`` (its step, run and lineage), or
    ``None`` for a source that is no committed checkpoint."""
    import posixpath

    import fsspec

    from wmtp_core.commit import CheckpointStore
    from wmtp_core.engine.model_sources import options_for

    if uri.startswith("models:/"):
        return None
    try:
        fs, path = fsspec.core.url_to_fs(uri, **options_for(uri, settings))
        path = path.rstrip("/")
        if not fs.isfile(posixpath.join(path, "manifest.json")):
            return None
        return CheckpointStore(fs, posixpath.dirname(posixpath.dirname(path))).read_manifest(path)
    except Exception:  # noqa: BLE001 - only what a log line says depends on it
        return None


def _table(out: Console, summary: dict, ks) -> None:
    head = f"{'task':<12}{'problems':>10}{'n':>5}" + "".join(f"{f'pass@{k}':>10}" for k in ks)
    lines = [head] + [f"{task:<12}{s['problems']:>10}{s['n']:>5}"
                      + "".join(f"{s['pass@k'][k]:>10.4f}" for k in ks) for task, s in summary.items()]
    out.print("\n".join(lines), highlight=False)


def _prompts(args) -> list[str]:
    if args.prompt is not None:
        return [args.prompt]
    import fsspec

    from wmtp_core.bounded import read_bounded

    fs, path = fsspec.url_to_fs(args.prompts)
    data = read_bounded(fs, path, 1 << 28, "a file of prompts", where=args.prompts, error=ConfigError)
    prompts = []
    for i, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            raise ConfigError(f"{args.prompts}:{i}: not JSON; accepted: a JSON string or {{\"prompt\": ...}} "
                              "a line") from None
        value = value.get("prompt") if isinstance(value, dict) else value
        if not isinstance(value, str):
            raise ConfigError(f"{args.prompts}:{i}: no prompt string; accepted: a JSON string or "
                              '{"prompt": "..."} a line')
        prompts.append(value)
    return prompts


def cmd_generate(args, out: Console, err: Console) -> int:
    """The completion alone on stdout (one JSON string a line with ``--prompts``); statistics
    on stderr."""
    from wmtp_core.evaluation.generation import Speed, complete

    sampling = _sampling(args, 1)
    prompts = _prompts(args)
    _, model = _model(args, _settings(args))
    speed = Speed()
    for i, prompt in enumerate(prompts):
        text = complete(model, prompt, sampling, (), args.seed + i, speed)[0]
        sys.stdout.write((json.dumps(text) if args.prompts else text) + "\n")
        sys.stdout.flush()
    err.print(f"{speed.tokens} tokens in {speed.seconds:.2f} s ({speed.tokens / max(speed.seconds, 1e-9):.1f} "
              f"tokens/s), {speed.accepted:.2f} tokens per forward pass of the base model"
              f"{' (speculative)' if args.speculative else ''}", highlight=False)
    return 0
