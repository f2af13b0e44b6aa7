"""Bad names, hostile configuration and untrusted checkpoints get one line and exit 2 (or a
fallback), never a traceback, never a hang; user text is never read as console markup."""

from __future__ import annotations

import io
import json
import re
import signal
import time
from pathlib import Path

import pytest
import torch
from builders import files, tiny_config, write
from conftest import tree

from wmtp_core.commit import check_run_name
from wmtp_core.config.loader import ConfigError, parse_yaml

BOMB = """\
seed: 1
launcher:
  a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
  b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
  c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
  d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
  e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
  f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
  g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
  h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
  i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
"""


def run(capsys, *args) -> tuple[int, str, str]:
    from wmtp_core.run import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err, err
    return code, out, err


def cli(capsys, *args) -> tuple[int, str, str]:
    from wmtp_core.cli import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err, err
    return code, out, err


# ----------------------------------------------------------------------------- configuration bombs
def test_an_alias_bomb_is_refused_at_load_before_anything_expands_it():
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="expands to more than 100000 values once its aliases"):
        parse_yaml(BOMB, name="bomb.yaml")
    assert time.perf_counter() - t0 < 5  # refused while counting, not after expanding 10^9 values


def test_an_alias_bomb_is_refused_by_the_dry_run_and_by_the_run_which_never_hangs(tmp_path, capsys,
                                                                                   monkeypatch):
    (tmp_path / "bomb.yaml").write_text(BOMB)
    code, _, err = run(capsys, "--config", tmp_path / "bomb.yaml", "--dry-run")
    assert code == 2 and re.search(r"bomb.yaml: line \d+: expands to more than 100000 values", err)

    def hung(signum, frame):
        raise TimeoutError("the run did not refuse the alias bomb within 60 s")

    monkeypatch.chdir(tmp_path)
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)  # a hang fails this test instead of hanging the suite
    try:
        code, _, err = run(capsys, "--config", "bomb.yaml")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert code == 2 and "expands to more than" in err and "Traceback" not in err


