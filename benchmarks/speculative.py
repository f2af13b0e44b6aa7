"""Self-speculative decoding (``wmtp_core.evaluation.speculative``): greedy decoding whose extra
heads draft the next tokens and whose base model verifies them, against plain greedy decoding, on
a tiny GPT-2 trained with WMTP itself, in one run.

A GPT-2 of 2 layers, 128 wide (random weights, seeded, the real GPT-2 tokenizer) is saved as a
Hugging Face folder declaring 4 linear heads; ``python -m wmtp_core.run`` trains it with
``baseline-mtp`` on MBPP's training split for :data:`STEPS` steps and stores the final model with
the ``local`` sink. Both the trained final model and the untrained folder (its extra heads are
copies of the LM head, meant as the floor) are opened with ``open_model``, as ``wmtp generate``
does, and complete the first :data:`PROMPTS` MBPP test prompts with :data:`MAX_NEW` new tokens
each, EOS and the task's stops not applied (every method decodes the same number of tokens), one
torch thread, by three methods: ``speculative.greedy`` (the KV-cache loop, one base forward a
token), ``speculative.speculative`` (the same loop verifying the drafts), and ``transformers``'
``generate(do_sample=False)`` (the plain Hugging Face reference). The methods alternate their
order on each repetition (``--repeat``, at most 3); times are medians. Every prompt's speculative
tokens are compared with greedy's (and ``generate``'s with greedy's) on every repetition."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from storage import _row  # noqa: E402

HERE = Path(__file__).resolve().parent
ORIGIN = Path(__file__).resolve().parents[2] / "shared" / "origin-files"
MBPP = ORIGIN / "datasets" / "mbpp"
TOKENIZER_SOURCE = ORIGIN / "tests" / "test_models" / "distilgpt2-mtp"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json")
SEED = 0
N_FUTURE = 4
GPT2 = {"n_layer": 2, "n_embd": 128, "n_head": 4, "n_positions": 512}
STEPS = 300
"""Training steps: about 2 a second on 2 CPU cores at batch 1 x 128 tokens (4 heads over GPT-2's
50,257-token vocabulary are most of the cost), about 2.5 minutes with the run's start: 38k tokens,
about one pass over MBPP's training split."""
TRAIN = {"lr": 0.003, "batch_size": 1, "max_length": 128}
PROMPTS = 20
"""MBPP test prompts (27 to 115 GPT-2 tokens): each method takes 7 to 8 s for 20 prompts x 64
tokens on one thread, so 3 methods x 2 models x 3 repetitions take about 2.5 minutes."""
MAX_NEW = 64
FEWEST = 1 + -(-(MAX_NEW - 1) // N_FUTURE)
"""Base forwards for ``MAX_NEW`` tokens when every draft is accepted: the prompt's, which gives
the first token, then up to ``N_FUTURE`` tokens each (17 for 64 tokens: the ceiling is 3.76)."""
THREADS = 1
METHODS = ("greedy", "speculative", "hf_generate")


def _base_folder(target: Path) -> Path:
    """The untrained GPT-2 folder: random weights (seeded), GPT-2's tokenizer, 4 linear heads declared
    (``mtp_config``), so that opening it starts the extra heads as copies of the LM head."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(SEED)
    target.mkdir(parents=True)
    GPT2LMHeadModel(GPT2Config(**GPT2)).save_pretrained(target, safe_serialization=True)
    config = json.loads((target / "config.json").read_text())
    config["mtp_config"] = {"n_future_tokens": N_FUTURE, "head": "linear"}
    (target / "config.json").write_text(json.dumps(config, indent=2))
    for f in TOKENIZER_FILES:
        if (TOKENIZER_SOURCE / f).exists():
            shutil.copyfile(TOKENIZER_SOURCE / f, target / f)
            os.chmod(target / f, 0o644)
    return target


def _files(root: Path, base: Path) -> tuple[Path, Path]:
    """The run's config and recipe (JSON, which YAML reads)."""
    config = {"seed": SEED, "log_interval": 50, "mlflow": None,
              "paths": {"models": {"base": str(base)}, "datasets": {"mbpp": str(MBPP)},
                        "checkpoints": {"base_path": f"file://{root}/ck", "save_interval": 0, "keep_last": 1}},
              "storage": {"final": {"sink": "local"}}}
    recipe = {"run": {"name": "speculative"},
              "train": {"algo": "baseline-mtp", "max_steps": STEPS, "num_epochs": 1000},
              "optim": {"lr": TRAIN["lr"], "scheduler": "constant", "warmup_ratio": 0.0},
              "model": {"n_future": N_FUTURE, "head": "linear"},
              "data": {"train": {"sources": ["mbpp:train"], "max_length": TRAIN["max_length"],
                                 "batch_size": TRAIN["batch_size"]}}}
    (root / "c.yaml").write_text(json.dumps(config, indent=2))
    (root / "r.yaml").write_text(json.dumps(recipe, indent=2))
    return root / "c.yaml", root / "r.yaml"


def _train(root: Path, base: Path) -> dict:
    """Train with ``python -m wmtp_core.run`` in a subprocess; the final model's folder, the
    objective at the first and last step, the seconds the run took."""
    config, recipe = _files(root, base)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(HERE.parent)}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "wmtp_core.run", "--config", str(config), "--recipe", str(recipe)],
                          cwd=root, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    text = done.stdout + done.stderr
    if done.returncode != 0:
        raise RuntimeError(f"training exited {done.returncode}:\n{text[-3000:]}")
    loss = re.search(r"objective ([\d.]+) -> ([\d.]+)", text)
    final = root / "ck" / "speculative" / "final"
    if loss is None or not (final / "manifest.json").exists():
        raise RuntimeError(f"training left no final model or loss line:\n{text[-3000:]}")
    return {"final": str(final), "loss_first": float(loss.group(1)), "loss_last": float(loss.group(2)),
            "seconds": round(seconds, 1)}


