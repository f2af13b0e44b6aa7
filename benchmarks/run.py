"""Run WMTP's benchmarks; every figure is a ratio against the plain alternative in the same run.

    uv run python benchmarks/run.py [--size-mb 256] [--repeat 5] [--only save,restore,bytes]

Writes ``benchmarks/results/results.json`` and ``benchmarks/results/results.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import evaluation  # noqa: E402
import final_shards  # noqa: E402
import hf  # noqa: E402
import preempt  # noqa: E402
import restore_s3  # noqa: E402
import scale  # noqa: E402
import speculative  # noqa: E402
import storage  # noqa: E402

SUITES = {
    "save": storage.bench_save,
    "restore": storage.bench_restore,
    "bytes": storage.bench_bytes,
    "async": scale.bench_async,
    "s3": scale.bench_s3,
    "throughput": scale.bench_throughput,
    "ranks": scale.bench_ranks,
    "hf": hf.bench_hf,
    "padding": hf.bench_padding,
    "preempt": preempt.bench_preempt,
    "executor": evaluation.bench_executor,
    "speculative": speculative.bench_speculative,
    "restore-s3": restore_s3.bench_restore_s3,
    "final-shards": final_shards.bench_final_shards,
}


def _commit() -> str:
    """The commit measured (``+changes`` when the work tree differs from it)."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE,
                               capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+changes" if dirty else "")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mb", type=int, default=256, help="resume state size for save/restore")
    p.add_argument("--repeat", type=int, default=5, help="repetitions; medians are reported")
    p.add_argument("--only", default=",".join(SUITES), help="comma-separated: " + ",".join(SUITES))
    p.add_argument("--workdir", default=None, help="scratch directory (default: a temp dir)")
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args(argv)
    rows = []
    for name in args.only.split(","):
        print(f"== {name}", flush=True)
        rows += SUITES[name.strip()](size_mb=args.size_mb, repeat=args.repeat, workdir=args.workdir)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "commit": _commit(),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
            "python": platform.python_version(), "torch": torch.__version__,
            "size_mb": args.size_mb, "repeat": args.repeat}
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    md = [f"Measured {meta['date']} at commit {meta['commit']} on {meta['machine']}, torch {meta['torch']}, "
          f"state {args.size_mb} MB, median of {args.repeat}.", "",
          "| benchmark | WMTP | plain alternative | ratio | target | met |",
          "|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['name']} | {r['wmtp']} | {r['plain']} | {r['ratio']:.3f} | {r['target']} | "
                  f"{'-' if r['met'] is None else 'yes' if r['met'] else 'NO'} |")
    (out / "results.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
