"""Clean starts: a run removes its own incomplete saves before its first save (staging
directories, and multipart uploads to S3 that a killed save never completed), and never another
run's; ``wmtp gc --incomplete`` does the same on demand. Every leftover here is made by a real
process killed (SIGKILL) while it saved, against a real S3 endpoint on loopback (moto)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import zygote
from builders import merge, recipe, write

pytestmark = pytest.mark.slow

ENV = {"OMP_NUM_THREADS": "1"}
BLOCK = 5 << 20
"""The smallest S3 part: any file larger than this is uploaded in parts."""

KILLED_MID_UPLOAD = """
import os, signal, sys
import s3fs.core
from wmtp_core.run import main

# SIGKILL this process as soon as one part of a file of step argv[1] has landed in S3: the
# multipart upload is begun and never completed nor aborted
real = s3fs.core.S3File._upload_chunk

def upload_chunk(self, final=False):
    out = real(self, final)
    if f"/step_{sys.argv[1]}/" in self.path and getattr(self, "parts", None):
        os.kill(os.getpid(), signal.SIGKILL)
    return out

s3fs.core.S3File._upload_chunk = upload_chunk
sys.exit(main(sys.argv[2:]))
"""

KILLED_WRITER = """
import os, signal, sys
import fsspec
from wmtp_core.commit import CheckpointStore

# what a save of run argv[2] killed while it uploaded argv[3] leaves: the staging directory WMTP
# marked as its own, and a multipart upload with one part in S3 (argv[4] == "foreign": a
# directory another tool writes into, without the marker)
store = CheckpointStore.from_url(sys.argv[1], default_block_size=int(sys.argv[5]))
run, name = sys.argv[2], os.path.dirname(sys.argv[3])
if sys.argv[4] == "foreign":
    store.fs.pipe_file(store.path_of(run, name) + "/theirs.txt", b"another tool's")
else:
    store.prepare(run, name)
with store.fs.open(store.path_of(run, sys.argv[3]), "wb") as f:
    f.write(os.urandom(int(sys.argv[5]) + (1 << 20)))
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
"""

KILLED_LOCAL_SAVE = """
import os, signal, sys
from wmtp_core import filesink
from wmtp_core.run import main

# SIGKILL this process right after the first file of step argv[1]'s save is written
real = filesink.torch_writer.save_to_path

def save_to_path(self, path):
    real(self, path)
    if f"/step_{sys.argv[1]}/" in path:
        os.kill(os.getpid(), signal.SIGKILL)

filesink.torch_writer.save_to_path = save_to_path
sys.exit(main(sys.argv[2:]))
"""

SEES_AT_FIRST_STEP = """
import os, sys
from wmtp_core import hookimpl
from wmtp_core.run import main

class Look:
    # after the first step of this process, before any save: which of these directories exist
    @hookimpl
    def wmtp_step_ended(self, event):
        if "loss" in event.metrics and not getattr(self, "seen", False):
            self.seen = True
            for path in sys.argv[1].split(","):
                print(f"at first step: {path} {'exists' if os.path.exists(path) else 'gone'}", flush=True)

