"""Two nodes on one machine: two torchrun agents (``--nnodes 2 --nproc_per_node 1``, a c10d
rendezvous on 127.0.0.1), each with its own node-local fast tier (``{node}`` in the fast URL,
``WMTP_NODE`` naming the node), and the loopback S3 server as the durable tier every node shares.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import zygote
from builders import recipe, write
from conftest import free_port, s3_keys
from faultproxy import FaultProxy

from wmtp_core.commit import CheckpointStore

pytestmark = pytest.mark.slow

PAUSE = """
import os, sys, time
from pathlib import Path
import torch
from wmtp_core.run import main

real, taken = torch.optim.AdamW.step, [0]

def step(self, *args, **kwargs):
    # once this rank took optimizer step argv[1]: say so in file argv[2], then wait to be killed
    out = real(self, *args, **kwargs)
    taken[0] += 1
    if taken[0] == int(sys.argv[1]):
        Path(sys.argv[2]).write_text(str(os.getpid()))
        time.sleep(600)
    return out

torch.optim.AdamW.step = step
sys.exit(main(sys.argv[3:]))
"""


def config(tmp: Path, bucket: str, **options) -> dict:
    return {
        "seed": 6,
        "log_interval": 2,
        "mlflow": None,
        # a collective with a node that is gone fails after 20 s (not gloo's 30 minutes)
        "devices": {"fsdp": {"enabled": True}, "distributed": {"timeout": 20}},
        "paths": {"checkpoints": {"save_interval": 2, "keep_last": 2}},
        "storage": {
            "resume": {"sink": "tiered", "options": {"fast": f"file://{tmp}/nodes/{{node}}/fast",
                                                     "durable": f"s3://{bucket}/runs", "node_timeout_s": 5,
                                                     **options}},
            "final": {"sink": "local", "base_path": f"file://{tmp}/final"},
        },
    }


RECIPE = recipe(10, optim={"lr": 0.01, "scheduler": "constant", "warmup_ratio": 0.0})


class Agent:
    """One "node": a torchrun agent in a process group of its own (killed whole)."""

    def __init__(self, node: str, port: int, args: list[str], cwd: Path, env: dict | None = None,
                 restarts: int = 0) -> None:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                    "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "job",
                    "--max-restarts", str(restarts), "--monitor-interval", "0.5"]
        self.log = cwd / f"agent-{node}-{time.monotonic_ns()}.log"
        self.proc = subprocess.Popen([*launcher, *args], cwd=cwd, start_new_session=True,
                                     stdout=self.log.open("w"), stderr=subprocess.STDOUT,
                                     env={**os.environ, "OMP_NUM_THREADS": "1", "WMTP_NODE": node,
                                          # every attempt its own store (see docs/distributed.md)
                                          "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "PYTHONUNBUFFERED": "1", **(env or {})})

    def hosting(self, port: int, timeout: float = 120) -> Agent:
        """Wait until this agent serves the rendezvous on ``port`` (the first agent hosts it:
        the other one, started after, joins it)."""
        import socket

        deadline = time.monotonic() + timeout
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return self
            assert time.monotonic() < deadline and self.proc.poll() is None, self.log.read_text()[-4000:]
            time.sleep(0.1)

    def wait(self, timeout: float = 300) -> tuple[int, str]:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the agent did not finish: {self.log.read_text()[-4000:]}") from None
        return code, self.log.read_text()

    def kill(self) -> None:
        """SIGKILL the agent and every process under it (torchrun's workers are not all in its
        process group): the node is gone."""
        for pid in [self.proc.pid, *descendants(self.proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(30)


def descendants(pid: int) -> list[int]:
    """Every process whose chain of parents leads to ``pid``."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    out, frontier = [], {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier}
        out += sorted(frontier)
    return out


def steps(store: CheckpointStore, run: str) -> list[int]:
    return [m.step for _, m in store.list(run)]


