"""Campaign scenario: signals at awkward moments (issue 18, item 10).

Chains of real runs (``python -m wmtp_core.run``'s own entry: handlers installed before
``main``, kept until the process exits), each launch the same command with ``--resume auto`` as
a scheduler reruns it, with a real MLflow sqlite store and registry, so that the run has every
phase: reading the configuration, start-up, the resume's verification, training and its saves,
the final model's registration, the run's end and the process's exit. Each launch gets a
SIGTERM, SIGUSR1 or SIGINT a random time after it began, within the length of the shortest whole
run seen, and in half the launches a second signal 0.05 s after the first, or a random time
later.

Counted for each launch: a traceback, a hang (no exit within 240 s), an exit status other than
0, 4 (with its ``preempted`` line) or 130 (with its one ``error: interrupted`` line), a lease
left behind, a ``PENDING`` logged model left in the MLflow store, a committed checkpoint lost
(gone while retention would have kept it) or torn (no longer verifying). A chain ends when a
launch finishes (exit 0); it must then have stored its final model.

    uv run python benchmarks/hostile_signals.py [--rounds N]
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from faults import Tally, standalone, in_child  # noqa: E402

HANG_S = 240.0
KEEP_LAST = 2
SIGNALS = [(signal.SIGTERM, 0.6), (signal.SIGUSR1, 0.15), (signal.SIGINT, 0.25)]
LAUNCHES_PER_ROUND = 6


def _files(work: Path, steps: int) -> list[str]:
    store = f"sqlite:///{work}/mlflow.db"
    config = {"seed": 5, "log_interval": 4, "mlflow": {"experiment": "signals", "tracking_uri": store},
              "paths": {"checkpoints": {"base_path": f"file://{work}/ck", "save_interval": 2, "keep_last": KEEP_LAST}}}
    recipe = {"train": {"max_steps": steps}, "optim": {"lr": 0.003, "scheduler": "cosine", "warmup_ratio": 0.1},
              "data": {"train": {"sources": ["stdlib"], "max_length": 32, "batch_size": 4}},
              "model": {"d_model": 64, "n_layers": 2, "n_heads": 2, "n_future": 2, "max_seq_len": 32}}
    (work / "c.yaml").write_text(yaml.safe_dump(config))
    (work / "r.yaml").write_text(yaml.safe_dump(recipe))
    return ["--config", "c.yaml", "--recipe", "r.yaml"]


def _spawn(args: list[str], cwd: Path, err: Path) -> int:
    """``python -m wmtp_core.run ARGS`` in a forked process of its own (what its ``__main__``
    does: the handlers first, kept until the process exits); returns its PID."""
    pid = os.fork()
    if pid:
        return pid
    code = 70
    try:
        os.setsid()
        os.dup2(os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        os.chdir(cwd)
        from wmtp_core.preemption import Preemption
        from wmtp_core.run import leave, main

        leave(main(args, signals=Preemption().install()))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 - counted as a traceback
        import traceback

        traceback.print_exc()
        code = 71
    finally:
        sys.stderr.flush()
        os._exit(code)


def _wait(pid: int, until: float) -> int | None:
    while time.monotonic() < until:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    return None


def _launch(args: list[str], work: Path, plan: list[tuple[float, int]]) -> tuple[int | None, str, float, list[str]]:
    """One launch with the signals of ``plan`` (seconds after its start, signal); returns its
    exit status (``None``: hung, then killed), its stderr, its length and what was sent."""
    err = work / "launch.err"
    t0 = time.monotonic()
    pid = _spawn(args, work, err)
    sent, code = [], None
    for at, sig in plan:
        code = _wait(pid, t0 + at)
        if code is not None:
            break
        os.kill(pid, sig)
        sent.append(f"{signal.Signals(sig).name} at {time.monotonic() - t0:.2f} s")
    if code is None:
        code = _wait(pid, t0 + HANG_S)
    if code is None:
        os.killpg(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    return code, err.read_text(errors="replace"), time.monotonic() - t0, sent


def _look(work: Path, run: str) -> dict:
    """In a child: the committed steps of ``run`` and whether each verifies, whether its lease
    is there, the MLflow store's logged models by status, and its registered versions."""

    def look():
        import mlflow

        from wmtp_core.commit import CheckpointState, CheckpointStore

        store = CheckpointStore.from_url(f"file://{work}/ck")
        steps = {}
        for i in store.inspect(run):
            if i.state is CheckpointState.COMMITTED:
                try:
                    store.verify(i.path)
                    steps[i.manifest.step] = True
                except Exception:  # noqa: BLE001 - counted as torn
                    steps[i.manifest.step] = False
        client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{work}/mlflow.db")
        experiment = client.get_experiment_by_name("signals")
        statuses: dict[str, int] = {}
        if experiment is not None:
            for m in client.search_logged_models(experiment_ids=[experiment.experiment_id]):
                statuses[str(m.status)] = statuses.get(str(m.status), 0) + 1
        versions = len(client.search_model_versions("name='wmtp_baseline-mtp'")) if experiment else 0
        return {"steps": steps, "lease": (work / "ck" / run / ".wmtp-lease").exists(), "models": statuses,
                "versions": versions}

    return in_child(look)


