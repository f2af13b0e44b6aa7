"""The reliability campaign: "nothing committed is ever lost, and nothing torn is ever resumed",
measured.

    uv run python benchmarks/faults.py                 # every scenario at full count
    uv run python benchmarks/faults.py --only kills --kills 40
    uv run python benchmarks/faults.py --quick         # a small sample of each (what CI runs)

Scenarios (each row of the table):

- ``kills``: SIGKILLs at random moments of saves (writing a file, a multipart upload, the
  manifest, retention, a background save), on local disk and on S3 (a moto server process on
  loopback), synchronous and asynchronous saves. Every launch of the chain is the same command,
  with ``--resume auto`` (as a scheduler reruns it): it starts fresh while nothing is committed
  and resumes the newest checkpoint that verifies afterwards; each launch is the next one killed. After every kill,
  every checkpoint the killed process reported committed (and retention did not delete) must
  still be committed and verify; every resume must start from the newest checkpoint that
  verifies. At the end the chain trains to its last step and its final model must equal, tensor
  for tensor, that of a run that was never interrupted.
- ``s3-faults``: runs whose resume sink reaches S3 through a fault-injecting proxy (5xx,
  SlowDown, connection resets) at several rates: each run finishes with every checkpoint
  verifying, or fails loudly (exit 1, one line) with its previous checkpoint intact.
- ``full-disk``: runs on a real small filesystem (tmpfs; root only, else skipped) that fills:
  one clear line, exit 2 (synchronous) or 1 (background), committed checkpoints intact, no
  staging left behind.
- ``configs``: mutated configurations and recipes (wrong types, out-of-range and huge numbers,
  unknown keys, typos, YAML bombs, deep nesting, control characters) through ``--dry-run``:
  exit 0 or 2, never a traceback or a hang.
- ``crafted``: checkpoints crafted to attack (pickles that would run code with a correct digest,
  manifest entries with ``../`` or absolute paths, links leading out of the checkpoint), given
  to ``verify`` and to ``--resume``: refused by name, nothing executed.

Columns: tried, survived, torn resumes, committed checkpoints lost, tracebacks, hangs, code
executions. Writes ``faults.md`` and ``faults.json`` under ``--out``.

Processes are forked from this one after WMTP and torch are imported (a real new process each,
without paying the import again); S3 runs against a ``moto_server`` process, never a thread of
the parent, so nothing the parent holds is inherited half-locked.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import math
import os
import pickle
import random
import re
import shutil
import signal
import socket
import subprocess
import importlib
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import attrs
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))

from wmtp_core import hookimpl  # noqa: E402
from wmtp_core.commit import CheckpointState, CheckpointStore  # noqa: E402
from wmtp_core.run import main  # noqa: E402

MODEL = {"d_model": 128, "n_layers": 2, "n_heads": 4, "n_future": 2, "max_seq_len": 32}
"""About 1.3M parameters: a resume state of about 16 MB, a save of tens of milliseconds."""
S3_ENV = {"AWS_ACCESS_KEY_ID": "wmtp-campaign", "AWS_SECRET_ACCESS_KEY": "wmtp-campaign-secret",
          "AWS_DEFAULT_REGION": "us-east-1"}
HANG_S = 240.0
KEEP_LAST = 2


@attrs.define
class Tally:
    scenario: str
    tried: int = 0
    survived: int = 0
    torn: int = 0
    lost: int = 0
    tracebacks: int = 0
    hangs: int = 0
    executed: int = 0
    refused: int = 0
    """Legitimate runs refused for good: the run still fails when tried again."""
    foreign: int = 0
    """Objects WMTP did not write that it removed."""
    notes: list[str] = attrs.field(factory=list)

    def bad(self, why: str) -> None:
        if len(self.notes) < 20:
            self.notes.append(why)

    def row(self) -> list[str]:
        return [self.scenario, str(self.tried), str(self.survived), str(self.torn), str(self.lost),
                str(self.tracebacks), str(self.hangs), str(self.executed), str(self.refused), str(self.foreign)]


# ----------------------------------------------------------------------------- processes
def forked(args: list[str], plugins: tuple = (), cwd: Path | None = None, env: dict | None = None,
           timeout: float = HANG_S) -> tuple[int | None, str]:
    """Run ``main(args)`` in a forked child; returns ``(exit status or -signal, stderr)``, or
    ``(None, stderr)`` when it did not end within ``timeout`` (it is then killed: a hang)."""
    err = tempfile.NamedTemporaryFile(prefix="wmtp-fault-", suffix=".err", delete=False)
    err.close()
    pid = os.fork()
    if pid == 0:  # the child
        code = 70
        try:
            os.setsid()
            fd = os.open(err.name, os.O_WRONLY)
            os.dup2(fd, 2)
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, signal.SIG_DFL)
            if cwd is not None:
                os.chdir(cwd)
            os.environ.update(env or {})
            code = main(args, plugins=plugins)
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 71
        finally:
            sys.stderr.flush()
            os._exit(code if isinstance(code, int) else 72)
    deadline = time.monotonic() + timeout
    status = None
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
    text = Path(err.name).read_text(errors="replace")
    os.unlink(err.name)
    return status, text


class Chaos:
    """In the child: SIGKILL itself ``delay`` seconds after the ``at``-th resume checkpoint was
    emitted, and journal (fsynced) what it committed, what retention deleted, where it started."""

    def __init__(self, journal: Path, at: int | None, delay: float) -> None:
        self.journal, self.at, self.delay, self.emitted = journal, at, delay, 0

    def _log(self, line: str) -> None:
        with open(self.journal, "a") as f:
            f.write(f"{line} {time.monotonic():.6f}\n")
            f.flush()
            os.fsync(f.fileno())

    @hookimpl
    def wmtp_run_started(self, event):
        self._log(f"started {event.start_step}")

    @hookimpl
    def wmtp_resume_checkpoint_emitted(self, event):
        self.emitted += 1
        self._log(f"emitted {event.step}")
        if self.at is not None and self.emitted == self.at:
            def kill():
                time.sleep(self.delay)
                os.kill(os.getpid(), signal.SIGKILL)

            threading.Thread(target=kill, daemon=True).start()

    @hookimpl
    def wmtp_checkpoint_committed(self, receipt):
        if receipt.role.value == "resume":
            self._log(f"committed {receipt.step}")

    @hookimpl
    def wmtp_checkpoint_deleted(self, receipt):
        self._log(f"deleted {receipt.step}")


def journal_of(path: Path) -> list[tuple[str, int, float]]:
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            kind, step, t = line.split()
            out.append((kind, int(step), float(t)))
    return out


# ----------------------------------------------------------------------------- S3
class MotoProcess:
    """An S3 endpoint on loopback in a process of its own."""

    def __enter__(self) -> MotoProcess:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        exe = Path(sys.executable).parent / "moto_server"
        self.proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.endpoint = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        return self

    def bucket(self, name: str) -> str:
        def create():
            import boto3

            boto3.client("s3", endpoint_url=self.endpoint, **_creds()).create_bucket(Bucket=name)

        in_child(create)
        return name

    def __exit__(self, *exc: Any) -> None:
        self.proc.kill()
        self.proc.wait()


def _creds() -> dict[str, str]:
    return {"aws_access_key_id": S3_ENV["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": S3_ENV["AWS_SECRET_ACCESS_KEY"], "region_name": "us-east-1"}


# ----------------------------------------------------------------------------- kills
def _files(work: Path, base: str, steps: int, *, async_: bool, options: dict | None = None,
           save_interval: int = 2, extra: dict | None = None) -> list[str]:
    resume = {"sink": "s3" if base.startswith("s3://") else "local", "base_path": base}
    if options:
        resume["options"] = options
    config = {"seed": 13, "log_interval": 1000,
              "paths": {"checkpoints": {"base_path": base, "save_interval": save_interval, "keep_last": KEEP_LAST,
                                        "async": async_, "save_on_signal": []}},
              "mlflow": None,
              "storage": {"resume": resume, "final": {"sink": "local", "base_path": f"file://{work}/final"}}}
    for k, v in (extra or {}).items():
        config[k] = v
    recipe = {"train": {"max_steps": steps},
              "data": {"train": {"sources": ["stdlib"], "max_length": 32, "batch_size": 4}}, "model": MODEL,
              "optim": {"lr": 0.003, "scheduler": "cosine", "warmup_ratio": 0.1}}
    (work / "c.yaml").write_text(yaml.safe_dump(config))
    (work / "r.yaml").write_text(yaml.safe_dump(recipe))
    return ["--config", str(work / "c.yaml"), "--recipe", str(work / "r.yaml")]


def in_child(fn: Callable[[], Any]) -> Any:
    """``fn()`` run in a forked child, its (picklable) result returned. Every look at storage
    goes through here: this process never opens a connection or a thread pool that the
    processes it forks would inherit half-used."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            result = ("ok", fn())
        except BaseException as e:  # noqa: BLE001 - handed back
            result = ("error", f"{type(e).__name__}: {e}")
        with os.fdopen(w, "wb") as f:
            pickle.dump(result, f)
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    kind, value = pickle.loads(data)
    if kind == "error":
        raise RuntimeError(value)
    return value


