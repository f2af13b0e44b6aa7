"""One test per hook, named after it, against a real (tiny) training run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from builders import merge, recipe, write

from wmtp_core import PolicySpec, Role, SinkSpec, hookimpl
from wmtp_core.errors import BindingError
from wmtp_core.plugins import build_catalog, make_plugin_manager
from wmtp_core.run import main

RECIPE = recipe(6, run={"name": "hooks-run", "tags": ["unit"]}, train={"algo": "baseline-mtp"},
                optim={"lr": 0.003, "scheduler": "constant", "warmup_ratio": 0.0},
                model={"max_seq_len": 64})


def config(base: Path, keep_last=1, save_interval=2, mlflow=None, **over) -> dict:
    return merge({
        "seed": 7,
        "log_interval": 2,
        "paths": {"checkpoints": {"base_path": f"file://{base}", "save_interval": save_interval,
                                  "keep_last": keep_last, "save_final": True}},
        "mlflow": mlflow,
    }, over)


class Recorder:
    def __init__(self):
        self.calls: dict[str, list] = {}

    def _add(self, hook, value):
        self.calls.setdefault(hook, []).append(value)

    @hookimpl
    def wmtp_run_started(self, event):
        self._add("run_started", event)

    @hookimpl
    def wmtp_step_ended(self, event):
        self._add("step_ended", event)

    @hookimpl
    def wmtp_resume_checkpoint_emitted(self, event):
        self._add("resume_emitted", event)

    @hookimpl
    def wmtp_final_model_emitted(self, event):
        self._add("final_emitted", event)

    @hookimpl
    def wmtp_checkpoint_committed(self, receipt):
        # the manifest exists at the moment the hook is called
        self._add("committed", (receipt, (Path(receipt.uri) / "manifest.json").exists()))

    @hookimpl
    def wmtp_checkpoint_deleted(self, receipt):
        self._add("deleted", receipt)

    @hookimpl
    def wmtp_run_ended(self, event):
        self._add("run_ended", event)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hooks")
    write(tmp / "config.yaml", config(tmp / "ckpt"))
    write(tmp / "recipe.yaml", RECIPE)
    rec = Recorder()
    code = main(["--config", str(tmp / "config.yaml"), "--recipe", str(tmp / "recipe.yaml")],
                plugins=(rec,))
    assert code == 0
    return rec, tmp


def test_wmtp_register_sinks():
    pm = make_plugin_manager(entry_points=False)

    class P:
        @hookimpl
        def wmtp_register_sinks(self, register):
            register(SinkSpec(name="tape", roles={"resume"}, factory=object, protocols=("tape",)))

    pm.register(P(), name="p")
    catalog = build_catalog(pm)
    assert catalog.sinks["tape"].roles == frozenset({Role.RESUME})
    assert catalog.sink_for_protocol("tape").name == "tape"
    with pytest.raises(TypeError):
        catalog.sinks["x"] = None  # read-only view

    class Twice:
        @hookimpl
        def wmtp_register_sinks(self, register):
            register(SinkSpec(name="tape", roles={"final"}, factory=object))

    pm.register(Twice(), name="twice")
    with pytest.raises(BindingError, match="two plugins register a sink named 'tape'"):
        build_catalog(pm)


def test_wmtp_register_sinks_refuses_unknown_role():
    with pytest.raises(BindingError, match="'checkpoint' is not a role; accepted: resume, final"):
        SinkSpec(name="x", roles={"checkpoint"}, factory=object)


def test_wmtp_register_policies():
    pm = make_plugin_manager()  # the installed built-ins
    catalog = build_catalog(pm)
    assert catalog.policies["keep_last"].roles == frozenset({Role.RESUME})
    assert {"local", "mlflow_registry"} <= set(catalog.sinks)
    assert catalog.sinks["mlflow_registry"].roles == frozenset({Role.FINAL})

    class P:
        @hookimpl
        def wmtp_register_policies(self, register):
            register(PolicySpec(name="keep_last", roles={"resume"}, factory=dict))

    pm.register(P(), name="dup")
    with pytest.raises(BindingError, match="policy named 'keep_last'"):
        build_catalog(pm)


def test_misspelt_hook_fails_loudly():
    pm = make_plugin_manager(entry_points=False)

    class Typo:
        @hookimpl
        def wmtp_step_end(self, event):
            pass

    pm.register(Typo())
    with pytest.raises(Exception, match="wmtp_step_end"):
        pm.check_pending()


def test_wmtp_run_started(recorded):
    rec, tmp = recorded
    (event,) = rec.calls["run_started"]
    assert event.run.name == "hooks-run"
    assert event.bindings == {"resume": "local", "final": "local"}
    assert event.params["recipe.train.algo"] == "baseline-mtp"
    assert event.params["config.paths.checkpoints.keep_last"] == 1
    assert event.run.tags == {"unit": "true"}
    assert event.start_step == 0


def test_wmtp_step_ended(recorded):
    rec, _ = recorded
    steps = rec.calls["step_ended"]
    assert [e.step for e in steps] == [1, 2, 3, 4, 5, 6]
    for e in steps:
        assert {"loss", "lr", "ce_head_0", "ce_head_1"} <= set(e.metrics)
    assert all("eval_loss" in e.metrics for e in steps if e.step % 2 == 0)


def test_wmtp_resume_checkpoint_emitted(recorded):
    rec, _ = recorded
    events = rec.calls["resume_emitted"]
    assert [e.step for e in events] == [2, 4, 6]
    for e in events:
        assert e.role is Role.RESUME
        assert e.parts == ("model", "optimizer", "trainer")
        assert e.nbytes > 0
        assert not hasattr(e, "payload")  # observers never get the bytes


def test_wmtp_final_model_emitted(recorded):
    rec, tmp = recorded
    (event,) = rec.calls["final_emitted"]
    assert event.role is Role.FINAL and event.step == 6
    assert event.resume_location == str(tmp / "ckpt" / "hooks-run")
    assert "loss" in event.metrics


def test_wmtp_checkpoint_committed(recorded):
    rec, tmp = recorded
    committed = rec.calls["committed"]
    assert [(r.role, r.step) for r, _ in committed] == [
        (Role.RESUME, 2), (Role.RESUME, 4), (Role.RESUME, 6), (Role.FINAL, 6)]
    assert all(manifest_existed for _, manifest_existed in committed)
    final = committed[-1][0]
    manifest = json.loads((Path(final.uri) / "manifest.json").read_text())
    assert manifest["role"] == "final"
    assert {f["path"] for f in manifest["files"]} == {"model.pt", "model_config.json"}
    assert final.nbytes == sum(f["size"] for f in manifest["files"])


def test_wmtp_checkpoint_deleted(recorded):
    rec, tmp = recorded
    deleted = rec.calls["deleted"]
    assert sorted(r.step for r in deleted) == [2, 4]
    for r in deleted:
        assert not Path(r.uri).exists()
    left = sorted(p.name for p in (tmp / "ckpt" / "hooks-run").iterdir())
    assert left == ["final", "step_6"]


def test_wmtp_run_ended(recorded):
    rec, _ = recorded
    (event,) = rec.calls["run_ended"]
    assert event.status == "finished"
    assert event.last_step == 6
    assert [(r.role, r.step) for r in event.receipts] == [
        (Role.RESUME, 2), (Role.RESUME, 4), (Role.RESUME, 6), (Role.FINAL, 6)]


def test_wmtp_load_model(recorded):
    """A plugin resolves its own URIs; committed checkpoints fall back to the core, verified."""
    import torch

    from wmtp_core import LoadedModel, ModelLoadError
    from wmtp_core.engine.trainer import resolve_model
    from wmtp_core.session import model_loader

    rec, tmp = recorded
    final = tmp / "ckpt" / "hooks-run" / "final"
    weights = torch.load(final / "model.pt", weights_only=True)
    config = json.loads((final / "model_config.json").read_text())

    class Zoo:
        @hookimpl
        def wmtp_load_model(self, uri, mlflow_config):
            if uri.startswith("zoo:"):
                return LoadedModel(weights=weights, model_config=config, source=uri)
            return None

    pm = make_plugin_manager()
    pm.register(Zoo(), name="zoo")
    load = model_loader(pm, {})
    from_zoo = resolve_model(load, "zoo:tiny", "paths.models.ref")
    # no plugin claims a path: the core's own implementation (trylast) reads the checkpoint
    from_ckpt = resolve_model(load, f"file://{final}", "paths.models.ref")
    from_step = resolve_model(load, str(tmp / "ckpt" / "hooks-run" / "step_6"), "paths.models.ref")
    for model in (from_zoo, from_ckpt, from_step):
        assert not any(p.requires_grad for p in model.parameters())
        for k, v in model.state_dict().items():
            assert torch.equal(v, weights[k])
    with pytest.raises(ModelLoadError, match="paths.models.ref: '.*step_404' does not exist"):
        resolve_model(load, str(tmp / "ckpt" / "hooks-run" / "step_404"), "paths.models.ref")
