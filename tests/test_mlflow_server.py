"""Training against a real ``mlflow server`` over HTTP, with its artifact store on S3."""

from __future__ import annotations

import pytest

from conftest import MlflowServer, run_cli, s3_keys

pytestmark = pytest.mark.slow

RECIPE = """
train: {max_steps: 6}
data:
  train: {sources: [stdlib], max_length: 32, batch_size: 4}
model: {d_model: 32, n_layers: 1, n_heads: 2, n_future: 2, max_seq_len: 32}
"""

RESUME_FILES = {"model.pt", "optimizer.pt", "trainer.pt", "manifest.json"}


@pytest.fixture
def server(s3_server, tmp_path):
    import boto3

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="mlflow-artifacts")
    srv = MlflowServer(tmp_path, "s3://mlflow-artifacts/store").start()
    yield srv
    srv.stop()


def test_mlflow_server_holds_the_final_model_only_and_resume_lives_under_its_prefix(
        s3_server, bucket, server, tmp_path):
    (tmp_path / "c.yaml").write_text(f"""
seed: 2
paths:
  checkpoints: {{base_path: "s3://{bucket}/resume", save_interval: 2, keep_last: 2}}
mlflow: {{experiment: remote, tracking_uri: "{server.url}"}}
""")
    (tmp_path / "r.yaml").write_text(RECIPE)
    proc = run_cli(["--config", "c.yaml", "--recipe", "r.yaml", "--run-name", "remote"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "final   -> mlflow_registry: models:/wmtp_baseline-mtp/1" in proc.stdout

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=server.url, registry_uri=server.url)
    (version,) = client.search_model_versions("name='wmtp_baseline-mtp'")
    run = client.get_run(version.run_id)
    assert run.data.tags["wmtp.resume_location"] == f"s3://{bucket}/resume/remote"
    assert run.data.params["recipe.train.max_steps"] == "6"
    assert client.list_artifacts(version.run_id) == []

    artifact_keys = s3_keys(s3_server, "mlflow-artifacts")
    assert any(k.endswith("MLmodel") for k in artifact_keys)
    assert any(k.endswith(".pt2") for k in artifact_keys), artifact_keys
    names = {k.rsplit("/", 1)[1] for k in artifact_keys}
    assert not names & RESUME_FILES, "resume state reached the MLflow artifact store"
    assert not any("/step_" in k for k in artifact_keys)

    resume_keys = s3_keys(s3_server, bucket)
    assert resume_keys and all(k.startswith("resume/remote/step_") for k in resume_keys)
    assert {k.split("/")[2] for k in resume_keys} == {"step_4", "step_6"}
    assert not any((tmp_path / "mlruns").glob("**/*")), "artifacts were written locally"
