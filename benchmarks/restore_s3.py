"""Restoring a resume checkpoint from S3: peak memory and wall time of the ``s3`` sink's verified
load against the plain alternative, ``s3fs.get`` of the same files followed by
``torch.load(mmap=True)``, and, for the record, the read path before staging (each object read
whole into memory, hashed, deserialised from its bytes). Both read from one loopback S3 server (moto's, in its own process),
each side in a fresh process of its own, alternating, so that one side's memory is never the
other's. ``--size-mb`` below 1024 is raised to 1 GiB (the issue's size); ``WMTP_BENCH_LARGE=1``
makes it 4 GiB."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

from scale import _free_port, _router, bucket_when_up
from storage import _row, _scratch, fake_state

from wmtp_core import Payload, Role

CHILD = textwrap.dedent("""
    import json, os, sys, time
    import torch
    side, base, endpoint, run_dir, scratch = sys.argv[1:6]
    def rss(field="VmRSS"):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))
    import fsspec, s3fs  # both sides import what they use before the baseline is taken
    from wmtp_core import RunInfo, Role, SinkContext
    from wmtp_plugins.s3 import S3Sink
    before = rss()
    t0 = time.perf_counter()
    context = SinkContext(role=Role.RESUME, run=RunInfo(name="bench", algo="baseline-mtp", lineage="bench"),
                          base_path=base, options={"endpoint_url": endpoint})
    if side == "wmtp":
        loaded = S3Sink(context).load(run_dir)
    elif side == "whole":  # the read path before staging: each object read whole, deserialised from its bytes
        from wmtp_core.safe_load import load_part
        store = S3Sink(context).checkpoints
        path = run_dir.removeprefix("s3://")
        manifest, pending = store.verify_async(path)
        parts = {name: load_part(future.result()) for name, future in pending.items() if name.endswith(".pt")}
    else:
        fs = fsspec.filesystem("s3", endpoint_url=endpoint, skip_instance_cache=True)
        os.makedirs(scratch, exist_ok=True)
        fs.get(run_dir.removeprefix("s3://") + "/", scratch + "/", recursive=True)
        parts = {name[:-3]: torch.load(os.path.join(scratch, name), map_location="cpu", weights_only=True, mmap=True)
                 for name in os.listdir(scratch) if name.endswith(".pt")}
    seconds = time.perf_counter() - t0
    peak = rss("VmHWM")  # this process's own peak (ru_maxrss keeps the forking parent's across exec)
    print(json.dumps({"seconds": seconds, "peak_above": peak - before, "before": before}))
""")


def _side(side: str, base: str, endpoint: str, run_dir: str, scratch: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, side, base, endpoint, run_dir, str(scratch)],
                          capture_output=True, text=True, env={**os.environ, "WMTP_CACHE_DIR": str(scratch / "cache")})
    if proc.returncode != 0:
        raise RuntimeError(f"the {side} side failed: {proc.stderr[-2000:]}")
    shutil.rmtree(scratch, ignore_errors=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _server(port: int) -> subprocess.Popen:
    shm = {"TMPDIR": "/dev/shm"} if os.access("/dev/shm", os.W_OK) else {}
    return subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **shm})


def bench_restore_s3(size_mb: int, repeat: int, workdir=None) -> list[dict]:
    size_mb = 4096 if os.environ.get("WMTP_BENCH_LARGE") == "1" else max(size_mb, 1024)
    port = _free_port()
    server = _server(port)
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
    scratch = _scratch(workdir)
    try:
        bucket_when_up(endpoint)
        r = _router("s3://bench/restore", sink="s3", options={"endpoint_url": endpoint})
        receipt = r.emit(Role.RESUME, step=1, payload=Payload(parts=fake_state(size_mb)))
        r.close()
        state_bytes = receipt.nbytes
        results = {"wmtp": [], "plain": [], "whole": []}
        for i in range(repeat):
            for side in (("wmtp", "plain", "whole") if i % 2 == 0 else ("whole", "plain", "wmtp")):
                results[side].append(_side(side, "s3://bench/restore", endpoint, receipt.uri, scratch / f"{side}-{i}"))
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(scratch, ignore_errors=True)
    return _rows(size_mb, state_bytes, results)


def _rows(size_mb: int, state_bytes: int, results: dict) -> list[dict]:
    ours_s = statistics.median(r["seconds"] for r in results["wmtp"])
    plain_s = statistics.median(r["seconds"] for r in results["plain"])
    ours_m = statistics.median(r["peak_above"] for r in results["wmtp"])
    plain_m = statistics.median(r["peak_above"] for r in results["plain"])
    whole_m = statistics.median(r["peak_above"] for r in results["whole"])
    whole_s = statistics.median(r["seconds"] for r in results["whole"])
    memory = _row(f"restore {size_mb} MB from S3: peak RSS above the process's baseline, S3 sink's verified load "
                  f"vs the state's bytes ({state_bytes / 1e6:.0f} MB); s3fs.get+torch.load(mmap=True) peaked "
                  f"{plain_m / 1e6:.0f} MB, and the read path before staging (each object read whole) "
                  f"{whole_m / 1e6:.0f} MB ({whole_m / state_bytes:.2f}x) in {whole_s:.1f} s", ours_m, state_bytes,
                  1.2, unit="B")
    wall = _row(f"restore {size_mb} MB from S3: S3 sink's verified load vs s3fs.get+torch.load(mmap=True) (wall time)",
                ours_s, plain_s, 1.1)
    return [memory, wall]
