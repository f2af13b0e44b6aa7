"""A lease that cannot be believed is stale: it is taken over with one warning naming why, never
a traceback, never a refusal that lasts forever (garbage, wrong types, a PID no system gives, a
heartbeat in the future, a directory or a FIFO where the lease file should be). And a live
holder is seen as live where its process cannot be seen: in another PID namespace on the same
host (a second container on the node), only its heartbeat's age tells."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import zygote
from builders import recipe, write
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_lease import config

from wmtp_core.commit import CheckpointStore
from wmtp_core.lease import LEASE_FILE, Lease, LeaseHeldError
from wmtp_core.lease_holder import _boot_id, _pid_ns, _proc_start

STALE = "a lease that cannot be believed is stale: "


def good(**changes) -> dict:
    """A believable, live lease of a process on another host, with ``changes``."""
    return {"host": "node-17.example", "pid": 4242, "started_at": "2026-11-29T08:00:00+00:00",
            "heartbeat": time.time() - 1, "token": "f" * 32, **changes}


def take(tmp: Path, content: bytes | None = None, **kw) -> tuple[Lease, list[str]]:
    """A lease of run ``r`` under ``tmp/ck`` taken over ``content`` (when given); the warnings."""
    store = CheckpointStore.from_url(f"file://{tmp}/ck")
    said: list[str] = []
    lease = Lease(store, "r", warn=said.append, **kw)
    if content is not None:
        Path(lease.path).parent.mkdir(parents=True, exist_ok=True)
        Path(lease.path).write_bytes(content)
    lease.acquire()
    return lease, said


def assert_taken(lease: Lease, said: list[str], why: str) -> None:
    assert len(said) == 1 and "\n" not in said[0], said
    assert said[0].startswith(f"taking over the lease of run 'r' at {lease.uri}: {STALE}"), said
    assert why in said[0], said
    assert json.loads(Path(lease.path).read_bytes())["token"] == lease.me.token
    lease.release()
    assert not Path(lease.path).exists()


@pytest.mark.parametrize("content, why", [
    (json.dumps(good(pid=10**30, host=socket.gethostname())),
     "its pid 1000000000000000000000000000000 is not a process id (1 to 4194304)"),
    (json.dumps(good(pid=-1)), "its pid -1 is not a process id"),
    (json.dumps(good(pid="4242")), "its 'pid' is '4242', not a whole number"),
    (json.dumps(good(heartbeat=253402300799.0)), "s in the future (clocks may differ by 10 s at most)"),
    # read the clock when the test runs, not when it is collected (minutes earlier under xdist)
    (lambda: json.dumps(good(heartbeat=time.time() + 3600)), "its heartbeat is 3"),
    (json.dumps(good()).replace('"heartbeat": ', '"heartbeat": 1e400, "x": '), "its heartbeat inf is not a time"),
    (json.dumps(good(heartbeat=float("nan"))), "its heartbeat nan is not a time"),
    (json.dumps(good(heartbeat=True)), "its 'heartbeat' is True, not a number"),
    (json.dumps(good(host="node\n17\x1b[31m")), "its 'host' 'node\\n17\\x1b[31m' is not a printable line"),
    (json.dumps({k: v for k, v in good().items() if k != "token"}), "it has no 'token'"),
    (json.dumps([good()]), "it is not a JSON object but list"),
    ("[" * 100_000, "it is not JSON"),
    (b"\xff\xfe\x00garbage", "it is not JSON"),
    ("", "it is not JSON"),
])
def test_a_lease_that_cannot_be_believed_is_taken_over_with_a_warning_naming_why(tmp_path, content, why):
    content = content() if callable(content) else content
    lease, said = take(tmp_path, content if isinstance(content, bytes) else content.encode())
    assert_taken(lease, said, why)


def test_a_heartbeat_a_little_ahead_is_believed_and_refuses(tmp_path):
    """Clocks may differ by a few seconds: a live lease a little in the future still refuses."""
    with pytest.raises(LeaseHeldError, match=r"host node-17.example, pid 4242, .*last heartbeat 0 s ago"):
        take(tmp_path, json.dumps(good(heartbeat=time.time() + 5)).encode())


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                      max_size=3), max_leaves=8)
absurd = st.sampled_from(["pid", "heartbeat", "host", "token", "started_at", "proc_start", "pid_ns", "boot_id"]).flatmap(
    lambda key: st.tuples(st.just(key), json_values | st.integers(min_value=2**22 + 1) | st.just(1e300)))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.binary(max_size=64) | json_values.map(lambda v: json.dumps(v).encode()) |
       absurd.map(lambda kv: json.dumps(good(**{kv[0]: kv[1]})).encode()))
@example(content=json.dumps(good(pid=10**30)).encode())
@example(content=json.dumps(good(heartbeat=1e300)).encode())
def test_any_lease_content_is_taken_over_or_refuses_but_never_raises_anything_else(tmp_path, content):
    """Garbage: taken over with one warning. Anything else that is taken over says why in one
    line; a refusal names a believable live holder."""
    shutil.rmtree(tmp_path / "ck", ignore_errors=True)
    try:
        lease, said = take(tmp_path, content)
    except LeaseHeldError as e:
        assert "\n" not in str(e) and "is being written by another process (host " in str(e)
        d = json.loads(content)
        assert isinstance(d["pid"], int) and 1 <= d["pid"] <= 2**22 and d["heartbeat"] <= time.time() + 10
        return
    assert len(said) == 1 and "\n" not in said[0] and said[0].startswith("taking over the lease of run 'r'"), said
    lease.release()


def test_a_directory_where_the_lease_should_be_is_moved_aside_and_taken_over(tmp_path):
    lease_path = tmp_path / "ck" / "r" / LEASE_FILE
    (lease_path / "inside").mkdir(parents=True)
    (lease_path / "inside" / "keep.txt").write_text("kept")
    lease, said = take(tmp_path)
    aside = [p for p in lease_path.parent.iterdir() if p.name.startswith(f"{LEASE_FILE}.not-a-file-")]
    assert len(aside) == 1 and (aside[0] / "inside" / "keep.txt").read_text() == "kept", "moved, not deleted"
    assert_taken(lease, said, f"it is a directory, not a file (moved aside to {aside[0].name})")


def test_a_fifo_where_the_lease_should_be_is_never_opened_blocking(tmp_path):
    lease_path = tmp_path / "ck" / "r" / LEASE_FILE
    lease_path.parent.mkdir(parents=True)
    os.mkfifo(lease_path)
    got: list = []
    worker = threading.Thread(target=lambda: got.append(take(tmp_path)), daemon=True)
    worker.start()
    worker.join(20)
    if worker.is_alive():  # blocked opening the FIFO: let it go, and fail
        os.close(os.open(lease_path, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(20)
        pytest.fail("reading the lease blocked on a FIFO")
    assert got, "acquire raised"
    lease, said = got[0]
    assert_taken(lease, said, "it is a FIFO (named pipe), not a file (moved aside to .wmtp-lease.not-a-file-")


def test_a_lease_without_a_pid_namespace_on_this_host_is_judged_by_its_heartbeat(tmp_path):
    """An older lease names no boot or PID namespace: its PID cannot be trusted (another
    container's), so only its heartbeat's age tells."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lease = good(host=socket.gethostname(), pid=dead.pid, proc_start=12345)
    with pytest.raises(LeaseHeldError, match=f"pid {dead.pid}"):
        take(tmp_path, json.dumps(lease).encode())
    # with them, and the same boot and namespace, a dead PID frees it at once
    lease.update(boot_id=_boot_id(), pid_ns=_pid_ns())
    taken, said = take(tmp_path, json.dumps(lease).encode())
    assert len(said) == 1 and "its process no longer runs" in said[0]
    taken.release()


@pytest.mark.slow
@pytest.mark.parametrize("lease, why", [
    (json.dumps(good(pid=10**30, host=socket.gethostname())).encode(), "its pid 1000000000000000000000000000000 is not a process id"),
    (json.dumps(good(heartbeat=253402300799.0)).encode(), "s in the future"),
    (None, "it is a directory, not a file"),
])
def test_a_run_takes_over_a_lease_that_cannot_be_believed_with_one_line(tmp_path, lease, why):
    write(tmp_path / "c.yaml", config(f"file://{tmp_path}/ck", tmp_path))
    write(tmp_path / "r.yaml", recipe(4))
    path = tmp_path / "ck" / "r" / LEASE_FILE
    path.parent.mkdir(parents=True)
    path.write_bytes(lease) if lease is not None else path.mkdir()
    proc = zygote.run(["-m", "wmtp_core.run", "--config", "c.yaml", "--recipe", "r.yaml", "--run-name", "r"],
                      cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    line = next(ln for ln in proc.stderr.splitlines() if "taking over the lease" in ln)
    assert f"warning: taking over the lease of run 'r' at {path}: {STALE}" in " ".join(proc.stderr.split())
    assert why in " ".join(proc.stderr.split()), line
    assert (tmp_path / "ck" / "r" / "step_4").is_dir() and not path.exists()


HOLDER = """
import sys
from wmtp_core.commit import CheckpointStore
from wmtp_core.lease import Lease
lease = Lease(CheckpointStore.from_url(sys.argv[1]), "r", heartbeat=0.5)
lease.acquire()
lease.start()
print("held", flush=True)
sys.stdin.read()
lease.release()
"""


def unshare_or_skip() -> None:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs root and util-linux's unshare to start a process in its own PID namespace")
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"unshare --pid --fork --mount-proc fails here: {probe.stderr.strip()}")


@pytest.mark.slow
def test_a_live_holder_in_another_pid_namespace_on_this_host_refuses_a_second_writer(tmp_path):
    """A second container on the node: same hostname, boot and clock, its own PID namespace. Its
    PID means nothing here (PID 1 here is another process, or no process at all): a fresh
    heartbeat refuses, a stale one is taken over."""
    unshare_or_skip()
    write(tmp_path / "c.yaml", config(f"file://{tmp_path}/ck", tmp_path))
    write(tmp_path / "r.yaml", recipe(4))
    holder = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", sys.executable, "-c", HOLDER,
                               f"file://{tmp_path}/ck"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**os.environ})
    try:
        assert holder.stdout.readline().strip() == "held", holder.stderr.read()[-3000:]
        held = json.loads((tmp_path / "ck" / "r" / LEASE_FILE).read_text())
        assert held["host"] == socket.gethostname() and held["pid_ns"] != _pid_ns()
        assert held["boot_id"] == _boot_id() and held["pid"] <= 3, "its PID in its own namespace"
        assert _proc_start(held["pid"]) != held["proc_start"], "the PID is another process here, or none"
        second = zygote.run(["-m", "wmtp_core.run", "--config", "c.yaml", "--recipe", "r.yaml", "--run-name", "r"],
                            cwd=tmp_path, timeout=300)
        assert second.returncode == 2, second.stderr[-3000:]
        err = " ".join(second.stderr.split())
        assert f"run 'r' is being written by another process (host {socket.gethostname()}, pid {held['pid']}" in err
        assert "Traceback" not in err and not (tmp_path / "ck" / "r" / "step_4").exists()
        holder.kill()  # killed: its lease stays, and only its heartbeat's age frees it
        holder.wait(30)
        with pytest.raises(LeaseHeldError):
            take(tmp_path, timeout=3)
        time.sleep(3)
        lease, said = take(tmp_path, timeout=3)
        assert len(said) == 1 and "its heartbeat is older than 3 s" in said[0], said
        lease.release()
    finally:
        if holder.poll() is None:
            holder.communicate("", timeout=60)
