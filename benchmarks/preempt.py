"""Preemption: the time from SIGTERM to the exit of a real training process (finish the step,
commit its resume state, end the run), against a plain PyTorch training loop of the same model
that handles SIGTERM the plain way (finish the step, one ``torch.save`` + fsync, exit), in the
same run; and, for scale, against that save alone."""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from storage import _row, _scratch, bare_save

RUN = """
import json, sys, time
from pathlib import Path
from wmtp_core import hookimpl
from wmtp_core.run import leave, main

marks = {"steps": []}

class Ready:
    # writes a marker once training is under way, so the signal lands mid-run; and when each
    # phase of the stop ended (wall clock, shared with the parent)
    @hookimpl
    def wmtp_step_ended(self, event):
        marks["steps"].append(time.time())
        if event.step == 3:
            Path(sys.argv[1]).write_text("ready")

    @hookimpl
    def wmtp_checkpoint_committed(self, receipt):
        marks["committed"] = time.time()

    @hookimpl
    def wmtp_run_ended(self, event):
        marks["ended"] = time.time()
        Path(sys.argv[2]).write_text(json.dumps(marks))

leave(main(sys.argv[3:], plugins=(Ready(),)))
"""

PLAIN = """
import json, os, signal, sys, time
from pathlib import Path
import torch
from wmtp_core.engine.algorithms import BaselineMTP
from wmtp_core.engine.model import ModelConfig, MTPModel

# the plain loop: the same model, optimizer and batches; on SIGTERM it finishes the step, saves
# the model and the optimizer with one torch.save + fsync, and exits at once
marker, marks_path, out = sys.argv[1], sys.argv[2], sys.argv[3]
torch.manual_seed(1)
cfg = ModelConfig(**json.loads(sys.argv[4]))
model = MTPModel(cfg)
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
algo = BaselineMTP()
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
marks = {"steps": []}
step = 0
while True:
    ids = torch.randint(0, cfg.vocab_size, (1, cfg.max_seq_len))
    loss, _ = algo.loss(model, ids, None)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    step += 1
    marks["steps"].append(time.time())
    if step == 3:
        Path(marker).write_text("ready")
    if stop:
        with open(out, "wb") as f:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step}, f)
            f.flush()
            os.fsync(f.fileno())
        marks["committed"] = marks["ended"] = time.time()
        Path(marks_path).write_text(json.dumps(marks))
        os._exit(4)
"""

MODEL = {"d_model": 768, "n_layers": 6, "n_heads": 12, "n_future": 2, "max_seq_len": 32}
"""About 60M parameters: a resume state of about 700 MB, steps of a fraction of a second here."""


def _files(work: Path) -> list[str]:
    (work / "c.yaml").write_text(yaml.safe_dump({
        "seed": 1, "log_interval": 10**6, "mlflow": None,
        "paths": {"checkpoints": {"base_path": f"file://{work}/ck", "save_interval": 0, "save_final": False}},
    }))
    (work / "r.yaml").write_text(yaml.safe_dump({
        "run": {"name": "pre"}, "train": {"max_steps": 10**6},
        "optim": {"lr": 1e-4, "scheduler": "constant", "warmup_ratio": 0.0},
        "data": {"train": {"sources": ["stdlib"], "max_length": 32, "batch_size": 1}},
        "model": MODEL}))
    return ["--config", str(work / "c.yaml"), "--recipe", str(work / "r.yaml")]


def _signal_to_exit(work: Path, plain: bool) -> dict:
    """One process of either side, signalled right after its third step ends (so both finish
    a whole step); the seconds from the signal to its exit, split at the end of the step in
    progress and at the commit; and the bytes it saved."""
    marker, marks_path = work / "ready", work / "marks.json"
    for p in (marker, marks_path, work / "plain.pt"):
        p.unlink(missing_ok=True)
    shutil.rmtree(work / "ck", ignore_errors=True)
    if plain:
        cmd = [sys.executable, "-c", PLAIN, str(marker), str(marks_path), str(work / "plain.pt"), json.dumps(MODEL)]
    else:
        cmd = [sys.executable, "-c", RUN, str(marker), str(marks_path), *_files(work)]
    proc = subprocess.Popen(cmd, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while not marker.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"the run ended before training: {proc.stderr.read()[-2000:]}")
        time.sleep(0.01)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=600)
    t1 = time.time()
    if code != 4:
        raise RuntimeError(f"expected exit 4, got {code}: {proc.stderr.read()[-2000:]}")
    marks = json.loads(marks_path.read_text())
    files = [work / "plain.pt"] if plain else [p for p in (work / "ck" / "pre").rglob("*") if p.is_file()]
    step_end = marks["steps"][-1]
    return {"total": t1 - t0, "step": step_end - t0, "commit": marks["committed"] - step_end,
            "exit": t1 - marks["committed"], "a_step": marks["steps"][-2] - marks["steps"][-3],
            "nbytes": sum(p.stat().st_size for p in files)}


def bench_preempt(size_mb: int, repeat: int, workdir=None) -> list[dict]:
    work = _scratch(workdir)
    try:
        runs: dict[str, list[dict]] = {"ours": [], "plain": []}
        saves = []
        for i in range(min(repeat, 3)):
            # the sides alternate which goes first (the disk's state after one affects the other)
            for side in (("ours", "plain") if i % 2 == 0 else ("plain", "ours")):
                runs[side].append(_signal_to_exit(work, plain=side == "plain"))
            # for scale: one bare torch.save + fsync of as many bytes as WMTP committed
            n = runs["ours"][-1]["nbytes"] // 4
            state = {"w": torch.randn(n // 3), "m": torch.randn(n // 3), "v": torch.rand(n - 2 * (n // 3))}
            t0 = time.perf_counter()
            bare_save(state, work / "bare.pt")
            saves.append(time.perf_counter() - t0)
            os.remove(work / "bare.pt")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def med(side: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[side])

    mb = med("ours", "nbytes") / 1e6
    phases = {side: {k: round(med(side, k), 3) for k in ("step", "commit", "exit", "a_step")} for side in runs}
    row = _row(f"preemption: SIGTERM to exit of a training run ({mb:.0f} MB resume state; finish the step, "
               f"commit, end) vs a plain PyTorch loop of the same model ({med('plain', 'nbytes') / 1e6:.0f} MB: "
               "finish the step, torch.save+fsync, exit)", med("ours", "total"), med("plain", "total"), 1.2)
    row["phases"] = phases
    row["wmtp_runs"] = [round(r["total"], 3) for r in runs["ours"]]
    row["plain_runs"] = [round(r["total"], 3) for r in runs["plain"]]
    bare = _row(f"preemption: SIGTERM to exit of that run vs one torch.save+fsync of {mb:.0f} MB alone (for "
                "scale: no target; the left side also finishes a step in progress, here "
                f"{phases['ours']['step']:.2f} s, and exits)", med("ours", "total"), statistics.median(saves), None)
    return [row, bare]
