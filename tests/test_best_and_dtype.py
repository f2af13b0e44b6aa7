"""Best-k retention and a best final model; the final model in the dtype you choose."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml
from builders import recipe, write

from wmtp_core.engine.model import model_from_weights

pytestmark = pytest.mark.slow


def overfitting(tmp: Path, final: dict, **checkpoints) -> None:
    """A run that overfits a tiny text: its held-out loss (on the standard library) falls, then
    rises at the end."""
    (tmp / "tiny.txt").write_text(("abcabc xyz " * 3 + "def f(x): return x\n") * 20)
    ck = {"base_path": f"file://{tmp}/ck", "save_interval": 5, "keep_last": 2,
          "keep_best": {"k": 1, "monitor": "eval_loss", "mode": "min"}, **checkpoints}
    write(tmp / "c.yaml", {"seed": 3, "log_interval": 5, "mlflow": None, "storage": {"final": final},
                           "paths": {"datasets": {"tiny": str(tmp / "tiny.txt")}, "checkpoints": ck}})
    write(tmp / "r.yaml", recipe(60, train={"num_epochs": 100},
                                 optim={"lr": 0.01, "scheduler": "constant", "warmup_ratio": 0.0},
                                 data={"train": {"sources": ["tiny"], "max_length": 32, "batch_size": 4},
                                       "eval": {"sources": ["stdlib"], "max_length": 32, "batch_size": 8}}))


def run(tmp: Path, monkeypatch, capsys, *args: str):
    from wmtp_core.run import main

    monkeypatch.chdir(tmp)
    code = main(["--config", "c.yaml", "--recipe", "r.yaml", "--run-name", "best", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def eval_losses(ck: Path) -> dict[int, float]:
    import json

    out = {}
    for d in ck.glob("step_*"):
        out[int(d.name[5:])] = json.loads((d / "manifest.json").read_text())["meta"]["metrics"]["eval_loss"]
    return out


def test_keep_best_keeps_the_best_checkpoint_and_final_from_best_stores_its_weights(tmp_path, monkeypatch, capsys):
    from wmtp_core.cli import main as wmtp

    overfitting(tmp_path, {"sink": "local", "from": "best"})
    code, out, err = run(tmp_path, monkeypatch, capsys)
    assert code == 0, err[-3000:]
    run_dir = tmp_path / "ck" / "best"
    kept = eval_losses(run_dir)
    assert sorted(kept)[-2:] == [55, 60], "keep_last still keeps the newest two"
    (best_step,) = set(kept) - {55, 60}
    assert kept[best_step] < min(kept[55], kept[60]), f"the held-out loss rose at the end: {kept}"
    assert f"the final model is the best checkpoint, step {best_step}" in err

    final = torch.load(run_dir / "final" / "model.pt", weights_only=True)
    best_weights = torch.load(run_dir / f"step_{best_step}" / "model.pt", weights_only=True)
    last_weights = torch.load(run_dir / "step_60" / "model.pt", weights_only=True)
    config = torch.load(run_dir / "step_60" / "trainer.pt", weights_only=True)["model_config"]
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model_from_weights(config, final, "final").eval()(ids)
        assert torch.equal(logits, model_from_weights(config, best_weights, "best").eval()(ids))
        assert not torch.equal(logits, model_from_weights(config, last_weights, "last").eval()(ids))

    assert wmtp(["checkpoints", "ls", str(run_dir)]) == 0
    listing = capsys.readouterr().out
    assert f"eval_loss={kept[best_step]:.4f}" in listing, listing


def test_final_from_best_needs_keep_best(tmp_path, monkeypatch, capsys):
    overfitting(tmp_path, {"sink": "local", "from": "best"}, keep_best=None)
    code, out, err = run(tmp_path, monkeypatch, capsys, "--dry-run")
    assert code == 2
    assert "storage.final.from: 'best' needs paths.checkpoints.keep_best" in " ".join(err.split())


def test_a_bf16_final_model_takes_half_the_bytes_and_loads_back(tmp_path, monkeypatch, capsys):
    sizes = {}
    for dtype in ("fp32", "bf16"):
        tmp = tmp_path / dtype
        tmp.mkdir()
        overfitting(tmp, {"sink": "local", "dtype": dtype})
        code, out, err = run(tmp, monkeypatch, capsys)
        assert code == 0, err[-3000:]
        final = tmp / "ck" / "best" / "final"
        sizes[dtype] = (final / "model.pt").stat().st_size
        weights = torch.load(final / "model.pt", weights_only=True)
        want = torch.float32 if dtype == "fp32" else torch.bfloat16
        assert {v.dtype for v in weights.values() if v.is_floating_point()} == {want}
        resume = torch.load(tmp / "ck" / "best" / "step_60" / "model.pt", weights_only=True)
        assert {v.dtype for v in resume.values() if v.is_floating_point()} == {torch.float32}, \
            "the resume state keeps full precision"
        config = torch.load(tmp / "ck" / "best" / "step_60" / "trainer.pt", weights_only=True)["model_config"]
        model = model_from_weights(config, weights, "final")
        for k, v in model.state_dict().items():
            assert torch.equal(v.to(want), weights[k])
    assert 0.45 < sizes["bf16"] / sizes["fp32"] < 0.6, sizes


def test_the_dry_run_estimate_uses_the_final_dtype(tmp_path, monkeypatch, capsys):
    import re

    sizes = {}
    for dtype in ("fp32", "bf16"):
        overfitting(tmp_path, {"sink": "local", "dtype": dtype})
        code, out, err = run(tmp_path, monkeypatch, capsys, "--dry-run")
        assert code == 0, err
        line = next(line for line in out.splitlines() if "final model" in line)
        sizes[dtype] = re.search(r"([\d.]+) (KB|MB)", line).group(0)
    assert sizes["fp32"] != sizes["bf16"], sizes


def test_a_bf16_final_model_in_the_registry_is_served_as_its_signature_says(tmp_path, monkeypatch, capsys):
    """Weights stored in bf16, logits served in float32: the signature and ``mlflow.pyfunc``
    agree (numpy has no bfloat16)."""
    import mlflow
    import mlflow.pyfunc
    import numpy as np

    overfitting(tmp_path, {"sink": "mlflow_registry", "dtype": "bf16"})
    config = yaml.safe_load((tmp_path / "c.yaml").read_text())
    config["mlflow"] = {"experiment": "bf16", "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}
    write(tmp_path / "c.yaml", config)
    code, out, err = run(tmp_path, monkeypatch, capsys)
    assert code == 0, err[-3000:]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    mlflow.set_registry_uri(f"sqlite:///{tmp_path}/mlflow.db")
    uri = "models:/wmtp_baseline-mtp/1"
    served = mlflow.pyfunc.load_model(uri)
    (output,) = served.metadata.get_output_schema().inputs
    assert output.type == np.dtype("float32")
    ids = np.random.default_rng(0).integers(0, 256, (2, 32)).astype(np.int64)
    logits = served.predict(ids)
    assert logits.dtype == np.float32 and logits.shape[0] == 2 and logits.shape[2] == 32
    weights = torch.load(tmp_path / "ck" / "best" / "step_60" / "model.pt", weights_only=True)
    config = torch.load(tmp_path / "ck" / "best" / "step_60" / "trainer.pt", weights_only=True)["model_config"]
    with torch.no_grad():
        expected = model_from_weights(config, weights, "last").to(torch.bfloat16).eval()(torch.from_numpy(ids))
    torch.testing.assert_close(torch.from_numpy(logits), expected.float(), rtol=2e-2, atol=2e-2)



def test_the_dry_run_counts_the_best_checkpoints_among_those_retained(tmp_path, monkeypatch, capsys):
    """keep_last 2 and keep_best k 1: up to 3 checkpoints are held, and the estimate says so."""
    from wmtp_core.report import estimate

    overfitting(tmp_path, {"sink": "local"})  # keep_last 2, keep_best k 1, 60 steps saved every 5
    code, out, err = run(tmp_path, monkeypatch, capsys, "--dry-run")
    assert code == 0, err
    units = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9}

    def row(label: str) -> float:
        number, unit = re.search(rf"{label}\W+([\d.]+) (B|KB|MB|GB)", out).groups()
        return float(number) * units[unit]

    e = estimate(1000, 60, 5, 2, 0, True, keep_best=1)
    assert e.retained == 3 * e.per_save and estimate(1000, 60, 5, 2, 0, True).retained == 2 * e.per_save
    assert abs(row("resume: at most retained") / row("resume: per save") - 3) < 0.1, out
