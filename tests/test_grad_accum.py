"""Gradient accumulation (``train.grad_accum_steps``): N micro-batches of b rows take the step one
batch of N·b rows takes, on one process and under FSDP2 (which reduces the gradients once, after
the last micro-batch); saves fall on optimiser steps; a resumed run is bit-exact.

Each micro-batch's loss is the mean over its own positions and the step's gradient is the mean
of the micro-batches': the same as one batch's when the micro-batches hold equally many positions
(packed rows, as here)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import zygote
from builders import recipe, tiny_config, write

from wmtp_core.run import main

pytestmark = pytest.mark.slow

TOLERANCE = 2e-5
"""Largest absolute difference allowed between parameters after the same steps taken in one
batch and in micro-batches (learning rate 3e-3): the same sums in another order."""


def files(tmp: Path, batch_size: int, accum: int, steps: int = 3, **config) -> None:
    write(tmp / "c.yaml", tiny_config(tmp, mlflow=None, storage={"final": {"sink": "local"}}, **config))
    write(tmp / "r.yaml", recipe(steps, train={"grad_accum_steps": accum},
                                 optim={"scheduler": "constant", "warmup_ratio": 0.0, "grad_clip": 1.0},
                                 data={"train": {"sources": ["stdlib"], "max_length": 32, "batch_size": batch_size}}))


def run(tmp: Path, monkeypatch, capsys, *args: str) -> str:
    monkeypatch.chdir(tmp)
    code = main(["--config", "c.yaml", "--recipe", "r.yaml", "--run-name", "r", *args])
    out = capsys.readouterr()
    assert code == 0, out.err[-3000:]
    return out.out + out.err


def final(tmp: Path) -> dict[str, torch.Tensor]:
    return torch.load(tmp / "ck" / "r" / "final" / "model.pt", weights_only=True)


def assert_same_steps(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    worst = max((float((a[k].float() - b[k].float()).abs().max()), k) for k in a)
    assert worst[0] <= TOLERANCE, f"{worst[1]} differs by {worst[0]:.2e}"


def test_four_micro_batches_of_2_take_the_step_of_one_batch_of_8(tmp_path, monkeypatch, capsys):
    one, micro = tmp_path / "one", tmp_path / "micro"
    for folder, (b, n) in ((one, (8, 1)), (micro, (2, 4))):
        folder.mkdir()
        files(folder, b, n)
        said = run(folder, monkeypatch, capsys)
        assert "finished at step 3" in said
    assert_same_steps(final(one), final(micro))
    # saves fall on optimiser steps: every 2 steps, and the last
    assert sorted(p.name for p in (micro / "ck" / "r").iterdir() if p.name.startswith("step_")) == \
        ["step_2", "step_3"]


def test_the_dry_run_counts_a_step_as_its_micro_batches(tmp_path, monkeypatch, capsys):
    files(tmp_path, 4, 3, steps=None)
    said = " ".join(run(tmp_path, monkeypatch, capsys, "--dry-run").split())
    assert "training rows, 12 a step:" in said and "train.num_epochs 1 binds" in said


def test_a_run_resumed_between_accumulated_steps_is_bit_exact(tmp_path, monkeypatch, capsys):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    whole.mkdir(), cut.mkdir()
    files(whole, 2, 3, steps=4)
    run(whole, monkeypatch, capsys)
    files(cut, 2, 3, steps=2)  # stops at step 2 (saved), then the same run goes on to 4
    run(cut, monkeypatch, capsys)
    files(cut, 2, 3, steps=4)
    said = run(cut, monkeypatch, capsys, "--resume", "latest")
    assert "finished at step 4" in said
    a, b = final(whole), final(cut)
    assert all(torch.equal(a[k], b[k]) for k in a), "bit-exact"


def test_two_fsdp_ranks_accumulating_take_the_step_of_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    files(one, 8, 1)
    files(two, 2, 2, devices={"fsdp": {"enabled": True}})  # 2 ranks x 2 rows x 2 micro-batches
    args = ["-m", "wmtp_core.run", "--config", "c.yaml", "--recipe", "r.yaml", "--run-name", "r"]
    single = zygote.run(args, cwd=one, env=dict(os.environ))
    assert single.returncode == 0, single.stderr[-3000:]
    sharded = zygote.ranks(2, args, cwd=two, env=dict(os.environ))
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    assert_same_steps(final(one), final(two))