def _open(uri: str, config: Path):
    """The model at ``uri`` as ``wmtp generate`` opens it (plugins, the verified path)."""
    from wmtp_core.config import load_settings
    from wmtp_core.evaluation.generation import open_model
    from wmtp_core.plugins import make_plugin_manager
    from wmtp_core.session import model_loader

    settings = load_settings(str(config))
    return open_model(uri, settings, model_loader(make_plugin_manager(), settings.mlflow or {}))


def _hf_config(model):
    """``generate``'s settings: greedy, exactly ``MAX_NEW`` tokens (no EOS stop, as the loops)."""
    from transformers import GenerationConfig

    return GenerationConfig(do_sample=False, max_new_tokens=MAX_NEW, min_new_tokens=0, eos_token_id=None,
                            pad_token_id=model.eos_id, bos_token_id=model.eos_id)


def _decode(model, method: str, ids: list[int], hf_config) -> tuple[list[int], int, float]:
    """One prompt's new tokens, base forwards and seconds by ``method``."""
    from wmtp_core.evaluation import speculative as spec

    started = time.perf_counter()
    if method == "hf_generate":
        with torch.inference_mode():
            x = torch.tensor([ids])
            out = model.module.base.generate(input_ids=x, attention_mask=torch.ones_like(x),
                                             generation_config=hf_config)
        new, forwards = out[0, len(ids):].tolist(), MAX_NEW
    else:
        new, stats = (spec.speculative if method == "speculative" else spec.greedy)(model.module, ids, MAX_NEW)
        forwards = stats.forwards
    return new, forwards, time.perf_counter() - started


