"""Bit-exact resume: a run SIGKILLed at a step and resumed equals the uninterrupted run,
for every algorithm, and continues the same MLflow run."""

from __future__ import annotations

import contextlib
import io
import signal
from pathlib import Path

import pytest
import torch
import zygote
from builders import recipe, write
from conftest import KILLER, mlflow_environment_restored

pytestmark = pytest.mark.slow


def recipe_of(algo: str, mode: str, max_steps: int = 12) -> dict:
    return recipe(
        max_steps,
        run={"tags": ["resume-test"]},
        train={"algo": algo},
        optim={"lr": 0.003, "scheduler": "cosine", "warmup_ratio": 0.1},
        model={"n_future": 3, "dropout": 0.1},
        rho1={"selection_mode": mode, "skip_threshold_percentile": 0.3, "min_ce_diff": 0.01},
        pretrain={"enabled": True, "max_steps": 3},
        critic={"discount_lambda": 0.9, "auxiliary_loss_coef": 0.1},
    )


def config(base: Path, store: Path) -> dict:
    return {
        "seed": 11,
        "log_interval": 3,
        "paths": {
            "models": {"ref": "models:/wmtp_baseline-mtp/1"},
            "checkpoints": {"base_path": f"file://{base}", "save_interval": 4, "keep_last": 2},
        },
        "mlflow": {"experiment": "resume", "tracking_uri": f"sqlite:///{store}"},
        "storage": {"final": {"sink": "local"}},
    }


