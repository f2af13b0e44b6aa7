"""Campaign scenario: model-folder bombs and hostile model folders (issue 18, items 4 and 6).

Every case of ``tests/model_bombs.py`` (a ``config.json`` that declares far more than its weights
hold or than this machine has, broken or disguised safetensors files, JSON nested 10^5 deep,
values of the wrong type) is given as ``paths.models.base`` to the dry run and to the run; each
one that can live in a registry is also registered as an MLflow transformers model in a real
sqlite store and given as ``models:/NAME/1`` to the run, and so is a registered model whose
artifacts hold a ``loop -> .`` link. So are recipes whose own model no machine here can hold.
Rounds after the first add random bombs (layer counts, vocabularies, widths, header lengths).

Each command is a forked run (``faults.forked``) whose address space is capped at 6 GiB as soon
as it starts, and which is killed after ``HANG_S``: a bomb that is not refused shows as a
traceback (``MemoryError``) or a hang, never as a machine out of memory.

Counted: tried, survived (exit 2 with one line naming the folder and the words the case must
say; the good folder and a sane recipe exit 0), tracebacks, hangs, runs killed (by memory or a
signal), legitimate runs refused for good (the good folder's dry run and run), and registry
downloads left in the temporary directory (``wmtp-model-*``).

    uv run python benchmarks/hostile_models.py            # rounds=1, about two minutes
    uv run python benchmarks/hostile_models.py --rounds 3
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import attrs  # noqa: E402
from faults import HANG_S, Tally, _line, forked, in_child  # noqa: E402
from model_bombs import CASES, SPARSE, config_values, expected, good_folder, header_length, make  # noqa: E402

from wmtp_core import hookimpl  # noqa: E402

CAP = 6 << 30
"""Address space of each forked run."""
REGISTRY_SKIP = set(SPARSE) | {"index naming ../"}
"""Cases not registered: a sparse file would be written out whole; an index without weights is
refused by the registry's own listing, in other words."""


class Cap:
    """A plugin whose first hook (sinks are registered before anything else is read) caps the
    forked run's address space."""

    @hookimpl
    def wmtp_register_sinks(self, register):
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (CAP if hard == resource.RLIM_INFINITY else min(CAP, hard), hard))


def _files(work: Path, base: str | None, mlflow: dict | None = None, model: dict | None = None) -> list[str]:
    import yaml

    (work / "data").mkdir(parents=True, exist_ok=True)
    (work / "data" / "train.txt").write_text("def add(a, b):\n    return a + b\n" * 200)
    config = {"paths": {"models": {"base": base}, "datasets": {"d": str(work / "data" / "train.txt")},
                        "checkpoints": {"base_path": f"file://{work}/ck", "save_interval": 2}},
              "mlflow": mlflow}
    recipe = {"run": {"name": "hostile"}, "train": {"algo": "baseline-mtp", "max_steps": 2},
              "data": {"train": {"sources": ["d"], "max_length": 16, "batch_size": 2}}}
    if model:
        recipe["model"] = model
    (work / "c.yaml").write_text(yaml.safe_dump(config))
    (work / "r.yaml").write_text(yaml.safe_dump(recipe))
    return ["--config", str(work / "c.yaml"), "--recipe", str(work / "r.yaml")]


def _judge(tally: ModelTally, what: str, code: int | None, err: str, words: tuple[str, ...], want: int = 2) -> None:
    """One command's outcome counted: ``want`` 2 (refused with ``words``) or 0 (a good run)."""
    tally.tried += 1
    lines = err.strip().splitlines()
    if code is None:
        tally.hangs += 1
        tally.bad(f"{what}: no answer within {HANG_S:.0f} s")
    elif code < 0 or code in (71, 72):
        tally.tracebacks += "Traceback" in err
        tally.killed += code < 0
        tally.bad(f"{what}: exit {code}: {err.strip()[-300:]}")
    elif "Traceback" in err or code not in (0, 2):
        tally.tracebacks += 1
        tally.bad(f"{what}: exit {code}: {err.strip()[-300:]}")
    elif code != want or (want == 2 and (len(lines) != 1 or not all(w in lines[0] for w in words))):
        tally.legitimate_refused += want == 0
        tally.bad(f"{what}: exit {code}, expected {want}: {err.strip()[-300:]}")
    else:
        tally.survived += 1


