"""A model folder's safetensors files, read from their headers only.

A safetensors file is an 8-byte header length, a JSON header naming each tensor's dtype, shape
and byte range, then the data. The ``safetensors`` library checks all of that, but only once
``from_pretrained`` opens the file, after the model it describes was allocated, and its errors
reach the user as tracebacks. So WMTP reads each header itself first (at most 100 MB, the
library's own limit, never the data), checks it as the library would, and keeps what it says:
the tensors the folder actually holds, which :mod:`wmtp_core.engine.model_size` compares with
what ``config.json`` declares before anything is allocated.
"""

from __future__ import annotations

import json
import posixpath
import re
from typing import Any, Mapping

import attrs

from wmtp_core.bounded import read_bounded, read_head
from wmtp_core.errors import ModelLoadError

MAX_HEADER = 100_000_000
"""The safetensors library's own limit on a header."""
MAX_INDEX_BYTES = 16 << 20
MAX_DEPTH = 64
"""Nesting of a JSON file in a model folder (real ones nest a few levels)."""
BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16,
        "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "F64": 64, "I64": 64, "U64": 64,
        "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}
"""The dtypes safetensors knows, with their bits."""
ACCEPTED = ("accepted: safetensors (an 8-byte header length, a JSON object naming each tensor's dtype, "
            "shape and byte range, then the data)")
ZIP = b"PK\x03\x04"
_SHARD = re.compile(r"[^/\\]+\.safetensors")


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def human(n: float) -> str:
    """Bytes in words: ``425.2 kB``, ``51.2 GB``."""
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


