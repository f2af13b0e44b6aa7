"""One run, two storage pictures that agree: a run preempted by a real SIGTERM and resumed holds
a checkpoint off the save schedule, which ``wmtp report`` explains from its manifest, and the
MLflow run's ``wmtp-storage.png`` logged at the end of the resumed part shows the whole run, with
the totals ``wmtp report`` prints. Also: clock saves, and checkpoints written before the
manifests said why they were saved. Real runs, a real signal, a real MLflow sqlite store."""

from __future__ import annotations

import io
import json
from pathlib import Path

import attrs
import pytest
import zygote
from builders import files, tiny_config
from conftest import migrated_mlflow_db

from wmtp_core.cli import main as wmtp
from wmtp_core.commit import CheckpointStore
from wmtp_core.report import reconstruct

pytestmark = pytest.mark.slow

PICTURE = "wmtp-storage.png"
SIGNALLER = """
import os, signal, sys
from wmtp_core import hookimpl
from wmtp_core.run import leave, main

AT = int(sys.argv[1])

class Signaller:
    # a real SIGTERM to this process once step AT has trained
    @hookimpl
    def wmtp_step_ended(self, event):
        if event.step == AT and "loss" in event.metrics:
            os.kill(os.getpid(), signal.SIGTERM)

leave(main(sys.argv[2:], plugins=(Signaller(),)))
"""


def cli(capsys, *args):
    code = wmtp([str(a) for a in args])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


@pytest.fixture(scope="module")
def preempted(tmp_path_factory):
    """Run ``p`` (save_interval 4, keep_last 2, 12 steps, the final model registered in MLflow),
    SIGTERMed after step 5 (it stops after step 6) and resumed to the end: it holds step_6, step_8 and step_12."""
    cwd = tmp_path_factory.mktemp("preempted")
    migrated_mlflow_db(cwd / "mlflow.db")
    config = tiny_config(cwd, paths={"checkpoints": {"save_interval": 4, "keep_last": 2}})
    args = files(cwd, config, {"train": {"max_steps": 12}}) + ["--run-name", "p"]
    cut = zygote.run(["-c", SIGNALLER, "5", *args], cwd=cwd, timeout=300)
    assert cut.returncode == 4, cut.stderr[-3000:]
    rest = zygote.run(["-m", "wmtp_core.run", *args, "--resume", "latest"], cwd=cwd, timeout=300)
    assert rest.returncode == 0, rest.stderr[-3000:]
    assert sorted(p.name for p in (cwd / "ck" / "p").iterdir()) == ["step_12", "step_6", "step_8"]
    return cwd, args[1]


def meta(step_dir: Path) -> dict:
    return json.loads((step_dir / "manifest.json").read_text())["meta"]


def test_every_save_records_why_it_was_made(preempted):
    cwd, _ = preempted
    run_dir = cwd / "ck" / "p"
    assert meta(run_dir / "step_6")["saved_because"] == "preempted"
    assert meta(run_dir / "step_8")["saved_because"] == "interval"
    assert meta(run_dir / "step_12")["saved_because"] == "interval"


def test_the_report_explains_a_preemption_save_and_replays_the_rest(preempted, capsys):
    cwd, config = preempted
    code, out, _ = cli(capsys, "report", "p", "--config", config, "--price-per-gb-month", "0.023")
    assert code == 0
    assert "does not describe" not in out, out
    # step_4 was deleted by retention: replayed from the schedule, not drawn as held
    assert "1 deleted saves inferred from save_interval 4" in out, out
    code, out, _ = cli(capsys, "report", "p", "--config", config, "--price-per-gb-month", "0.023", "--json")
    report = json.loads(out)
    assert report["resume"]["committed"] == 3
    assert report["storage"]["held_bytes"] == report["total_bytes"]


