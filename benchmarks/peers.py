"""WMTP against its peers (issue 21): the same model, data and storage trained under Lightning,
the Hugging Face Trainer and WMTP, measured side by side.

``uv run --group peers python benchmarks/peers.py [--quick] [--out DIR] [--repeat N]``

For each store (local disk, then a loopback S3 server, moto, behind a proxy that counts the
bytes PUT) and each side and setup (Lightning and the HF Trainer as documented and at their best
effort, WMTP with its defaults), every repeat (the sides' order rotating from one repeat to the
next) runs the side's runner (``benchmarks/peers_<side>.py SPEC.json``, a process of its own):

1. uninterrupted: the bytes held at the end and written, the save stalls, the wall time, the
   final model (registered once? loadable with ``mlflow.transformers.load_model``? free of
   optimizer state?);
2. SIGKILLed at a random moment of a save in the middle, then resumed the tool's own way: did it
   resume, from which step, are the final weights equal tensor for tensor to the uninterrupted
   run's?
3. (first repeat) trained to the midpoint once, then for each corruption of its newest
   checkpoint (a flipped byte, the largest file truncated, a file deleted; the midpoint's folder
   and bucket put back between them), resumed: crash, silently wrong, started over or fallback?

Then on local disk, one uninterrupted run of each side with its keep-best retention.

Writes ``peers.md`` and ``peers.json`` to ``--out`` (``benchmarks/results/peers/``); exits 1
when a WMTP target is missed. ``--quick``: one setup per peer, local disk only, few steps.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import peers_measure as measure  # noqa: E402
import peers_report as report  # noqa: E402

SIDES = (("lightning", "documented"), ("hf", "documented"), ("wmtp", "default"),
         ("lightning", "best_effort"), ("hf", "best_effort"))
QUICK_SIDES = SIDES[:3]
VARIANTS = ("flip", "truncate", "delete")
S3_ENV = {"AWS_ACCESS_KEY_ID": "wmtp-peers-key-id", "AWS_SECRET_ACCESS_KEY": "wmtp-peers-secret",
          "AWS_DEFAULT_REGION": "us-east-1"}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one setup per peer, local disk, few steps, one repeat")
    p.add_argument("--out", default=str(HERE / "results" / "peers"))
    p.add_argument("--repeat", type=int, default=None, help="repeats on local disk (default 3; --quick: 1)")
    p.add_argument("--s3-repeat", type=int, default=1, help="repeats on S3 (default 1)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default 20; --quick: 6)")
    p.add_argument("--save-every", type=int, default=None, help="save interval (default 2; --quick: 1)")
    p.add_argument("--keep-last", type=int, default=None, help="checkpoints kept (default 5; --quick: 2)")
    p.add_argument("--stores", default=None, help="comma-separated: local,s3 (--quick: local)")
    p.add_argument("--seed", type=int, default=0, help="seeds the random moments of the kills")
    p.add_argument("--variants", default=None, help="corruptions: flip,truncate,delete (--quick: flip)")
    p.add_argument("--no-keep-best", dest="keep_best", action="store_false",
                   help="skip the keep-best runs (one uninterrupted run per side on local disk; --quick: skipped)")
    p.add_argument("--only", default=None, help="comma-separated sides to run (lightning, hf, wmtp)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds one runner may take")
    args = p.parse_args(argv)
    quick = args.quick
    args.repeat = args.repeat or (1 if quick else 3)
    args.keep_best = args.keep_best and not quick
    args.steps = args.steps or (6 if quick else 20)
    args.save_every = args.save_every or (1 if quick else 2)
    args.keep_last = args.keep_last or (2 if quick else 5)
    args.stores = (args.stores or ("local" if quick else "local,s3")).split(",")
    args.sides = tuple(s for s in (QUICK_SIDES if quick else SIDES)
                       if args.only is None or s[0] in args.only.split(","))
    args.variants = args.variants.split(",") if args.variants else VARIANTS[:1] if quick else VARIANTS
    if set(args.variants) - set(VARIANTS) or set(args.stores) - {"local", "s3"}:
        p.error(f"--variants: some of {', '.join(VARIANTS)}; --stores: local, s3")
    return args


def plan_of(args: argparse.Namespace) -> dict:
    """The counts every side runs with: the save the kill hits, the corruption's midpoint."""
    saves = args.steps // args.save_every
    mid = args.save_every * max(2, saves // 2)
    return {"steps": args.steps, "save_every": args.save_every, "keep_last": args.keep_last,
            "repeat": {"local": args.repeat, "s3": args.s3_repeat},
            "kill_save": max(2, (saves + 1) // 2), "midpoint": min(mid, args.steps), "variants": list(args.variants),
            "stores": args.stores, "sides": [f"{a}/{b}" for a, b in args.sides], "seed": args.seed}


# --------------------------------------------------------------------------- stores
class Store:
    """Where one store's runs keep their bytes: local disk, or a bucket per run on the loopback
    S3 server, reached by the runners through :class:`peers_measure.CountingProxy`."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.server = self.proxy = None
        self.upstream = None
        self.buckets: list[str] = []

    def __enter__(self) -> Store:
        if self.kind == "s3":
            import logging

            from moto.server import ThreadedMotoServer

            logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise

            os.environ.update(S3_ENV)
            self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
            self.server.start()
            host, port = self.server.get_host_and_port()
            self.upstream = f"http://{host}:{port}"
            # this process's own clients (the final model's check) reach the server directly
            os.environ.update(AWS_ENDPOINT_URL=self.upstream, MLFLOW_S3_ENDPOINT_URL=self.upstream)
            self.proxy = measure.CountingProxy(self.upstream).start()
        return self

    def __exit__(self, *exc) -> None:
        if self.proxy is not None:
            self.proxy.stop()
        if self.server is not None:
            self.server.stop()

    def env(self) -> dict:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        if self.kind == "s3":
            env.update(S3_ENV, AWS_ENDPOINT_URL=self.proxy.url, MLFLOW_S3_ENDPOINT_URL=self.proxy.url)
        return env

    def forget(self) -> None:
        """Empties every bucket made so far (moto keeps objects in this process's memory)."""
        client = measure.s3_client(self.upstream) if self.buckets else None
        for bucket in self.buckets:
            for _, key, _ in measure.s3_objects(self.upstream, bucket):
                client.delete_object(Bucket=bucket, Key=key)
        self.buckets.clear()

    def check_env(self) -> dict:
        """The environment of this process's own checks: the S3 server reached directly."""
        env = self.env()
        if self.kind == "s3":
            env.update(AWS_ENDPOINT_URL=self.upstream, MLFLOW_S3_ENDPOINT_URL=self.upstream)
        return env

    def put_bytes(self) -> int:
        return self.proxy.put_bytes if self.proxy is not None else 0

    def locations(self, workdir: str) -> dict:
        """The spec's storage keys for a run whose local files live under ``workdir``."""
        if self.kind == "local":
            return {"checkpoint_uri": f"{workdir}/checkpoints", "artifact_location": f"file://{workdir}/mlartifacts",
                    "s3_endpoint": None, "bucket": None}
        bucket = f"peers-{uuid.uuid4().hex[:12]}"
        measure.s3_client(self.upstream).create_bucket(Bucket=bucket)
        self.buckets.append(bucket)
        return {"checkpoint_uri": f"s3://{bucket}/checkpoints", "artifact_location": f"s3://{bucket}/mlflow",
                "s3_endpoint": self.proxy.url, "bucket": bucket}


# --------------------------------------------------------------------------- one runner
def make_spec(side: str, setup: str, store: Store, workdir: str, plan: dict, **over) -> dict:
    os.makedirs(workdir, exist_ok=True)
    spec = {"side": side, "setup": setup, "store": store.kind, "workdir": workdir,
            "mlflow_tracking_uri": f"sqlite:///{workdir}/mlflow.db", **store.locations(workdir),
            "steps": plan["steps"], "save_every": plan["save_every"], "keep_last": plan["keep_last"],
            "keep_best": False, "seed": 1234, "resume": False, "kill_during_save": None, "kill_seed": 0,
            "register_name": f"peers-{side}-{setup}", "result": f"{workdir}/result.json",
            "model_folder": plan["model_folder"]}
    spec.update(over)
    return spec


def run(spec: dict, store: Store, timeout: int, tag: str = "run") -> dict:
    """Runs the side's runner on ``spec`` in a process of its own; its result JSON (``{}`` if it
    wrote none) with ``rc``, ``put_bytes`` (S3) and ``log`` added."""
    path = Path(spec["workdir"]) / f"spec-{tag}.json"
    spec = {**spec, "result": f"{spec['workdir']}/result-{tag}.json"}
    path.write_text(json.dumps(spec, indent=2))
    log = Path(spec["workdir"]) / f"{tag}.log"
    put0, t0 = store.put_bytes(), time.perf_counter()
    with open(log, "w") as f:
        try:
            rc = subprocess.run([sys.executable, str(HERE / f"peers_{spec['side']}.py"), str(path)], stdout=f,
                                stderr=subprocess.STDOUT, env=store.env(), cwd=spec["workdir"],
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    result = json.loads(Path(spec["result"]).read_text()) if Path(spec["result"]).exists() else {}
    result.update(rc=rc, put_bytes=store.put_bytes() - put0, log=str(log), elapsed_s=time.perf_counter() - t0)
    print(f"    {spec['side']}/{spec['setup']} {tag}: exit {rc}, {result['elapsed_s']:.1f} s"
          f" (runner wall {result.get('wall_s') or 0:.1f} s)", flush=True)
    if rc not in (0, -9) and not result.get("error"):
        result["error"] = f"exit status {rc}; " + tail(log)
    return result


def tail(log: Path, n: int = 300) -> str:
    text = log.read_text(errors="replace").strip().splitlines()
    return " | ".join(text[-3:])[-n:] if text else ""


# --------------------------------------------------------------------------- the scenarios
def same(a: str | None, b: str | None) -> bool | None:
    """Whether two ``save_weights`` files hold the same tensors (``None``: one is missing)."""
    if not a or not b or not os.path.exists(a) or not os.path.exists(b):
        return None
    import peers_workload

    return peers_workload.same_weights(a, b)[0]


def uninterrupted(side: str, setup: str, store: Store, work: str, plan: dict, timeout: int, **over) -> dict:
    """One uninterrupted run: what it held, wrote, how long its saves stalled it, its final model."""
    spec = make_spec(side, setup, store, f"{work}/full", plan, **over)
    result = run(spec, store, timeout)
    held = measure.held(spec, spec["bucket"], store.upstream)
    final = measure.final_model_apart(result, spec, f"{work}/full-check", store.check_env()) \
        if not result.get("error") else {}
    shutil.rmtree(f"{work}/full-check", ignore_errors=True)
    written = result.get("put_bytes") if store.kind == "s3" else local_written(result)
    return {"error": result.get("error"), "stalls": result.get("stalls") or [], "wall_s": result.get("wall_s"),
            "written": written, "held": held, "final": final, "weights": result.get("final_weights"),
            "final_step": result.get("final_step"), "checkpoint_files": len(result.get("checkpoint_files") or []),
            "notes": result.get("notes") or []}


def local_written(result: dict) -> int | None:
    """The runner's own write count, less the weights file it wrote for the comparison."""
    n, weights = result.get("io_write_bytes"), result.get("final_weights")
    if n is None:
        return None
    return max(0, n - (os.path.getsize(weights) if weights and os.path.exists(weights) else 0))


def killed(side: str, setup: str, store: Store, work: str, plan: dict, timeout: int, seed: int,
           reference: str | None) -> dict:
    """SIGKILL at a random moment of save ``kill_save``, then the tool's own resume to the end."""
    spec = make_spec(side, setup, store, f"{work}/kill", plan, kill_during_save=plan["kill_save"], kill_seed=seed)
    cut = run(spec, store, timeout, "cut")
    again = run({**spec, "kill_during_save": None, "resume": True}, store, timeout, "resume")
    return {"killed_rc": cut["rc"], "kill_save": plan["kill_save"], "kill_seed": seed, "rc": again["rc"],
            "error": again.get("error"), "resumed_from_step": again.get("resumed_from_step"),
            "final_step": again.get("final_step"), "equal": same(reference, again.get("final_weights"))}


def corrupted(side: str, setup: str, store: Store, work: str, plan: dict, timeout: int,
              reference: str | None) -> list[dict]:
    """Trained to the midpoint once; then for each variant, from that same state (a snapshot of
    the run's folder and bucket put back before each), the newest checkpoint corrupted and the
    tool resumed to the end."""
    spec = make_spec(side, setup, store, f"{work}/corrupt", plan, steps=plan["midpoint"])
    first = run(spec, store, timeout, "mid")
    newest = measure.newest_checkpoint(first.get("checkpoint_files") or [])
    if first.get("error") or newest is None:
        return [{"variant": v, "outcome": "no checkpoint at the midpoint", "error": first.get("error")}
                for v in plan["variants"]]
    snapshot = Snapshot(spec, store)
    out = []
    for i, variant in enumerate(plan["variants"]):
        if i:
            snapshot.restore()
        what = measure.corrupt(newest[1], variant, store.upstream)
        again = run({**spec, "steps": plan["steps"], "resume": True}, store, timeout, f"resume-{variant}")
        r = {"variant": variant, "corrupted": what, "corrupted_step": newest[0], "rc": again["rc"],
             "error": again.get("error"), "resumed_from_step": again.get("resumed_from_step"),
             "final_step": again.get("final_step"), "equal": same(reference, again.get("final_weights"))}
        r["outcome"] = outcome(r)
        out.append(r)
    return out


class Snapshot:
    """A run's state as it is now (its folder, and its bucket's objects copied server-side to a
    bucket of their own), put back by :meth:`restore` exactly: so that each corruption starts
    from the same midpoint without training to it again."""

    def __init__(self, spec: dict, store: Store) -> None:
        self.work, self.copy = spec["workdir"], spec["workdir"].rstrip("/") + ".snapshot"
        self.bucket, self.store = spec["bucket"], store
        shutil.rmtree(self.copy, ignore_errors=True)
        shutil.copytree(self.work, self.copy, symlinks=True)
        if self.bucket:
            self.saved = f"{self.bucket}-snapshot"
            measure.s3_client(store.upstream).create_bucket(Bucket=self.saved)
            store.buckets.append(self.saved)
            self._mirror(self.bucket, self.saved)

    def restore(self) -> None:
        shutil.rmtree(self.work)
        shutil.copytree(self.copy, self.work, symlinks=True)
        if self.bucket:
            self._mirror(self.saved, self.bucket)

    def _mirror(self, source: str, target: str) -> None:
        """``target`` made to hold exactly ``source``'s objects."""
        client = measure.s3_client(self.store.upstream)
        for _, key, _ in measure.s3_objects(self.store.upstream, target):
            client.delete_object(Bucket=target, Key=key)
        for _, key, _ in measure.s3_objects(self.store.upstream, source):
            client.copy_object(Bucket=target, Key=key, CopySource={"Bucket": source, "Key": key})


def outcome(r: dict) -> str:
    """crash, started over, silently wrong, fallback, or unharmed (resumed from the corrupted
    checkpoint and still equal: the corruption changed nothing that counts)."""
    if r["rc"] != 0 or r["error"]:
        return "crash"
    if r["resumed_from_step"] is None:
        return "started over"
    if not r["equal"]:
        return "silently wrong"
    return "fallback" if r["resumed_from_step"] < r["corrupted_step"] else "unharmed"


def one_repeat(side: str, setup: str, store: Store, work: str, plan: dict, args, r: int) -> dict:
    """Every scenario of one repeat of one side and setup; the work folder is emptied after."""
    import random

    full = uninterrupted(side, setup, store, work, plan, args.timeout)
    reference = f"{work}/reference.safetensors"
    if full["weights"] and os.path.exists(full["weights"]):
        shutil.copyfile(full["weights"], reference)
    else:
        reference = None
    seed = random.Random(f"{args.seed}/{r}/{side}/{setup}/{store.kind}").randrange(2**31)
    full["kill"] = killed(side, setup, store, work, plan, args.timeout, seed, reference)
    full["corruption"] = corrupted(side, setup, store, work, plan, args.timeout, reference) if r == 0 else []
    store.forget()
    shutil.rmtree(work, ignore_errors=True)
    return full


KEEP_BEST = "local, keep-best"


def keep_best(args, store: Store, work: Path, plan: dict, t0: float) -> dict[str, list[dict]]:
    """One uninterrupted run of each side with its keep-best retention (the best checkpoint by
    the side's own monitor kept besides the newest): what it held, wrote and stalled."""
    runs = {}
    for side, setup in args.sides:
        label = f"{side}/{setup}"
        print(f"[{time.perf_counter() - t0:7.1f} s] local keep-best: {label}", flush=True)
        folder = str(work / "keep-best" / f"{side}-{setup}")
        full = uninterrupted(side, setup, store, folder, plan, args.timeout, keep_best=True)
        runs[label] = [{**full, "kill": None, "corruption": []}]
        shutil.rmtree(folder, ignore_errors=True)
    return runs


def order(sides: tuple, r: int) -> list:
    """The sides' order in repeat ``r``: rotated by one each repeat."""
    k = r % len(sides)
    return list(sides[k:] + sides[:k])


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    plan = plan_of(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    import peers_workload

    plan["model_folder"] = peers_workload.model_folder({"workdir": str(out / "work")})
    runs: dict[str, dict[str, list[dict]]] = {}
    for kind in args.stores:
        with Store(kind) as store:
            repeats = plan["repeat"][kind]
            for r in range(repeats):
                for side, setup in order(args.sides, r):
                    label = f"{side}/{setup}"
                    print(f"[{time.perf_counter() - t0:7.1f} s] {kind} repeat {r + 1}/{repeats}: {label}",
                          flush=True)
                    work = str(out / "work" / kind / f"{side}-{setup}")
                    shutil.rmtree(work, ignore_errors=True)
                    runs.setdefault(kind, {}).setdefault(label, []).append(
                        one_repeat(side, setup, store, work, plan, args, r))
            if kind == "local" and args.keep_best:
                runs[KEEP_BEST] = keep_best(args, store, out / "work", plan, t0)
    shutil.rmtree(out / "work", ignore_errors=True)
    plan.pop("model_folder")
    command = "python benchmarks/peers.py " + " ".join(sys.argv[1:] if argv is None else argv)
    summary = report.summarize(runs, plan)
    failed = report.write(out, summary, runs, plan, command, time.perf_counter() - t0)
    print((out / "peers.md").read_text())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
