"""A small sample of every scenario of the reliability campaign (``benchmarks/faults.py``), on
every CI run: SIGKILLs during saves on local disk and S3 (synchronous and background). The other
scenarios (S3 faults, a full disk, mutated configurations, crafted checkpoints) are sampled in
tests/test_campaign_faults.py, so that pytest's two workers take one half each. The full
campaign is the command; its figures are in docs/reliability.md."""

from __future__ import annotations

import pytest
from conftest import campaign_sample

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    return campaign_sample(tmp_path_factory.mktemp("faults"), "kills")


def test_the_kill_sample_finds_nothing_torn_lost_executed_or_hung(quick):
    proc, tallies = quick
    for name, t in tallies.items():
        assert t["torn"] == 0 and t["lost"] == 0, (name, t["notes"])
        assert t["tracebacks"] == 0 and t["hangs"] == 0 and t["executed"] == 0, (name, t["notes"])
        assert t["survived"] == t["tried"], (name, t["notes"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_every_kill_chain_was_tried(quick):
    _, tallies = quick
    tried = {name: t["tried"] for name, t in tallies.items()}
    kills = [n for n in tried if n.startswith("kills")]
    assert len(kills) == 4 and all(tried[n] >= 2 for n in kills), tried
