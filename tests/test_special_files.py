"""Files WMTP did not write are read bounded and must be regular files: a FIFO or a link to
``/dev/zero`` as a manifest, a config, a recipe, a dataset file, a checkpoint's file or a model
folder's config.json is refused in one line, never a hang or a ``MemoryError``.

Every command runs in a process of its own (forked from the tests' zygote) with a timeout and a
memory limit, so a regression fails the test (TimeoutExpired, or a traceback) instead of hanging
the suite or filling the machine."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import zygote
from builders import files, resume_files, tiny_config

from wmtp_core import Role
from wmtp_core.commit import CheckpointStore

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 120
MEMORY = 6 << 30
"""Address space a command may take: a read of /dev/zero hits it in seconds."""
CLI = "import sys; from wmtp_core.cli import main; sys.exit(main())"
RUN = "import sys; from wmtp_core.run import main; sys.exit(main())"
KINDS = {"fifo": "a FIFO (named pipe)", "devzero": "a character device"}


def special(path: Path, kind: str) -> Path:
    """``path`` made a FIFO, or a link to /dev/zero."""
    if path.exists() or path.is_symlink():
        path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")
    return path


LIMIT = f"import resource; resource.setrlimit(resource.RLIMIT_AS, ({MEMORY}, {MEMORY}))\n"
"""Run first in each command: its address space capped (the zygote's imports included)."""


def python(code: str, *args: object, cwd: Path | None = None) -> tuple[int, str, str]:
    """``python -c code args`` forked from the zygote (a process of its own, its imports paid
    once), killed past ``TIMEOUT``."""
    proc = zygote.run(["-c", LIMIT + code, *map(str, args)], cwd=cwd or ROOT, timeout=TIMEOUT)
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-2000:]
    return proc.returncode, proc.stdout, " ".join(proc.stderr.split())


@pytest.fixture
def base(tmp_path):
    store = CheckpointStore.from_url(f"file://{tmp_path}/ck")
    for step in (4, 6):
        store.write("a", f"step_{step}", resume_files(step),
                    step=step, role=Role.RESUME, lineage="L1", meta={"algo": "baseline-mtp"})
    return tmp_path / "ck"


FIND_RESUME = """
import sys
from rich.console import Console
from wmtp_core import Role
from wmtp_core.events import RunInfo, SinkContext
from wmtp_core.filesink import FileSink
from wmtp_core.resume import find_resume
sink = FileSink(SinkContext(role=Role.RESUME, run=RunInfo(name="a", algo="baseline-mtp", lineage="L1"),
                            base_path=sys.argv[1]))
uri, manifest = find_resume(sink, "latest", Console(stderr=True, soft_wrap=True, width=400))
print("resumed", manifest.step, uri)
"""


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_special_manifest_is_an_unusable_checkpoint_everywhere(base, kind):
    manifest = special(base / "a" / "step_6" / "manifest.json", kind)
    reason = f"{manifest} is {KINDS[kind]}; a manifest must be a regular file"

    code, out, _ = python(CLI, "checkpoints", "ls", base / "a", "--json")
    rows = {r["name"]: r for r in json.loads(out)}
    assert code == 0 and rows["step_4"]["state"] == "committed"
    assert rows["step_6"]["state"] == "unverifiable" and reason in rows["step_6"]["problem"]

    code, out, _ = python(CLI, "checkpoints", "verify", base / "a")
    assert code == 1 and "1 of 2 checkpoints verified" in out
    assert f"FAILED {base}/a/step_6: {reason}" in " ".join(out.split())

    code, _, err = python(CLI, "register", base / "a" / "step_6")
    assert code == 2 and err == f"error: {reason}"

    code, out, err = python(FIND_RESUME, f"file://{base}")
    assert code == 0 and f"resumed 4 {base}/a/step_4" in " ".join(out.split())
    assert f"skipping {base}/a/step_6" in err and reason in err


def test_a_checkpoint_file_that_is_a_fifo_is_refused_not_read(base):
    special(base / "a" / "step_6" / "model.pt", "fifo")
    code, out, _ = python(CLI, "checkpoints", "verify", base / "a" / "step_6")
    assert code == 1
    assert (f"{base}/a/step_6/model.pt is a FIFO (named pipe); a checkpoint holds plain files only"
            in " ".join(out.split()))


@pytest.mark.parametrize("which", ["--config", "--recipe"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_a_special_config_or_recipe_is_refused_in_one_line(tmp_path, kind, which):
    args = files(tmp_path, tiny_config(tmp_path, mlflow=None))
    path = special(Path(args[args.index(which) + 1]), kind)
    code, _, err = python(RUN, *args, "--dry-run", cwd=tmp_path)
    assert code == 2
    assert err == f"error: {path}: is {KINDS[kind]}; a config or recipe must be a regular file"


@pytest.mark.parametrize("layout", ["file", "folder"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_a_special_dataset_file_is_refused_in_one_line(tmp_path, kind, layout):
    (tmp_path / "data").mkdir()
    path = special(tmp_path / "data" / "train.jsonl", kind)
    url = f"file://{path}" if layout == "file" else f"file://{tmp_path / 'data'}"
    config = tiny_config(tmp_path, mlflow=None, paths={"datasets": {"d": url}})
    recipe = {"data": {"train": {"sources": ["d"], "max_length": 32, "batch_size": 4}}}
    code, _, err = python(RUN, *files(tmp_path, config, recipe), "--dry-run", cwd=tmp_path)
    assert code == 2
    assert f"paths.datasets.d: {path} is {KINDS[kind]}; a data file must be a regular file" in err
    assert err.count("error:") == 1


INSPECT = """
import sys
from wmtp_core.engine.hf import inspect
from wmtp_core.errors import ModelLoadError
try:
    inspect(sys.argv[1], "paths.models.base")
except ModelLoadError as e:
    print("refused:", e)
"""


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_special_model_config_json_is_refused(tmp_path, kind):
    (tmp_path / "model").mkdir()
    special(tmp_path / "model" / "config.json", kind)
    url = f"file://{tmp_path / 'model'}"
    code, out, _ = python(INSPECT, url)
    assert code == 0
    assert (f"refused: paths.models.base: {url}/config.json is {KINDS[kind]}; a model's config.json "
            "must be a regular file") in out
