"""A committed checkpoint whose bytes match its manifest but that no run can use (a planted
pickle, an empty or out-of-range trainer state, a scheduler state with keys its scheduler does
not have, weights of other shapes) is quarantined by the resume and by ``wmtp checkpoints
verify``, like a corrupt one, so that the run finishes; one written for another model is
refused in one line and left where it is."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from builders import files, tiny_config

pytestmark = pytest.mark.slow


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


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


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished tiny run: step_2 and step_4 committed."""
    from wmtp_core.run import main

    tmp = tmp_path_factory.mktemp("trained")
    assert main(files(tmp, tiny_config(tmp, mlflow=None, paths={"checkpoints": {"keep_last": 5}}))) == 0
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


def saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def edit(part: str, change):
    def craft(step: Path, marker: Path) -> None:
        state = torch.load(step / part, weights_only=True)
        replace_part(step, part, saved(change(state, marker)))
    return craft


def _set(path: tuple, value):
    def change(state, marker):
        target = state
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        return state
    return change


def _reshaped(state, marker):
    name = next(iter(state))
    state[name] = torch.zeros(3, 5)
    return state


CASES = {
    "model.pt: a planted pickle": edit("model.pt", lambda s, m: {**s, "x": Exploit(str(m))}),
    "optimizer.pt: a planted pickle": edit("optimizer.pt", lambda s, m: {**s, "x": Exploit(str(m))}),
    "trainer.pt: a planted pickle": edit("trainer.pt", lambda s, m: {**s, "x": Exploit(str(m))}),
    "model.pt with a tensor of another shape": edit("model.pt", _reshaped),
    "an empty trainer state": edit("trainer.pt", lambda s, m: {}),
    "step: -3": edit("trainer.pt", _set(("step",), -3)),
    "step: 10**18": edit("trainer.pt", _set(("step",), 10 ** 18)),
    "scheduler: warmup = 'x'": edit("trainer.pt", _set(("scheduler", "lr_lambdas", 0, "warmup"), "x")),
    "scheduler: optimizer = {}": edit("trainer.pt", _set(("scheduler", "optimizer"), {})),
    "scheduler: base_lrs = 'abc'": edit("trainer.pt", _set(("scheduler", "base_lrs"), "abc")),
    "data: index -5": edit("trainer.pt", _set(("data", "index"), -5)),
    "early stopping: bad_evals 'x'": edit("trainer.pt", _set(("early_stopping", "bad_evals"), "x")),
}
"""Each was taken in by a resume before (a traceback steps later, or a skip, then ``step_4 is
already committed; refusing to overwrite it`` on every retry)."""


@pytest.mark.parametrize("case", list(CASES))
def test_an_unusable_checkpoint_is_quarantined_and_the_run_finishes(trained, tmp_path, capsys, case):
    work = tmp_path / "w"
    shutil.copytree(trained, work)
    ck = work / "ck" / "tiny"
    marker = tmp_path / "marker"
    CASES[case](ck / "step_4", marker)
    args = files(work, tiny_config(work, mlflow=None, paths={"checkpoints": {"keep_last": 5}}),
                 {"train": {"max_steps": 6}}, name="-longer")

    code, _, err = run(capsys, *args, "--resume", "latest")
    line = " ".join(err.split())
    assert code == 0 and not marker.exists(), err
    assert f"quarantined {ck}/step_4 as {ck}/step_4.quarantined-" in line and "it cannot be used" in line
    assert f"resuming 'tiny' from {ck}/step_2 (step 2)" in line
    moved = [p for p in ck.iterdir() if p.name.startswith("step_4.quarantined-")]
    assert len(moved) == 1 and (moved[0] / ".wmtp-quarantine").is_file()
    assert json.loads((moved[0] / ".wmtp-quarantine").read_text())["reason"]
    for step in (4, 6):  # committed again by this run, then past it
        assert (ck / f"step_{step}" / "manifest.json").is_file()
    code, out, _ = cli(capsys, "checkpoints", "verify", ck)
    assert code == 0 and "FAILED" not in out


VERIFY_CASES = ["model.pt: a planted pickle", "trainer.pt: a planted pickle", "an empty trainer state",
                "step: 10**18", "optimizer.pt: a planted pickle"]


@pytest.mark.parametrize("case", VERIFY_CASES)
def test_verify_deserialises_and_checks_the_structure_then_quarantines(trained, tmp_path, capsys, case):
    work = tmp_path / "w"
    shutil.copytree(trained, work)
    step = work / "ck" / "tiny" / "step_4"
    marker = tmp_path / "marker"
    CASES[case](step, marker)

    code, out, _ = cli(capsys, "checkpoints", "verify", step, "--no-quarantine")
    assert code == 1 and f"FAILED  {step}:" in out and not marker.exists()
    assert step.is_dir()  # --no-quarantine leaves it

    code, out, _ = cli(capsys, "checkpoints", "verify", step.parent)
    assert code == 1 and "2 of 3 checkpoints verified" in out  # step_2 and final verify
    assert f"quarantined as {step}.quarantined-" in out and not step.exists()
    assert f"OK      {step.parent}/step_2" in out


def test_verify_still_passes_what_a_run_wrote(trained, capsys):
    code, out, _ = cli(capsys, "checkpoints", "verify", trained / "ck" / "tiny")
    assert code == 0 and "3 of 3 checkpoints verified" in out, out  # step_2, step_4, final


