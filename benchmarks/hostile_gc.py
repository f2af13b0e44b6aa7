"""Campaign scenario: ``wmtp gc`` beside things WMTP did not write (issue 18, items 8 and 11).

Each round lays out, beside WMTP's own leftovers (a killed save's staging directory, a
checkpoint WMTP quarantined, a killed save's multipart upload), hand-made look-alikes: folders
named ``step_N.quarantined-<time>`` without WMTP's note or with a note that is a FIFO, a link to
``/dev/zero``, not JSON, of another shape, a directory, a link, over the cap; a quarantine-like
link to a precious directory; ``step_N``/``final`` folders without the staging marker or with a
marker that is a directory; on S3 (a moto server process), foreign multipart uploads under the
base path (``otherjob/step_5/data.bin``, ``big/final/x.bin``, a WMTP part name where no save
began, an upload into another tool's directory). Then ``wmtp gc --quarantined --incomplete
--min-age 0`` runs in a forked process with a timeout.

Counted: every look-alike is tried; it survives when it is left exactly as it was and gc ended
with exit 0, one line per item, no traceback. "foreign objects removed" (must be 0) and "own
leftovers left behind" (must be 0: WMTP's own staging, quarantine and uploads are removed, its
committed checkpoint is not) are fields of the tally and a note. A third tally gives every
``wmtp`` command that reads ``s3://`` half the credentials (a key without its secret, and the
reverse): one line, exit 2, the secret never printed.

    from hostile_gc import scenario_i18gc
    tallies = scenario_i18gc(1, out, random.Random(1), print)
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import attrs

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from faults import S3_ENV, MotoProcess, Tally, in_child  # noqa: E402

STAMP = "20260101T000000Z"
NOTE = {"reason": "model.pt does not match the manifest", "from": "elsewhere", "at": "2026-01-01T00:00:00+00:00"}
TIMEOUT_S = 120.0


@attrs.define
class GcTally(Tally):
    """A :class:`Tally` with what gc must never do, and what it must do."""

    foreign_removed: int = 0
    """Foreign objects gc removed or changed (must be 0)."""
    own_left: int = 0
    """WMTP's own leftovers gc did not remove (must be 0)."""
    refused: int = 0
    """Legitimate runs refused for good (none here: gc ends no run)."""

    def counts(self) -> None:
        self.notes.insert(0, f"foreign objects removed: {self.foreign_removed}; own leftovers left behind: "
                             f"{self.own_left}; legitimate runs refused for good: {self.refused}")


# ----------------------------------------------------------------------------- processes
def forked_cli(args: list[str], env: dict[str, str] | None = None,
               timeout: float = TIMEOUT_S) -> tuple[int | None, str, str]:
    """``wmtp ARGS`` in a forked child: ``(exit status or -signal, stdout, stderr)``, the status
    ``None`` when it did not end within ``timeout`` (then it is killed: a hang)."""
    out = tempfile.NamedTemporaryFile(prefix="wmtp-gc-", suffix=".out", delete=False)
    err = tempfile.NamedTemporaryFile(prefix="wmtp-gc-", suffix=".err", delete=False)
    out.close()
    err.close()
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            os.setsid()
            os.dup2(os.open(out.name, os.O_WRONLY), 1)
            os.dup2(os.open(err.name, os.O_WRONLY), 2)
            os.environ.update(env or {})
            from wmtp_core.cli import main

            code = main(args)
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 71
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code if isinstance(code, int) else 72)
    deadline, status = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        done, st = os.waitpid(pid, os.WNOHANG)
        if done:
            status = os.waitstatus_to_exitcode(st)
            break
        time.sleep(0.02)
    if status is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    texts = [Path(f.name).read_text(errors="replace") for f in (out, err)]
    for f in (out, err):
        os.unlink(f.name)
    return status, texts[0], texts[1]


# ----------------------------------------------------------------------------- local disk
def _snapshot(path: Path) -> Any:
    """What a look-alike is, to compare after gc: its files' bytes (a FIFO or a link by kind)."""
    if path.is_symlink():
        return ("link", os.readlink(path))
    if not path.exists():
        return None
    if path.is_dir():
        return {p.name: _snapshot(p) for p in sorted(path.iterdir())}
    if path.is_fifo():
        return "fifo"
    return path.read_bytes()


