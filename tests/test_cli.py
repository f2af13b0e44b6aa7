"""The ``wmtp`` command on real files (and a real S3 server, a real MLflow store)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from builders import merge, recipe, resume_files, write
from conftest import tree

from wmtp_core import Role
from wmtp_core.cli import main
from wmtp_core.commit import STAGING_MARKER, CheckpointStore
from wmtp_core.filesink import json_writer, torch_writer

OLD = time.time() - 7200  # older than gc's default --min-age


def commit(store, run, step, lineage="L1", name=None, role=Role.RESUME):
    files = resume_files(step)
    if role is Role.FINAL:
        files = {"model.pt": files["model.pt"], "model_config.json": json_writer({"d_model": 8})}
    return store.write(run, name or f"step_{step}", files, step=step, role=role, lineage=lineage,
                       meta={"algo": "baseline-mtp"})


def stage(fs, path, age=None):
    """Leave a staging directory as a crashed save does: WMTP's marker, files, no manifest."""
    fs.makedirs(path, exist_ok=True)
    fs.pipe_file(f"{path}/{STAGING_MARKER}", b"{}")
    fs.pipe_file(f"{path}/model.pt", b"x" * 100)
    fs.pipe_file(f"{path}/optimizer.pt", b"y" * 50)
    if age is not None:
        for f in Path(path).iterdir():
            os.utime(f, (age, age))


@pytest.fixture
def base(tmp_path):
    """Run ``a``: steps 2, 4 committed, step_6 staging (old), step_8 staging (fresh);
    run ``b``: step 3 and its final model committed."""
    store = CheckpointStore.from_url(f"file://{tmp_path}/ck")
    commit(store, "a", 2)
    commit(store, "a", 4)
    stage(store.fs, store.path_of("a", "step_6"), age=OLD)
    stage(store.fs, store.path_of("a", "step_8"))
    commit(store, "b", 3, lineage="L2")
    commit(store, "b", 3, lineage="L2", name="final", role=Role.FINAL)
    return tmp_path / "ck"


def cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def test_ls_of_a_base_path_lists_every_run_committed_and_staging(base, capsys):
    code, out, _ = cli(capsys, "checkpoints", "ls", base)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["run", "name", "step", "role", "state", "files", "bytes", "metric",
                                "created_at", "lineage"]
    assert [line.split()[:5] for line in lines[1:]] == [
        ["a", "step_2", "2", "resume", "committed"],
        ["a", "step_4", "4", "resume", "committed"],
        ["a", "step_6", "6", "-", "staging"],
        ["a", "step_8", "8", "-", "staging"],
        ["b", "step_3", "3", "resume", "committed"],
        ["b", "final", "3", "final", "committed"],
    ]


def test_ls_json_of_a_run_matches_the_manifests(base, capsys):
    code, out, _ = cli(capsys, "checkpoints", "ls", base / "a", "--json")
    assert code == 0
    rows = json.loads(out)
    assert [(r["name"], r["state"]) for r in rows] == [
        ("step_2", "committed"), ("step_4", "committed"), ("step_6", "staging"), ("step_8", "staging")]
    manifest = json.loads((base / "a" / "step_4" / "manifest.json").read_text())
    assert rows[1]["bytes"] == sum(f["size"] for f in manifest["files"])
    assert rows[1]["files"] == 3 and rows[1]["lineage"] == "L1" and rows[1]["run"] == "a"
    assert rows[1]["uri"] == str(base / "a" / "step_4")
    assert rows[2]["bytes"] == 152 and rows[2]["files"] == 3 and rows[2]["role"] is None


def test_verify_a_run_then_a_flipped_byte_is_named(base, capsys):
    code, out, _ = cli(capsys, "checkpoints", "verify", base / "b")
    assert code == 0 and out.count("OK") == 2 and "2 of 2 checkpoints verified" in out

    target = base / "a" / "step_4" / "model.pt"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    code, out, _ = cli(capsys, "checkpoints", "verify", f"file://{base}/a/step_4/", "--no-quarantine")
    assert code == 1 and "model.pt does not match the manifest" in out
    assert target.exists(), "--no-quarantine only reports"
    code, out, _ = cli(capsys, "checkpoints", "verify", base / "a")
    assert code == 1
    assert f"OK      {base}/a/step_2" in out
    assert f"FAILED  {base}/a/step_4: {target} does not match the manifest" in out
    assert f"quarantined as {base}/a/step_4.quarantined-" in " ".join(out.split())
    assert not (base / "a" / "step_4").exists() and len(list((base / "a").glob("step_4.quarantined-*"))) == 1


