"""Saves on preemption and on a clock: a real signal to a real process (and to one rank of two)
leaves a committed checkpoint of the step it stopped at, exit status 4, and a resume that
matches the uninterrupted run tensor for tensor; timed saves keep their schedule across resume."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import zygote
from builders import merge, recipe, write

from wmtp_core.run import EXIT_PREEMPTED

pytestmark = pytest.mark.slow

RANK_SIGNALLER = """
import os, signal, sys
from wmtp_core.engine import distributed
from wmtp_core.run import leave, main

# Observer plugins run on rank 0 only, so on rank 1 the real SIGTERM is sent from the step's one
# collective (World.agree), after its step AT: the only change to WMTP is where the signal
# comes from; its handling is the real one. The first call is the check before the first step
# (a signal while the run started), so step AT's is call AT + 1.
AT, RANK = int(sys.argv[1]), sys.argv[2]
agree, calls = distributed.World.agree, {"n": 0}

def agree_then_signal(self, *args):
    out = agree(self, *args)
    calls["n"] += 1
    if calls["n"] == AT + 1 and os.environ.get("RANK") == RANK:
        os.kill(os.getpid(), signal.SIGTERM)
    return out

distributed.World.agree = agree_then_signal
leave(main(sys.argv[3:]))
"""

SIGNALLER = """
import os, signal, sys
from wmtp_core import hookimpl
from wmtp_core.run import leave, main

AT, RANK = int(sys.argv[1]), sys.argv[2]

class Signaller:
    # a real SIGTERM to this process after step AT (on rank RANK only), and a second one while
    # the preemption save is being stored
    @hookimpl
    def wmtp_step_ended(self, event):
        if event.step == AT and "loss" in event.metrics and os.environ.get("RANK", "0") == RANK:
            os.kill(os.getpid(), signal.SIGTERM)

    @hookimpl
    def wmtp_resume_checkpoint_emitted(self, event):
        if event.step == AT + 1 and os.environ.get("RANK", "0") == RANK:
            os.kill(os.getpid(), signal.SIGTERM)

leave(main(sys.argv[3:], plugins=(Signaller(),)))
"""


def config(tmp: Path, **over) -> dict:
    base = {"seed": 9, "log_interval": 3,
            "paths": {"checkpoints": {"base_path": f"file://{tmp}/ck", "save_interval": 4, "keep_last": 5}},
            "mlflow": {"experiment": "pre", "tracking_uri": f"sqlite:///{tmp}/mlflow.db"},
            "storage": {"final": {"sink": "local"}}}
    return merge(base, over)


def recipe_of(steps: int) -> dict:
    return recipe(steps, optim={"lr": 0.003, "scheduler": "cosine", "warmup_ratio": 0.1},
                  model={"dropout": 0.1})


def in_process(tmp: Path, monkeypatch, capsys, *args: str):
    from wmtp_core.run import main

    monkeypatch.chdir(tmp)
    code = main(["--config", "c.yaml", "--recipe", "r.yaml", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def final(tmp: Path, run: str) -> dict:
    return torch.load(tmp / "ck" / run / "final" / "model.pt", weights_only=True)


def trainer_part(step_dir: Path, name: str = "trainer.pt") -> dict:
    return torch.load(step_dir / name, weights_only=True)


def test_sigterm_between_interval_saves_commits_that_step_exits_4_and_resumes_bit_exact(tmp_path, monkeypatch,
                                                                                       capsys):
    write(tmp_path / "c.yaml", config(tmp_path))
    write(tmp_path / "r.yaml", recipe_of(12))
    code, _, err = in_process(tmp_path, monkeypatch, capsys, "--run-name", "full")
    assert code == 0, err[-3000:]

    cut = zygote.run(["-c", SIGNALLER, "5", "0", "--config", "c.yaml", "--recipe", "r.yaml", "--run-name", "cut"],
                     cwd=tmp_path, timeout=300)
    assert cut.returncode == EXIT_PREEMPTED, cut.stderr[-3000:]
    assert "Traceback" not in cut.stderr
    assert "SIGTERM received again: the save in progress goes on" in cut.stderr
    run_dir = tmp_path / "ck" / "cut"
    assert sorted(p.name for p in run_dir.iterdir()) == ["step_4", "step_6"], "the step it stopped at, committed"
    assert not (run_dir / "final").exists(), "no final model until the run really ends"
    from wmtp_core.commit import CheckpointStore

    CheckpointStore.from_url(f"file://{tmp_path}/ck").verify(str(run_dir / "step_6"))

    import mlflow

    store = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)
    exp = client.get_experiment_by_name("pre")
    (mrun,) = client.search_runs([exp.experiment_id], filter_string="attributes.run_name = 'cut'")
    assert mrun.data.tags["wmtp.status"] == "preempted" and mrun.info.status == "KILLED"

    code, _, err = in_process(tmp_path, monkeypatch, capsys, "--run-name", "cut", "--resume", "latest")
    assert code == 0, err[-3000:]
    assert "step_6 (step 6)" in err
    a, b = final(tmp_path, "full"), final(tmp_path, "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert trainer_part(tmp_path / "ck" / "full" / "step_12")["losses"] == \
        trainer_part(tmp_path / "ck" / "cut" / "step_12")["losses"]


LEAVER = """
import atexit, sys
from wmtp_core import hookimpl
from wmtp_core.run import leave, main

class Said:
    # a plugin that prints with print() (block-buffered into a pipe) and leaves an exit handler
    @hookimpl
    def wmtp_run_ended(self, event):
        print("plugin: the run ended", event.status.value)
        atexit.register(lambda: print("plugin: exit handler"))  # the last line the process writes