sys.exit(main(sys.argv[2:], plugins=(Look(),)))
"""


def script(cwd: Path, name: str, code: str, args: list[str]):
    (cwd / name).write_text(code)
    return zygote.run([str(cwd / name), *map(str, args)], cwd=cwd, timeout=600, env={**os.environ, **ENV})


def wmtp(*args, cwd: Path):
    return zygote.run(["-c", "import sys; from wmtp_core.cli import main; sys.exit(main())", *map(str, args)],
                      cwd=cwd, timeout=600, env={**os.environ, **ENV})


def uploads(endpoint: str, bucket: str, prefix: str) -> list[str]:
    """Keys of the multipart uploads begun under ``prefix`` and never completed nor aborted."""
    import boto3

    found = boto3.client("s3", endpoint_url=endpoint).list_multipart_uploads(Bucket=bucket, Prefix=prefix)
    return sorted(u["Key"] for u in found.get("Uploads", []))


def killed_writer(cwd: Path, base: str, run: str, file: str, foreign: bool = False) -> None:
    proc = script(cwd, "writer.py", KILLED_WRITER, [base, run, file, "foreign" if foreign else "ours", BLOCK])
    assert proc.returncode == -9, proc.stderr[-3000:]


def s3_config(base: str, tmp: Path) -> dict:
    return {
        "seed": 6,
        "log_interval": 2,
        "paths": {"checkpoints": {"base_path": base, "save_interval": 2, "keep_last": 2}},
        "mlflow": None,
        "storage": {"resume": {"sink": "s3", "options": {"default_block_size": BLOCK}},
                    "final": {"sink": "local", "base_path": f"file://{tmp}/final"}},
    }


# a model whose resume files are larger than one part (about 10 MiB of weights, twice that of
# AdamW moments)
BIG = {"model": {"d_model": 256, "n_layers": 1, "n_heads": 4, "n_future": 2, "max_seq_len": 32}}


def test_a_run_resumed_after_a_save_killed_mid_upload_leaves_no_incomplete_upload(s3_server, bucket, tmp_path):
    base = f"s3://{bucket}/runs"
    write(tmp_path / "c.yaml", s3_config(base, tmp_path))
    write(tmp_path / "r.yaml", merge(recipe(4), BIG))
    args = ["--config", "c.yaml", "--recipe", "r.yaml", "--run-name", "cut"]
    killed = script(tmp_path, "kill.py", KILLED_MID_UPLOAD, ["4", *args])
    assert killed.returncode == -9, killed.stderr[-3000:]
    mine = uploads(s3_server, bucket, "runs/cut/")
    assert mine and all(k.startswith("runs/cut/step_4/") for k in mine), mine
    # another run's save killed the same way; its name starts with this run's
    killed_writer(tmp_path, base, "cut2", "step_2/optimizer.pt")
    theirs = uploads(s3_server, bucket, "runs/cut2/")
    assert theirs == ["runs/cut2/step_2/optimizer.pt"]

    resumed = script(tmp_path, "run.py", "import sys\nfrom wmtp_core.run import main\nsys.exit(main(sys.argv[1:]))\n",
                     [*args, "--resume", "latest"])
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "step_2 (step 2)" in resumed.stderr
    assert uploads(s3_server, bucket, "runs/cut/") == [], "the run left its own incomplete upload"
    assert uploads(s3_server, bucket, "runs/cut2/") == theirs, "the run touched another run's upload"
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    assert fs.exists(f"{bucket}/runs/cut/step_4/manifest.json")
    assert fs.exists(f"{bucket}/runs/cut2/step_2/.wmtp-staging"), "another run's staging was removed"


def test_a_local_run_removes_its_own_staging_before_its_first_save(tmp_path):
    from wmtp_core.commit import CheckpointStore

    base = tmp_path / "ck"
    config = {"seed": 6, "log_interval": 2, "mlflow": None, "storage": {"final": {"sink": "local"}},
              "paths": {"checkpoints": {"base_path": f"file://{base}", "save_interval": 2, "keep_last": 2}}}
    write(tmp_path / "c.yaml", config)
    write(tmp_path / "r.yaml", recipe(6))
    args = ["--config", "c.yaml", "--recipe", "r.yaml", "--run-name", "cut"]
    killed = script(tmp_path, "kill.py", KILLED_LOCAL_SAVE, ["4", *args])
    assert killed.returncode == -9, killed.stderr[-3000:]
    own = base / "cut" / "step_4"
    assert (own / ".wmtp-staging").exists() and not (own / "manifest.json").exists()
    # another run's save killed the same way, and a directory another tool wrote
    other = Path(CheckpointStore.from_url(str(base)).prepare("cut2", "step_4"))
    (other / "model.pt").write_bytes(b"half a file")
    foreign = base / "cut" / "step_9"
    foreign.mkdir()
    (foreign / "theirs.bin").write_bytes(b"not WMTP's")

    resumed = script(tmp_path, "look.py", SEES_AT_FIRST_STEP,
                     [f"{own},{other},{foreign}", *args, "--resume", "latest"])
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    # the resumed run continues at step 3 and saves step 4 again: the staging is gone before that
    assert f"at first step: {own} gone" in resumed.stdout, resumed.stdout[-3000:]
    assert f"at first step: {other} exists" in resumed.stdout
    assert f"at first step: {foreign} exists" in resumed.stdout
    assert (other / "model.pt").exists() and (foreign / "theirs.bin").exists()
    assert (base / "cut" / "step_6" / "manifest.json").exists()


def test_the_sink_toolkit_removes_only_its_own_runs_incomplete_saves(s3_server, bucket, tmp_path):
    """What the session calls before the first save: ``FileSink.clean_incomplete()``."""
    from conftest import run_info

    from wmtp_core import FileSink
    from wmtp_core.events import SinkContext
    from wmtp_core.roles import Role

    base = f"s3://{bucket}/runs"
    killed_writer(tmp_path, base, "mine", "step_2/optimizer.pt")
    killed_writer(tmp_path, base, "mine", "final/model.pt")
    killed_writer(tmp_path, base, "mine2", "step_2/optimizer.pt")
    killed_writer(tmp_path, base, "mine", "step_8/weights.bin", foreign=True)
    assert len(uploads(s3_server, bucket, "runs/mine/")) == 3

    sink = FileSink(SinkContext(role=Role.RESUME, run=run_info(name="mine"), base_path=base))
    removed = sink.clean_incomplete()
    assert sorted((i.kind, i.uri) for i in removed) == [
        ("staging", f"s3://{bucket}/runs/mine/final"),
        ("staging", f"s3://{bucket}/runs/mine/step_2"),
        ("upload", f"s3://{bucket}/runs/mine/final/model.pt"),
        ("upload", f"s3://{bucket}/runs/mine/step_2/optimizer.pt"),
    ]
    # another tool's directory and its upload, and the other run's, are untouched
    assert uploads(s3_server, bucket, "runs/mine/") == ["runs/mine/step_8/weights.bin"]
    assert uploads(s3_server, bucket, "runs/mine2/") == ["runs/mine2/step_2/optimizer.pt"]
    sink.checkpoints.fs.invalidate_cache()
    assert sink.checkpoints.fs.exists(f"{bucket}/runs/mine/step_8/theirs.txt")
    assert sink.checkpoints.fs.exists(f"{bucket}/runs/mine2/step_2/.wmtp-staging")
    assert not sink.checkpoints.fs.exists(f"{bucket}/runs/mine/step_2")
    assert sink.clean_incomplete() == []


def test_wmtp_gc_incomplete_aborts_the_runs_own_uploads_on_demand(s3_server, bucket, tmp_path):
    base = f"s3://{bucket}/runs"
    killed_writer(tmp_path, base, "gcrun", "step_2/optimizer.pt")
    killed_writer(tmp_path, base, "gcrun2", "step_4/model.pt")
    killed_writer(tmp_path, base, "gcrun", "step_8/weights.bin", foreign=True)

    plain = wmtp("gc", f"{base}/gcrun", "--min-age", "0", cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr
    assert uploads(s3_server, bucket, "runs/gcrun/") == ["runs/gcrun/step_2/optimizer.pt",
                                                         "runs/gcrun/step_8/weights.bin"], "gc without --incomplete"
    killed_writer(tmp_path, base, "gcrun", "step_2/optimizer.pt")  # its staging again, a second upload

    dry = wmtp("gc", f"{base}/gcrun", "--incomplete", "--min-age", "0", "--dry-run", cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert f"would abort incomplete upload of {base}/gcrun/step_2/optimizer.pt" in dry.stdout
    assert len(uploads(s3_server, bucket, "runs/gcrun/")) == 3

    proc = wmtp("gc", f"{base}/gcrun", "--incomplete", "--min-age", "0", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count(f"aborted incomplete upload of {base}/gcrun/step_2/optimizer.pt") == 2
    assert f"kept    incomplete upload of {base}/gcrun/step_8/weights.bin: not ours" in proc.stdout
    assert f"removed {base}/gcrun/step_2" in proc.stdout
    assert "removed 1 staging directory, aborted 2 incomplete uploads" in proc.stdout
    assert uploads(s3_server, bucket, "runs/gcrun/") == ["runs/gcrun/step_8/weights.bin"]
    assert uploads(s3_server, bucket, "runs/gcrun2/") == ["runs/gcrun2/step_4/model.pt"]

    # on a base path: every run's
    whole = wmtp("gc", base, "--incomplete", "--min-age", "0", cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr
    assert uploads(s3_server, bucket, "runs/gcrun2/") == []
    assert uploads(s3_server, bucket, "runs/gcrun/") == ["runs/gcrun/step_8/weights.bin"]
