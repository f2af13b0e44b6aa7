"""The original trainer's own files (``../shared/origin-files/``), as its users have them: all 11
load, its local test configuration runs each of its recipes from a working directory laid out
as it expects, and a dry run of anything else names only what this machine lacks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from hf_models import ORIGIN, causal_lm, origin_models

from wmtp_core.config import load_settings
from wmtp_core.run import EXIT_OK, EXIT_USAGE, main

CONFIGS = ORIGIN / "configs"
TESTS = ORIGIN / "tests" / "configs"
PRODUCTION_RECIPES = sorted(CONFIGS.glob("recipe.*.yaml"))
TEST_RECIPES = sorted(TESTS.glob("recipe.*.yaml"))
ALL = [*sorted(CONFIGS.glob("config.*.yaml")), *PRODUCTION_RECIPES, TESTS / "config.local_test.yaml", *TEST_RECIPES]

ENVIRONMENT = [
    r"does not exist",
    r"has no usable CUDA device",
    r"'mps' was asked for but MPS is not available here",
    r"is a file store, which MLflow [\d.]+ refuses unless the environment sets MLFLOW_ALLOW_FILE_STORE=true",
    r"cannot be used by MLflow as a tracking store or model registry \(s3:// holds artifacts only\)",
    r"'nccl' needs CUDA devices",
]
"""What this machine (no GPU, no MPS, no /app mount, no MLflow file store) may say of the
origin's production files; anything else would be WMTP failing to understand them."""


def test_there_are_eleven_origin_files_and_each_loads():
    assert len(ALL) == 11
    for path in ALL:
        if path.name.startswith("config."):
            settings = load_settings(str(path), None)
        else:
            settings = load_settings(None, str(path))
        assert settings is not None


def problems(err: str) -> list[str]:
    text = " ".join(err.split())
    text = text.removeprefix("error: ")
    if "problems: - " in text:
        return text.split("problems: - ", 1)[1].split(" - ")
    return [text]


def dry_run(capsys, config: Path | None, recipe: Path | None) -> tuple[int, str, str]:
    args = ["--dry-run"] + (["--config", str(config)] if config else []) + (["--recipe", str(recipe)] if recipe else [])
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A working directory laid out as the origin's tests expect: ``tests/test_models`` (its four
    model folders, with tiny weights made here), ``tests/test_dataset`` (its samples) and
    ``tests/configs`` (its files)."""
    root = tmp_path_factory.mktemp("origin")
    origin_models(root)
    (root / "tests" / "test_dataset").symlink_to(ORIGIN / "tests" / "test_dataset")
    (root / "tests" / "configs").symlink_to(TESTS)
    return root


CASES = [(config, recipe) for config in sorted(CONFIGS.glob("config.*.yaml")) for recipe in [None]] + \
    [(CONFIGS / "config.vessl.yaml", r) for r in PRODUCTION_RECIPES] + \
    [(TESTS / "config.local_test.yaml", r) for r in TEST_RECIPES]


@pytest.mark.parametrize("config,recipe", CASES, ids=lambda p: p.name if p else "default recipe")
def test_a_dry_run_of_every_origin_file_names_only_what_this_machine_lacks(config, recipe, workdir, capsys,
                                                                           monkeypatch):
    monkeypatch.chdir(workdir)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    code, out, err = dry_run(capsys, config, recipe)
    assert "Traceback" not in err
    if code == EXIT_OK:
        assert "nothing was written" in out
        return
    assert code == EXIT_USAGE
    assert "unknown key" not in err and "is not accepted" not in err, err
    for problem in problems(err):
        assert any(re.search(p, problem) for p in ENVIRONMENT), f"not an environment fact: {problem}"


def test_the_production_dry_run_reports_every_environment_fact_at_once(workdir, capsys, monkeypatch):
    monkeypatch.chdir(workdir)
    code, _, err = dry_run(capsys, CONFIGS / "config.vessl.yaml", CONFIGS / "recipe.critic_wmtp.yaml")
    found = problems(err)
    assert code == EXIT_USAGE and len(found) >= 4, found
    text = " ".join(found)
    for fact in ["mlflow.tracking_uri: 's3://wmtp/mlruns'", "devices.compute_backend: 'cuda'",
                 "paths.models.base: 'file:///app/models/llama-7b-mtp/' does not exist",
                 "paths.datasets.mbpp: 'file:///app/datasets/mbpp' does not exist"]:
        assert fact in text, fact


@pytest.mark.slow
@pytest.mark.parametrize("recipe", TEST_RECIPES, ids=lambda p: p.name)
def test_the_origin_local_test_configuration_runs_each_of_its_recipes(recipe, workdir, tmp_path, capsys,
                                                                      monkeypatch):
    """Paths rewritten only where this machine differs: ``compute_backend`` (no MPS here), and the
    MLflow file store's folder (kept under the test's own directory; MLflow 3 needs
    ``MLFLOW_ALLOW_FILE_STORE`` for a file store, a fact of the environment, set here)."""
    config = yaml.safe_load((TESTS / "config.local_test.yaml").read_text())
    assert config["devices"]["compute_backend"] == "mps"
    config["devices"]["compute_backend"] = "cpu"
    store = f"file://{tmp_path}/mlflow_m3"
    config["mlflow"].update(tracking_uri=store, registry_uri=store)
    (tmp_path / "config.local_test.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    name = yaml.safe_load(recipe.read_text())["run"]["name"]
    code = main(["--config", str(tmp_path / "config.local_test.yaml"), "--recipe", str(recipe)])
    out, err = capsys.readouterr()
    assert code == EXIT_OK, err[-3000:]
    assert f"run {name!r}: finished at step 30" in out
    run_dir = workdir / "test_checkpoints" / name
    assert sorted(p.name for p in run_dir.iterdir()) == ["step_30"], "keep_last: 1, save_final: false"

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name(config["mlflow"]["experiment"])
    runs = client.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name = '{name}'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert len(client.get_metric_history(runs[0].info.run_id, "loss")) == 30


def test_a_base_model_on_s3_is_read_with_the_sinks_credentials_and_a_missing_one_is_named(
        s3_server, bucket, tmp_path, capsys, monkeypatch):
    import fsspec

    folder = causal_lm(tmp_path / "model")
    fs = fsspec.filesystem("s3")
    fs.put(str(folder) + "/", f"{bucket}/models/tiny/", recursive=True)
    monkeypatch.chdir(tmp_path)
    recipe = {"run": {"name": "s3"}, "train": {"max_steps": 2},
              "data": {"train": {"sources": ["mbpp"], "max_length": 64, "batch_size": 2, "pack_sequences": False}}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    for base, expect in ((f"s3://{bucket}/models/missing", EXIT_USAGE), (f"s3://{bucket}/models/tiny", EXIT_OK)):
        config = {"paths": {"models": {"base": base},
                            "datasets": {"mbpp": str(ORIGIN / "tests" / "test_dataset" / "mbpp")},
                            "checkpoints": {"base_path": f"s3://{bucket}/ck", "save_interval": 0}},
                  "mlflow": None}
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
        code = main(["--config", "c.yaml", "--recipe", "r.yaml"])
        out, err = capsys.readouterr()
        assert code == expect, err[-3000:]
        if expect == EXIT_USAGE:
            assert f"paths.models.base: 's3://{bucket}/models/missing' does not exist" in " ".join(err.split())
    assert "run 's3': finished at step 2" in out