def test_verify_of_staging_fails_saying_it_was_never_committed(base, capsys):
    code, out, _ = cli(capsys, "checkpoints", "verify", base / "a" / "step_6")
    assert code == 1 and "never committed" in out


def test_gc_removes_only_old_staging_by_default_and_never_a_committed_checkpoint(base, capsys):
    before = tree(base)
    code, out, _ = cli(capsys, "gc", base, "--dry-run", "--min-age", "0")
    assert code == 0 and tree(base) == before
    assert "would remove 2 staging directories; would free 304 B (304 bytes)" in out

    code, out, _ = cli(capsys, "gc", base)
    assert code == 0
    assert f"removed {base}/a/step_6 (3 files, 152 B)" in out
    assert f"kept    {base}/a/step_8: newest file" in out
    assert "freed 152 B (152 bytes)" in out
    assert tree(base) == {p for p in before if not p.startswith("a/step_6")}

    code, out, _ = cli(capsys, "gc", base / "a", "--min-age", "0")
    assert code == 0 and f"removed {base}/a/step_8" in out
    assert tree(base) == {p for p in before if not p.startswith(("a/step_6", "a/step_8"))}
    assert cli(capsys, "checkpoints", "verify", base / "a")[0] == 0


def test_gc_keeps_a_directory_whose_manifest_does_not_parse(base, capsys):
    manifest = base / "a" / "step_2" / "manifest.json"
    data = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**data, "format_version": 99}))  # a newer WMTP wrote it
    os.utime(manifest, (OLD, OLD))
    code, out, _ = cli(capsys, "gc", base / "a", "--min-age", "0")
    assert code == 0 and manifest.exists()
    assert f"kept    {base}/a/step_2: its manifest.json cannot be believed" in out
    assert "format_version 99 is not supported" in out


def test_plugins_lists_sinks_roles_policies_and_hooks(capsys):
    code, out, _ = cli(capsys, "plugins")
    assert code == 0
    blocks = {b.split()[0]: b for b in out.split("\n\n")[1:]}
    assert "wmtp==" in blocks["local"]
    assert "sink local: serves final, resume; protocols file, local" in blocks["local"]
    assert "sink mlflow_registry: serves final" in blocks["mlflow_registry"]
    assert "hooks: wmtp_checkpoint_evaluated, wmtp_load_model, wmtp_register_sinks" in blocks["mlflow_registry"]
    assert "policy keep_last: prunes resume" in blocks["retention"]
    assert "observer" in blocks["mlflow_tracking"]
    assert "wmtp_run_started" in blocks["mlflow_tracking"]


def test_report_counts_the_bytes_of_every_manifest(base, capsys):
    code, out, _ = cli(capsys, "report", base / "a", "--json")
    assert code == 0
    report = json.loads(out)
    sizes = [sum(f["size"] for f in json.loads((base / "a" / s / "manifest.json").read_text())["files"])
             for s in ("step_2", "step_4")]
    assert report["resume"] == {"sink": "local", "committed": 2, "bytes": sum(sizes), "newest_step": 4,
                                "places": [{"uri": str(base / "a"), "committed": 2, "bytes": sum(sizes),
                                            "newest_step": 4}]}
    assert report["staging"] == {"count": 2, "bytes": 304}
    assert report["final"] == [] and report["total_bytes"] == sum(sizes) + 304

    config = base.parent / "c.yaml"
    write(config, {"paths": {"checkpoints": {"base_path": f"file://{base}"}}, "mlflow": None})
    code, out, _ = cli(capsys, "report", "b", "--config", config)
    assert code == 0
    assert "Bytes held by run 'b'" in out
    assert f"final   local  {base}/b/final" in out