def _plan(rng: random.Random, length: float) -> list[tuple[float, int]]:
    def pick() -> int:
        return rng.choices([s for s, _ in SIGNALS], weights=[w for _, w in SIGNALS])[0]

    first = rng.uniform(0.1, length)
    plan = [(first, pick())]
    if rng.random() < 0.5:
        plan.append((first + (0.05 if rng.random() < 0.5 else rng.uniform(0.0, 2.0)), pick()))
    return plan


def _judge(code: int | None, err: str, sent: list[str]) -> str | None:
    """What is wrong with how a launch ended (``None``: nothing)."""
    lines = err.strip().splitlines()
    if code is None:
        return "hang"
    if "Traceback" in err:
        return "traceback"
    if code == 4 and not any(line.startswith("preempted") for line in lines[-3:]):
        return "exit 4 without its preempted line"
    if code == 130 and [line for line in lines if line.startswith("error:")] != [
            "error: interrupted (Ctrl-C): committed checkpoints are intact; continue with --resume latest"]:
        return "exit 130 without its one line"
    if code not in (0, 4, 130):
        return f"exit {code}"
    return None


def _lost(before: dict[int, bool], after: dict[int, bool]) -> list[int]:
    """Committed steps gone that retention would have kept (the newest KEEP_LAST of those now
    committed, and every step newer than the oldest kept one)."""
    kept = sorted(after)[-KEEP_LAST:]
    return [s for s in before if s not in after and (not kept or s >= kept[0])]


def scenario_hostile_signals(rounds: int, out: Path, rng: random.Random, log) -> list[Tally]:
    tally = Tally("signals at random moments (single and double)")
    counts = {"wrong exit statuses": 0, "leases left": 0, "PENDING models left": 0, "chains without a final model": 0}
    import mlflow  # noqa: F401 - imported once here, not in every forked launch (imports only)

    work = Path(tempfile.mkdtemp(prefix="wmtp-signals-", dir=out))
    args = _files(work, steps=12)
    code, err, length, _ = _launch([*args, "--run-name", "reference"], work, [])
    if code != 0:
        tally.bad(f"the reference run failed: exit {code}: {err[-500:]}")
        return [tally]
    chain = 0
    for _ in range(rounds * LAUNCHES_PER_ROUND):
        run = f"chain{chain}"
        before = _look(work, run)
        plan = _plan(rng, length)
        code, err, took, sent = _launch([*args, "--run-name", run, "--resume", "auto"], work, plan)
        if code == 0 and not sent:  # a whole run, from a fresh start or a resume: the range to aim in
            length = min(length, took)
        after = _look(work, run)
        tally.tried += 1
        ok = True
        problem = _judge(code, err, sent)
        if problem:
            ok = False
            tally.hangs += problem == "hang"
            tally.tracebacks += problem == "traceback"
            counts["wrong exit statuses"] += problem not in ("hang", "traceback")
            tally.bad(f"{run}: {problem} after {', '.join(sent) or 'no signal'}: {err.strip()[-300:]}")
        if after["lease"]:
            ok = False
            counts["leases left"] += 1
            tally.bad(f"{run}: its lease was left behind ({', '.join(sent)})")
        if after["models"].get("PENDING"):
            ok = False
            counts["PENDING models left"] += 1
            tally.bad(f"{run}: a PENDING logged model was left ({', '.join(sent)})")
        lost = _lost(before["steps"], after["steps"])
        torn = [s for s, good in after["steps"].items() if not good]
        tally.lost += len(lost)
        tally.torn += len(torn)
        if lost or torn:
            ok = False
            tally.bad(f"{run}: committed steps lost {lost}, torn {torn} ({', '.join(sent)})")
        tally.survived += ok
        if code == 0:  # the chain's run finished: its final model is registered (and the reference's)
            if after["versions"] < chain + 2:
                counts["chains without a final model"] += 1
                tally.bad(f"{run}: finished without a registered final model")
            chain += 1
        log(f"  signals: {run} exit {code} in {took:.1f} s after {', '.join(sent) or 'no signal'}")
    tally.notes[:0] = [f"{k}: {v}" for k, v in counts.items()]
    shutil.rmtree(work, ignore_errors=True)
    return [tally]


def cli(argv: list[str] | None = None) -> int:
    return standalone(scenario_hostile_signals, "signals", argv)


if __name__ == "__main__":
    sys.exit(cli())