@attrs.frozen
class Place:
    """Where a run's checkpoints are: a base URL and its storage options."""

    url: str
    options: dict = attrs.field(factory=dict, hash=False)

    def store(self) -> CheckpointStore:
        return CheckpointStore.from_url(self.url, skip_instance_cache=True, **self.options)


def _intact(place: Place, run: str) -> tuple[dict[int, bool], list[str], list[str]]:
    """Every committed step of ``run`` and whether it verifies, the problems, the staging left."""

    def look():
        store = place.store()
        out, problems = {}, []
        for i in store.inspect(run):
            if i.state is CheckpointState.COMMITTED:
                try:
                    store.verify(i.path)
                    out[i.manifest.step] = True
                except Exception as e:  # noqa: BLE001 - counted, named
                    out[i.manifest.step] = False
                    problems.append(f"{i.path}: {e}")
        return out, problems, store.staging(run)

    return in_child(look)


def kill_chain(tally: Tally, kills: int, *, base: str, place: Place, work: Path, async_: bool,
               options: dict | None, env: dict | None, rng: random.Random, log: Callable[[str], None],
               reference: Path, calibrate: bool = True) -> None:
    """``reference``: the final model of a run of the same shape that was never interrupted; made
    by the first chain that needs it (every chain trains the same model: only storage differs)."""
    # never reached before the last kill: each cycle gains at most its three saves' steps (two
    # each) and what runs in its delay
    steps = 20 + 10 * kills
    run = "chain"
    journal = work / "journal"
    # calibration: how long a save takes here (emitted -> committed), over six saves
    args = _files(work, base, steps, async_=async_, options=options)
    span = 0.2  # the CI sample (calibrate=False) kills once a chain: a typical span is enough
    if calibrate:
        calibration = _files(work, base, 12, async_=async_, options=options)
        code, err = forked([*calibration, "--run-name", run], (Chaos(journal, None, 0.0),), cwd=work, env=env)
        if code != 0:
            tally.bad(f"the calibration run failed ({code}): {err[-500:]}")
            return
        js = journal_of(journal)
        emitted = {s: t for k, s, t in js if k == "emitted"}
        spans = sorted(t - emitted[s] for k, s, t in js if k == "committed" and s in emitted)
        span = spans[len(spans) // 2] if spans else span
        # start the chain again from a fresh run of the same shape, killed from its first saves on
        shutil.rmtree(work / "final", ignore_errors=True)
        in_child(lambda: place.store().fs.rm(place.store().run_dir(run), recursive=True))
        journal.unlink()
    for n in range(kills):
        before, _, _ = _intact(place, run)
        expected = max((s for s, ok in before.items() if ok), default=None)
        at = rng.randint(1, 3)
        delay = rng.uniform(0.0, span * 1.5 + 0.05)
        mark = len(journal_of(journal))
        cmd = [*args, "--run-name", run, "--resume", "auto"]  # the same command every launch
        code, err = forked(cmd, (Chaos(journal, at, delay),), cwd=work, env=env)
        tally.tried += 1
        mine = journal_of(journal)[mark:]
        started = next((s for k, s, _ in mine if k == "started"), None)
        ok = True
        if code is None:
            tally.hangs += 1
            tally.bad(f"kill {n}: no exit within {HANG_S:.0f} s")
            ok = False
        elif code != -signal.SIGKILL:
            ok = False
            if "Traceback" in err:
                tally.tracebacks += 1
            tally.bad(f"kill {n}: exit {code} instead of being killed: {err.strip().splitlines()[-1:] }")
        if started is not None and started != (expected or 0):  # nothing intact yet: a fresh start
            tally.torn += 1
            ok = False
            tally.bad(f"kill {n}: started at step {started}, the newest intact checkpoint was {expected}")
        # what was reported committed, not deleted by retention, and among the newest keep_last
        # (which retention never deletes: a kill may land between a retention delete and its
        # journal line) must be there, intact
        everything = journal_of(journal)
        committed = {s for k, s, _ in everything if k == "committed"}
        deleted = {s for k, s, _ in everything if k == "deleted"}
        now, problems, _ = _intact(place, run)
        for s in sorted(committed - deleted)[-KEEP_LAST:]:
            if not now.get(s):
                tally.lost += 1
                ok = False
                tally.bad(f"kill {n}: step {s} was committed and is {'torn' if s in now else 'gone'}")
        for p in problems:
            tally.bad(f"kill {n}: {p}")
        tally.survived += ok
        if (n + 1) % 10 == 0:
            log(f"  {tally.scenario}: {n + 1}/{kills} kills, {tally.survived} survived")
    # the chain ends: train to the last step; the result must equal the uninterrupted run's
    code, err = forked([*args, "--run-name", run, "--resume", "auto"], (Chaos(journal, None, 0.0),),
                       cwd=work, env=env)
    ref_code, ref_err = 0, ""
    if not reference.exists():
        ref_code, ref_err = forked([*args, "--run-name", "reference"], cwd=work, env=env)
        if ref_code == 0:
            shutil.copyfile(work / "final" / "reference" / "final" / "model.pt", reference)
    if code != 0 or ref_code != 0:
        tally.bad(f"the chain's end exited {code}, the reference {ref_code}: {(err or ref_err)[-500:]}")
        tally.torn += 1
        return
    if not same_weights(work / "final" / run / "final" / "model.pt", reference):
        tally.torn += 1
        tally.bad("the chain's final model differs from the uninterrupted run's")


def same_weights(a: Path, b: Path) -> bool:
    """Tensor for tensor, compared in a forked child: torch's thread pools must never start in
    this process, whose later forks would inherit them half-initialised and hang."""
    pid = os.fork()
    if pid == 0:
        try:
            import torch

            x, y = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
            os._exit(0 if x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) else 1)
        finally:
            os._exit(2)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


