"""Property tests of the routing policy (hypothesis): the structure makes double storage impossible."""

from __future__ import annotations

from conftest import MemorySink, run_info
from hypothesis import given, settings
from hypothesis import strategies as st

from wmtp_core import (
    FileEntry,
    Manifest,
    Payload,
    PolicySpec,
    Role,
    SinkContext,
    SinkSpec,
    hookimpl,
)
from wmtp_core.bindings import Bindings, PolicyBinding, SinkBinding
from wmtp_core.catalog import Catalog
from wmtp_core.errors import BindingError
from wmtp_core.plugins import make_plugin_manager
from wmtp_core.router import Router
from wmtp_plugins.retention import make_keep_last

ENTRY = FileEntry(path="model.pt", size=1, digest="0" * 64)

NAMES = ["alpha", "beta", "gamma", "delta", "ghost"]
ROLES = list(Role)

role_sets = st.sets(st.sampled_from(ROLES), min_size=1).map(frozenset)
events = st.lists(st.tuples(st.sampled_from(ROLES), st.integers(0, 50)), max_size=12)
BREAKS = ["bind a role twice", "bind a sink that is not installed", "bind a sink to a role it does not serve",
          "leave a required role unbound", "two policies for one role", "a policy that is not installed",
          "a policy on a role it does not prune", "a policy on an unbound role"]


@st.composite
def plans(draw):
    """``(plugins, sinks, policies, required, broken)``, valid by construction two times in
    three, then broken in exactly one of the ways contract 1 forbids. About half of the valid
    plans route both roles."""
    plugins = draw(st.dictionaries(st.sampled_from(NAMES[:4]), role_sets, min_size=1, max_size=4))
    required = set(draw(st.sampled_from([[Role.RESUME, Role.FINAL], [Role.RESUME, Role.FINAL], [Role.RESUME],
                                         [Role.FINAL], []])))
    bound_roles = required | set(draw(st.sets(st.sampled_from(ROLES))))
    sinks = []
    for role in sorted(bound_roles, key=lambda r: r.value):
        able = sorted(n for n, roles in plugins.items() if role in roles)
        if not able:  # make the plan possible: some plugin serves the role
            name = draw(st.sampled_from(sorted(plugins)))
            plugins[name] = plugins[name] | {role}
            able = [name]
        sinks.append((role, draw(st.sampled_from(able))))
    bound = dict(sinks)
    policies = [(Role.RESUME, "keep_last")] if Role.RESUME in bound and draw(st.booleans()) else []
    broken = draw(st.sampled_from([None, None, *BREAKS]))
    unserved = [(r, n) for r in ROLES for n in plugins if r not in plugins[n]]
    if broken == "bind a role twice" and sinks:
        sinks.append(draw(st.sampled_from(sinks)))
    elif broken == "bind a sink that is not installed":
        role = draw(st.sampled_from(ROLES))
        sinks = [(r, n) for r, n in sinks if r is not role] + [(role, "ghost")]
    elif broken == "bind a sink to a role it does not serve" and unserved:
        role, name = draw(st.sampled_from(unserved))
        sinks = [(r, n) for r, n in sinks if r is not role] + [(role, name)]
    elif broken == "leave a required role unbound" and required:
        role = draw(st.sampled_from(sorted(required, key=lambda r: r.value)))
        sinks = [(r, n) for r, n in sinks if r is not role]
        policies = [(r, p) for r, p in policies if r is not role]
    elif broken == "two policies for one role" and Role.RESUME in bound:
        policies = [(Role.RESUME, "keep_last"), (Role.RESUME, "keep_last")]
    elif broken == "a policy that is not installed" and Role.RESUME in bound:
        policies = [(Role.RESUME, "nope")]
    elif broken == "a policy on a role it does not prune" and Role.FINAL in bound:
        policies = [(Role.FINAL, "keep_last")]
    elif broken == "a policy on an unbound role" and Role.RESUME not in bound:
        policies = [(Role.RESUME, "keep_last")]
    return plugins, sinks, policies, sorted(required, key=lambda r: r.value)


def oracle_valid(plugins, sinks, policies, required) -> bool:
    """An independent statement of contract 1."""
    bound = [r for r, _ in sinks]
    if len(bound) != len(set(bound)):
        return False
    if any(name not in plugins or role not in plugins[name] for role, name in sinks):
        return False
    if not set(required) <= set(bound):
        return False
    proles = [r for r, _ in policies]
    if len(proles) != len(set(proles)):
        return False
    return all(name == "keep_last" and role is Role.RESUME and role in bound for role, name in policies)


