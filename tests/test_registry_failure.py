"""Contract 7: the registry going down at the end loses nothing, and one command registers later."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import MlflowServer

pytestmark = pytest.mark.slow

STOPPER = """
import os, signal, sys
from wmtp_core import hookimpl
from wmtp_core.run import main

class StopRegistry:
    '''Kills the MLflow server right after the last resume checkpoint is committed.'''
    @hookimpl
    def wmtp_checkpoint_committed(self, receipt):
        if receipt.role.value == "resume" and receipt.step == int(sys.argv[2]):
            os.killpg(int(sys.argv[1]), signal.SIGKILL)  # the server and its workers

sys.exit(main(sys.argv[3:], plugins=(StopRegistry(),)))
"""

RECIPE = """
train: {max_steps: 6}
data:
  train: {sources: [stdlib], max_length: 32, batch_size: 4}
model: {d_model: 32, n_layers: 1, n_heads: 2, n_future: 2, max_seq_len: 32}
"""


def test_registry_down_at_the_end_exits_nonzero_keeps_the_state_and_register_later_works(tmp_path):
    server = MlflowServer(tmp_path, str(tmp_path / "artifacts")).start()
    (tmp_path / "c.yaml").write_text(f"""
seed: 4
paths:
  checkpoints: {{base_path: "file://{tmp_path}/ck", save_interval: 4, keep_last: 2}}
mlflow: {{experiment: down, tracking_uri: "{server.url}"}}
""")
    (tmp_path / "r.yaml").write_text(RECIPE)
    env = {**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    try:
        proc = subprocess.run(
            [sys.executable, "-c", STOPPER, str(server.proc.pid), "6",
             "--config", "c.yaml", "--recipe", "r.yaml", "--run-name", "down"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    finally:
        server.stop()
    assert proc.returncode == 3, proc.stderr[-3000:]
    err = " ".join(proc.stderr.split())
    last = tmp_path / "ck" / "down" / "step_6"
    assert f"wmtp register {last}" in err
    assert "Traceback" not in proc.stderr

    # the last step's resume state is committed and verifies
    verify = subprocess.run([str(Path(sys.executable).parent / "wmtp"), "checkpoints", "verify", str(last)],
                            capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0, verify.stdout + verify.stderr

    # the registry comes back; the one command from the message registers the final model
    server = MlflowServer(tmp_path, str(tmp_path / "artifacts"), port=server.port).start()
    try:
        reg = subprocess.run([str(Path(sys.executable).parent / "wmtp"), "register", str(last),
                              "--config", "c.yaml"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=600)
        assert reg.returncode == 0, reg.stdout + reg.stderr
        assert "models:/wmtp_baseline-mtp/1" in reg.stdout

        import mlflow

        client = mlflow.MlflowClient(tracking_uri=server.url, registry_uri=server.url)
        (version,) = client.search_model_versions("name='wmtp_baseline-mtp'")
        assert version.tags["wmtp.lineage"]
        run = client.get_run(version.run_id)
        assert run.data.tags["wmtp.run"] == "down", "the model was not logged into the run's own MLflow run"
    finally:
        server.stop()
