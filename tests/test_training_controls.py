"""Training controls: early stopping, epochs, devices, mixed precision, data sources."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from builders import STDLIB_TRAIN, TINY_MODEL, merge, write
from conftest import tree

from wmtp_core.engine.optim import Schedule
from wmtp_core.run import EXIT_USAGE, main


def setup(tmp: Path, recipe: dict, config: dict | None = None) -> list[str]:
    """``recipe`` on the tiny model; ``config`` merged into checkpoints under ``tmp/ck`` every 2 steps."""
    c = write(tmp / "c.yaml", merge({
        "seed": 5,
        "log_interval": 2,
        "mlflow": None,
        "paths": {"checkpoints": {"base_path": f"file://{tmp}/ck", "save_interval": 2, "keep_last": 3}},
    }, config or {}))
    r = write(tmp / "r.yaml", merge(recipe, {"model": TINY_MODEL}))
    return ["--config", c, "--recipe", r]


def losses(tmp: Path, run: str) -> list[float]:
    steps = sorted((tmp / "ck" / run).glob("step_*"), key=lambda p: int(p.name[5:]))
    return torch.load(steps[-1] / "trainer.pt", weights_only=True)["losses"]


EARLY = {
    "train": {
        "max_steps": None,
        "num_epochs": 3,
        "early_stopping": {"enabled": True, "patience": 2, "min_delta": 100.0, "monitor": "eval_loss",
                           "mode": "min"},
    },
    "data": STDLIB_TRAIN,
}


def test_early_stopping_ends_the_whole_run_and_says_why(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = setup(tmp_path, EARLY)
    assert main([*args, "--run-name", "es"]) == 0
    out = capsys.readouterr().out
    assert "stopped_early at step 6" in out
    assert "early stopping: eval_loss did not improve by 100.0 for 2 evaluations" in out
    assert len(losses(tmp_path, "es")) == 6
    assert (tmp_path / "ck" / "es" / "final" / "manifest.json").exists()

    # resuming a run that stopped early does not train on, nor store its final model twice
    assert main([*args, "--run-name", "es", "--resume", "latest"]) == 0
    cap = capsys.readouterr()
    assert "early stopping had already ended this run" in cap.out
    assert "already stored" in cap.err
    assert sorted(p.name for p in (tmp_path / "ck" / "es").iterdir()) == ["final", "step_2", "step_4", "step_6"]
    assert len(losses(tmp_path, "es")) == 6


def test_num_epochs_bounds_the_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": "x" * 40 + str(i) * 30}) for i in range(10)))
    args = setup(tmp_path, {"train": {"max_steps": None, "num_epochs": 2},
                            "data": {"train": {"sources": ["tiny"], "max_length": 32, "batch_size": 4,
                                               "pack_sequences": False}}},
                 config={"paths": {"datasets": {"tiny": f"file://{corpus}"}}})
    assert main([*args, "--run-name", "ep"]) == 0
    # 10 documents of 70 bytes -> 3 rows each (32 + 32 + a 6-byte tail, padded); 5% held out ->
    # 29 train rows -> 7 batches of 4 per epoch
    assert len(losses(tmp_path, "ep")) == 14


def test_jsonl_record_without_text_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    corpus = tmp_path / "bad.jsonl"
    corpus.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    args = setup(tmp_path, {"data": {"train": {"sources": ["bad"], "max_length": 32, "batch_size": 1}}},
                 config={"paths": {"datasets": {"bad": f"file://{corpus}"}}})
    assert main(args) == EXIT_USAGE
    err = " ".join(capsys.readouterr().err.split())
    assert "bad.jsonl line 2 is not a JSON object with a 'text' string field" in err
    assert not (tmp_path / "ck").exists() or not any((tmp_path / "ck").rglob("manifest.json"))


def test_unknown_data_source_names_the_defined_ones(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = setup(tmp_path, {"data": {"train": {"sources": ["wiki"], "max_length": 32}}},
                 config={"paths": {"datasets": {"books": "file:///nowhere"}}})
    assert main([*args, "--dry-run"]) == EXIT_USAGE
    err = " ".join(capsys.readouterr().err.split())
    assert "data source 'wiki' is neither built in ('stdlib') nor a key of paths.datasets (defined: books)" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_is_refused_with_the_reason_on_a_machine_without_one(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = setup(tmp_path, {"train": {"max_steps": 2}, "data": {"train": {"max_length": 32}}},
                 config={"devices": {"compute_backend": "cuda"}})
    before = tree(tmp_path)
    assert main(args) == EXIT_USAGE
    assert "devices.compute_backend: 'cuda' was asked for but this machine has no usable CUDA device" in \
        " ".join(capsys.readouterr().err.split())
    assert tree(tmp_path) == before


TWO_STEPS = {"train": {"max_steps": 2}, "data": {"train": {"sources": ["stdlib"], "max_length": 32, "batch_size": 2}}}


def test_fp16_on_cpu_is_refused_and_bf16_is_honoured(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = setup(tmp_path, TWO_STEPS, config={"devices": {"compute_backend": "cpu", "mixed_precision": "fp16"}})
    assert main(args) == EXIT_USAGE
    assert "'fp16' needs a CUDA device" in " ".join(capsys.readouterr().err.split())
    args = setup(tmp_path, TWO_STEPS, config={"devices": {"compute_backend": "auto", "mixed_precision": "bf16"}})
    assert main([*args, "--run-name", "bf"]) == 0
    assert all(map(lambda x: x == x, losses(tmp_path, "bf")))


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
def test_schedules_warm_up_then_decay_to_a_tenth(kind):
    s = Schedule(kind, total_steps=100, warmup_ratio=0.1)
    assert s(0) < s(5) < s(9) <= 1.0
    assert s(10) == pytest.approx(1.0)
    end = s(100)
    assert end == pytest.approx(1.0 if kind == "constant" else 0.1)


def test_an_unreachable_tracking_server_at_start_is_a_clear_error_and_writes_nothing(tmp_path, monkeypatch, capsys):
    from conftest import free_port

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    write(tmp_path / "c.yaml", {"mlflow": {"tracking_uri": f"http://127.0.0.1:{free_port()}"},
                                "paths": {"checkpoints": {"base_path": f"file://{tmp_path}/ck"}}})
    write(tmp_path / "r.yaml", {"train": {"max_steps": 2}, "data": {"train": {"max_length": 32, "batch_size": 2}},
                                "model": TINY_MODEL})
    before = tree(tmp_path)
    assert main(["--config", "c.yaml", "--recipe", "r.yaml"]) == EXIT_USAGE
    err = " ".join(capsys.readouterr().err.split())
    assert "a plugin failed as the run started, before any step" in err and "Connection refused" in err
    assert "Traceback" not in err
    assert tree(tmp_path) == before
