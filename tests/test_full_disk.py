"""Full disks (issue 13, item 4): a local save that runs out of space removes its staging, keeps
every committed checkpoint, and ends the run with one line naming the path, the bytes it needed
and the bytes free: exit status 2 for a synchronous save, 1 for a background one.

The disk is real: a small tmpfs this test mounts (as root; elsewhere the tests are skipped and
say why), filled with a file once the checkpoints before the failing save are committed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid

import pytest
import torch
from builders import recipe, write

from wmtp_core import hookimpl
from wmtp_core.commit import CheckpointStore
from wmtp_core.run import main
from wmtp_core.tensors import tensor_bytes

pytestmark = pytest.mark.slow

DISK = "16m"


@pytest.fixture
def disk(tmp_path):
    """A 16 MiB tmpfs at ``tmp_path/disk``, unmounted afterwards."""
    path = tmp_path / "disk"
    path.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("cannot mount a small filesystem here: no mount command")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK}", f"wmtp-{uuid.uuid4().hex[:8]}", str(path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here (mount -t tmpfs as uid {os.getuid()}: "
                    f"{(proc.stderr or proc.stdout).strip() or proc.returncode})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


class Filler:
    """Once step ``after`` is committed, fills the disk so that ``leave(needed)`` bytes stay
    free, ``needed`` being what the next save's tensors hold (the state's shapes stay the same
    from one save to the next)."""

    def __init__(self, disk, after: int, leave) -> None:
        self.disk, self.after, self.leave = disk, after, leave
        self.needed = None

    @hookimpl
    def wmtp_checkpoint_committed(self, receipt):
        if receipt.step != self.after:
            return
        committed = self.disk / "ck" / "r" / f"step_{self.after}"
        parts = {p.stem: torch.load(p, weights_only=True) for p in committed.glob("*.pt")}
        self.needed = tensor_bytes(parts, storages=True)
        free = shutil.disk_usage(self.disk).free
        with open(self.disk / "filler", "wb") as f:
            f.truncate(0)
            f.write(b"\0" * max(free - self.leave(self.needed), 0))
            f.flush()
            os.fsync(f.fileno())


def config(disk, asynchronous: bool) -> dict:
    return {"seed": 6, "mlflow": None,
            "paths": {"checkpoints": {"base_path": f"file://{disk}/ck", "save_interval": 2, "keep_last": 3,
                                      "save_final": False, "async": asynchronous}}}


def run(tmp_path, monkeypatch, capsys, cfg, *extra, plugins=()):
    write(tmp_path / "c.yaml", cfg)
    write(tmp_path / "r.yaml", recipe(6, model={"d_model": 64}))
    monkeypatch.chdir(tmp_path)
    code = main(["--config", "c.yaml", "--recipe", "r.yaml", "--run-name", "r", *extra], plugins=plugins)
    return (code, *capsys.readouterr())


def numbers(pattern: str, line: str) -> list[int]:
    found = re.search(pattern, line)
    assert found, line
    return [int(n.replace(",", "")) for n in found.groups()]


WHEN = {
    # too little room for the tensors alone: refused before a file is written
    "before writing": lambda needed: needed // 2,
    # room for the tensors (and the staging marker, a page of its own) but not for the files
    # around them (tens of KB here): torch's writer fails part-way
    "while writing": lambda needed: needed + 8192,
}


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("when", list(WHEN))
def test_a_save_on_a_full_disk_removes_its_staging_keeps_the_checkpoints_and_says_how_much_it_needed(
        disk, tmp_path, monkeypatch, capsys, when, asynchronous):
    filler = Filler(disk, 4, WHEN[when])
    code, out, err = run(tmp_path, monkeypatch, capsys, config(disk, asynchronous), plugins=(filler,))
    assert code == (1 if asynchronous else 2), err[-3000:]
    assert "Traceback" not in out + err and "inline_container" not in err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    if asynchronous:
        assert "the background save of step 6 failed" in line, line
    assert f"{disk}/ck/r/step_6: the disk is full: the save of step 6 needs " in line, line
    if when == "before writing":
        needed, free = numbers(r"needs ([\d,]+) bytes and ([\d,]+) bytes are free", line)
        assert needed == filler.needed and free < needed, line
    else:  # what it would have needed is more than what is free now, with its staging removed
        free, needed = numbers(r"needs more than the ([\d,]+) bytes free \(its tensors alone hold "
                               r"([\d,]+) bytes", line)
        assert needed == filler.needed and needed <= free < needed + (1 << 20), line
    assert "its staging was removed" in line and "--resume latest" in line, line

    # the staging is gone (nothing left for `wmtp gc`), the committed checkpoints verify
    run_dir = disk / "ck" / "r"
    assert sorted(p.name for p in run_dir.iterdir()) == ["step_2", "step_4"]
    store = CheckpointStore.from_url(f"file://{disk}/ck")
    assert [m.step for _, m in store.list("r")] == [2, 4]
    for path, _ in store.list("r"):
        store.verify(path)

    # with room again, the run continues from step 4 and finishes
    os.remove(disk / "filler")
    code, _, err = run(tmp_path, monkeypatch, capsys, config(disk, asynchronous), "--resume", "latest")
    assert code == 0, err[-3000:]
    assert [m.step for _, m in store.list("r")] == [2, 4, 6]


def test_what_a_save_needs_counts_each_storage_once_and_whole():
    """The free-space check never refuses a save that fits: tied weights count once; a view
    counts as the whole storage torch.save writes for it."""
    w = torch.zeros(10, 10)
    assert tensor_bytes({"a": w, "tied": w, "row": w[0]}, storages=True) == 400
    assert tensor_bytes({"half": torch.zeros(3, dtype=torch.float16), "n": 1, "l": [torch.zeros(2)]}, storages=True) == 6 + 8
    assert tensor_bytes({"view": torch.zeros(100)[:10]}, storages=True) == 400
