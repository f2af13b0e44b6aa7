"""The corpus: a data source's files, one split at a time, and the document texts they hold.

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
"""

from __future__ import annotations

import json
import posixpath
import re
import sys
import sysconfig
from pathlib import Path
from typing import Any, Iterable, Mapping

import fsspec

from wmtp_core.bounded import read_bounded
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


_JSON_TOKENS = re.compile(r'"(?:[^"\\\n]|\\.)*"|[\[\]{}\n]')


def _too_deep(text: str, where: str, first: int = 1) -> DataError:
    """A JSON text nested deeper than Python's parser follows (it raised ``RecursionError``), in
    one line naming the line where its nesting is deepest (``first``: the text's first line)."""
    depth = deepest = 0
    line = at = first
    for m in _JSON_TOKENS.finditer(text):
        token = m.group()
        if token == "\n":
            line += 1
        elif token in "[{":
            depth += 1
            if depth > deepest:
                deepest, at = depth, line
        elif token in "]}":
            depth -= 1
    return DataError(f"{where} line {at}: JSON nested {deepest:,} levels deep cannot be read (Python's "
                     f"parser stops near {sys.getrecursionlimit():,}); accepted: records nested at most a "
                     f"few hundred levels deep, each {SHAPES}")


def _loads(text: str, where: str, first: int = 1) -> Any:
    """``json.loads``, with nesting too deep to parse refused in one line (:func:`_too_deep`)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise _too_deep(text, where, first) from None


def _records(text: str, path: str, where: str) -> Iterable[tuple[Any, str]]:
    """``(record, where)`` pairs of a JSON or JSON-lines file's text."""
    if path.endswith(".json"):
        head = text.lstrip()[:1]
        if head == "[":
            try:
                items = _loads(text, where)
            except json.JSONDecodeError as e:
                raise DataError(f"{where} line {e.lineno} is not valid JSON ({e.msg})") from None
            if not isinstance(items, list):  # pragma: no cover - '[' always parses to a list
                items = [items]
            for n, item in enumerate(items, 1):
                yield item, f"{where} record {n}"
            return
        if head == "{":  # one (possibly pretty-printed) object, or JSON lines
            try:
                obj = _loads(text, where)
            except json.JSONDecodeError:
                pass
            else:
                yield obj, f"{where} record 1"
                return
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            rec = _loads(line, where, n)
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
        try:  # a FIFO or a link to /dev/zero is refused, never read
            raw = read_bounded(fs, f, None, "a data file", where=f"{key}: {f}", error=DataError)
        except OSError as e:
            raise DataError(f"{key}: {f} cannot be read ({type(e).__name__})") from None
        text = raw.decode("utf-8-sig", errors="replace")
        if f.endswith(JSON_SUFFIXES):
            for rec, where in _records(text, f, f"{key}: {f}"):
                try:
                    doc = document_of(rec, where)
                except RecursionError:  # solutions JSON-encoded in a string, nested too deeply
                    raise DataError(f"{where}: its 'solutions' are nested too deeply to read; "
                                    f"accepted: {SHAPES}") from None
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
