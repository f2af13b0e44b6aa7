"""The ``tiered`` sink in a job that spans nodes: every node's fast tier is its own disk.

A node is what torchrun calls one: the ``LOCAL_WORLD_SIZE`` ranks its agent started (ranks
``i * LOCAL_WORLD_SIZE`` to ``(i + 1) * LOCAL_WORLD_SIZE - 1`` on node ``i``); its name is
``$WMTP_NODE``, else the host name. With ``fast_scope: node`` (the default once a job spans nodes)
each node keeps its ranks' shards of a save under its own fast directory (the fast URL with
``{node}`` replaced by the node's name; a URL without the placeholder gets ``/<node>`` appended,
so nodes that share a filesystem never write into one another's directories) and commits them
there with a manifest of its own: a node's *part*. Each node then copies its part to the durable
tier, every file checked against the part's manifest as it streams, and says so in a receipt;
rank 0 commits the durable manifest once every node's receipt names its files, and never when
one node's copy failed or the node went silent (:func:`copy_part`). ``fast_scope: shared``
(a fast tier every node sees, NFS or Lustre) keeps one manifest for the whole save on the fast
tier, as on one node.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import socket
import threading
import time
from typing import Any

import attrs

from wmtp_core import CheckpointError, SaveError
from wmtp_core.commit import CheckpointStore, step_dirname, verified_copy
from wmtp_core.errors import first_line
from wmtp_core.events import Receipt
from wmtp_core.hashing import fsync
from wmtp_core.manifest import Manifest

NODE_ENV = "WMTP_NODE"
PLACEHOLDER = "{node}"
RECEIPTS = ".wmtp-nodes"
"""Under the durable run directory: each node's receipts and heartbeat (removed after a commit)."""
PART_KEYS = ("node", "node_ranks")
SHARD = re.compile(r"__(?P<rank>\d+)_\d+\.distcp")
RANK_FILE = re.compile(r"\w+?_rank(?P<rank>\d+)\.pt")


@attrs.frozen
class Node:
    """This process's node in the job."""

    name: str
    index: int
    count: int
    ranks: tuple[int, ...]
    rank: int

    @property
    def leader(self) -> bool:
        """The node's first rank: it prepares, commits and copies the node's part."""
        return self.rank == self.ranks[0]

    def describe(self) -> str:
        return f"node {self.name!r} (node {self.index} of {self.count}, ranks {self.ranks[0]}-{self.ranks[-1]})"


def this_node(world: Any) -> Node:
    """From torchrun's environment (``LOCAL_WORLD_SIZE``) and the coordinator's rank; a process
    outside torchrun is one node."""
    size = max(1, int(world.size))
    try:
        local = int(os.environ.get("LOCAL_WORLD_SIZE") or size)
    except ValueError:
        local = size
    if local < 1 or size % local:
        local = size
    index = world.rank // local
    name = os.environ.get(NODE_ENV) or socket.gethostname()
    return Node(name=name, index=index, count=size // local,
                ranks=tuple(range(index * local, (index + 1) * local)), rank=world.rank)


def fast_url(url: str, node: Node, spread: bool) -> str:
    """The fast tier of this node: ``{node}`` replaced by its name; spread over nodes without
    the placeholder, ``<url>/<name>``."""
    if PLACEHOLDER in url:
        return url.replace(PLACEHOLDER, node.name)
    return posixpath.join(url.rstrip("/"), node.name) if spread else url


def is_part(manifest: Manifest) -> bool:
    """A node's part of a save (never a checkpoint by itself)."""
    return "node" in manifest.meta


def owner(name: str) -> int | None:
    """The rank that wrote a file of a sharded save (``.metadata``: rank 0)."""
    if name == ".metadata":
        return 0
    found = SHARD.fullmatch(name) or RANK_FILE.fullmatch(name)
    return int(found["rank"]) if found else None


def part_sizes(sizes: dict[str, int], node: Node) -> dict[str, int]:
    """Of a save's files and their least sizes, those the node's ranks wrote."""
    return {n: s for n, s in sizes.items() if owner(n) in node.ranks}


