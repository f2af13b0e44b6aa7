import contextlib
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

# Each of pytest's two workers (and each process a test starts) gets one intra-op thread: on two
# cores, two processes of two OpenMP threads each spin-wait for one another and the suite takes
# twice as long. Set before torch is first imported (OpenMP reads it when torch is loaded); a
# user's own setting wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _memory_tmp() -> Path | None:
    """A folder on /dev/shm (memory) for the suite's temporary files, where it has room: a test's
    checkpoints are written, fsync'ed and read back many times, and on a real disk the fsyncs
    alone cost about a tenth of the suite's time. Nothing the suite checks needs a disk (the
    full-disk tests mount their own); ``--basetemp`` or a ``TMPDIR`` of the user's own wins."""
    shm = Path("/dev/shm")
    try:
        room = os.statvfs(shm)
    except OSError:
        return None
    if "TMPDIR" in os.environ or not os.access(shm, os.W_OK) or room.f_bavail * room.f_frsize < 8 << 30:
        return None
    return shm / f"wmtp-tests-{os.getuid()}"


MEMORY_TMP = _memory_tmp() if "PYTEST_XDIST_WORKER" not in os.environ else None
if MEMORY_TMP is not None:  # before tempfile first reads TMPDIR; the workers and their children inherit it
    (MEMORY_TMP / "tmp").mkdir(parents=True, exist_ok=True)
    os.environ["TMPDIR"] = str(MEMORY_TMP / "tmp")
if "PYTEST_XDIST_WORKER" not in os.environ:  # restores from S3 stage under the suite's temporary folder, not ~/.cache
    import tempfile as _tempfile

    os.environ.setdefault("WMTP_CACHE_DIR", os.path.join(_tempfile.gettempdir(), "wmtp-cache"))

from wmtp_core import Manifest, Receipt, ResumableSink, Role, RunInfo
from wmtp_core.manifest import FileEntry
from wmtp_core.plugins import make_plugin_manager

ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def mlflow_environment_restored():
    """MLflow's set_tracking_uri/set_registry_uri export MLFLOW_* variables; WMTP run in-process
    must not leave them to the next test's subprocesses. (A module-scoped fixture that runs WMTP
    is set up before the first test's autouse fixture saves the environment: it uses this.)"""
    saved = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}
    try:
        yield
    finally:
        for k in [k for k in os.environ if k.startswith("MLFLOW_") and k not in saved]:
            del os.environ[k]
        os.environ.update(saved)


@pytest.fixture(autouse=True)
def _isolate_mlflow_environment():
    with mlflow_environment_restored():
        yield


def migrated_mlflow_db(target: Path) -> str:
    """``target`` made an MLflow sqlite store with every migration applied, copied from a template
    built once per MLflow version; returns its URI. A fresh store runs MLflow's whole migration
    chain (4.5 s here); a copy of the migrated file is what MLflow finds in any later use."""
    import shutil
    import tempfile

    import mlflow

    template = Path(tempfile.gettempdir()) / f"wmtp-tests-mlflow-{mlflow.__version__}.db"
    if not template.exists():
        building = template.with_name(f"{template.name}.{os.getpid()}")
        building.unlink(missing_ok=True)
        client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{building}", registry_uri=f"sqlite:///{building}")
        client.search_experiments()
        client.search_registered_models()
        os.replace(building, template)
    if not target.exists():
        shutil.copyfile(template, target)
    return f"sqlite:///{target}"


@pytest.fixture(autouse=True)
def _migrated_mlflow_store(request):
    """A test's ``tmp_path/mlflow.db`` (where tests and the defaults keep MLflow) starts migrated,
    the state it has after its first use: see :func:`migrated_mlflow_db`."""
    if "tmp_path" in request.fixturenames:
        migrated_mlflow_db(request.getfixturevalue("tmp_path") / "mlflow.db")
    yield


@pytest.fixture(autouse=True)
def _forget_remembered_secrets():
    """Secret values are remembered for a process' lifetime; tests share one process."""
    from wmtp_core import redact

    yield
    redact.forget()


@pytest.fixture
def pm():
    """A fresh plugin manager with WMTP's hookspecs and no installed plugins."""
    return make_plugin_manager(entry_points=False)


def run_info(name="run", lineage="L1", algo="baseline-mtp"):
    return RunInfo(name=name, algo=algo, lineage=lineage)


class MemorySink(ResumableSink):
    """A sink that keeps committed checkpoints in memory and records every store call."""

    def __init__(self, context, name="memory", items=None):
        self.context = context
        self.name = name
        self.stored: list[tuple[Role, int]] = []
        self.items: dict[str, Manifest] = {} if items is None else items
        """Committed checkpoints by URI; share one dict between sinks to share a store."""
        self.deleted: list[str] = []

    def location(self):
        return f"memory://{self.name}/{self.context.run.name}"

    def store(self, event, payload):
        self.stored.append((event.role, event.step))
        uri = f"{self.location()}/step_{event.step}"
        self.items[uri] = Manifest(
            run=event.run.name, step=event.step, role=event.role, lineage=event.run.lineage,
            files=[FileEntry(path="x.pt", size=1, digest="0" * 64)],
            created_at="2026-01-01T00:00:00+00:00", meta={"metrics": dict(event.metrics)},
        )
        return Receipt(role=event.role, run=event.run.name, step=event.step, uri=uri, nbytes=1)

    def committed(self):
        return sorted(self.items.items(), key=lambda um: um[1].step)

    def delete(self, uri):
        self.deleted.append(uri)
        del self.items[uri]


