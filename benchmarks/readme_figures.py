"""The two timings the README quotes outside benchmarks/README.md, measured here:

- what the interpreter's teardown costs after a run (torch, transformers and MLflow imported, one
  backward pass done) against leaving with ``os._exit``, the path ``python -m wmtp_core.run``
  takes once a preempted run's checkpoint is committed (README, "Preemption and timed saves");
- how long the first MLflow request to a server that refuses connections takes to give up under
  WMTP's bounds of MLflow's retries (README, "When MLflow cannot be reached").

    uv run python benchmarks/readme_figures.py [--repeat 4]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

CHILD = """import os, sys, time
import torch, transformers, mlflow, wmtp_core.run
m = torch.nn.Linear(512, 512)
m(torch.zeros(4, 512)).sum().backward()
print(time.time(), flush=True)
{}
"""


def teardown(repeat: int) -> dict[str, list[float]]:
    """Seconds from a child's last line to its end, leaving by ``sys.exit`` and by ``os._exit``."""
    seen: dict[str, list[float]] = {"sys.exit": [], "os._exit": []}
    for _ in range(repeat):
        for side, leave in (("sys.exit", "sys.exit(0)"), ("os._exit", "os._exit(0)")):
            child = subprocess.Popen([sys.executable, "-c", CHILD.format(leave)], stdout=subprocess.PIPE, text=True)
            said = float(child.stdout.readline())
            child.wait()
            seen[side].append(time.time() - said)
    return seen


def refused_request(repeat: int) -> list[float]:
    """Seconds until WMTP's MLflow set-up gives up on a server that refuses connections."""
    from wmtp_plugins._mlflow import configure

    seen = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        try:
            configure({"tracking_uri": "http://127.0.0.1:9"})
        except Exception:
            pass
        seen.append(time.perf_counter() - t0)
    return seen


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=4)
    args = p.parse_args(argv)
    for side, runs in teardown(args.repeat).items():
        print(f"leaving by {side} after a run: median {statistics.median(runs):.2f} s "
              f"({', '.join(f'{r:.2f}' for r in runs)})")
    runs = refused_request(args.repeat)
    print(f"first MLflow request to a server refusing connections gives up after: median "
          f"{statistics.median(runs):.1f} s ({', '.join(f'{r:.1f}' for r in runs)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
