"""Training against a real ``mlflow server`` over HTTP, with its artifact store on S3."""

from __future__ import annotations

import pytest
from builders import recipe, write
from conftest import MlflowServer, s3_keys

from wmtp_core.run import main

pytestmark = pytest.mark.slow

RECIPE = recipe(6)
PASSWORD = "Zq-tracking-password-5150"

RESUME_FILES = {"model.pt", "optimizer.pt", "trainer.pt", "manifest.json"}


@pytest.fixture
def server(s3_server, tmp_path):
    import boto3

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="mlflow-artifacts")
    srv = MlflowServer(tmp_path, "s3://mlflow-artifacts/store").start()
    yield srv
    srv.stop()


def test_mlflow_server_holds_the_final_model_only_and_resume_lives_under_its_prefix(
        s3_server, bucket, server, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # where MLflow would write ./mlruns, were artifacts local
    write(tmp_path / "c.yaml", {
        "seed": 2,
        "paths": {"checkpoints": {"base_path": f"s3://{bucket}/resume", "save_interval": 2, "keep_last": 2}},
        # credentials in the URI (this server ignores them): they are printed nowhere
        "mlflow": {"experiment": "remote", "tracking_uri": server.url.replace("http://", f"http://alice:{PASSWORD}@")},
    })
    write(tmp_path / "r.yaml", RECIPE)
    code = main(["--config", "c.yaml", "--recipe", "r.yaml", "--run-name", "remote"])
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    assert PASSWORD not in out + err and "View run" not in out, out  # MLflow's own line wrote it to stdout
    assert "final   -> mlflow_registry: models:/wmtp_baseline-mtp/1" in out

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=server.url, registry_uri=server.url)
    (version,) = client.search_model_versions("name='wmtp_baseline-mtp'")
    run = client.get_run(version.run_id)
    assert run.data.tags["wmtp.resume_location"] == f"s3://{bucket}/resume/remote"
    assert run.data.params["recipe.train.max_steps"] == "6"
    # the address printed opens the experiment on its training runs (MLflow 3's UI opens in its
    # GenAI mode unless the address asks otherwise)
    assert (f"MLflow run {run.info.run_id}; its experiment's training runs: {server.url.rstrip('/')}/#/experiments/"
            f"{run.info.experiment_id}?workflowType=machine_learning") in err
    assert [a.path for a in client.list_artifacts(version.run_id)] == ["wmtp-storage.png"]  # a PNG, no checkpoint

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