def store_part(fast: Any, event: Any, payload: Any, world: Any, node: Node) -> Receipt:
    """Every rank together: each node's leader prepares the node's staging directory, every rank
    writes its shards there, each leader commits the node's part. A failure on any node is
    raised on every rank, and no node keeps a part of the save."""
    from wmtp_core.filesink import shard_sizes

    store: CheckpointStore = fast.checkpoints
    name = step_dirname(event.step)
    path = store.path_of(fast.run, name)
    failure = None
    if node.leader:
        try:
            _clear_stale_part(store, path)
            store.prepare(fast.run, name)
        except Exception as e:  # every rank must learn of it, or the others wait forever
            failure = f"{node.describe()}: {type(e).__name__}: {e}"
    failures = [f for f in world.gather(failure) if f]
    if failures:
        raise CheckpointError(failures[0])
    metadata = fast.write_shards(path, payload, world, step=event.step, cleanup=node.leader)
    manifest, failure = None, None
    if node.leader:
        try:
            manifest = fast._commit_sharded(event, name, metadata, world,
                                            expected=part_sizes(shard_sizes(metadata), node),
                                            meta={"node": node.name, "node_ranks": list(node.ranks),
                                                  "nodes": node.count})
        except Exception as e:
            failure = f"{node.describe()}: {type(e).__name__}: {first_line(e)}"
    done = world.gather((failure, manifest.nbytes if manifest is not None else 0))
    failures = [f for f, _ in done if f]
    if failures:
        if manifest is not None:  # a part of a save that did not happen
            store.delete(path)
        raise SaveError(f"the sharded save of step {event.step} failed, nothing of it was committed: {failures[0]}")
    return Receipt(role=event.role, run=fast.run, step=event.step, uri=store.uri(path),
                   nbytes=sum(n for _, n in done), meta={"world_size": world.size, "nodes": node.count})


def _clear_stale_part(store: CheckpointStore, path: str) -> None:
    """A node's part of this step committed by an earlier process whose save never reached the
    durable tier (the run resumed from an older step there): not a checkpoint, and in the way."""
    try:
        stale = store.fs.isfile(posixpath.join(path, "manifest.json")) and is_part(store.read_manifest(path))
    except CheckpointError:
        return
    if stale:
        store.delete(path)


def receipts_dir(durable: CheckpointStore, run: str, step: int) -> str:
    return posixpath.join(durable.run_dir(run), RECEIPTS, step_dirname(step))


def open_durable(durable: CheckpointStore, run: str, step: int) -> None:
    """Rank 0, before any node copies its part: the durable staging directory of the step, and
    no receipts of an earlier attempt."""
    durable.prepare(run, step_dirname(step))
    try:
        durable.fs.rm(receipts_dir(durable, run, step), recursive=True)
    except FileNotFoundError:
        pass


def copy_files(fast: CheckpointStore, durable: CheckpointStore, run: str, step: int) -> Manifest:
    """Stream the committed fast copy (or part) of ``step`` into the durable staging directory,
    each file hashed as it passes: one that does not match the fast manifest stops the copy."""
    name = step_dirname(step)
    src, dst = fast.path_of(run, name), durable.path_of(run, name)
    manifest = fast.read_manifest(src)  # validated: names exactly the files beside it
    for e in manifest.files:
        copy = verified_copy(fast.fs, posixpath.join(src, e.path), e, fast.uri(posixpath.join(src, e.path)),
                             note="; not copied to the durable tier")
        with durable.fs.open(posixpath.join(dst, e.path), "wb") as f:
            copy(f)
            fsync(f)
    return manifest


def copy_part(fast: CheckpointStore, durable: CheckpointStore, run: str, step: int, token: str, node: Node,
              timeout_s: float) -> None:
    """One node leader's copy of its part of ``step`` (the durable staging is open: see
    :func:`open_durable`), then its receipt; on rank 0, once every node's receipt is in, the
    durable commit (:func:`commit_parts`)."""
    box = receipts_dir(durable, run, step)
    try:
        manifest = copy_files(fast, durable, run, step)
        receipt = {"token": token, "node": node.name, "files": {e.path: [e.size, e.digest] for e in manifest.files}}
    except Exception as e:
        receipt = {"token": token, "node": node.name, "error": f"{type(e).__name__}: {first_line(e)}"}
        if node.index == 0:
            _discard(durable, run, step)
            raise
        durable.fs.pipe_file(posixpath.join(box, f"{node.index}.json"), json.dumps(receipt).encode())
        raise
    if node.index != 0:
        durable.fs.pipe_file(posixpath.join(box, f"{node.index}.json"), json.dumps(receipt).encode())
        return
    parts = {0: receipt, **_receipts(durable, run, step, token, node, timeout_s)}
    commit_parts(durable, run, step, manifest, parts)