@pytest.mark.parametrize("text, message", [
    ("a: " + "[" * 3000 + "]" * 3000, "nested too deeply"),
    ("a: " + "[" * 70 + "]" * 70, "nested deeper than 64 levels"),
    ("a: &x [1, *x]\n", "refers to a mapping or list that contains it"),
    ("seed: " + "9" * 5000, "cannot be read as int"),
])
def test_hostile_yaml_shapes_are_clear_errors(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_yaml(text, name="x.yaml")


def test_a_huge_config_file_is_refused_without_reading_it_all(tmp_path, capsys):
    (tmp_path / "huge.yaml").write_text("# padding\n" * 200_000)
    code, _, err = run(capsys, "--config", tmp_path / "huge.yaml", "--dry-run")
    assert code == 2 and "larger than 1048576 bytes" in err


# ----------------------------------------------------------------------------- names
@pytest.mark.parametrize("name", ["abc\n", "abc\n\n", "\nabc", "a\tb", "a/../b", "a b"])
def test_a_run_name_must_match_in_full(name):
    with pytest.raises(ConfigError, match="not allowed"):
        check_run_name(name)


def test_a_run_name_with_a_newline_creates_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = tree(tmp_path)
    code, _, err = run(capsys, *files(tmp_path, tiny_config(tmp_path, mlflow=None)), "--run-name", "abc\n")
    assert code == 2 and "run name 'abc\\n' is not allowed" in err
    assert tree(tmp_path) == before | {"config.yaml", "recipe.yaml"}


@pytest.mark.parametrize("where", ["recipe", "cli"])
def test_an_empty_run_name_is_an_error_not_the_default(tmp_path, capsys, where):
    args = files(tmp_path, tiny_config(tmp_path, mlflow=None), {"run": {"name": ""}} if where == "recipe" else {})
    if where == "cli":
        args += ["--run-name", ""]
    code, _, err = run(capsys, *args, "--dry-run")
    key = "run.name" if where == "recipe" else "--run-name"
    assert code == 2 and f"{key}: '' is not accepted" in err and "leave run.name null" in err


def test_the_dry_run_states_the_default_name(tmp_path, capsys):
    code, out, _ = run(capsys, *files(tmp_path, tiny_config(tmp_path, mlflow=None), {"run": {"name": None}}),
                       "--dry-run")
    assert code == 0 and "dry run: run 'baseline-mtp-" in out


# ----------------------------------------------------------------------------- markup
@pytest.mark.parametrize("text", ["[/b]", "[bold red]x", "[red]forty[/red]", "[italic]x[/]"])
def test_user_text_is_printed_as_it_is_never_as_markup(tmp_path, capsys, text):
    code, _, err = run(capsys, "--run-name", f"x{text}", "--dry-run")
    assert code == 2 and f"x{text}" in err

    config = write(tmp_path / "c.yaml", {"seed": text})
    code, _, err = run(capsys, "--config", config, "--dry-run")
    assert code == 2 and repr(text) in err, err

    code, _, err = cli(capsys, "checkpoints", "ls", f"{tmp_path}/no{text}where")
    assert code == 2 and f"no{text}where does not exist" in err


# ----------------------------------------------------------------------------- untrusted checkpoints
class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished tiny run: step_2, step_4 committed and a final model in <run>/final."""
    from wmtp_core.run import main

    tmp = tmp_path_factory.mktemp("trained")
    config = tiny_config(tmp, mlflow=None, paths={"checkpoints": {"keep_last": 5}})
    assert main(files(tmp, config)) == 0
    return tmp


def replace_part(step_dir: Path, name: str, data: bytes) -> None:
    """What an attacker with write access does: swap a file and rewrite the manifest to match."""
    from wmtp_core.hashing import digest_bytes

    (step_dir / name).write_bytes(data)
    manifest = json.loads((step_dir / "manifest.json").read_text())
    for f in manifest["files"]:
        if f["path"] == name:
            f["size"], f["digest"] = len(data), digest_bytes(data, manifest["hash"])
    (step_dir / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.slow
def test_a_part_refused_by_weights_only_loading_is_one_line_or_a_fallback(trained, tmp_path, capsys):
    import shutil

    work = tmp_path / "w"
    shutil.copytree(trained, work)
    ck = work / "ck" / "tiny"
    marker = tmp_path / "marker"
    buf = io.BytesIO()
    torch.save({"step": 4, "payload": Exploit(str(marker))}, buf)
    replace_part(ck / "step_4", "trainer.pt", buf.getvalue())
    args = files(work, tiny_config(work, mlflow=None, paths={"checkpoints": {"keep_last": 5}}))

    code, _, err = run(capsys, *args, "--resume", ck / "step_4")
    line = " ".join(err.split())
    assert code == 2 and not marker.exists()
    assert "step_4/trainer.pt was refused by weights-only loading" in line and "it names exec" in line
    quarantined, error = err.strip().splitlines()  # moved aside (it cannot be used), then the error
    assert quarantined.startswith(f"quarantined {ck}/step_4 as ") and "it cannot be used" in quarantined
    assert error.startswith("error: ") and not (ck / "step_4").exists()

    # --resume latest resumes from step_2 and finishes the run, here at step 3
    args = files(work, tiny_config(work, mlflow=None, paths={"checkpoints": {"keep_last": 5}}),
                 {"train": {"max_steps": 3}}, name="-short")
    code, _, err = run(capsys, *args, "--resume", "latest")
    line = " ".join(err.split())
    assert code == 0 and not marker.exists(), err
    assert f"resuming 'tiny' from {ck}/step_2 (step 2)" in line
    assert (ck / "step_3" / "manifest.json").exists()


@pytest.mark.slow
def test_resuming_from_a_final_model_is_one_line(trained, tmp_path, capsys):
    import shutil

    work = tmp_path / "w"
    shutil.copytree(trained, work)
    final = work / "ck" / "tiny" / "final"
    assert (final / "manifest.json").exists()
    args = files(work, tiny_config(work, mlflow=None))
    code, _, err = run(capsys, *args, "--resume", final)
    assert code == 2
    assert "is the final model of run 'tiny'" in err and "resume from one of the run's step_N" in err


@pytest.mark.slow
def test_resume_state_of_another_shape_is_one_line(trained, tmp_path, capsys):
    """A trainer.pt that loads (plain values) but is not WMTP's resume state."""
    import shutil

    work = tmp_path / "w"
    shutil.copytree(trained, work)
    ck = work / "ck" / "tiny"
    buf = io.BytesIO()
    torch.save({"step": 4}, buf)
    replace_part(ck / "step_4", "trainer.pt", buf.getvalue())
    args = files(work, tiny_config(work, mlflow=None))
    code, _, err = run(capsys, *args, "--resume", ck / "step_4")
    line = " ".join(err.split())
    assert code == 2 and "step_4/trainer.pt: the trainer state has no 'losses'; it is not state WMTP wrote" in line
    assert "it cannot be used" in line and not (ck / "step_4").exists()  # quarantined
