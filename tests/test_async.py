"""Asynchronous saving: one short pause to stage, the write in the background, at most one in
flight, failures always surfaced, and a staged state is a snapshot of one step."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from builders import recipe, write

from wmtp_core import Payload, Role, RunInfo, SinkSpec, hookimpl
from wmtp_core.bindings import Bindings, PolicyBinding, SinkBinding
from wmtp_core.errors import SaveError
from wmtp_core.plugins import build_catalog, make_plugin_manager
from wmtp_core.router import Router
from wmtp_core.run import EXIT_FAILED, main
from wmtp_plugins.local import LocalSink

RUN = RunInfo(name="async", algo="baseline-mtp", lineage="L")


class FlakySink(LocalSink):
    """Injected fault: the write of one step raises (a full disk or a lost connection cannot be
    produced reliably on demand); ``delay`` slows every write down."""

    name = "flaky"
    fail_step: int | None = None
    delay = 0.0

    def store(self, event, payload):
        time.sleep(self.delay)
        if event.step == self.fail_step:
            raise OSError(28, "No space left on device (injected)")
        return super().store(event, payload)


class FlakyPlugin:
    @hookimpl
    def wmtp_register_sinks(self, register):
        register(SinkSpec(name="flaky", roles={Role.RESUME}, factory=FlakySink))


def router(base, sink="local", keep_last=10):
    pm = make_plugin_manager()
    pm.register(FlakyPlugin(), name="flaky-plugin")
    r = Router(pm, build_catalog(pm), Bindings(
        sinks=[SinkBinding(role=Role.RESUME, sink=sink, base_path=f"file://{base}")],
        policies=[PolicyBinding(role=Role.RESUME, policy="keep_last", options={"keep_last": keep_last})]),
        RUN, required=frozenset({Role.RESUME}))
    return r.open()


def test_a_save_that_changes_the_parameters_right_after_staging_stores_the_staged_values(tmp_path):
    r = router(tmp_path)
    w = torch.arange(1_000_000, dtype=torch.float32)
    state = {"model": {"w": w}, "trainer": {"step": 1, "history": [1.0, 2.0]}}
    r.emit(Role.RESUME, step=1, payload=Payload(parts=state), background=True)
    w.add_(1.0)  # the next optimiser step, while the save is still being written
    state["trainer"]["history"].append(3.0)
    r.wait()
    parts = r.sink(Role.RESUME).load(r.receipts[0].uri).parts
    assert torch.equal(parts["model"]["w"], torch.arange(1_000_000, dtype=torch.float32))
    assert parts["trainer"]["history"] == [1.0, 2.0]
    r.close()


def test_a_failed_background_save_surfaces_at_the_next_save(tmp_path):
    FlakySink.fail_step, FlakySink.delay = 2, 0.0
    r = router(tmp_path, sink="flaky")
    state = {"model": {"w": torch.ones(10)}}
    r.emit(Role.RESUME, step=1, payload=Payload(parts=state), background=True)
    r.emit(Role.RESUME, step=2, payload=Payload(parts=state), background=True)
    with pytest.raises(SaveError, match="background save of step 2 failed.*No space left"):
        r.emit(Role.RESUME, step=3, payload=Payload(parts=state), background=True)
    assert [m.step for _, m in r.sink(Role.RESUME).committed()] == [1]
    r.close()


def test_a_failed_background_save_surfaces_at_the_end(tmp_path):
    FlakySink.fail_step, FlakySink.delay = 1, 0.0
    r = router(tmp_path, sink="flaky")
    r.emit(Role.RESUME, step=1, payload=Payload(parts={"model": {"w": torch.ones(3)}}), background=True)
    with pytest.raises(SaveError, match="step 1"):
        r.close()


def test_at_most_one_save_in_flight_and_the_wait_is_reported(tmp_path):
    FlakySink.fail_step, FlakySink.delay = None, 0.3
    r = router(tmp_path, sink="flaky", keep_last=2)
    in_flight = []
    seen = threading.Event()

    class Watch:
        @hookimpl
        def wmtp_checkpoint_committed(self, receipt):
            in_flight.append(receipt.step)
            seen.set()

    r.pm.register(Watch())
    for step in (1, 2, 3):
        r.emit(Role.RESUME, step=step, payload=Payload(parts={"model": {"w": torch.ones(3) * step}}),
               background=True)
    r.wait()
    assert in_flight == [1, 2, 3], "commits happened out of order"
    assert r.async_stats[0].waited_s < 0.05
    assert all(s.waited_s > 0.15 for s in r.async_stats[1:]), r.async_stats
    # retention ran only after each commit: the newest two remain
    assert [m.step for _, m in r.sink(Role.RESUME).committed()] == [2, 3]
    r.close()


RECIPE = recipe(6, model={"dropout": 0.1})


def config(tmp, asynchronous, sink="local"):
    return {
        "seed": 9,
        "mlflow": None,
        "paths": {"checkpoints": {"base_path": f"file://{tmp}/ck", "save_interval": 2, "keep_last": 2,
                                  "async": asynchronous}},
        "storage": {"resume": {"sink": sink}, "final": {"sink": "local"}},
    }


def test_async_training_run_equals_the_synchronous_one(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "r.yaml", RECIPE)
    for mode in (False, True):
        write(tmp_path / f"c{mode}.yaml", config(tmp_path, mode))
        assert main(["--config", f"c{mode}.yaml", "--recipe", "r.yaml", "--run-name", f"m{mode}"]) == 0
    out = capsys.readouterr().out
    assert "asynchronous saves: 3" in out
    a = torch.load(tmp_path / "ck" / "mFalse" / "final" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "ck" / "mTrue" / "final" / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in (tmp_path / "ck" / "mTrue").iterdir()) == ["final", "step_4", "step_6"]


def test_a_run_whose_background_save_fails_exits_nonzero_and_says_which(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    FlakySink.fail_step, FlakySink.delay = 4, 0.0
    write(tmp_path / "r.yaml", RECIPE)
    write(tmp_path / "c.yaml", config(tmp_path, True, sink="flaky"))
    code = main(["--config", "c.yaml", "--recipe", "r.yaml", "--run-name", "bad"], plugins=(FlakyPlugin(),))
    assert code == EXIT_FAILED
    err = " ".join(capsys.readouterr().err.split())
    assert "the background save of step 4 failed" in err and "No space left on device" in err
    assert not (tmp_path / "ck" / "bad" / "final").exists()
