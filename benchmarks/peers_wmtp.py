"""The WMTP side of the peers benchmark (issue 21): ``python benchmarks/peers_wmtp.py SPEC.json``.

Trains the shared workload (``peers_workload.py``) with WMTP's defaults: a config and a recipe
are written under the spec's ``workdir`` and ``python -m wmtp_core.run --config c.yaml --recipe
r.yaml --run-name peers [--resume latest]`` runs in this process (``wmtp_core.run.main``), with
one plugin that records where the run started. Resume state goes to ``checkpoint_uri`` (the
``local`` sink, or the ``s3`` sink for an ``s3://`` URI), the final model is registered through
WMTP's default final sink (``mlflow_registry``, as ``wmtp_baseline-mtp``) in the spec's sqlite
store, whose experiment is created first with the spec's artifact location.

Each save's stall is the time ``RunSession._checkpoint`` blocks the training loop (the resume
payload copied, stored, committed); ``kill_during_save`` SIGKILLs at a random moment of that
save (``peers_workload.KillDuringSave``). ``final_weights``: the module's full state (base and
heads) of the last committed resume checkpoint, the one the final model was made from.
"""

from __future__ import annotations

import io
import os
import sys
import time
from pathlib import Path

T0 = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers_workload as w  # noqa: E402

RUN = "peers"


def config(spec: dict, model: str) -> dict:
    """``c.yaml``: where things are and where they go."""
    uri = spec["checkpoint_uri"]
    base = uri if uri.startswith("s3://") else f"file://{os.path.abspath(uri)}"
    checkpoints = {"base_path": base, "save_interval": spec["save_every"], "keep_last": spec["keep_last"]}
    if spec.get("keep_best"):
        checkpoints["keep_best"] = {"k": 1, "monitor": "eval_loss", "mode": "min"}
    return {
        "seed": spec.get("seed", w.SEED),
        "log_interval": spec["save_every"] if spec.get("keep_best") else spec["steps"],
        "paths": {"models": {"base": model}, "datasets": {"mbpp": str(w.MBPP)}, "checkpoints": checkpoints},
        "mlflow": {"experiment": w.experiment_name(spec), "tracking_uri": spec["mlflow_tracking_uri"]},
    }


def recipe(spec: dict) -> dict:
    """``r.yaml``: the workload's model, data and optimiser (AdamW, torch's defaults, constant LR)."""
    rows = {"max_length": w.MAX_LENGTH, "batch_size": w.BATCH, "pack_sequences": False}
    return {
        "run": {"name": RUN},
        "train": {"algo": "baseline-mtp", "max_steps": spec["steps"], "num_epochs": 1000},
        "optim": {"lr": w.LR, "betas": [0.9, 0.999], "weight_decay": 0.01, "grad_clip": 0.0,
                  "scheduler": "constant", "warmup_ratio": 0.0},
        "data": {"train": {"sources": ["mbpp:train"], **rows}, "eval": {"sources": ["mbpp:validation"], **rows}},
        "model": {"n_future": w.N_FUTURE, "head": w.HEAD},
    }


class Started:
    """Records the step the run started from (``None``: it started fresh)."""

    def __init__(self) -> None:
        self.start_step: int | None = None
        self.resumed_from: str | None = None

    def hook(self):
        from wmtp_core import hookimpl

        owner = self

        class Plugin:
            @hookimpl
            def wmtp_run_started(self, event):
                owner.start_step = event.start_step
                owner.resumed_from = event.run.resumed_from

        return Plugin()


def timed_saves(killer: w.KillDuringSave) -> None:
    """Every real save of ``RunSession._checkpoint`` timed (and killed, for save ``k``); a call
    that saves nothing (the step is saved already) is not a save."""
    from wmtp_core.roles import Role
    from wmtp_core.session import RunSession

    original = RunSession._checkpoint
    timed = killer.wrap(original)

    def checkpoint(self, trainer, router, step, metrics, why):
        if not router.bound(Role.RESUME) or self.last_saved == step:
            return None
        return timed(self, trainer, router, step, metrics, why)

    RunSession._checkpoint = checkpoint


