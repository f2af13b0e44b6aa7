"""Fresh processes for tests, without paying the imports again: a process that has imported
torch, MLflow, transformers and WMTP (and has run nothing) forks a child per command.

A child is a real process of its own: its own PID, its own session (so a signal or a SIGKILL
reaches it and its workers alone), its own working directory, environment and standard streams,
and nothing of the test process's state. What it does not get is a fresh import: a module-level
read of the environment sees the zygote's. Commands that start other programs (torchrun, an
``mlflow server``) are not run this way.

``ranks`` starts a job of several ranks the way ``torchrun --standalone`` does (one forked child
per rank, with the environment torchrun gives its workers, and the other ranks stopped once one
fails), for tests whose subject is the job, not the launcher.

Protocol (lines of JSON): the client writes ``{"id", "argv", "cwd", "env", "out", "err"}``;
the zygote answers ``{"id", "pid"}`` once forked and ``{"pid", "code"}`` once the child ended
(``code`` as ``Popen.returncode``: the exit status, or minus the signal that ended it).
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path

PRELOAD = ("torch", "torch.distributed.checkpoint", "torch._dynamo", "torch.export", "mlflow", "mlflow.pytorch",
           "mlflow.transformers", "transformers", "s3fs", "botocore", "safetensors.torch",
           # what a run with MLflow imports next (about 3 s a child): exporting the final program,
           # MLflow's sqlite stores and their migrations, pyfunc, tracing. Not matplotlib: tests
           # block its import in a child (test_report_plot.py).
           "torch.export._trace", "torch._functorch.aot_autograd", "torch._inductor.codecache",
           "torch._export.serde.serialize", "torch.export.pt2_archive", "networkx", "sympy", "sympy.combinatorics",
           "sqlalchemy.orm", "sqlalchemy.dialects.sqlite", "alembic.command", "alembic.config",
           "mlflow.store.db.utils", "mlflow.store.tracking.sqlalchemy_store",
           "mlflow.store.tracking.sqlalchemy_workspace_store", "mlflow.store.model_registry.sqlalchemy_store",
           "mlflow.store.model_registry.sqlalchemy_workspace_store", "mlflow.pyfunc", "mlflow.tracing.export",
           "mlflow.tracing.processor.otel", "opentelemetry.sdk.metrics", "git", "rich.console",
           "cryptography.hazmat.primitives.hashes",
           # what a run with a Hugging Face model imports next (about 1.2 s a child): the auto
           # classes (scikit-learn and scipy, through generation), GPT-2 (the tests' models), the
           # pipelines MLflow's transformers flavor builds; and what exporting the byte-level model
           # imports last
           "transformers.models.auto.auto_factory", "transformers.generation.candidate_generator",
           "transformers.modeling_layers", "transformers.models.gpt2.modeling_gpt2", "transformers.pipelines",
           "transformers.initialization", "sympy.physics.units", "torch._inductor.ir")


# ----------------------------------------------------------------------------------- the zygote
def _preload() -> None:
    """Imports only: nothing runs a tensor op or starts a thread, so a fork inherits no pool."""
    import importlib
    import pkgutil

    for name in PRELOAD:
        importlib.import_module(name)
    import wmtp_core
    import wmtp_plugins

    for package in (wmtp_core, wmtp_plugins):
        for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            if not info.name.endswith(("__main__", ".run")):
                importlib.import_module(info.name)
    assert threading.active_count() == 1, [t.name for t in threading.enumerate()]


def _child(request: dict) -> None:
    """In the forked child: become the command, then exit with its status."""
    import runpy
    import signal
    import traceback

    code = 1
    try:
        os.setsid()
        for sig in (signal.SIGTERM, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # what python sets: KeyboardInterrupt
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # likewise
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        if "OMP_NUM_THREADS" in os.environ:  # read when torch was loaded, in the zygote
            import torch

            torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(os.open(request["out"], os.O_WRONLY | os.O_TRUNC), 1)
        os.dup2(os.open(request["err"], os.O_WRONLY | os.O_TRUNC), 2)
        argv = request["argv"]
        try:
            if argv[0] == "-m":
                sys.argv = [argv[1], *argv[2:]]
                sys.modules.pop(argv[1], None)  # run as __main__, as ``python -m`` does
                runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
            elif argv[0] == "-c":
                sys.argv = ["-c", *argv[2:]]
                exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__"})
            else:
                sys.argv = list(argv)
                runpy.run_path(argv[0], run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if not isinstance(e.code, int) and e.code is not None:
                print(e.code, file=sys.stderr)
        except BaseException:  # noqa: BLE001 - what python itself would print
            traceback.print_exc()
            code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def serve() -> None:
    _preload()
    out = sys.stdout
    print(json.dumps({"ready": os.getpid()}), file=out, flush=True)
    stdin = sys.stdin.fileno()
    buffer = b""
    alive: set[int] = set()
    while True:
        ready, _, _ = select.select([stdin], [], [], 0.05)
        if ready:
            chunk = os.read(stdin, 1 << 16)
            if not chunk:
                break
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                request = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    _child(request)
                alive.add(pid)
                print(json.dumps({"id": request["id"], "pid": pid}), file=out, flush=True)
        for pid in list(alive):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                alive.discard(pid)
                code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
                print(json.dumps({"pid": pid, "code": code}), file=out, flush=True)


# ----------------------------------------------------------------------------------- the client
class Zygote:
    """The test process's end: one zygote per test process, started on first use."""

    _instance: Zygote | None = None

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env={**os.environ, "PYTHONPATH": _pythonpath()})
        first = json.loads(self.proc.stdout.readline() or b'{"ready": null}')
        if not first.get("ready"):
            raise RuntimeError("the zygote did not start")
        self.lock = threading.Condition()
        self.pids: dict[int, int] = {}
        self.codes: dict[int, int] = {}
        self.next_id = 0
        threading.Thread(target=self._read, name="zygote-reader", daemon=True).start()

    @classmethod
    def get(cls) -> Zygote:
        if cls._instance is None or cls._instance.proc.poll() is not None:
            cls._instance = Zygote()
        return cls._instance

    def _read(self) -> None:
        for line in self.proc.stdout:
            message = json.loads(line)
            with self.lock:
                if "id" in message:
                    self.pids[message["id"]] = message["pid"]
                else:
                    self.codes[message["pid"]] = message["code"]
                self.lock.notify_all()

    def launch(self, argv: list[str], cwd: Path, env: dict[str, str], out: Path, err: Path) -> int:
        with self.lock:
            self.next_id += 1
            rid = self.next_id
            request = {"id": rid, "argv": argv, "cwd": str(cwd), "env": env, "out": str(out), "err": str(err)}
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            self.proc.stdin.flush()
            if not self.lock.wait_for(lambda: rid in self.pids, timeout=60):
                raise RuntimeError("the zygote did not fork")
            return self.pids.pop(rid)

    def wait(self, pid: int, timeout: float | None) -> int | None:
        with self.lock:
            self.lock.wait_for(lambda: pid in self.codes, timeout=timeout)
            return self.codes.get(pid)


