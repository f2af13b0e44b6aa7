"""Elastic restarts: ``torchrun --max-restarts`` with ``--resume auto``. A worker SIGKILLed in
the middle of a sharded save makes torchrun stop the other one (SIGTERM) and start the job
again; the new attempt takes the run's lease, resumes from the newest committed checkpoint and
finishes bit-exact with the uninterrupted run. docs/distributed.md, "Elastic restarts"."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_distributed import baseline_full, beside, losses  # noqa: F401 - baseline_full: a fixture

pytestmark = pytest.mark.slow

KILL_ON_FIRST_ATTEMPT = """
import json, os, signal, sys, time
from pathlib import Path
import torch.distributed as dist
from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter
from wmtp_core.preemption import Preemption
from wmtp_core.run import leave, main

signals = Preemption().install()  # as python -m wmtp_core.run does
victim, lease = int(sys.argv[1]), Path(sys.argv[2])
attempt = os.environ["TORCHELASTIC_RESTART_COUNT"]
real = FsspecWriter.write_data
calls = {"n": 0}

def write_data(self, plan, planner):
    calls["n"] += 1
    if dist.get_rank() == 0:  # who holds the run's lease, as this attempt's rank 0 sees it
        with open("leases.jsonl", "a") as f:
            f.write(json.dumps({"attempt": attempt, "pid": os.getpid(),
                                "holder": json.loads(lease.read_text())["pid"]}) + "\\n")
    if attempt == "0" and calls["n"] == 2:  # inside the save of step 4, first attempt only
        if dist.get_rank() == victim:
            os.kill(os.getpid(), signal.SIGKILL)
        # the survivor goes on with the save once torchrun's SIGTERM reached it
        deadline = time.monotonic() + 30
        while signals.requested() is None and time.monotonic() < deadline:
            time.sleep(0.02)
    return real(self, plan, planner)

FsspecWriter.write_data = write_data
leave(main(sys.argv[3:], signals=signals))
"""

STAMP = re.compile(r"^[IWE]\d{4} (\d\d):(\d\d):(\d\d\.\d+) ")


def elastic(tmp: Path, victim: int, run: str) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 --max-restarts 2`` of the run, whose rank
    ``victim`` is SIGKILLed inside the save of step 4 of the first attempt."""
    (tmp / "kill.py").write_text(KILL_ON_FIRST_ATTEMPT)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "--max-restarts", "2"]
    args = ["--config", "c.yaml", "--recipe", "r.yaml", "--run-name", run, "--resume", "auto"]
    return subprocess.run([*launcher, "kill.py", str(victim), str(tmp / "ck" / run / ".wmtp-lease"), *args],
                          cwd=tmp, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def seconds(line: str) -> float:
    h, m, s = STAMP.match(line).groups()
    return int(h) * 3600 + int(m) * 60 + float(s)


def survivor_exit(err: str) -> float:
    """Seconds from torchrun's SIGTERM to the survivor until torchrun saw every worker gone."""
    lines = err.splitlines()
    (i, sent), = [(i, line) for i, line in enumerate(lines) if "closing signal SIGTERM" in line]
    ended = next(line for line in lines[i:] if STAMP.match(line) and "failed (exitcode" in line)
    return (seconds(ended) - seconds(sent)) % 86400


def check(tmp: Path, proc: subprocess.CompletedProcess, run: str) -> list[dict]:
    """What both tests check; returns the leases rank 0 read, in order."""
    err = proc.stderr
    assert proc.returncode == 0, err[-6000:]
    run_dir = tmp / "ck" / run
    assert f"--resume auto: run {run!r} has no committed checkpoint" in err  # attempt 0: fresh
    # the survivor took torchrun's SIGTERM, left at once, committed nothing of step 4
    assert "SIGTERM received: finishing this step and saving it" in err
    assert "Unable to shutdown process" not in err, "a worker outlived torchrun's shutdown timeout"
    assert survivor_exit(err) < 10
    assert f"removed staging {run_dir}/step_4: a save of this run that never finished" in err
    assert f"resuming {run!r} from {run_dir}/step_2 (step 2)" in err
    assert "is being written by another process" not in err
    # bit-exact with the uninterrupted run
    a = torch.load(tmp / "ck" / "full" / "final" / "model.pt", weights_only=True)
    b = torch.load(run_dir / "final" / "model.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert losses(tmp / "ck" / "full" / "step_6") == losses(run_dir / "step_6")
    for step in (4, 6):
        assert (run_dir / f"step_{step}" / "manifest.json").exists()
    # the lease: each attempt's rank 0 held it while it saved; released at the end
    assert not (run_dir / ".wmtp-lease").exists(), "the lease was left behind"
    seen = [json.loads(line) for line in (tmp / "leases.jsonl").read_text().splitlines()]
    assert {s["attempt"] for s in seen} == {"0", "1"}, seen
    assert all(s["holder"] == s["pid"] for s in seen), seen
    first, again = ({s["pid"] for s in seen if s["attempt"] == n} for n in ("0", "1"))
    assert len(first) == len(again) == 1 and first != again, seen
    return seen


def test_torchrun_restarts_the_job_after_rank_1_is_killed_mid_save_and_it_resumes_bit_exact(
        tmp_path, baseline_full):  # noqa: F811 - the fixture
    beside(baseline_full, tmp_path)
    proc = elastic(tmp_path, victim=1, run="el1")
    check(tmp_path, proc, "el1")
    # rank 0 released its lease as it left: the restart found none to take over
    assert "taking over the lease" not in proc.stderr


def test_torchrun_restarts_the_job_after_rank_0_is_killed_and_its_lease_is_taken_over_at_once(
        tmp_path, baseline_full):  # noqa: F811 - the fixture
    beside(baseline_full, tmp_path)
    proc = elastic(tmp_path, victim=0, run="el0")
    seen = check(tmp_path, proc, "el0")
    (dead,) = {s["pid"] for s in seen if s["attempt"] == "0"}
    took = " ".join(proc.stderr.split())
    assert (f"taking over the lease of run 'el0' at {tmp_path}/ck/el0/.wmtp-lease: its process no longer "
            f"runs (host ") in took
    assert f", pid {dead}, started " in took
