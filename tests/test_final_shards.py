"""``storage.final.max_shard_size``: a Hugging Face final model larger than it is stored as sharded
safetensors (``model-0000i-of-0000N.safetensors`` and ``model.safetensors.index.json``), the
layout ``save_pretrained`` writes, at the end of a run (one process, or FSDP ranks gathering one
shard at a time), by ``wmtp register``, and through MLflow's transformers flavor; each loads back
tensor for tensor equal to the unsharded final model of the same run. Bad values are refused."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
import zygote
from builders import write
from hf_models import ORIGIN_DATA, causal_lm

SHARDS = "20KB"
"""The tiny GPT-2 (2 layers, width 32, GPT-2's vocabulary) in a dozen shards or so."""
SHARD = re.compile(r"model-(\d{5})-of-(\d{5})\.safetensors")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return causal_lm(tmp_path_factory.mktemp("base") / "distilgpt2-mtp")


def config(tmp: Path, base: Path, final: dict, **over) -> dict:
    data = {"seed": 5,
            "paths": {"models": {"base": str(base)}, "datasets": {"mbpp": str(ORIGIN_DATA / "mbpp")},
                      "checkpoints": {"base_path": f"file://{tmp}/ck", "save_interval": 2}},
            "mlflow": {"experiment": "shards", "tracking_uri": f"sqlite:///{tmp}/mlflow.db"},
            "storage": {"final": final}}
    return {**data, **over}


RECIPE = {"run": {"name": "hf"}, "train": {"algo": "baseline-mtp", "max_steps": 2},
          "data": {"train": {"sources": ["mbpp"], "max_length": 32, "batch_size": 2, "pack_sequences": False}}}


def unsharded(step_dir: Path) -> dict[str, torch.Tensor]:
    """The same run's final model rebuilt from its last checkpoint as it is stored by default (one
    ``model.safetensors``), loaded with ``from_pretrained``."""
    from transformers import AutoModelForCausalLM

    from wmtp_core.registering import discard, final_payload_from

    payload = final_payload_from(str(step_dir))
    try:
        names = set(os.listdir(payload.folder))
        assert "model.safetensors" in names and "model.safetensors.index.json" not in names
        return AutoModelForCausalLM.from_pretrained(payload.folder, local_files_only=True).state_dict()
    finally:
        discard(payload)


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want), [k for k in want if not torch.equal(got[k], want[k])]


def assert_sharded(names: set[str], folder: Path | None = None) -> int:
    """``names`` (a folder's files) hold N >= 3 shards, their index and no ``model.safetensors``;
    with ``folder``, the index names exactly the tensors of its shards. Returns N."""
    shards = sorted(n for n in names if SHARD.fullmatch(n))
    total = int(SHARD.fullmatch(shards[0])[2]) if shards else 0
    assert total >= 3 and shards == [f"model-{i:05d}-of-{total:05d}.safetensors" for i in range(1, total + 1)], names
    assert "model.safetensors.index.json" in names and "model.safetensors" not in names
    if folder is not None:
        from safetensors import safe_open

        index = json.loads((folder / "model.safetensors.index.json").read_text())
        held = {}
        for shard in shards:
            with safe_open(folder / shard, "pt") as f:
                held.update(dict.fromkeys(f.keys(), shard))
        assert index["weight_map"] == held
    return total


@pytest.mark.slow
def test_a_run_registers_a_sharded_final_model_and_wmtp_register_stores_one_too(base, tmp_path, monkeypatch, capsys):
    """The end of a run (MLflow's transformers flavor) and ``wmtp register`` (the local sink) both
    store the final model in shards; each loads back equal to the unsharded one, same keys (the
    tied LM head left out as ``save_pretrained`` leaves it out)."""
    import mlflow
    from transformers import AutoModelForCausalLM

    from wmtp_core.cli import main as wmtp
    from wmtp_core.run import main

    write(tmp_path / "c.yaml", config(tmp_path, base, {"sink": "mlflow_registry", "max_shard_size": SHARDS}))
    write(tmp_path / "r.yaml", RECIPE)
    monkeypatch.chdir(tmp_path)
    assert main(["--config", "c.yaml", "--recipe", "r.yaml"]) == 0, capsys.readouterr().err[-3000:]
    want = unsharded(tmp_path / "ck" / "hf" / "step_2")

    store = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(store)
    mlflow.set_registry_uri(store)
    files = {f.path.removeprefix("model/") for f in
             mlflow.artifacts.list_artifacts(artifact_uri="models:/wmtp_baseline-mtp/1/model")}
    assert_sharded(files)
    assert {"mtp_heads.safetensors", "wmtp.json", "config.json", "tokenizer.json"} <= files
    parts = mlflow.transformers.load_model("models:/wmtp_baseline-mtp/1", return_type="components")
    assert_same(parts["model"].state_dict(), want)

    local = {"mlflow": None, "storage": {"final": {"sink": "local", "max_shard_size": SHARDS}}}
    write(tmp_path / "reg.yaml", config(tmp_path, base, {}, **local))
    assert wmtp(["register", str(tmp_path / "ck" / "hf" / "step_2"), "--config", str(tmp_path / "reg.yaml")]) == 0
    final = tmp_path / "ck" / "hf" / "final"
    names = {p.name for p in final.iterdir()}
    assert_sharded(names, final)
    manifest = json.loads((final / "manifest.json").read_text())
    assert {f["path"] for f in manifest["files"]} == names - {"manifest.json"}, "every shard is committed"
    assert_same(AutoModelForCausalLM.from_pretrained(final, local_files_only=True).state_dict(), want)