def _pythonpath() -> str:
    root = str(Path(__file__).resolve().parent.parent)
    rest = os.environ.get("PYTHONPATH")
    return root if not rest else f"{root}{os.pathsep}{rest}"


class Child:
    """A forked command, used like ``subprocess.Popen(..., text=True)`` with its output
    captured: ``pid``, ``poll``, ``wait``, ``communicate``, ``send_signal``, ``kill``,
    ``terminate``, ``returncode``, and ``stdout``/``stderr`` (what it wrote so far)."""

    def __init__(self, argv: list[str], cwd: Path | str, env: dict[str, str] | None = None) -> None:
        import tempfile

        self.argv = argv
        self._files = tempfile.mkdtemp(prefix="wmtp-child-")
        self._out, self._err = Path(self._files, "out"), Path(self._files, "err")
        self._out.touch()
        self._err.touch()
        self.zygote = Zygote.get()
        self.returncode: int | None = None
        self.started = time.perf_counter()
        self.pid = self.zygote.launch(argv, Path(cwd), dict(os.environ if env is None else env),
                                      self._out, self._err)
        self.stdout = open(self._out, errors="replace")
        self.stderr = open(self._err, errors="replace")

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.zygote.wait(self.pid, 0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self.returncode = self.zygote.wait(self.pid, timeout)
            if self.returncode is None:
                raise subprocess.TimeoutExpired(self.argv, timeout)
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        return self._out.read_text(errors="replace"), self._err.read_text(errors="replace")

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:  # it ended and the zygote reaped it; its status is on its way
                pass

    def kill(self) -> None:
        import signal

        if self.poll() is None:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:  # likewise
                pass

    def terminate(self) -> None:
        import signal

        self.send_signal(signal.SIGTERM)

    def close(self) -> None:
        """Close and remove what holds its output (read it first)."""
        import shutil

        self.stdout.close()
        self.stderr.close()
        shutil.rmtree(self._files, ignore_errors=True)


def run(argv: list[str], cwd: Path | str, env: dict[str, str] | None = None,
        timeout: float = 300) -> subprocess.CompletedProcess:
    """``subprocess.run([python, *argv], capture_output=True, text=True)`` in a forked child;
    the result also has ``seconds``. A child past ``timeout`` is killed, with its group."""
    child = Child(argv, cwd, env)
    try:
        out, err = child.communicate(timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait(30)
        child.close()
        raise
    child.close()
    done = subprocess.CompletedProcess([sys.executable, *argv], child.returncode, out, err)
    done.seconds = time.perf_counter() - child.started
    return done


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ranks(n: int, argv: list[str], cwd: Path | str, env: dict[str, str] | None = None,
          timeout: float = 600, grace: float = 30) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=n [python argv]``, with each rank forked from the
    zygote. Each rank gets torchrun's worker environment (``RANK``, ``LOCAL_RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``, ``OMP_NUM_THREADS=1``, ...). As torchrun
    does, once a rank fails the others get SIGTERM, then SIGKILL after ``grace`` seconds, and
    the job's status is 1 with a report naming each failed rank's ``exitcode``. ``stdout`` and
    ``stderr`` are the ranks' own, rank 0 first."""
    port, base = free_port(), dict(os.environ if env is None else env)
    base.setdefault("OMP_NUM_THREADS", "1")
    common = {"WORLD_SIZE": str(n), "LOCAL_WORLD_SIZE": str(n), "GROUP_RANK": "0", "GROUP_WORLD_SIZE": "1",
              "ROLE_NAME": "default", "ROLE_WORLD_SIZE": str(n), "MASTER_ADDR": "127.0.0.1",
              "MASTER_PORT": str(port), "TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_MAX_RESTARTS": "0",
              "TORCHELASTIC_RUN_ID": "none", "TORCHELASTIC_USE_AGENT_STORE": "False"}
    children = [Child(argv, cwd, {**base, **common, "RANK": str(r), "LOCAL_RANK": str(r), "ROLE_RANK": str(r)})
                for r in range(n)]
    started, stopping = time.perf_counter(), None
    while any(c.poll() is None for c in children):
        now = time.perf_counter()
        if stopping is None and (any(c.returncode not in (None, 0) for c in children) or now - started > timeout):
            stopping = now
            for c in children:
                c.terminate()
        elif stopping is not None and now - stopping > grace:
            for c in children:
                c.kill()
        time.sleep(0.05)
    took = time.perf_counter() - started
    outs = [c.communicate(0) for c in children]
    report = "".join(f"rank {r} (pid {c.pid}) failed: exitcode: {c.returncode}\n"
                     for r, c in enumerate(children) if c.returncode != 0)
    for c in children:
        c.close()
    out, err = "".join(o for o, _ in outs), "".join(e for _, e in outs) + report
    if stopping is not None and stopping - started > timeout:
        raise subprocess.TimeoutExpired(["torchrun", *argv], timeout, out, err)
    done = subprocess.CompletedProcess(["torchrun", *argv], 1 if report else 0, out, err)
    done.seconds = took
    return done


if __name__ == "__main__":
    serve()
