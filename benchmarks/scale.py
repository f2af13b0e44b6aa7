"""Benchmarks past one process: async stall, S3 upload, training throughput, shards per rank.
Each figure is a ratio against the plain alternative measured in the same run."""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

from storage import _row, _scratch, fake_state
from wmtp_core import Payload, Role, RunInfo
from wmtp_core.bindings import Bindings, SinkBinding
from wmtp_core.plugins import build_catalog, make_plugin_manager
from wmtp_core.router import Router

RUN = RunInfo(name="bench", algo="baseline-mtp", lineage="bench")


def _router(base: str, sink: str = "local", options=None) -> Router:
    pm = make_plugin_manager()
    bindings = Bindings(sinks=[SinkBinding(role=Role.RESUME, sink=sink, options=options or {}, base_path=base)])
    return Router(pm, build_catalog(pm), bindings, RUN, required=frozenset({Role.RESUME})).open()


def _plain_copy(state, buffers: dict) -> None:
    """The physical limit of a stall: every tensor of ``state`` copied into a buffer of its own,
    allocated once and reused (what a hand-written asynchronous save would copy)."""
    def walk(obj, key):
        if isinstance(obj, torch.Tensor):
            buf = buffers.get(key)
            if buf is None:
                buf = buffers[key] = torch.empty_like(obj, device="cpu")
            buf.copy_(obj)
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{key}/{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{key}/{i}")

    walk(state, "")


def bench_async(size_mb: int, repeat: int, workdir=None) -> list[dict]:
    """Training-loop stall per asynchronous save (staging only) against its physical limit, a
    plain copy of the same tensors into reused buffers, in the same run; and, for scale, against
    a synchronous save."""
    size_mb = max(size_mb, 512)
    state = fake_state(size_mb)
    root = _scratch(workdir)
    sync, stall, copy = [], [], []
    buffers: dict = {}
    _plain_copy(state, buffers)  # allocate once, as the first asynchronous save does
    try:
        r = _router(f"file://{root}")
        step = 0
        for _ in range(repeat):
            step += 1
            t0 = time.perf_counter()
            r.emit(Role.RESUME, step=step, payload=Payload(parts=state))
            sync.append(time.perf_counter() - t0)
            shutil.rmtree(root / "bench" / f"step_{step}")
        for i in range(repeat + 1):  # the first async save allocates the staging buffers
            step += 1
            t0 = time.perf_counter()
            r.emit(Role.RESUME, step=step, payload=Payload(parts=state), background=True)
            stall.append(time.perf_counter() - t0)
            r.wait()  # "training" long enough for the save to finish before the next one
            shutil.rmtree(root / "bench" / f"step_{step}")
            if i:  # the plain copy right after, on the same warm memory
                t0 = time.perf_counter()
                _plain_copy(state, buffers)
                copy.append(time.perf_counter() - t0)
        r.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    limit = _row(f"async save {size_mb} MB: training stall vs a plain copy of the same tensors into reused "
                 "buffers (its physical limit)", statistics.median(stall[1:]), statistics.median(copy), 1.2)
    scale = _row(f"async save {size_mb} MB: training stall vs a synchronous save (for scale: no target; the "
                 "stall is one memory copy, the save's time is the disk's)",
                 statistics.median(stall[1:]), statistics.median(sync), None)
    return [limit, scale]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bucket_when_up(endpoint: str, name: str = "bench") -> None:
    """Create the bucket once the S3 server at ``endpoint`` answers (within about 10 s)."""
    import boto3

    for _ in range(100):
        try:
            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=name)
            return
        except Exception:
            time.sleep(0.1)


