"""Evaluation of real checkpoints: a training run whose committed checkpoints are evaluated in the
background (``eval.every: checkpoint``), ranked by ``keep_best`` on pass@1 and chosen by
``final.from: best``; ``wmtp evaluate`` and ``wmtp generate`` on what that run stored; an
evaluation process that dies. The models are the byte-level model, trained a few steps here.

The problems are the test's own, in MBPP's layout: their test is ``assert True``, so a sample
passes when the model's short completion is a valid Python program and fails otherwise. With
sampling (temperature 1, 8 samples of one byte a problem) pass@1 is then a real, checkpoint-dependent
number between 0 and 1, without training a model that writes code. The run trains on letters
only: the more it learns, the more its byte is a letter (a ``NameError``), so its first
checkpoint is its best and ``keep_best`` has to keep something other than the newest."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from builders import recipe, write
from conftest import mlflow_environment_restored

from wmtp_core import Role, hookimpl
from wmtp_core.cli import main as wmtp

pytestmark = pytest.mark.slow
METRIC = "eval/mbpp/pass_at_1"
SAMPLING = {"n": 8, "temperature": 1.0, "max_new_tokens": 1}


def _layout(tmp: Path, eval_section: dict, final: dict | None = None, **checkpoints) -> None:
    (tmp / "mbpp").mkdir()
    (tmp / "mbpp" / "test.json").write_text(json.dumps([
        {"task_id": i, "text": f"Problem {i}.", "code": "pass", "test_list": ["assert True"], "test_setup_code": ""}
        for i in range(1, 7)]))
    (tmp / "letters.txt").write_text("abcdefghij" * 400)
    ck = {"base_path": f"file://{tmp}/ck", "save_interval": 4, "keep_last": 1, **checkpoints}
    config = {"seed": 3, "log_interval": 4, "mlflow": {"experiment": "ev", "tracking_uri": f"sqlite:///{tmp}/mlflow.db"},
              "paths": {"datasets": {"mbpp": str(tmp / "mbpp"), "letters": str(tmp / "letters.txt")},
                        "checkpoints": ck}}
    if final is not None:
        config["storage"] = {"final": final}
    write(tmp / "c.yaml", config)
    write(tmp / "r.yaml", recipe(16, model={"max_seq_len": 64}, eval=eval_section,
                                 data={"train": {"sources": ["letters"], "max_length": 32, "batch_size": 4}},
                                 optim={"lr": 0.01, "scheduler": "constant", "warmup_ratio": 0.0}))


class Evaluated:
    """A plugin that keeps every ``wmtp_checkpoint_evaluated`` event."""

    def __init__(self) -> None:
        self.events: list = []

    @hookimpl
    def wmtp_checkpoint_evaluated(self, event):
        self.events.append(event)


def _train(tmp: Path, *plugins) -> tuple[int, str]:
    from wmtp_core.run import main

    err = io.StringIO()
    here = os.getcwd()
    os.chdir(tmp)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(["--config", "c.yaml", "--recipe", "r.yaml", "--run-name", "ev"], plugins=plugins)
    finally:
        os.chdir(here)
    return code, err.getvalue()


def _client(tmp: Path):
    import mlflow

    store = f"sqlite:///{tmp}/mlflow.db"
    return mlflow.MlflowClient(tracking_uri=store, registry_uri=store)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """One run: 16 steps, a checkpoint every 4, each evaluated; keep_last 1 and the best by
    pass@1; the final model is the best one, registered and evaluated."""
    tmp = tmp_path_factory.mktemp("evaluated")
    _layout(tmp, {"every": "checkpoint", "tasks": ["mbpp"], "sampling": SAMPLING, "k": [1, 8],
                  "allow_code_execution": True, "workers": 2},
            final={"sink": "mlflow_registry", "from": "best"},
            keep_best={"k": 1, "monitor": METRIC, "mode": "max"})
    seen = Evaluated()
    with mlflow_environment_restored():
        code, err = _train(tmp, seen)
    return tmp, code, err, seen.events


def _history(client, name: str) -> dict[int, float]:
    (run,) = client.search_runs([client.get_experiment_by_name("ev").experiment_id])
    return {m.step: m.value for m in client.get_metric_history(run.info.run_id, name)}


def test_each_evaluated_checkpoint_is_logged_at_its_step_recorded_beside_it_and_ranked_by_keep_best(evaluated):
    tmp, code, err, _ = evaluated
    assert code == 0, err[-3000:]
    history = _history(_client(tmp), METRIC)
    saved = {4, 8, 12, 16}
    assert {4, 16} <= set(history) <= saved, (history, err)  # the first and the last are always evaluated
    for step in saved - set(history):  # a newer checkpoint replaced it while an evaluation ran
        assert f"eval: step {step} not evaluated: step " in err, err
    assert all(0 <= v <= 1 for v in history.values())

    best = max(history, key=lambda s: (history[s], s))  # ties go to the newer step
    assert best != 16, f"training on letters makes an earlier checkpoint the best: {history}"
    run_dir = tmp / "ck" / "ev"
    kept = {int(p.name[5:]) for p in run_dir.glob("step_*")}
    assert kept == {16, best}, f"keep_last 1 plus the best by {METRIC} {history}: kept {kept}"
    for step in kept:  # each kept one's record holds what MLflow holds; its manifest has no eval metric
        record = json.loads((run_dir / "evaluations" / f"step_{step}.json").read_text())
        assert record["metrics"][METRIC] == pytest.approx(history[step]) and record["step"] == step
        assert METRIC not in json.loads((run_dir / f"step_{step}" / "manifest.json").read_text())["meta"]["metrics"]
    assert {p.name for p in (run_dir / "evaluations").iterdir()} == {f"step_{s}.json" for s in kept}
    assert f"the final model is the best checkpoint, step {best} ({METRIC} {history[best]:.4f})" in err, err


def test_the_final_model_is_evaluated_and_its_registered_version_carries_its_pass_at_k(evaluated):
    tmp, code, err, _ = evaluated
    client = _client(tmp)
    history = _history(client, METRIC)
    best = max(history, key=lambda s: (history[s], s))
    (version,) = client.search_model_versions("name='wmtp_baseline-mtp'")
    assert version.tags["wmtp.step"] == str(best)
    # the registered model is the best checkpoint's weights: the same samples, the same pass@1
    assert float(version.tags[METRIC]) == pytest.approx(history[best], abs=1e-6)
    assert "eval/mbpp/pass_at_8" in version.tags
    assert _history(client, "final_" + METRIC) == {best: pytest.approx(history[best])}
    assert "eval: the final model: " in err


def test_wmtp_checkpoint_evaluated(evaluated):
    """Each finished evaluation reaches the plugins once: the resume checkpoints at their steps
    (what MLflow and the records hold), then the final model, before the run ended."""
    tmp, _, _, events = evaluated
    history = _history(_client(tmp), METRIC)
    resumed = [e for e in events if e.role is Role.RESUME]
    assert {e.step: e.metrics[METRIC] for e in resumed} == pytest.approx(history)
    assert all(e.run is not None and e.run.name == "ev" and not e.error and e.lineage == e.run.lineage
               for e in events)
    assert all(e.uri.endswith(f"/ck/ev/step_{e.step}") for e in resumed)
    (final,) = [e for e in events if e.role is Role.FINAL]
    assert final.uri == "models:/wmtp_baseline-mtp/1" and events[-1] is final
    assert set(final.metrics) == {METRIC, "eval/mbpp/pass_at_8"}


def test_wmtp_evaluate_on_a_checkpoint_logs_to_its_run_at_its_step_and_samples_score_the_same(evaluated, capsys):
    tmp, _, _, _ = evaluated
    step16 = str(tmp / "ck" / "ev" / "step_16")
    out = tmp / "samples.jsonl"
    flags = ["--tasks", "mbpp", "--k", "1,8", "--allow-code-execution", "--json"]
    with mlflow_environment_restored():
        code = wmtp(["evaluate", step16, "--config", str(tmp / "c.yaml"), "--n", "8", "--temperature", "1",
                     "--max-new-tokens", "1", "--out", str(out), *flags])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out)
    # the same settings as the run's own evaluation: the same samples, the same number
    assert summary["tasks"]["mbpp"]["pass@k"]["1"] == pytest.approx(_history(_client(tmp), METRIC)[16])
    assert _history(_client(tmp), "eval/mbpp/pass_at_8")[16] == summary["tasks"]["mbpp"]["pass@k"]["8"]
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 6 * 8 and {"task_id", "completion", "passed", "result"} <= set(lines[0])

    code = wmtp(["evaluate", "--samples", str(out), "--mbpp", str(tmp / "mbpp"), *flags])
    again = json.loads(capsys.readouterr().out)
    assert code == 0 and again["tasks"]["mbpp"]["pass@k"] == summary["tasks"]["mbpp"]["pass@k"]


def test_wmtp_evaluate_on_a_registered_version_tags_it(evaluated, capsys):
    tmp, _, _, _ = evaluated
    with mlflow_environment_restored():
        code = wmtp(["evaluate", "models:/wmtp_baseline-mtp/latest", "--config", str(tmp / "c.yaml"),
                     "--tasks", "mbpp", "--n", "3", "--temperature", "1", "--max-new-tokens", "1", "--seed", "5",
                     "--k", "3", "--allow-code-execution", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    value = json.loads(captured.out)["tasks"]["mbpp"]["pass@k"]["3"]
    (version,) = _client(tmp).search_model_versions("name='wmtp_baseline-mtp'")
    assert float(version.tags["eval/mbpp/pass_at_3"]) == pytest.approx(value, abs=1e-6)


def test_wmtp_generate_prints_the_completion_alone_and_speculative_decoding_prints_the_same(evaluated, capsys):
    tmp, _, _, _ = evaluated
    final = str(tmp / "ck" / "ev" / "step_16")
    outs = []
    for extra in ([], ["--speculative"]):
        code = wmtp(["generate", final, "--prompt", "def add(a, b):\n", "--max-new-tokens", "24", *extra])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        assert "tokens per forward pass of the base model" in captured.err
        outs.append(captured.out)
    assert outs[0] == outs[1] and len(outs[0]) > 1
    code = wmtp(["generate", final, "--prompt", "x", "--temperature", "0.5", "--speculative"])
    err = capsys.readouterr().err
    assert code == 2 and "--speculative with --temperature 0.5" in err and "Traceback" not in err


def _kill_workers(stop: threading.Event, killed: list) -> None:
    """SIGKILL every evaluation process as soon as it appears (the out-of-memory killer's way)."""
    while not stop.is_set():
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"wmtp_core.cli.eval_worker" in cmdline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
                    killed.append(int(pid))
        time.sleep(0.02)


def test_an_evaluation_that_dies_costs_no_checkpoint_and_does_not_stop_training(tmp_path, capsys):
    _layout(tmp_path, {"every": "checkpoint", "tasks": ["mbpp"], "sampling": SAMPLING, "allow_code_execution": True},
            keep_last=4)
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_workers, args=(stop, killed), daemon=True)
    killer.start()
    try:
        code, err = _train(tmp_path)
    finally:
        stop.set()
        killer.join()
    assert code == 0, err[-3000:]
    assert killed, "no evaluation process was started"
    assert "eval: the evaluation of step 4 failed (the evaluation process ended with killed by signal 9" in err, err
    assert "eval: the evaluation of the final model failed" in err
    steps = sorted(int(p.name[5:]) for p in (tmp_path / "ck" / "ev").glob("step_*"))
    assert steps == [4, 8, 12, 16]
    assert wmtp(["checkpoints", "verify", str(tmp_path / "ck" / "ev")]) == 0, capsys.readouterr()
    (run,) = _client(tmp_path).search_runs([_client(tmp_path).get_experiment_by_name("ev").experiment_id])
    assert "killed by signal 9" in run.data.tags["wmtp.eval.failed"]
    assert run.data.tags["wmtp.status"] == "finished"