class World:
    """Builds a catalog of recording sinks from a random plugin set."""

    def __init__(self, plugins):
        self.catalog = Catalog()
        self.instances: dict[tuple[str, Role], MemorySink] = {}
        self.stores: dict[str, dict] = {}  # what each named sink committed, across routers
        for name, roles in plugins.items():
            self.catalog.add_sink(SinkSpec(name=name, roles=roles, factory=self._factory(name)))
        self.catalog.add_policy(PolicySpec(name="keep_last", roles={Role.RESUME},
                                           factory=make_keep_last))

    def _factory(self, name):
        def build(context: SinkContext):
            sink = MemorySink(context, name=name, items=self.stores.setdefault(name, {}))
            self.instances[(name, context.role)] = sink
            return sink
        return build


def make_router(pm, world, sinks, policies, required, options=None):
    bindings = Bindings(
        sinks=[SinkBinding(role=r, sink=n) for r, n in sinks],
        policies=[PolicyBinding(role=r, policy=n, options=options or {"keep_last": 3}) for r, n in policies],
    )
    return Router(pm, world.catalog, bindings, run_info(), required=frozenset(required))


def test_the_generated_plans_are_mostly_accepted_runs_that_route_both_roles():
    """The property below is only as strong as its examples: at least half are accepted runs,
    at least a quarter route both roles."""
    seen = {"total": 0, "valid": 0, "both": 0}

    @settings(max_examples=400, deadline=None)
    @given(plan=plans())
    def count(plan):
        plugins, sinks, policies, required = plan
        valid = oracle_valid(plugins, sinks, policies, required)
        seen["total"] += 1
        seen["valid"] += valid
        seen["both"] += valid and {r for r, _ in sinks} == set(ROLES)

    count()
    print(f"routing plans: {seen}")
    assert seen["valid"] / seen["total"] >= 0.5, seen
    assert seen["both"] / seen["total"] >= 0.25, seen


@settings(max_examples=300, deadline=None)
@given(plan=plans(), evs=events)
def test_rejected_before_any_event_or_every_event_stored_once_by_its_bound_sink(plan, evs):
    """Either the configuration is rejected before any event, or each event is stored exactly
    once, by exactly the sink bound to its role; unbound sinks receive nothing; resume events
    never reach the final role's sink; the final model is stored at most once; observers see
    every stored event."""
    plugins, sinks, policies, required = plan
    pm = make_plugin_manager(entry_points=False)
    observer = Observer()
    pm.register(observer, name="observer")
    world = World(plugins)
    valid = oracle_valid(plugins, sinks, policies, required)
    try:
        router = make_router(pm, world, sinks, policies, required)
    except BindingError:
        assert not valid, "a valid configuration was rejected"
        assert not world.instances, "a sink was built for a rejected configuration"
        return
    assert valid, "an invalid configuration was accepted"
    router.open()
    bound = dict(sinks)
    expected: dict[Role, list[int]] = {r: [] for r in ROLES}
    final_step = None  # the weights of a step are stored once; a later step supersedes
    for role, step in evs:
        if role not in bound:
            try:
                router.emit(role, step=step, payload=Payload(parts={}))
            except BindingError:
                continue
            raise AssertionError(f"an event for unbound role {role} was accepted")
        if role is Role.FINAL and final_step is not None and step <= final_step:
            try:
                router.emit(role, step=step, payload=Payload(parts={}))
            except BindingError:
                continue
            raise AssertionError("the final model of a step was stored twice")
        if role is Role.RESUME and step in expected[Role.RESUME]:
            continue  # a resume sink may refuse the same step twice; skip in this model
        router.emit(role, step=step, payload=Payload(parts={}))
        expected[role].append(step)
        if role is Role.FINAL:
            final_step = step
    router.close()
    for (name, role), sink in world.instances.items():
        assert bound.get(role) == name, "a sink was built for a role it is not bound to"
        assert sink.stored == [(role, s) for s in expected[role]]
        assert all(r is role for r, _ in sink.stored), "an event reached another role's sink"
    bound_names = set(bound.values())
    for name in plugins:
        if name not in bound_names:
            assert not any(n == name for n, _ in world.instances), f"unbound {name} was built"
    finals = [r.step for r in router.receipts if r.role is Role.FINAL]
    assert finals == sorted(set(finals)), "a final model of a step stored twice, or an older one after a newer"
    assert observer.emitted == [(r, s) for r, s in _order(router.receipts)]
    assert observer.committed == [(r.role, r.step) for r in router.receipts]


def _order(receipts):
    return [(r.role, r.step) for r in receipts]