def _measure(model, prompts: list[list[int]], repeat: int) -> dict:
    """Every method on every prompt, ``repeat`` times, the methods' order rotated each time."""
    hf_config = _hf_config(model)
    _decode(model, "greedy", prompts[0], hf_config)  # warm-up: first-call allocations
    _decode(model, "hf_generate", prompts[0], hf_config)
    times = {m: [] for m in METHODS}
    tokens: dict[str, list] = {}
    forwards = {m: 0 for m in METHODS}
    differ = {"speculative": set(), "hf_generate": set()}
    for i in range(repeat):
        k = i % len(METHODS)
        for method in METHODS[k:] + METHODS[:k]:
            total, rows, fw = 0.0, [], 0
            for ids in prompts:
                new, n, seconds = _decode(model, method, ids, hf_config)
                total, fw = total + seconds, fw + n
                rows.append(new)
            times[method].append(total)
            tokens[method], forwards[method] = rows, fw
        for method in differ:
            differ[method] |= {p for p, (a, b) in enumerate(zip(tokens[method], tokens["greedy"])) if a != b}
    emitted = sum(len(r) for r in tokens["speculative"])
    return {"times": times, "median_s": {m: statistics.median(t) for m, t in times.items()},
            "tokens": emitted, "forwards": forwards, "accepted": emitted / forwards["speculative"],
            "short": sum(len(r) != MAX_NEW for rows in tokens.values() for r in rows),
            "one_token_outputs": sum(len(set(r)) == 1 for r in tokens["greedy"]),
            "distinct_tokens_mean": statistics.mean(len(set(r)) for r in tokens["greedy"]),
            "greedy_samples": [model.decode(r) for r in tokens["greedy"][:3]],
            "speculative_differs": sorted(differ["speculative"]), "hf_generate_differs": sorted(differ["hf_generate"])}


def _head_accuracy(model, problems) -> list[float]:
    """Each head's top-1 accuracy on the problems' reference solutions, teacher-forced: head k at
    position t against the true token t+k+1, over the targets in the solution (not the prompt).
    Unlike the accepted length, this does not depend on what the model's own greedy output is."""
    hits, counts = [0] * model.n_future, [0] * model.n_future
    with torch.inference_mode():
        for p in problems:
            start = len(model.encode(p.prompt))
            ids = model.encode(p.prompt + p.canonical)[: model.max_positions]
            logits = model.module(torch.tensor([ids]))[0]  # [n_future, T, vocab]
            for k in range(model.n_future):
                targets = torch.tensor(ids[max(start, k + 1):])
                if len(targets):
                    guess = logits[k, max(start, k + 1) - k - 1: len(ids) - k - 1].argmax(-1)
                    hits[k] += int((guess == targets).sum())
                    counts[k] += len(targets)
    return [h / c if c else 0.0 for h, c in zip(hits, counts)]


def _rows(label: str, r: dict) -> list[dict]:
    s = r["median_s"]
    per = f"{len(r['times']['greedy'])} reps, {PROMPTS} prompts x {MAX_NEW} tokens, {THREADS} thread"
    accepted = _row(f"speculative decoding, {label}: mean accepted length (tokens per base forward, the prompt's "
                    f"included; ceiling {MAX_NEW}/{FEWEST} = {MAX_NEW / FEWEST:.2f}) vs plain greedy decoding "
                    f"(1 token a forward); greedy output one token repeated on {r['one_token_outputs']} of "
                    f"{PROMPTS} prompts, {r['distinct_tokens_mean']:.1f} distinct tokens per output",
                    r["accepted"], 1.0, 1.0,
                    lower_is_better=False)
    accepted["wmtp"], accepted["plain"] = f"{r['accepted']:.2f} tokens/forward", "1.00 tokens/forward"
    out = [accepted]
    for other, what in (("greedy", "speculative.greedy (the same KV-cache loop)"),
                        ("hf_generate", "transformers generate(do_sample=False)")):
        row = _row(f"speculative decoding, {label}: speed-up vs {what} (wall time, {per}; target none: reported "
                   "as measured)", s[other], s["speculative"], None, lower_is_better=False)
        row["wmtp"], row["plain"] = f"{s['speculative']:.3f} s", f"{s[other]:.3f} s"
        out.append(row)
    return out


