"""Bit-exact resume: a run SIGKILLed at a step and resumed equals the uninterrupted run,
for every algorithm, and continues the same MLflow run."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import KILLER, run_cli

pytestmark = pytest.mark.slow


RECIPE = """
run: {{tags: [resume-test]}}
train: {{algo: {algo}, max_steps: 12}}
optim: {{lr: 0.003, scheduler: cosine, warmup_ratio: 0.1}}
data:
  train: {{sources: [stdlib], max_length: 32, batch_size: 4}}
model: {{d_model: 32, n_layers: 1, n_heads: 2, n_future: 3, max_seq_len: 32, dropout: 0.1}}
rho1: {{selection_mode: {mode}, skip_threshold_percentile: 0.3, min_ce_diff: 0.01}}
pretrain: {{enabled: true, max_steps: 3}}
critic: {{discount_lambda: 0.9, auxiliary_loss_coef: 0.1}}
"""

CONFIG = """
seed: 11
log_interval: 3
paths:
  models: {{ref: "models:/wmtp_baseline-mtp/1"}}
  checkpoints: {{base_path: "file://{base}", save_interval: 4, keep_last: 2}}
mlflow: {{experiment: resume, tracking_uri: "sqlite:///{store}"}}
storage:
  final: {{sink: local}}
"""

CASES = {
    "baseline-mtp": ("baseline-mtp", "weighted", 10),
    "rho1-weighted": ("rho1-wmtp", "weighted", 6),
    "rho1-token_skip": ("rho1-wmtp", "token_skip", 9),
    "critic-wmtp": ("critic-wmtp", "weighted", 5),
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """An MLflow store where a baseline run registered wmtp_baseline-mtp version 1."""
    tmp = tmp_path_factory.mktemp("store")
    (tmp / "c.yaml").write_text(
        f"seed: 1\npaths:\n  checkpoints: {{base_path: 'file://{tmp}/ref', save_interval: 0}}\n"
        f"mlflow: {{experiment: ref, tracking_uri: 'sqlite:///{tmp}/mlflow.db'}}\n")
    (tmp / "r.yaml").write_text(RECIPE.format(algo="baseline-mtp", mode="weighted").replace("max_steps: 12", "max_steps: 6"))
    proc = run_cli(["--config", "c.yaml", "--recipe", "r.yaml", "--run-name", "ref"], cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "models:/wmtp_baseline-mtp/1" in proc.stdout
    return tmp


def kill_at(step: int, args: list[str], cwd: Path):
    return subprocess.run([sys.executable, "-c", KILLER, str(step), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def final_weights(base: Path, run: str) -> dict:
    return torch.load(base / run / "final" / "model.pt", weights_only=True)


def history(base: Path, run: str, step: int) -> list[float]:
    return torch.load(base / run / f"step_{step}" / "trainer.pt", weights_only=True)["losses"]


def in_process(args, cwd, monkeypatch, capsys):
    """The same entry point as the command line, in this process (saves the import time)."""
    from wmtp_core.run import main

    monkeypatch.chdir(cwd)
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("case", list(CASES))
def test_sigkill_and_resume_is_bit_exact(store, tmp_path, case, monkeypatch, capsys):
    algo, mode, kill_step = CASES[case]
    base = tmp_path / "ckpt"
    (tmp_path / "c.yaml").write_text(CONFIG.format(base=base, store=store / "mlflow.db"))
    (tmp_path / "r.yaml").write_text(RECIPE.format(algo=algo, mode=mode))
    common = ["--config", "c.yaml", "--recipe", "r.yaml"]

    code, _, err = in_process([*common, "--run-name", "full"], tmp_path, monkeypatch, capsys)
    assert code == 0, err[-3000:]

    cut = kill_at(kill_step, [*common, "--run-name", "cut"], cwd=tmp_path)
    assert cut.returncode == -signal.SIGKILL, cut.stderr[-3000:]
    assert not (base / "cut" / "final").exists()

    code, _, err = in_process([*common, "--run-name", "cut", "--resume", "latest"], tmp_path,
                              monkeypatch, capsys)
    assert code == 0, err[-3000:]
    last_ckpt = (kill_step // 4) * 4
    assert f"step_{last_ckpt}" in err, "did not resume from the newest committed checkpoint"

    a, b = final_weights(base, "full"), final_weights(base, "cut")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    losses_full, losses_cut = history(base, "full", 12), history(base, "cut", 12)
    assert len(losses_full) == 12
    assert losses_full == losses_cut, "per-step losses differ after resume"
    assert min(losses_full[-3:]) < losses_full[0], "the loss did not go down"

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    exp = client.get_experiment_by_name("resume")
    runs = client.search_runs([exp.experiment_id], f"tags.`wmtp.run` = 'cut' and tags.`wmtp.algo` = '{algo}'")
    mine = [r for r in runs if r.data.tags.get("wmtp.lineage") and
            Path(r.data.tags.get("wmtp.latest_resume", "")).parent == base / "cut"]
    assert len(mine) == 1, "the resumed run did not continue its MLflow run"
    assert mine[0].data.tags["wmtp.resumed_from"].endswith(f"step_{last_ckpt}")
