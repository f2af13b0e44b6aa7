"""The first hour: every surface a new user touches answers fast, truthfully, without a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import zygote
from builders import TINY_RECIPE, files, merge, tiny_config, write
from conftest import ROOT
from hf_models import ORIGIN_MODELS

from wmtp_core import ConfigError, hookimpl


def run(capsys, *args, plugins=()):
    from wmtp_core.run import main

    code = main([str(a) for a in args], plugins=plugins)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err, err
    return code, out, err


def cli(capsys, *args):
    from wmtp_core.cli import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err, err
    return code, out, err


# ----------------------------------------------------------------------------- 1. the dry run tells the truth
REFUSED = {
    "rho1 without a reference": (
        {}, {"train": {"algo": "rho1-wmtp"}}, {},
        ("paths.models.ref is required by rho1-wmtp: a Hugging Face causal LM folder, a models:/NAME/VERSION URI "
         "or a committed WMTP checkpoint (.../step_N or .../final), sharing the base model's vocabulary")),
    "distributed without a launcher": (
        {"devices": {"distributed": {"enabled": True}}}, {}, {},
        "devices.distributed.enabled is true but no launcher set RANK/WORLD_SIZE"),
    "an MLflow file store MLflow would refuse": (
        {"mlflow": {"tracking_uri": "file:///tmp/wmtp-never-created"}}, {}, {"MLFLOW_ALLOW_FILE_STORE": "false"},
        "mlflow.tracking_uri: 'file:///tmp/wmtp-never-created' is a file store, which MLflow"),
    "a base model folder without weights (the origin's own)": (
        {"paths": {"models": {"base": str(ORIGIN_MODELS / "tiny-reward-model")}}}, {}, {},
        "holds no weights (model.safetensors or model.safetensors.index.json)"),
    "an s3:// tracking URI": (
        {"mlflow": {"tracking_uri": "s3://wmtp-artifacts/mlflow"}}, {}, {},
        "mlflow.tracking_uri: 's3://wmtp-artifacts/mlflow' cannot be used by MLflow as a tracking store"),
    "a data path that does not exist": (
        {"paths": {"datasets": {"corpus": "file:///nowhere/corpus.jsonl"}}},
        {"data": {"train": {"sources": ["corpus"]}}}, {},
        "paths.datasets.corpus: 'file:///nowhere/corpus.jsonl' does not exist"),
    "a reference path that does not exist": (
        {"paths": {"models": {"ref": "/nowhere/ck/run/step_10"}}}, {"train": {"algo": "rho1-wmtp"}}, {},
        "paths.models.ref: '/nowhere/ck/run/step_10' does not exist"),
    "nccl on a CPU": (
        {"devices": {"fsdp": {"enabled": True}, "distributed": {"backend": "nccl"}}}, {}, {},
        "devices.distributed.backend: 'nccl' needs CUDA devices"),
    "local sink on an s3:// final path": (
        {"mlflow": None, "storage": {"final": {"sink": "local", "base_path": "s3://bucket/models"}}}, {}, {},
        "sink 'local' keeps files on local disk, but the final base path 's3://bucket/models' is s3://"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_the_dry_run_refuses_what_the_run_refuses_in_the_same_words(tmp_path, capsys, monkeypatch, case):
    monkeypatch.chdir(tmp_path)
    config_over, recipe_over, env, message = REFUSED[case]
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    args = files(tmp_path, tiny_config(tmp_path, **config_over), recipe_over)
    before = {p.name for p in tmp_path.iterdir()}
    dry = run(capsys, *args, "--dry-run")
    real = run(capsys, *args)
    assert dry[0] == real[0] == 2
    assert message in dry[2], dry[2]
    assert dry[2] == real[2], "the dry run and the run refuse in different words"
    assert {p.name for p in tmp_path.iterdir()} == before, "a refused run wrote something"


# ----------------------------------------------------------------------------- 2. no traceback for bad input
def test_an_unknown_key_lists_what_is_accepted_after_a_separator(tmp_path, capsys):
    config = write(tmp_path / "c.yaml", {"paths": {"nonsense": 1}})
    code, _, err = run(capsys, "--config", config, "--dry-run")
    assert code == 2 and "paths.nonsense: unknown key; accepted keys here: checkpoints, datasets, models" in err


def test_a_boolean_where_a_choice_is_expected_lists_the_choices(tmp_path, capsys):
    config = write(tmp_path / "c.yaml", {"devices": {"mixed_precision": True}})
    code, _, err = run(capsys, "--config", config, "--dry-run")
    line = " ".join(err.split())
    assert code == 2 and "devices.mixed_precision: True is not accepted" in line
    assert "accepted: 'no', 'fp32', 'bf16', 'fp16'" in line and "quote it" in line


@pytest.mark.parametrize("kind", ["missing", "directory", "binary", "dangling link", "link loop", "empty dir glob"])
def test_a_config_path_that_cannot_be_read_is_one_line(tmp_path, capsys, kind):
    path = tmp_path / "c.yaml"
    if kind == "directory":
        path.mkdir()
    elif kind == "binary":
        path.write_bytes(b"\xff\xfe\x00seed: 1\x80")
    elif kind == "dangling link":
        path.symlink_to(tmp_path / "gone.yaml")
    elif kind == "link loop":
        path.symlink_to(tmp_path / "c.yaml")
    elif kind == "empty dir glob":
        path = tmp_path / "none" / "*.yaml"
    for option in ("--config", "--recipe"):
        code, _, err = run(capsys, option, path, "--dry-run")
        assert code == 2 and err.startswith("error: ") and str(path) in err, err
        assert len(err.strip().splitlines()) == 1


KILL_SCRIPT = """
import os, signal, sys
from wmtp_core import hookimpl
from wmtp_core.run import main

