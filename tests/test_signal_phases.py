"""Signals at awkward moments (issue 18, item 10): a real SIGTERM, SIGINT or SIGUSR1 to a real
``python -m wmtp_core.run`` process, in every phase of its life (start-up, the resume's
verification, training, the final model's registration, the run's end, the process's exit),
once or twice. Each ends with its documented exit status and line, the run's lease is gone, and
the real sqlite MLflow store holds no ``PENDING`` logged model.

How a signal is made to land in a phase: the child runs the real command (``runpy`` of
``wmtp_core.run`` as ``__main__``, exactly what ``python -m`` does) after wrapping one function
of that phase so that it first sends the signal to its own process, or with an observer plugin
that sends it from a hook; the signal and its handling are the real ones. No hook or variable
was added to WMTP for these tests.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import zygote
from builders import recipe, tiny_config, write

from wmtp_core.run import EXIT_INTERRUPTED, EXIT_OK, EXIT_PREEMPTED

pytestmark = pytest.mark.slow

SENDER = """
import atexit, os, runpy, signal, sys

import mlflow

import wmtp_core.plan
import wmtp_core.plugins
from wmtp_core import hookimpl

WHERE, QUEUE = sys.argv[1], [getattr(signal, s) for s in sys.argv[2].split(",")]


def send():
    if QUEUE:
        os.kill(os.getpid(), QUEUE.pop(0))


def before(owner, name):
    original = getattr(owner, name)

    def sending_first(*args, **kwargs):
        send()
        return original(*args, **kwargs)

    setattr(owner, name, sending_first)


class Sender:
    @hookimpl(trylast=True)  # once the MLflow run is open: the last thing before training
    def wmtp_run_started(self, event):
        if WHERE == "start":
            send()

    @hookimpl
    def wmtp_step_ended(self, event):
        if WHERE.startswith("step") and event.step == 2 and "loss" in event.metrics:
            send()

    @hookimpl
    def wmtp_run_ended(self, event):
        if WHERE == "step+end":  # the second signal, while the run ends
            send()


if WHERE == "registration":  # the final model's artifacts, its logged model PENDING
    before(mlflow.MlflowClient, "log_model_artifacts")
if WHERE == "verification":  # the resume's verification of the checkpoint's files
    from wmtp_core.store_verify import Verifying

    before(Verifying, "verify_async")
if WHERE == "preflight":  # reading the configuration, before anything is known of it
    before(wmtp_core.plan, "preflight")
if WHERE == "step+exit":  # the second signal while the process leaves (its exit handlers)
    atexit.register(send)

make = wmtp_core.plugins.make_plugin_manager


def with_sender():
    pm = make()
    pm.register(Sender())
    return pm


