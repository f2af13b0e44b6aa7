import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from wmtp_core import Manifest, Receipt, Role, RunInfo
from wmtp_core.events import FileEntry
from wmtp_core.plugins import make_plugin_manager

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def pm():
    """A fresh plugin manager with WMTP's hookspecs and no installed plugins."""
    return make_plugin_manager(entry_points=False)


def run_info(name="run", lineage="L1", algo="baseline-mtp"):
    return RunInfo(name=name, algo=algo, lineage=lineage)


class MemorySink:
    """A sink that keeps committed checkpoints in memory and records every store call."""

    def __init__(self, context, name="memory"):
        self.context = context
        self.name = name
        self.stored: list[tuple[Role, int]] = []
        self.items: dict[str, Manifest] = {}
        self.deleted: list[str] = []

    def location(self):
        return f"memory://{self.name}/{self.context.run.name}"

    def store(self, event, payload):
        self.stored.append((event.role, event.step))
        uri = f"{self.location()}/step_{event.step}"
        self.items[uri] = Manifest(
            run=event.run.name, step=event.step, role=event.role, lineage=event.run.lineage,
            files=[FileEntry(path="x.pt", size=1, sha256="0" * 64)], created_at="now",
        )
        return Receipt(role=event.role, sink=self.name, run=event.run.name, step=event.step,
                       uri=uri, nbytes=1, seconds=0.0)

    def committed(self):
        return sorted(self.items.items(), key=lambda um: um[1].step)

    def delete(self, uri):
        self.deleted.append(uri)
        del self.items[uri]

    def close(self):
        pass


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
