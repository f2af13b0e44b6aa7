"""Tiny configurations and recipes for tests: Python dicts, merged and written out as YAML."""

from __future__ import annotations

import atexit
import copy
import functools
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

TINY_MODEL: dict[str, Any] = {"d_model": 32, "n_layers": 1, "n_heads": 2, "n_future": 2, "max_seq_len": 32}
"""The tiny model most test runs train."""

STDLIB_TRAIN: dict[str, Any] = {"train": {"sources": ["stdlib"], "max_length": 32, "batch_size": 4}}
"""A ``data`` section: the built-in corpus in windows of 32 bytes, batches of 4."""

TINY_RECIPE: dict[str, Any] = {
    "run": {"name": "tiny"},
    "train": {"algo": "baseline-mtp", "max_steps": 4},
    "optim": {"lr": 0.003, "scheduler": "constant", "warmup_ratio": 0.0},
    "data": {"train": {"sources": ["stdlib"], "max_length": 32, "batch_size": 4}},
    "model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "n_future": 2, "max_seq_len": 32},
    "pretrain": {"max_steps": 2},
}


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` merged into a copy of ``base``; a ``None`` in ``over`` replaces the value."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def recipe(max_steps: int | None, **over: Any) -> dict[str, Any]:
    """``max_steps`` steps of :data:`STDLIB_TRAIN` on :data:`TINY_MODEL`, every other recipe key
    left at its default; ``over`` (``model={"dropout": 0.1}``, ``optim={...}``) merged in."""
    base = {"train": {"max_steps": max_steps}, "data": STDLIB_TRAIN, "model": TINY_MODEL}
    return merge(base, over)


def tiny_config(tmp: Path, **over: Any) -> dict[str, Any]:
    """Checkpoints under ``tmp/ck`` every 2 steps, MLflow in ``tmp/mlflow.db``."""
    base = {
        "seed": 7,
        "log_interval": 2,
        "paths": {"checkpoints": {"base_path": f"file://{tmp}/ck", "save_interval": 2, "keep_last": 2}},
        "mlflow": {"experiment": "tests", "tracking_uri": f"sqlite:///{tmp}/mlflow.db"},
    }
    return merge(base, over)


class _Dumper(yaml.SafeDumper):
    """yaml.safe_dump's dumper, writing a value used twice in full rather than as an alias."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def write(path: Path, data: dict[str, Any]) -> str:
    """``data`` written to ``path`` as YAML; returns the path as a string. A config's MLflow store
    (``sqlite:///...``) that does not exist yet is created empty (:func:`empty_mlflow_store`)."""
    path.write_text(yaml.dump(data, Dumper=_Dumper, sort_keys=False))
    mlflow_section = data.get("mlflow") if isinstance(data, dict) else None
    if isinstance(mlflow_section, dict):
        for key in ("tracking_uri", "registry_uri"):
            uri = mlflow_section.get(key)
            if isinstance(uri, str) and uri.startswith("sqlite:////"):  # absolute: relative ones name the run's cwd
                empty_mlflow_store(Path(uri.removeprefix("sqlite:///")))
    return str(path)


@functools.cache
def _empty_store_template() -> Path:
    """One empty MLflow sqlite store per test process: MLflow creates it (its schema migrations
    take about 1.5 s, every time a store is new)."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    folder = Path(tempfile.mkdtemp(prefix="wmtp-empty-mlflow-"))
    atexit.register(shutil.rmtree, folder, True)
    store = SqlAlchemyStore(f"sqlite:///{folder}/mlflow.db", str(folder / "mlruns"))
    store.engine.dispose()
    return folder / "mlflow.db"


def empty_mlflow_store(db: Path) -> None:
    """``db``, when it does not exist yet: a copy of an empty store that MLflow created (what the
    first run against ``db`` would create, without migrating the schema again for each test)."""
    if not db.exists() and db.parent.is_dir():
        shutil.copyfile(_empty_store_template(), db)


def files(tmp: Path, config: dict[str, Any] | None = None, recipe: dict[str, Any] | None = None,
          name: str = "") -> list[str]:
    """``--config C --recipe R`` arguments for a tiny run, both files written under ``tmp``."""
    c = write(tmp / f"config{name}.yaml", config if config is not None else tiny_config(tmp))
    r = write(tmp / f"recipe{name}.yaml", merge(TINY_RECIPE, recipe or {}))
    return ["--config", c, "--recipe", r]


def resume_files(step: int) -> dict[str, Any]:
    """The files of a hand-made resume checkpoint at ``step`` with the structure WMTP writes
    (what ``wmtp checkpoints verify`` deserialises and checks): tiny weights, an optimizer state,
    a trainer state holding every key a resume needs."""
    import torch

    from wmtp_core.filesink import torch_writer

    trainer = {"step": step, "losses": [1.0], "scheduler": {}, "rng": {}, "data": {},
               "early_stopping": {}, "algo": {}}
    return {"model.pt": torch_writer({"w": torch.arange(8.0) * step}),
            "optimizer.pt": torch_writer({"state": {}, "param_groups": [{"params": [0], "lr": 0.1}]}),
            "trainer.pt": torch_writer(trainer)}