def scenario_kills(total: int, out: Path, rng: random.Random, log, calibrate: bool = True) -> list[Tally]:
    tallies = []
    quarter = max(total // 4, 1)
    with MotoProcess() as moto:
        env = {**S3_ENV, "AWS_ENDPOINT_URL": moto.endpoint}
        os.environ.update(env)
        for where, async_ in (("local", False), ("local", True), ("s3", False), ("s3", True)):
            name = f"kills, {where}, {'background' if async_ else 'synchronous'} saves"
            tally = Tally(name)
            work = Path(tempfile.mkdtemp(prefix="wmtp-kills-", dir=out))
            if where == "local":
                base = f"file://{work}/ck"
                place = Place(base)
                options = None
            else:
                bucket = moto.bucket(f"kills-{rng.randrange(1 << 30):x}")
                base = f"s3://{bucket}/ck"
                options = {"default_block_size": 5 << 20}  # several parts per file: kills mid-upload
                place = Place(base, {"endpoint_url": moto.endpoint})
            kill_chain(tally, quarter, base=base, place=place, work=work, async_=async_, options=options,
                       env=env, rng=rng, log=log, reference=out / "reference-model.pt", calibrate=calibrate)
            tallies.append(tally)
            log(_line(tally))
            shutil.rmtree(work, ignore_errors=True)
    return tallies


# ----------------------------------------------------------------------------- S3 faults
def scenario_s3_faults(rates: list[float], runs: int, out: Path, rng: random.Random, log) -> list[Tally]:
    tallies = []
    os.environ.update(S3_ENV)  # for the looks at the bucket (the runs get it in their env too)
    with MotoProcess() as moto:
        for rate in rates:
            tally = Tally(f"s3 faults, {rate:.0%} of requests")
            for i in range(runs):
                work = Path(tempfile.mkdtemp(prefix="wmtp-s3f-", dir=out))
                bucket = moto.bucket(f"faults-{rng.randrange(1 << 30):x}")
                proxy = ProxyProcess(moto.endpoint, rate, rng.randrange(1 << 30))
                env = {**S3_ENV, "AWS_ENDPOINT_URL": proxy.endpoint}
                args = _files(work, f"s3://{bucket}/ck", 12, async_=bool(i % 2),
                              options={"default_block_size": 5 << 20})
                code, err = forked([*args, "--run-name", "f"], cwd=work, env=env)
                proxy.stop()
                tally.tried += 1
                now, problems, _ = _intact(Place(f"s3://{bucket}/ck", {"endpoint_url": moto.endpoint}), "f")
                ok = code in (0, 1)
                if code is None:
                    tally.hangs += 1
                if "Traceback" in err:
                    tally.tracebacks += 1
                    ok = False
                if code not in (0, 1, None):
                    tally.bad(f"rate {rate}: exit {code}: {err.strip().splitlines()[-1:]}")
                if code == 1 and len([l for l in err.splitlines() if l.startswith("error:")]) != 1:
                    ok = False
                    tally.bad(f"rate {rate}: exit 1 without one error line: {err[-300:]}")
                if problems or not all(now.values()):
                    tally.lost += len(problems) or 1
                    ok = False
                    tally.bad(f"rate {rate}: {problems[:1]}")
                if code == 0 and max(now, default=0) != 12:
                    ok = False
                    tally.bad(f"rate {rate}: finished without its last checkpoint")
                tally.survived += ok
                shutil.rmtree(work, ignore_errors=True)
            tallies.append(tally)
            log(_line(tally))
    return tallies


class ProxyProcess:
    """The test suite's fault-injecting proxy (``tests/faultproxy.py``) in a process of its own."""

    def __init__(self, upstream: str, rate: float, seed: int) -> None:
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "faultproxy.py"), upstream,
                                      "--rate", str(rate), "--kinds", "500,503,reset", "--seed", str(seed)],
                                     stdout=subprocess.PIPE, text=True)
        self.endpoint = self.proc.stdout.readline().strip()
        self.counts = ""

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.counts = self.proc.communicate(timeout=30)[0].strip()
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ----------------------------------------------------------------------------- full disks
def scenario_full_disk(runs: int, out: Path, rng: random.Random, log) -> list[Tally]:
    tallies = []
    for async_ in (False, True):
        tally = Tally(f"full disk, {'background' if async_ else 'synchronous'} saves")
        if os.geteuid() != 0:
            tally.bad("skipped: mounting a tmpfs needs root")
            tallies.append(tally)
            continue
        for i in range(runs):
            work = Path(tempfile.mkdtemp(prefix="wmtp-disk-", dir=out))
            disk = work / "disk"
            disk.mkdir()
            size_mb = rng.choice([20, 30, 40, 50])
            mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(disk)],
                                     capture_output=True, text=True)
            if mounted.returncode != 0:
                tally.bad(f"skipped: mount failed: {mounted.stderr.strip()}")
                break
            try:
                args = _files(work, f"file://{disk}/ck", 40, async_=async_)
                code, err = forked([*args, "--run-name", "d"], cwd=work)
                tally.tried += 1
                now, problems, staging = _intact(Place(f"file://{disk}/ck"), "d")
                want = 1 if async_ else 2
                ok = code in (0, want)
                if code is None:
                    tally.hangs += 1
                if "Traceback" in err:
                    tally.tracebacks += 1
                    ok = False
                if code == want and not any(w in err.lower() for w in ("no space", "full", "bytes free")):
                    ok = False
                    tally.bad(f"{size_mb} MB: exit {code} without saying the disk is full: {err[-300:]}")
                if problems:
                    tally.lost += len(problems)
                    ok = False
                if staging:
                    ok = False
                    tally.bad(f"{size_mb} MB: staging left behind: {staging}")
                if code not in (0, want):
                    tally.bad(f"{size_mb} MB: exit {code}: {err.strip()[-300:]}")
                tally.survived += ok
            finally:
                subprocess.run(["umount", "-l", str(disk)], capture_output=True)
                shutil.rmtree(work, ignore_errors=True)
        tallies.append(tally)
        log(_line(tally))
    return tallies


