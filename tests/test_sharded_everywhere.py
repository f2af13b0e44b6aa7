"""Sharded (FSDP, DCP) resume checkpoints are usable everywhere a checkpoint is: ``wmtp register``
stores their gathered weights, ``paths.models.ref`` reads them, and ``wmtp checkpoints convert``
writes them as a single-process final model or resume state, offline, on local disk and S3.
Every checkpoint here is made by a real two-rank torchrun run (gloo, CPU)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import zygote
from builders import merge, recipe, write

pytestmark = pytest.mark.slow

ENV = {"OMP_NUM_THREADS": "1"}
MBPP_TEST = str(Path(__file__).resolve().parents[2] / "shared" / "origin-files" / "datasets" / "mbpp" / "test.json")


def recipe_of(steps: int, **over) -> dict:
    return merge(recipe(steps, optim={"lr": 0.01, "scheduler": "constant", "warmup_ratio": 0.0}), over)


def config(base: str, **over) -> dict:
    return merge({
        "seed": 6,
        "log_interval": 2,
        "paths": {"checkpoints": {"base_path": base, "save_interval": 2, "keep_last": 2}},
        "mlflow": None,
        "storage": {"final": {"sink": "local"}},
    }, over)


def torchrun(args: list[str], cwd: Path):
    """Two ranks, forked as torchrun would start them (tests/zygote.py: ``ranks``)."""
    return zygote.ranks(2, ["-m", "wmtp_core.run", *args], cwd=cwd, timeout=600, env={**os.environ, **ENV})


def single(args: list[str], cwd: Path):
    return zygote.run(["-m", "wmtp_core.run", *args], cwd=cwd, timeout=600, env={**os.environ, **ENV})


def wmtp(*args, cwd: Path):
    """The ``wmtp`` command in a process of its own."""
    return zygote.run(["-c", "import sys; from wmtp_core.cli import main; sys.exit(main())", *map(str, args)],
                      cwd=cwd, timeout=600, env={**os.environ, **ENV})


def sharded_run(root: Path, algo: str) -> Path:
    """A two-rank FSDP run of 4 steps: resume state in ``ck/<run>/step_2`` and ``step_4`` (DCP
    shards), the final model (gathered by FSDP on both ranks) in ``ck/<run>/final/model.pt``."""
    root.mkdir(parents=True, exist_ok=True)
    write(root / "c.yaml", config(f"file://{root}/ck", devices={"fsdp": {"enabled": True}}))
    write(root / "r.yaml", recipe_of(4, train={"algo": algo}, pretrain={"max_steps": 2}))
    proc = torchrun(["--config", "c.yaml", "--recipe", "r.yaml", "--run-name", "two"], root)
    assert proc.returncode == 0, proc.stderr[-4000:]
    step = root / "ck" / "two" / "step_4"
    meta = json.loads((step / "manifest.json").read_text())["meta"]
    assert meta["format"] == "dcp" and meta["world_size"] == 2
    assert not (step / "model.pt").exists()
    return root / "ck" / "two"


@pytest.fixture(scope="module")
def two(tmp_path_factory) -> Path:
    return sharded_run(tmp_path_factory.mktemp("sharded"), "baseline-mtp")


def gathered(run_dir: Path) -> dict[str, torch.Tensor]:
    """The full weights FSDP gathered on both ranks at the last step (the run's final model)."""
    return torch.load(run_dir / "final" / "model.pt", weights_only=True)


def assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in b:
        assert torch.equal(a[k], b[k]), k


def test_register_stores_the_gathered_weights_of_a_sharded_checkpoint(two, tmp_path):
    store = f"sqlite:///{tmp_path}/mlflow.db"
    write(tmp_path / "reg.yaml", {"mlflow": {"experiment": "reg", "tracking_uri": store}})
    proc = wmtp("register", two / "step_4", "--config", tmp_path / "reg.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "holds no model.pt" not in proc.stderr
    assert "models:/wmtp_baseline-mtp/1  via mlflow_registry" in proc.stdout

    from wmtp_plugins.mlflow_registry import wmtp_load_model

    loaded = wmtp_load_model(uri="models:/wmtp_baseline-mtp/1", mlflow_config={"tracking_uri": store})
    assert_same(dict(loaded.weights), gathered(two))
    assert loaded.model_config["d_model"] == 32


def test_wmtp_evaluate_reads_a_sharded_checkpoint_as_it_reads_the_gathered_final_model(two, tmp_path, capsys):
    """The shards of step 4, verified and rebuilt offline, complete prompts exactly as the final
    model FSDP gathered at that step does."""
    from wmtp_core.cli import main as evaluate_cli

    samples = []
    for name in ("step_4", "final"):
        out = tmp_path / f"{name}.jsonl"
        code = evaluate_cli(["evaluate", str(two / name), "--tasks", "mbpp", "--mbpp", MBPP_TEST, "--limit", "2",
                             "--max-new-tokens", "12", "--out", str(out), "--allow-code-execution"])
        assert code == 0, capsys.readouterr().err[-2000:]
        samples.append([(r["task_id"], r["completion"]) for r in map(json.loads, out.read_text().splitlines())])
    assert samples[0] == samples[1] and len(samples[0]) == 2


def test_convert_writes_a_final_model_every_command_accepts(two, tmp_path):
    out = tmp_path / "converted" / "two" / "final"
    proc = wmtp("checkpoints", "convert", two / "step_4", out, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"to {out}" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.pt", "model_config.json"]
    manifest = json.loads((out / "manifest.json").read_text())
    source = json.loads((two / "step_4" / "manifest.json").read_text())
    assert (manifest["role"], manifest["step"], manifest["run"]) == ("final", 4, "two")
    assert manifest["lineage"] == source["lineage"] and manifest["meta"]["algo"] == "baseline-mtp"
    assert_same(torch.load(out / "model.pt", weights_only=True), gathered(two))
    assert json.loads((out / "model_config.json").read_text()) == json.loads(
        (two / "final" / "model_config.json").read_text())

    verify = wmtp("checkpoints", "verify", out, cwd=tmp_path)
    assert verify.returncode == 0 and f"OK      {out}" in verify.stdout
    ls = wmtp("checkpoints", "ls", out.parent, "--json", cwd=tmp_path)
    assert [(e["name"], e["state"], e["role"]) for e in json.loads(ls.stdout)] == [("final", "committed", "final")]

    from wmtp_core.checkpoint_models import load_model_from_checkpoint

    assert_same(dict(load_model_from_checkpoint(str(out)).weights), gathered(two))

    again = wmtp("checkpoints", "convert", two / "step_4", out, cwd=tmp_path)
    assert again.returncode == 2 and "already committed" in again.stderr
    assert wmtp("checkpoints", "convert", two / "step_4", tmp_path / "x" / "two" / "step_4",
                cwd=tmp_path).returncode == 2, "a weights-only copy named step_N would not be resume state"
    plain = wmtp("checkpoints", "convert", out, tmp_path / "y" / "two" / "final", cwd=tmp_path)
    assert plain.returncode == 2 and "not a sharded" in plain.stderr


def test_convert_full_resumes_on_one_process_and_trains_on(two, tmp_path):
    out = tmp_path / "single" / "two" / "step_4"
    proc = wmtp("checkpoints", "convert", two / "step_4", out, "--full", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.pt", "optimizer.pt", "trainer.pt"]
    assert json.loads((out / "manifest.json").read_text())["role"] == "resume"
    model = torch.load(out / "model.pt", weights_only=True)
    assert_same(model, gathered(two))

    # the optimizer numbers parameters as a single-process AdamW over the model does, and each
    # number holds that parameter's moments as the shards recorded them
    from wmtp_core.checkpoint_models import read_sharded
    from wmtp_core.commit import CheckpointStore
    from wmtp_core.engine.model import ModelConfig, MTPModel

    store = CheckpointStore.from_url(str(two.parent))
    state, trainer = read_sharded(store, str(two / "step_4"), store.read_manifest(str(two / "step_4")),
                                  parts=("optimizer",))
    optimizer = torch.load(out / "optimizer.pt", weights_only=True)
    names = [n for n, _ in MTPModel(ModelConfig(**trainer["model_config"])).named_parameters()]
    assert [p for g in optimizer["param_groups"] for p in g["params"]] == list(range(len(names)))
    for i, name in enumerate(names):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(optimizer["state"][i][key], state["optimizer"]["state"][name][key]), (name, key)

    write(tmp_path / "c.yaml", config(f"file://{tmp_path}/ck"))
    write(tmp_path / "r.yaml", recipe_of(6))
    resumed = single(["--config", "c.yaml", "--recipe", "r.yaml", "--run-name", "one", "--resume", str(out)],
                     tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"resuming 'one' from {out} (step 4)" in resumed.stderr
    assert json.loads((tmp_path / "ck" / "one" / "step_6" / "manifest.json").read_text())["step"] == 6


def test_a_tampered_shard_is_refused_naming_the_file(two, tmp_path):
    bad = tmp_path / "bad" / "two" / "step_4"
    shutil.copytree(two / "step_4", bad)
    shard = bad / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes
    shard.write_bytes(bytes(data))
    for name, args in (("final", []), ("step_4", ["--full"])):
        out = tmp_path / "out" / "two" / name
        proc = wmtp("checkpoints", "convert", bad, out, *args, cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and str(shard) in lines[0] and "does not match the manifest" in lines[0], proc.stderr
        assert "Traceback" not in proc.stderr
        assert not out.exists()

    from wmtp_core.checkpoint_models import load_model_from_checkpoint
    from wmtp_core.errors import CheckpointError

    with pytest.raises(CheckpointError, match="__1_0.distcp"):
        load_model_from_checkpoint(str(bad))


def test_metadata_that_lies_about_sizes_is_refused_before_anything_is_allocated(two, tmp_path):
    """A ``.metadata`` rewritten (and the manifest with it, as anyone with write access can) to
    claim a tensor of a terabyte: the offline loader would allocate it from the metadata alone."""
    import dataclasses
    import pickle

    from wmtp_core.hashing import HASH, digest_bytes

    forged = tmp_path / "forged" / "two" / "step_4"
    shutil.copytree(two / "step_4", forged)
    with open(forged / ".metadata", "rb") as f:
        metadata = pickle.load(f)  # the test's own copy: trusted here
    name = next(k for k in metadata.state_dict_metadata if k.startswith("model."))
    entry = metadata.state_dict_metadata[name]
    metadata.state_dict_metadata[name] = dataclasses.replace(entry, size=torch.Size([1 << 20, 1 << 18]))
    (forged / ".metadata").write_bytes(pickle.dumps(metadata))
    manifest = json.loads((forged / "manifest.json").read_text())
    for e in manifest["files"]:
        if e["path"] == ".metadata":
            data = (forged / ".metadata").read_bytes()
            e["size"], e["digest"] = len(data), digest_bytes(data, HASH)
    (forged / "manifest.json").write_text(json.dumps(manifest))

    from wmtp_core.checkpoint_models import load_model_from_checkpoint
    from wmtp_core.errors import CheckpointError

    with pytest.raises(CheckpointError, match="describes .* bytes of tensors, more than"):
        load_model_from_checkpoint(str(forged))


def test_rho1_trains_with_a_sharded_reference(two, tmp_path):
    write(tmp_path / "c.yaml", config(f"file://{tmp_path}/ck", paths={"models": {"ref": str(two / "step_4")}}))
    write(tmp_path / "r.yaml", recipe_of(2, train={"algo": "rho1-wmtp"}))
    proc = single(["--config", "c.yaml", "--recipe", "r.yaml", "--run-name", "rho"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "ck" / "rho" / "final" / "manifest.json").exists()


def test_convert_reads_and_writes_s3(two, s3_server, bucket, tmp_path):
    import fsspec

    from wmtp_core.checkpoint_models import load_model_from_checkpoint

    fs = fsspec.filesystem("s3")
    fs.put(str(two / "step_4"), f"{bucket}/src/two/step_4", recursive=True)
    assert wmtp("checkpoints", "verify", f"s3://{bucket}/src/two/step_4", cwd=tmp_path).returncode == 0

    local = tmp_path / "from-s3" / "two" / "final"
    proc = wmtp("checkpoints", "convert", f"s3://{bucket}/src/two/step_4", local, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same(torch.load(local / "model.pt", weights_only=True), gathered(two))

    remote = f"s3://{bucket}/to-s3/two/step_4"
    proc = wmtp("checkpoints", "convert", two / "step_4", remote, "--full", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    verify = wmtp("checkpoints", "verify", remote, cwd=tmp_path)
    assert verify.returncode == 0 and "1 of 1 checkpoint verified" in verify.stdout
    assert_same(dict(load_model_from_checkpoint(remote).weights), gathered(two))
    # and the sharded source straight from S3, as paths.models.ref reads it
    assert_same(dict(load_model_from_checkpoint(f"s3://{bucket}/src/two/step_4").weights), gathered(two))


def test_critic_value_head_is_no_part_of_the_model_and_one_process_resumes_it(tmp_path):
    """Under FSDP critic-wmtp's value head is saved with the model's shards: the final model
    leaves it out, and the single-process resume state keeps it in the algorithm's state."""
    from wmtp_core.checkpoint_models import load_model_from_checkpoint

    run = sharded_run(tmp_path / "critic", "critic-wmtp")
    loaded = load_model_from_checkpoint(str(run / "step_4"))
    assert not [k for k in loaded.weights if k.startswith("value_head.")]
    assert_same(dict(loaded.weights), gathered(run))

    out = tmp_path / "single" / "two" / "step_4"
    proc = wmtp("checkpoints", "convert", run / "step_4", out, "--full", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not [k for k in torch.load(out / "model.pt", weights_only=True) if k.startswith("value_head.")]
    assert torch.load(out / "trainer.pt", weights_only=True)["algo"]["value_head"]

    write(tmp_path / "c.yaml", config(f"file://{tmp_path}/ck"))
    write(tmp_path / "r.yaml", recipe_of(6, train={"algo": "critic-wmtp"}, pretrain={"max_steps": 2}))
    resumed = single(["--config", "c.yaml", "--recipe", "r.yaml", "--run-name", "one", "--resume", str(out)],
                     tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
