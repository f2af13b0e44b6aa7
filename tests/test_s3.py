"""Resume state on a real S3 endpoint (moto's server on 127.0.0.1), end to end."""

from __future__ import annotations

import signal

import fsspec
import pytest
import torch
import zygote
from builders import recipe, write
from conftest import KILLER, s3_keys

pytestmark = pytest.mark.slow


RECIPE = recipe(10, model={"dropout": 0.1})


def config(bucket: str, store) -> dict:
    return {
        "seed": 3,
        "log_interval": 2,
        "paths": {"checkpoints": {"base_path": f"s3://{bucket}/runs", "save_interval": 2, "keep_last": 2}},
        "mlflow": {"experiment": "s3", "tracking_uri": f"sqlite:///{store}"},
    }


def in_process(args, monkeypatch, capsys, cwd):
    from wmtp_core.run import main

    monkeypatch.chdir(cwd)
    code = main(args)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_resume_on_s3_final_in_mlflow_sigkill_and_resume_is_bit_exact(s3_server, bucket, tmp_path,
                                                                        monkeypatch, capsys):
    write(tmp_path / "c.yaml", config(bucket, tmp_path / "mlflow.db"))
    write(tmp_path / "r.yaml", RECIPE)
    common = ["--config", "c.yaml", "--recipe", "r.yaml"]

    code, full_out, full_err = in_process([*common, "--run-name", "full"], monkeypatch, capsys, tmp_path)
    assert code == 0, full_err[-3000:]
    assert "resume  -> s3: s3://" in full_out

    cut = zygote.run(["-c", KILLER, "7", *common, "--run-name", "cut"], cwd=tmp_path, timeout=600)
    assert cut.returncode == -signal.SIGKILL, cut.stderr[-3000:]
    code, res_out, res_err = in_process([*common, "--run-name", "cut", "--resume", "latest"],
                                        monkeypatch, capsys, tmp_path)
    assert code == 0, res_err[-3000:]
    assert f"s3://{bucket}/runs/cut/step_6" in res_err

    # only keep_last committed checkpoints remain (plus, for the resumed run, the one it
    # resumed from, which retention never deletes), and nothing else of the run is in the bucket
    for name, expected in (("full", ["step_10", "step_8"]), ("cut", ["step_10", "step_6", "step_8"])):
        keys = s3_keys(s3_server, bucket, f"runs/{name}/")
        steps = sorted({k.split("/")[2] for k in keys})
        assert steps == expected, keys
        assert all(k.rsplit("/", 1)[1] in {"model.pt", "optimizer.pt", "trainer.pt", "manifest.json"}
                   for k in keys)

    fs = fsspec.filesystem("s3")
    a = torch.load(fs.open(f"{bucket}/runs/full/step_10/model.pt"), weights_only=True)
    b = torch.load(fs.open(f"{bucket}/runs/cut/step_10/model.pt"), weights_only=True)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la = torch.load(fs.open(f"{bucket}/runs/full/step_10/trainer.pt"), weights_only=True)["losses"]
    lb = torch.load(fs.open(f"{bucket}/runs/cut/step_10/trainer.pt"), weights_only=True)["losses"]
    assert la == lb and len(la) == 10

    # the final models are in the MLflow registry, once per run, and MLflow holds no resume state
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                                 registry_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    versions = client.search_model_versions("name='wmtp_baseline-mtp'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    for v in versions:
        assert [a.path for a in client.list_artifacts(v.run_id)] == ["wmtp-storage.png"]  # a PNG, no checkpoint
        tag = client.get_run(v.run_id).data.tags["wmtp.resume_location"]
        assert tag.startswith(f"s3://{bucket}/runs/")
    secret = "wmtp-test-secret-do-not-log"
    for text in (full_out, full_err, res_out, res_err, cut.stdout, cut.stderr):
        assert secret not in text


def test_credentials_from_storage_options_never_reach_logs_manifests_or_mlflow(s3_server, bucket, tmp_path,
                                                                             monkeypatch, capsys):
    """Credentials given in the config work, and a scan of everything the run wrote or printed
    (console with --verbose, log records, manifests, MLflow params and tags) finds none of them."""
    key_id, secret = "AKIAWMTPSCANME0001", "wmtp-scan-secret-0123456789abcdef"
    write(tmp_path / "c.yaml", {
        "paths": {"checkpoints": {"base_path": f"s3://{bucket}/sec", "save_interval": 3, "keep_last": 2}},
        "mlflow": {"experiment": "sec", "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        "storage": {"resume": {"sink": "s3",
                               "options": {"key": key_id, "secret": secret, "endpoint_url": s3_server}}},
    })
    write(tmp_path / "r.yaml", recipe(6, model={"dropout": 0.1}))
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name)  # the credentials come from the config only
    # log records reach the captured stderr (the pytest logging plugin is off: -p no:logging)
    code, out, err = in_process(["--config", "c.yaml", "--recipe", "r.yaml", "--run-name", "sec", "--verbose"],
                                monkeypatch, capsys, tmp_path)
    assert code == 0, err[-3000:]
    scanned = [out, err]
    fs = fsspec.filesystem("s3", key=key_id, secret=secret, endpoint_url=s3_server)
    manifests = fs.glob(f"{bucket}/sec/sec/*/manifest.json")
    assert len(manifests) == 2
    scanned += [fs.cat_file(m).decode() for m in manifests]

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("sec").experiment_id])
    assert run.data.params["config.storage.resume.options.secret"] == "***"
    assert run.data.params["config.storage.resume.options.key"] == "***"
    scanned += [repr(run.data.params), repr(run.data.tags)]
    for text in scanned:
        assert secret not in text and key_id not in text


def test_the_size_that_landed_is_asked_of_the_store_not_of_a_stale_listing(s3_server, bucket):
    """A listing cached by another thread before a file landed (the tiered sink copies in the
    background while the run lists the durable tier) must not make a committed write fail with
    "does not exist", nor pass with an older file's size."""
    import s3fs

    from wmtp_core.hashing import landed_size

    fs = s3fs.S3FileSystem(endpoint_url=s3_server, skip_instance_cache=True)
    other = s3fs.S3FileSystem(endpoint_url=s3_server, skip_instance_cache=True)
    step = f"{bucket}/runs/r/step_6"
    fs.pipe_file(f"{step}/.wmtp-staging", b"{}")
    fs.pipe_file(f"{step}/trainer.pt", b"x" * 10)
    assert [p.rsplit("/", 1)[1] for p in fs.ls(step)] == [".wmtp-staging", "trainer.pt"]  # cached now

    other.pipe_file(f"{step}/model.pt", b"m" * 1234)
    other.pipe_file(f"{step}/trainer.pt", b"t" * 77)
    with pytest.raises(FileNotFoundError):  # what fsspec's listings cache answers
        fs.size(f"{step}/model.pt")
    assert landed_size(fs, f"{step}/model.pt") == 1234

    fs.ls(step)
    other.pipe_file(f"{step}/trainer.pt", b"t" * 5)
    assert fs.size(f"{step}/trainer.pt") == 77  # the cached, older size
    assert landed_size(fs, f"{step}/trainer.pt") == 5
