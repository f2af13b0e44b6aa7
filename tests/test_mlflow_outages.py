"""An MLflow server that is down at the start, goes away during a run, or stays away: each is
reported within MLflow's own (bounded) retries, and no metric value is lost silently."""

from __future__ import annotations

import os
import re
from collections import Counter

import pytest
from builders import recipe, write
from conftest import MlflowServer, free_port, tree

from wmtp_core import hookimpl
from wmtp_core.run import EXIT_NOT_REGISTERED, EXIT_OK, EXIT_USAGE, main

pytestmark = pytest.mark.slow

STEPS = 30


class Outage:
    """Stops the real server after step ``down`` and, when ``up`` is given, starts it again on
    the same port and store after step ``up``; counts the metric values the run produced."""

    def __init__(self, server: MlflowServer, down: int, up: int | None = None) -> None:
        self.server, self.down, self.up = server, down, up
        self.produced: Counter = Counter()

    @hookimpl
    def wmtp_step_ended(self, event):
        if "loss" not in event.metrics:
            return
        self.produced.update(event.metrics.keys())
        if event.step == self.down:
            self.server.stop()
        if event.step == self.up:
            self.server.start()


@pytest.fixture
def server(tmp_path):
    (tmp_path / "artifacts").mkdir()
    srv = MlflowServer(tmp_path, str(tmp_path / "artifacts")).start()
    yield srv
    srv.stop()


def config(tmp_path, url: str) -> str:
    return write(tmp_path / "c.yaml", {
        "seed": 3,
        "paths": {"checkpoints": {"base_path": f"file://{tmp_path}/ck", "save_interval": 10, "keep_last": 2}},
        "mlflow": {"experiment": "outage", "tracking_uri": url},
    })


def the_run(url: str):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=url, registry_uri=url)
    (run,) = client.search_runs([client.get_experiment_by_name("outage").experiment_id])
    return client, run


def test_a_tracking_server_unreachable_at_the_start_is_one_line_naming_it_within_the_bound(
        tmp_path, monkeypatch, capsys):
    """Nothing listens at the URI. With WMTP's bounds on MLflow's retries (the environment sets
    none here), the run stops before its first step: exit 2, one line naming the URI."""
    for key in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.chdir(tmp_path)
    url = f"http://127.0.0.1:{free_port()}"
    write(tmp_path / "r.yaml", recipe(2))
    config(tmp_path, url)
    before = tree(tmp_path)
    code = main(["--config", "c.yaml", "--recipe", "r.yaml", "--run-name", "nobody"])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE, err[-3000:]
    (line,) = [x for x in err.splitlines() if x.strip()]
    assert line.startswith("error: ") and f"the MLflow server at {url} cannot be reached (Connection refused" in line
    assert "gave up after 3 retries" in line  # WMTP's bound, not MLflow's 7 retries
    assert not list(tmp_path.rglob("step_*")) and not (tmp_path / "mlruns").exists(), tree(tmp_path) - before


def test_metrics_of_a_server_killed_mid_run_are_sent_once_it_is_back(server, tmp_path, monkeypatch, capsys):
    """The server is killed after step 5 and started again (same port, same store) after step
    20. Training goes on; every metric value of every step arrives exactly once, and the run
    ends FINISHED with its wmtp.status and latest checkpoint tags."""
    from wmtp_plugins import mlflow_tracking

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # each try fails at once while it is down
    monkeypatch.setattr(mlflow_tracking, "FLUSH_SECONDS", 0.2)  # send (and retry) often in a short run
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "r.yaml", recipe(STEPS))
    outage = Outage(server, down=5, up=20)
    code = main(["--config", config(tmp_path, server.url), "--recipe", "r.yaml", "--run-name", "blip"],
                plugins=(outage,))
    out, err = capsys.readouterr()
    assert code == EXIT_OK, err[-3000:]
    assert f"the MLflow server at {server.url} cannot be reached (Connection refused)" in err
    assert "not sent to the MLflow server" not in err

    client, run = the_run(server.url)
    for key, produced in outage.produced.items():
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert sorted(steps) == sorted(set(steps)) and len(steps) == produced, (key, steps)
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == list(range(1, STEPS + 1))
    assert run.info.status == "FINISHED" and run.data.tags["wmtp.status"] == "finished"
    assert run.data.tags["wmtp.latest_resume"] == f"{tmp_path}/ck/blip/step_{STEPS}"
    assert client.search_model_versions("name='wmtp_baseline-mtp'")[0].tags["wmtp.step"] == str(STEPS)


def test_a_server_that_stays_away_costs_no_step_and_every_unsent_value_is_counted(
        server, tmp_path, monkeypatch, capsys):
    """The server (tracking and registry) is killed after step 5 and stays away: the run trains
    to the end, exits 3 with the retry command, and reports how many metric values MLflow does
    not hold. Started again, the server holds exactly the others."""
    from wmtp_plugins import mlflow_tracking

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setattr(mlflow_tracking, "FLUSH_SECONDS", 0.2)
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "r.yaml", recipe(STEPS))
    outage = Outage(server, down=5)
    code = main(["--config", config(tmp_path, server.url), "--recipe", "r.yaml", "--run-name", "gone"],
                plugins=(outage,))
    out, err = capsys.readouterr()
    assert code == EXIT_NOT_REGISTERED, err[-3000:]
    assert f"run 'gone': failed at step {STEPS}" in out
    flat = " ".join(err.split())
    assert f"wmtp register {tmp_path}/ck/gone/step_{STEPS} --config {tmp_path}/c.yaml" in flat
    unsent = re.search(rf"not sent to the MLflow server at {re.escape(server.url)}: (\d+) metric values "
                       rf"\(steps \d+-{STEPS}\)", flat)
    assert unsent, flat[-3000:]
    assert "the run's end (status FAILED)" in flat and "Traceback" not in err

    server.start()
    client, run = the_run(server.url)
    held = sum(len(client.get_metric_history(run.info.run_id, key)) for key in outage.produced)
    assert held + int(unsent[1]) == sum(outage.produced.values()), "metric values were lost without a word"


def test_mlflow_requests_are_bounded_unless_the_environment_says_otherwise(tmp_path, monkeypatch):
    """WMTP's defaults for MLflow's own retry variables, and a value the user set is kept."""
    from wmtp_plugins._mlflow import REQUEST_BOUNDS, configure

    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "7")
    configure({"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "bounds"})
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == REQUEST_BOUNDS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "3"
    assert os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] == "1"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"