def test_a_node_killed_and_replaced_resumes_from_the_durable_tier_and_finishes_bit_exact(s3_server, bucket, tmp_path):
    # the same job uninterrupted, on two ranks of one node
    write(tmp_path / "base.yaml", {**config(tmp_path, bucket), "storage": {"final": {"sink": "local"}},
                                   "paths": {"checkpoints": {"base_path": f"file://{tmp_path}/base",
                                                             "save_interval": 2, "keep_last": 2}}})
    write(tmp_path / "r.yaml", RECIPE)
    full = zygote.ranks(2, ["-m", "wmtp_core.run", "--config", "base.yaml", "--recipe", "r.yaml", "--run-name", "job"],
                        cwd=tmp_path, timeout=600)
    assert full.returncode == 0, full.stderr[-4000:]

    write(tmp_path / "c.yaml", config(tmp_path, bucket))
    (tmp_path / "pause.py").write_text(PAUSE)
    common = ["--config", "c.yaml", "--recipe", "r.yaml", "--run-name", "job", "--resume", "auto"]
    port = free_port()
    a = Agent("a", port, ["-m", "wmtp_core.run", *common], tmp_path, restarts=2).hosting(port)
    b = Agent("b", port, ["pause.py", "7", str(tmp_path / "b-paused"), *common], tmp_path)
    try:
        durable = CheckpointStore.from_url(f"s3://{bucket}/runs", skip_instance_cache=True)
        deadline = time.monotonic() + 300
        while not ((tmp_path / "b-paused").exists() and 6 in steps(durable, "job")):
            assert time.monotonic() < deadline and b.proc.poll() is None, b.log.read_text()[-4000:]
            time.sleep(0.3)
            durable.fs.invalidate_cache()
        b.kill()  # node b is gone, its disk with it: a replacement node has an empty fast tier
        import shutil

        shutil.rmtree(tmp_path / "nodes" / "b")
        b = Agent("b", port, ["-m", "wmtp_core.run", *common], tmp_path)
        code_b, out_b = b.wait()
        code_a, out_a = a.wait()
    finally:
        a.kill()
        b.kill()
    assert code_a == 0, out_a[-6000:]
    assert code_b == 0, out_b[-6000:]

    # the durable tier holds complete checkpoints: one manifest for both nodes' shards, each verified
    assert steps(durable, "job") == [6, 8, 10]  # keep_last 2, and the step it resumed from
    for path, m in durable.list("job"):
        durable.verify(path)
        names = {e.path for e in m.files}
        assert {".metadata", "trainer_rank0.pt", "trainer_rank1.pt"} <= names
        assert sum(n.endswith(".distcp") for n in names) == 2
        assert m.meta["nodes"] == 2 and "node" not in m.meta
    assert not [k for k in s3_keys(s3_server, bucket, "runs/job/") if "/.wmtp-nodes/step_" in k]
    # each node's fast tier holds its own ranks' part only
    part = json.loads((tmp_path / "nodes" / "b" / "fast" / "job" / "step_10" / "manifest.json").read_text())
    assert {f["path"] for f in part["files"]} == {"__1_0.distcp", "trainer_rank1.pt"}
    assert part["meta"]["node"] == "b"

    want = torch.load(tmp_path / "base" / "job" / "final" / "model.pt", weights_only=True)
    got = torch.load(tmp_path / "final" / "job" / "final" / "model.pt", weights_only=True)
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k


def test_a_node_whose_copy_fails_stops_the_durable_commit_and_is_named(s3_server, bucket, tmp_path):
    write(tmp_path / "c.yaml", config(tmp_path, bucket, config_kwargs={"retries": {"max_attempts": 1}}))
    write(tmp_path / "r.yaml", recipe(2, optim={"lr": 0.01, "scheduler": "constant", "warmup_ratio": 0.0}))
    common = ["-m", "wmtp_core.run", "--config", "c.yaml", "--recipe", "r.yaml", "--run-name", "job"]
    port = free_port()
    # node b reaches S3 through a proxy that refuses every upload into a checkpoint (500)
    with FaultProxy(s3_server, rate=1.0, kinds=("500",), match=r"^PUT /[^?]*/runs/job/step_\d+/") as proxy:
        a = Agent("a", port, common, tmp_path).hosting(port)
        b = Agent("b", port, common, tmp_path, env={"AWS_ENDPOINT_URL": proxy.url})
        try:
            code_a, out_a = a.wait()
            code_b, out_b = b.wait()
        finally:
            a.kill()
            b.kill()
        assert proxy.injected > 0
    assert code_a != 0, out_a[-4000:]  # rank 0 fails the job (node b's own rank ends with a warning)
    assert "could not copy" not in out_b and "We encountered an internal error" in out_b
    assert "node 'b' (node 1) could not copy its part of step 2 to the durable tier" in out_a, out_a[-4000:]
    durable = CheckpointStore.from_url(f"s3://{bucket}/runs", skip_instance_cache=True)
    assert steps(durable, "job") == []  # nothing committed without node b's part
    # node a's own part is committed on its fast tier and kept
    assert (tmp_path / "nodes" / "a" / "fast" / "job" / "step_2" / "manifest.json").exists()


@pytest.mark.parametrize("options, key", [
    ({"fast_scope": "nodes"}, "fast_scope: 'nodes' is not accepted; accepted: node or shared"),
    ({"node_timeout_s": 0}, "node_timeout_s: 0 is not accepted"),
    ({"node_timeout_s": "1m"}, "node_timeout_s: '1m' is not accepted"),
])
def test_the_node_options_are_refused_naming_key_and_value(options, key):
    from wmtp_core import BindingError
    from wmtp_plugins._tiered_options import scope

    with pytest.raises(BindingError, match=f"storage.resume.options.{key}"):
        scope(options)


def test_a_node_is_what_torchrun_started_on_it_and_its_fast_tier_its_own(monkeypatch):
    from types import SimpleNamespace

    from wmtp_plugins._tiered_nodes import fast_url, owner, part_sizes, this_node

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("WMTP_NODE", "gpu-07")
    node = this_node(SimpleNamespace(rank=5, size=8))
    assert (node.name, node.index, node.count, node.ranks, node.leader) == ("gpu-07", 1, 2, (4, 5, 6, 7), False)
    assert this_node(SimpleNamespace(rank=4, size=8)).leader
    assert fast_url("file:///scratch/{node}/ck", node, spread=True) == "file:///scratch/gpu-07/ck"
    assert fast_url("file:///nvme/ck", node, spread=True) == "file:///nvme/ck/gpu-07"
    assert fast_url("file:///nvme/ck", node, spread=False) == "file:///nvme/ck"
    sizes = {".metadata": 1, "__0_0.distcp": 9, "__5_0.distcp": 7, "__7_1.distcp": 3, "trainer_rank6.pt": 1}
    assert part_sizes(sizes, node) == {"__5_0.distcp": 7, "__7_1.distcp": 3, "trainer_rank6.pt": 1}
    assert owner(".metadata") == 0 and owner("odd.bin") is None
    monkeypatch.delenv("LOCAL_WORLD_SIZE")  # outside torchrun: one node
    assert this_node(SimpleNamespace(rank=0, size=1)).count == 1
