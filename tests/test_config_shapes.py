"""The configuration shapes users write: the examples, the origin trainer's keys, and any broken
variant of them, which must be a clear error naming the file and the key, never a traceback."""

from __future__ import annotations

import contextlib
import copy
import io
import re
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ROOT, tree
from hf_models import causal_lm
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from wmtp_core.config import ConfigError, load_settings
from wmtp_core.plugins import build_catalog, make_plugin_manager
from wmtp_core.run import EXIT_OK, EXIT_USAGE, main

EXAMPLES = ROOT / "examples" / "configs"
DATA = Path(__file__).parent / "data"
ORIGIN = (DATA / "origin_config.yaml", DATA / "origin_recipe.yaml")

PAIRS = {
    "local baseline": ("config.local.yaml", "recipe.baseline.yaml"),
    "local critic": ("config.local.yaml", "recipe.critic.yaml"),
    "rho1 weighted": ("config.rho1.yaml", "recipe.rho1-weighted.yaml"),
    "rho1 token_skip": ("config.rho1.yaml", "recipe.rho1-token-skip.yaml"),
    "no-mlflow baseline": ("config.no-mlflow.yaml", "recipe.baseline.yaml"),
    "no-mlflow critic": ("config.no-mlflow.yaml", "recipe.critic.yaml"),
    "s3 baseline": ("config.s3.yaml", "recipe.baseline.yaml"),
}
SHAPES = {**{k: (EXAMPLES / c, EXAMPLES / r) for k, (c, r) in PAIRS.items()}, "origin shape": ORIGIN}


def s3_sink_installed() -> bool:
    return build_catalog(make_plugin_manager()).sink_for_protocol("s3") is not None


def test_every_example_file_is_in_a_checked_pair_and_in_the_readme():
    files = {p.name for p in EXAMPLES.glob("*.yaml")}
    assert files == {name for pair in PAIRS.values() for name in pair}
    readme = (EXAMPLES / "README.md").read_text()
    for name in files:
        assert name in readme, f"{name} is not described in examples/configs/README.md"


@pytest.mark.parametrize("shape", list(SHAPES))
def test_example_and_origin_shapes_load(shape):
    config, recipe = SHAPES[shape]
    s = load_settings(str(config), str(recipe))
    assert s.config_source == str(config)
    if shape != "origin shape":
        m = s.recipe.model
        assert (m.d_model, m.n_layers, m.max_seq_len) == (64, 1, 64), "examples stay tiny"
        assert s.recipe.train.max_steps <= 50


@pytest.mark.parametrize("shape", list(SHAPES))
def test_dry_run_of_every_shape_exits_0_and_writes_nothing(shape, tmp_path, monkeypatch, capsys):
    config, recipe = SHAPES[shape]
    monkeypatch.chdir(tmp_path)
    if shape == "origin shape":  # its paths.models.base, a Hugging Face folder, exists
        causal_lm(tmp_path / "models" / "mtp-base")
    before = tree(tmp_path)
    code = main(["--config", str(config), "--recipe", str(recipe), "--dry-run"])
    out, err = capsys.readouterr()
    assert tree(tmp_path) == before
    assert "Traceback" not in err
    if shape == "s3 baseline" and not s3_sink_installed():
        # Until an S3 sink plugin is installed, s3:// has no sink: the dry run must say so.
        assert code == EXIT_USAGE
        assert "uses protocol 's3', which no installed sink serves" in " ".join(err.split())
        return
    assert code == EXIT_OK, err
    assert "nothing was written" in out


def test_the_origin_config_uses_every_key_the_origin_users_wrote():
    config, recipe = (yaml.safe_load(p.read_text()) for p in ORIGIN)
    for key in ["project", "seed", "log_interval", "launcher", "paths.models.base", "paths.models.rm",
                "paths.models.ref", "paths.datasets", "paths.checkpoints.base_path",
                "paths.checkpoints.save_interval", "paths.checkpoints.keep_last",
                "paths.checkpoints.save_final", "mlflow.experiment", "mlflow.tracking_uri",
                "mlflow.registry_uri", "devices.compute_backend", "devices.mixed_precision",
                "devices.num_proc", "devices.distributed", "devices.fsdp"]:
        assert _get(config, key) is not None, key
    es = "enabled patience min_delta monitor mode".split()
    for key in ["run.name", "run.tags", "pretrain", "train.algo", "train.full_finetune",
                "train.num_epochs", "train.max_steps",
                *(f"train.early_stopping.{k}" for k in es),
                *(f"optim.{k}" for k in "optimizer lr weight_decay betas grad_clip scheduler warmup_ratio".split()),
                *(f"data.{s}.{k}" for s in ("train", "eval") for k in "sources max_length batch_size pack_sequences".split()),
                *(f"loss.{k}" for k in "weight_norm lambda weight_temperature epsilon max_weight".split()),
                *(f"critic.{k}" for k in ("target token_spread delta_mode normalize discount_lambda gamma "
                                          "gae_lambda auxiliary_loss_coef value_lr use_pseudo_rewards").split()),
                *(f"rho1.{k}" for k in "selection_mode skip_threshold_percentile min_ce_diff".split())]:
        assert _get(recipe, key) is not None, key