def _receipts(durable: CheckpointStore, run: str, step: int, token: str, node: Node,
              timeout_s: float) -> dict[int, dict]:
    """Every other node's receipt of this save; a failed or silent node: no commit, and the
    error names it."""
    box, fs = receipts_dir(durable, run, step), durable.fs
    parts: dict[int, dict] = {}
    beats = {i: (None, time.monotonic()) for i in range(1, node.count)}
    while len(parts) < node.count - 1:
        for i in sorted(set(beats) - set(parts)):
            receipt = _read(fs, posixpath.join(box, f"{i}.json"))
            if receipt is not None and receipt.get("token") == token:
                parts[i] = receipt
                continue
            beat = _read(fs, heartbeat_path(durable, run, i))
            if beat != beats[i][0]:
                beats[i] = (beat, time.monotonic())
            elif time.monotonic() - beats[i][1] > timeout_s:
                _discard(durable, run, step)
                raise CheckpointError(f"node {i} ({_named(beat)}) stopped before copying its part of step {step} "
                                      f"(no heartbeat for {timeout_s:g} s); nothing of step {step} was "
                                      "committed on the durable tier")
        if len(parts) < node.count - 1:
            time.sleep(0.2)
    failed = [(i, r) for i, r in sorted(parts.items()) if r.get("error")]
    if failed:
        _discard(durable, run, step)
        i, r = failed[0]
        raise CheckpointError(f"node {r['node']!r} (node {i}) could not copy its part of step {step} to the "
                              f"durable tier: {r['error']}; nothing of step {step} was committed there")
    return parts


def commit_parts(durable: CheckpointStore, run: str, step: int, manifest: Manifest, parts: dict[int, dict]) -> None:
    """Rank 0: commit what landed, checked against every node's receipt."""
    files = {n: tuple(v) for r in parts.values() for n, v in r["files"].items()}
    meta = {k: v for k, v in manifest.meta.items() if k not in PART_KEYS}
    committed = durable.commit_existing(run, step_dirname(step), expected={n: s for n, (s, _) in files.items()},
                                        step=manifest.step, role=manifest.role, lineage=manifest.lineage, meta=meta)
    if {(e.path, e.digest) for e in committed.files} != {(n, d) for n, (_, d) in files.items()}:
        durable.delete(durable.path_of(run, step_dirname(step)))
        raise CheckpointError(f"{durable.uri(durable.path_of(run, step_dirname(step)))}: what landed differs "
                              "from the nodes' parts; removed")
    try:
        durable.fs.rm(receipts_dir(durable, run, step), recursive=True)
    except FileNotFoundError:
        pass


def _discard(durable: CheckpointStore, run: str, step: int) -> None:
    """The durable staging of a copy that will not commit (and its receipts)."""
    for path in (durable.path_of(run, step_dirname(step)), receipts_dir(durable, run, step)):
        try:
            durable.fs.rm(path, recursive=True)
        except Exception:
            pass  # staging the next clean start removes


def _read(fs: Any, path: str) -> Any:
    try:
        fs.invalidate_cache(path)
        return json.loads(fs.cat_file(path))
    except (FileNotFoundError, ValueError):
        return None


def _named(beat: Any) -> str:
    return repr(beat.get("node")) if isinstance(beat, dict) else "never heard from"


def heartbeat_path(durable: CheckpointStore, run: str, index: int) -> str:
    return posixpath.join(durable.run_dir(run), RECEIPTS, f"node{index}.alive")


class Heartbeat:
    """A node leader's sign of life on the durable tier, renewed every ``timeout_s / 4`` while
    the sink is open, so rank 0 can tell a slow node from a gone one."""

    def __init__(self, durable: CheckpointStore, run: str, node: Node, timeout_s: float) -> None:
        self.durable, self.path, self.node = durable, heartbeat_path(durable, run, node.index), node
        self.every = max(0.05, timeout_s / 4)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="wmtp-node-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            try:
                self.durable.fs.pipe_file(self.path, json.dumps({"node": self.node.name, "beat": n}).encode())
            except Exception:
                pass  # a durable tier out of reach: the copies say so
            self._stop.wait(self.every)

    def stop(self) -> None:
        """Stop renewing, and remove the heartbeat (a node that was killed leaves its own: a few
        bytes, replaced by the next heartbeat of its node index)."""
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self.durable.fs.rm_file(self.path)
        except Exception:
            pass
