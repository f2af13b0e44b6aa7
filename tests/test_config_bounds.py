"""Hostile configurations, second round (issue 18, item 9): absurd integers, data nested past
what Python parses, YAML tags and control characters, base paths that cannot hold a directory.
Each is one line naming the file, the key or line, the value and what is accepted, with exit
status 2, from the dry run and from the run alike, and the run writes nothing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from builders import TINY_RECIPE, merge, tiny_config, write

from wmtp_core.run import EXIT_USAGE

BIG = int("9" * 4000)
"""A 4000-digit integer: Python prints it, a float cannot hold it."""


def run(capsys, tmp: Path, *args: str) -> tuple[int, str]:
    from wmtp_core.run import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err, err
    return code, err


def both(capsys, tmp: Path, config: dict, recipe: dict, text: str | None = None) -> list[tuple[int, str]]:
    """The dry run, then the run, of ``config`` and ``recipe`` (``text``: the recipe's YAML as
    written); each ``(exit status, stderr)``."""
    c = write(tmp / "c.yaml", config)
    r = tmp / "r.yaml"
    if text is None:
        write(r, recipe)
    else:
        r.write_text(text)
    return [run(capsys, tmp, "--config", c, "--recipe", r, *dry) for dry in (["--dry-run"], [])]


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ----------------------------------------------------------------------------- absurd integers
BOUNDS = [  # (section, key, what the recipe or config says, accepted)
    ("recipe", "train.max_steps", BIG, "an integer from 1 to 1,000,000,000,000, or null for no limit"),
    ("recipe", "train.num_epochs", BIG, "an integer from 1 to 1,000,000"),
    ("recipe", "train.grad_accum_steps", 10**6 + 1, "an integer from 1 to 1,000,000"),
    ("recipe", "data.train.batch_size", 2**20 + 1, "an integer from 1 to 1,048,576"),
    ("recipe", "data.train.max_length", BIG, "an integer from 2 to 1,048,576"),
    ("recipe", "pretrain.max_steps", 10**12 + 1, "an integer from 0 to 1,000,000,000,000"),
    ("config", "paths.checkpoints.save_interval", BIG, "an integer from 0 to 1,000,000,000,000"),
    ("config", "paths.checkpoints.keep_last", 10**13, "an integer from 1 to 1,000,000,000,000"),
    ("config", "paths.checkpoints.keep_every", BIG, "an integer from 0 to 1,000,000,000,000"),
    ("config", "log_interval", BIG, "an integer from 1 to 1,000,000,000,000"),
    ("config", "devices.distributed.timeout", 10**30, "an integer from 1 to 31,536,000"),
]


def nested(key: str, value) -> dict:
    out: dict = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


@pytest.mark.parametrize("section, key, value, accepted", BOUNDS, ids=[b[1] for b in BOUNDS])
def test_an_absurd_integer_is_refused_naming_the_key_the_value_and_the_range(tmp_path, capsys, section, key,
                                                                             value, accepted):
    """A 4000-digit ``num_epochs`` made the dry run's storage estimate overflow a float (an
    ``OverflowError`` traceback in report.human); a 4000-digit ``max_steps`` or ``save_interval``
    was accepted as it is. Every count now has a documented bound."""
    over = nested(key, value)
    config = tiny_config(tmp_path, **(over if section == "config" else {}))
    recipe = merge(TINY_RECIPE, over if section == "recipe" else {})
    if key == "train.num_epochs":
        recipe["train"]["max_steps"] = None  # the epochs decide the steps
    shown = f"{str(value)[:12]}...{str(value)[-4:]} ({len(str(value)):,} digits)" if value == BIG else str(value)
    for code, err in both(capsys, tmp_path, config, recipe):
        line = one_line(err)
        assert code == EXIT_USAGE
        assert f"{section[0]}.yaml: {key}: {shown} is not accepted; accepted: {accepted}" in line, line
        assert len(line) < 300, "the value is shortened, never printed in full"
    assert not (tmp_path / "ck").exists()


def test_the_largest_accepted_counts_still_make_a_dry_run(tmp_path, capsys):
    """The bounds refuse the absurd, not the large: every count at its bound passes the dry run
    (the storage estimate included)."""
    config = tiny_config(tmp_path, log_interval=10**12, paths={"checkpoints": {
        "save_interval": 10**12, "keep_last": 10**12, "keep_every": 10**12}})
    recipe = merge(TINY_RECIPE, {"train": {"max_steps": None, "num_epochs": 10**6}})
    c, r = write(tmp_path / "c.yaml", config), write(tmp_path / "r.yaml", recipe)
    code, err = run(capsys, tmp_path, "--config", c, "--recipe", r, "--dry-run")
    assert code == 0, err


# ----------------------------------------------------------------------------- data nested too deeply
@pytest.mark.parametrize("name, text, line", [
    ("deep.jsonl", '{"text": "fine"}\n\n' + "[" * 200_000 + "]" * 200_000 + "\n", 3),
    ("deep.json", '[{"text": "fine"},\n {"text": "x", "meta":\n' + "[" * 200_000 + "]" * 200_000 + "}]", 3),
])
def test_a_dataset_nested_deeper_than_python_parses_is_one_line_naming_the_file_and_line(tmp_path, capsys, name,
                                                                                        text, line):
    """Before: ``RecursionError: maximum recursion depth exceeded while decoding a JSON array``
    (a traceback, exit 1), in the dry run too."""
    data = tmp_path / name
    data.write_text(text)
    config = tiny_config(tmp_path, paths={"datasets": {"deep": str(data)}})
    recipe = merge(TINY_RECIPE, {"data": {"train": {"sources": ["deep"]}}})
    for code, err in both(capsys, tmp_path, config, recipe):
        assert code == EXIT_USAGE
        said = one_line(err)
        assert f"paths.datasets.deep: {data} line {line}: JSON nested 200,00" in said, said
        assert "levels deep cannot be read" in said and "accepted: records nested at most" in said
    assert not (tmp_path / "ck").exists()


# ----------------------------------------------------------------------------- YAML that is not plain data
@pytest.mark.parametrize("added, column, message", [
    ("evil: !!python/object/apply:os.system ['echo owned > pwned']\n", 7,
     "the tag '!!python/object/apply:os.system' is not accepted; accepted: plain YAML"),
    ("  tags: [a\x07b]\n", 11, "the character '\\x07' (U+0007) is not accepted; accepted: printable UTF-8 text"),
    ("  tags: [a\x00b]\n", 11, "the character '\\x00' (U+0000) is not accepted"),
], ids=["python tag", "BEL", "NUL"])
def test_yaml_tags_and_control_characters_are_one_line_with_the_line_and_column(tmp_path, capsys, added, column,
                                                                               message):
    """Before: the tag gave four lines (PyYAML's problem, then the excerpt and a caret); BEL and
    NUL gave two, the second naming ``"<unicode string>", position 15`` instead of the file."""
    lines = Path(write(tmp_path / "base.yaml", TINY_RECIPE)).read_text().splitlines(keepends=True)
    at = lines.index("run:\n") + 1 if added.startswith("  ") else len(lines)
    lines.insert(at, added)
    for code, err in both(capsys, tmp_path, tiny_config(tmp_path), {}, text="".join(lines)):
        assert code == EXIT_USAGE
        said = one_line(err)
        assert said.startswith(f"error: {tmp_path / 'r.yaml'}: line {at + 1}, column {column}: {message}"), said
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "ck").exists()


# ----------------------------------------------------------------------------- base paths
def _fifo(tmp: Path) -> str:
    os.mkfifo(tmp / "fifo")
    return f"file://{tmp}/fifo"


def _file_parent(tmp: Path) -> str:
    (tmp / "plain").write_text("x")
    return f"file://{tmp}/plain/ck"


BAD_BASES = {
    "s3 without a bucket": (lambda tmp: "s3://", "'s3://' names no bucket; accepted: s3://BUCKET or "
                                                 "s3://BUCKET/PREFIX"),
    "/dev/null": (lambda tmp: "file:///dev/null", "'file:///dev/null' lies under /dev, a filesystem of the kernel; "
                                                  "accepted: a directory on a regular filesystem"),
    "/proc/self": (lambda tmp: "file:///proc/self", "'file:///proc/self' lies under /proc, a filesystem of the "
                                                    "kernel (it resolves to /proc/"),
    "a FIFO": (_fifo, "is a FIFO (named pipe), not a directory; accepted: a directory on a regular filesystem"),
    "below a file": (_file_parent, "cannot be created: "),
}


@pytest.mark.parametrize("case", list(BAD_BASES))
def test_a_base_path_that_cannot_hold_a_directory_is_refused_by_the_dry_run_and_before_the_run(tmp_path, capsys,
                                                                                             case):
    """Before: ``s3://``, ``file:///dev/null`` and ``file:///proc/self`` passed the dry run
    ("run 'tiny' is valid"); the run then failed."""
    make, message = BAD_BASES[case]
    base = make(tmp_path)
    config = tiny_config(tmp_path, paths={"checkpoints": {"base_path": base}})
    for code, err in both(capsys, tmp_path, config, TINY_RECIPE):
        assert code == EXIT_USAGE
        said = one_line(err)
        assert "c.yaml: paths.checkpoints.base_path: the resume base path " in said and message in said, said
    assert {p.name for p in tmp_path.iterdir()} <= {"c.yaml", "r.yaml", "mlflow.db", "fifo", "plain"}
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    assert client.get_experiment_by_name("tests") is None, "refused before the MLflow run began"


@pytest.mark.parametrize("base", ["file://{tmp}/new/deeper/ck", "{tmp}/plain-path", "file://./relative/ck",
                                  "relative-too", "local://{tmp}/local", "s3://bucket/prefix",
                                  "s3://legacy_Bucket.Name", "file:///dev/shm/wmtp-{name}"])
def test_base_paths_that_can_hold_a_directory_pass_the_dry_run_and_nothing_is_created(tmp_path, capsys,
                                                                                      monkeypatch, base):
    monkeypatch.chdir(tmp_path)
    base = base.format(tmp=tmp_path, name=tmp_path.name)
    if "/dev/shm" in base and not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm here")
    config = tiny_config(tmp_path, mlflow=None, paths={"checkpoints": {"base_path": base}})
    c, r = write(tmp_path / "c.yaml", config), write(tmp_path / "r.yaml", TINY_RECIPE)
    code, err = run(capsys, tmp_path, "--config", c, "--recipe", r, "--dry-run")
    assert code == 0, err
    written = {p.name for p in tmp_path.iterdir()} - {"mlflow.db"}  # made by conftest for every test
    assert written == {"c.yaml", "r.yaml"}, "the dry run wrote nothing"
    assert not Path(f"/dev/shm/wmtp-{tmp_path.name}").exists()


def test_a_file_like_final_sink_checks_its_base_path_too(tmp_path, capsys):
    config = tiny_config(tmp_path, mlflow=None, storage={"final": {"sink": "local", "base_path": "file:///proc/1"}})
    code, err = both(capsys, tmp_path, config, TINY_RECIPE)[0]
    assert code == EXIT_USAGE
    said = one_line(err)
    assert "storage.final.sink: the final base path 'file:///proc/1' lies under /proc" in said, said