def store(spec: dict):
    from wmtp_core.commit import CheckpointStore

    uri = spec["checkpoint_uri"]
    return CheckpointStore.from_url(uri if uri.startswith("s3://") else f"file://{os.path.abspath(uri)}",
                                    skip_instance_cache=True)


class _State:
    """What ``save_weights`` needs of a module: its state dict."""

    def __init__(self, weights: dict) -> None:
        self.weights = weights

    def state_dict(self) -> dict:
        return self.weights


def last_state(spec: dict) -> tuple[int | None, str | None, list[str]]:
    """The newest committed resume checkpoint of the run: its step, its weights written as one
    safetensors file (base and heads, as ``save_weights`` writes a module's), and every file of
    the run's resume state."""
    import torch

    s = store(spec)
    committed = sorted(s.list(RUN), key=lambda pm: pm[1].step)
    files = sorted(s.uri(p) for p in s.fs.find(s.run_dir(RUN)))
    if not committed:
        return None, None, files
    path, manifest = committed[-1]
    with s.fs.open(f"{path.rstrip('/')}/model.pt", "rb") as f:
        weights = torch.load(io.BytesIO(f.read()), weights_only=True, map_location="cpu")
    out = os.path.join(spec["workdir"], "final_weights.safetensors")
    return manifest.step, w.save_weights(_State(weights), out), files


def write_yaml(path: str, data: dict) -> None:
    import yaml

    with open(path, "w") as f:
        yaml.safe_dump(data, f, sort_keys=False)


def run(spec: dict) -> dict:
    """Runs WMTP once as the spec says; the result's fields."""
    from wmtp_core.run import main

    work = spec["workdir"]
    os.makedirs(work, exist_ok=True)
    os.chdir(work)
    model = w.model_folder(spec)  # built before the byte count starts (the same for every side)
    write_yaml("c.yaml", config(spec, model))
    write_yaml("r.yaml", recipe(spec))
    w.ensure_experiment(spec)  # created with the spec's artifact location: WMTP logs there
    killer = w.KillDuringSave(spec.get("kill_during_save"), spec.get("kill_seed") or 0)
    timed_saves(killer)
    started = Started()
    args = ["--config", "c.yaml", "--recipe", "r.yaml", "--run-name", RUN]
    if spec.get("resume"):
        args += ["--resume", "latest"]
    io0 = w.io_write_bytes()
    code = main(args, plugins=(started.hook(),))
    step, weights, files = last_state(spec)
    wall, written = time.perf_counter() - T0, w.io_write_bytes() - io0
    return {"stalls": killer.durations, "wall_s": wall, "io_write_bytes": written,
            "resumed_from_step": started.start_step or None if spec.get("resume") else None,
            "final_step": step, "final_weights": weights, "registered_model_uri": registered(spec),
            "checkpoint_files": files, "error": None if code == 0 else f"wmtp exited {code}",
            "notes": notes(started)}


def registered(spec: dict) -> str | None:
    """The newest registered version of ``wmtp_baseline-mtp`` in the spec's store."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=spec["mlflow_tracking_uri"], registry_uri=spec["mlflow_tracking_uri"])
    try:
        versions = client.search_model_versions("name='wmtp_baseline-mtp'")
    except Exception:  # noqa: BLE001 (no registry: nothing registered)
        return None
    if not versions:
        return None
    return f"models:/wmtp_baseline-mtp/{max(int(v.version) for v in versions)}"


def notes(started: Started) -> list[str]:
    out = ["WMTP registers the final model as wmtp_<algo> (wmtp_baseline-mtp); the spec's register_name "
           "is not a WMTP setting"]
    if started.resumed_from:
        out.append(f"resumed from {started.resumed_from} (step {started.start_step})")
    return out


def main(argv: list[str]) -> int:
    spec = w.read_spec(argv[0])
    try:
        fields = run(spec)
    except Exception as e:  # noqa: BLE001 (the result says what went wrong, in one line)
        fields = {"error": w.one_line(e)}
    w.write_result(spec["result"], **fields)
    return 0 if fields.get("error") is None else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
