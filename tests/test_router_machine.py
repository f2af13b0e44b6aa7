"""A state machine over the router (hypothesis): synchronous and background saves, a sink that
fails, resumes that protect a step, and retention, in any order.

Invariants, after every step of every generated program:
- each emitted checkpoint reached its bound sink exactly once, or its failure surfaced (at once
  for a synchronous save, at the next save or wait for a background one);
- retention never deleted the protected checkpoint, the newest one, or another lineage's;
- at most one save was ever in flight.
"""

from __future__ import annotations

import threading
import time

import pytest
from conftest import MemorySink, run_info
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from wmtp_core import Payload, PolicySpec, Role, SinkSpec
from wmtp_core.bindings import Bindings, PolicyBinding, SinkBinding
from wmtp_core.catalog import Catalog
from wmtp_core.errors import SaveError
from wmtp_core.plugins import make_plugin_manager
from wmtp_core.router import Router
from wmtp_plugins.retention import make_keep_last


class DiskFull(OSError):
    """What the flaky sink raises: a fault injected because it cannot be produced on demand."""


class FlakySink(MemorySink):
    """A memory sink that can be told to fail, and that measures how many stores overlap."""

    def __init__(self, context, machine):
        super().__init__(context, name="flaky", items=machine.store)
        self.machine = machine

    def store(self, event, payload):
        m = self.machine
        with m.lock:
            m.active += 1
            m.max_active = max(m.max_active, m.active)
        try:
            time.sleep(0.001)  # long enough for a second save to overlap, if the router let it
            m.calls.append(event.step)
            if m.failing:
                raise DiskFull(f"no space left for step {event.step}")
            return super().store(event, payload)
        finally:
            with m.lock:
                m.active -= 1


class RouterMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.store: dict = {}
        self.lock = threading.Lock()
        self.active = self.max_active = 0
        self.calls: list[int] = []
        self.failing = False
        self.step = 0
        self.run = run_info(name="machine", lineage="L1")
        self.protected: frozenset = frozenset()
        self.emitted: list[int] = []       # every step handed to emit
        self.failed: set[int] = set()      # steps whose failure surfaced
        self.background_failure: int | None = None  # a failed background save not surfaced yet
        self.router: Router | None = None

    def _router(self) -> Router:
        pm = make_plugin_manager(entry_points=False)
        catalog = Catalog()
        catalog.add_sink(SinkSpec(name="flaky", roles={Role.RESUME}, factory=lambda c: FlakySink(c, self)))
        catalog.add_policy(PolicySpec(name="keep_last", roles={Role.RESUME}, factory=make_keep_last))
        bindings = Bindings(sinks=[SinkBinding(role=Role.RESUME, sink="flaky")],
                            policies=[PolicyBinding(role=Role.RESUME, policy="keep_last",
                                                    options={"keep_last": self.keep})])
        return Router(pm, catalog, bindings, self.run, required=frozenset({Role.RESUME}),
                      protected=self.protected).open()

    @initialize(keep=st.integers(1, 3))
    def start(self, keep: int) -> None:
        self.keep = keep
        # another lineage's checkpoint under the same run name, written before this run
        other = Router(make_plugin_manager(entry_points=False), self._catalog_for_other(), Bindings(
            sinks=[SinkBinding(role=Role.RESUME, sink="flaky")]), run_info(name="machine", lineage="OTHER"),
            required=frozenset({Role.RESUME})).open()
        other.emit(Role.RESUME, step=10_000, payload=Payload(parts={}))
        other.close()
        self.calls.clear()
        self.router = self._router()

    def _catalog_for_other(self) -> Catalog:
        catalog = Catalog()
        catalog.add_sink(SinkSpec(name="flaky", roles={Role.RESUME}, factory=lambda c: FlakySink(c, self)))
        return catalog

    def _expect_surfaced_failure(self, action) -> bool:
        """Run ``action``; a background save that failed earlier must surface now."""
        if self.background_failure is None:
            action()
            return False
        with pytest.raises(SaveError, match=f"step {self.background_failure} failed"):
            action()
        self.failed.add(self.background_failure)
        self.background_failure = None
        return True

    @rule()
    def save(self) -> None:
        """A synchronous save: stored, or its failure raised right here."""
        self.step += 1
        step = self.step

        def emit():
            self.router.emit(Role.RESUME, step=step, payload=Payload(parts={}))

        if self.background_failure is not None:  # surfaces first; this save is not attempted
            self._expect_surfaced_failure(emit)
            return
        self.emitted.append(step)
        if self.failing:
            with pytest.raises(DiskFull):
                emit()
            self.failed.add(step)
        else:
            emit()

    @rule()
    def save_in_background(self) -> None:
        self.step += 1
        step = self.step

        def emit():
            self.router.emit(Role.RESUME, step=step, payload=Payload(parts={}), background=True)

        if self._expect_surfaced_failure(emit):
            return  # the earlier failure surfaced; this save was not started
        self.emitted.append(step)
        if self.failing:
            self.background_failure = step

    @rule()
    def wait(self) -> None:
        self._expect_surfaced_failure(self.router.wait)

    @rule()
    def toggle_failure(self) -> None:
        """The disk fills up (or frees up) between saves."""
        self._expect_surfaced_failure(self.router.wait)
        self.failing = not self.failing

    @precondition(lambda self: self.router is not None)
    @rule()
    def resume_from_the_newest(self) -> None:
        """The process ends and the run resumes from its newest committed checkpoint, which the
        new router must protect."""
        self._expect_surfaced_failure(self.router.close)
        mine = [m.step for m in self.store.values() if m.lineage == self.run.lineage]
        if mine:
            self.protected = frozenset({(self.run.name, max(mine))})
        self.router = self._router()

    def teardown(self) -> None:
        if self.router is not None:
            try:
                self.router.close()
            except SaveError:
                pass

    # -- invariants ------------------------------------------------------------------------
    @invariant()
    def every_checkpoint_reached_its_sink_once_or_its_failure_surfaced(self) -> None:
        if self.router is None:
            return
        if self.background_failure is None:
            self.router.wait()
        stored = [m.step for m in self.store.values() if m.lineage == self.run.lineage]
        assert len(self.calls) == len(set(self.calls)), f"a checkpoint was stored twice: {self.calls}"
        in_flight = {self.background_failure} if self.background_failure is not None else set()
        done = set(self.emitted) - in_flight
        assert set(self.calls) <= set(self.emitted)
        for step in done:
            assert step in self.calls, f"step {step} never reached the sink"
        for step in set(stored):
            assert step not in self.failed, f"step {step} failed but is committed"

    @invariant()
    def retention_keeps_the_protected_the_newest_and_other_lineages(self) -> None:
        if self.router is None or self.background_failure is not None:
            return
        self.router.wait()
        steps = {m.step for m in self.store.values() if m.lineage == self.run.lineage}
        committed_ever = set(self.calls) - self.failed
        if committed_ever:
            assert max(committed_ever) in steps, "the newest committed checkpoint was deleted"
        for _, step in self.protected:
            assert step in steps, f"the protected step {step} was deleted"
        assert any(m.lineage == "OTHER" for m in self.store.values()), "another lineage's checkpoint was deleted"

    @invariant()
    def at_most_one_save_in_flight(self) -> None:
        assert self.max_active <= 1, f"{self.max_active} saves overlapped"


RouterMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=25, deadline=None)
test_router_state_machine = RouterMachine.TestCase