wmtp_core.plugins.make_plugin_manager = with_sender
sys.argv = ["wmtp_core.run", *sys.argv[3:]]
runpy.run_module("wmtp_core.run", run_name="__main__", alter_sys=True)
"""


def setup(tmp: Path, steps: int = 4, **config) -> list[str]:
    write(tmp / "c.yaml", tiny_config(tmp, **config))
    write(tmp / "r.yaml", recipe(steps, run={"name": "tiny"}))
    return ["--config", "c.yaml", "--recipe", "r.yaml"]


def send(tmp: Path, where: str, signals: str, *args: str):
    """The run of :func:`setup` in a child that sends ``signals`` (comma-separated names, one at a
    time) where ``where`` says (:data:`SENDER`)."""
    return zygote.run(["-c", SENDER, where, signals, "--config", "c.yaml", "--recipe", "r.yaml", *args],
                      cwd=tmp, timeout=300)


def errors(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr[-3000:]
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def clean(tmp: Path) -> dict[str, list[str]]:
    """The lease is gone; returns the logged models of the store by status (none ``PENDING``)."""
    import mlflow

    assert not (tmp / "ck" / "tiny" / ".wmtp-lease").exists(), "the lease was left behind"
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    experiment = client.get_experiment_by_name("tests")
    models = client.search_logged_models(experiment_ids=[experiment.experiment_id]) if experiment else []
    by_status: dict[str, list[str]] = {}
    for m in models:
        by_status.setdefault(str(m.status), []).append(m.model_id)
    assert "PENDING" not in by_status, by_status
    return by_status


def mlflow_run(tmp: Path):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    (found,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    return found


def steps(tmp: Path) -> list[str]:
    run_dir = tmp / "ck" / "tiny"
    return sorted(p.name for p in run_dir.iterdir() if p.name.startswith("step_")) if run_dir.exists() else []


# ----------------------------------------------------------------------------- the final registration
def test_sigterm_during_the_final_registration_lets_it_finish_and_the_run_ends_as_it_would_have(tmp_path):
    """Before: exit 143, no message, a PENDING logged model and the lease left behind."""
    setup(tmp_path)
    proc = send(tmp_path, "registration", "SIGTERM")
    assert proc.returncode == EXIT_OK, proc.stderr[-3000:]
    assert errors(proc.stderr) == []
    assert "SIGTERM received after the last step: nothing is cut short; the run ends as it would have" in proc.stderr
    models = clean(tmp_path)
    assert list(models) == ["READY"] and len(models["READY"]) == 1
    assert mlflow_run(tmp_path).info.status == "FINISHED"
    import mlflow

    store = f"sqlite:///{tmp_path}/mlflow.db"
    (version,) = mlflow.MlflowClient(tracking_uri=store, registry_uri=store).search_model_versions(
        "name='wmtp_baseline-mtp'")
    assert version.tags["wmtp.step"] == "4"


def test_ctrl_c_during_the_final_registration_marks_its_logged_model_failed_and_releases_the_lease(tmp_path):
    """Before: a PENDING logged model was left (MLflow marks FAILED only an upload that raised an
    Exception, not KeyboardInterrupt). The resume state of the last step stays committed: the
    same command with --resume latest registers the model."""
    args = setup(tmp_path)
    proc = send(tmp_path, "registration", "SIGINT")
    assert proc.returncode == EXIT_INTERRUPTED, proc.stderr[-3000:]
    assert errors(proc.stderr) == ["error: interrupted (Ctrl-C): committed checkpoints are intact; continue with "
                                   "--resume latest"]
    assert list(clean(tmp_path)) == ["FAILED"]
    found = mlflow_run(tmp_path)
    assert found.info.status == "FAILED" and found.data.tags["wmtp.reason"] == "interrupted"
    assert steps(tmp_path) == ["step_2", "step_4"]

    again = zygote.run(["-m", "wmtp_core.run", *args, "--resume", "latest"], cwd=tmp_path, timeout=300)
    assert again.returncode == EXIT_OK, again.stderr[-3000:]
    assert sorted(clean(tmp_path)) == ["FAILED", "READY"]


# ----------------------------------------------------------------------------- start-up
def test_sigterm_while_the_run_starts_stops_it_before_its_first_step_with_exit_4(tmp_path):
    """Before: exit 143, no message; the MLflow run was left RUNNING and the lease behind."""
    args = setup(tmp_path)
    proc = send(tmp_path, "start", "SIGTERM")
    assert proc.returncode == EXIT_PREEMPTED, proc.stderr[-3000:]
    assert errors(proc.stderr) == []
    assert "SIGTERM received while the run starts: it stops before its first step, then exiting (status 4" \
        in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == ("preempted before its first step: nothing was trained or "
                                                    "committed; run the same command again (exit status 4)")
    assert steps(tmp_path) == [] and clean(tmp_path) == {}
    found = mlflow_run(tmp_path)
    assert found.info.status == "KILLED" and found.data.tags["wmtp.status"] == "preempted"

    again = zygote.run(["-m", "wmtp_core.run", *args], cwd=tmp_path, timeout=300)
    assert again.returncode == EXIT_OK, "the same command again: nothing was committed to refuse it"


@pytest.mark.parametrize("listed, code", [(None, EXIT_PREEMPTED), ([], -15)], ids=["listed", "not listed"])
def test_a_signal_while_the_configuration_is_read_follows_the_list_the_configuration_gives(tmp_path, listed, code):
    """Before the configuration is read the default list applies; a signal it then does not list
    is delivered again, with its usual effect (``save_on_signal: []``: SIGTERM kills)."""
    setup(tmp_path, **({} if listed is None else {"paths": {"checkpoints": {"save_on_signal": listed}}}))
    proc = send(tmp_path, "preflight", "SIGTERM")
    assert proc.returncode == code, proc.stderr[-3000:]
    assert not (tmp_path / "ck").exists() or steps(tmp_path) == []
    assert not (tmp_path / "ck" / "tiny" / ".wmtp-lease").exists()
    if code == EXIT_PREEMPTED:
        assert "preempted before its first step" in proc.stderr


# ----------------------------------------------------------------------------- the resume's verification
@pytest.mark.parametrize("sig, code", [("SIGTERM", EXIT_PREEMPTED), ("SIGINT", EXIT_INTERRUPTED)])
def test_a_signal_during_the_resumes_verification_ends_with_its_status_and_releases_the_lease(tmp_path, sig, code):
    """Before: SIGTERM there ended with exit 143 and no message, the lease left behind."""
    args = setup(tmp_path)
    first = send(tmp_path, "step", "SIGTERM")  # sent after step 2: step 3 is the one it stops at
    assert first.returncode == EXIT_PREEMPTED and steps(tmp_path) == ["step_2", "step_3"], first.stderr[-3000:]

    proc = send(tmp_path, "verification", sig, "--resume", "latest")
    assert proc.returncode == code, proc.stderr[-3000:]
    said = errors(proc.stderr)
    if code == EXIT_PREEMPTED:
        assert said == []
        assert re.search(r"^preempted: step 3 is committed at \S+/ck/tiny/step_3 \(where it resumed from: it "
                         r"trained no step\); continue with --resume latest \(exit status 4\)$",
                         proc.stderr.strip().splitlines()[-1]), proc.stderr[-2000:]
    else:
        assert said == ["error: interrupted (Ctrl-C): committed checkpoints are intact; continue with --resume latest"]
    assert steps(tmp_path) == ["step_2", "step_3"]
    clean(tmp_path)

    again = zygote.run(["-m", "wmtp_core.run", *args, "--resume", "latest"], cwd=tmp_path, timeout=300)
    assert again.returncode == EXIT_OK, again.stderr[-3000:]
    assert steps(tmp_path) == ["step_3", "step_4"]


# ----------------------------------------------------------------------------- two signals
@pytest.mark.parametrize("signals, code", [("SIGTERM,SIGTERM", EXIT_PREEMPTED), ("SIGTERM,SIGUSR1", EXIT_PREEMPTED),
                                           ("SIGINT,SIGINT", EXIT_INTERRUPTED)])
def test_a_second_signal_while_the_run_ends_changes_nothing(tmp_path, signals, code):
    """Before: the handlers were gone once the last save was committed, so a second SIGTERM while
    the run ended (MLflow's run ended, the lease released) ended it with 143 after it had
    printed ``preempted: ... (exit status 4)``."""
    setup(tmp_path)
    proc = send(tmp_path, "step+end", signals)
    assert proc.returncode == code, proc.stderr[-3000:]
    second = signals.split(",")[1]
    assert f"{second} received while the run ends: ignored; it ends as it was ending" in proc.stderr
    if code == EXIT_PREEMPTED:
        assert errors(proc.stderr) == []
        assert re.search(r"preempted: step 3 is committed at \S+/step_3; continue with --resume latest "
                         r"\(exit status 4\)", proc.stderr)
    else:
        assert len(errors(proc.stderr)) == 1
    clean(tmp_path)


def test_a_second_sigterm_while_the_process_leaves_changes_nothing(tmp_path):
    """The second SIGTERM from an exit handler, after ``preempted: ... (exit status 4)`` was
    printed: before, the default action ended the process with 143."""
    setup(tmp_path)
    proc = send(tmp_path, "step+exit", "SIGTERM,SIGTERM")
    assert proc.returncode == EXIT_PREEMPTED, proc.stderr[-3000:]
    assert errors(proc.stderr) == [] and "preempted: step 3 is committed" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("SIGTERM received while the run ends: ignored")
    clean(tmp_path)


@pytest.mark.parametrize("second", ["SIGTERM", "SIGUSR1"])
def test_two_signals_005_s_apart_while_training_end_with_exit_4_and_its_line(tmp_path, second):
    """The issue's case: two signals sent from outside, 0.05 s apart, while the run trains.
    Before: exit 143 in 2 of 5 tries, after ``preempted: ... (exit status 4)`` was printed."""
    import signal
    import time

    write(tmp_path / "c.yaml", tiny_config(tmp_path))
    write(tmp_path / "r.yaml", recipe(10**6, run={"name": "tiny"}))
    child = zygote.Child(["-m", "wmtp_core.run", "--config", "c.yaml", "--recipe", "r.yaml"], cwd=tmp_path)
    try:
        deadline = time.monotonic() + 240
        while not (tmp_path / "ck" / "tiny" / "step_4" / "manifest.json").exists():
            assert child.poll() is None and time.monotonic() < deadline, child.communicate(1)[1][-3000:]
            time.sleep(0.02)
        child.send_signal(signal.SIGTERM)
        time.sleep(0.05)
        child.send_signal(getattr(signal, second))
        _, err = child.communicate(240)
    finally:
        child.kill()
        child.close()
    assert child.returncode == EXIT_PREEMPTED, err[-3000:]
    assert errors(err) == [] and re.search(r"preempted: step \d+ is committed at \S+; continue with --resume latest "
                                           r"\(exit status 4\)", err), err[-2000:]
    clean(tmp_path)


def test_a_message_the_handler_cannot_write_is_dropped_never_raised():
    """A second signal can land while the first one's message is being printed (in the campaign:
    inside rich's lazy import of its emoji table, an ``ImportError`` from a partially initialized
    module, a traceback and exit 1). The handler never raises what writing its message raised."""
    import signal

    from wmtp_core.preemption import TRAINING, Preemption

    def say(text: str) -> None:
        raise ImportError("cannot import name 'EMOJI' from partially initialized module 'rich._emoji_codes'")

    signals = Preemption(say=say)
    signals.phase = TRAINING
    signals._handle(signal.SIGTERM, None)
    signals._handle(signal.SIGUSR1, None)
    assert signals.requested() == "SIGTERM"
