"""Reading checkpoint bytes that may be hostile: never a pickle that can name code.

``load_part`` deserialises one verified part with ``weights_only``; ``safe_dcp_reader`` reads a
``torch.distributed.checkpoint`` whose ``.metadata`` (which torch writes with plain pickle) is read
through an allow-list, and whose non-tensor items pass weights-only loading first.
"""

from __future__ import annotations

import io
import pickle
import re
import zipfile
from typing import Any

from wmtp_core.errors import UnusableError


def load_part(source: str | bytes, where: str = "a checkpoint part") -> Any:
    """Deserialise one verified part: a local path (memory-mapped, copy-on-write) or bytes.
    Checkpoints are untrusted: ``weights_only``, never arbitrary pickle. A part that holds
    anything else, or is not a torch file at all, is an :class:`UnusableError` naming it
    (a committed checkpoint holding it is quarantined)."""
    import torch

    try:
        if isinstance(source, str):
            return torch.load(source, map_location="cpu", weights_only=True, mmap=True)
        return torch.load(io.BytesIO(source), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnusableError(f"{where} was refused by weights-only loading: it holds objects "
                              f"other than tensors and plain values ({_why(e)})") from None
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile) as e:
        raise UnusableError(f"{where} cannot be read as a torch file ({type(e).__name__}: "
                              f"{_why(e)})") from None


def _why(e: BaseException) -> str:
    """The line of a (long, multi-line) torch loading error that says what was refused."""
    text = str(e)
    named = re.search(r"GLOBAL ([\w.]+)", text) or re.search(r"Unsupported global: ([\w.]+)", text)
    if named:
        return f"it names {named.group(1)}, which is not tensor data"
    # never repeat torch's hints to retry without weights_only or to allow-list a global: that
    # is exactly what would run the code
    lines = [line.strip() for line in text.splitlines() if line.strip()
             and "weights_only" not in line and "safe_globals" not in line]
    return (lines[0] if lines else type(e).__name__)[:300]


class _MetadataUnpickler(pickle.Unpickler):
    """Reads DCP's ``.metadata`` file, which torch writes with plain pickle, admitting only the
    classes that describe a checkpoint: nothing in it can name a function to run."""

    ALLOWED = {
        ("torch.distributed.checkpoint.metadata", name) for name in (
            "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
            "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
    } | {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"), ("torch.serialization", "_get_layout"),
        ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
        ("pathlib", "PureWindowsPath"), ("collections", "OrderedDict"),
    }

    def find_class(self, module: str, name: str) -> Any:
        import torch

        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"Unsupported global: {module}.{name}")


def safe_dcp_reader(url: str, where: str, files: set[str] | None = None, **storage_options: Any):
    """A ``torch.distributed.checkpoint`` reader for an untrusted checkpoint: its metadata is
    read with an allow-list (and may point only at ``files``, the checkpoint's own), and every
    non-tensor item must pass weights-only loading before DCP's planner (which loads such items
    without ``weights_only``) sees it."""
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    class WeightsOnlyPlanner:
        def __init__(self, planner: Any) -> None:
            self._planner = planner

        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            data = value.getvalue() if isinstance(value, io.BytesIO) else value.read()
            load_part(data, f"{where} ({read_item.storage_index.fqn})")  # refuses any pickle
            self._planner.load_bytes(read_item, io.BytesIO(data))

        def __getattr__(self, name: str) -> Any:
            return getattr(self._planner, name)

    class SafeReader(FsspecReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
            path = self._get_metadata_path(kwargs.get("rank"))
            with self.fs.create_stream(path, "rb") as f:
                try:
                    metadata = _MetadataUnpickler(f).load()
                except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as e:
                    raise UnusableError(f"{where}/.metadata was refused: it is not the metadata "
                                          f"of a torch.distributed.checkpoint ({_why(e)})") from None
            if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
                raise UnusableError(f"{where}/.metadata holds a {type(metadata).__name__}, not "
                                      "checkpoint metadata")
            for info in metadata.storage_data.values():
                name = getattr(info, "relative_path", None)
                if files is not None and name not in files:
                    raise UnusableError(f"{where}/.metadata points at {name!r}, which is not a "
                                          "file of this checkpoint")
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

        def read_data(self, plan: Any, planner: Any) -> Any:
            return super().read_data(plan, WeightsOnlyPlanner(planner))

    return SafeReader(url, **storage_options)
