"""Preemption: the time from SIGTERM to the exit of a real training process (finish the step,
commit its resume state, end the run), against one synchronous save of a state of the same size
(bare ``torch.save`` + fsync), measured in the same run."""

from __future__ import annotations

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
import os, sys
from pathlib import Path
from wmtp_core import hookimpl
from wmtp_core.run import leave, main

class Ready:
    # writes a marker once training is under way, so the signal lands mid-run
    @hookimpl
    def wmtp_step_ended(self, event):
        if event.step == 3:
            Path(sys.argv[1]).write_text("ready")

leave(main(sys.argv[2:], plugins=(Ready(),)))
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


def _signal_to_exit(work: Path) -> tuple[float, int]:
    marker = work / "ready"
    marker.unlink(missing_ok=True)
    shutil.rmtree(work / "ck", ignore_errors=True)
    proc = subprocess.Popen([sys.executable, "-c", RUN, str(marker), *_files(work)], cwd=work,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while not marker.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"the run ended before training: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    t0 = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=600)
    elapsed = time.perf_counter() - t0
    if code != 4:
        raise RuntimeError(f"expected exit 4, got {code}: {proc.stderr.read()[-2000:]}")
    nbytes = sum(p.stat().st_size for p in (work / "ck" / "pre").rglob("*") if p.is_file())
    return elapsed, nbytes


def bench_preempt(size_mb: int, repeat: int, workdir=None) -> list[dict]:
    work = _scratch(workdir)
    try:
        ours, plain, sizes = [], [], []
        for i in range(min(repeat, 3)):
            # the two sides alternate which goes first (the disk's state after one affects the other)
            for side in (("ours", "plain") if i % 2 == 0 else ("plain", "ours")):
                if side == "ours":
                    elapsed, nbytes = _signal_to_exit(work)
                    ours.append(elapsed)
                    sizes.append(nbytes)
                    continue
                # the plain alternative: one synchronous save of as many bytes
                n = nbytes // 4  # known: the first repetition runs WMTP first
                state = {"w": torch.randn(n // 3), "m": torch.randn(n // 3), "v": torch.rand(n - 2 * (n // 3))}
                t0 = time.perf_counter()
                bare_save(state, work / "plain.pt")
                plain.append(time.perf_counter() - t0)
                os.remove(work / "plain.pt")
        mb = statistics.median(sizes) / 1e6
        return [_row(f"preemption: SIGTERM to exit of a training run ({mb:.0f} MB resume state: finish the "
                     "step, commit, end) vs one torch.save+fsync of as many bytes",
                     statistics.median(ours), statistics.median(plain), 1.2)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
