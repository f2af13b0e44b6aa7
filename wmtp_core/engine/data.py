"""Training data: documents from dataset files, token ids, fixed-length windows, a resumable
batch stream.

**Sources and splits.** A data source is ``NAME`` or ``NAME:SPLIT`` (``mbpp:test``). A file's
split is its name without the suffix (``train.jsonl`` -> ``train``, ``train_mini.jsonl`` ->
``train_mini``). When the files of a directory or glob include split-named ones (``train``,
``validation``, ``valid``, ``val``, ``dev``, ``test``), a read takes only the files of one
split: ``train`` takes ``train``; ``eval`` takes ``validation``/``valid``/``val``/``dev``, or
``test`` when there is none of those; any other split takes the files named exactly so. Train,
validation and test files are never mixed. A URL naming one file, or a folder or glob without
split-named files, serves every split.

**Files.** ``.jsonl``: one JSON object per line (blank lines skipped). ``.json``: a JSON array
of objects, or JSON lines. ``.txt``/``.md``/``.py``: the whole file is one document.

**Records -> documents.** Each JSON record becomes one document text::

    document = prompt + ("" if prompt ends with "\\n" else "\\n") + solution

with the solution (and the newline) left out when it is empty, and the solution alone when the
prompt is empty. The record shapes accepted, tried in this order:

- HumanEval (``prompt``, ``canonical_solution``): prompt = ``prompt``, solution =
  ``canonical_solution``.
- MBPP (``text``, ``code``): prompt = ``text``, solution = ``code``.
- CodeContests (``description``, optional ``solutions``): prompt = ``description``, solution =
  the first non-empty solution. ``solutions`` may be a JSON-encoded string, a list of strings or
  of objects with ``solution``/``code``, or the Hugging Face shape ``{"language": [...],
  "solution": [...]}``; none -> the description alone.
- plain text (``text``): the document is the text, unchanged.

Other fields are ignored. A record of none of these shapes is a :class:`DataError` naming the
file and line (JSON lines) or record number (JSON array).

**Tokens.** :func:`encode` turns documents into ids with the byte-level :class:`ByteTokenizer`
or a Hugging Face tokenizer and ends each with ``eos_id``; :func:`windows` cuts them into rows.
"""

from __future__ import annotations

import json
import posixpath
import sysconfig
from array import array
from itertools import chain
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import attrs
import fsspec
import torch

from wmtp_core.errors import DataError

STDLIB = "stdlib"
"""The built-in corpus: the Python standard library's own source files (every machine has it)."""
TEXT_FIELD = "text"
"""The field of a plain-text record."""
DEFAULT_MAX_BYTES = 4 << 20
DATA_SUFFIXES = (".txt", ".jsonl", ".json", ".md", ".py")
JSON_SUFFIXES = (".jsonl", ".json")

TRAIN = "train"
EVAL = "eval"
EVAL_SPLITS = ("validation", "valid", "val", "dev")
"""File names that serve the ``eval`` split, before ``test``."""
SPLIT_NAMES = (TRAIN, *EVAL_SPLITS, "test")
"""File names (without suffix) that make a folder's files split-named."""

SHAPES = ("a JSON object with a 'text' string field (plain text), 'text' and 'code' (MBPP), "
          "'prompt' and 'canonical_solution' (HumanEval) or 'description' (CodeContests)")


class ByteTokenizer:
    """UTF-8 bytes are the tokens: 256 ids, no vocabulary file, nothing to download."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def stdlib_documents(max_bytes: int = DEFAULT_MAX_BYTES) -> list[str]:
    """The standard library's .py files as text (UTF-8, undecodable bytes replaced), sorted by
    path, up to ``max_bytes`` of file content in total. The same for every split."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs, total = [], 0
    for path in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")):
        if "site-packages" in path.parts:
            continue
        data = path.read_bytes()
        docs.append(data.decode("utf-8", errors="replace"))
        total += len(data)
        if total >= max_bytes:
            break
    if not docs:
        raise DataError(f"no Python source files found under {root}")
    return docs


# -- files and splits ------------------------------------------------------------------------