def depth(value: Any) -> int:
    """How deep a parsed JSON value nests (iterative: never a RecursionError)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


def load_json(raw: bytes, where: str, what: str) -> Any:
    """A JSON file of a model folder, parsed: never a ``RecursionError``, at most
    :data:`MAX_DEPTH` levels deep."""
    try:
        value = json.loads(raw)
    except RecursionError:
        value = None
        deep = True
    except ValueError as e:  # UnicodeDecodeError too
        raise ModelLoadError(f"{where} is not JSON ({e}); {what} is a JSON file") from None
    else:
        deep = depth(value) > MAX_DEPTH
    if deep:
        raise ModelLoadError(f"{where} nests deeper than {MAX_DEPTH} levels; accepted: {what} of at most "
                             f"{MAX_DEPTH} levels of objects and lists (real ones have a few)")
    return value


@attrs.frozen
class Held:
    """What a folder's weights files hold: every tensor's shape, by name, and their bytes."""

    files: tuple[str, ...]
    shapes: Mapping[str, tuple[int, ...]] = attrs.field(hash=False)
    nbytes: int

    @property
    def parameters(self) -> int:
        return sum(numel(s) for s in self.shapes.values())

    def layers(self) -> tuple[str, int] | None:
        """The numbered group with the most members (``transformer.h``, 2): the layers held."""
        groups: dict[str, set[int]] = {}
        for name in self.shapes:
            parts = name.split(".")
            for i, part in enumerate(parts):
                if part.isdigit():
                    groups.setdefault(".".join(parts[:i]), set()).add(int(part))
        if not groups:
            return None
        prefix = max(groups, key=lambda p: (len(groups[p]), -len(p)))
        return prefix, len(groups[prefix])

    def describe(self) -> str:
        layers = self.layers()
        held = f" in {len(self.shapes)} tensors ({human(self.nbytes)}"
        if layers:
            prefix, n = layers
            held += f"; {n} layers, {prefix}.0 to {prefix}.{n - 1}" if n > 1 else f"; 1 layer, {prefix}.0"
        return f"its weights ({', '.join(self.files)}) hold {self.parameters:,} parameters{held})"


def _refuse(where: str, why: str) -> ModelLoadError:
    return ModelLoadError(f"{where} is not a safetensors file WMTP can read: {why}; {ACCEPTED}")


def _entry(name: str, entry: Any, where: str) -> tuple[tuple[int, ...], int, int]:
    """``(shape, start, end)`` of one header entry, checked."""
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise _refuse(where, f"its header entry {name[:100]!r} is not {{dtype, shape, data_offsets}}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in BITS:
        raise _refuse(where, f"tensor {name[:100]!r} has dtype {str(dtype)[:40]!r} (known: {', '.join(BITS)})")
    ints = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0  # noqa: E731
    if not isinstance(shape, list) or not all(map(ints, shape)) or len(shape) > 64:
        raise _refuse(where, f"tensor {name[:100]!r} has shape {str(shape)[:80]}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(ints, offsets)) or offsets[1] < offsets[0]:
        raise _refuse(where, f"tensor {name[:100]!r} has byte range {str(offsets)[:80]}")
    bits = numel(tuple(shape)) * BITS[dtype]
    if bits % 8 or offsets[1] - offsets[0] != bits // 8:
        raise _refuse(where, f"tensor {name[:100]!r} ({dtype} {shape}) is {bits / 8:,.0f} bytes, its byte range "
                             f"{offsets[0]:,} to {offsets[1]:,} holds {offsets[1] - offsets[0]:,}")
    return tuple(shape), offsets[0], offsets[1]


def header(fs: Any, path: str, where: str) -> tuple[dict[str, tuple[int, ...]], int]:
    """``({tensor name: shape}, data bytes)`` of the safetensors file at ``path``, from its
    header alone, checked as the safetensors library checks it; one line when it is not one."""
    what = "a safetensors file"
    first, size = read_head(fs, path, 0, 8, what, where=where, error=ModelLoadError)
    if first.startswith(ZIP):
        raise _refuse(where, "it is a zip archive (what torch.save writes: a pickle that can run code when loaded)")
    if len(first) < 8:
        raise _refuse(where, f"it holds {size} bytes, fewer than a header length")
    n = int.from_bytes(first, "little")
    if n > MAX_HEADER:
        raise _refuse(where, f"its header length is {n:,} bytes, over safetensors' limit of {MAX_HEADER:,}")
    if 8 + n > size:
        raise _refuse(where, f"its header length is {n:,} bytes, past the end of the file ({size:,} bytes)")
    raw, _ = read_head(fs, path, 8, n, what, where=where, error=ModelLoadError)
    if not raw.lstrip().startswith(b"{"):
        raise _refuse(where, "its header is not a JSON object")
    try:
        table = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise _refuse(where, f"its header is not JSON ({type(e).__name__})") from None
    if not isinstance(table, dict):
        raise _refuse(where, "its header is not a JSON object")
    meta = table.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _refuse(where, "its __metadata__ is not an object of strings")
    entries = sorted(((*_entry(k, v, where), k) for k, v in table.items()), key=lambda e: (e[1], e[2]))
    data = size - 8 - n
    beyond = next((e for e in entries if e[2] > data), None)
    if beyond is not None:
        raise _refuse(where, f"tensor {beyond[3][:100]!r} lies at bytes {beyond[1]:,} to {beyond[2]:,} of the data, "
                             f"past its end (the file holds {data:,} bytes of data)")
    end = 0
    for shape, start, stop, name in entries:
        if start != end:
            raise _refuse(where, f"tensor {name[:100]!r} starts at byte {start:,} of the data, where the one "
                                 f"before it ends at {end:,}")
        end = stop
    if end != data:
        raise _refuse(where, f"its tensors end at byte {end:,} of the data, but the file holds {data:,} bytes of data")
    return {name: shape for shape, _, _, name in entries}, end


def shard_names(fs: Any, folder: str, listed: tuple[str, ...], where: str, index: str) -> tuple[str, ...]:
    """The files a ``model.safetensors.index.json`` names, each a safetensors file of the folder."""
    raw = read_bounded(fs, posixpath.join(folder, index), MAX_INDEX_BYTES, "a weights index",
                       where=f"{where}/{index}", error=ModelLoadError)
    table = load_json(raw, f"{where}/{index}", "a weights index")
    weight_map = table.get("weight_map") if isinstance(table, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ModelLoadError(f"{where}/{index} has no weight_map of tensor names to file names; accepted: "
                             '{"weight_map": {"<tensor>": "model-00001-of-00002.safetensors", ...}}')
    names = tuple(sorted(set(weight_map.values())))
    for name in names:
        if not _SHARD.fullmatch(name) or name not in listed:
            raise ModelLoadError(f"{where}/{index} names {name[:200]!r}, which is not a safetensors file of "
                                 "the folder; accepted: the names of *.safetensors files beside it")
    return names


def read_held(fs: Any, folder: str, names: tuple[str, ...], where: str) -> Held:
    """What the safetensors files ``names`` of ``folder`` hold, from their headers."""
    shapes: dict[str, tuple[int, ...]] = {}
    total = 0
    for name in names:
        found, nbytes = header(fs, posixpath.join(folder, name), f"{where}/{name}")
        shapes.update(found)
        total += nbytes
    return Held(files=names, shapes=shapes, nbytes=total)
