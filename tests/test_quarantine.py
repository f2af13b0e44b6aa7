"""A corrupt newest checkpoint never stops a run: resume falls back, moves the corrupt copy
aside (a rename on local disk, copy-then-uncommit on S3), commits that step again and ends
where the uninterrupted run ends, tensor for tensor. Quarantined checkpoints are listed, never
counted or deleted by retention, and removed by ``gc --quarantined`` only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import zygote
from builders import merge, recipe, write
from conftest import KILLER, S3_ENV

from wmtp_core.commit import CheckpointStore

pytestmark = pytest.mark.slow


def config(base: str, tmp: Path, **over) -> dict:
    return merge({"seed": 5, "log_interval": 4,
                  "paths": {"checkpoints": {"base_path": base, "save_interval": 4, "keep_last": 2}},
                  "mlflow": {"experiment": "q", "tracking_uri": f"sqlite:///{tmp}/mlflow.db"},
                  "storage": {"final": {"sink": "local", "base_path": f"file://{tmp}/final"}}}, over)


def in_process(tmp: Path, monkeypatch, capsys, *args: str):
    from wmtp_core.run import main

    monkeypatch.chdir(tmp)
    code = main(["--config", "c.yaml", "--recipe", "r.yaml", *args])
    out = capsys.readouterr()
    return code, out.out, " ".join(out.err.split())


def killed_after(tmp: Path, step: int, run: str, env: dict | None = None) -> None:
    import os

    proc = zygote.run(["-c", KILLER, str(step), "--config", "c.yaml", "--recipe", "r.yaml", "--run-name", run],
                      cwd=tmp, timeout=300, env={**os.environ, **(env or {})})
    assert proc.returncode == -9, proc.stderr[-3000:]


def flip(data: bytes) -> bytes:
    b = bytearray(data)
    b[len(b) // 2] ^= 0x01
    return bytes(b)


def final_weights(tmp: Path, run: str) -> dict:
    return torch.load(tmp / "final" / run / "final" / "model.pt", weights_only=True)


def test_a_flipped_byte_in_the_newest_checkpoint_is_quarantined_and_the_run_finishes_bit_exact(
        tmp_path, monkeypatch, capsys):
    write(tmp_path / "c.yaml", config(f"file://{tmp_path}/ck", tmp_path))
    write(tmp_path / "r.yaml", recipe(12, optim={"lr": 0.003}, model={"dropout": 0.1}))
    code, _, err = in_process(tmp_path, monkeypatch, capsys, "--run-name", "full")
    assert code == 0, err[-3000:]

    killed_after(tmp_path, 9, "cut")
    run_dir = tmp_path / "ck" / "cut"
    assert sorted(p.name for p in run_dir.iterdir() if not p.name.startswith(".")) == ["step_4", "step_8"]
    model = run_dir / "step_8" / "model.pt"
    model.write_bytes(flip(model.read_bytes()))

    code, _, err = in_process(tmp_path, monkeypatch, capsys, "--run-name", "cut", "--resume", "latest")
    assert code == 0, err[-3000:]
    assert f"skipping {run_dir}/step_8: {model} does not match the manifest" in err
    assert f"quarantined {run_dir}/step_8 as {run_dir}/step_8.quarantined-" in err
    assert f"resuming 'cut' from {run_dir}/step_4 (step 4)" in err
    a, b = final_weights(tmp_path, "full"), final_weights(tmp_path, "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    (aside,) = run_dir.glob("step_8.quarantined-*")
    note = json.loads((aside / ".wmtp-quarantine").read_text())
    assert "does not match the manifest" in note["reason"] and note["from"] == str(run_dir / "step_8")
    # retention (keep_last 2) kept the newest two steps and the one resumed from, and neither
    # counted nor deleted the quarantined one
    store = CheckpointStore.from_url(f"file://{tmp_path}/ck")
    assert [m.step for _, m in store.list("cut")] == [4, 8, 12]
    assert aside.is_dir() and (aside / "manifest.json").exists(), "never deleted by retention"
    store.verify(str(run_dir / "step_8"))

    from wmtp_core.cli import main as wmtp

    assert wmtp(["checkpoints", "ls", str(run_dir), "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows[aside.name]["state"] == "quarantined" and rows[aside.name]["step"] == 8
    assert "does not match the manifest" in rows[aside.name]["problem"]

    assert wmtp(["gc", str(run_dir), "--min-age", "0"]) == 0
    assert "quarantined" in capsys.readouterr().out and aside.is_dir(), "gc keeps it unless asked"
    assert wmtp(["gc", str(run_dir), "--quarantined"]) == 0
    out = capsys.readouterr().out
    assert f"removed quarantined {aside}" in out and not aside.exists()
    assert [m.step for _, m in store.list("cut")] == [4, 8, 12]


def test_verify_quarantines_a_corrupt_checkpoint_unless_told_not_to(tmp_path, monkeypatch, capsys):
    write(tmp_path / "c.yaml", config(f"file://{tmp_path}/ck", tmp_path, storage={}))
    write(tmp_path / "r.yaml", recipe(8))
    code, _, err = in_process(tmp_path, monkeypatch, capsys, "--run-name", "v")
    assert code == 0, err[-3000:]
    run_dir = tmp_path / "ck" / "v"
    trainer = run_dir / "step_8" / "trainer.pt"
    trainer.write_bytes(trainer.read_bytes()[:-7])  # truncated

    from wmtp_core.cli import main as wmtp

    assert wmtp(["checkpoints", "verify", str(run_dir / "step_8"), "--no-quarantine"]) == 1
    assert "trainer.pt does not match the manifest" in capsys.readouterr().out
    assert (run_dir / "step_8" / "manifest.json").exists()

    assert wmtp(["checkpoints", "verify", str(run_dir)]) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "1 of 2 checkpoints verified" in out and f"quarantined as {run_dir}/step_8.quarantined-" in out
    assert not (run_dir / "step_8").exists()
    assert wmtp(["checkpoints", "verify", str(run_dir)]) == 0, "what is left verifies"

    # the run can be continued: latest is step_4 now, and step_8 is committed again
    write(tmp_path / "r.yaml", recipe(10))
    code, _, err = in_process(tmp_path, monkeypatch, capsys, "--run-name", "v", "--resume", "latest")
    assert code == 0, err[-3000:]
    assert "from " + str(run_dir / "step_4") in err
    CheckpointStore.from_url(f"file://{tmp_path}/ck").verify(str(run_dir / "step_8"))


def test_on_s3_the_corrupt_copy_is_moved_aside_and_the_run_finishes_bit_exact(tmp_path, monkeypatch, capsys,
                                                                              s3_server, bucket):
    import boto3

    write(tmp_path / "c.yaml", config(f"s3://{bucket}/ck", tmp_path))
    write(tmp_path / "r.yaml", recipe(12, optim={"lr": 0.003}, model={"dropout": 0.1}))
    code, _, err = in_process(tmp_path, monkeypatch, capsys, "--run-name", "full")
    assert code == 0, err[-3000:]
    killed_after(tmp_path, 9, "cut", env={**S3_ENV, "AWS_ENDPOINT_URL": s3_server})

    s3 = boto3.client("s3", endpoint_url=s3_server)
    key = "ck/cut/step_8/model.pt"
    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    s3.put_object(Bucket=bucket, Key=key, Body=flip(body))

    code, _, err = in_process(tmp_path, monkeypatch, capsys, "--run-name", "cut", "--resume", "latest")
    assert code == 0, err[-3000:]
    assert f"quarantined s3://{bucket}/ck/cut/step_8 as s3://{bucket}/ck/cut/step_8.quarantined-" in err
    a, b = final_weights(tmp_path, "full"), final_weights(tmp_path, "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)

    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="ck/cut/")["Contents"]]
    aside = sorted({k.split("/")[2] for k in keys if ".quarantined-" in k})
    assert len(aside) == 1
    moved = {k.split("/")[3] for k in keys if k.split("/")[2] == aside[0]}
    assert {"manifest.json", "model.pt", "optimizer.pt", "trainer.pt", ".wmtp-quarantine"} <= moved
    moved_model = s3.get_object(Bucket=bucket, Key=f"ck/cut/{aside[0]}/model.pt")["Body"].read()
    assert moved_model == flip(body), "the corrupt bytes are kept for inspection, not lost"
    store = CheckpointStore.from_url(f"s3://{bucket}/ck")
    assert [m.step for _, m in store.list("cut")] == [4, 8, 12]
    store.verify(f"{bucket}/ck/cut/step_8")