def files_of(url: str, key: str = "dataset", storage_options: Mapping[str, Any] | None = None):
    """``(fs, files)`` a data URL names (a file, a directory or a glob), or a :class:`DataError`
    naming ``key`` and the URL when there is nothing there. Lists; reads nothing."""
    fs, files, _ = _listing(url, key, storage_options)
    return fs, files


def _listing(url: str, key: str, storage_options: Mapping[str, Any] | None):
    """``(fs, files, single)``: ``single`` when the URL names one file."""
    single = False
    try:
        fs, path = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
        if fs.isdir(path):
            files = sorted(f for f in fs.find(path) if f.endswith(DATA_SUFFIXES))
        elif any(c in path for c in "*?["):
            files = sorted(f for f in fs.glob(path) if not fs.isdir(f))
        else:
            files = [path] if fs.exists(path) else None
            single = True
    except (ImportError, ValueError) as e:  # an unknown protocol, or its package missing
        raise DataError(f"{key}: {url!r} cannot be read ({e})") from None
    if files is None:
        raise DataError(f"{key}: {url!r} does not exist")
    if not files:
        raise DataError(f"{key}: {url!r} holds no data files "
                        "(text: .txt/.md/.py; JSON: .jsonl/.json)")
    return fs, files, single


def split_of(path: str) -> str:
    """The split a file serves: its name without the suffix (``train_mini.jsonl`` -> ``train_mini``)."""
    name = posixpath.basename(path.rstrip("/"))
    for suffix in DATA_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return posixpath.splitext(name)[0] or name


def parse_source(source: str, default_split: str) -> tuple[str, str]:
    """``(name, split)`` of a data source ``NAME`` or ``NAME:SPLIT``; ``default_split`` when
    none is named (``train`` for the train section, ``eval`` for the eval section)."""
    name, sep, split = source.partition(":")
    return name, (split if sep and split else default_split)


def source_files(url: str, split: str, key: str,
                 storage_options: Mapping[str, Any] | None = None) -> tuple[Any, list[str]]:
    """``(fs, files)`` of ``split`` at ``url``: only that split's files when a directory or glob
    holds split-named files, else every file. A split with no files is a :class:`DataError` naming
    ``key``, the URL, the split and the splits there are."""
    fs, files, single = _listing(url, key, storage_options)
    stems = [split_of(f) for f in files]
    if single or not any(s in SPLIT_NAMES for s in stems):
        return fs, files
    if split == EVAL:
        wanted = set(EVAL_SPLITS) if any(s in EVAL_SPLITS for s in stems) else {"test"}
    else:
        wanted = {split}
    chosen = [f for f, s in zip(files, stems) if s in wanted]
    if not chosen:
        there = sorted(set(stems))
        name = key.rsplit(".", 1)[-1]
        asked = f"{split} split" + (" (no validation, valid, val, dev or test file)" if split == EVAL else "")
        raise DataError(
            f"{key}: {url!r} has no {asked} (splits there: {', '.join(there)}); name one with "
            + " or ".join(repr(f"{name}:{s}") for s in there)
        )
    return fs, chosen


# -- records -----------------------------------------------------------------------------------

def _string(record: Mapping[str, Any], field: str, where: str) -> str:
    value = record[field]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} is {type(value).__name__} {value!r:.40}, "
                        "not a string")
    return value


def _first_solution(value: Any, where: str) -> str:
    """The first non-empty solution in any of the shapes ``solutions`` comes in ('' if none)."""
    if value is None:
        return ""
    if isinstance(value, str):
        if value.lstrip()[:1] in ("[", "{", '"'):
            try:
                decoded = json.loads(value)
            except ValueError:
                return value
            return _first_solution(decoded, where)
        return value
    if isinstance(value, Mapping):  # {"language": [...], "solution": [...]} or {"solution": "..."}
        inner = value.get("solution", value.get("code"))
        return _first_solution(inner, where)
    if isinstance(value, list):
        for item in value:
            found = _first_solution(item, where)
            if found:
                return found
        return ""
    raise DataError(
        f"{where}: field 'solutions' is {type(value).__name__} {value!r:.40}; accepted: a list of "
        "strings or of objects with 'solution'/'code', {'language': [...], 'solution': [...]}, "
        "or such a value JSON-encoded in a string"
    )