def test_a_checkpoint_of_another_model_is_refused_in_one_line_and_left_in_place(trained, tmp_path, capsys):
    work = tmp_path / "w"
    shutil.copytree(trained, work)
    ck = work / "ck" / "tiny"
    args = files(work, tiny_config(work, mlflow=None, paths={"checkpoints": {"keep_last": 5}}),
                 {"train": {"max_steps": 6}, "model": {"d_model": 48}}, name="-wider")

    code, _, err = run(capsys, *args, "--resume", ck / "step_4")
    line = " ".join(err.split())
    assert code == 2, err
    assert "it was written by a run of another model" in line and "resume it with that model's settings" in line
    assert len(err.strip().splitlines()) == 1
    assert not [p for p in ck.iterdir() if "quarantined" in p.name]
    assert (ck / "step_4" / "manifest.json").is_file()


def test_a_sharded_checkpoint_with_a_pickle_or_an_outside_path_is_quarantined_by_a_resume(tmp_path):
    """Sharded (DCP) resume state: a pickled object among its items, a ``.metadata`` that runs
    code or points at a file outside the checkpoint. Every byte is in its manifest; the resume
    moves each aside and resumes from the newest one it can use."""
    import pickle

    import torch.distributed.checkpoint as dcp
    from rich.console import Console
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    from wmtp_core import Role
    from wmtp_core.commit import CheckpointStore
    from wmtp_core.errors import UnusableError
    from wmtp_core.events import RunInfo, SinkContext
    from wmtp_core.filesink import FileSink
    from wmtp_core.resume import find_resume

    marker = tmp_path / "marker"
    store = CheckpointStore.from_url(f"file://{tmp_path}/ck")
    run = RunInfo(name="r", algo="baseline-mtp", lineage="L1")
    sink = FileSink(SinkContext(role=Role.RESUME, run=run, base_path=f"file://{tmp_path}/ck"))

    def sharded(step, state, metadata=None):
        path = store.prepare("r", f"step_{step}")
        dcp.save(state, checkpoint_id=path, no_dist=True)
        torch.save({"step": step}, f"{path}/trainer_rank0.pt")
        if metadata is not None:
            Path(path, ".metadata").write_bytes(metadata)
        store.commit_existing("r", f"step_{step}", step=step, role=Role.RESUME, lineage="L1",
                              meta={"format": "dcp", "world_size": 1})
        return store.uri(path)

    good = sharded(2, {"w": torch.arange(4.0), "lr": 0.5})
    sharded(4, {"w": torch.arange(4.0), "obj": Exploit(str(marker))})
    meta = pickle.loads(Path(tmp_path / "ck" / "r" / "step_2" / ".metadata").read_bytes())
    for index, info in list(meta.storage_data.items()):
        meta.storage_data[index] = _StorageInfo("../step_2/__0_0.distcp", info.offset, info.length)
    sharded(6, {"w": torch.arange(4.0), "lr": 0.5}, metadata=pickle.dumps(meta))
    sharded(8, {"w": torch.arange(4.0)}, metadata=pickle.dumps(Exploit(str(marker))))
    with pytest.raises(UnusableError):
        sink.load(store.uri(str(tmp_path / "ck" / "r" / "step_8")))

    err = Console(file=io.StringIO(), width=400)
    uri, manifest = find_resume(sink, "latest", err, quarantine=True)
    text = err.file.getvalue()
    assert uri == good and manifest.step == 2 and not marker.exists()
    for step in (4, 6, 8):
        assert f"quarantined {tmp_path}/ck/r/step_{step} as" in text and "it cannot be used" in text
    assert sorted(p.name.split(".")[0] for p in (tmp_path / "ck" / "r").iterdir()) == \
        ["step_2", "step_4", "step_6", "step_8"] and not (tmp_path / "ck" / "r" / "step_4").exists()


def _linked(step: Path, marker: Path) -> None:
    elsewhere = step.parent.parent / "elsewhere"
    shutil.move(step, elsewhere)
    step.symlink_to(elsewhere)


def _manifest_dir(step: Path, marker: Path) -> None:
    (step / "manifest.json").unlink()
    (step / "manifest.json").mkdir()


@pytest.mark.parametrize("craft", [_linked, _manifest_dir], ids=["step_4 a link", "manifest.json a directory"])
def test_a_step_directory_that_cannot_be_believed_never_blocks_the_run(trained, tmp_path, capsys, craft):
    work = tmp_path / "w"
    shutil.copytree(trained, work)
    ck = work / "ck" / "tiny"
    craft(ck / "step_4", tmp_path / "marker")
    args = files(work, tiny_config(work, mlflow=None, paths={"checkpoints": {"keep_last": 5}}),
                 {"train": {"max_steps": 6}}, name="-longer")

    code, _, err = run(capsys, *args, "--resume", "latest")
    line = " ".join(err.split())
    assert code == 0, err
    assert f"quarantined {ck}/step_4 as {ck}/step_4.quarantined-" in line
    assert f"resuming 'tiny' from {ck}/step_2 (step 2)" in line
    assert (ck / "step_4" / "manifest.json").is_file() and not (ck / "step_4").is_symlink()