@pytest.mark.parametrize("eval_section, ck, words", [
    (None, {"keep_best": {"k": 1, "monitor": METRIC, "mode": "max"}},
     f"keep_best.monitor '{METRIC}' is measured by the run's evaluation"),
    ({"allow_code_execution": True, "k": [1, 5], "sampling": {"n": 2}}, {}, "eval.k [1, 5]: pass@5 needs at least 5"),
    ({"allow_code_execution": True, "speculative": True, "sampling": {"temperature": 0.7}}, {},
     "eval.speculative with eval.sampling.temperature 0.7"),
    ({"every": "often"}, {}, "accepted: checkpoint (each committed resume checkpoint), final"),
    ({"metrics": ["bleu"]}, {}, "accepted: a list of mbpp_exact, humaneval_exact, contest_exact"),
])
def test_an_eval_section_that_cannot_work_is_refused_in_one_line_before_training(tmp_path, capsys, eval_section,
                                                                                   ck, words):
    from wmtp_core.run import main

    _layout(tmp_path, eval_section, **ck)
    code = main(["--config", str(tmp_path / "c.yaml"), "--recipe", str(tmp_path / "r.yaml"), "--dry-run"])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and words in err and "Traceback" not in err, err


def test_the_origins_eval_section_runs_nothing_without_the_opt_in_and_says_so(tmp_path, capsys):
    import yaml

    origin = yaml.safe_load((Path(__file__).resolve().parents[2] / "shared" / "origin-files" / "configs"
                             / "recipe.mtp_baseline.yaml").read_text())["eval"]
    _layout(tmp_path, origin)
    write(tmp_path / "r.yaml", recipe(2, model={"max_seq_len": 64}, eval=origin))
    code, err = _train(tmp_path)
    assert code == 0, err[-2000:]
    assert "eval: not run: it executes the code the model writes; set eval.allow_code_execution: true" in err
    assert not (tmp_path / "ck" / "ev" / "evaluations").exists()


