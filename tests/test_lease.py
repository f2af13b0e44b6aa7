"""One writer per run: a run holds a lease on its run directory while it writes. A second
process on a live run is refused at start, naming the holder, before it trains a step; a stale
lease (old heartbeat, or a process on this host that no longer runs) is taken over with a
warning; a holder whose lease was taken over stops at its next save. Local disk and S3."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import zygote
from builders import merge, recipe, write
from conftest import KILLER, S3_ENV

from wmtp_core.lease import LEASE_FILE, Holder, Lease

pytestmark = pytest.mark.slow

HOLDER = """
import os, sys, time
from pathlib import Path
from wmtp_core import hookimpl
from wmtp_core.run import main

class Hold:
    # after step argv[1] is committed, wait until the file argv[2] exists: a live writer
    @hookimpl
    def wmtp_checkpoint_committed(self, receipt):
        if receipt.step == int(sys.argv[1]):
            Path(sys.argv[2] + ".held").touch()
            while not Path(sys.argv[2]).exists():
                time.sleep(0.05)

sys.exit(main(sys.argv[3:], plugins=(Hold(),)))
"""


def config(base: str, tmp: Path) -> dict:
    return {"seed": 3, "log_interval": 4,
            "paths": {"checkpoints": {"base_path": base, "save_interval": 2, "keep_last": 3}},
            "mlflow": {"experiment": "lease", "tracking_uri": f"sqlite:///{tmp}/mlflow.db"}}


def run(tmp: Path, *args: str, env: dict | None = None, script: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """The ``wmtp_core.run`` command, or ``script`` (``-c`` source and its own arguments) in front
    of the same arguments."""
    head = ["-c", *script] if script else ["-m", "wmtp_core.run"]
    return zygote.run([*head, "--config", "c.yaml", "--recipe", "r.yaml", *args], cwd=tmp, timeout=300,
                      env={**os.environ, **(env or {})})


def foreign_lease(age: float, host: str = "node-17.example", pid: int = 4242) -> bytes:
    return Holder(host=host, pid=pid, started_at="2026-11-29T08:00:00+00:00", heartbeat=time.time() - age,
                  token="f" * 32).to_bytes()


@pytest.fixture
def files(tmp_path):
    write(tmp_path / "c.yaml", config(f"file://{tmp_path}/ck", tmp_path))
    write(tmp_path / "r.yaml", recipe(8))
    return tmp_path


def holding(tmp: Path, release: Path) -> subprocess.Popen:
    """A run of ``r`` that holds its lease: it waits after committing step 4 until ``release``
    exists. Returns once it waits."""
    holder = zygote.Child(["-c", HOLDER, "4", str(release), "--config", "c.yaml", "--recipe", "r.yaml",
                           "--run-name", "r"], cwd=tmp)
    deadline = time.time() + 240
    while not Path(f"{release}.held").exists():
        assert holder.poll() is None and time.time() < deadline, holder.stderr.read()[-3000:]
        time.sleep(0.1)
    return holder


def test_a_second_process_on_a_live_run_is_refused_at_start_and_a_killed_holder_is_taken_over(files):
    tmp = files
    release = tmp / "release"
    holder = holding(tmp, release)
    try:
        lease = json.loads((tmp / "ck" / "r" / LEASE_FILE).read_text())
        assert lease["pid"] == holder.pid and lease["host"] == socket.gethostname()

        second = run(tmp, "--run-name", "r", "--resume", "latest")
        assert second.returncode == 2, second.stderr[-3000:]
        err = " ".join(second.stderr.split())
        assert f"run 'r' is being written by another process (host {socket.gethostname()}, pid {holder.pid}" in err
        assert "Traceback" not in second.stderr and "resuming" not in err, "refused before anything else"
        assert not (tmp / "ck" / "r" / "step_6").exists()
        fresh = run(tmp, "--run-name", "r")  # a fresh start of the same run name is refused alike
        assert fresh.returncode == 2 and f"pid {holder.pid}" in fresh.stderr
    finally:
        release.touch()
        out, err = holder.communicate(timeout=240)
    assert holder.returncode == 0, err[-3000:]
    assert not (tmp / "ck" / "r" / LEASE_FILE).exists(), "released at the end"

    # a holder killed mid-run leaves its lease; on the same host its dead PID frees it at once
    write(tmp / "r.yaml", recipe(14))
    proc = run(tmp, "--run-name", "r", "--resume", "latest", script=(KILLER, "11"))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert (tmp / "ck" / "r" / LEASE_FILE).exists()
    again = run(tmp, "--run-name", "r", "--resume", "latest")
    assert again.returncode == 0, again.stderr[-3000:]
    err = " ".join(again.stderr.split())
    assert "taking over the lease of run 'r'" in err and "its process no longer runs" in err
    assert not (tmp / "ck" / "r" / LEASE_FILE).exists()


def test_a_live_foreign_lease_refuses_and_a_stale_one_is_taken_over(files):
    tmp = files
    (tmp / "ck" / "r").mkdir(parents=True)
    lease = tmp / "ck" / "r" / LEASE_FILE
    lease.write_bytes(foreign_lease(age=5))
    started = time.monotonic()
    refused = run(tmp, "--run-name", "r")
    took = time.monotonic() - started  # a slow machine's start-up adds to the lease's age
    assert refused.returncode == 2
    err = " ".join(refused.stderr.split())
    assert "host node-17.example, pid 4242" in err
    age = re.search(r"last heartbeat (\d+) s ago", err)
    assert age and 4 <= int(age.group(1)) <= 6 + took, err
    assert "A lease whose heartbeat is older than 60 s is taken over" in err
    assert not any(p.name.startswith("step_") for p in (tmp / "ck" / "r").iterdir())
    assert json.loads(lease.read_text())["token"] == "f" * 32, "the holder's lease is untouched"

    lease.write_bytes(foreign_lease(age=600))
    taken = run(tmp, "--run-name", "r")
    assert taken.returncode == 0, taken.stderr[-3000:]
    err = " ".join(taken.stderr.split())
    assert "taking over the lease of run 'r'" in err and "its heartbeat is older than 60 s" in err
    assert "host node-17.example, pid 4242" in err
    assert (tmp / "ck" / "r" / "step_8").is_dir() and not lease.exists()


def test_a_holder_whose_lease_was_taken_over_stops_at_its_next_save(files):
    tmp = files
    release = tmp / "release"
    holder = holding(tmp, release)
    # another process took the lease over (as one would after this holder's heartbeat went stale)
    (tmp / "ck" / "r" / LEASE_FILE).write_bytes(foreign_lease(age=0))
    release.touch()
    _, err = holder.communicate(timeout=240)
    assert holder.returncode == 2, err[-3000:]
    err = " ".join(err.split())
    assert "another process took over its lease (host node-17.example, pid 4242" in err
    assert "Traceback" not in err
    assert not (tmp / "ck" / "r" / "step_6").exists(), "it wrote nothing after losing the lease"
    assert json.loads((tmp / "ck" / "r" / LEASE_FILE).read_text())["token"] == "f" * 32


def test_on_s3_the_lease_refuses_a_second_writer_and_is_released(tmp_path, s3_server, bucket):
    import boto3

    write(tmp_path / "c.yaml", config(f"s3://{bucket}/ck", tmp_path))
    write(tmp_path / "r.yaml", recipe(4))
    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.put_object(Bucket=bucket, Key=f"ck/r/{LEASE_FILE}", Body=foreign_lease(age=2))
    env = {**S3_ENV, "AWS_ENDPOINT_URL": s3_server}
    refused = run(tmp_path, "--run-name", "r", env=env)
    assert refused.returncode == 2 and "host node-17.example, pid 4242" in refused.stderr
    assert f"lease s3://{bucket}/ck/r/{LEASE_FILE}" in " ".join(refused.stderr.split())

    s3.put_object(Bucket=bucket, Key=f"ck/r/{LEASE_FILE}", Body=foreign_lease(age=3600))
    taken = run(tmp_path, "--run-name", "r", env=env)
    assert taken.returncode == 0, taken.stderr[-3000:]
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="ck/r/")["Contents"]]
    assert f"ck/r/{LEASE_FILE}" not in keys and "ck/r/step_4/manifest.json" in keys


def test_conditional_writes_let_exactly_one_of_two_takers_win(tmp_path, s3_server, bucket):
    """Two processes that find the same stale lease: one takes it, the other is refused."""
    from wmtp_core.commit import CheckpointStore
    from wmtp_core.lease import LeaseHeldError

    for url in (f"file://{tmp_path}/ck", f"s3://{bucket}/race"):
        store = CheckpointStore.from_url(url)
        stale = Lease(store, "r")
        stale.acquire()
        path = stale.path
        store.fs.pipe_file(path, foreign_lease(age=600))
        a, b = Lease(store, "r", warn=lambda _: None), Lease(store, "r", warn=lambda _: None)
        tag_a, tag_b = a._read()[1], b._read()[1]
        assert a._take_over(tag_a) is True
        assert b._take_over(tag_b) is False, url
        with pytest.raises(LeaseHeldError):
            b.acquire()
        a.release()
        assert not store.fs.exists(path)


def test_with_two_ranks_rank_0_holds_the_lease_and_every_rank_is_refused(tmp_path):
    write(tmp_path / "c.yaml", merge(config(f"file://{tmp_path}/ck", tmp_path), {"devices": {"fsdp": {"enabled": True}}}))
    write(tmp_path / "r.yaml", recipe(4))
    (tmp_path / "ck" / "r").mkdir(parents=True)
    (tmp_path / "ck" / "r" / LEASE_FILE).write_bytes(foreign_lease(age=1))
    proc = zygote.ranks(2, ["-m", "wmtp_core.run", "--config", "c.yaml", "--recipe", "r.yaml", "--run-name", "r"],
                        cwd=tmp_path, timeout=300)
    assert proc.returncode != 0
    # the launcher adds its own report of failed ranks; each rank said why in one line
    assert "run 'r' is being written by another process (host node-17.example, pid 4242" in \
        " ".join(proc.stderr.split())
    assert not any(p.name.startswith("step_") for p in (tmp_path / "ck" / "r").iterdir())

    (tmp_path / "ck" / "r" / LEASE_FILE).unlink()
    ok = zygote.ranks(2, ["-m", "wmtp_core.run", "--config", "c.yaml", "--recipe", "r.yaml", "--run-name", "r"],
                        cwd=tmp_path, timeout=300)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert not (tmp_path / "ck" / "r" / LEASE_FILE).exists()


def test_a_heartbeat_whose_response_was_lost_is_not_taken_for_a_takeover(s3_server, bucket):
    """The renewal lands, its response is lost (the connection reset after S3 carried it out),
    botocore retries it and the retry's If-Match fails, since the lease changed: by this very
    write. The holder must see its own heartbeat there, not a takeover."""
    from faultproxy import FaultProxy

    from wmtp_core.commit import CheckpointStore
    from wmtp_core.lease import LeaseLostError

    with FaultProxy(s3_server) as proxy:
        store = CheckpointStore.from_url(f"s3://{bucket}/lost", endpoint_url=proxy.url, skip_instance_cache=True)
        lease = Lease(store, "r")
        lease.acquire()
        lost = iter(["reset-after"])
        draw = proxy.draw
        proxy.draw = lambda method, target: next(lost, None) if method == "PUT" and LEASE_FILE in target \
            else draw(method, target)
        lease.renew()
        assert next(lost, "spent") == "spent", "the renewal met the lost response"
        lease.check()
        assert Holder.parse(store.fs.cat_file(lease.path)).heartbeat == lease.me.heartbeat
        # a real takeover is still one
        store.fs.pipe_file(lease.path, foreign_lease(age=0))
        with pytest.raises(LeaseLostError):
            lease.renew()
