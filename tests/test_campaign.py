"""A small sample of every scenario of the reliability campaign (``benchmarks/faults.py``), on
every CI run: SIGKILLs during saves on local disk and S3 (synchronous and background), S3
faults, a full disk, mutated configurations, crafted checkpoints. The full campaign is the
command; its figures are in docs/reliability.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "faults.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    tallies = {t["scenario"]: t for t in json.loads((out / "faults.json").read_text())}
    return proc, tallies


def test_the_campaign_sample_finds_nothing_torn_lost_executed_or_hung(quick):
    proc, tallies = quick
    for name, t in tallies.items():
        assert t["torn"] == 0 and t["lost"] == 0, (name, t["notes"])
        assert t["tracebacks"] == 0 and t["hangs"] == 0 and t["executed"] == 0, (name, t["notes"])
        assert t["survived"] == t["tried"], (name, t["notes"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_every_scenario_was_tried(quick):
    _, tallies = quick
    tried = {name: t["tried"] for name, t in tallies.items()}
    kills = [n for n in tried if n.startswith("kills")]
    assert len(kills) == 4 and all(tried[n] >= 2 for n in kills), tried
    assert tried["mutated configurations (--dry-run)"] >= 50
    assert tried["crafted checkpoints (verify, --resume)"] >= 15
    assert any(n.startswith("s3 faults") and tried[n] >= 1 for n in tried), tried
    disk = [n for n in tried if n.startswith("full disk")]
    if os.geteuid() == 0:
        assert all(tried[n] >= 1 for n in disk), tried
