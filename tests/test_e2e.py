"""The default run, end to end, in fresh processes: what the README promises."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import zygote
from conftest import tree

pytestmark = pytest.mark.slow

PROBE = "def wmtp(x):\n    return [x for x in range(10) if x % 2]\n" * 3


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("default-run")
    proc = zygote.run(["-m", "wmtp_core.run"], cwd=cwd)  # the README's command, in a process of its own
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd, proc


def logits_of_mlflow_model(cwd: Path, uri: str, text: str, length: int) -> tuple[list, list]:
    """Load a registered model in a fresh interpreter, with MLflow's pytorch flavor and as a
    ``python_function`` model given an int64 array, and return both logits."""
    code = f"""
import json, sys, numpy as np, mlflow, mlflow.pytorch, mlflow.pyfunc, torch
mlflow.set_tracking_uri("sqlite:///mlflow.db")
mlflow.set_registry_uri("sqlite:///mlflow.db")
model = mlflow.pytorch.load_model({uri!r})
ids = torch.tensor([list({text!r}.encode()[:{length}])], dtype=torch.long)
with torch.no_grad():
    out = model(ids)
served = mlflow.pyfunc.load_model({uri!r}).predict(ids.numpy())
assert isinstance(served, np.ndarray) and served.dtype == np.float32, (type(served), served.dtype)
json.dump([out.tolist(), served.tolist()], sys.stdout)
"""
    proc = zygote.run(["-c", code], cwd=cwd, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_default_run_keeps_exactly_keep_last_committed_checkpoints(default_run):
    cwd, _ = default_run
    (run_dir,) = list((cwd / "checkpoints").iterdir())
    steps = sorted(p.name for p in run_dir.iterdir())
    assert steps == ["step_100", "step_75"]
    for step in steps:
        manifest = json.loads((run_dir / step / "manifest.json").read_text())
        assert manifest["role"] == "resume" and manifest["run"] == run_dir.name
        assert {f["path"] for f in manifest["files"]} == {"model.pt", "optimizer.pt", "trainer.pt"}


def test_default_run_registers_the_final_model_once_and_no_checkpoint_in_mlflow(default_run):
    import mlflow

    cwd, proc = default_run
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{cwd}/mlflow.db",
                                 registry_uri=f"sqlite:///{cwd}/mlflow.db")
    versions = client.search_model_versions("name='wmtp_baseline-mtp'")
    assert [str(v.version) for v in versions] == ["1"]
    run_id = versions[0].run_id
    # its one artifact is the storage picture (a PNG), never a checkpoint file
    assert [a.path for a in client.list_artifacts(run_id)] == ["wmtp-storage.png"], \
        "the MLflow run holds checkpoint artifacts"
    run = client.get_run(run_id)
    (run_dir,) = list((cwd / "checkpoints").iterdir())
    assert run.data.tags["wmtp.resume_location"] == str(run_dir)
    assert run.data.params["recipe.train.algo"] == "baseline-mtp"
    losses = client.get_metric_history(run_id, "loss")
    assert len(losses) == 100
    assert losses[-1].value < losses[0].value, "the loss did not go down"
    assert "final_loss" in run.data.metrics
    # nothing of the resume state is under the model's artifacts either
    model_files = [p.name for p in (cwd / "mlruns").rglob("*") if p.is_file()]
    assert not {"optimizer.pt", "trainer.pt", "manifest.json"} & set(model_files)
    assert "models:/wmtp_baseline-mtp/1" in proc.stdout


def test_registered_model_gives_the_trained_logits_in_a_fresh_process(default_run):
    import torch

    from wmtp_core.engine.model import ModelConfig, MTPModel

    cwd, _ = default_run
    (run_dir,) = list((cwd / "checkpoints").iterdir())
    weights = torch.load(run_dir / "step_100" / "model.pt", weights_only=True)
    model = MTPModel(ModelConfig())
    model.load_state_dict(weights)
    model.eval()
    ids = torch.tensor([list(PROBE.encode()[:128])], dtype=torch.long)
    with torch.no_grad():
        expected = model(ids)
    got, served = logits_of_mlflow_model(cwd, "models:/wmtp_baseline-mtp/1", PROBE, 128)
    got, served = torch.tensor(got), torch.tensor(served)
    assert got.shape == served.shape == expected.shape == (1, 4, 128, 256)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(served, expected, rtol=1e-5, atol=1e-5)


def test_default_run_prints_where_each_roles_bytes_went(default_run):
    _, proc = default_run
    assert "resume  -> local" in proc.stdout
    assert "final   -> mlflow_registry: models:/wmtp_baseline-mtp/1" in proc.stdout
    assert "4 saved, 2 kept" in proc.stdout


def test_dry_run_leaves_the_working_directory_unchanged(tmp_path, monkeypatch, capsys):
    from wmtp_core.run import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("x")
    before = tree(tmp_path)
    code = main(["--dry-run"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert tree(tmp_path) == before
    assert "resume  -> sink local" in out
    assert "final   -> sink mlflow_registry" in out
    assert "a trainer that also copies every save to the tracking store" in out
    assert "nothing was written" in out
