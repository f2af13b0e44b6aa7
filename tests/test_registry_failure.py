"""Contract 7: the registry unreachable at the end loses nothing, and one command registers later."""

from __future__ import annotations

import pytest
from builders import merge, recipe, write
from conftest import free_port

from wmtp_core.cli import main as wmtp
from wmtp_core.run import main

pytestmark = pytest.mark.slow

RECIPE = recipe(6)


def test_registry_down_at_the_end_exits_nonzero_keeps_the_state_and_register_later_works(
        tmp_path, monkeypatch, capsys):
    store = f"sqlite:///{tmp_path}/mlflow.db"
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there: connections are refused
    base = {
        "seed": 4,
        "paths": {"checkpoints": {"base_path": f"file://{tmp_path}/ck", "save_interval": 4, "keep_last": 2}},
    }
    write(tmp_path / "down.yaml", merge(base, {"mlflow": {"experiment": "down", "tracking_uri": store,
                                                          "registry_uri": down}}))
    write(tmp_path / "up.yaml", merge(base, {"mlflow": {"experiment": "down", "tracking_uri": store}}))
    write(tmp_path / "r.yaml", RECIPE)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    monkeypatch.chdir(tmp_path)  # MLflow puts artifacts under ./mlruns
    code = main(["--config", "down.yaml", "--recipe", "r.yaml", "--run-name", "down"])
    _, stderr = capsys.readouterr()
    assert code == 3, stderr[-3000:]
    err = " ".join(stderr.split())
    last = tmp_path / "ck" / "down" / "step_6"
    assert f"wmtp register {last}" in err
    assert "Traceback" not in stderr

    # the last step's resume state is committed and verifies
    code = wmtp(["checkpoints", "verify", str(last)])
    out, err = capsys.readouterr()
    assert code == 0, out + err

    # the registry is back: the one command from the message registers the final model, once
    for attempt in range(2):
        code = wmtp(["register", str(last), "--config", "up.yaml"])
        out, err = capsys.readouterr()
        assert code == 0, out + err
        assert "models:/wmtp_baseline-mtp/1" in out + err

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)
    (version,) = client.search_model_versions("name='wmtp_baseline-mtp'")
    assert version.tags["wmtp.lineage"]
    run = client.get_run(version.run_id)
    assert run.data.tags["wmtp.run"] == "down", "the model was not logged into the run's own MLflow run"
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 6