class Interrupt:
    # Ctrl-C, for real: SIGINT to this process at a chosen point of the run
    @hookimpl(trylast=True)  # after the MLflow run was opened
    def wmtp_run_started(self, event):
        if sys.argv[1] == "start":
            os.kill(os.getpid(), signal.SIGINT)

    @hookimpl
    def wmtp_step_ended(self, event):
        if sys.argv[1] == "step" and event.step == 3 and "loss" in event.metrics:
            os.kill(os.getpid(), signal.SIGINT)

sys.exit(main(sys.argv[2:], plugins=(Interrupt(),)))
"""


@pytest.mark.slow
@pytest.mark.parametrize("when", ["start", "step"])
def test_ctrl_c_is_one_line_exit_130_and_the_mlflow_run_is_ended(tmp_path, when):
    import mlflow

    args = files(tmp_path, tiny_config(tmp_path), {"train": {"max_steps": 8}})
    proc = zygote.run(["-c", KILL_SCRIPT, when, *args], cwd=tmp_path, timeout=300)
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "KeyboardInterrupt" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert lines == ["error: interrupted (Ctrl-C): committed checkpoints are intact; continue with "
                     "--resume latest"], proc.stderr
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    (run_,) = client.search_runs(client.get_experiment_by_name("tests").experiment_id)
    assert run_.info.status == "FAILED" and run_.data.tags["wmtp.status"] == "failed"
    assert run_.data.tags["wmtp.reason"] == "interrupted"


def test_the_experiment_is_marked_as_model_training_and_a_kind_set_before_stays(tmp_path, capsys, monkeypatch):
    """WMTP's experiment is of the kind MLflow 3 gives classic training (its UI lists "Training
    runs" for it); the UI itself opens in its GenAI mode (a choice kept in the browser) unless the
    address asks for ``workflowType=machine_learning``: the run ends printing such an address."""
    import mlflow

    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, *files(tmp_path, tiny_config(tmp_path), {"train": {"max_steps": 2}}))
    assert code == 0, err[-3000:]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("tests")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    (run_,) = client.search_runs(experiment.experiment_id)
    assert (f"MLflow run {run_.info.run_id}; its experiment's training runs: `mlflow server --backend-store-uri "
            f"sqlite:///{tmp_path}/mlflow.db`, then http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}"
            "?workflowType=machine_learning") in err, err[-2000:]

    other = client.create_experiment("mine", tags={"mlflow.experimentKind": "finetuning"})
    config = tiny_config(tmp_path, mlflow={"experiment": "mine"})
    assert run(capsys, *files(tmp_path, config, {"train": {"max_steps": 2}, "run": {"name": "b"}}, name="b"))[0] == 0
    assert client.get_experiment(other).tags["mlflow.experimentKind"] == "finetuning"


# ----------------------------------------------------------------------------- 3. progress without a terminal
def test_without_a_terminal_progress_is_plain_lines_at_a_steady_rhythm():
    from rich.console import Console

    from wmtp_core.progress import PlainLines

    out = []
    console = Console(file=None, force_terminal=False, width=200)
    console.print = lambda text, **kw: out.append(text)
    now = [0.0]
    lines = PlainLines(console, "r", total=100, start=0, clock=lambda: now[0])
    for step in range(1, 101):
        now[0] += 0.5 if step < 50 else 40.0  # slow after step 50: the clock takes over
        lines.update(step, {"loss": 1.0})
    steps = [int(line.split()[2].split("/")[0]) for line in out]
    assert steps[0] == 1 and steps[-1] == 100
    assert all(b - a <= 10 for a, b in zip(steps, steps[1:]) if a < 50), steps
    assert all(b - a == 1 for a, b in zip(steps, steps[1:]) if a >= 51), "a 40 s step was not reported"
    assert "objective 1.000" in out[0] and "steps/s" in out[0] and "s left" in out[0]


def test_a_resumed_run_keeps_the_rhythm_of_the_whole_run_and_names_its_two_numbers_apart():
    from rich.console import Console

    from wmtp_core.progress import PlainLines

    out = []
    console = Console(file=None, force_terminal=False, width=200)
    console.print = lambda text, **kw: out.append(text)
    lines = PlainLines(console, "r", total=30, start=12, clock=lambda: 0.0)  # resumed at step 12 of 30
    for step in range(13, 31):
        lines.update(step, {"loss": 3.25, "eval_loss": 10.75} if step % 2 == 0 else {"loss": 3.25})
    steps = [int(line.split()[2].split("/")[0]) for line in out]
    assert steps == [13, 15, 18, 21, 24, 27, 30], "every tenth of the run (3 steps), not every step"
    assert out[-1].startswith("r step 30/30 objective 3.250, held-out CE 10.750, ")
    assert " loss " not in out[-1] and " eval " not in out[-1]


def test_a_run_whose_stderr_is_a_file_prints_progress_lines(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, *files(tmp_path, tiny_config(tmp_path, mlflow=None), {"train": {"max_steps": 20}}))
    assert code == 0
    progress = [line for line in err.splitlines() if line.startswith("tiny step ")]
    assert progress[0].startswith("tiny step 1/20 objective ") and progress[-1].startswith("tiny step 20/20 objective ")
    assert len(progress) >= 3 and all("steps/s" in line for line in progress)


# ----------------------------------------------------------------------------- 4. MLflow shows the run as it is
class StopAt:
    """Raises KeyboardInterrupt (as Ctrl-C would) right after a step."""

    def __init__(self, step):
        self.step = step

    @hookimpl
    def wmtp_step_ended(self, event):
        if event.step == self.step and "loss" in event.metrics:
            raise KeyboardInterrupt


class Peek:
    """Reads what the MLflow store already holds while the run is still training."""

    def __init__(self, store, at):
        self.store, self.at, self.seen = store, at, None

    @hookimpl
    def wmtp_step_ended(self, event):
        import mlflow

        if event.step == self.at and "loss" in event.metrics:
            client = mlflow.MlflowClient(tracking_uri=self.store)
            (run_,) = client.search_runs(client.get_experiment_by_name("tests").experiment_id)
            self.seen = [m.step for m in client.get_metric_history(run_.info.run_id, "loss")]


@pytest.mark.slow
def test_mlflow_shows_metrics_while_training_no_duplicates_after_resume_and_the_latest_tags(
        tmp_path, capsys, monkeypatch):
    import mlflow

    from wmtp_plugins import mlflow_tracking

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(mlflow_tracking, "FLUSH_SECONDS", 0.0)  # the clock is always due
    store = f"sqlite:///{tmp_path}/mlflow.db"
    args = files(tmp_path, tiny_config(tmp_path, paths={"checkpoints": {"save_interval": 4}}),
                 {"train": {"max_steps": 10}})
    peek = Peek(store, at=5)
    code, _, err = run(capsys, *args, plugins=(StopAt(7), peek))
    assert code == 130
    assert peek.seen == [1, 2, 3, 4], "metrics were not visible before step 50"

    code, out, err = run(capsys, *args, "--resume", "latest")
    assert code == 0, err
    client = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)
    (run_,) = client.search_runs(client.get_experiment_by_name("tests").experiment_id)
    steps = [m.step for m in client.get_metric_history(run_.info.run_id, "loss")]
    assert sorted(steps) == list(range(1, 11)), f"steps logged twice or missing: {sorted(steps)}"
    tags = run_.data.tags
    assert tags["wmtp.status"] == "finished" and "wmtp.reason" not in tags

    (version,) = client.search_model_versions("name='wmtp_baseline-mtp'")
    assert version.tags["wmtp.algo"] == "baseline-mtp" and version.tags["wmtp.step"] == "10"
    assert version.tags["wmtp.resume_location"] == str(tmp_path / "ck" / "tiny")
    assert version.tags["wmtp.run"] == "tiny" and version.tags["wmtp.lineage"] == tags["wmtp.lineage"]
    for words in ("WMTP run 'tiny'", "baseline-mtp", "after 10 steps", "final loss", str(tmp_path / "ck" / "tiny")):
        assert words in version.description


# ----------------------------------------------------------------------------- 5. wmtp answers quickly
def heavy_imports(args: list[str], cwd: Path, ok: tuple[int, ...] = (0,)) -> set[str]:
    code = "import sys; from wmtp_core.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", code, *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode in ok, proc.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    return {m for m in ("torch", "mlflow") if m in imported}


def test_everyday_commands_on_file_sinks_import_neither_torch_nor_mlflow(tmp_path):
    import torch

    from wmtp_core import Role
    from wmtp_core.commit import CheckpointStore
    from wmtp_core.filesink import torch_writer

    store = CheckpointStore.from_url(f"file://{tmp_path}/ck")
    store.write("r", "step_2", {"model.pt": torch_writer({"w": torch.ones(3)})}, step=2, role=Role.RESUME,
                lineage="L1", meta={"algo": "baseline-mtp"})
    config = write(tmp_path / "c.yaml", {"mlflow": None, "paths": {"checkpoints": {"base_path": f"file://{tmp_path}/ck"}}})
    for args in (["plugins"], ["checkpoints", "ls", f"{tmp_path}/ck"],
                 ["report", "r", "--config", config], ["gc", f"{tmp_path}/ck", "--dry-run"]):
        assert heavy_imports(args, tmp_path) == set(), f"wmtp {' '.join(args)} imported torch or mlflow"
    # verify deserialises every part (weights-only) as a run would: it needs torch, never mlflow
    assert heavy_imports(["checkpoints", "verify", f"{tmp_path}/ck/r"], tmp_path, ok=(0, 1)) == {"torch"}


# ----------------------------------------------------------------------------- 6, 7. report and names
@pytest.mark.slow
def test_report_finds_the_final_model_the_sink_holds_under_its_own_base_path(tmp_path, capsys, monkeypatch):
    """The shipped no-mlflow example keeps the final model under storage.final.base_path."""
    monkeypatch.chdir(tmp_path)
    config = ROOT / "examples" / "configs" / "config.no-mlflow.yaml"
    recipe = write(tmp_path / "r.yaml", merge(TINY_RECIPE, {"run": {"name": "files"}}))
    assert run(capsys, "--config", config, "--recipe", recipe)[0] == 0
    code, out, _ = cli(capsys, "report", "files", "--config", config, "--json")
    assert code == 0
    (final,) = json.loads(out)["final"]
    assert final["sink"] == "local" and final["bytes"] > 0
    assert Path(final["uri"]).is_relative_to(tmp_path / "models")


def test_one_name_for_one_thing_a_final_model_on_s3_goes_through_the_s3_sink(tmp_path, capsys):
    config = tiny_config(tmp_path, mlflow=None, paths={"checkpoints": {"base_path": "s3://bucket/runs"}})
    code, out, _ = run(capsys, *files(tmp_path, config), "--dry-run")
    assert code == 0
    assert "final   -> sink s3" in out and "final   -> sink local" not in out


# ----------------------------------------------------------------------------- the configuration hook
class Picky:
    @hookimpl
    def wmtp_check_config(self, config):
        if config["seed"] == 13:
            raise ConfigError("seed: 13 is not accepted by the picky plugin; accepted: any other seed")


def test_wmtp_check_config(tmp_path, capsys):
    """A plugin refuses a configuration before anything is written, under --dry-run too."""
    args = files(tmp_path, tiny_config(tmp_path, seed=13, mlflow=None))
    for extra in (["--dry-run"], []):
        code, _, err = run(capsys, *args, *extra, plugins=(Picky(),))
        assert code == 2 and "seed: 13 is not accepted by the picky plugin" in err
    assert not (tmp_path / "ck").exists()
    assert run(capsys, *files(tmp_path, tiny_config(tmp_path, seed=14, mlflow=None)), "--dry-run",
               plugins=(Picky(),))[0] == 0
