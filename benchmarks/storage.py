"""Storage benchmarks: the local sink against bare torch, and stored bytes against a trainer
that also copies every checkpoint to MLflow (the origin's behaviour), measured in one run."""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from wmtp_core import Payload, Role, RunInfo, SinkContext
from wmtp_core.events import CheckpointEmitted
from wmtp_plugins.local import LocalSink


def fake_state(size_mb: int) -> dict:
    """A resume state shaped like the real one: weights, two AdamW moments, trainer extras."""
    n = (size_mb << 20) // 4 // 3
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, generator=g)
    return {"model": {"w": w},
            "optimizer": {"state": {0: {"step": torch.tensor(10.0), "exp_avg": torch.randn(n, generator=g),
                                        "exp_avg_sq": torch.rand(n, generator=g)}},
                          "param_groups": [{"lr": 1e-3, "params": [0]}]},
            "trainer": {"step": 10, "rng": torch.get_rng_state()}}


def _scratch(workdir):
    return Path(tempfile.mkdtemp(prefix="wmtp-bench-", dir=workdir))


def _row(name, ours, plain, target, unit="s", lower_is_better=True):
    ratio = ours / plain if plain else float("inf")
    if target is None:  # shown for scale, judged by no target
        met = None
    else:
        met = ratio <= target if lower_is_better else ratio >= target
    fmt = (lambda v: f"{v:.3f} s") if unit == "s" else (lambda v: f"{v / 1e6:.1f} MB")
    return {"name": name, "wmtp": fmt(ours), "plain": fmt(plain), "ratio": ratio,
            "target": "none" if target is None else f"{'<=' if lower_is_better else '>='} {target}", "met": met,
            "wmtp_value": ours, "plain_value": plain}


def _sink(base: Path, run: str) -> LocalSink:
    info = RunInfo(name=run, algo="baseline-mtp", lineage="bench")
    return LocalSink(SinkContext(role=Role.RESUME, run=info, base_path=f"file://{base}"))


def _event(sink, step):
    return CheckpointEmitted(run=sink.context.run, role=Role.RESUME, step=step,
                             parts=("model", "optimizer", "trainer"), nbytes=0)


def bare_save(state, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def bench_save(size_mb: int, repeat: int, workdir=None) -> list[dict]:
    """Save through the local sink (manifest, BLAKE3, fsync) vs torch.save + fsync of the same state."""
    state = fake_state(size_mb)
    root = _scratch(workdir)
    ours, plain = [], []
    try:
        sink = _sink(root / "sink", "save")
        for i in range(repeat):
            # alternate the order so neither side always runs on a warmer disk
            for side in (("ours", "plain") if i % 2 == 0 else ("plain", "ours")):
                t0 = time.perf_counter()
                if side == "ours":
                    sink.store(event=_event(sink, i), payload=Payload(parts=state))
                    ours.append(time.perf_counter() - t0)
                else:
                    bare_save(state, root / f"bare_{i}.pt")
                    plain.append(time.perf_counter() - t0)
            shutil.rmtree(root / "sink" / "save" / f"step_{i}")
            (root / f"bare_{i}.pt").unlink()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return [_row(f"save {size_mb} MB: local sink vs torch.save+fsync",
                 statistics.median(ours), statistics.median(plain), 1.10)]


def _tensors(obj, prefix=""):
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}/{i}")


def materialize(parts, into) -> None:
    """What a resume does with loaded state: copy every tensor into the live model/optimizer.
    (A memory-mapped load is only paid for here, so both sides are measured to this point.)"""
    for key, t in _tensors(parts):
        into[key].copy_(t)