def _local_lookalikes(run_dir: Path, rng: random.Random) -> dict[str, Path]:
    """Hand-made look-alikes in ``run_dir``, by what each is."""
    made: dict[str, Path] = {}
    steps = iter(rng.sample(range(100, 10_000), 16))

    def folder(what: str, name: str | None = None) -> Path:
        path = run_dir / (name or f"step_{next(steps)}.quarantined-{STAMP}")
        path.mkdir(parents=True)
        (path / "data.bin").write_bytes(os.urandom(64))
        made[what] = path
        return path

    folder("quarantine-like, no note")
    folder("final quarantine-like, no note", f"final.quarantined-{STAMP}")
    os.mkfifo(folder("note a FIFO") / ".wmtp-quarantine")
    (folder("note a link to /dev/zero") / ".wmtp-quarantine").symlink_to("/dev/zero")
    (folder("note not JSON") / ".wmtp-quarantine").write_text("moved aside by hand")
    (folder("note of another shape") / ".wmtp-quarantine").write_text(json.dumps({"reason": ["x"], "at": 1}))
    (folder("note a directory") / ".wmtp-quarantine").mkdir()
    real = run_dir.parent / f"note-{next(steps)}.json"
    real.write_text(json.dumps(NOTE))
    (folder("note a link to a valid note") / ".wmtp-quarantine").symlink_to(real)
    (folder("note over the cap") / ".wmtp-quarantine").write_text(json.dumps({**NOTE, "pad": "x" * (2 << 20)}))
    precious = run_dir.parent / f"precious-{next(steps)}"
    precious.mkdir()
    (precious / ".wmtp-quarantine").write_text(json.dumps(NOTE))
    (precious / "thesis.tex").write_text("years of work")
    link = run_dir / f"step_{next(steps)}.quarantined-{STAMP}"
    link.symlink_to(precious, target_is_directory=True)
    made["quarantine-like link to a directory with a valid note"] = precious
    made["the link itself"] = link
    folder("step_N without the staging marker", f"step_{next(steps)}")
    (folder("step_N whose marker is a directory", f"step_{next(steps)}") / ".wmtp-staging").mkdir()
    folder("final without the staging marker", "final")
    return made


def _local_setup(base: Path) -> tuple[str, list[str]]:
    """In a child: a run's committed checkpoint and WMTP's own leftovers beside it (a
    checkpoint it quarantined, staging of killed saves); returns their paths."""
    import torch

    from wmtp_core import Role
    from wmtp_core.commit import CheckpointStore
    from wmtp_core.filesink import torch_writer

    store = CheckpointStore.from_url(f"file://{base}")

    def checkpoint(run: str, step: int) -> str:
        store.write(run, f"step_{step}", {"model.pt": torch_writer({"w": torch.ones(4) * step})},
                    step=step, role=Role.RESUME, lineage="L1")
        return store.path_of(run, f"step_{step}")

    kept = checkpoint("r1", 2)
    own = [store.quarantine(checkpoint("r1", 4), "model.pt does not match the manifest"),
           store.prepare("r1", "step_6"), store.prepare("r2", "step_2"), store.prepare("r2", "final")]
    Path(own[1], "model.pt").write_bytes(b"half a file")
    return kept, own


def _verifies(path: str) -> str:
    from wmtp_core.commit import CheckpointStore

    try:
        CheckpointStore.from_url(f"file://{os.path.dirname(os.path.dirname(path))}").verify(path)
    except Exception as e:  # noqa: BLE001 - named
        return f"{type(e).__name__}: {e}"
    return ""


def _local_round(tally: GcTally, work: Path, rng: random.Random) -> None:
    base = work / "ck"
    kept, own = in_child(lambda: _local_setup(base))
    foreign = _local_lookalikes(base / "r1", rng)
    before = {what: _snapshot(p) for what, p in foreign.items()}
    code, out, err = forked_cli(["gc", str(base), "--quarantined", "--min-age", "0"])
    _judge(tally, "local", code, out, err, {what: _snapshot(p) == before[what] for what, p in foreign.items()})
    left = [p for p in own if os.path.exists(p)]
    tally.own_left += len(left)
    if left:
        tally.bad(f"local: WMTP's own leftovers left: {left}")
    problem = in_child(lambda: _verifies(kept))
    if problem:
        tally.lost += 1
        tally.bad(f"local: the committed checkpoint no longer verifies: {problem}")


