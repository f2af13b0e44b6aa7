"""Contract 7: the registry unreachable at the end, or failing halfway, loses nothing, and the one
command the run prints registers later, exactly once."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import zygote
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


def _printed_command(stderr: str) -> str:
    """The command the run printed after "register it later with:"."""
    return stderr.split("register it later with:", 1)[1].strip().splitlines()[0]


@pytest.mark.parametrize("completion", ["printed command", "resumed run"])
def test_a_registration_that_failed_after_the_upload_is_completed_with_exactly_one_version(
        completion, tmp_path, monkeypatch, capsys):
    """The model was logged, then the registry failed before its version existed. The retry
    command the run printed (run verbatim from another directory) or the resumed run completes
    that registration from the logged model: one version, fully tagged, and one copy."""
    import mlflow
    from mlflow.exceptions import MlflowException

    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    project.mkdir(), elsewhere.mkdir()
    # a store relative to the run's working directory, as the embedded default is (named after the
    # test: MLflow keeps one store per URI in a process, whatever the working directory)
    db = f"{tmp_path.name}.db"
    write(project / "c.yaml", {"seed": 4, "mlflow": {"experiment": "half", "tracking_uri": f"sqlite:///{db}"},
                               "paths": {"checkpoints": {"base_path": f"file://{tmp_path}/ck",
                                                         "save_interval": 4, "keep_last": 2}}})
    write(project / "r.yaml", RECIPE)
    monkeypatch.chdir(project)

    def registry_fails(*args, **kwargs):
        raise MlflowException("the registry failed after the model was logged")

    # a registry failing at exactly this moment, between the upload and the version, cannot be
    # produced for real: the one injected fault of this test
    with monkeypatch.context() as patch:
        patch.setattr(mlflow.MlflowClient, "create_model_version", registry_fails)
        code = main(["--config", "c.yaml", "--recipe", "r.yaml", "--run-name", "half"])
    _, stderr = capsys.readouterr()
    assert code == 3, stderr[-3000:]
    assert "Traceback" not in stderr
    store = f"sqlite:///{project / db}"
    client = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)
    (run,) = client.search_runs([client.get_experiment_by_name("half").experiment_id])
    lineage = run.data.tags["wmtp.lineage"]
    (logged,) = client.search_logged_models([run.info.experiment_id])
    assert logged.tags["wmtp.lineage"] == lineage and not client.search_model_versions("name='wmtp_baseline-mtp'")

    if completion == "printed command":
        command = _printed_command(stderr)
        assert f"--config {project / 'c.yaml'}" in command and f"-C {project}" in command, command
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        # verbatim, through the installed ``wmtp`` script
        proc = subprocess.run(shlex.split(command), cwd=elsewhere, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        # again (forked, tests/zygote.py): it finds the version and stores nothing
        proc = zygote.run(["-c", "import sys; from wmtp_core.cli import main; sys.exit(main())",
                           *shlex.split(command)[1:]], cwd=elsewhere, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "already stored at models:/wmtp_baseline-mtp/1" in proc.stdout
        assert not list(elsewhere.iterdir()), "the retry wrote a store of its own in its working directory"
    else:
        code = main(["--config", "c.yaml", "--recipe", "r.yaml", "--run-name", "half", "--resume", "latest"])
        out, err = capsys.readouterr()
        assert code == 0, err[-3000:]
        assert "final   -> mlflow_registry: models:/wmtp_baseline-mtp/1" in out

    (version,) = client.search_model_versions("name='wmtp_baseline-mtp'")
    assert version.source == f"models:/{logged.model_id}", "the model was logged a second time"
    assert [m.model_id for m in client.search_logged_models([run.info.experiment_id])] == [logged.model_id]
    assert version.tags == {"wmtp.lineage": lineage, "wmtp.run": "half", "wmtp.algo": "baseline-mtp",
                            "wmtp.step": "6", "wmtp.resume_location": f"{tmp_path}/ck/half"}
    assert "Final model of WMTP run 'half'" in version.description and version.run_id == run.info.run_id
