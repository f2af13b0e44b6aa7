"""Bad configuration ends in a clear error before anything is written."""

from __future__ import annotations

import pytest
from conftest import tree

from wmtp_core.config import ConfigError, load_settings
from wmtp_core.config.loader import flatten, parse_yaml
from wmtp_core.run import EXIT_USAGE, main

RECIPE = "train: {max_steps: 2}\nmodel: {d_model: 16, n_layers: 1, n_heads: 2, n_future: 2}\n"


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    return tmp_path


def run_with(workdir, config_text, capsys, *extra):
    (workdir / "config.yaml").write_text(config_text)
    before = tree(workdir)
    code = main(["--config", "config.yaml", "--recipe", "recipe.yaml", *extra])
    err = capsys.readouterr().err
    assert tree(workdir) == before, "a rejected configuration wrote something"
    assert "Traceback" not in err
    return code, " ".join(err.split())


CASES = {
    "duplicate key": (
        "paths:\n  checkpoints: {keep_last: 2}\nseed: 1\nseed: 2\n",
        ["config.yaml: line 4: key 'seed' appears twice", "first on line 3"],
    ),
    "role named twice": (
        "storage:\n  resume: {sink: local}\n  resume: {sink: mlflow_registry}\n",
        ["key 'resume' appears twice", "line 3"],
    ),
    "unknown key": (
        "paths:\n  checkpoint: {keep_last: 2}\n",
        ["config.yaml: paths.checkpoint: unknown key; did you mean 'checkpoints'?"],
    ),
    "bad value": (
        "paths:\n  checkpoints: {keep_last: 0}\n",
        ["config.yaml: paths.checkpoints.keep_last: 0 is not accepted; accepted: an integer from 1 to 1,000,000,000,000"],
    ),
    "wrong type": (
        "paths:\n  checkpoints: {save_final: 'yes'}\n",
        ["paths.checkpoints.save_final: 'yes' is not accepted; expected true or false"],
    ),
    "unknown sink": (
        "storage:\n  resume: {sink: tape}\n",
        ["storage.resume.sink: sink 'tape' for role 'resume' is not installed",
         "installed sinks: local (final, resume); mlflow_registry (final); s3 (final, resume)"],
    ),
    "sink bound to a role it does not declare": (
        "storage:\n  resume: {sink: mlflow_registry}\n",
        ["sink 'mlflow_registry' does not serve role 'resume' (it declares final)",
         "sinks that serve 'resume': local"],
    ),
    "two policies for one role": (
        "storage:\n  policies:\n    - {policy: keep_last, role: resume, options: {keep_last: 2}}\n"
        "    - {policy: keep_last, role: resume, options: {keep_last: 9}}\n",
        ["storage.policies[1]: two policies for role 'resume'"],
    ),
    "unknown policy": (
        "storage:\n  policies:\n    - {policy: keep_best, role: resume}\n",
        ["policy 'keep_best' is not installed; installed policies: keep_last"],
    ),
    "protocol no sink serves": (
        "paths:\n  checkpoints: {base_path: 'memory://bucket/x'}\n",
        ["uses protocol 'memory', which no installed sink serves"],
    ),
    "final without mlflow or sink": (
        "mlflow: null\nstorage:\n  final: {sink: nowhere}\n",
        ["sink 'nowhere' for role 'final' is not installed"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dry_run", [False, True])
def test_bad_configuration_is_a_clear_error_before_anything_is_written(workdir, capsys, case, dry_run):
    text, messages = CASES[case]
    code, err = run_with(workdir, text, capsys, *(["--dry-run"] if dry_run else []))
    assert code == EXIT_USAGE
    for m in messages:
        assert m in err, f"{m!r} not in {err!r}"


def test_run_name_cannot_climb_out_of_the_base_path(workdir, capsys):
    code, err = run_with(workdir, "mlflow: null\n", capsys, "--run-name", "../escape")
    assert code == EXIT_USAGE
    assert "run name '../escape' is not allowed" in err


def test_mlflow_null_binds_final_to_local(workdir, capsys):
    (workdir / "config.yaml").write_text("mlflow: null\n")
    assert main(["--config", "config.yaml", "--recipe", "recipe.yaml", "--dry-run"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "final -> sink local" in out


def test_duplicate_keys_are_found_at_any_depth():
    with pytest.raises(ConfigError, match="key 'keep_last' appears twice"):
        parse_yaml("paths:\n  checkpoints:\n    keep_last: 1\n    keep_last: 3\n", "c.yaml")


def test_secrets_are_redacted_in_flattened_params():
    flat = flatten({"storage": {"resume": {"options": {"key": "AKIA123", "secret": "s3cr3t",
                                                       "endpoint_url": "http://u:pw@host"}}}})
    assert flat["storage.resume.options.key"] == "***"
    assert flat["storage.resume.options.secret"] == "***"
    assert flat["storage.resume.options.endpoint_url"] == "http://***@host"


def test_defaults_load_without_files():
    s = load_settings()
    assert s.config.paths.checkpoints.keep_last == 2
    assert s.config.mlflow.tracking_uri == "sqlite:///mlflow.db"
    assert s.recipe.train.algo == "baseline-mtp"