def bench_restore(size_mb: int, repeat: int, workdir=None) -> list[dict]:
    """Verified restore (the digest of every file, then weights_only load) vs bare torch.load."""
    state = fake_state(size_mb)
    root = _scratch(workdir)
    ours, plain = [], []
    try:
        sink = _sink(root / "sink", "restore")
        receipt = sink.store(event=_event(sink, 1), payload=Payload(parts=state))
        bare_save(state, root / "bare.pt")
        into = {id_: torch.empty_like(t) for id_, t in _tensors(state)}
        del state
        for i in range(repeat):
            for side in (("ours", "plain") if i % 2 == 0 else ("plain", "ours")):
                t0 = time.perf_counter()
                if side == "ours":
                    parts = sink.load(receipt.uri).parts
                    materialize(parts, into)
                    ours.append(time.perf_counter() - t0)
                else:
                    parts = torch.load(root / "bare.pt", map_location="cpu", weights_only=True)
                    materialize(parts, into)
                    plain.append(time.perf_counter() - t0)
                del parts
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return [_row(f"restore {size_mb} MB: verified load vs torch.load",
                 statistics.median(ours), statistics.median(plain), 1.15)]


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def bench_bytes(size_mb: int, repeat: int, workdir=None, saves: int = 30, keep_last: int = 5) -> list[dict]:
    """The origin's scenario scaled down: 30 saves, keep_last 5, one final model.

    WMTP: the real router with the local sink, keep_last policy and MLflow registry sink.
    Plain: the origin's trainer, which kept the last 5 in its folder, also logged every
    checkpoint to MLflow as an artifact, and stored the final model three times (folder,
    MLflow artifact, MLflow model). Both write into a real MLflow store (sqlite + files).
    """
    import mlflow

    from wmtp_core.engine.model import ModelConfig, MTPModel
    from wmtp_core.bindings import Bindings, PolicyBinding, SinkBinding
    from wmtp_core.plugins import build_catalog, make_plugin_manager
    from wmtp_core.router import Router

    cfg = ModelConfig(d_model=192, n_layers=2, n_heads=4, n_future=4, max_seq_len=64)
    model = MTPModel(cfg)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 8, dtype=torch.long)).sum().backward()
    opt.step()
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "trainer": {"step": 0}}
    example = torch.zeros(2, 16, dtype=torch.long)
    root = _scratch(workdir)
    cwd = os.getcwd()
    try:
        # --- WMTP
        (root / "wmtp").mkdir()
        os.chdir(root / "wmtp")
        ml = {"experiment": "bench", "tracking_uri": f"sqlite:///{root / 'wmtp' / 'mlflow.db'}"}
        run = RunInfo(name="origin", algo="baseline-mtp", lineage="bench")
        pm = make_plugin_manager()
        base = f"file://{root / 'wmtp' / 'checkpoints'}"
        bindings = Bindings(
            sinks=[SinkBinding(role=Role.RESUME, sink="local", base_path=base),
                   SinkBinding(role=Role.FINAL, sink="mlflow_registry", base_path=base)],
            policies=[PolicyBinding(role=Role.RESUME, policy="keep_last", options={"keep_last": keep_last})])
        router = Router(pm, build_catalog(pm), bindings, run, required=frozenset(Role), mlflow=ml).open()
        for step in range(1, saves + 1):
            router.emit(Role.RESUME, step=step, payload=Payload(parts=state))
        router.wait()
        router.emit(Role.FINAL, step=saves, payload=Payload(parts={"model": state["model"]}, model=model.eval(),
                                                             example_input=example,
                                                             model_config=__import__("attrs").asdict(cfg)))
        router.close()
        ours = _du(root / "wmtp" / "checkpoints") + _du(root / "wmtp" / "mlruns")

        # --- the origin's dual-writing trainer, written plainly
        (root / "plain").mkdir()
        os.chdir(root / "plain")
        mlflow.set_tracking_uri(f"sqlite:///{root / 'plain' / 'mlflow.db'}")
        mlflow.set_experiment("bench")
        folder = root / "plain" / "checkpoints"
        folder.mkdir()
        with mlflow.start_run():
            for step in range(1, saves + 1):
                path = folder / f"checkpoint_step_{step}.pt"
                torch.save(state, path)
                mlflow.log_artifact(str(path), artifact_path="checkpoints")
                for old in sorted(folder.glob("checkpoint_step_*.pt"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))[:-keep_last]:
                    old.unlink()
            final = folder / "final_model.pt"
            torch.save(state, final)
            mlflow.log_artifact(str(final))
            mlflow.pytorch.log_model(model, name="model", input_example=example.numpy(),
                                     pip_requirements=["torch"])
        plain = _du(folder) + _du(root / "plain" / "mlruns")
    finally:
        os.chdir(cwd)
        shutil.rmtree(root, ignore_errors=True)
    return [_row(f"stored bytes: {saves} saves, keep_last {keep_last}, final (vs dual-writing trainer)",
                 ours, plain, 0.15, unit="bytes")]