# ----------------------------------------------------------------------------- configurations
ORIGIN = ROOT.parent / "shared" / "origin-files" / "configs"
BAD = [-1, 0, 1, 2.5, "x", "", None, True, [], {}, [1, "x"], {"k": 1}, 10 ** 12, 2 ** 64, 10 ** 400 // 10 ** 390,
       1e308, float("inf"), "../../etc/passwd", "s3://", "file:///nonexistent/x", "models:/x/1", "\x00",
       "9" * 5000, "a" * 100_000]


def _bases() -> list[tuple[str, dict]]:
    out = []
    for name in ("config.production.yaml", "config.vessl.yaml", "recipe.mtp_baseline.yaml",
                 "recipe.critic_wmtp.yaml", "recipe.rho1_wmtp_weighted.yaml"):
        path = ORIGIN / name
        if path.exists():
            out.append(("config" if name.startswith("config") else "recipe", yaml.safe_load(path.read_text())))
    for path in sorted((ROOT / "examples" / "configs").glob("*.yaml")):
        out.append(("config" if path.name.startswith("config") else "recipe", yaml.safe_load(path.read_text())))
    return out


def _nodes(data: Any, path: tuple = ()) -> list[tuple]:
    out = []
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for k, v in items:
        out.append(path + (k,))
        out.extend(_nodes(v, path + (k,)))
    return out