def bench_s3(size_mb: int, repeat: int, workdir=None) -> list[dict]:
    """S3 sink (serialise, hash, multipart, manifest) vs s3fs pipe of the same bytes, both to one
    S3 server on loopback (moto's, in its own process so it does not share our GIL); and the
    training-loop stall of a ``tiered`` save (local fast tier, the copy to that S3 server in the
    background) vs the S3 sink's save."""
    import fsspec

    port = _free_port()
    # moto keeps each object of over 16 MB in a temporary file: on /dev/shm those bytes stay off
    # the disk the local sides write to, as a remote store's bytes would (else its writes of the
    # S3 sides' uploads, flushed during the next timed local write, are charged to that write)
    shm = {"TMPDIR": "/dev/shm"} if os.access("/dev/shm", os.W_OK) else {}
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **shm})
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update(env)
    try:
        bucket_when_up(endpoint)
        state = fake_state(size_mb)
        r = _router("s3://bench/wmtp", sink="s3", options={"endpoint_url": endpoint})
        fs = fsspec.filesystem("s3", endpoint_url=endpoint, skip_instance_cache=True)
        import io

        blobs = {}
        for part, obj in state.items():
            buf = io.BytesIO()
            torch.save(obj, buf)
            blobs[part] = buf.getvalue()
        fast = _scratch(workdir)
        tiered = _router("unused", sink="tiered", options={"fast": f"file://{fast}", "durable": "s3://bench/tiered",
                                                            "endpoint_url": endpoint})
        from storage import bare_save

        ours, plain, stall, staged, bare = [], [], [], [], []
        for i in range(repeat):
            # the fast tier's bare write: each part torch.save'd + fsync'ed into the fast tier's disk
            (fast / "bare").mkdir(exist_ok=True)
            os.sync()  # each local side starts with no other side's writes waiting for the disk
            t0 = time.perf_counter()
            for part, obj in state.items():
                bare_save(obj, fast / "bare" / f"{part}.pt")
            bare.append(time.perf_counter() - t0)
            shutil.rmtree(fast / "bare")
            t0 = time.perf_counter()
            r.emit(Role.RESUME, step=i + 1, payload=Payload(parts=state))
            ours.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for part, data in blobs.items():
                fs.pipe(f"bench/plain/{i}/{part}.pt", data)
            plain.append(time.perf_counter() - t0)
            os.sync()
            t0 = time.perf_counter()
            receipt = tiered.emit(Role.RESUME, step=i + 1, payload=Payload(parts=state))
            stall.append(time.perf_counter() - t0)
            copies = tiered.sink(Role.RESUME)
            copies.wait()  # "training" long enough for the durable copy to finish before the next save
            copies.delete(receipt.uri)  # keep the server's memory to one copy
            # with paths.checkpoints.async: the loop pauses only to stage the state in memory
            t0 = time.perf_counter()
            tiered.emit(Role.RESUME, step=1000 + i, payload=Payload(parts=state), background=True)
            staged.append(time.perf_counter() - t0)
            tiered.wait()
            copies.wait()
            copies.delete(tiered.receipts[-1].uri)
        r.close()
        tiered.close()
        shutil.rmtree(fast, ignore_errors=True)
    finally:
        server.terminate()
        server.wait()
    # throughput ratio: plain time / our time (>= 0.9 means at least 90% of s3fs's speed)
    row = _row(f"S3 upload {size_mb} MB: S3 sink vs s3fs pipe (throughput)",
               statistics.median(plain), statistics.median(ours), 0.9, lower_is_better=False)
    row["wmtp"], row["plain"] = f"{statistics.median(ours):.3f} s", f"{statistics.median(plain):.3f} s"
    # the training-loop stall of a save: tiered (local commit, S3 copy in the background) vs s3
    tier = _row(f"tiered save {size_mb} MB (local fast tier, S3 copy in the background): training stall "
                "vs a direct S3 save (for scale: no target; a loopback S3 server is about as fast as the "
                "fast tier's disk, so this says little of a remote store; the row below is the stall's target)",
                statistics.median(stall), statistics.median(ours), None)
    # what that stall is made of: the fast tier's own commit, against a bare write of the same parts there
    tier_bare = _row(f"tiered save {size_mb} MB: training stall vs a bare torch.save+fsync of the same parts "
                     "on the fast tier's disk", statistics.median(stall), statistics.median(bare), 1.2)
    tier_async = _row(f"tiered save {size_mb} MB with paths.checkpoints.async (staged in memory, local commit "
                      "and S3 copy in the background): training stall vs a direct S3 save",
                      statistics.median(staged), statistics.median(ours), 0.1)
    return [row, tier, tier_bare, tier_async]


TRAIN_RECIPE = """
train: {{max_steps: {steps}}}
data:
  train: {{sources: [stdlib], max_length: 64, batch_size: 8}}
model: {{d_model: {d}, n_layers: 2, n_heads: 4, n_future: 4, max_seq_len: 64}}
"""