CASES = {
    "baseline-mtp": ("baseline-mtp", "weighted", 10),
    "rho1-weighted": ("rho1-wmtp", "weighted", 6),
    "rho1-token_skip": ("rho1-wmtp", "token_skip", 9),
    "critic-wmtp": ("critic-wmtp", "weighted", 5),
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """An MLflow store where a baseline run registered wmtp_baseline-mtp version 1."""
    from wmtp_core.run import main

    tmp = tmp_path_factory.mktemp("store")
    write(tmp / "c.yaml", {
        "seed": 1,
        "paths": {"checkpoints": {"base_path": f"file://{tmp}/ref", "save_interval": 0}},
        "mlflow": {"experiment": "ref", "tracking_uri": f"sqlite:///{tmp}/mlflow.db"},
    })
    write(tmp / "r.yaml", recipe_of("baseline-mtp", "weighted", max_steps=6))
    out, err = io.StringIO(), io.StringIO()
    # module scope: no monkeypatch or capsys fixture, and set up before the first test's autouse
    # fixture saves the MLFLOW_* environment, so it restores that environment itself
    with pytest.MonkeyPatch.context() as mp, mlflow_environment_restored(), \
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        mp.chdir(tmp)
        code = main(["--config", "c.yaml", "--recipe", "r.yaml", "--run-name", "ref"])
    assert code == 0, err.getvalue()[-3000:]
    assert "models:/wmtp_baseline-mtp/1" in out.getvalue()
    return tmp


def kill_at(step: int, args: list[str], cwd: Path):
    return zygote.run(["-c", KILLER, str(step), *args], cwd=cwd, timeout=300)


def final_weights(base: Path, run: str) -> dict:
    return torch.load(base / run / "final" / "model.pt", weights_only=True)


def history(base: Path, run: str, step: int) -> list[float]:
    return torch.load(base / run / f"step_{step}" / "trainer.pt", weights_only=True)["losses"]


def in_process(args, cwd, monkeypatch, capsys):
    """The same entry point as the command line, in this process (saves the import time)."""
    from wmtp_core.run import main

    monkeypatch.chdir(cwd)
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("case", list(CASES))
def test_sigkill_and_resume_is_bit_exact(store, tmp_path, case, monkeypatch, capsys):
    algo, mode, kill_step = CASES[case]
    base = tmp_path / "ckpt"
    write(tmp_path / "c.yaml", config(base, store / "mlflow.db"))
    write(tmp_path / "r.yaml", recipe_of(algo, mode))
    common = ["--config", "c.yaml", "--recipe", "r.yaml"]

    code, _, err = in_process([*common, "--run-name", "full"], tmp_path, monkeypatch, capsys)
    assert code == 0, err[-3000:]

    cut = kill_at(kill_step, [*common, "--run-name", "cut"], cwd=tmp_path)
    assert cut.returncode == -signal.SIGKILL, cut.stderr[-3000:]
    assert not (base / "cut" / "final").exists()

    code, _, err = in_process([*common, "--run-name", "cut", "--resume", "latest"], tmp_path,
                              monkeypatch, capsys)
    assert code == 0, err[-3000:]
    last_ckpt = (kill_step // 4) * 4
    assert f"step_{last_ckpt}" in err, "did not resume from the newest committed checkpoint"

    a, b = final_weights(base, "full"), final_weights(base, "cut")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    losses_full, losses_cut = history(base, "full", 12), history(base, "cut", 12)
    assert len(losses_full) == 12
    assert losses_full == losses_cut, "per-step losses differ after resume"
    assert min(losses_full[-3:]) < losses_full[0], "the loss did not go down"

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    exp = client.get_experiment_by_name("resume")
    runs = client.search_runs([exp.experiment_id], f"tags.`wmtp.run` = 'cut' and tags.`wmtp.algo` = '{algo}'")
    mine = [r for r in runs if r.data.tags.get("wmtp.lineage") and
            Path(r.data.tags.get("wmtp.latest_resume", "")).parent == base / "cut"]
    assert len(mine) == 1, "the resumed run did not continue its MLflow run"
    assert mine[0].data.tags["wmtp.resumed_from"].endswith(f"step_{last_ckpt}")


# ------------------------------------------------------------------------------ training further
@pytest.mark.parametrize("final", ["mlflow_registry", "local"])
def test_a_run_trained_further_stores_its_new_final_model_and_one_that_trained_nothing_stores_none(
        final, tmp_path, monkeypatch, capsys):
    """Six steps, stored; the same command again (nothing new: nothing stored); then ten steps
    with --resume latest: the weights of step 10 are the final model, superseding step 6's."""
    import mlflow

    from wmtp_core.run import main

    store = f"sqlite:///{tmp_path}/mlflow.db"
    write(tmp_path / "c.yaml", {"seed": 2, "paths": {"checkpoints": {"base_path": f"file://{tmp_path}/ck",
                                                                      "save_interval": 3, "keep_last": 2}},
                                "mlflow": {"experiment": "further", "tracking_uri": store},
                                "storage": {"final": {"sink": final}}})
    monkeypatch.chdir(tmp_path)

    def run(steps: int, *extra: str) -> str:
        write(tmp_path / "r.yaml", recipe(steps))
        code = main(["--config", "c.yaml", "--recipe", "r.yaml", "--run-name", "f", *extra])
        out, err = capsys.readouterr()
        assert code == 0, err[-3000:]
        return " ".join((out + err).split())

    run(6)
    client = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)
    first = "models:/wmtp_baseline-mtp/1" if final == "mlflow_registry" else f"{tmp_path}/ck/f/final"
    # the dry run says which of the two the run will do, and writes nothing
    assert (f"final model: step 6 is already stored at {first}; the run ends at step 6 and stores no new "
            "final model") in run(6, "--resume", "latest", "--dry-run")
    assert (f"final model: step 6 is stored at {first}; resuming from step 6, the run trains to step 10 and "
            "stores a new final model that supersedes it") in run(10, "--resume", "latest", "--dry-run")
    again = run(6, "--resume", "latest")
    assert f"the final model of 'f' (step 6) is already stored at {first}; not storing it again" in again
    further = run(10, "--resume", "latest")
    assert (f"the run trained past step 6 of its final model at {first}: storing the final model of step 10, "
            "which supersedes it") in further
    if final == "mlflow_registry":
        versions = {str(v.version): v for v in client.search_model_versions("name='wmtp_baseline-mtp'")}
        assert sorted(versions, key=int) == ["1", "2"], "the old version stays, the new one is added"
        assert versions["1"].tags["wmtp.step"] == "6" and "wmtp.supersedes" not in versions["1"].tags
        assert versions["2"].tags["wmtp.step"] == "10" and versions["2"].tags["wmtp.supersedes"] == first
    else:
        import json

        manifest = json.loads((tmp_path / "ck" / "f" / "final" / "manifest.json").read_text())
        assert manifest["step"] == 10 and manifest["meta"]["supersedes"] == first
        trained = torch.load(tmp_path / "ck" / "f" / "final" / "model.pt", weights_only=True)
        resumed = torch.load(tmp_path / "ck" / "f" / "step_10" / "model.pt", weights_only=True)
        assert all(torch.equal(trained[k], resumed[k]) for k in trained), "the final model is step 10's"
    # and the same command once more stores nothing
    assert "(step 10) is already stored" in run(10, "--resume", "latest")
