"""A small sample of every scenario of the reliability campaign (``benchmarks/faults.py``), on
every CI run: SIGKILLs during saves on local disk and S3 (synchronous and background). The other
scenarios (S3 faults, a full disk, mutated configurations, crafted checkpoints) are sampled in
tests/test_campaign_faults.py, so that pytest's two workers take one half each. The full
campaign is the command; its figures are in docs/reliability.md."""

from __future__ import annotations

import pytest
from conftest import assert_campaign_clean, campaign_sample

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    return campaign_sample(tmp_path_factory.mktemp("faults"), "kills")


def test_the_kill_sample_finds_nothing_torn_lost_executed_or_hung(quick):
    assert_campaign_clean(*quick)


def test_every_kill_chain_was_tried(quick):
    _, tallies = quick
    tried = {name: t["tried"] for name, t in tallies.items()}
    kills = [n for n in tried if n.startswith("kills")]
    assert len(kills) == 4 and all(tried[n] >= 1 for n in kills), tried
