"""The ``tiered`` sink's background copies to the durable tier and the fast tier's pruning
(mixed into :class:`wmtp_plugins.tiered.TieredSink`, whose attributes they use)."""

from __future__ import annotations

import concurrent.futures as cf
import logging
import posixpath
import time

from wmtp_core import CheckpointError
from wmtp_core.commit import step_dirname, verified_copy
from wmtp_plugins import _tiered_nodes as nodes

MAX_PENDING = 2
"""Copies to the durable tier waiting or in flight; a save beyond them first waits for the
oldest, so a durable tier slower than the saves cannot fill the fast one."""

log = logging.getLogger("wmtp_plugins.tiered")


def fail(e: Exception) -> None:
    """A copy that cannot start (its failure, said at the next save)."""
    raise e


class Copying:
    """The copier thread's side of the tiered sink."""

    def _queue(self, step: int, token: str | None = None) -> None:
        with self._lock:
            self._copies[step] = self._copier.submit(self._copy_and_prune, step, token)

    def _throttle(self) -> None:
        with self._lock:
            pending = [f for f in self._copies.values() if not f.done()]
        if len(pending) < MAX_PENDING:
            return
        t0 = time.perf_counter()
        cf.wait(pending[: len(pending) - MAX_PENDING + 1])
        log.info("tiered: the save waited %.2f s for the durable tier", time.perf_counter() - t0)

    def _catch_up(self, step: int) -> None:
        """Once per run: queue the copies an earlier process committed on the fast tier but
        never finished (it was killed)."""
        self._caught_up = True
        try:
            durable = {m.step for _, m in self.durable.committed()}
        except Exception as e:  # the copy of this step will fail too, and say so
            log.warning("tiered: the durable tier cannot be listed: %s: %s", type(e).__name__, e)
            return
        for _, m in self.fast.committed():
            if m.lineage == self.lineage and m.step != step and m.step not in durable:
                self._queue(m.step)

    def _failure(self) -> str | None:
        """The failed copies so far, as one message (each reported once)."""
        with self._lock:
            failed = {s: f for s, f in self._copies.items() if f.done() and not f.cancelled() and f.exception()}
            for s in [s for s, f in self._copies.items() if f.done()]:
                del self._copies[s]
        if not failed:
            return None
        return "; ".join(
            f"the durable copy of step {s} to {self._uri(s)} failed ({type(f.exception()).__name__}: "
            f"{f.exception()}); its fast copy {self._fast_uri(s)} is committed and kept"
            for s, f in sorted(failed.items()))

    def _copy_and_prune(self, step: int, token: str | None = None) -> None:
        try:
            self._copy(step, token)
        except Exception as e:  # said now, raised at the next save or at the end
            log.warning("the durable copy of step %d to %s failed: %s: %s", step, self._uri(step),
                        type(e).__name__, e)
            raise
        self._release_held()
        self._prune_fast()

    def _copy(self, step: int, token: str | None) -> None:
        """Stream the committed fast copy of ``step`` (a node's part: ``token`` names the save)
        to the durable tier and commit it there."""
        fast, durable = self.fast.checkpoints, self.durable.checkpoints
        if token is not None:
            return nodes.copy_part(fast, durable, self.run, step, token, self.node, self.node_timeout)
        name = step_dirname(step)
        src = fast.path_of(self.run, name)
        manifest = fast.read_manifest(src)  # validated: names exactly the files beside it
        common = dict(step=manifest.step, role=manifest.role, lineage=manifest.lineage, meta=dict(manifest.meta))
        if all(not e.path.startswith(".") and "/" not in e.path for e in manifest.files):
            # each file hashed as it streams to the durable tier: one that does not match stops the copy
            copies = {e.path: verified_copy(fast.fs, posixpath.join(src, e.path), e, fast.uri(posixpath.join(src, e.path)),
                                            note="; not copied to the durable tier") for e in manifest.files}
            durable.write(self.run, name, copies, **common)
            return
        # sharded (DCP's .metadata): the files into staging, then commit what landed
        path = durable.prepare(self.run, name)
        nodes.copy_files(fast, durable, self.run, step)
        committed = durable.commit_existing(self.run, name, expected={e.path: e.size for e in manifest.files},
                                            **common)
        if {(e.path, e.digest) for e in committed.files} != {(e.path, e.digest) for e in manifest.files}:
            durable.delete(path)
            raise CheckpointError(f"{durable.uri(path)}: what landed differs from the fast copy; removed")

    def _prune_fast(self) -> None:
        """Keep the newest ``fast_keep_last`` of this lineage on the fast tier; never the
        newest, the resumed-from one, or one without a committed durable copy."""
        with self._lock:
            mine = [(p, m) for p, m in self.fast.checkpoints.list(self.run) if m.lineage == self.lineage]
            doomed = mine[: max(0, len(mine) - self.fast_keep_last)]
            if not doomed:
                return
            newest = mine[-1][1].step
            durable = {m.step for _, m in self.durable.committed()}
            for path, m in doomed:  # a node's part: also once a newer step is durable (retention's)
                if m.step not in (newest, self.resumed_from) and (
                        m.step in durable or nodes.is_part(m) and durable and m.step < max(durable)):
                    self.fast.checkpoints.delete(path)

