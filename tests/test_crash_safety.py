"""Crash safety: a save killed (SIGKILL, for real) at any point leaves either the previous
committed state or the new one; resume always finds a committed checkpoint that verifies.

The kill points are injected by wrapping the functions the save runs through so that the
process SIGKILLs itself at that instant: a crash at an exact byte cannot be produced otherwise.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import signal

import pytest
import torch
from rich.console import Console

from wmtp_core import Payload, Role, RunInfo
from wmtp_core import commit as commit_mod
from wmtp_core.bindings import Bindings, PolicyBinding, SinkBinding
from wmtp_core.plugins import build_catalog, make_plugin_manager
from wmtp_core.resume import find_resume as _find_resume
from wmtp_core.router import Router

RUN = RunInfo(name="crashy", algo="baseline-mtp", lineage="L")


def state(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {"model": {"w": torch.randn(256, 256, generator=g)},
            "optimizer": {"m": torch.randn(256, 256, generator=g)},
            "trainer": {"step": step}}


def router_for(base: str) -> Router:
    pm = make_plugin_manager()
    bindings = Bindings(sinks=[SinkBinding(role=Role.RESUME, sink="local", base_path=base)],
                        policies=[PolicyBinding(role=Role.RESUME, policy="keep_last",
                                                options={"keep_last": 2})])
    return Router(pm, build_catalog(pm), bindings, RUN, required=frozenset({Role.RESUME})).open()


def save(base: str, step: int) -> None:
    router = router_for(base)
    router.emit(Role.RESUME, step=step, payload=Payload(parts=state(step)))
    router.close()


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def crash_child(base: str, point: str, n: int) -> None:
    store = commit_mod.CheckpointStore
    if point == "mid_file":
        # the n-th file is half on disk when the process dies
        from wmtp_core import filesink

        calls = {"n": 0}
        real = filesink.torch_writer.save_to_path

        def half_then_die(self, path):
            calls["n"] += 1
            if calls["n"] < n:
                return real(self, path)
            buf = io.BytesIO()
            torch.save(self.obj, buf)
            with open(path, "wb") as f:
                f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
                f.flush()
                os.fsync(f.fileno())
            die()

        filesink.torch_writer.save_to_path = half_then_die
    elif point == "between_files":
        original = store.write

        def write(self, run, name, files, **kw):
            files = dict(files)
            names = list(files)
            target = names[n]
            files[target] = lambda stream: die()
            return original(self, run, name, files, **kw)

        store.write = write
    elif point == "before_manifest":
        store._write_manifest = lambda self, path, manifest: die()
    elif point == "manifest_rename":
        real = os.replace
        os.replace = lambda src, dst: die() if dst.endswith("manifest.json") else real(src, dst)
    elif point == "during_retention":
        real_delete = store.delete

        def delete(self, path):  # uncommitted (manifest gone), files not yet removed
            self.fs.rm = lambda *args, **kwargs: die()
            real_delete(self, path)

        store.delete = delete
    save(base, 3)
    os._exit(0)


POINTS = [("mid_file", 1), ("mid_file", 2), ("mid_file", 3), ("between_files", 1),
          ("between_files", 2), ("before_manifest", 0), ("manifest_rename", 0),
          ("during_retention", 0)]


@pytest.mark.parametrize("point,n", POINTS)
def test_a_save_killed_at_any_point_leaves_a_committed_checkpoint_that_verifies(tmp_path, point, n):
    base = f"file://{tmp_path}"
    save(base, 1)
    save(base, 2)
    child = mp.get_context("fork").Process(target=crash_child, args=(base, point, n))
    child.start()
    child.join(60)
    assert child.exitcode == -signal.SIGKILL, f"the save was not killed at {point}"

    store = commit_mod.CheckpointStore.from_url(base)
    committed = {m.step: p for p, m in store.list("crashy")}
    for path in committed.values():
        store.verify(path)  # every committed checkpoint verifies
    if point == "during_retention":
        # the new one committed; the old one being pruned is uncommitted (manifest first) and
        # left as WMTP's staging, which gc collects
        assert set(committed) == {2, 3}
        assert store.staging("crashy") == [store.path_of("crashy", "step_1")]
    else:
        assert set(committed) == {1, 2}, "a committed checkpoint was lost or a torn one counts"
    assert all(i.state in ("committed", "staging") for i in store.inspect("crashy"))

    sink = router_for(base).sink(Role.RESUME)
    parts = {}
    uri, manifest = _find_resume(sink, "latest", Console(stderr=True),
                                 restore=lambda loaded, uri: parts.update(loaded.parts))
    assert manifest.step == max(committed)
    assert torch.equal(parts["model"]["w"], state(manifest.step)["model"]["w"])

    # the next save of the same step clears the leftover staging and commits
    if 3 not in committed:
        save(base, 3)
        assert max(m.step for _, m in store.list("crashy")) == 3


def test_latest_falls_back_past_a_corrupt_checkpoint_and_says_which(tmp_path, capsys):
    base = f"file://{tmp_path}"
    for step in (1, 2, 3):
        save(base, step)
    store = commit_mod.CheckpointStore.from_url(base)
    newest = store.path_of("crashy", "step_3")
    target = os.path.join(newest, "optimizer.pt")
    data = bytearray(open(target, "rb").read())
    data[100] ^= 0xFF
    open(target, "wb").write(bytes(data))

    sink = router_for(base).sink(Role.RESUME)
    uri, manifest = _find_resume(sink, "latest", Console(stderr=True, soft_wrap=True))
    assert manifest.step == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "skipping" in err and "step_3" in err and "optimizer.pt does not match the manifest" in err

    # an explicit URI that fails verification stops with an error naming the file
    with pytest.raises(commit_mod.CheckpointError, match="optimizer.pt does not match the manifest"):
        _find_resume(sink, newest, Console(stderr=True))