def _get(data: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data


def test_verbose_reports_keys_accepted_only_for_compatibility(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    causal_lm(tmp_path / "models" / "mtp-base")
    args = ["--config", str(ORIGIN[0]), "--recipe", str(ORIGIN[1]), "--dry-run"]
    assert main(args) == EXIT_OK
    assert "unused" not in capsys.readouterr().err
    assert main([*args, "--verbose"]) == EXIT_OK
    err = " ".join(capsys.readouterr().err.split())
    for key in ["origin_config.yaml: launcher", "origin_config.yaml: devices.num_proc",
                "origin_recipe.yaml: train.full_finetune", "origin_recipe.yaml: critic.target",
                "origin_recipe.yaml: critic.delta_mode",
                # with paths.models.base the architecture comes from the model's own config
                "origin_recipe.yaml: model.d_model", "origin_recipe.yaml: model.n_layers",
                "origin_recipe.yaml: model.n_heads", "origin_recipe.yaml: model.max_seq_len"]:
        assert f"unused: {DATA / key} is accepted for compatibility but has no effect here" in err, key
    assert err.count("unused:") == 9, "only keys marked unused in the schema are reported"


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    """PyYAML alone reads ``1e-3`` as a string; recipes are written that way."""
    (tmp_path / "r.yaml").write_text("optim: {lr: 3e-4, weight_decay: 1E-2}\nloss: {epsilon: 1e-8}\n")
    r = load_settings(None, str(tmp_path / "r.yaml")).recipe
    assert (r.optim.lr, r.optim.weight_decay, r.loss.epsilon) == (3e-4, 1e-2, 1e-8)


# ----------------------------------------------------------------------------- fuzzing
# Origin-shape bases; the second adds an explicit storage section so its classes are fuzzed too.
ORIGIN_CONFIG, ORIGIN_RECIPE = (yaml.safe_load(p.read_text()) for p in ORIGIN)
WITH_STORAGE = {**ORIGIN_CONFIG, "storage": {
    "resume": {"sink": "local", "base_path": "file://./ckpt", "options": {"auto_mkdir": True}},
    "final": {"sink": "local", "base_path": "file://./models"},
    "policies": [{"policy": "keep_last", "role": "resume", "options": {"keep_last": 2}}],
}}
BASES = [("config", ORIGIN_CONFIG), ("config", WITH_STORAGE), ("recipe", ORIGIN_RECIPE)]
BAD_VALUES = [-3, 0, "x", "", [], {}, None, 1e9, True, 2.5, [1, "x"], {"k": 1}, 10**12, 2**64, "../x"]
LETTERS = "abcdefghijklmnopqrstuvwxyz_"

Path_ = tuple  # a path into the YAML data: str keys and int list indices


def nodes(data: Any, path: Path_ = ()) -> list[Path_]:
    """Every path below ``data`` (mapping values and list items), depth first."""
    out = []
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for k, v in items:
        out.append(path + (k,))
        out.extend(nodes(v, path + (k,)))
    return out


def at(data: Any, path: Path_) -> Any:
    for k in path:
        data = data[k]
    return data


def dotted(path: Path_) -> str:
    s = ""
    for k in path:
        s += f"[{k}]" if isinstance(k, int) else (f".{k}" if s else k)
    return s


def typos(key: str) -> list[str]:
    """One-character edits: deletion, transposition, substitution, insertion."""
    out = {key[:i] + key[i + 1:] for i in range(len(key))}
    out |= {key[:i] + key[i + 1] + key[i] + key[i + 2:] for i in range(len(key) - 1)}
    out |= {key[:i] + c + key[i + 1:] for i in range(len(key)) for c in LETTERS}
    out |= {key[:i] + c + key[i:] for i in range(len(key) + 1) for c in LETTERS}
    return sorted(k for k in out if k and k != key)


@st.composite
def mutations(draw):
    """(file kind, mutated data, description, dotted key path the error must name)."""
    kind, base = draw(st.sampled_from(BASES))
    data = copy.deepcopy(base)
    op = draw(st.sampled_from(["replace", "add", "typo"]))
    if op == "replace":
        path = draw(st.sampled_from(nodes(data)))
        value = draw(st.sampled_from(BAD_VALUES))
        at(data, path[:-1])[path[-1]] = copy.deepcopy(value)
        while path and isinstance(path[-1], int):  # a list is judged whole or item by item
            path = path[:-1]
        return kind, data, f"{dotted(path)} := {value!r}", dotted(path)
    maps = [()] + [p for p in nodes(data) if isinstance(at(data, p), dict)]
    if op == "add":
        parent = draw(st.sampled_from(maps))
        mapping = at(data, parent)
        key = draw(st.text(LETTERS, min_size=1, max_size=12).filter(lambda k: k not in mapping))
        mapping[key] = draw(st.sampled_from(BAD_VALUES + [1, "on"]))
        return kind, data, f"add {dotted(parent + (key,))}", dotted(parent + (key,))
    parent = draw(st.sampled_from([p for p in maps if at(data, p)]))
    mapping = at(data, parent)
    old = draw(st.sampled_from(sorted(mapping)))
    new = draw(st.sampled_from([t for t in typos(old) if t not in mapping]))
    mapping[new] = mapping.pop(old)
    return kind, data, f"rename {dotted(parent + (old,))} -> {new}", dotted(parent + (new,))


def write_pair(folder: Path, kind: str, data: dict) -> tuple[Path, Path]:
    config, recipe = folder / "config.yaml", folder / "recipe.yaml"
    config.write_text(yaml.safe_dump(data if kind == "config" else ORIGIN_CONFIG, sort_keys=False))
    recipe.write_text(yaml.safe_dump(data if kind == "recipe" else ORIGIN_RECIPE, sort_keys=False))
    return config, recipe


def load_mutated(folder: Path, mutation) -> ConfigError | None:
    """Load the mutated pair: None if it is valid, the ConfigError otherwise (anything else raises)."""
    kind, data, _, _ = mutation
    config, recipe = write_pair(folder, kind, data)
    try:
        load_settings(str(config), str(recipe))
    except ConfigError as e:
        return e
    return None


@settings(max_examples=150, deadline=None)
@given(mutations())
@example(("recipe", {**ORIGIN_RECIPE, "optim": {**ORIGIN_RECIPE["optim"], "betas": [0.9, 1e9]}},
          "optim.betas[1] := 1e9", "optim.betas"))
def test_any_broken_config_is_a_clear_error_never_a_traceback(mutation):
    """Invariant: one mutation of a valid origin-shape file (a wrong-typed or out-of-range value,
    an unknown key, a one-character typo in a key) either still loads or raises ConfigError
    naming the file and the dotted path of the mutated key; no other exception escapes."""
    kind, _, description, key = mutation
    with tempfile.TemporaryDirectory() as d:
        error = load_mutated(Path(d), mutation)
        if error is not None:
            message = str(error)
            assert f"{Path(d) / f'{kind}.yaml'}: " in message, (description, message)
            assert key in message, (description, message)
            assert "Traceback" not in message


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(mutations())
def test_a_broken_config_stops_the_cli_with_exit_2_before_anything_is_written(mutation):
    """Invariant: the full command (not a dry run) on an invalid configuration exits 2 with an
    error message, no traceback, and no checkpoint folder or any other file created."""
    kind, data, description, _ = mutation
    with tempfile.TemporaryDirectory() as d, contextlib.chdir(d):
        folder = Path(d)
        assume(load_mutated(folder, mutation) is not None)  # valid mutations would train
        config, recipe = write_pair(folder, kind, data)
        before = tree(folder)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["--config", str(config), "--recipe", str(recipe)])
        err_text = err.getvalue()
        assert code == EXIT_USAGE, (description, err_text)
        assert "error:" in err_text and "Traceback" not in err_text, (description, err_text)
        assert tree(folder) == before, description
        assert not (folder / "checkpoints").exists()


@settings(max_examples=25, deadline=None)
@given(mutations())
def test_a_dry_run_of_any_mutated_config_exits_0_or_2_and_writes_nothing(mutation):
    """Invariant: whatever one mutation did, ``--dry-run`` validates without a traceback (exit 0,
    or 2 with an error) and writes nothing, even where the file loads but cannot be bound."""
    kind, data, description, _ = mutation
    with tempfile.TemporaryDirectory() as d, contextlib.chdir(d):
        folder = Path(d)
        config, recipe = write_pair(folder, kind, data)
        before = tree(folder)
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            code = main(["--config", str(config), "--recipe", str(recipe), "--dry-run"])
        assert code in (EXIT_OK, EXIT_USAGE), (description, err.getvalue())
        assert (code == EXIT_USAGE) == ("error:" in err.getvalue()), (description, err.getvalue())
        assert tree(folder) == before, description


# Pieces of YAML that trip PyYAML: bad dates, bad explicit tags, complex keys, control characters,
# merges, aliases, unbalanced brackets, tabs.
FRAGMENTS = ["seed: ", "paths:\n  ", "checkpoints: ", "1", "1e-3", "2024-13-01", "2024-02-30 25:00:00",
             "!!int x", "!!float y", "!!bool maybe", "!!binary *", "!!set {a}", "!!python/name:os.system",
             "? [a, b]\n: 1", "? {a: 1}\n: 1", "\x00", "\x85", "\ufeff", "<<: {seed: 1}", "<<: *a",
             "&a {b: 1}", "*a", "{", "}", "[", "]", "\t", "'", '"', "\n", "  ", ": ", "- ", "#", "%YAML 1.2\n---",
             "---", "...", "null", "~", "yes", "0x1G", "0o9", "1_000", ".inf", "-.nan"]


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.text(max_size=40), st.lists(st.sampled_from(FRAGMENTS), max_size=8).map("".join)))
def test_any_yaml_text_is_a_mapping_or_a_clear_error(text):
    """Invariant: any file content, however malformed, either loads or raises ConfigError naming
    the file; PyYAML's own exceptions (and Python's, from its constructors) never escape."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "config.yaml"
        path.write_text(text, encoding="utf-8")
        try:
            load_settings(str(path), None)
        except ConfigError as e:
            assert str(e).startswith(f"{path}: "), str(e)


def test_yaml_merge_keys_may_be_overridden_but_plain_duplicates_may_not(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("data:\n  train: &split {sources: [stdlib], max_length: 64, batch_size: 8}\n"
                    "  eval:\n    <<: *split\n    batch_size: 4\n")
    ev = load_settings(None, str(path)).recipe.data.eval
    assert (ev.max_length, ev.batch_size) == (64, 4)
    path.write_text("data:\n  eval:\n    batch_size: 8\n    batch_size: 4\n")
    with pytest.raises(ConfigError, match="line 4: key 'batch_size' appears twice"):
        load_settings(None, str(path))


@pytest.mark.parametrize("text, message", [
    ("run: {name: 2024-13-01}\n", "line 1: '2024-13-01' cannot be read as timestamp"),
    ("seed: !!int x\n", "line 1: 'x' cannot be read as int"),
    ("? [a, b]\n: 1\n", "line 1: a list cannot be a key"),
    ("seed: 1\x00\n", "line 1, column 8: the character '\\x00' (U+0000) is not accepted"),
    ("seed: 18446744073709551616\n", "seed: 18446744073709551616 is not accepted; accepted: an integer from 0 to"),
])
def test_yaml_that_pyyaml_chokes_on_is_a_config_error_with_the_line(tmp_path, text, message):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_settings(str(path), None)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value), str(e.value)


def test_a_config_that_is_not_a_text_file_is_a_config_error(tmp_path):
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00seed")
    for url, message in [(tmp_path, "is a directory; a config or recipe must be a regular file"),
                         (tmp_path / "bin.yaml", "not a UTF-8 text file"),
                         ("nosuchprotocol://x.yaml", "cannot be read (ValueError: Protocol not known")]:
        with pytest.raises(ConfigError, match=re.escape(f"{url}: {message}")):
            load_settings(str(url), None)


@pytest.mark.parametrize("model", ["{d_model: 1000000000, n_heads: 1}", "{n_layers: 1000000000000}",
                                   "{max_seq_len: 100000000000000000000}"])
def test_model_sizes_torch_cannot_build_are_rejected_before_the_dry_run(model, tmp_path, monkeypatch, capsys):
    """Without an upper bound the dry run's parameter count overflowed (a traceback) or hung."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipe.yaml").write_text(f"model: {model}\n")
    assert main(["--recipe", "recipe.yaml", "--dry-run"]) == EXIT_USAGE
    assert "is not accepted; accepted: an integer from 1 to" in capsys.readouterr().err
