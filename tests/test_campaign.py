"""A small sample of the reliability campaign (``benchmarks/faults.py --quick``), on every CI run,
in one process: SIGKILLs during saves on local disk and S3 (synchronous and background), a full
disk, mutated configurations and crafted checkpoints. Its S3-fault scenario is not sampled here:
tests/test_s3_faults.py runs the same run behind the same fault proxy at the same 10% rate, and
resumes it under those faults too. The full campaign is the command; its figures are in
docs/reliability.md."""

from __future__ import annotations

import os

import pytest
from conftest import assert_campaign_clean, campaign_sample

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    return campaign_sample(tmp_path_factory.mktemp("faults"), "kills,disk,configs,crafted")


def test_the_sample_finds_nothing_torn_lost_executed_or_hung(quick):
    assert_campaign_clean(*quick)


def test_every_kill_chain_was_tried(quick):
    _, tallies = quick
    tried = {name: t["tried"] for name, t in tallies.items()}
    kills = [n for n in tried if n.startswith("kills")]
    assert len(kills) == 4 and all(tried[n] >= 1 for n in kills), tried


def test_every_other_scenario_was_tried(quick):
    _, tallies = quick
    tried = {name: t["tried"] for name, t in tallies.items()}
    assert tried["mutated configurations (--dry-run)"] >= 30
    assert tried["crafted checkpoints (verify, --resume)"] >= 10
    disk = [n for n in tried if n.startswith("full disk")]
    if os.geteuid() == 0:
        assert disk and all(tried[n] >= 1 for n in disk), tried
