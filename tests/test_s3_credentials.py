"""Credentials that cannot work, and errors S3 clients do not retry, are one line that says so.

A key without its secret (or a secret without its key) is refused before any request, by every
``wmtp`` command that takes an ``s3://`` URI and by a run (and its dry run) whose resume storage
is S3: one line naming the URL or the config key, the operation and what is missing, exit
status 2, the secret never printed. Errors that no client retries (credentials, access refused,
a missing bucket) never say "after the S3 client's retries". Against a real S3 endpoint on
loopback (moto), and a real HTTP endpoint that refuses every request with S3's ``AccessDenied``."""

from __future__ import annotations

import http.server
import os
import threading
from pathlib import Path

import pytest
import torch
import zygote
from builders import recipe, write

from wmtp_core import Role
from wmtp_core.commit import CheckpointStore
from wmtp_core.filesink import torch_writer

CLI = "import sys; from wmtp_core.cli import main; sys.exit(main())"
RUN = "import sys; from wmtp_core.run import main; sys.exit(main())"
SECRET = "wmtp-credentials-test-SECRET-4711"
COMMANDS = [["checkpoints", "ls"], ["checkpoints", "verify"], ["gc"], ["report"]]
PROBLEM = ("is missing; {given} given alone: S3 takes both key and secret, or neither (the credentials "
           "then come from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE or the machine's role)")


def python(code: str, *args, cwd: Path, env: dict | None = None):
    proc = zygote.run(["-c", code, *map(str, args)], cwd=cwd, timeout=180, env=env or dict(os.environ))
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    return proc


@pytest.fixture
def run_on_s3(s3_server, bucket):
    """A run ``r1`` with one committed checkpoint on S3; yields its base path."""
    base = f"s3://{bucket}/runs"
    CheckpointStore.from_url(base).write("r1", "step_2", {"model.pt": torch_writer({"w": torch.ones(4)}),
                                                          "trainer.pt": torch_writer({"step": 2})},
                                         step=2, role=Role.RESUME, lineage="L1", meta={"algo": "baseline-mtp"})
    return base


READERS = {"checkpoints ls": "", "checkpoints verify": "", "gc": "", "report": "/r1",
           "register": "/r1/step_2", "checkpoints convert": "/r1/step_2"}
"""Every command that reads an s3:// URI, and what it is given under the base path."""


@pytest.mark.parametrize("given", ["secret", "key"])
@pytest.mark.parametrize("command", READERS)
def test_a_command_given_half_the_credentials_says_what_is_missing_in_one_line(command, given, run_on_s3,
                                                                              tmp_path):
    uri = run_on_s3 + READERS[command]
    missing = "key" if given == "secret" else "secret"
    out = [str(tmp_path / "out" / "r1" / "final")] if command == "checkpoints convert" else []
    proc = python(CLI, *command.split(), uri, *out, "--storage-option", f"{given}={SECRET}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: reading {uri}: --storage-option {missing} " + PROBLEM.format(given=given)]
    assert SECRET not in proc.stdout + proc.stderr
    assert "after the S3 client's retries" not in proc.stderr


def test_partial_credentials_from_the_environment_are_not_said_to_be_retried(run_on_s3, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "AWS_SECRET_ACCESS_KEY"}
    proc = python(CLI, "checkpoints", "ls", run_on_s3, cwd=tmp_path, env=env)
    assert proc.returncode == 1, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: wmtp checkpoints ls: reading {run_on_s3} failed: PartialCredentialsError: "), line
    assert line.endswith("(an error of credentials: not retried)"), line
    assert "after the S3 client's retries" not in line


# ------------------------------------------------------------------------------ access refused
DENIED = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code><Message>Access Denied'
          b"</Message><RequestId>denied</RequestId></Error>")


@pytest.fixture
def denying_endpoint():
    """An HTTP endpoint that answers every request with S3's ``403 AccessDenied``; yields its
    URL and the requests it saw."""
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            seen.append(f"{self.command} {self.path}")
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            body = b"" if self.command == "HEAD" else DENIED
            self.send_response(403)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_PUT = do_POST = do_DELETE = do_HEAD = do_GET

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_access_refused_is_one_line_that_does_not_claim_retries(command, denying_endpoint, tmp_path):
    from conftest import S3_ENV

    endpoint, seen = denying_endpoint
    proc = python(CLI, *command, "s3://bkt/runs", "--storage-option", f"endpoint_url={endpoint}", cwd=tmp_path,
                  env={**os.environ, **S3_ENV})
    assert proc.returncode == 1, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line == (f"error: wmtp {' '.join(command)}: reading s3://bkt/runs failed: PermissionError: Access Denied "
                    "(access refused: not retried)"), line
    assert len(seen) == 1, seen  # one request: the client did not retry it


def test_a_save_refused_access_does_not_claim_retries(denying_endpoint, monkeypatch):
    from conftest import S3_ENV

    from wmtp_core.errors import SaveError

    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    endpoint, _ = denying_endpoint
    store = CheckpointStore.from_url("s3://bkt/runs", endpoint_url=endpoint)
    assert store.client_retries == "the S3 client's retries"
    with pytest.raises(SaveError) as e:
        store.write("r", "step_2", {"model.pt": torch_writer({"w": torch.ones(2)})}, step=2, role=Role.RESUME,
                    lineage="L1")
    message = str(e.value)
    assert message.startswith("step 2 was not saved: preparing the staging directory s3://bkt/runs/r/step_2 "
                              "failed (PermissionError: Forbidden; access refused: not retried); "
                              "nothing of step 2 was committed"), message
    assert "after the S3 client's retries" not in message


# ------------------------------------------------------------------------------ a run
def s3_run_config(tmp: Path, base: str, resume: dict) -> dict:
    return {"seed": 3, "mlflow": None,
            "paths": {"checkpoints": {"base_path": base, "save_interval": 2, "keep_last": 2}},
            "storage": {"resume": resume, "final": {"sink": "local", "base_path": f"file://{tmp}/final"}}}


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry run", "run"])
def test_a_run_given_half_the_credentials_is_refused_before_it_writes(dry_run, s3_server, bucket, tmp_path):
    from conftest import s3_keys

    base = f"s3://{bucket}/runs"
    write(tmp_path / "c.yaml", s3_run_config(tmp_path, base, {"sink": "s3", "options": {"secret": SECRET}}))
    write(tmp_path / "r.yaml", recipe(2))
    proc = python(RUN, "--config", tmp_path / "c.yaml", "--recipe", "r.yaml", *(["--dry-run"] if dry_run else []),
                  cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("error:")]
    assert line == f"error: {tmp_path / 'c.yaml'}: storage.resume.options.key " + PROBLEM.format(given="secret")
    assert SECRET not in proc.stdout + proc.stderr
    assert s3_keys(s3_server, bucket) == []
    assert not (tmp_path / "final").exists()


def test_a_tiered_run_given_half_the_durable_tiers_credentials_is_refused(s3_server, bucket, tmp_path):
    resume = {"sink": "tiered", "options": {"fast": f"file://{tmp_path}/fast", "durable": f"s3://{bucket}/runs",
                                            "key": "an-access-key-id"}}
    write(tmp_path / "c.yaml", s3_run_config(tmp_path, f"file://{tmp_path}/fast", resume))
    write(tmp_path / "r.yaml", recipe(2))
    proc = python(RUN, "--config", tmp_path / "c.yaml", "--recipe", "r.yaml", "--dry-run", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"error: {tmp_path / 'c.yaml'}: storage.resume.options.secret " + PROBLEM.format(given="key") \
        in proc.stderr
