"""The rest of the campaign's sample (tests/test_campaign.py has the kills): S3 faults, a full
disk, mutated configurations and crafted checkpoints."""

from __future__ import annotations

import os

import pytest
from conftest import assert_campaign_clean, campaign_sample

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    return campaign_sample(tmp_path_factory.mktemp("faults"), "s3,disk,configs,crafted")


def test_the_fault_sample_finds_nothing_torn_lost_executed_or_hung(quick):
    assert_campaign_clean(*quick)


def test_every_other_scenario_was_tried(quick):
    _, tallies = quick
    tried = {name: t["tried"] for name, t in tallies.items()}
    assert not [n for n in tried if n.startswith("kills")], tried
    assert tried["mutated configurations (--dry-run)"] >= 30
    assert tried["crafted checkpoints (verify, --resume)"] >= 10
    assert any(n.startswith("s3 faults") and tried[n] >= 1 for n in tried), tried
    disk = [n for n in tried if n.startswith("full disk")]
    if os.geteuid() == 0:
        assert all(tried[n] >= 1 for n in disk), tried