def _mutate(rng: random.Random, bases) -> tuple[str, str]:
    """(kind, YAML text) of one mutated configuration or recipe, or a hostile text."""
    kind, base = rng.choice(bases)
    special = rng.random()
    if special < 0.04:  # a YAML bomb: aliases of aliases
        lines = ['a0: &a0 ["x","x","x","x","x","x","x","x","x","x"]']
        lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, rng.randint(4, 9))]
        return kind, "\n".join(lines) + "\n"
    if special < 0.08:  # deep nesting
        depth = rng.choice([65, 200, 3000, 50_000])
        key = rng.choice(["seed", "paths", "train", "model"])
        return kind, f"{key}: " + "[" * depth + "]" * depth + "\n"
    if special < 0.10:  # recursive alias
        return kind, "a: &a [*a]\n"
    if special < 0.12:  # control characters and junk
        return kind, "".join(rng.choice(["seed: ", "\x00", "\x85", "\t", "{", "[", ": ", "- ", "!!python/name:os.system",
                                         "&a", "*a", "<<: *a", "\n"]) for _ in range(rng.randint(1, 12)))
    data = copy.deepcopy(base)
    for _ in range(rng.randint(1, 3)):
        nodes = _nodes(data)
        op = rng.random()
        if nodes and op < 0.6:
            path = rng.choice(nodes)
            parent = data
            for k in path[:-1]:
                parent = parent[k]
            parent[path[-1]] = copy.deepcopy(rng.choice(BAD))
        elif nodes and op < 0.8:
            maps = [p for p in nodes if isinstance(_at(data, p), dict) and _at(data, p)]
            if maps:
                m = _at(data, rng.choice(maps))
                old = rng.choice(sorted(m))
                m[old[:-1] + rng.choice("abcxyz_") if len(old) > 1 else old + "x"] = m.pop(old)
        else:
            target = data if not nodes else _at(data, rng.choice([()] + [p for p in nodes if isinstance(_at(data, p), dict)]))
            if isinstance(target, dict):
                target["".join(rng.choice("abcdefghij_") for _ in range(rng.randint(1, 10)))] = rng.choice(BAD)
    try:
        return kind, yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    except (ValueError, OverflowError):
        return kind, "seed: 1\n"


def _at(data: Any, path: tuple) -> Any:
    for k in path:
        data = data[k]
    return data


def scenario_configs(count: int, out: Path, rng: random.Random, log) -> list[Tally]:
    tally = Tally("mutated configurations (--dry-run)")
    bases = _bases()
    work = Path(tempfile.mkdtemp(prefix="wmtp-configs-", dir=out))
    valid = {kind: yaml.safe_dump(base) for kind, base in reversed(bases)}
    for i in range(count):
        kind, text = _mutate(rng, bases)
        (work / "config.yaml").write_text(text if kind == "config" else valid["config"])
        (work / "recipe.yaml").write_text(text if kind == "recipe" else valid["recipe"])
        code, err = forked(["--config", str(work / "config.yaml"), "--recipe", str(work / "recipe.yaml"),
                            "--dry-run"], cwd=work, timeout=60) if i % 50 == 0 else _in_process(work)
        tally.tried += 1
        ok = code in (0, 2)
        if code is None:
            tally.hangs += 1
            tally.bad(f"config {i}: no answer within the limit: {text[:200]!r}")
        if "Traceback" in err or code not in (0, 2, None):
            tally.tracebacks += 1
            ok = False
            tally.bad(f"config {i}: exit {code}: {err.strip()[-300:]}")
        if code == 2 and "error:" not in err:
            ok = False
            tally.bad(f"config {i}: exit 2 without an error line")
        tally.survived += ok
        if (i + 1) % 250 == 0:
            log(f"  configs: {i + 1}/{count}")
    shutil.rmtree(work, ignore_errors=True)
    log(_line(tally))
    return [tally]