def _train_time(tmp: Path, name: str, save_interval: int, asynchronous: bool, steps: int, d: int) -> float:
    from wmtp_core import hookimpl
    from wmtp_core.run import main

    class Clock:
        def __init__(self):
            self.t = {}

        @hookimpl
        def wmtp_step_ended(self, event):
            if "loss" in event.metrics:
                self.t[event.step] = time.perf_counter()

    (tmp / f"{name}.yaml").write_text(
        f"mlflow: null\nlog_interval: 1000\npaths:\n  checkpoints: {{base_path: 'file://{tmp}/ck', "
        f"save_interval: {save_interval}, keep_last: 2, save_final: false, async: {str(asynchronous).lower()}}}\n")
    (tmp / "r.yaml").write_text(TRAIN_RECIPE.format(steps=steps, d=d))
    clock = Clock()
    assert main(["--config", str(tmp / f"{name}.yaml"), "--recipe", str(tmp / "r.yaml"), "--run-name", name],
                plugins=(clock,)) == 0
    return clock.t[steps] - clock.t[1]


def bench_throughput(size_mb: int, repeat: int, workdir=None) -> list[dict]:
    """Training throughput with an asynchronous save every 5 steps vs without saving."""
    root = _scratch(workdir)
    try:
        steps, d = 41, 384
        plain = statistics.median(_train_time(root, f"nosave{i}", 0, False, steps, d) for i in range(max(1, repeat // 2)))
        ours = statistics.median(_train_time(root, f"async{i}", 5, True, steps, d) for i in range(max(1, repeat // 2)))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    row = _row("training throughput: async save every 5 steps vs no saving", plain, ours, 0.95,
               lower_is_better=False)
    row["wmtp"], row["plain"] = f"{ours:.3f} s / 40 steps", f"{plain:.3f} s / 40 steps"
    return [row]


RANKS_SCRIPT = textwrap.dedent("""
    import json, os, sys, time, torch, torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from wmtp_core import Payload, Role, RunInfo, SinkContext
    from wmtp_core.engine.distributed import World, sharded_state
    from wmtp_core.events import CheckpointEmitted
    from wmtp_plugins.local import LocalSink
    dist.init_process_group("gloo")
    world = World(rank=dist.get_rank(), size=dist.get_world_size())
    size_mb = int(sys.argv[2])
    n = int((size_mb * 2**20 / 4 / 3) ** 0.5)
    model = torch.nn.Sequential(*[torch.nn.Linear(n, n, bias=False) for _ in range(1)])
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, n)).sum().backward(); opt.step()
    run = RunInfo(name="ranks", algo="baseline-mtp", lineage="bench")
    sink = LocalSink(SinkContext(role=Role.RESUME, run=run, base_path="file://" + sys.argv[1], coordinator=world))
    times = []
    for i in range(int(sys.argv[3])):
        parts = {**sharded_state(model, opt), "trainer": {"step": i}}
        dist.barrier(); t0 = time.perf_counter()
        ev = CheckpointEmitted(run=run, role=Role.RESUME, step=i + 1, parts=tuple(parts), nbytes=0)
        sink.store(ev, Payload(parts=parts, sharded=("model", "optimizer")))
        dist.barrier(); times.append(time.perf_counter() - t0)
    if world.is_main:
        json.dump(times, open(os.path.join(sys.argv[1], "times.json"), "w"))
    dist.destroy_process_group()
""")


def bench_ranks(size_mb: int, repeat: int, workdir=None) -> list[dict]:
    """Two ranks writing their shards vs one rank writing the same total state (DCP, local)."""
    root = _scratch(workdir)
    script = root / "ranks.py"
    script.write_text(RANKS_SCRIPT)
    out = {}
    try:
        for n in (1, 2):
            d = root / f"w{n}"
            d.mkdir()
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                            str(script), str(d), str(size_mb), str(repeat)], check=True,
                           capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            out[n] = statistics.median(json.loads((d / "times.json").read_text()))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    row = _row(f"sharded save {size_mb} MB: 2 ranks vs 1 rank (speed-up)", out[1], out[2], 1.0,
               lower_is_better=False)
    row["wmtp"], row["plain"] = f"{out[2]:.3f} s (2 ranks)", f"{out[1]:.3f} s (1 rank)"
    return [row]