@attrs.define
class ModelTally(Tally):
    """The scenario's counts beyond the table's columns (the lead adds the columns)."""

    killed: int = 0
    """Runs ended by a signal (the OOM killer's SIGKILL among them)."""
    legitimate_refused: int = 0
    """Good runs (the good folder, a small recipe) that did not succeed."""
    left_behind: int = 0
    """Registry downloads (``wmtp-model-*``) a failed load left in the temporary directory."""

    def counts(self) -> list[str]:
        return [f"runs killed: {self.killed}", f"legitimate runs refused for good: {self.legitimate_refused}",
                f"registry downloads left behind: {self.left_behind}"]


def _random_cases(rng: random.Random) -> dict[str, tuple]:
    """A round's random bombs: a count of layers, a vocabulary, a width, a header length."""
    n_layer = rng.choice([1025, 4096, 10**6, 10**8])
    vocab = rng.choice([10**7, 10**8, 2**31, 10**12])
    width = rng.choice([4096, 65536, 10**6])
    header = rng.choice([10**8 + 1, 1 << 33, 1 << 50, (1 << 63) + 5])
    return {f"n_layer {n_layer}": (config_values(n_layer=n_layer), ("n_layer",)),
            f"vocab_size {vocab}": (config_values(vocab_size=vocab), ("vocab_size",)),
            f"n_embd {width}": (config_values(n_embd=width), ("n_embd",)),
            f"header length {header}": (header_length(header), ("model.safetensors is not a safetensors file",))}


def _folders(tally: Tally, work: Path, good: Path, cases: dict[str, tuple], log) -> None:
    """Each case as paths.models.base: the dry run and the run."""
    for i, (case, (spoil, words)) in enumerate(cases.items()):
        folder = work / "folders" / str(i)
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(good, folder)
        spoil(folder)
        run = work / "runs" / f"f{i}"
        run.mkdir(parents=True, exist_ok=True)
        args = _files(run, str(folder))
        words = tuple(w.replace("{where}", str(folder)) for w in words)
        for mode in (["--dry-run"], []):
            code, err = forked([*args, *mode], plugins=(Cap(),), cwd=run)
            _judge(tally, f"{case} ({'dry run' if mode else 'run'})", code, err, words)
        shutil.rmtree(folder, ignore_errors=True)
    log(f"  hostile models: {len(cases)} folders")


def _register_all(store: str, root: Path, good: Path) -> dict[str, str]:
    """Each registrable case (and a good folder with a ``loop -> .`` link) registered in the
    sqlite store ``store``, in a forked child: ``{case: models:/NAME/1}``."""
    def register() -> dict[str, str]:
        import mlflow

        mlflow.set_tracking_uri(store)
        mlflow.set_registry_uri(store)
        mlflow.set_experiment(experiment_id=mlflow.create_experiment("hostile", f"file://{root}/artifacts"))
        names = {}
        for i, case in enumerate([c for c in CASES if c not in REGISTRY_SKIP] + ["loop -> ."]):
            art = root / "art" / str(i)
            art.mkdir(parents=True)
            (art / "MLmodel").write_text("flavors:\n  transformers:\n    model_binary: model\n")
            if case in CASES:
                make(case, good, art / "model")
            else:
                shutil.copytree(good, art / "model")
            with mlflow.start_run():
                mlflow.log_artifacts(str(art), "model")
                run = mlflow.active_run().info
            mlflow.register_model(f"runs:/{run.run_id}/model", f"hostile_{i}")
            if case == "loop -> .":
                (Path(run.artifact_uri.removeprefix("file://")) / "model" / "model" / "loop").symlink_to(".")
            names[case] = f"models:/hostile_{i}/1"
        return names

    def quietly() -> dict[str, str]:
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return register()

    return in_child(quietly)


def _registry(tally: Tally, work: Path, good: Path, log) -> None:
    """Each registered case through the run: refused, and its download removed."""
    root = work / "registry"
    root.mkdir()
    store = f"sqlite:///{root}/mlflow.db"
    names = _register_all(store, root, good)
    for i, (case, uri) in enumerate(names.items()):
        run = work / "runs" / f"r{i}"
        (run / "tmp").mkdir(parents=True, exist_ok=True)
        args = _files(run, uri, mlflow={"tracking_uri": store, "experiment": "runs"})
        words = expected(case, uri) if case in CASES else ("its artifacts nest deeper than 16 folders",)
        code, err = forked(args, plugins=(Cap(),), cwd=run,
                           env={"TMPDIR": str(run / "tmp"), "HF_HUB_OFFLINE": "1"})
        _judge(tally, f"{case} (models:/)", code, err, words)
        left = [p.name for p in (run / "tmp").iterdir() if p.name.startswith("wmtp-model-")]
        if left:
            tally.left_behind += 1
            tally.bad(f"{case} (models:/): left {left[0]} in the temporary directory")
    log(f"  hostile models: {len(names)} registered models")


