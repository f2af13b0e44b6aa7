"""The dry run counts the steps the run will take from the data it reads, as the trainer does
(rows, batch size, ranks, epochs, ``max_steps``), and says which limit binds; the run then takes
exactly that many. The README's fine-tune pair on the origin's MBPP sample is the case a new
user met: "30 steps, 3 saves" said, 6 steps and 1 save taken."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from builders import merge, recipe, tiny_config, write
from hf_models import ORIGIN_DATA, causal_lm

from wmtp_core.run import main

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_pair() -> tuple[dict, dict]:
    """The README's fine-tune pair: its ``config.yaml`` and ``recipe.yaml`` blocks."""
    blocks = re.findall(r"```yaml\n(.*?)```", README.read_text(), re.S)
    config = next(yaml.safe_load(b) for b in blocks if b.startswith("# config.yaml"))
    recipe_ = next(yaml.safe_load(b) for b in blocks if b.startswith("# recipe.yaml"))
    return config, recipe_


def dry(tmp: Path, monkeypatch, capsys, *args: str) -> tuple[int, str]:
    monkeypatch.chdir(tmp)
    code = main(["--config", "c.yaml", "--recipe", "r.yaml", *args])
    out = capsys.readouterr()
    return code, " ".join((out.out + out.err).split())


def test_the_readme_fine_tune_pair_on_the_mbpp_sample_says_6_steps_and_takes_6(tmp_path, monkeypatch, capsys):
    config, recipe_ = readme_pair()
    models = tmp_path / "models"
    causal_lm(models / "my-model", n_positions=512)
    causal_lm(models / "my-reference", seed=1, n_positions=512)
    config = merge(config, {"paths": {"datasets": {"mbpp": str(ORIGIN_DATA / "mbpp")}},
                            "mlflow": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}})
    assert recipe_["train"]["num_epochs"] == 3 and recipe_["train"]["max_steps"] == 1000
    write(tmp_path / "c.yaml", config)
    write(tmp_path / "r.yaml", recipe_)

    code, said = dry(tmp_path, monkeypatch, capsys, "--dry-run")
    assert code == 0, said
    # 10 training problems, one row each (unpacked), 4 a step: 2 steps an epoch, 3 epochs
    assert ("6 steps: train.num_epochs 3 binds (10 training rows, 4 a step: 2 steps an epoch; "
            "max_steps 1,000 is not reached)") in said
    assert "6 steps, 1 saves" in said

    code, said = dry(tmp_path, monkeypatch, capsys)
    assert code == 0, said
    assert "finished at step 6" in said
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "my-model-mbpp").iterdir()
                  if p.name.startswith("step_")) == ["step_6"]


def test_max_steps_binds_and_ranks_share_the_global_batch(tmp_path, monkeypatch, capsys):
    write(tmp_path / "c.yaml", tiny_config(tmp_path))
    write(tmp_path / "r.yaml", recipe(7, train={"num_epochs": 2}))
    code, said = dry(tmp_path, monkeypatch, capsys, "--dry-run")
    assert code == 0, said
    rows = int(re.search(r"7 steps: train.max_steps binds \(([\d,]+) training rows, 4 a step", said)[1].replace(",", ""))
    assert f"2 epochs would allow {2 * (rows // 4):,})" in said
    assert "7 steps, 4 saves" in said  # save_interval 2: steps 2, 4, 6, and the last

    # two ranks: the global batch is twice batch_size, so an epoch has half the steps
    write(tmp_path / "c2.yaml", tiny_config(tmp_path, devices={"fsdp": {"enabled": True}}))
    write(tmp_path / "r2.yaml", recipe(None, train={"num_epochs": 1}))
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    assert main(["--config", "c2.yaml", "--recipe", "r2.yaml", "--dry-run"]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert f"{rows // 8:,} steps: train.num_epochs 1 binds ({rows:,} training rows, 8 a step" in said


def test_a_batch_larger_than_the_data_is_refused_by_the_dry_run(tmp_path, monkeypatch, capsys):
    write(tmp_path / "c.yaml", tiny_config(tmp_path, paths={"datasets": {"mbpp": str(ORIGIN_DATA / "mbpp")}}))
    write(tmp_path / "r.yaml", recipe(5, data={"train": {"sources": ["mbpp"], "max_length": 32, "batch_size": 4000}}))
    code, said = dry(tmp_path, monkeypatch, capsys, "--dry-run")
    assert code == 2, said
    assert "data.train.batch_size: a step takes 4000 rows (data.train.batch_size 4000) but the data yields" in said
    assert "Traceback" not in said


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