def _judge(tally: GcTally, where: str, code: int | None, out: str, err: str, intact: dict[str, bool]) -> None:
    clean = code == 0 and "Traceback" not in out + err
    tally.tried += len(intact)
    tally.hangs += code is None
    tally.tracebacks += code is not None and not clean
    if not clean:
        tally.bad(f"{where}: gc exit {code}: {(err or out).strip()[-300:]}")
    for what, ok in intact.items():
        tally.survived += ok and clean
        if not ok:
            tally.foreign_removed += 1
            tally.bad(f"{where}: {what}: removed or changed by gc")


# ----------------------------------------------------------------------------- S3
FOREIGN_UPLOADS = ("runs/otherjob/step_5/data.bin", "runs/big/final/x.bin", "runs/r1/step_40/model.pt",
                   "runs/r1/step_41/data.bin", "runs/r1/scratch/x.bin", "runs/loose.bin")
FOREIGN_OBJECTS = (f"runs/r1/step_9.quarantined-{STAMP}/data.bin",
                   f"runs/r1/step_7.quarantined-{STAMP}/.wmtp-quarantine", f"runs/r1/step_7.quarantined-{STAMP}/x",
                   f"runs/r1/step_6.quarantined-{STAMP}/.wmtp-quarantine/x", "runs/r1/step_41/theirs.txt",
                   "runs/r1/step_42/.wmtp-staging/x", "runs/otherjob/step_3/data.bin")


def _s3_setup(endpoint: str, bucket: str) -> dict[str, Any]:
    """In a child: the run's committed checkpoint, WMTP's own leftovers, the foreign look-alikes."""
    import boto3
    import torch

    from wmtp_core import Role
    from wmtp_core.commit import CheckpointStore
    from wmtp_core.filesink import torch_writer

    os.environ.update(S3_ENV, AWS_ENDPOINT_URL=endpoint)
    client = boto3.client("s3", endpoint_url=endpoint)
    store = CheckpointStore.from_url(f"s3://{bucket}/runs")
    for step in (2, 4):
        store.write("r1", f"step_{step}", {"model.pt": torch_writer({"w": torch.ones(4) * step})},
                    step=step, role=Role.RESUME, lineage="L1")
    quarantined = store.quarantine(store.path_of("r1", "step_4"), "model.pt does not match the manifest")
    staging = store.prepare("r1", "step_8")

    def begin(key: str) -> None:
        upload = client.create_multipart_upload(Bucket=bucket, Key=key)
        client.upload_part(Bucket=bucket, Key=key, UploadId=upload["UploadId"], PartNumber=1, Body=os.urandom(4096))

    begin("runs/r1/step_8/model.pt")
    for key in FOREIGN_OBJECTS:
        client.put_object(Bucket=bucket, Key=key, Body=b"{not WMTP's" + os.urandom(16))
    for key in FOREIGN_UPLOADS:
        begin(key)
    return {"quarantined": quarantined, "staging": staging, "objects": _s3_state(endpoint, bucket)}


def _s3_state(endpoint: str, bucket: str) -> dict[str, Any]:
    """In a child: every object (its ETag) and every incomplete upload in ``bucket``."""
    import boto3

    os.environ.update(S3_ENV, AWS_ENDPOINT_URL=endpoint)
    client = boto3.client("s3", endpoint_url=endpoint)
    objects = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for o in page.get("Contents", []):
            objects[o["Key"]] = o["ETag"]
    found = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    return {"objects": objects, "uploads": sorted(u["Key"] for u in found)}


