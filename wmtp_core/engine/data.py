"""Training data: token ids, fixed-length windows, a resumable batch stream.

The documents come from :mod:`wmtp_core.engine.corpus` (data sources, their splits, the record
shapes); its names are importable from here too.

**Tokens.** :func:`encode` turns documents into ids with the byte-level :class:`ByteTokenizer`
or a Hugging Face tokenizer and ends each with ``eos_id``; :func:`windows` cuts them into rows.
"""

from __future__ import annotations

from array import array
from itertools import chain
from typing import Any, Iterable, Mapping, Sequence

import attrs
import torch

from wmtp_core.engine.corpus import (  # noqa: F401  (also importable from here, as before)
    DATA_SUFFIXES,
    DEFAULT_MAX_BYTES,
    EVAL,
    EVAL_SPLITS,
    JSON_SUFFIXES,
    SHAPES,
    SPLIT_NAMES,
    STDLIB,
    TEXT_FIELD,
    TRAIN,
    document_of,
    documents,
    files_of,
    parse_source,
    source_files,
    split_of,
    stdlib_documents,
)
from wmtp_core.errors import DataError


class ByteTokenizer:
    """UTF-8 bytes are the tokens: 256 ids, no vocabulary file, nothing to download."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


# -- tokens and windows ------------------------------------------------------------------------

def encode(docs: Sequence[str], tokenizer: Any, eos_id: int | None,
           batch: int = 256) -> list[list[int]]:
    """Token ids of each document: UTF-8 bytes with :class:`ByteTokenizer`, else a Hugging Face
    tokenizer called in batches without special tokens. ``eos_id`` (when not None) ends each
    document, so packed windows see where one document stops."""
    if isinstance(tokenizer, ByteTokenizer):
        out = [list(d.encode("utf-8")) for d in docs]
    else:
        out = []
        for i in range(0, len(docs), batch):
            enc = tokenizer(list(docs[i : i + batch]), add_special_tokens=False, verbose=False)
            out.extend(list(ids) for ids in enc["input_ids"])
    if eos_id is not None:
        for ids in out:
            ids.append(int(eos_id))
    return out


def _smallest(ids: torch.Tensor) -> torch.Tensor:
    if ids.numel() == 0 or (int(ids.min()) >= 0 and int(ids.max()) < 256):
        return ids.to(torch.uint8)
    return ids.to(torch.int32)


@attrs.frozen(eq=False)
class Windows:
    """Rows of token ids for training or evaluation.

    ``ids`` is ``[N, L]``: uint8 when every id is below 256, else int32. ``lengths`` is ``[N]``
    int64, the real tokens at the start of each row (the rest is padding); None when no row is
    padded. Slicing (``w[a:b]``, an index tensor) gives Windows again."""

    ids: torch.Tensor
    lengths: torch.Tensor | None = None

    def __attrs_post_init__(self) -> None:
        if self.ids.dim() != 2:
            raise ValueError(f"Windows.ids must be [N, L], got shape {tuple(self.ids.shape)}")
        if self.lengths is not None and tuple(self.lengths.shape) != (len(self.ids),):
            raise ValueError(f"Windows.lengths must be [{len(self.ids)}], got {tuple(self.lengths.shape)}")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def length(self) -> int:
        """L, the row length."""
        return self.ids.shape[1]

    def __getitem__(self, index: slice | torch.Tensor) -> Windows:
        lengths = None if self.lengths is None else self.lengths[index]
        if lengths is not None and bool((lengths == self.length).all()):
            lengths = None
        return Windows(self.ids[index], lengths)


def split_tail(w: Windows, n: int) -> tuple[Windows, Windows]:
    """``(all but the last n rows, the last n rows)``: a hold-out taken from the end."""
    cut = max(0, len(w) - max(0, n))
    return w[:cut], w[cut:]


def eos_id(tokenizer: Any) -> int | None:
    """The id that ends each document (none for bytes)."""
    return getattr(tokenizer, "eos_token_id", None)


def pad_id(tokenizer: Any) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(pad) if pad is not None else 0


def split_windows(docs: Sequence[str], split: Any, tokenizer: Any) -> Windows:
    """A recipe split's documents as the rows the run trains on (``max_length``, packed or not)."""
    return windows(encode(docs, tokenizer, eos_id(tokenizer)), split.max_length, split.pack_sequences,
                   pad_id(tokenizer))