def test_checkpoints_older_than_the_field_are_explained_by_the_resume_that_followed(preempted):
    """A manifest written before ``saved_because`` existed: the step a later part resumed from
    (its manifests' ``resumed_from``) is the last step of a part, not a foreign save."""
    from wmtp_plugins.retention import make_keep_last

    cwd, _ = preempted
    store = CheckpointStore.from_url(f"file://{cwd}/ck")
    old = [attrs.evolve(m, meta={k: v for k, v in m.meta.items() if k != "saved_because"})
           for _, m in store.list("p")]
    policy = make_keep_last({"keep_last": 2})
    history = reconstruct("p", old, [], 4, policy)
    assert "does not describe" not in history.note, history.note
    assert [s.step for s in history.saves] == [4, 6, 8, 12] and history.inferred == 1
    # nothing explains step 6 when no manifest names it and its own says nothing
    alone = [attrs.evolve(m, meta={**m.meta, "resumed_from": None}) for m in old]
    history = reconstruct("p", alone, [], 4, policy)
    assert history.note == ("the config does not describe this run (it holds steps [6], which save_interval 4 "
                            "does not save and no manifest says why): only what it holds is drawn")
    # a manifest that says it is an interval save of another schedule: another config
    interval = [attrs.evolve(m, meta={**m.meta, "saved_because": "interval"}) for m in alone]
    assert "does not describe" in reconstruct("p", interval, [], 4, policy).note


def test_the_mlflow_picture_of_a_resumed_run_shows_the_whole_run_with_the_reports_totals(preempted, capsys):
    import mlflow
    from PIL import Image

    cwd, config = preempted
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{cwd}/mlflow.db", registry_uri=f"sqlite:///{cwd}/mlflow.db")
    (version,) = client.search_model_versions("name='wmtp_baseline-mtp'")
    (artifact,) = client.list_artifacts(version.run_id)
    assert artifact.path == PICTURE
    local = Path(client.download_artifacts(version.run_id, PICTURE, str(cwd / "dl")))
    drawn = json.loads(Image.open(io.BytesIO(local.read_bytes())).text["wmtp-storage"])

    code, out, _ = cli(capsys, "report", "p", "--config", config, "--price-per-gb-month", "0.023", "--json")
    report = json.loads(out)
    assert code == 0
    assert drawn["resume_bytes"] == report["resume"]["bytes"]
    assert drawn["held_bytes"] == report["total_bytes"] == report["storage"]["held_bytes"]
    # and the copy-everything trainer beside it: every resume save of both parts, step_4 included
    assert drawn["dual_writer_bytes"] == report["storage"]["dual_writer_bytes"]
    assert drawn["last_step"] == 12 and drawn["note"] == ""


def test_a_clock_save_is_explained_by_its_manifest(tmp_path, monkeypatch, capsys):
    """``save_every`` saves between the interval saves: each says ``timed``; the report
    replays the run without calling them foreign."""
    from wmtp_core.run import main as train

    config = tiny_config(tmp_path, mlflow=None, log_interval=10_000,
                         paths={"checkpoints": {"save_interval": 2, "keep_last": 3, "save_every": "0.0001s"}})
    args = files(tmp_path, config, {"train": {"max_steps": 4}})
    monkeypatch.chdir(tmp_path)
    code = train(args + ["--run-name", "t"])
    assert code == 0, capsys.readouterr().err[-3000:]
    capsys.readouterr()
    run_dir = tmp_path / "ck" / "t"
    assert sorted(p.name for p in run_dir.glob("step_*")) == ["step_2", "step_3", "step_4"]
    assert [meta(run_dir / f"step_{s}")["saved_because"] for s in (2, 3, 4)] == ["interval", "timed", "interval"]
    code, out, _ = cli(capsys, "report", "t", "--config", args[1], "--price-per-gb-month", "0.023", "--json")
    storage = json.loads(out)["storage"]
    assert code == 0 and storage["note"] == "" and storage["inferred"] == 0