def _join(prompt: str, solution: str) -> str:
    if not solution:
        return prompt
    if not prompt:
        return solution
    return prompt + ("" if prompt.endswith("\n") else "\n") + solution


def document_of(record: Any, where: str) -> str:
    """One record's document text (the format is in the module docstring). ``where`` names the
    record in errors, e.g. ``"paths.datasets.mbpp: /data/mbpp/train.jsonl line 3"``."""
    if not isinstance(record, Mapping):
        raise DataError(f"{where} is not a JSON object ({type(record).__name__}); accepted: {SHAPES}")
    if "prompt" in record and "canonical_solution" in record:
        return _join(_string(record, "prompt", where), _string(record, "canonical_solution", where))
    if TEXT_FIELD in record and "code" in record:
        return _join(_string(record, TEXT_FIELD, where), _string(record, "code", where))
    if "description" in record:
        return _join(_string(record, "description", where),
                     _first_solution(record.get("solutions"), where))
    if isinstance(record.get(TEXT_FIELD), str):
        return record[TEXT_FIELD]
    raise DataError(f"{where} is not a JSON object with a {TEXT_FIELD!r} string field, nor "
                    f"another accepted shape; accepted: {SHAPES}")


def _records(text: str, path: str, where: str) -> Iterable[tuple[Any, str]]:
    """``(record, where)`` pairs of a JSON or JSON-lines file's text."""
    if path.endswith(".json"):
        head = text.lstrip()[:1]
        if head == "[":
            try:
                items = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{where} line {e.lineno} is not valid JSON ({e.msg})") from None
            if not isinstance(items, list):  # pragma: no cover - '[' always parses to a list
                items = [items]
            for n, item in enumerate(items, 1):
                yield item, f"{where} record {n}"
            return
        if head == "{":  # one (possibly pretty-printed) object, or JSON lines
            try:
                obj = json.loads(text)
            except json.JSONDecodeError:
                pass
            else:
                yield obj, f"{where} record 1"
                return
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as e:
            msg = getattr(e, "msg", str(e))
            raise DataError(f"{where} line {n} is not valid JSON ({msg})") from None
        yield rec, f"{where} line {n}"


def documents(url: str, split: str, key: str, storage_options: Mapping[str, Any] | None = None,
              max_bytes: int | None = None) -> list[str]:
    """The document texts of ``split`` at ``url`` (any fsspec URL: a file, directory or glob),
    in file order then record order: all of them, or (``max_bytes``) until that much UTF-8 text
    was collected. ``key`` (``paths.datasets.NAME``) is named in every error."""
    fs, files = source_files(url, split, key, storage_options)
    docs: list[str] = []
    total = 0
    for f in files:
        try:
            raw = fs.cat_file(f)
        except OSError as e:
            raise DataError(f"{key}: {f} cannot be read ({type(e).__name__})") from None
        text = raw.decode("utf-8-sig", errors="replace")
        if f.endswith(JSON_SUFFIXES):
            for rec, where in _records(text, f, f"{key}: {f}"):
                doc = document_of(rec, where)
                docs.append(doc)
                total += len(doc.encode("utf-8"))
                if max_bytes is not None and total >= max_bytes:
                    return docs
        else:
            docs.append(text)
            total += len(raw)
            if max_bytes is not None and total >= max_bytes:
                return docs
    return docs


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


# -- batches -----------------------------------------------------------------------------------

Batch = tuple[torch.Tensor, "torch.Tensor | None"]
"""``(ids [B, L] int64, lengths [B] int64 or None)``."""


class BatchStream:
    """Shuffled batches of windows, epoch after epoch; its position is part of the resume state.

    The order of epoch ``e`` comes from a generator seeded with ``seed + e``, so restoring
    ``(epoch, index)`` reproduces exactly the batches an uninterrupted run would have seen.
    :meth:`next` gives ``(ids, lengths)``: int64 ``[B, L]`` and int64 ``[B]``, or None for
    lengths when the windows have no padded row.
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
        return self.data.ids[idx].long(), (None if lengths is None else lengths[idx].clone())

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
        out.append((data.ids[i : i + batch_size].long(),
                    None if lengths is None else lengths[i : i + batch_size].clone()))
    return out