def run_cli(args, cwd, env=None, timeout=300):
    """Run ``python -m wmtp_core.run`` in a fresh process."""
    e = {**os.environ, **(env or {})}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "wmtp_core.run", *args], cwd=cwd, env=e,
                          capture_output=True, text=True, timeout=timeout)
    proc.seconds = time.perf_counter() - t0
    return proc


def tree(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


S3_ENV = {
    "AWS_ACCESS_KEY_ID": "wmtp-test-key-id",
    "AWS_SECRET_ACCESS_KEY": "wmtp-test-secret-do-not-log",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 endpoint on loopback (moto's server), with test credentials in the environment.

    Yields the endpoint URL; ``AWS_ENDPOINT_URL`` points every client (s3fs, MLflow) at it.
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in [*S3_ENV, "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"]}
    os.environ.update(S3_ENV, AWS_ENDPOINT_URL=endpoint, MLFLOW_S3_ENDPOINT_URL=endpoint)
    try:
        yield endpoint
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


@pytest.fixture
def bucket(s3_server):
    """A fresh bucket on the loopback S3 server; yields its name."""
    import boto3

    name = f"wmtp-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


def s3_keys(endpoint: str, bucket: str, prefix: str = "") -> list[str]:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return sorted(keys)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """An ``mlflow server`` process on loopback: sqlite backend, artifacts proxied to S3."""

    def __init__(self, workdir: Path, artifacts: str, port: int | None = None):
        self.workdir, self.artifacts = workdir, artifacts
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self, timeout: float = 120) -> "MlflowServer":
        import urllib.request

        mlflow_bin = Path(sys.executable).parent / "mlflow"
        migrated_mlflow_db(self.workdir / "server.db")  # a first start would migrate it (seconds)
        self.log = open(self.workdir / f"mlflow-server-{self.port}.log", "ab")
        self.proc = subprocess.Popen(
            [str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.workdir / 'server.db'}",
             "--artifacts-destination", self.artifacts, "--workers", "1"],
            cwd=self.workdir, stdout=self.log, stderr=subprocess.STDOUT,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},  # no job runner: no test runs jobs
            start_new_session=True,  # its own process group: the server forks workers
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.workdir / self.log.name).read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        raise TimeoutError("mlflow server did not answer /health")

    def stop(self):
        import signal

        if self.proc is not None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(timeout=20)
                    break
                except subprocess.TimeoutExpired:
                    continue
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # workers left behind
            except ProcessLookupError:
                pass
        self.log.close()


KILLER = """
import os, signal, sys
from wmtp_core import hookimpl
from wmtp_core.run import main

class Killer:
    # SIGKILLs this process right after training step argv[1]
    @hookimpl
    def wmtp_step_ended(self, event):
        if event.step == int(sys.argv[1]) and "loss" in event.metrics:
            os.kill(os.getpid(), signal.SIGKILL)

sys.exit(main(sys.argv[2:], plugins=(Killer(),)))
"""


def campaign_sample(out: Path, only: str):
    """``benchmarks/faults.py --quick --only ONLY`` in a process of its own: the process and the
    tallies (``faults.json``) by scenario."""
    import json

    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "faults.py"), "--quick", "--only", only,
                           "--out", str(out)], capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    tallies = {t["scenario"]: t for t in json.loads((out / "faults.json").read_text())}
    return proc, tallies


def assert_campaign_clean(proc, tallies) -> None:
    """Every scenario of a campaign sample survived every try: nothing torn, lost, executed,
    hung or ended in a traceback, and the campaign itself exited 0."""
    for name, t in tallies.items():
        assert t["torn"] == 0 and t["lost"] == 0, (name, t["notes"])
        assert t["tracebacks"] == 0 and t["hangs"] == 0 and t["executed"] == 0, (name, t["notes"])
        assert t.get("refused", 0) == 0 and t.get("foreign", 0) == 0, (name, t["notes"])
        assert t["survived"] == t["tried"], (name, t["notes"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


LONGEST_FIRST = ("test_peers.py", "test_hf_models.py", "test_multinode.py", "test_distributed.py", "test_elastic.py", "test_campaign.py",
                 "test_s3_faults.py", "test_mlflow_outages.py", "test_lease.py", "test_origin_files.py", "test_e2e.py",
                 "test_fsdp_equivalence.py", "test_mlflow_ui.py", "test_eval_runs.py", "test_evaluation.py", "test_tiered.py",
                 "test_preemption.py",
                 "test_resume.py", "test_sharded_everywhere.py", "test_registry_failure.py", "test_clean_starts.py",
                 "test_third_party_plugin.py", "test_s3.py", "test_quarantine.py", "test_report_plot.py")
"""The modules that take longest (``--durations``), started first: the two workers each take a
module at a time (``--dist loadscope``), so a long one started last would run alone at the end."""


def pytest_configure(config):
    if MEMORY_TMP is not None and config.option.basetemp is None:  # the controller's: workers get a folder in it
        config.option.basetemp = str(MEMORY_TMP / "basetemp")


def pytest_unconfigure(config):
    if MEMORY_TMP is not None and getattr(config, "_wmtp_passed", False):  # memory given back; kept to debug a failure
        import shutil

        shutil.rmtree(MEMORY_TMP, ignore_errors=True)


def pytest_sessionfinish(session, exitstatus):
    session.config._wmtp_passed = exitstatus == 0


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order kept within
