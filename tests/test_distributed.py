"""Two CPU processes (torchrun, gloo) with FSDP2: sharded resume state through the same sinks,
one manifest per checkpoint, the final model stored once, resume across world sizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import zygote
from builders import merge, recipe, write
from conftest import s3_keys

pytestmark = pytest.mark.slow

def recipe_of(steps: int) -> dict:
    return recipe(steps, optim={"lr": 0.01, "scheduler": "constant", "warmup_ratio": 0.0})


KILL_RANK1_MID_SAVE = """
import os, signal, sys
import torch.distributed as dist
from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter
from wmtp_core.run import main

step = int(sys.argv[1])
real = FsspecWriter.write_data
calls = {"n": 0}

def write_data(self, plan, planner):
    calls["n"] += 1
    # the save of step `step` is the (step // 2)-th save; rank 1 dies inside it
    if calls["n"] == step // 2 and dist.get_rank() == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, plan, planner)

FsspecWriter.write_data = write_data
sys.exit(main(sys.argv[2:]))
"""


def config(base: str, **over) -> dict:
    return merge({
        "seed": 6,
        "log_interval": 2,
        "paths": {"checkpoints": {"base_path": base, "save_interval": 2, "keep_last": 2}},
        "devices": {"fsdp": {"enabled": True}},
    }, over)


LOCAL_FINAL = {"mlflow": None, "storage": {"final": {"sink": "local"}}}


def torchrun(n: int, args: list[str], cwd: Path):
    """The real launcher: ``torchrun --standalone``."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]
    return subprocess.run([*launcher, "-m", "wmtp_core.run", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


def ranks(n: int, args: list[str], cwd: Path, script: str | None = None, timeout: int = 600):
    """The same job with its ranks forked from the zygote, as torchrun would start them
    (tests/zygote.py: ``ranks``): for tests whose subject is the job, not the launcher."""
    target = [str(cwd / "script.py")] if script else ["-m", "wmtp_core.run"]
    if script:
        (cwd / "script.py").write_text(script)
    return zygote.ranks(n, [*target, *args], cwd=cwd, timeout=timeout)


def single(args, cwd):
    return zygote.run(["-m", "wmtp_core.run", *args], cwd=cwd, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


def manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def losses(step_dir: Path, rank: int = 0) -> list[float]:
    return torch.load(step_dir / f"trainer_rank{rank}.pt", weights_only=True)["losses"]


def test_two_ranks_commit_sharded_checkpoints_with_one_manifest_and_register_the_final_once(tmp_path):
    write(tmp_path / "c.yaml", config(f"file://{tmp_path}/ck",
                                      mlflow={"experiment": "d", "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}))
    write(tmp_path / "r.yaml", recipe_of(6))
    proc = torchrun(2, ["--config", "c.yaml", "--recipe", "r.yaml", "--run-name", "two"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run_dir = tmp_path / "ck" / "two"
    assert sorted(p.name for p in run_dir.iterdir()) == ["step_4", "step_6"]
    for step in ("step_4", "step_6"):
        m = manifest(run_dir / step)
        names = {f["path"] for f in m["files"]}
        assert {".metadata", "trainer_rank0.pt", "trainer_rank1.pt"} <= names
        assert len([n for n in names if n.endswith(".distcp")]) == 2, names
        assert m["meta"]["world_size"] == 2 and m["meta"]["format"] == "dcp"
        assert list((run_dir / step).glob("manifest*")) == [run_dir / step / "manifest.json"]
    assert proc.stdout.count("Where this run's bytes went") == 1, "a rank other than 0 reported"

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
                                 registry_uri=f"sqlite:///{tmp_path}/mlflow.db")
    assert [str(v.version) for v in client.search_model_versions("name='wmtp_baseline-mtp'")] == ["1"]
    runs = client.search_runs([client.get_experiment_by_name("d").experiment_id])
    assert len(runs) == 1, "the tracking observer logged from more than one rank"
    assert len(client.get_metric_history(runs[0].info.run_id, "loss")) == 6


def test_two_ranks_write_shards_to_s3(s3_server, bucket, tmp_path):
    write(tmp_path / "c.yaml", config(f"s3://{bucket}/dist", mlflow=None,
                                      storage={"final": {"sink": "local", "base_path": f"file://{tmp_path}/final"}}))
    write(tmp_path / "r.yaml", recipe_of(4))
    proc = ranks(2, ["--config", "c.yaml", "--recipe", "r.yaml", "--run-name", "s3"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    keys = s3_keys(s3_server, bucket, "dist/s3/")
    for step in ("step_2", "step_4"):
        mine = [k for k in keys if k.startswith(f"dist/s3/{step}/")]
        assert f"dist/s3/{step}/manifest.json" in mine
        assert sum(k.endswith(".distcp") for k in mine) == 2
        assert f"dist/s3/{step}/.metadata" in mine
    assert (tmp_path / "final" / "s3" / "final" / "manifest.json").exists()


def uninterrupted(tmp: Path, algo: str) -> Path:
    """Six steps of ``algo`` on two ranks, never interrupted, with the config and recipe the
    tests interrupt and resume (``tmp/c.yaml``, ``tmp/r.yaml``): its directory."""
    write(tmp / "c.yaml", config(f"file://{tmp}/ck", **LOCAL_FINAL, paths={"checkpoints": {"keep_last": 3}}))
    # critic-wmtp: its value head is sharded with the model and resumed from the shards
    write(tmp / "r.yaml", merge(recipe_of(6), {"train": {"algo": algo}, "pretrain": {"max_steps": 2}}))
    full = ranks(2, ["--config", "c.yaml", "--recipe", "r.yaml", "--run-name", "full"], tmp)
    assert full.returncode == 0, full.stderr[-4000:]
    return tmp / "ck" / "full"


@pytest.fixture(scope="module")
def baseline_full(tmp_path_factory) -> Path:
    """One uninterrupted baseline-mtp run, compared with by every test that cuts one."""
    return uninterrupted(tmp_path_factory.mktemp("full"), "baseline-mtp")


def beside(full: Path, tmp: Path) -> None:
    """``tmp`` set up like the uninterrupted run's directory: its files, and ``tmp/ck/full``."""
    import shutil

    for name in ("c.yaml", "r.yaml"):
        text = (full.parent.parent / name).read_text().replace(str(full.parent.parent), str(tmp))
        (tmp / name).write_text(text)
    shutil.copytree(full, tmp / "ck" / "full")


@pytest.mark.parametrize("algo", ["baseline-mtp", "critic-wmtp"])
def test_sigkill_of_one_rank_mid_save_leaves_nothing_resume_accepts_and_resume_is_bit_exact(
        tmp_path, algo, request):
    if algo == "baseline-mtp":
        beside(request.getfixturevalue("baseline_full"), tmp_path)
    else:
        uninterrupted(tmp_path, algo)
    common = ["--config", "c.yaml", "--recipe", "r.yaml"]

    cut = ranks(2, ["4", *common, "--run-name", "cut"], tmp_path, script=KILL_RANK1_MID_SAVE)
    assert cut.returncode != 0
    step4 = tmp_path / "ck" / "cut" / "step_4"
    assert not (step4 / "manifest.json").exists(), "a save killed on one rank was committed"

    # resumed with asynchronous sharded saves: staged shards written in the background, on a
    # checkpoint process group of their own, must give the very same run
    write(tmp_path / "ca.yaml", config(f"file://{tmp_path}/ck", **LOCAL_FINAL,
                                       paths={"checkpoints": {"async": True, "keep_last": 3}}))
    resumed = ranks(2, ["--config", "ca.yaml", "--recipe", "r.yaml", "--run-name", "cut",
                           "--resume", "latest"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "step_2 (step 2)" in resumed.stderr
    assert "asynchronous saves: 2" in resumed.stdout
    a = torch.load(tmp_path / "ck" / "full" / "final" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "ck" / "cut" / "final" / "model.pt", weights_only=True)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert losses(tmp_path / "ck" / "full" / "step_6") == losses(tmp_path / "ck" / "cut" / "step_6")


def test_a_checkpoint_of_two_ranks_resumes_on_one_and_one_on_two(tmp_path):
    write(tmp_path / "c.yaml", config(f"file://{tmp_path}/ck", **LOCAL_FINAL))
    write(tmp_path / "r4.yaml", recipe_of(4))
    write(tmp_path / "r8.yaml", recipe_of(8))
    first = ranks(2, ["--config", "c.yaml", "--recipe", "r4.yaml", "--run-name", "a"], tmp_path)
    assert first.returncode == 0, first.stderr[-4000:]
    import shutil

    shutil.rmtree(tmp_path / "ck" / "a" / "final")  # continue the run further
    on_one = single(["--config", "c.yaml", "--recipe", "r8.yaml", "--run-name", "a", "--resume", "latest"], tmp_path)
    assert on_one.returncode == 0, on_one.stderr[-4000:]
    hist = losses(tmp_path / "ck" / "a" / "step_8")
    assert len(hist) == 8
    # the loss carries on from where the two ranks left it, not from an untrained model
    assert abs(hist[4] - hist[3]) < 0.5 * abs(hist[0] - hist[3])
    assert json.loads((tmp_path / "ck" / "a" / "step_8" / "manifest.json").read_text())["meta"]["world_size"] == 1

    first = single(["--config", "c.yaml", "--recipe", "r4.yaml", "--run-name", "b"], tmp_path)
    assert first.returncode == 0, first.stderr[-4000:]
    shutil.rmtree(tmp_path / "ck" / "b" / "final")
    on_two = ranks(2, ["--config", "c.yaml", "--recipe", "r8.yaml", "--run-name", "b", "--resume", "latest"], tmp_path)
    assert on_two.returncode == 0, on_two.stderr[-4000:]
    hist = losses(tmp_path / "ck" / "b" / "step_8")
    assert len(hist) == 8 and abs(hist[4] - hist[3]) < 0.5 * abs(hist[0] - hist[3])


FAIL_RANK1_MID_SAVE = """
import errno, sys
import torch
import torch.distributed as dist
from wmtp_core.run import main

# One rank's disk fails inside the sharded save of step 4, after its shards were written: a
# fault of one rank on a shared directory cannot be produced for real here, so rank 1's write of
# its trainer state raises the error a full disk gives.
real = torch.save

def save(obj, f, *args, **kwargs):
    if dist.is_initialized() and dist.get_rank() == 1 and "step_4/trainer_rank1" in str(getattr(f, "path", f)):
        raise OSError(errno.ENOSPC, "No space left on device")
    return real(obj, f, *args, **kwargs)

torch.save = save
sys.exit(main(sys.argv[1:]))
"""


def test_a_rank_failing_mid_save_ends_the_job_within_the_bound_and_commits_nothing(tmp_path):
    import time

    # a process-group timeout far longer than the bound: the job must not wait for it
    write(tmp_path / "c.yaml", config(f"file://{tmp_path}/ck", **LOCAL_FINAL,
                                      devices={"distributed": {"timeout": 900}}))
    write(tmp_path / "r.yaml", recipe_of(8))
    t0 = time.monotonic()
    proc = ranks(2, ["--config", "c.yaml", "--recipe", "r.yaml", "--run-name", "f"], tmp_path,
                    script=FAIL_RANK1_MID_SAVE)
    took = time.monotonic() - t0
    assert proc.returncode != 0
    assert took < 300, f"the job took {took:.0f} s: it waited for the process group's timeout"
    err = " ".join(proc.stderr.split())
    assert "the sharded save of step 4" in err and "rank 1: OSError: [Errno 28] No space left on device" in err
    run_dir = tmp_path / "ck" / "f"
    assert (run_dir / "step_2" / "manifest.json").exists(), "the previous checkpoint stays"
    assert not (run_dir / "step_4").exists(), "nothing of the failed save is left, nothing committed"
    from wmtp_core.commit import CheckpointStore

    CheckpointStore.from_url(f"file://{tmp_path}/ck").verify(str(run_dir / "step_2"))


def test_a_corrupt_shard_in_the_newest_checkpoint_is_quarantined_and_two_ranks_finish_bit_exact(
        tmp_path, baseline_full):
    beside(baseline_full, tmp_path)
    common = ["--config", "c.yaml", "--recipe", "r.yaml"]

    # a run that stopped after step 4, whose newest checkpoint then lost a byte of a shard
    import shutil

    run_dir = tmp_path / "ck" / "cut"
    shutil.copytree(tmp_path / "ck" / "full", run_dir, ignore=shutil.ignore_patterns("final", "step_6"))
    for step in (2, 4):
        m = manifest(run_dir / f"step_{step}")
        m["run"] = "cut"
        (run_dir / f"step_{step}" / "manifest.json").write_text(json.dumps(m))
    shard = max((p for p in (run_dir / "step_4").iterdir() if p.suffix == ".distcp"), key=lambda p: p.stat().st_size)
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x40
    shard.write_bytes(bytes(data))

    resumed = ranks(2, [*common, "--run-name", "cut", "--resume", "latest"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    err = " ".join(resumed.stderr.split())
    assert f"quarantined {run_dir}/step_4 as {run_dir}/step_4.quarantined-" in err
    assert "step_2 (step 2)" in err
    (aside,) = run_dir.glob("step_4.quarantined-*")
    assert (aside / shard.name).read_bytes() == bytes(data), "kept as it was found"
    assert (run_dir / "step_4" / "manifest.json").exists(), "step 4 committed again"
    a = torch.load(tmp_path / "ck" / "full" / "final" / "model.pt", weights_only=True)
    b = torch.load(run_dir / "final" / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_asynchronous_sharded_saves_of_every_step_never_cross_the_training_loop_s_collectives(tmp_path):
    """A save of every step: each lease check before a save meets the previous save still in
    flight in its thread. The check's collective must not share that save's group (the two
    threads' collectives would meet in another order on each rank: a hang or a mismatch)."""
    write(tmp_path / "c.yaml", config(f"file://{tmp_path}/ck", **LOCAL_FINAL,
                                      paths={"checkpoints": {"async": True, "save_interval": 1, "keep_last": 2}}))
    write(tmp_path / "r.yaml", recipe_of(8))
    # a hang is the failure it guards against: it takes about 20 s
    proc = ranks(2, ["--config", "c.yaml", "--recipe", "r.yaml", "--run-name", "a"], tmp_path, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "asynchronous saves: 8" in proc.stdout, proc.stdout[-2000:]
    assert sorted(p.name for p in (tmp_path / "ck" / "a").iterdir()) == ["final", "step_7", "step_8"]
    assert len(losses(tmp_path / "ck" / "a" / "step_8")) == 8
