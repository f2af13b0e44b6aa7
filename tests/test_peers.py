"""``benchmarks/peers.py --quick``: WMTP beside Lightning and the Hugging Face Trainer (their
documented setups), the same model, data and local store. The assertions are about WMTP's rows;
the peers' rows are reported, except that each peer really trained and saved. Skipped when the
``peers`` dependency group (lightning, accelerate) is not installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lightning", reason="the peers dependency group is not installed")
pytest.importorskip("accelerate", reason="the peers dependency group is not installed")

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
WMTP = "wmtp/default"


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path_factory.mktemp("peers")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "peers.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=3600, cwd=ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert (out / "peers.json").exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "peers.md").exists()
    return proc, json.loads((out / "peers.json").read_text())


def targets(report: dict, prefix: str) -> list[dict]:
    return [t for t in report["targets"] if t["target"].startswith(prefix)]


def test_every_side_trained_and_saved(quick):
    proc, report = quick
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    runs = report["runs"]["local"]
    assert set(runs) == {"lightning/documented", "hf/documented", WMTP}
    for label, repeats in runs.items():
        for r in repeats:
            assert r["error"] is None, (label, r["error"])
            assert r["checkpoint_files"] > 0, f"{label} saved no checkpoint file"
            assert r["final_step"] == report["plan"]["steps"], (label, r["final_step"])


def test_wmtp_holds_at_most_a_third_of_each_documented_peer(quick):
    _, report = quick
    held = targets(report, "bytes held")
    assert len(held) == 2 and all(t["pass"] for t in held), held


def test_wmtp_resumes_bit_exact_after_a_sigkill_in_a_save(quick):
    _, report = quick
    row = report["summary"]["local"][WMTP]
    assert row["kills"] and all(k["killed_rc"] == -9 for k in row["kills"]), row["kills"]
    assert all(k["equal"] and k["resumed_from_step"] for k in row["kills"]), row["kills"]


def test_wmtp_falls_back_from_a_flipped_byte_and_finishes_equal(quick):
    _, report = quick
    flip = report["summary"]["local"][WMTP]["corruption"]["flip"]
    assert flip["outcome"] == "fallback", flip
    assert flip["resumed_from_step"] < flip["corrupted_step"] and flip["equal"]


def test_wmtp_registers_its_final_model_once_loadable_and_without_optimizer_state(quick):
    _, report = quick
    row = report["summary"]["local"][WMTP]
    assert row["registered"] == 1 and row["loadable"] and row["optimizer_free"], row