def test_wmtp_evaluate_reads_a_checkpoint_on_s3_with_the_configs_storage_options(evaluated, s3_server, bucket,
                                                                                 monkeypatch, capsys):
    """The S3 endpoint comes from the config's ``storage.resume.options`` only (none in the
    environment): the checkpoint is read there, verified, and scores as it does on disk."""
    import fsspec

    tmp, _, _, _ = evaluated
    fsspec.filesystem("s3").put(str(tmp / "ck" / "ev" / "step_16") + "/", f"{bucket}/ck/ev/step_16/", recursive=True)
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    config = tmp / "s3.yaml"
    write(config, {"mlflow": None, "paths": {"datasets": {"mbpp": str(tmp / "mbpp")}},
                   "storage": {"resume": {"sink": "s3", "base_path": f"s3://{bucket}/ck",
                                          "options": {"endpoint_url": s3_server}}}})
    code = wmtp(["evaluate", f"s3://{bucket}/ck/ev/step_16", "--config", str(config), "--tasks", "mbpp", "--n", "8",
                 "--temperature", "1", "--max-new-tokens", "1", "--allow-code-execution", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert json.loads(captured.out)["tasks"]["mbpp"]["pass@k"]["1"] == pytest.approx(_history(_client(tmp), METRIC)[16])