@pytest.mark.parametrize("args, message", [
    (["checkpoints", "ls", "{tmp}/nowhere"], "{tmp}/nowhere does not exist"),
    (["checkpoints", "verify", "{tmp}/nowhere"], "does not exist"),
    (["gc", "{tmp}/nowhere"], "does not exist"),
    (["report", "{tmp}/nowhere"], "does not exist"),
    (["register", "{tmp}/nowhere"], "does not exist"),
    (["checkpoints", "ls", "nosuchproto://x/y"], "nosuchproto"),
    (["checkpoints", "ls", "{tmp}/ck/a/step_2"], "is one checkpoint"),
    (["checkpoints", "verify", "{tmp}/ck/a/step_2/model.pt"], "is a file, not a directory"),
    (["register", "{tmp}/ck/a/step_6"], "never committed"),
    (["register", "{tmp}/ck/a"], "not a checkpoint directory"),
    (["report", "{tmp}/ck"], "is not a run directory: it holds the runs a, b"),
    (["report", ".."], "not allowed"),
    (["gc", "{tmp}/ck", "--min-age", "-1"], "--min-age"),
    (["checkpoints", "ls", "{tmp}/ck", "--storage-option", "secretvalue"], "NAME=VALUE"),
    (["report", "a", "--config", "{tmp}/missing.yaml"], "missing.yaml"),
])
def test_bad_input_is_one_clear_error_with_exit_2(base, capsys, args, message):
    tmp = base.parent
    code, out, err = cli(capsys, *[a.format(tmp=tmp) for a in args])
    assert code == 2
    assert err.startswith("error: ") and message.format(tmp=tmp) in err, err
    assert "secretvalue" not in err


def test_usage_errors_exit_2(capsys):
    assert main(["checkpoints"]) == 2
    assert main(["nope"]) == 2
    assert main(["--help"]) == 0
    capsys.readouterr()


def test_installed_wmtp_script_runs():
    script = Path(sys.executable).parent / "wmtp"
    proc = subprocess.run([str(script), "plugins"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "sink local: serves final, resume" in proc.stdout


@pytest.mark.slow
def test_ls_and_gc_on_s3_use_object_times(s3_server, bucket, capsys, monkeypatch):
    # the S3 server logs each request; its handler may hold a stream an earlier test closed
    monkeypatch.setattr(logging.getLogger("werkzeug"), "disabled", True)
    capsys.readouterr()
    store = CheckpointStore.from_url(f"s3://{bucket}/runs")
    commit(store, "r", 2)
    stage(store.fs, store.path_of("r", "step_4"))
    code, out, _ = cli(capsys, "checkpoints", "ls", f"s3://{bucket}/runs", "--json")
    assert code == 0
    assert [(r["name"], r["state"], r["uri"].split("/")[-1]) for r in json.loads(out)] == [
        ("step_2", "committed", "step_2"), ("step_4", "staging", "step_4")]
    assert json.loads(out)[0]["uri"] == f"s3://{bucket}/runs/r/step_2"
    code, out, _ = cli(capsys, "gc", f"s3://{bucket}/runs/r")
    assert code == 0 and "kept" in out and "newest file" in out  # LastModified read: seconds old
    code, out, _ = cli(capsys, "gc", f"s3://{bucket}/runs/r", "--min-age", "0")
    assert code == 0 and f"removed s3://{bucket}/runs/r/step_4 (3 files, 152 B)" in out
    assert cli(capsys, "checkpoints", "verify", f"s3://{bucket}/runs/r")[0] == 0
    code, out, _ = cli(capsys, "checkpoints", "ls", f"s3://{bucket}/runs/r", "--json")
    assert [r["name"] for r in json.loads(out)] == ["step_2"]


# ----------------------------------------------------------------------------- register
RECIPE = recipe(4, run={"name": "reg"}, train={"algo": "baseline-mtp"},
                optim={"lr": 0.003, "scheduler": "constant", "warmup_ratio": 0.0},
                model={"max_seq_len": 64})


def config(tmp: Path, **over) -> dict:
    return merge({
        "seed": 7,
        "paths": {"checkpoints": {"base_path": f"file://{tmp}/ck", "save_interval": 2, "keep_last": 1}},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp}/mlflow.db"},
    }, over)


@pytest.mark.slow
def test_register_stores_the_final_model_once_from_a_resume_checkpoint(tmp_path, monkeypatch, capsys):
    import mlflow

    from wmtp_core.run import main as run_main

    monkeypatch.chdir(tmp_path)  # MLflow puts artifacts under ./mlruns
    write(tmp_path / "run.yaml", config(tmp_path, storage={"final": {"sink": "local"}}))
    write(tmp_path / "reg.yaml", config(tmp_path))
    write(tmp_path / "recipe.yaml", RECIPE)
    assert run_main(["--config", str(tmp_path / "run.yaml"), "--recipe", str(tmp_path / "recipe.yaml")]) == 0
    capsys.readouterr()
    step = tmp_path / "ck" / "reg" / "step_4"
    lineage = json.loads((step / "manifest.json").read_text())["lineage"]

    code, out, _ = cli(capsys, "register", step, "--config", tmp_path / "reg.yaml")
    assert code == 0
    assert "models:/wmtp_baseline-mtp/1  via mlflow_registry" in out
    store = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)
    (version,) = client.search_model_versions("name='wmtp_baseline-mtp'")
    assert str(version.version) == "1" and version.tags["wmtp.lineage"] == lineage

    code, out, _ = cli(capsys, "register", step, "--config", tmp_path / "reg.yaml")
    assert code == 0 and "already stored at models:/wmtp_baseline-mtp/1" in out
    assert len(client.search_model_versions("name='wmtp_baseline-mtp'")) == 1

    # the report finds both final copies: the run's local one and the registered version
    code, out, _ = cli(capsys, "report", "reg", "--config", tmp_path / "reg.yaml", "--json")
    assert code == 0
    finals = {f["sink"]: f for f in json.loads(out)["final"]}
    assert finals["local"]["uri"] == str(tmp_path / "ck" / "reg" / "final")
    assert finals["mlflow_registry"]["uri"] == "models:/wmtp_baseline-mtp/1"
    assert finals["mlflow_registry"]["bytes"] > 0


