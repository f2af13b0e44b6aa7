"""The final model of a Hugging Face run under FSDP: rank 0's memory while it is written.

Two CPU ranks (``torchrun --standalone --nproc_per_node 2``, gloo) hold a GPT-2 of about 390 MB
(fp32, 7 layers of width 1024, a vocabulary of 8192, one extra head) sharded by FSDP2. Each side
runs in a fresh job of its own, alternating which goes first:

- **WMTP**: the final payload written one shard at a time
  (:func:`wmtp_core.engine.final_shards.write`, ``max_shard_size: 50MB``), as a run does;
- **the whole gather**: what a run did before, and still does for a byte-level model:
  ``get_model_state_dict(full_state_dict=True, cpu_offload=True)`` on every rank, then the model
  rebuilt from the weights and written by ``save_pretrained`` (here with the same
  ``max_shard_size``, so both folders are alike).

Measured: rank 0's peak resident memory (``VmHWM``) above its resident memory just before the
final model is written (the peak is reset there through ``/proc/self/clear_refs``: building the
model before FSDP sharded it held all of it), as a ratio to the model's bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

from storage import _row, _scratch

LIMIT = "50MB"
SIZE = {"n_layer": 7, "n_embd": 1024, "n_head": 16, "vocab_size": 8192, "n_positions": 256}

CHILD = textwrap.dedent("""
    import gc, json, os, sys
    import torch, torch.distributed as dist
    from transformers import GPT2Config, GPT2LMHeadModel
    from wmtp_core.engine import distributed, final_shards, hf
    from wmtp_core.engine.final import final_payload
    from wmtp_core.registering import discard
    side, out, limit, size = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])

    def status(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = hf.HFMTPModel(GPT2LMHeadModel(GPT2Config(**size)), 2, "linear")
    record = {"kind": "hf", "base": "bench", "n_future": 2, "head": "linear", "config": model.base.config.to_dict()}
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    fsdp = type("Fsdp", (), {"offload_params": False, "offload_grads": False, "sharding": "full_shard",
                             "auto_wrap": "block"})
    distributed.shard(model, fsdp)
    world = distributed.World(rank=rank, size=dist.get_world_size(), initialised=True,
                              group=dist.new_group(backend="gloo"))
    meta = {"algo": "baseline-mtp", "step": 1, "dtype": "fp32", "base_model": "bench"}
    gc.collect()
    dist.barrier()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS: building the whole model before sharding it is not measured
    before = status("VmRSS")
    if side == "wmtp":
        written = final_shards.write(model, world, torch.float32, limit, None, meta)
        payload = None if written is True else final_shards.folder_weights(*written)
        folder = None if written is True else written[0]
    else:
        weights = distributed.full_weights(model)
        payload = None
        if rank == 0:
            payload = final_payload(weights, record, "bench", dtype=torch.float32, example=torch.zeros(2, 8, dtype=torch.long),
                                    meta=meta, max_shard_size=limit)
        folder = payload.folder if payload is not None else None
    peak = status("VmHWM")
    if rank == 0:
        files = sorted(os.listdir(folder))
        json.dump({"peak_above": peak - before, "model_bytes": nbytes, "files": files}, open(out, "w"))
        shutil = __import__("shutil"); shutil.rmtree(folder)
    dist.barrier()
    dist.destroy_process_group()
""")


def _side(side: str, out: Path) -> dict:
    script = out.parent / "final_shards_child.py"
    script.write_text(CHILD)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    str(script), side, str(out), LIMIT, json.dumps(SIZE)], check=True, capture_output=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    return json.loads(out.read_text())


def bench_final_shards(size_mb: int, repeat: int, workdir=None) -> list[dict]:
    """Rank 0's extra peak memory: written one shard at a time vs the whole gather."""
    root = _scratch(workdir)
    results: dict[str, list[dict]] = {"wmtp": [], "whole": []}
    try:
        for i in range(max(1, min(repeat, 3))):
            for side in (("wmtp", "whole") if i % 2 == 0 else ("whole", "wmtp")):
                results[side].append(_side(side, root / f"{side}-{i}.json"))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    model = results["wmtp"][0]["model_bytes"]
    ours = statistics.median(r["peak_above"] for r in results["wmtp"])
    whole = statistics.median(r["peak_above"] for r in results["whole"])
    shards = sum(f.startswith("model-") for f in results["wmtp"][0]["files"])
    what = f"final model of {model / 1e6:.0f} MB under 2-rank FSDP (CPU, gloo): rank 0's peak RSS above its baseline"
    return [_row(f"{what}, written one shard at a time ({LIMIT} shards, {shards} files), vs the model's bytes",
                 ours, model, None, unit="B"),
            _row(f"{what}, the whole gather (get_model_state_dict + save_pretrained), vs the model's bytes",
                 whole, model, None, unit="B")]