leave(main(sys.argv[1:], plugins=(Said(),)))  # what python -m wmtp_core.run does, with a plugin
"""


def test_the_command_leaves_at_once_after_a_preemption_and_nothing_it_said_is_lost(tmp_path):
    """After a preemption the process skips the interpreter's teardown (``leave``), but only
    once the exit handlers ran and the streams were flushed: into pipes, where nothing is
    line-buffered, every line still arrives, a plugin's exit handler runs, and the MLflow run
    is ended and tagged."""
    write(tmp_path / "c.yaml", config(tmp_path))
    write(tmp_path / "r.yaml", recipe_of(10**6))
    proc = subprocess.Popen([sys.executable, "-c", LEAVER, "--config", "c.yaml", "--recipe", "r.yaml",
                             "--run-name", "cmd"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"})
    try:
        deadline = time.monotonic() + 240
        while not (tmp_path / "ck" / "cmd" / "step_4" / "manifest.json").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    said = re.search(r"preempted: step (\d+) is committed at (\S+);", err)
    assert said and "Traceback" not in err, err[-3000:]
    step = int(said.group(1))
    assert "Where this run's bytes went" in out and f"run 'cmd': preempted at step {step}" in out, out
    assert "plugin: the run ended preempted" in out, out
    assert out.rstrip().endswith("plugin: exit handler"), "the exit handlers ran, then the streams were flushed"
    from wmtp_core.commit import CheckpointStore

    assert CheckpointStore.from_url(f"file://{tmp_path}/ck").verify(said.group(2)).step == step
    import mlflow

    store = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)
    (mrun,) = client.search_runs([client.get_experiment_by_name("pre").experiment_id],
                                 filter_string="attributes.run_name = 'cmd'")
    assert mrun.info.status == "KILLED" and mrun.data.tags["wmtp.status"] == "preempted"


def test_a_signal_to_one_of_two_ranks_makes_both_save_the_same_step(tmp_path):
    write(tmp_path / "c.yaml", config(tmp_path, devices={"fsdp": {"enabled": True}}))
    write(tmp_path / "r.yaml", recipe_of(12))
    common = ["--config", "c.yaml", "--recipe", "r.yaml"]
    full = zygote.ranks(2, ["-m", "wmtp_core.run", *common, "--run-name", "full"], cwd=tmp_path)
    assert full.returncode == 0, full.stderr[-4000:]
    (tmp_path / "signaller.py").write_text(RANK_SIGNALLER)
    cut = zygote.ranks(2, ["signaller.py", "6", "1", *common, "--run-name", "cut"], cwd=tmp_path)
    assert cut.returncode != 0  # each rank exits 4; the launcher reports the workers' failure
    assert "exitcode: 4" in cut.stderr, cut.stderr[-4000:]
    run_dir = tmp_path / "ck" / "cut"
    assert sorted(p.name for p in run_dir.iterdir()) == ["step_4", "step_7"]
    manifest = json.loads((run_dir / "step_7" / "manifest.json").read_text())
    assert manifest["meta"]["world_size"] == 2
    assert trainer_part(run_dir / "step_7", "trainer_rank0.pt")["step"] == 7
    assert trainer_part(run_dir / "step_7", "trainer_rank1.pt")["step"] == 7, "both ranks saved step 7"

    resumed = zygote.ranks(2, ["-m", "wmtp_core.run", *common, "--run-name", "cut", "--resume", "latest"],
                           cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    a, b = final(tmp_path, "full"), final(tmp_path, "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_timed_saves_commit_without_a_step_interval_and_keep_their_schedule_across_resume(
        tmp_path, monkeypatch, capsys):
    # 100 steps train for at least 0.1 s here: several timed saves before the resume and after;
    # no evaluation in between (it does not count as training time, and it is what took long)
    every, first, last = 0.05, 40, 80
    ck = {"save_interval": 0, "save_every": f"{every}s", "keep_last": 1000}
    write(tmp_path / "c.yaml", config(tmp_path, paths={"checkpoints": ck}, mlflow=None, log_interval=10_000))
    write(tmp_path / "r.yaml", merge(recipe_of(first), {"optim": {"scheduler": "constant"}}))
    code, _, err = in_process(tmp_path, monkeypatch, capsys, "--run-name", "timed")
    assert code == 0, err[-3000:]
    write(tmp_path / "r.yaml", merge(recipe_of(last), {"optim": {"scheduler": "constant"}}))
    code, _, err = in_process(tmp_path, monkeypatch, capsys, "--run-name", "timed", "--resume", "latest")
    assert code == 0, err[-3000:]
    steps = sorted(int(p.name.split("_")[1]) for p in (tmp_path / "ck" / "timed").glob("step_*"))
    clocks = [trainer_part(tmp_path / "ck" / "timed" / f"step_{s}")["clock"] for s in steps]
    trained = [c["trained"] for c in clocks]
    at_resume = clocks[steps.index(first)]["trained"]
    assert trained == sorted(trained) and trained[-1] > at_resume > 0, "training time accumulates across resume"
    timed = [s for s in steps if s not in (first, last)]
    assert timed and any(s < first for s in timed) and any(s > first for s in timed), steps
    # every timed save comes at least save_every of training time after the previous one, the
    # first one after the resume included (the clock's last save is part of the resume state)
    marks = sorted({c["last_save"] for s, c in zip(steps, clocks) if s in timed})
    assert all(b - a >= every for a, b in zip(marks, marks[1:])), marks
    assert all(c["last_save"] == c["trained"] for s, c in zip(steps, clocks) if s in timed)
