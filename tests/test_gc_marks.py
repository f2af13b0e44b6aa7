"""``wmtp gc`` removes only what carries WMTP's own mark: a quarantined checkpoint only with the
note WMTP writes when it moves one aside (``.wmtp-quarantine``, a regular file that parses as
WMTP's note), a staging directory only with WMTP's staging marker, an incomplete S3 multipart
upload only into a directory carrying WMTP's marker (or a manifest that passes every check).
Everything else that looks alike is named and left in place.

Every leftover here is real: directories and files on local disk, objects and multipart uploads
(``create_multipart_upload`` + ``upload_part``) on a real S3 endpoint on loopback (moto). Every
command runs in a process of its own (forked from the tests' zygote) with a timeout, so a FIFO
that hung gc would fail the test instead of hanging the suite."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import zygote

from wmtp_core import Role
from wmtp_core.commit import CheckpointStore
from wmtp_core.filesink import torch_writer

CLI = "import sys; from wmtp_core.cli import main; sys.exit(main())"
STAMP = "20260101T000000Z"
NOTE = {"reason": "model.pt does not match the manifest", "from": "elsewhere", "at": "2026-01-01T00:00:00+00:00"}


def wmtp(*args, cwd: Path):
    proc = zygote.run(["-c", CLI, *map(str, args)], cwd=cwd, timeout=120, env=dict(os.environ))
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    return proc


def committed(store: CheckpointStore, run: str, step: int) -> str:
    store.write(run, f"step_{step}", {"model.pt": torch_writer({"w": torch.arange(4.0) * step}),
                                      "trainer.pt": torch_writer({"step": step})},
                step=step, role=Role.RESUME, lineage="L1", meta={"algo": "baseline-mtp"})
    return store.path_of(run, f"step_{step}")


def quarantined_by_wmtp(store: CheckpointStore, run: str, step: int) -> str:
    """A checkpoint WMTP itself moved aside (``CheckpointStore.quarantine``, its note inside)."""
    moved = store.quarantine(committed(store, run, step), "model.pt does not match the manifest")
    assert moved is not None
    return moved


def files_under(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and not p.is_symlink()}


# ------------------------------------------------------------------------------ local disk
def hand_made_quarantine(run_dir: Path, fifo: bool = True) -> dict[str, str]:
    """Folders named like quarantined checkpoints that WMTP did not move aside, each with a
    file of someone else's; returns their names and what is wrong with each. ``fifo``: one
    whose note is a FIFO (which only a command in a child of its own may meet: before the fix,
    reading it blocked for ever)."""
    made = {}

    def folder(name: str, why: str) -> Path:
        path = run_dir / f"{name}.quarantined-{STAMP}"
        path.mkdir(parents=True)
        (path / "data.bin").write_bytes(f"someone else's {name}".encode())
        made[path.name] = why
        return path

    folder("step_9", "no note")
    if fifo:
        os.mkfifo(folder("step_8", "a FIFO as its note") / ".wmtp-quarantine")
    (folder("step_7", "a note that is not JSON") / ".wmtp-quarantine").write_text("moved by hand")
    (folder("step_6", "a note of another shape") / ".wmtp-quarantine").write_text(json.dumps({"reason": 7}))
    (folder("step_5", "a note that is a directory") / ".wmtp-quarantine").mkdir()
    elsewhere = run_dir.parent / "real-note.json"
    elsewhere.write_text(json.dumps(NOTE))
    (folder("step_4", "a note that is a link") / ".wmtp-quarantine").symlink_to(elsewhere)
    (folder("final", "no note") / "weights.safetensors").write_bytes(b"theirs")
    # a link named like a quarantined checkpoint, to a directory holding a note WMTP would accept
    target = run_dir.parent / "precious"
    target.mkdir()
    (target / ".wmtp-quarantine").write_text(json.dumps(NOTE))
    (target / "thesis.tex").write_text("years of work")
    (run_dir / f"step_3.quarantined-{STAMP}").symlink_to(target, target_is_directory=True)
    made[f"step_3.quarantined-{STAMP}"] = "a link"
    return made


def test_gc_quarantined_removes_only_directories_carrying_wmtps_note(tmp_path):
    store = CheckpointStore.from_url(f"file://{tmp_path}/ck")
    committed(store, "r1", 2)
    ours = Path(quarantined_by_wmtp(store, "r1", 10))
    run_dir = tmp_path / "ck" / "r1"
    foreign = hand_made_quarantine(run_dir)
    before = files_under(tmp_path)

    listed = wmtp("gc", run_dir, "--min-age", "0", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert f"kept    {ours}: quarantined (model.pt does not match the manifest); --quarantined removes it" \
        in listed.stdout
    for name in foreign:
        assert f"kept    {run_dir / name}: not WMTP's (" in listed.stdout, (name, listed.stdout)

    proc = wmtp("gc", run_dir, "--min-age", "0", "--quarantined", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for name in foreign:
        assert proc.stdout.count(f"kept    {run_dir / name}: not WMTP's (") == 1, (name, proc.stdout)
    for name in (f"step_9.quarantined-{STAMP}", f"step_7.quarantined-{STAMP}", f"final.quarantined-{STAMP}"):
        assert f"kept    {run_dir / name}: not WMTP's (no .wmtp-quarantine note); left in place" in proc.stdout
    assert f"removed quarantined {ours} (" in proc.stdout
    assert "removed 0 staging directories, removed 1 quarantined checkpoint;" in proc.stdout
    assert "failed verification (no note)" not in proc.stdout
    # WMTP's own leftover is gone; every file of someone else's is still there, byte for byte
    assert not ours.exists()
    after = files_under(tmp_path)
    assert after == {k: v for k, v in before.items() if not k.startswith(f"ck/r1/{ours.name}/")}
    assert all((run_dir / name).exists() or (run_dir / name).is_symlink() for name in foreign)
    assert (run_dir.parent / "precious" / "thesis.tex").read_text() == "years of work"
    # the run's committed checkpoint is untouched, and ls tells the hand-made folders apart
    ls = wmtp("checkpoints", "ls", run_dir, "--json", cwd=tmp_path)
    assert ls.returncode == 0, ls.stderr
    rows = {e["name"]: (e["state"], e["problem"]) for e in json.loads(ls.stdout)}
    assert rows["step_2"] == ("committed", "")
    assert {name: rows[name] for name in foreign} == {
        name: ("foreign", "a link, not a directory WMTP moved aside" if why == "a link" else "no .wmtp-quarantine note")
        for name, why in foreign.items()}


def test_the_sinks_quarantined_lists_only_wmtps_quarantine(tmp_path):
    """``FileSink.quarantined()`` (what the run reports) names what WMTP moved aside only."""
    store = CheckpointStore.from_url(f"file://{tmp_path}/ck")
    ours = quarantined_by_wmtp(store, "r1", 4)
    hand_made_quarantine(tmp_path / "ck" / "r1", fifo=False)
    assert [i.path for i in store.quarantined("r1")] == [ours]
    assert {i.state.value for i in store.quarantine_dirs("r1")} == {"quarantined", "foreign"}


def test_gc_removes_only_staging_that_carries_wmtps_marker(tmp_path):
    store = CheckpointStore.from_url(f"file://{tmp_path}/ck")
    committed(store, "r1", 2)
    ours = Path(store.prepare("r1", "step_4"))
    (ours / "model.pt").write_bytes(b"half a file")
    run_dir = tmp_path / "ck" / "r1"
    (run_dir / "step_6").mkdir()
    (run_dir / "step_6" / "model.pt").write_bytes(b"another tool's step_6")
    (run_dir / "step_8" / ".wmtp-staging").mkdir(parents=True)  # a directory named like the marker
    (run_dir / "step_8" / ".wmtp-staging" / "keep.txt").write_text("not a marker")
    (run_dir / "final").mkdir()
    (run_dir / "final" / "weights.safetensors").write_bytes(b"theirs")
    before = files_under(tmp_path)

    proc = wmtp("gc", run_dir, "--min-age", "0", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"removed {ours} (2 files," in proc.stdout
    for name in ("step_6", "step_8", "final"):
        assert f"kept    {run_dir / name}: not ours (" in proc.stdout and "left in place" in proc.stdout, name
    assert "removed 1 staging directory;" in proc.stdout
    assert not ours.exists()
    assert files_under(tmp_path) == {k: v for k, v in before.items() if not k.startswith("ck/r1/step_4/")}
    # and a save never overwrites a directory whose marker is not a file
    from wmtp_core.errors import CheckpointError

    with pytest.raises(CheckpointError, match="was not written by WMTP"):
        store.prepare("r1", "step_8")
    assert (run_dir / "step_8" / ".wmtp-staging" / "keep.txt").exists()


# ------------------------------------------------------------------------------ S3
def begin_upload(endpoint: str, bucket: str, key: str) -> None:
    """A multipart upload begun at ``key`` with one part, never completed nor aborted."""
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    upload = client.create_multipart_upload(Bucket=bucket, Key=key)
    client.upload_part(Bucket=bucket, Key=key, UploadId=upload["UploadId"], PartNumber=1, Body=os.urandom(4096))


def uploads(endpoint: str, bucket: str, prefix: str = "") -> list[str]:
    import boto3

    found = boto3.client("s3", endpoint_url=endpoint).list_multipart_uploads(Bucket=bucket, Prefix=prefix)
    return sorted(u["Key"] for u in found.get("Uploads", []))


FOREIGN_UPLOADS = [
    "runs/otherjob/step_5/data.bin",  # a run-like directory holding nothing else
    "runs/big/final/x.bin",
    "runs/r1/step_4/model.pt",  # a WMTP part name, but no save of WMTP's began there
    "runs/r1/step_6/data.bin",  # into a directory another tool wrote
    "runs/r1/scratch/x.bin",  # not a step_N or final directory
    "runs/loose.bin",
]


def test_gc_incomplete_aborts_only_uploads_carrying_wmtps_mark(s3_server, bucket, tmp_path):
    import boto3

    from conftest import s3_keys

    base = f"s3://{bucket}/runs"
    store = CheckpointStore.from_url(base)
    committed(store, "r1", 2)
    ours = store.prepare("r1", "step_8")  # a save of WMTP's, killed while it uploaded model.pt
    begin_upload(s3_server, bucket, "runs/r1/step_8/model.pt")
    boto3.client("s3", endpoint_url=s3_server).put_object(Bucket=bucket, Key="runs/r1/step_6/theirs.txt",
                                                           Body=b"another tool's")
    for key in FOREIGN_UPLOADS:
        begin_upload(s3_server, bucket, key)
    objects = s3_keys(s3_server, bucket)

    # without --incomplete: the staging stays, since its marker is what makes its upload WMTP's
    plain = wmtp("gc", base, "--min-age", "0", cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr
    assert (f"kept    s3://{ours}: 1 incomplete upload of a killed save into it (its marker is their mark); "
            "`wmtp gc --incomplete` aborts them, then removes it") in plain.stdout
    assert s3_keys(s3_server, bucket) == objects
    assert len(uploads(s3_server, bucket)) == len(FOREIGN_UPLOADS) + 1

    dry = wmtp("gc", base, "--incomplete", "--min-age", "0", "--dry-run", cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert f"would abort incomplete upload of {base}/r1/step_8/model.pt" in dry.stdout
    assert f"would remove s3://{ours}" in dry.stdout
    assert len(uploads(s3_server, bucket)) == len(FOREIGN_UPLOADS) + 1

    proc = wmtp("gc", base, "--incomplete", "--min-age", "0", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for key in FOREIGN_UPLOADS[:5]:
        line = next((ln for ln in proc.stdout.splitlines()
                     if ln.startswith(f"kept    incomplete upload of s3://{bucket}/{key}: not ours (")), None)
        assert line is not None and line.endswith("; left in place"), (key, proc.stdout)
    assert (f"kept    incomplete upload of {base}/otherjob/step_5/data.bin: not ours ({base}/otherjob/step_5 "
            "holds nothing, so no .wmtp-staging marker: no save of WMTP's began there); left in place") in proc.stdout
    assert f"aborted incomplete upload of {base}/r1/step_8/model.pt" in proc.stdout
    assert f"removed s3://{ours}" in proc.stdout
    assert "removed 1 staging directory, aborted 1 incomplete upload;" in proc.stdout
    # every foreign upload survives, with its part; WMTP's own is gone
    assert uploads(s3_server, bucket) == sorted(FOREIGN_UPLOADS)
    assert set(s3_keys(s3_server, bucket)) == {k for k in objects if not k.startswith("runs/r1/step_8/")}

    again = wmtp("gc", base, "--incomplete", "--min-age", "0", cwd=tmp_path)
    assert "removed 0 staging directories, aborted 0 incomplete uploads;" in again.stdout
    assert uploads(s3_server, bucket) == sorted(FOREIGN_UPLOADS)


def test_gc_quarantined_on_s3_removes_only_wmtps_quarantine(s3_server, bucket, tmp_path):
    import boto3

    from conftest import s3_keys

    base = f"s3://{bucket}/runs"
    store = CheckpointStore.from_url(base)
    committed(store, "r1", 2)
    ours = quarantined_by_wmtp(store, "r1", 4)
    client = boto3.client("s3", endpoint_url=s3_server)
    client.put_object(Bucket=bucket, Key=f"runs/r1/step_9.quarantined-{STAMP}/data.bin", Body=b"someone else's")
    client.put_object(Bucket=bucket, Key=f"runs/r1/step_7.quarantined-{STAMP}/.wmtp-quarantine", Body=b"{not json")
    client.put_object(Bucket=bucket, Key=f"runs/r1/step_7.quarantined-{STAMP}/data.bin", Body=b"theirs")
    client.put_object(Bucket=bucket, Key=f"runs/r1/step_6.quarantined-{STAMP}/.wmtp-quarantine/x", Body=b"{}")
    foreign = [k for k in s3_keys(s3_server, bucket) if ".quarantined-" + STAMP in k]

    proc = wmtp("gc", base, "--min-age", "0", "--quarantined", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for step in (9, 7, 6):
        assert f"kept    {base}/r1/step_{step}.quarantined-{STAMP}: not WMTP's (no .wmtp-quarantine note); " \
               "left in place" in proc.stdout, proc.stdout
    assert f"removed quarantined s3://{ours}" in proc.stdout
    assert "removed 1 quarantined checkpoint;" in proc.stdout
    keys = s3_keys(s3_server, bucket)
    assert [k for k in keys if ".quarantined-" in k] == foreign
    assert "runs/r1/step_2/manifest.json" in keys