def _accuracy_row(results: dict) -> dict:
    trained, untrained = (results[m]["head_accuracy"] for m in ("trained", "untrained"))
    mean = lambda acc: statistics.mean(acc[1:])  # noqa: E731
    row = _row(f"extra heads 1-{N_FUTURE - 1}: top-1 accuracy on the first {PROMPTS} MBPP test reference solutions, "
               "teacher-forced (head k vs the true token k+1 ahead), trained vs untrained (target none)",
               mean(trained), mean(untrained), None, lower_is_better=False)
    row["wmtp"] = "heads 0-3: " + " / ".join(f"{a:.3f}" for a in trained)
    row["plain"] = "heads 0-3: " + " / ".join(f"{a:.3f}" for a in untrained)
    return row


def _identity_row(results: dict) -> dict:
    checked = PROMPTS * len(results)
    differ = sum(len(r["speculative_differs"]) for r in results.values())
    hf = sum(len(r["hf_generate_differs"]) for r in results.values())
    row = _row(f"speculative decoding: prompts whose tokens are identical to greedy decoding's, every repetition "
               f"({', '.join(results)} models; generate vs greedy: {hf} of {checked} differ)",
               checked - differ, checked, 1.0, lower_is_better=False)
    row["wmtp"], row["plain"] = f"{checked - differ} of {checked} identical", f"{checked}"
    row["target"] = "= 1 (no prompt differs)"
    row["met"] = differ == 0
    return row


def bench_speculative(size_mb: int, repeat: int, workdir=None) -> list[dict]:
    """Train a tiny MTP GPT-2 with WMTP, then time speculative vs greedy decoding on MBPP prompts
    with the trained and the untrained model. ``size_mb`` does not apply."""
    from wmtp_core.evaluation import tasks

    root = Path(tempfile.mkdtemp(prefix="wmtp-bench-spec-", dir=workdir))
    threads, reps = torch.get_num_threads(), max(1, min(repeat, 3))
    try:
        base = _base_folder(root / "base")
        training = _train(root, base)
        print(f"   trained {STEPS} steps in {training['seconds']} s: objective {training['loss_first']} -> "
              f"{training['loss_last']}", flush=True)
        torch.set_num_threads(THREADS)
        results = {}
        for label, uri in (("trained", training["final"]), ("untrained", str(base))):
            model = _open(uri, root / "c.yaml")
            problems = tasks.mbpp(str(MBPP / "test.json"))[:PROMPTS]
            results[label] = _measure(model, [model.encode(p.prompt) for p in problems], reps)
            results[label]["head_accuracy"] = _head_accuracy(model, problems)
            print(f"   {label}: accepted {results[label]['accepted']:.2f}, medians "
                  f"{ {m: round(v, 3) for m, v in results[label]['median_s'].items()} }", flush=True)
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(root, ignore_errors=True)
    _write(training, results, reps)
    rows = [row for label, r in results.items() for row in _rows(label, r)]
    return rows + [_accuracy_row(results), _identity_row(results)]


def _write(training: dict, results: dict, repeat: int) -> None:
    """The raw numbers: ``benchmarks/results/speculative.json``."""
    setup = {"model": {**GPT2, "n_future": N_FUTURE, "head": "linear", "seed": SEED},
             "training": {"algo": "baseline-mtp", "steps": STEPS, **TRAIN, "sources": ["mbpp:train"],
                          "scheduler": "constant", "optimizer": "adamw"},
             "decoding": {"prompts": PROMPTS, "split": "mbpp test", "max_new_tokens": MAX_NEW, "stops": "none",
                          "eos_stop": False, "threads": THREADS, "repeat": repeat}}
    out = {"setup": setup, "training": {k: v for k, v in training.items() if k != "final"}, "models": results}
    (HERE / "results").mkdir(parents=True, exist_ok=True)
    (HERE / "results" / "speculative.json").write_text(json.dumps(out, indent=2))
