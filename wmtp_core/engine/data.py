"""Byte-level tokenizer, corpus loading through fsspec, and a resumable batch stream."""

from __future__ import annotations

import json
import posixpath
import sysconfig
from pathlib import Path
from typing import Any, Iterable, Mapping

import fsspec
import torch

from wmtp_core.errors import DataError

STDLIB = "stdlib"
"""The built-in corpus: the Python standard library's own source files (every machine has it)."""
TEXT_FIELD = "text"
"""The field read from each jsonl record."""
DEFAULT_MAX_BYTES = 4 << 20



class ByteTokenizer:
    """UTF-8 bytes are the tokens: 256 ids, no vocabulary file, nothing to download."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def stdlib_documents(max_bytes: int = DEFAULT_MAX_BYTES) -> list[bytes]:
    """The standard library's .py files, sorted by path, up to ``max_bytes`` in total."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs, total = [], 0
    for path in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")):
        if "site-packages" in path.parts:
            continue
        data = path.read_bytes()
        docs.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    if not docs:
        raise DataError(f"no Python source files found under {root}")
    return docs


DATA_SUFFIXES = (".txt", ".jsonl", ".json", ".md", ".py")


def files_of(url: str, key: str = "dataset", storage_options: Mapping[str, Any] | None = None):
    """``(fs, files)`` a data URL names (a file, a directory or a glob), or a :class:`DataError`
    naming ``key`` and the URL when there is nothing there. Lists; reads nothing."""
    try:
        fs, path = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
        if fs.isdir(path):
            files = sorted(f for f in fs.find(path) if f.endswith(DATA_SUFFIXES))
        elif any(c in path for c in "*?["):
            files = sorted(fs.glob(path))
        else:
            files = [path] if fs.exists(path) else None
    except (ImportError, ValueError) as e:  # an unknown protocol, or its package missing
        raise DataError(f"{key}: {url!r} cannot be read ({e})") from None
    if files is None:
        raise DataError(f"{key}: {url!r} does not exist")
    if not files:
        raise DataError(f"{key}: {url!r} holds no data files (text: .txt/.md/.py; jsonl: .jsonl)")
    return fs, files


def url_documents(url: str, max_bytes: int = DEFAULT_MAX_BYTES,
                  storage_options: Mapping[str, Any] | None = None, key: str = "dataset") -> list[bytes]:
    """Documents from a file, directory or glob at any fsspec URL: text (one document per
    file) or jsonl (one document per record's ``text`` field)."""
    fs, files = files_of(url, key, storage_options)
    docs: list[bytes] = []
    for f in files:
        try:
            raw = fs.cat_file(f)
        except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
            raise DataError(f"{key}: {f} cannot be read ({type(e).__name__})") from None
        if f.endswith((".jsonl", ".json")):
            for n, line in enumerate(raw.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    text = rec[TEXT_FIELD]
                except (ValueError, KeyError, TypeError):
                    raise DataError(
                        f"dataset {url!r}: {posixpath.basename(f)} line {n} is not a JSON object "
                        f"with a {TEXT_FIELD!r} string field"
                    ) from None
                docs.append(str(text).encode("utf-8"))
        else:
            docs.append(raw)
        total = sum(len(d) for d in docs)
        if total >= max_bytes:
            break
    return docs


def windows(docs: list[bytes], length: int, pack: bool) -> torch.Tensor:
    """Cut documents into ``[N, length]`` uint8 windows.

    ``pack``: concatenate documents and cut the stream; otherwise windows never cross a
    document boundary (a document's tail shorter than ``length`` is dropped).
    """
    if pack:
        stream = b"\n\n".join(docs)
        n = len(stream) // length
        buf = torch.frombuffer(bytearray(stream[: n * length]), dtype=torch.uint8)
        return buf.view(n, length) if n else torch.empty(0, length, dtype=torch.uint8)
    rows = []
    for d in docs:
        n = len(d) // length
        if n:
            rows.append(torch.frombuffer(bytearray(d[: n * length]), dtype=torch.uint8).view(n, length))
    return torch.cat(rows) if rows else torch.empty(0, length, dtype=torch.uint8)


class BatchStream:
    """Shuffled batches of windows, epoch after epoch; its position is part of the resume state.

    The order of epoch ``e`` comes from a generator seeded with ``seed + e``, so restoring
    ``(epoch, index)`` reproduces exactly the batches an uninterrupted run would have seen.
    """

    def __init__(self, data: torch.Tensor, batch_size: int, seed: int) -> None:
        if len(data) < batch_size:
            raise DataError(
                f"data.train.batch_size: {batch_size} is larger than the {len(data)} windows the "
                "corpus yields; lower batch_size or max_length, or add data"
            )
        self.data = data
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.index = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(len(self.data), generator=g)

    @property
    def batches_per_epoch(self) -> int:
        return len(self.data) // self.batch_size

    def next(self) -> torch.Tensor:
        if self.index + self.batch_size > len(self.data):
            self.epoch += 1
            self.index = 0
            self._order = self._permutation(self.epoch)
        idx = self._order[self.index : self.index + self.batch_size]
        self.index += self.batch_size
        return self.data[idx].long()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        if int(state["seed"]) != self.seed:
            raise DataError(f"resume state was made with data seed {state['seed']}, this run uses {self.seed}")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._permutation(self.epoch)


def eval_batches(data: torch.Tensor, batch_size: int, max_batches: int = 4) -> list[torch.Tensor]:
    """A fixed list of held-out batches (the same every time, for comparable eval losses)."""
    return [data[i : i + batch_size].long() for i in range(0, len(data), batch_size)][:max_batches]