@pytest.mark.slow
def test_two_fsdp_ranks_write_the_shards_save_pretrained_writes(base, tmp_path):
    """Under FSDP rank 0 gathers and writes one shard at a time: the files are, byte for byte, the
    ones ``save_pretrained`` writes in one process for the same weights (the run's last
    checkpoint, rebuilt by ``wmtp register``'s own function), and load back equal to the
    unsharded final model."""
    from wmtp_core.registering import discard, final_payload_from

    c = config(tmp_path, base, {"sink": "local", "max_shard_size": SHARDS}, mlflow=None,
               devices={"fsdp": {"enabled": True, "auto_wrap": True}})
    write(tmp_path / "c.yaml", c)
    write(tmp_path / "r.yaml", RECIPE)
    proc = zygote.ranks(2, ["-m", "wmtp_core.run", "--config", "c.yaml", "--recipe", "r.yaml"], cwd=tmp_path,
                        env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    final, step = tmp_path / "ck" / "hf" / "final", tmp_path / "ck" / "hf" / "step_2"
    names = {p.name for p in final.iterdir()}
    assert_sharded(names, final)
    one = final_payload_from(str(step), max_shard_size=SHARDS)
    try:
        expected = set(os.listdir(one.folder))
        assert names - {"manifest.json"} == expected
        for name in sorted(expected - {"config.json", "wmtp.json"}):  # wmtp.json: the run's algo, step, dtype
            assert (final / name).read_bytes() == Path(one.folder, name).read_bytes(), name
        assert json.loads((final / "config.json").read_text()) == json.loads(Path(one.folder, "config.json").read_text())
    finally:
        discard(one)
    from transformers import AutoModelForCausalLM

    assert_same(AutoModelForCausalLM.from_pretrained(final, local_files_only=True).state_dict(), unsharded(step))


# ------------------------------------------------------------------------------ the key itself
@pytest.mark.parametrize("value", ["5 parsecs", 0, -1, "-1MB", "0GB", "5.5GB", "1000", True, 1.5, [5]],
                         ids=repr)
def test_a_max_shard_size_transformers_would_not_read_is_refused_in_one_line(tmp_path, value):
    from wmtp_core.config import load_settings
    from wmtp_core.errors import ConfigError

    path = write(tmp_path / "c.yaml", {"storage": {"final": {"sink": "local", "max_shard_size": value}}})
    with pytest.raises(ConfigError) as e:
        load_settings(path)
    message = str(e.value)
    assert "\n" not in message and f"storage.final.max_shard_size: {value!r} is not accepted" in message
    assert "'5GB'" in message and "10KiB" in message and "bytes" in message


def test_max_shard_size_is_refused_for_the_resume_role(tmp_path):
    from wmtp_core.config import load_settings
    from wmtp_core.errors import ConfigError

    path = write(tmp_path / "c.yaml", {"storage": {"resume": {"sink": "local", "max_shard_size": "5GB"}}})
    with pytest.raises(ConfigError, match=r"storage\.resume\.max_shard_size: '5GB' is not accepted; accepted: "
                                          r"only null here.*storage\.final\.max_shard_size"):
        load_settings(path)


def test_sizes_are_read_as_transformers_reads_them_and_the_default_is_its_own():
    """The config is checked without importing transformers: the check agrees with transformers'
    ``convert_file_size_to_int`` on every form, and null is ``save_pretrained``'s own default."""
    import inspect

    from transformers import PreTrainedModel
    from transformers.utils.hub import convert_file_size_to_int

    from wmtp_core.config import load_settings
    from wmtp_core.engine.final_shards import limit
    from wmtp_core.validators import file_size

    for value in ("5GB", "500MB", "50MB", "10KiB", "3MiB", "2GiB", "7KB", "5Gb", "8mb", "1kb", "12", "5 GB", " 5GB",
                  "5_0MB", "5.5GB", "GB", "0MB", "-3KiB", "+4MB", 1, 4096, 10**12):
        try:
            theirs = convert_file_size_to_int(value)
        except ValueError:
            theirs = None
        assert file_size(value) == (theirs if theirs is not None and theirs >= 1 else None), value
        if file_size(value) is not None:
            assert limit(value) == theirs
    default = inspect.signature(PreTrainedModel.save_pretrained).parameters["max_shard_size"].default
    assert load_settings().config.storage is None
    assert limit(None) == convert_file_size_to_int(default)