class Observer:
    def __init__(self):
        self.emitted, self.committed = [], []

    @hookimpl
    def wmtp_resume_checkpoint_emitted(self, event):
        self.emitted.append((event.role, event.step))

    @hookimpl
    def wmtp_final_model_emitted(self, event):
        self.emitted.append((event.role, event.step))

    @hookimpl
    def wmtp_checkpoint_committed(self, receipt):
        self.committed.append((receipt.role, receipt.step))


@settings(max_examples=200, deadline=None)
@given(keep=st.integers(1, 6), every=st.integers(0, 4), steps=st.lists(st.integers(1, 200),
       min_size=1, max_size=25, unique=True))
def test_keep_last_leaves_min_n_saves_and_never_deletes_the_newest(keep, every, steps):
    """keep_last N leaves exactly min(N, saves) committed checkpoints (plus keep_every
    milestones) and never deletes the newest."""
    pm = make_plugin_manager(entry_points=False)
    world = World({"alpha": frozenset({Role.RESUME})})
    router = make_router(pm, world, [(Role.RESUME, "alpha")], [(Role.RESUME, "keep_last")], [Role.RESUME],
                         options={"keep_last": keep, "keep_every": every})
    router.open()
    saved = []
    for step in sorted(steps):
        router.emit(Role.RESUME, step=step, payload=Payload(parts={}))
        saved.append(step)
        router.wait()
        sink = world.instances[("alpha", Role.RESUME)]
        left = {m.step for _, m in sink.committed()}
        assert max(saved) in left, "the newest checkpoint was deleted"
        milestones = {s for s in saved[:-keep]} if keep < len(saved) else set()
        milestones = {s for s in milestones if every and s % every == 0}
        assert left == set(saved[-keep:]) | milestones
    router.close()


@settings(max_examples=100, deadline=None)
@given(keep=st.integers(1, 3), n=st.integers(1, 10), resumed_at=st.integers(0, 9))
def test_retention_never_deletes_the_checkpoint_a_run_resumed_from_nor_another_lineage(keep, n, resumed_at):
    """Protected checkpoints survive any number of later saves."""
    pm = make_plugin_manager(entry_points=False)
    world = World({"alpha": frozenset({Role.RESUME})})
    bindings = Bindings(sinks=[SinkBinding(role=Role.RESUME, sink="alpha")],
                        policies=[PolicyBinding(role=Role.RESUME, policy="keep_last", options={"keep_last": keep})])
    run = run_info()
    resumed_at = min(resumed_at, n - 1)

    def router(info, protected=frozenset()):
        return Router(pm, world.catalog, bindings, info, required=frozenset({Role.RESUME}),
                      protected=protected).open()

    # another lineage's checkpoint under the same sink and run name
    other = router(run_info(lineage="OTHER"))
    other.emit(Role.RESUME, step=1000, payload=Payload(parts={}))
    other.close()
    # the run until it was interrupted at resumed_at, then the run resumed from there
    first = router(run)
    for step in range(resumed_at + 1):
        first.emit(Role.RESUME, step=step, payload=Payload(parts={}))
    first.close()
    resumed = router(run, protected=frozenset({(run.name, resumed_at)}))
    for step in range(resumed_at + 1, n + resumed_at + 1):
        resumed.emit(Role.RESUME, step=step, payload=Payload(parts={}))
        resumed.wait()
    resumed.close()
    sink = world.instances[("alpha", Role.RESUME)]
    left = {m.step for _, m in sink.committed()}
    assert resumed_at in left and 1000 in left


@settings(max_examples=150, deadline=None)
@given(keep=st.integers(1, 3), k=st.integers(1, 3), mode=st.sampled_from(["min", "max"]),
       losses=st.lists(st.one_of(st.floats(0, 10, allow_nan=False), st.none()), min_size=1, max_size=12),
       resumed_at=st.integers(0, 11))
