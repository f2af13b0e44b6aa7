"""Contract 7: the registry unreachable at the end loses nothing, and one command registers later."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_port

pytestmark = pytest.mark.slow

RECIPE = """
train: {max_steps: 6}
data:
  train: {sources: [stdlib], max_length: 32, batch_size: 4}
model: {d_model: 32, n_layers: 1, n_heads: 2, n_future: 2, max_seq_len: 32}
"""


def test_registry_down_at_the_end_exits_nonzero_keeps_the_state_and_register_later_works(tmp_path):
    store = f"sqlite:///{tmp_path}/mlflow.db"
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there: connections are refused
    base = f"""
seed: 4
paths:
  checkpoints: {{base_path: "file://{tmp_path}/ck", save_interval: 4, keep_last: 2}}
"""
    (tmp_path / "down.yaml").write_text(base + f"mlflow: {{experiment: down, tracking_uri: '{store}', registry_uri: '{down}'}}\n")
    (tmp_path / "up.yaml").write_text(base + f"mlflow: {{experiment: down, tracking_uri: '{store}'}}\n")
    (tmp_path / "r.yaml").write_text(RECIPE)
    env = {**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    proc = subprocess.run([sys.executable, "-m", "wmtp_core.run", "--config", "down.yaml", "--recipe", "r.yaml",
                           "--run-name", "down"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 3, proc.stderr[-3000:]
    err = " ".join(proc.stderr.split())
    last = tmp_path / "ck" / "down" / "step_6"
    assert f"wmtp register {last}" in err
    assert "Traceback" not in proc.stderr

    wmtp = str(Path(sys.executable).parent / "wmtp")
    # the last step's resume state is committed and verifies
    verify = subprocess.run([wmtp, "checkpoints", "verify", str(last)], capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0, verify.stdout + verify.stderr

    # the registry is back: the one command from the message registers the final model, once
    for attempt in range(2):
        reg = subprocess.run([wmtp, "register", str(last), "--config", "up.yaml"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=600)
        assert reg.returncode == 0, reg.stdout + reg.stderr
        assert "models:/wmtp_baseline-mtp/1" in reg.stdout + reg.stderr

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)
    (version,) = client.search_model_versions("name='wmtp_baseline-mtp'")
    assert version.tags["wmtp.lineage"]
    run = client.get_run(version.run_id)
    assert run.data.tags["wmtp.run"] == "down", "the model was not logged into the run's own MLflow run"
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 6