def _recipes(tally: Tally, work: Path) -> None:
    """Recipes whose own model no machine here holds, and a sane one (which must train)."""
    for i, model in enumerate(({"d_model": 65536, "n_layers": 1024, "n_heads": 64},
                               {"d_model": 8192, "n_layers": 64, "n_heads": 64},
                               {"d_model": 32768, "n_layers": 8, "n_heads": 8, "max_seq_len": 1 << 20})):
        run = work / "runs" / f"m{i}"
        run.mkdir(parents=True, exist_ok=True)
        args = _files(run, None, model={"max_seq_len": 32, **model})
        for mode in (["--dry-run"], []):
            code, err = forked([*args, *mode], plugins=(Cap(),), cwd=run)
            _judge(tally, f"recipe {model} ({'dry run' if mode else 'run'})", code, err,
                   ("is a model of", "of memory available"))


def _legitimate(tally: Tally, work: Path, good: Path) -> None:
    """The good folder and a small recipe: the dry run and a 2-step run both succeed."""
    for name, base in (("good folder", str(good)), ("small recipe", None)):
        run = work / "runs" / name.replace(" ", "-")
        run.mkdir(parents=True, exist_ok=True)
        model = {"d_model": 32, "n_layers": 1, "n_heads": 2, "n_future": 2, "max_seq_len": 32} if base is None else None
        args = _files(run, base, model=model)
        for mode in (["--dry-run"], []):
            code, err = forked([*args, *mode], plugins=(Cap(),), cwd=run)
            _judge(tally, f"{name} ({'dry run' if mode else 'run'})", code, err, (), want=0)


PRELOAD = ("transformers", "transformers.models.gpt2.modeling_gpt2", "transformers.models.gpt2.tokenization_gpt2",
           "transformers.models.auto.modeling_auto", "transformers.models.auto.tokenization_auto", "safetensors.torch",
           "mlflow", "mlflow.models", "mlflow.artifacts", "mlflow.store.tracking.sqlalchemy_store",
           "mlflow.store.model_registry.sqlalchemy_store", "sqlalchemy.dialects.sqlite", "alembic.command")
"""What each forked run would import again (transformers, MLflow's stores: seconds a run): imported
once here, imports only (no thread starts), so that every fork starts with them."""


def _preload() -> None:
    import importlib
    import threading

    for name in PRELOAD:
        importlib.import_module(name)
    # the verify pool's idle threads (started by an earlier scenario's in-process `verify`) are
    # replaced in every child (os.register_at_fork in wmtp_core.store_verify); nothing else may run
    others = [t.name for t in threading.enumerate()
              if t is not threading.main_thread() and not t.name.startswith("wmtp-verify")]
    assert not others, others


def scenario_models(rounds: int, out: Path, rng: random.Random, log) -> list[Tally]:
    tally = ModelTally("model-folder bombs and hostile model folders (dry run, run, models:/)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _preload()
    work = Path(tempfile.mkdtemp(prefix="wmtp-hostile-models-", dir=out))
    def make_good() -> str:
        from wmtp_core.engine.hf import quiet

        quiet()  # no progress bar
        return str(good_folder(work / "good"))

    good = Path(in_child(make_good))
    for r in range(rounds):
        cases = dict(CASES) if r == 0 else _random_cases(rng)
        _folders(tally, work, good, cases, log)
        if r == 0:
            _registry(tally, work, good, log)
            _recipes(tally, work)
            _legitimate(tally, work, good)
        log(f"  hostile models: round {r + 1}/{rounds}")
    tally.notes[:0] = tally.counts()
    shutil.rmtree(work, ignore_errors=True)
    log(_line(tally))
    return [tally]


scenario_i18models = scenario_models


def cli(argv: list[str] | None = None) -> int:
    from faults import preload

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--seed", type=int, default=20261205)
    p.add_argument("--out", default=str(HERE / "results" / "hostile_models"))
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    preload()
    (tally,) = scenario_models(a.rounds, out, random.Random(a.seed), print)
    bad = tally.tracebacks + tally.hangs + tally.killed + tally.legitimate_refused + tally.left_behind
    return 0 if bad == 0 and tally.survived == tally.tried else 1


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(cli())