def _in_process(work: Path) -> tuple[int | None, str]:
    """A dry run in this process (fast), with a time limit: a hang is counted, not waited for."""
    err = io.StringIO()

    def alarm(*_):
        raise TimeoutError("dry run took more than 60 s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(60)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err), contextlib.chdir(work):
            code = main(["--config", "config.yaml", "--recipe", "recipe.yaml", "--dry-run"])
    except TimeoutError:
        code = None
    except BaseException:
        import traceback

        err.write(traceback.format_exc())
        code = 1
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    return code, err.getvalue()


# ----------------------------------------------------------------------------- crafted checkpoints
class _Payload:
    """Pickles to something that would run ``call(*args)`` when unpickled without weights-only."""

    def __init__(self, call: Any, args: tuple) -> None:
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


def _payloads(marker: Path) -> list[Any]:
    import builtins
    import posix

    cmd = f"touch {marker}"
    return [_Payload(os.system, (cmd,)), _Payload(posix.system, (cmd,)),
            _Payload(subprocess.call, (["touch", str(marker)],)),
            _Payload(builtins.exec, (f"open({str(marker)!r}, 'w').close()",)),
            _Payload(builtins.eval, (f"open({str(marker)!r}, 'w').close()",))]


def _recommit(path: Path) -> None:
    """Rewrite ``path``'s manifest so that it names the files there with their true digests:
    what an attacker with write access does, so that only weights-only loading stands between
    the file and the code it names."""
    from wmtp_core.hashing import digest_file

    m = json.loads((path / "manifest.json").read_text())
    for e in m["files"]:
        if (path / e["path"]).exists() and not (path / e["path"]).is_symlink():
            key = "digest" if "digest" in e else "sha256"
            e[key], e["size"] = digest_file(str(path / e["path"]), m.get("hash", "sha256"))
    (path / "manifest.json").write_text(json.dumps(m))


def _zip_pickle(obj: Any, f: Any) -> None:
    """``torch.save(obj, f)`` in a forked child (see :func:`same_weights`)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            import torch

            os.close(r)
            buf = io.BytesIO()
            torch.save(obj, buf)
            with os.fdopen(w, "wb") as dst:
                dst.write(buf.getvalue())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as src:
        f.write(src.read())
    os.waitpid(pid, 0)


UNUSABLE = [
    ("an empty trainer state", "trainer.pt", (), {}),
    ("step -3", "trainer.pt", ("step",), -3),
    ("step 10**18", "trainer.pt", ("step",), 10 ** 18),
    ("scheduler warmup 'x'", "trainer.pt", ("scheduler", "lr_lambdas", 0, "warmup"), "x"),
    ("scheduler optimizer {}", "trainer.pt", ("scheduler", "optimizer"), {}),
    ("scheduler base_lrs 'abc'", "trainer.pt", ("scheduler", "base_lrs"), "abc"),
    ("data index -5", "trainer.pt", ("data", "index"), -5),
    ("a weight of another shape", "model.pt", (None,), [3, 5]),
    ("optimizer without param_groups", "optimizer.pt", ("param_groups",), None),
]
"""Well-hashed checkpoints that no run can use: ``(what, part, key path, value)``; an empty
path replaces the whole part, ``(None,)`` reshapes the first weight to ``value``."""


RESUME_FINDS = ("the checkpoint a link to another directory", "scheduler", "data index", "another shape")
"""What ``verify`` cannot know without the run's model and scheduler: the resume finds it."""


def _edit_part(file: Path, path: tuple, value: Any) -> None:
    """In a forked child (torch stays out of the campaign's own process): set ``path`` of the
    deserialised part to ``value`` and save it back."""
    import torch

    state = torch.load(file, weights_only=True)
    if not path:
        state = value
    elif path == (None,):
        state[next(iter(state))] = torch.zeros(*value)
    else:
        target = state
        for key in path[:-1]:
            target = target[key]
        if value is None:
            del target[path[-1]]
        else:
            target[path[-1]] = value
    torch.save(state, file)


def scenario_crafted(rounds: float, out: Path, rng: random.Random, log) -> list[Tally]:
    tally = Tally("crafted checkpoints (verify, --resume)")
    work = Path(tempfile.mkdtemp(prefix="wmtp-crafted-", dir=out))
    args = _files(work, f"file://{work}/ck", 4, async_=False, save_interval=2)  # step_2, step_4
    code, err = forked([*args, "--run-name", "good"], cwd=work)
    if code != 0:
        tally.bad(f"the source run failed: {err[-500:]}")
        return [tally]
    good = work / "ck" / "good" / "step_4"
    marker = work / "pwned"
    outside = work / "outside.bin"
    attacks: list[tuple[str, Callable[[Path], None]]] = []
    for payload in _payloads(marker):
        for part in ("trainer.pt", "model.pt", "optimizer.pt"):
            def plant(p: Path, payload=payload, part=part, zipped=rng.random() < 0.5):
                if zipped:  # torch's zip format, written the way torch.save writes it
                    buf = io.BytesIO()
                    _zip_pickle({"state": payload}, buf)
                    (p / part).write_bytes(buf.getvalue())
                else:
                    (p / part).write_bytes(pickle.dumps(payload))
                _recommit(p)
            attacks.append((f"{part}: pickle calling {getattr(payload.call, '__name__', payload.call)}", plant))

    def dotdot(p: Path):
        m = json.loads((p / "manifest.json").read_text())
        m["files"][0]["path"] = "../../good/step_4/" + m["files"][0]["path"]
        (p / "manifest.json").write_text(json.dumps(m))

    def absolute(p: Path):
        m = json.loads((p / "manifest.json").read_text())
        m["files"][0]["path"] = str(good / m["files"][0]["path"])
        (p / "manifest.json").write_text(json.dumps(m))

    def link(p: Path):
        shutil.copy(p / "model.pt", outside)
        (p / "model.pt").unlink()
        (p / "model.pt").symlink_to(outside)

    def dir_link(p: Path):
        shutil.copytree(p, work / "elsewhere", dirs_exist_ok=True)
        shutil.rmtree(p)
        p.symlink_to(work / "elsewhere")

    def manifest_dir(p: Path):
        (p / "manifest.json").unlink()
        (p / "manifest.json").mkdir()

    attacks += [("manifest entry with ../", dotdot), ("manifest entry with an absolute path", absolute),
                ("model.pt a link leading outside", link), ("the checkpoint a link to another directory", dir_link),
                ("manifest.json a directory", manifest_dir)]
    for what, part, path, value in UNUSABLE:
        def change(p: Path, part=part, path=path, value=value):
            in_child(lambda: _edit_part(p / part, path, value))
            _recommit(p)
        attacks.append((f"{part}: {what}", change))
    # a fraction of a round (the CI sample) tries that share of the attacks, drawn by the seed
    plan = [attacks] * int(rounds) + ([rng.sample(attacks, math.ceil(len(attacks) * (rounds % 1)))]
                                     if rounds % 1 else [])
    for r, sample in enumerate(plan):
        for what, attack in sample:
            victim = work / "ck" / "victim"
            shutil.rmtree(victim, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(work / "elsewhere") if (work / "elsewhere").is_symlink() else shutil.rmtree(work / "elsewhere")
            shutil.copytree(work / "ck" / "good", victim)
            for step in ("step_2", "step_4"):  # the victim's own: step_2 to fall back on
                m = json.loads((victim / step / "manifest.json").read_text())
                m["run"] = "victim"
                (victim / step / "manifest.json").write_text(json.dumps(m))
                _recommit(victim / step)
            attack(victim / "step_4")
            marker.unlink(missing_ok=True)
            ok = True
            from wmtp_core.cli import main as wmtp

            verr = io.StringIO()
            with contextlib.redirect_stdout(verr), contextlib.redirect_stderr(verr):
                try:
                    vcode = wmtp(["checkpoints", "verify", str(victim / "step_4"), "--no-quarantine"])
                except BaseException as e:  # noqa: BLE001 - counted
                    vcode, _ = 99, verr.write(repr(e))
            code, err = forked([*args, "--run-name", "victim", "--resume", "latest"], cwd=work)
            if code not in (0, None):  # tried again: a run refused for good fails every time
                code, err = forked([*args, "--run-name", "victim", "--resume", "latest"], cwd=work)
                if code not in (0, None):
                    tally.refused += 1
                    ok = False
                    tally.bad(f"{what}: the run was refused twice (exit {code}): {err.strip()[-300:]}")
            if vcode == 0 and not any(m in what for m in RESUME_FINDS):
                ok = False
                tally.bad(f"{what}: verify said OK")
            tally.tried += 1
            if marker.exists():
                tally.executed += 1
                ok = False
                tally.bad(f"{what}: code ran")
            if "Traceback" in err or "Traceback" in verr.getvalue() or code is None or code not in (0, 2):
                tally.tracebacks += code is not None
                tally.hangs += code is None
                ok = False
                tally.bad(f"{what}: resume exit {code}: {err.strip()[-300:]}")
            if code == 0 and re.search(r"resuming 'victim' from \S+ \(step 4\)", err):
                ok = False  # a crafted checkpoint must never be resumed from
                tally.bad(f"{what}: resumed from it")
            tally.survived += ok
        log(f"  crafted: round {r + 1}/{len(plan)}")
    shutil.rmtree(work, ignore_errors=True)
    log(_line(tally))
    return [tally]


# ----------------------------------------------------------------------------- the table
HEADER = ["scenario", "tried", "survived", "torn resumes", "committed lost", "tracebacks", "hangs",
          "code executions", "runs refused for good", "foreign objects removed"]
COUNTS = ("tried", "survived", "torn", "lost", "tracebacks", "hangs", "executed", "refused", "foreign")


def table(tallies: list[Tally]) -> str:
    rows = [HEADER, ["---"] * len(HEADER), *[t.row() for t in tallies]]
    total = Tally("**all**")
    for t in tallies:
        for f in COUNTS:
            setattr(total, f, getattr(total, f) + getattr(t, f))
    rows.append(total.row())
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def _line(t: Tally) -> str:
    return (f"{t.scenario}: {t.survived}/{t.tried} survived, torn {t.torn}, lost {t.lost}, "
            f"tracebacks {t.tracebacks}, hangs {t.hangs}, code executions {t.executed}, "
            f"refused for good {t.refused}, foreign removed {t.foreign}"
            + (f" ({t.notes[0]})" if t.notes else ""))


def standalone(scenario: Callable, name: str, argv: list[str] | None, seed: int = 20261204) -> int:
    """A hostile-input module run by itself (``python benchmarks/hostile_<name>.py [--rounds N]
    [--seed S]``): its scenario in a temporary folder, one line a tally, exit 0 when every try
    survived."""
    p = argparse.ArgumentParser(description=f"the {name} scenario of the reliability campaign, alone")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--seed", type=int, default=seed)
    a = p.parse_args(argv)
    out = Path(tempfile.mkdtemp(prefix=f"wmtp-hostile-{name}-"))
    try:
        tallies = scenario(a.rounds, out, random.Random(a.seed), print)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    for t in tallies:
        print("; ".join([_line(t), *t.notes[1:]]))  # _line names the first note
    return 0 if all(t.survived == t.tried for t in tallies) else 1


FULL = {"kills": 200, "s3_runs": 6, "rates": [0.02, 0.1, 0.3], "disk_runs": 4, "configs": 1000, "crafted": 2,
        "gc": 3, "models": 3, "hostile-configs": 3, "signals": 3}
QUICK = {"kills": 4, "calibrate": False, "s3_runs": 1, "rates": [0.1], "disk_runs": 1, "configs": 30, "crafted": 0.35,
         "gc": 1, "models": 1, "hostile-configs": 1, "signals": 1}

HOSTILE = {"gc": ("hostile_gc", "scenario_i18gc"), "models": ("hostile_models", "scenario_models"),
           "hostile-configs": ("hostile_configs", "scenario_hostile_configs"),
           "signals": ("hostile_signals", "scenario_hostile_signals")}
"""The hostile-input scenarios, each in its own module beside this one: ``--only`` name ->
(module, function taking ``(rounds, out, rng, log)``)."""


def _hostile(name: str, rounds: int, out: Path, rng: random.Random, log) -> list[Tally]:
    """Run one hostile-input scenario and fold its own counts into the table's columns."""
    module, function = HOSTILE[name]
    sys.path.insert(0, str(HERE))
    try:
        scenario = getattr(importlib.import_module(module), function)
    finally:
        sys.path.remove(str(HERE))
    tallies = scenario(rounds, out, rng, log)
    for t in tallies:
        t.foreign += getattr(t, "foreign_removed", 0)
        t.refused += getattr(t, "legitimate_refused", 0)
    return tallies


def campaign(only: set[str], counts: dict[str, Any], out: Path, seed: int, log=print) -> list[Tally]:
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    tallies: list[Tally] = []
    if "kills" in only:
        tallies += scenario_kills(counts["kills"], out, rng, log, counts.get("calibrate", True))
    if "s3" in only:
        tallies += scenario_s3_faults(counts["rates"], counts["s3_runs"], out, rng, log)
    if "disk" in only:
        tallies += scenario_full_disk(counts["disk_runs"], out, rng, log)
    if "configs" in only:
        tallies += scenario_configs(counts["configs"], out, rng, log)
    if "crafted" in only:
        tallies += scenario_crafted(counts["crafted"], out, rng, log)
    for name in HOSTILE:
        if name in only:
            tallies += _hostile(name, counts[name], out, rng, log)
    return tallies


def preload() -> None:
    """Import what a run imports before the first fork, so that each forked run starts at once
    instead of importing torch again (about 4 s a run here). Imports only: no tensor op runs
    here, so no thread pool exists that a forked child could inherit half-used."""
    import importlib
    import pkgutil

    import torch  # noqa: F401
    import torch.distributed.checkpoint  # noqa: F401

    import wmtp_core
    import wmtp_plugins

    for package in (wmtp_core, wmtp_plugins):
        for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            if "mlflow" not in info.name and not info.name.endswith((".report", ".plot", ".__main__", ".run")):
                importlib.import_module(info.name)


def cli(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    present = [n for n, (module, _) in HOSTILE.items() if (HERE / f"{module}.py").exists()]
    p.add_argument("--only", default=",".join(["kills", "s3", "disk", "configs", "crafted", *present]))
    p.add_argument("--quick", action="store_true", help="a small sample of each scenario")
    p.add_argument("--kills", type=int)
    p.add_argument("--configs", type=int)
    p.add_argument("--seed", type=int, default=20261129)
    p.add_argument("--out", default=str(HERE / "results" / "faults"))
    a = p.parse_args(argv)
    counts = dict(QUICK if a.quick else FULL)
    if a.kills is not None:
        counts["kills"] = a.kills
    if a.configs is not None:
        counts["configs"] = a.configs
    out = Path(a.out)
    t0 = time.time()
    preload()
    tallies = campaign(set(a.only.split(",")), counts, out / "work", a.seed)
    shutil.rmtree(out / "work", ignore_errors=True)
    text = table(tallies)
    notes = [f"- {t.scenario}: {n}" for t in tallies for n in t.notes]
    report = (f"# Reliability campaign\n\nseed {a.seed}, {time.time() - t0:.0f} s, "
              f"`{' '.join(['benchmarks/faults.py', *(argv or sys.argv[1:])])}`\n\n{text}\n"
              + ("\n## Notes\n\n" + "\n".join(notes) + "\n" if notes else ""))
    (out / "faults.md").write_text(report)
    (out / "faults.json").write_text(json.dumps([attrs.asdict(t) for t in tallies], indent=2))
    print(report)
    bad = any(t.torn or t.lost or t.tracebacks or t.hangs or t.executed or t.refused or t.foreign
              for t in tallies)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(cli())
