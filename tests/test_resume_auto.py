"""``--resume auto``: the same command, launched again and again by a scheduler, starts fresh while
the run has no committed checkpoint and resumes the newest one that verifies afterwards;
``--resume latest`` stays strict."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from builders import files, merge, tiny_config

pytestmark = pytest.mark.slow


def launch(tmp: Path, monkeypatch, capsys, *extra: str, steps: int = 4):
    from wmtp_core.run import main

    monkeypatch.chdir(tmp)
    config = merge(tiny_config(tmp), {"mlflow": None, "storage": {"final": {"sink": "local"}}})
    args = files(tmp, config, {"run": {"name": "auto"}, "train": {"max_steps": steps}})
    code = main([*args, *extra])
    out = capsys.readouterr()
    return code, out.err


def steps_of(tmp: Path) -> list[int]:
    return sorted(int(d.name[5:]) for d in (tmp / "ck" / "auto").glob("step_*") if d.name[5:].isdigit())


def test_resume_auto_starts_fresh_then_resumes_the_newest_checkpoint(tmp_path, monkeypatch, capsys):
    code, err = launch(tmp_path, monkeypatch, capsys, "--resume", "auto", steps=2)
    assert code == 0, err
    assert "--resume auto: run 'auto' has no committed checkpoint at" in err
    assert "starting fresh" in err and "resuming" not in err
    assert steps_of(tmp_path) == [2]

    code, err = launch(tmp_path, monkeypatch, capsys, "--resume", "auto", steps=4)
    assert code == 0, err
    assert "starting fresh" not in err
    assert f"resuming 'auto' from {tmp_path}/ck/auto/step_2 (step 2)" in err
    assert steps_of(tmp_path) == [2, 4]
    manifest = json.loads((tmp_path / "ck" / "auto" / "step_4" / "manifest.json").read_text())
    first = json.loads((tmp_path / "ck" / "auto" / "step_2" / "manifest.json").read_text())
    assert manifest["lineage"] == first["lineage"], "the resumed run continues the same lineage"


def test_resume_latest_stays_strict_when_nothing_is_committed(tmp_path, monkeypatch, capsys):
    code, err = launch(tmp_path, monkeypatch, capsys, "--resume", "latest")
    assert code == 2
    assert "--resume latest: no committed checkpoint under" in err
    assert steps_of(tmp_path) == []


def test_resume_auto_never_starts_fresh_over_checkpoints_that_all_fail(tmp_path, monkeypatch, capsys):
    code, err = launch(tmp_path, monkeypatch, capsys, "--resume", "auto", steps=2)
    assert code == 0, err
    weights = next((tmp_path / "ck" / "auto" / "step_2").glob("model*"))
    weights.write_bytes(b"\0" * weights.stat().st_size)  # same size, wrong bytes
    code, err = launch(tmp_path, monkeypatch, capsys, "--resume", "auto", steps=4)
    assert code == 2, err
    assert "starting fresh" not in err
    assert "no checkpoint under" in err and "verifies" in err
    assert steps_of(tmp_path) == [], "the corrupt checkpoint was quarantined, nothing new committed"
    assert list((tmp_path / "ck" / "auto").glob("step_2.quarantined-*"))