def _s3_round(tally: GcTally, moto: MotoProcess, rng: random.Random) -> None:
    bucket = moto.bucket(f"gc-{rng.randrange(1 << 30):x}")
    made = in_child(lambda: _s3_setup(moto.endpoint, bucket))
    before = made["objects"]
    env = {**S3_ENV, "AWS_ENDPOINT_URL": moto.endpoint}
    code, out, err = forked_cli(["gc", f"s3://{bucket}/runs", "--quarantined", "--incomplete", "--min-age", "0"], env)
    after = in_child(lambda: _s3_state(moto.endpoint, bucket))
    intact = {f"upload {k}": k in after["uploads"] for k in FOREIGN_UPLOADS}
    intact.update({f"object {k}": after["objects"].get(k) == before["objects"][k] for k in FOREIGN_OBJECTS})
    _judge(tally, "s3", code, out, err, intact)
    own = [k for k in after["objects"] if k.startswith(("runs/r1/step_8/", made["quarantined"].split("/", 1)[1]))]
    own += [k for k in after["uploads"] if k.startswith("runs/r1/step_8/")]
    tally.own_left += len(own)
    if own:
        tally.bad(f"s3: WMTP's own leftovers left: {own[:5]}")
    if "runs/r1/step_2/manifest.json" not in after["objects"]:
        tally.lost += 1
        tally.bad("s3: the committed checkpoint step_2 is gone")


def _credentials_round(tally: GcTally, moto: MotoProcess, rng: random.Random) -> None:
    """Every command that reads s3:// given half the credentials: one line, exit 2, no secret."""
    bucket = moto.bucket(f"creds-{rng.randrange(1 << 30):x}")
    secret = f"campaign-secret-{rng.randrange(1 << 40):x}"
    env = {**S3_ENV, "AWS_ENDPOINT_URL": moto.endpoint}
    for command in (["checkpoints", "ls"], ["checkpoints", "verify"], ["gc"], ["report"]):
        for given in ("secret", "key", "password", "username"):
            code, out, err = forked_cli([*command, f"s3://{bucket}/runs/r1", "--storage-option",
                                         f"{given}={secret}"], env)
            tally.tried += 1
            ok = code == 2 and len(err.strip().splitlines()) == 1 and "is missing;" in err
            tally.hangs += code is None
            tally.tracebacks += "Traceback" in out + err
            if secret in out + err:
                ok = False
                tally.bad(f"{' '.join(command)} {given}=...: the secret was printed")
            if not ok:
                tally.bad(f"{' '.join(command)} {given}=...: exit {code}: {err.strip()[-300:]}")
            tally.survived += ok


# ----------------------------------------------------------------------------- the scenario
def scenario_i18gc(rounds: int, out: Path, rng: random.Random, log: Callable[[str], Any]) -> list[Tally]:
    """``wmtp gc`` beside hand-made look-alikes, on local disk and on S3, and half credentials
    given to every command that reads S3; ``rounds`` rounds of each (1: about half a minute)."""
    local, s3, creds = (GcTally("hostile gc targets, local disk"), GcTally("hostile gc targets, S3"),
                        GcTally("half S3 credentials (wmtp commands)"))
    with MotoProcess() as moto:
        for r in range(rounds):
            work = Path(tempfile.mkdtemp(prefix="wmtp-hostile-gc-", dir=out))
            try:
                _local_round(local, work, rng)
                _s3_round(s3, moto, rng)
                if r == 0:
                    _credentials_round(creds, moto, rng)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            log(f"  hostile gc: round {r + 1}/{rounds}")
    for t in (local, s3, creds):
        t.counts()
        log(f"{t.scenario}: {t.survived}/{t.tried} survived, tracebacks {t.tracebacks}, hangs {t.hangs}, "
            f"foreign objects removed {t.foreign_removed}, own leftovers left {t.own_left}")
    return [local, s3, creds]


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--seed", type=int, default=18)
    a = p.parse_args()
    from faults import preload

    preload()
    target = Path(tempfile.mkdtemp(prefix="wmtp-hostile-gc-"))
    try:
        tallies = scenario_i18gc(a.rounds, target, random.Random(a.seed), print)
    finally:
        shutil.rmtree(target, ignore_errors=True)
    bad = any(t.tracebacks or t.hangs or t.lost or t.foreign_removed or t.own_left or t.survived < t.tried
              for t in tallies)
    for t in tallies:
        print(t.row(), t.notes)
    sys.exit(1 if bad else 0)