def test_keep_last_with_keep_best_never_deletes_the_newest_the_protected_the_best_or_another_lineage(
        keep, k, mode, losses, resumed_at):
    """The combined policy, through the real router: after every save the newest, the one the run
    resumed from, the k best by the recorded metric (a save without it is never among them) and
    another lineage's checkpoint remain, and nothing else beyond the newest ``keep``."""
    from wmtp_core.manifest import best

    pm = make_plugin_manager(entry_points=False)
    world = World({"alpha": frozenset({Role.RESUME})})
    policy = {"keep_last": keep, "keep_best": {"k": k, "monitor": "eval_loss", "mode": mode}}
    bindings = Bindings(sinks=[SinkBinding(role=Role.RESUME, sink="alpha")],
                        policies=[PolicyBinding(role=Role.RESUME, policy="keep_last", options=policy)])
    run = run_info()
    resumed_at = min(resumed_at, len(losses) - 1)
    other = Router(pm, world.catalog, bindings, run_info(lineage="OTHER"), required=frozenset({Role.RESUME})).open()
    other.emit(Role.RESUME, step=1000, payload=Payload(parts={}), metrics={"eval_loss": -1.0})
    other.close()
    router = Router(pm, world.catalog, bindings, run, required=frozenset({Role.RESUME}),
                    protected=frozenset({(run.name, resumed_at)})).open()
    sink = None
    for step, loss in enumerate(losses):
        router.emit(Role.RESUME, step=step, payload=Payload(parts={}),
                    metrics={} if loss is None else {"eval_loss": loss})
        router.wait()
        sink = world.instances[("alpha", Role.RESUME)]
        manifests = [m for _, m in sink.committed()]
        left = {m.step for m in manifests}
        mine = [m for m in manifests if m.lineage == run.lineage]
        assert step in left and 1000 in left
        if resumed_at <= step:
            assert resumed_at in left
        # the best k of everything saved so far are still there (best ones are never deleted)
        emitted = [(s, x) for s, x in enumerate(losses[: step + 1]) if x is not None]
        ranked = sorted(emitted, key=lambda sx: ((sx[1] if mode == "min" else -sx[1]), -sx[0]))[:k]
        assert {s for s, _ in ranked} <= left
        assert {m.step for m in best(mine, "eval_loss", mode, k)} == {s for s, _ in ranked}
        expected = set(range(max(0, step + 1 - keep), step + 1)) | {s for s, _ in ranked} | {1000}
        if resumed_at <= step:
            expected.add(resumed_at)
        assert left == expected
    router.close()


@settings(max_examples=300, deadline=None)
@given(steps=st.integers(1, 400), interval=st.integers(0, 50), keep=st.integers(1, 8),
       every=st.integers(0, 60))
def test_dry_run_estimate_retains_exactly_what_keep_last_leaves(steps, interval, keep, every):
    """The storage estimate's retained count equals what the policy really leaves after the
    run's saves (every save_interval steps, plus the last step)."""
    from wmtp_core.report import estimate
    from wmtp_plugins.retention import KeepLast

    saved = list(range(interval, steps + 1, interval)) if interval else []
    if not saved or saved[-1] != steps:
        saved.append(steps)
    policy = KeepLast(keep_last=keep, keep_every=every)
    left = set()
    for s in saved:
        left.add(s)
        manifests = [Manifest(run="r", step=x, role=Role.RESUME, lineage="L", files=[ENTRY],
                              created_at="2026-01-01T00:00:00+00:00") for x in sorted(left)]
        left -= set(policy.select(manifests))
    e = estimate(10, steps, interval, keep, every, True)
    assert e.saves == len(saved)
    assert e.retained == len(left) * e.per_save


@settings(max_examples=40, deadline=None)
@given(keep=st.integers(1, 3), plan=st.lists(st.booleans(), min_size=1, max_size=10))
def test_retention_never_counts_nor_deletes_a_quarantined_checkpoint(keep, plan):
    """On the real local sink: saves, some of them then found corrupt and quarantined (``True``
    in ``plan``). After every prune, keep_last has kept exactly the newest ``keep`` checkpoints
    that are still committed (a quarantined one is not counted), and every quarantined
    checkpoint is still there, byte for byte."""
    import tempfile
    from pathlib import Path

    from wmtp_core.plugins import build_catalog

    pm = make_plugin_manager()
    with tempfile.TemporaryDirectory() as d:
        bindings = Bindings(sinks=[SinkBinding(role=Role.RESUME, sink="local", base_path=f"file://{d}")],
                            policies=[PolicyBinding(role=Role.RESUME, policy="keep_last",
                                                    options={"keep_last": keep})])
        router = Router(pm, build_catalog(pm), bindings, run_info(), required=frozenset({Role.RESUME})).open()
        sink = router._sinks[Role.RESUME]
        alive, aside = [], {}
        for step, corrupt in enumerate(plan, start=1):
            receipt = router.emit(Role.RESUME, step=step, payload=Payload(parts={"state": {"step": step}}))
            router.wait()
            alive = (alive + [step])[-keep:]  # quarantined ones are not counted
            assert sorted(m.step for _, m in sink.committed()) == alive
            if corrupt:
                moved = Path(sink.quarantine(receipt.uri, "a flipped byte"))
                aside[moved] = {p.name: p.read_bytes() for p in moved.iterdir()}
                alive.remove(step)
                assert sorted(m.step for _, m in sink.committed()) == alive
            for moved, files in aside.items():  # never deleted, never changed
                assert {p.name: p.read_bytes() for p in moved.iterdir()} == files
        router.close()
        assert len(list(Path(d).glob("*/step_*.quarantined-*"))) == sum(plan)
