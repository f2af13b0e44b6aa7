"""Campaign scenario: hostile configurations, second round (issue 18, item 9).

Each case goes through the dry run and through the run (``main`` in a forked process, as
``python -m wmtp_core.run`` does):

- an absurd integer for a count, an interval, a batch size or a timeout (thousands of digits, or
  just past the documented bound), drawn at random each round;
- a dataset (``.jsonl`` or ``.json``) nested deeper than Python's parser follows;
- YAML with a ``!!python/...`` tag, or a raw control character (BEL, NUL, ESC, DEL);
- a base path that cannot hold a directory: ``s3://`` without a bucket, ``/dev/null``,
  ``/proc/self``, a FIFO, a path below a regular file.

Each must be refused with exit status 2 and one ``error:`` line naming the file, the key or line,
the value and what is accepted, and leave nothing behind (no checkpoint directory). Legitimate
base paths (a new nested directory, a relative path, ``file://``, ``local://``, ``/dev/shm``)
must pass: a refusal of one is counted as "legitimate runs refused".

    uv run python benchmarks/hostile_configs.py [--rounds N]
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from faults import Tally, standalone, forked  # noqa: E402

RECIPE = {"run": {"name": "hostile"}, "train": {"max_steps": 4},
          "optim": {"lr": 0.003, "scheduler": "constant", "warmup_ratio": 0.0},
          "data": {"train": {"sources": ["stdlib"], "max_length": 32, "batch_size": 4}},
          "model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "n_future": 2, "max_seq_len": 32}}
INTS = [  # (file, key, bound): the documented upper bound of each
    ("recipe", "train.max_steps", 10**12), ("recipe", "train.num_epochs", 10**6),
    ("recipe", "train.grad_accum_steps", 10**6), ("recipe", "data.train.batch_size", 2**20),
    ("recipe", "data.train.max_length", 2**20), ("recipe", "pretrain.max_steps", 10**12),
    ("recipe", "train.early_stopping.patience", 10**12),
    ("config", "paths.checkpoints.save_interval", 10**12), ("config", "paths.checkpoints.keep_last", 10**12),
    ("config", "paths.checkpoints.keep_every", 10**12), ("config", "log_interval", 10**12),
    ("config", "devices.distributed.timeout", 365 * 24 * 3600),
]


def _config(work: Path, base: str | None = None) -> dict:
    return {"seed": 3, "log_interval": 2, "mlflow": None,
            "paths": {"checkpoints": {"base_path": base or f"file://{work}/ck", "save_interval": 2, "keep_last": 2}}}


def _set(data: dict, key: str, value) -> dict:
    *path, last = key.split(".")
    node = data
    for part in path:
        node = node.setdefault(part, {})
    node[last] = value
    return data


HUGE = "0xHUGE"
"""Stands in the YAML for a hexadecimal integer too long for Python to print in decimal."""


def _huge(rng: random.Random, bound: int) -> tuple[int | str, str]:
    """A value past ``bound`` and the YAML that writes it: just past it, ten times it, thousands
    of decimal digits, or a hexadecimal integer of up to 80,000 bits."""
    pick = rng.randrange(4)
    if pick == 3:
        digits = rng.randint(100, 20_000)
        return HUGE, "0x" + "f" * digits
    value = [bound + 1, bound * 10, int("9" * rng.randint(30, 4200))][pick]
    return value, str(value)


Case = tuple[str, Callable[[Path], tuple[str, str]], bool]
"""(what, make(work) -> (config text, recipe text), legitimate)"""


def _cases(rng: random.Random) -> list[Case]:
    cases: list[Case] = []
    for where, key, bound in INTS:
        value, text = _huge(rng, bound)

        def make(work: Path, where=where, key=key, value=value, text=text):
            config, recipe = _config(work), yaml.safe_load(yaml.safe_dump(RECIPE))
            _set(config if where == "config" else recipe, key, value)
            if key == "train.num_epochs":
                recipe["train"]["max_steps"] = None
            dumped = [yaml.safe_dump(config), yaml.safe_dump(recipe)]
            return tuple(d.replace(f"'{HUGE}'", text).replace(HUGE, text) for d in dumped)
        cases.append((f"{key}: {text[:12]}... ({len(text)} characters)", make, False))
    for suffix in (".jsonl", ".json"):
        depth = rng.randint(2_000, 300_000)

        def deep(work: Path, suffix=suffix, depth=depth):
            data = work / f"deep{suffix}"
            inner = "[" * depth + "]" * depth
            data.write_text('{"text": "a"}\n' + '{"text": "b", "m": ' + inner + "}\n" if suffix == ".jsonl"
                            else '[{"text": "a"},\n {"text": "b", "m": ' + inner + "}]\n")
            config = dict(_config(work), paths={**_config(work)["paths"], "datasets": {"deep": str(data)}})
            recipe = _set(yaml.safe_load(yaml.safe_dump(RECIPE)), "data.train.sources", ["deep"])
            return yaml.safe_dump(config), yaml.safe_dump(recipe)
        cases.append((f"a {suffix} dataset nested {depth} deep", deep, False))
    recipe_text = yaml.safe_dump(RECIPE)
    for what, extra in [("a !!python/object/apply tag", "evil: !!python/object/apply:os.system ['touch pwned']\n"),
                        ("a !!python/name tag", "evil: !!python/name:os.system\n")] + [
            (f"a raw {name}", f"run2: a{ch}b\n") for name, ch in (("BEL", "\x07"), ("NUL", "\x00"), ("ESC", "\x1b"),
                                                                  ("DEL", "\x7f"))]:
        cases.append((what, lambda work, extra=extra: (yaml.safe_dump(_config(work)), recipe_text + extra), False))
    bad = {"s3:// without a bucket": lambda w: "s3://", "file:///dev/null": lambda w: "file:///dev/null",
           "file:///proc/self": lambda w: "file:///proc/self", "a FIFO": _fifo, "below a regular file": _below_a_file}
    good = {"a new nested directory": lambda w: f"file://{w}/a/b/c/ck", "a relative path": lambda w: "file://./rel/ck",
            "a bare relative path": lambda w: "bare-ck", "local://": lambda w: f"local://{w}/local-ck"}
    if Path("/dev/shm").is_dir():
        good["/dev/shm"] = lambda w: f"file:///dev/shm/{w.name}-ck"
    for table, legit in ((bad, False), (good, True)):
        for what, base in table.items():
            cases.append((f"base path: {what}", lambda work, base=base: (yaml.safe_dump(_config(work, base(work))),
                                                                         recipe_text), legit))
    return cases


def _fifo(work: Path) -> str:
    os.mkfifo(work / "fifo")
    return f"file://{work}/fifo"


def _below_a_file(work: Path) -> str:
    (work / "plain").write_text("x")
    return f"{work}/plain/ck"


def scenario_hostile_configs(rounds: int, out: Path, rng: random.Random, log) -> list[Tally]:
    """Every case, each round drawn again, through the dry run and the run."""
    tally = Tally("hostile configurations, second round (--dry-run and run)")
    refused_legit = 0
    for r in range(rounds):
        for what, make, legit in _cases(rng):
            for dry in (True, False):
                work = Path(tempfile.mkdtemp(prefix="wmtp-hcfg-", dir=out))
                config, recipe = make(work)
                (work / "c.yaml").write_text(config)
                (work / "r.yaml").write_text(recipe)
                code, err = forked(["--config", "c.yaml", "--recipe", "r.yaml", *(["--dry-run"] if dry else [])],
                                   cwd=work, timeout=120)
                tally.tried += 1
                label = f"{what} ({'dry run' if dry else 'run'})"
                lines = [line for line in err.strip().splitlines() if line.strip()]
                if code is None:
                    tally.hangs += 1
                    tally.bad(f"{label}: no answer within 120 s")
                elif "Traceback" in err:
                    tally.tracebacks += 1
                    tally.bad(f"{label}: {err.strip()[-300:]}")
                elif legit:
                    if code == 0:
                        tally.survived += 1
                    else:
                        refused_legit += 1
                        tally.bad(f"{label}: a legitimate base path refused: exit {code}: {err.strip()[-300:]}")
                elif code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "accepted" in lines[0] \
                        and not (work / "ck").exists() and not (work / "pwned").exists():
                    tally.survived += 1
                else:
                    tally.bad(f"{label}: exit {code}, {len(lines)} lines: {err.strip()[-300:]}")
                if "/dev/shm" in what:
                    shutil.rmtree(f"/dev/shm/{work.name}-ck", ignore_errors=True)
                shutil.rmtree(work, ignore_errors=True)
        log(f"  hostile configs: round {r + 1}/{rounds}: {tally.survived}/{tally.tried}")
    tally.notes.insert(0, f"legitimate runs refused: {refused_legit}")
    return [tally]


def cli(argv: list[str] | None = None) -> int:
    return standalone(scenario_hostile_configs, "configs", argv)


if __name__ == "__main__":
    sys.exit(cli())