def held_out(rows: int) -> int:
    """Without ``data.eval``, the training rows held out to evaluate on: the last twentieth, at
    least 1."""
    return max(1, rows // 20)


def windows(docs: Sequence[Sequence[int]], length: int, pack: bool, pad_id: int = 0) -> Windows:
    """Cut documents' token ids into rows of ``length``.

    ``pack``: the documents' ids are concatenated in order and cut into full rows; the remainder
    is dropped, nothing is padded. Otherwise each document is cut on its own: full rows, then its
    shorter last piece padded with ``pad_id`` when it holds at least 2 tokens (an input and a
    target); ``lengths`` records the real tokens per row."""
    if length < 2:
        raise DataError(f"window length {length}: must be at least 2 (an input and a target)")
    sizes = [len(d) for d in docs]
    total = sum(sizes)
    if total == 0:
        return Windows(torch.empty(0, length, dtype=torch.uint8))
    flat = torch.frombuffer(array("q", chain.from_iterable(docs)), dtype=torch.int64)
    if pack:
        n = total // length
        return Windows(_smallest(flat[: n * length].reshape(n, length)))
    starts, reals = [], []
    offset = 0
    for size in sizes:
        for s in range(0, size, length):
            real = min(length, size - s)
            if real >= 2:
                starts.append(offset + s)
                reals.append(real)
        offset += size
    if not starts:
        return Windows(torch.empty(0, length, dtype=torch.uint8))
    lengths = torch.tensor(reals, dtype=torch.int64)
    cols = torch.arange(length)
    index = (torch.tensor(starts, dtype=torch.int64)[:, None] + cols[None, :]).clamp_(max=total - 1)
    real = cols[None, :] < lengths[:, None]
    ids = torch.where(real, flat[index], torch.tensor(pad_id, dtype=torch.int64))
    padded = bool((lengths < length).any())
    return Windows(_smallest(ids), lengths if padded else None)


# -- how many steps ------------------------------------------------------------------------------
@attrs.frozen
class StepCount:
    """How many optimiser steps a run takes, and which limit binds: ``max_steps``, or
    ``num_epochs`` passes over the training rows (whichever comes first)."""

    rows: int
    """Training rows (windows) the data yields."""
    rows_per_step: int
    """The global batch: ``batch_size`` times the ranks times ``grad_accum_steps``."""
    epochs: int
    max_steps: int | None

    @property
    def per_epoch(self) -> int:
        return self.rows // self.rows_per_step

    @property
    def steps(self) -> int:
        cap = self.per_epoch * self.epochs
        return min(self.max_steps, cap) if self.max_steps else cap

    @property
    def binding(self) -> str:
        """``max_steps`` or ``num_epochs``: the limit that ends the run."""
        return "max_steps" if self.max_steps and self.max_steps <= self.per_epoch * self.epochs else "num_epochs"

    def describe(self) -> str:
        epoch = (f"{self.rows:,} training rows, {self.rows_per_step} a step: {self.per_epoch:,} "
                 f"step{'s' if self.per_epoch != 1 else ''} an epoch")
        if self.binding == "max_steps":
            return f"{self.steps:,} steps: train.max_steps binds ({epoch}, {self.epochs} epochs would allow " \
                   f"{self.per_epoch * self.epochs:,})"
        limit = f"; max_steps {self.max_steps:,} is not reached" if self.max_steps else ""
        return f"{self.steps:,} steps: train.num_epochs {self.epochs} binds ({epoch}{limit})"


# -- batches -----------------------------------------------------------------------------------

Batch = tuple[torch.Tensor, "torch.Tensor | None"]
"""``(ids [B, L] int64, lengths [B] int64 or None)``."""


class BatchStream:
    """Shuffled batches of windows, epoch after epoch; its position is part of the resume state.

    The order of epoch ``e`` comes from a generator seeded with ``seed + e``, so restoring
    ``(epoch, index)`` reproduces exactly the batches an uninterrupted run would have seen.
    :meth:`next` gives ``(ids, lengths)``: int64 ``[B, L]`` and int64 ``[B]``, or None for
    lengths when the windows have no padded row. ``L`` is the batch's longest row (see
    :func:`trimmed`), at most ``max_length``.
    """

    def __init__(self, data: Windows, batch_size: int, seed: int) -> None:
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

    def next(self) -> Batch:
        if self.index + self.batch_size > len(self.data):
            self.epoch += 1
            self.index = 0
            self._order = self._permutation(self.epoch)
        idx = self._order[self.index : self.index + self.batch_size]
        self.index += self.batch_size
        lengths = self.data.lengths
        return trimmed(self.data.ids[idx], None if lengths is None else lengths[idx].clone())

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        if int(state["seed"]) != self.seed:
            raise DataError(f"resume state was made with data seed {state['seed']}, this run uses {self.seed}")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._permutation(self.epoch)


def eval_batches(data: Windows, batch_size: int, max_batches: int = 4) -> list[Batch]:
    """A fixed list of held-out batches in row order (the same every time, for comparable eval
    losses); lengths as in :class:`BatchStream`."""
    out: list[Batch] = []
    for i in range(0, len(data), batch_size):
        if len(out) == max_batches:
            break
        lengths = data.lengths
        out.append(trimmed(data.ids[i : i + batch_size],
                           None if lengths is None else lengths[i : i + batch_size].clone()))
    return out


def trimmed(ids: torch.Tensor, lengths: torch.Tensor | None) -> Batch:
    """A batch padded to its own longest row, not to ``max_length`` (what HF's
    ``DataCollatorWithPadding`` does): the columns after every row's last real token go. A row's
    real tokens see only what precedes them (causal attention), so its logits do not change."""
    if lengths is not None and len(lengths):
        ids = ids[:, : max(2, int(lengths.max()))]
    return ids.long(), lengths
