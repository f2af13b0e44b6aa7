"""MLflow's own UI, in a real browser: the address a run prints for its experiment opens on its
training runs, not on MLflow 3's GenAI overview (issue 17). A real ``mlflow server`` on loopback, a
real WMTP run tracked to it, and headless Chromium rendering the page, against the experiment's
plain address (MLflow 3.17's UI opens every experiment in GenAI mode unless the address asks for
``workflowType=machine_learning``, whatever the experiment's kind tag). Skipped on a machine
without Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import zygote
from builders import files, recipe, tiny_config
from conftest import MlflowServer

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
pytestmark = [pytest.mark.slow, pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine")]


def rendered(url: str, profile: Path) -> str:
    """The page's DOM once its scripts have run (Chromium's virtual time: no fixed sleep)."""
    proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           f"--user-data-dir={profile}", "--virtual-time-budget=30000", "--dump-dom", url],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.fixture
def server(tmp_path):
    srv = MlflowServer(tmp_path, str(tmp_path / "artifacts")).start()
    yield srv
    srv.stop()


def text(page: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page))


def test_the_address_a_run_prints_opens_its_experiment_on_its_training_runs(server, tmp_path):
    import mlflow

    config = tiny_config(tmp_path, mlflow={"experiment": "wmtp-ui", "tracking_uri": server.url})
    args = files(tmp_path, config, recipe(2))
    proc = zygote.run(["-m", "wmtp_core.run", *args, "--run-name", "ui-run"], cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = re.search(r"its experiment's training runs: (\S+)", proc.stdout + proc.stderr)
    assert printed, (proc.stdout + proc.stderr)[-2000:]
    address = printed.group(1)
    experiment = mlflow.MlflowClient(tracking_uri=server.url).get_experiment_by_name("wmtp-ui")
    assert address == f"{server.url}/#/experiments/{experiment.experiment_id}?workflowType=machine_learning"
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"

    shown = text(rendered(address, tmp_path / "profile-printed"))
    plain = text(rendered(f"{server.url}/#/experiments/{experiment.experiment_id}", tmp_path / "profile-plain"))
    # the printed address opens the runs table, with the run WMTP logged in it
    assert "ui-run" in shown and "Overview - Experiment" not in shown, shown[-3000:]
    # the experiment's plain address opens MLflow's GenAI overview, without the run: what the
    # printed address avoids (and what makes this test able to fail)
    assert "ui-run" not in plain and "Overview - Experiment" in plain, plain[-3000:]