def test_register_exits_3_when_the_registry_is_down(tmp_path, monkeypatch, capsys):
    """A registry nobody answers at: the command names the failure, exits 3, changes nothing."""
    import attrs

    from wmtp_core.engine.model import ModelConfig, MTPModel

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    cfg = ModelConfig(d_model=16, n_layers=1, n_heads=2, n_future=2, max_seq_len=16)
    store = CheckpointStore.from_url(f"file://{tmp_path}/ck")
    store.write("m", "final", {"model.pt": torch_writer(MTPModel(cfg).state_dict()),
                               "model_config.json": json_writer(attrs.asdict(cfg))},
                step=1, role=Role.FINAL, lineage="L9", meta={"algo": "baseline-mtp"})
    before = tree(tmp_path)
    write(tmp_path / "c.yaml", {"mlflow": {"tracking_uri": "http://127.0.0.1:9"}})
    code, _, err = cli(capsys, "register", tmp_path / "ck" / "m" / "final", "--config", tmp_path / "c.yaml")
    assert code == 3, err
    assert "error: final model not stored (" in err and f"{tmp_path}/ck/m/final is unchanged" in err
    assert tree(tmp_path) == before | {"c.yaml"}


# ------------------------------------------------------------------------------ unreachable storage
@pytest.mark.parametrize("command", [["checkpoints", "ls"], ["checkpoints", "verify"], ["gc"], ["report"]],
                         ids=" ".join)
def test_a_command_on_an_s3_endpoint_that_does_not_answer_says_one_line_and_exits_1(command, capsys,
                                                                                   monkeypatch):
    """Nothing listens at the endpoint: after the S3 client's retries (one attempt here, through
    the environment the client honours), one line naming the command, the URI and the error."""
    from conftest import S3_ENV, free_port

    from wmtp_core.exits import EXIT_FAILED

    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    endpoint = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    code = main([*command, "s3://nobucket/runs", "--storage-option", f"endpoint_url={endpoint}"])
    took = time.monotonic() - t0
    out, err = capsys.readouterr()
    assert code == EXIT_FAILED, err
    assert "Traceback" not in out + err
    (line,) = err.strip().splitlines()
    assert line.startswith(f"error: wmtp {' '.join(command)}: reading s3://nobucket/runs failed: "
                           "EndpointConnectionError: Could not connect to the endpoint URL"), line
    assert endpoint in line and line.endswith("(after the S3 client's retries)"), line
    assert took < 60, f"{took:.0f} s"


def test_commands_read_s3_with_the_s3_sinks_own_retries_timeouts_and_block_size(monkeypatch):
    from wmtp_core.commit import store_class
    from wmtp_plugins import s3

    monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
    monkeypatch.delenv("AWS_RETRY_MODE", raising=False)
    given = {"endpoint_url": "http://127.0.0.1:9"}
    options = store_class("s3").with_defaults(given)
    assert options == s3.storage_options(given)
    assert options["config_kwargs"] == {**s3.TIMEOUTS, "retries": s3.RETRIES}
    assert options["default_block_size"] == s3.BLOCK_SIZE
    # what the user gives wins
    mine = store_class("s3").with_defaults({"config_kwargs": {"connect_timeout": 1, "retries": {"max_attempts": 2}}})
    assert mine["config_kwargs"]["connect_timeout"] == 1 and mine["config_kwargs"]["retries"]["max_attempts"] == 2
