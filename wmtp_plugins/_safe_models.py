"""Reading a registered model without running any of its code.

A model in a registry is untrusted input: MLflow's ``pytorch`` flavor in pickle format, its
``python_function`` models (cloudpickle) and even ``torch.export.load`` of a ``.pt2`` archive can
execute code while loading. So WMTP never calls MLflow's loaders. It reads the model's
``MLmodel`` file (YAML, parsed safely) and its artifact listing, decides the format from them
before a single byte of weights is downloaded, and then reads weights only in a format that
cannot execute code:

- **WMTP's own export** (``wmtp-pt2``): the ``pytorch`` flavor as ``data/model.pt2``, carrying
  ``wmtp_model_config`` in its metadata. Only the archive's weight records are read: raw tensor
  bytes described by JSON, and any pickled record with ``torch.load(weights_only=True)``. The
  program graph, constants and sample inputs (which ``torch.export.load`` would unpickle) are
  never opened.
- **safetensors**: a ``model.safetensors`` (at the model's root or under ``data/``) carrying
  ``wmtp_model_config`` in its metadata, read with ``safetensors``.
- **Hugging Face folders** (MLflow's ``transformers`` flavor) whose weights are safetensors and
  that ship no Python code: only ``config.json``, the safetensors files, the tokenizer files and
  WMTP's heads and metadata are downloaded (never a pickle, never code), into one local folder
  that ``transformers`` then reads.

Everything else is refused with one line naming the URI, the format found and the formats
accepted.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import shutil
import sys
import tempfile
import zipfile
from typing import Any

import yaml

from wmtp_core.errors import ModelLoadError

ACCEPTED = ("WMTP's own export (MLflow pytorch flavor saved as pt2 with wmtp_model_config "
            "metadata, weights read without unpickling), safetensors weights "
            "(model.safetensors with wmtp_model_config metadata), or an MLflow transformers model "
            "with safetensors weights and no code")
_PT2_WEIGHTS_CONFIG = re.compile(r"[^/]+/data/weights/[^/]+_weights_config\.json")
_PT2_RECORD = re.compile(r"weight_\d+")
PICKLE_FILES = (".pth", ".pkl", ".pickle", ".bin", ".pt", ".joblib", ".cloudpickle")


class UnsafeModelError(ModelLoadError):
    """A registered model whose format could run code when loaded, or that WMTP cannot read."""


MAX_DEPTH = 16
"""Folders within folders of a registered model's artifacts (MLflow's own nest 3 deep)."""
MAX_ARTIFACTS = 100_000


def listing(uri: str) -> dict[str, int]:
    """Every artifact path of the model at ``uri`` with its size; nothing is downloaded. A
    listing that nests deeper than :data:`MAX_DEPTH` (a ``loop -> .`` link) or runs past
    :data:`MAX_ARTIFACTS` entries is refused."""
    import mlflow

    out: dict[str, int] = {}
    stack = [""]
    while stack:
        prefix = stack.pop()
        if prefix.count("/") >= MAX_DEPTH:
            raise UnsafeModelError(f"{uri}: its artifacts nest deeper than {MAX_DEPTH} folders ({prefix[:120]}...: "
                                   "a link to a folder above it?); accepted: a model's own files, "
                                   f"at most {MAX_DEPTH} folders deep")
        try:
            found = mlflow.artifacts.list_artifacts(artifact_uri=f"{uri}/{prefix}".rstrip("/"))
        except OSError as e:
            raise ModelLoadError(f"{uri}: its artifacts cannot be listed ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
        for f in found:
            path = f.path if not prefix or f.path.startswith(prefix) else posixpath.join(prefix, f.path)
            if f.is_dir:
                stack.append(path)
            else:
                out[path] = f.file_size or 0
        if len(out) + len(stack) > MAX_ARTIFACTS:
            raise UnsafeModelError(f"{uri}: it has more than {MAX_ARTIFACTS:,} artifacts; refused")
    return out


RUNS_CODE = "loading it can run code"
NOT_WMTP = "WMTP cannot rebuild a model from it"


def classify(uri: str, flavors: dict[str, Any], metadata: dict[str, Any] | None,
             files: dict[str, int]) -> tuple[str, str, str]:
    """``(kind, what was found, why it is refused)``; ``kind`` is ``wmtp-pt2``,
    ``safetensors`` or ``refused``. Only the MLmodel file and the artifact listing are used."""
    names = sorted(flavors)
    has_config = bool((metadata or {}).get("wmtp_model_config"))
    if "pytorch" in flavors:
        data = str((flavors["pytorch"] or {}).get("model_data") or "data")
        pickled = [p for p in files if p.startswith(f"{data}/") and p.endswith(PICKLE_FILES)]
        if pickled:
            return "refused", f"an MLflow pytorch model in pickle format ({pickled[0]})", RUNS_CODE
        if f"{data}/model.pt2" in files:
            if not has_config:
                return "refused", "a pt2 export without wmtp_model_config metadata", NOT_WMTP
            return "wmtp-pt2", f"WMTP's pt2 export ({data}/model.pt2)", ""
    safetensors = [p for p in ("model.safetensors", "data/model.safetensors") if p in files]
    if safetensors and has_config:
        return "safetensors", f"safetensors weights ({safetensors[0]})", ""
    if "transformers" in flavors:
        sub = str((flavors["transformers"] or {}).get("model_binary") or "model")
        mine = [p for p in files if p.startswith(f"{sub}/")]
        code = [p for p in mine if p.endswith(".py")]
        if code:
            return "refused", f"an MLflow transformers model that ships Python code ({code[0]})", RUNS_CODE
        if any(p.endswith(".safetensors") for p in mine) and f"{sub}/config.json" in files:
            return "hf-folder", f"a Hugging Face folder ({sub}/)", ""
        pickled = next((p for p in sorted(mine) if p.endswith(PICKLE_FILES)), None)
        if pickled:
            return "refused", f"an MLflow transformers model with pickled weights ({pickled})", RUNS_CODE
        return "refused", "an MLflow transformers model without weights in it", NOT_WMTP
    pyfunc = flavors.get("python_function") or {}
    if pyfunc.get("cloudpickle_version") or any(p.endswith(("python_model.pkl", ".cloudpickle")) for p in files):
        return "refused", "an MLflow python_function model (cloudpickle)", RUNS_CODE
    if any(p.endswith(PICKLE_FILES) for p in files):
        pickled = next(p for p in sorted(files) if p.endswith(PICKLE_FILES))
        return "refused", f"an MLflow model with flavors {', '.join(names) or 'none'} ({pickled})", RUNS_CODE
    return "refused", f"an MLflow model with flavors {', '.join(names) or 'none'}", NOT_WMTP


FOLDER_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "vocab.json", "merges.txt", "vocab.txt", "spm.model", "tokenizer.model",
                "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
                "model.safetensors.index.json", "wmtp.json")
"""What is downloaded of a Hugging Face folder, besides its ``*.safetensors`` files."""


def load(uri: str) -> tuple[dict[str, Any], dict[str, Any], str | None]:
    """``(weights, model_config, None)`` of the registered model at ``uri``, or for a Hugging
    Face folder ``({}, {}, local folder)``; :class:`UnsafeModelError` before any weight byte is
    read when its format could run code."""
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    try:
        model = Model.load(uri)  # the MLmodel file only (yaml.safe_load)
        files = listing(uri)
    except MlflowException as e:
        raise ModelLoadError(f"{uri}: {e.message}") from None
    except (OSError, ValueError, TypeError, AttributeError, RecursionError, yaml.YAMLError) as e:
        raise ModelLoadError(f"{uri}: its MLmodel file cannot be read ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    if not isinstance(model.flavors or {}, dict) or not all(isinstance(v, (dict, type(None)))
                                                            for v in (model.flavors or {}).values()):
        raise UnsafeModelError(f"{uri}: its MLmodel file's flavors are not a mapping of mappings; refused")
    kind, found, why = classify(uri, model.flavors or {}, model.metadata, files)
    if kind == "refused":
        raise UnsafeModelError(f"{uri} is {found}: {why}, so none of it was read. Accepted: {ACCEPTED}")
    if kind == "hf-folder":
        return {}, {}, download_folder(uri, str(model.flavors["transformers"].get("model_binary") or "model"), files)
    config = model.metadata["wmtp_model_config"]
    if not isinstance(config, dict):
        raise UnsafeModelError(f"{uri}: its wmtp_model_config metadata is not a mapping; refused")
    path = f"{model.flavors['pytorch'].get('model_data') or 'data'}/model.pt2" if kind == "wmtp-pt2" \
        else next(p for p in ("model.safetensors", "data/model.safetensors") if p in files)
    folder = _downloaded(uri, {posixpath.basename(path): (path, files[path])})
    try:
        local = posixpath.join(folder, posixpath.basename(path))
        weights = pt2_weights(local, uri) if kind == "wmtp-pt2" else safetensors_weights(local, uri)
    finally:
        if posixpath.basename(folder).startswith("wmtp-model-"):  # a private download, not the cache's
            shutil.rmtree(folder, ignore_errors=True)
    return weights, config, None


def download_folder(uri: str, sub: str, files: dict[str, int]) -> str:
    """The safe files of a transformers-flavor model in one local folder: the model's own, and
    the tokenizer MLflow keeps under ``components/tokenizer/`` where the model folder has none.
    Downloaded once per node into the model cache, keyed by the version ``uri`` resolves to
    (:mod:`wmtp_core.model_cache`: kept, never removed by the caller); where it cannot be
    resolved, into a private folder (``wmtp-model-*``) the caller removes."""
    def safe(name: str) -> bool:
        return name in FOLDER_FILES or name.endswith(".safetensors")

    wanted = {posixpath.basename(p): p for p in files if p.startswith("components/tokenizer/")
              and "/" not in p.removeprefix("components/tokenizer/") and safe(posixpath.basename(p))}
    wanted.update({posixpath.basename(p): p for p in files if p.startswith(f"{sub}/")
                   and "/" not in p.removeprefix(f"{sub}/") and safe(posixpath.basename(p))})
    return _downloaded(uri, {name: (path, files[path]) for name, path in wanted.items()})


def resolved(uri: str) -> str | None:
    """What ``models:/NAME/VERSION`` (or ``@alias``, ``latest``) stands for now: the registered
    name, the version and the artifact URI it was made from; ``None`` when MLflow cannot say."""
    try:
        from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository

        import mlflow

        name, version, underlying = ModelsArtifactRepository._get_model_uri_infos(uri)
        registry = hashlib.sha256(str(mlflow.get_registry_uri()).encode()).hexdigest()[:16]  # it may hold a password
    except Exception:  # noqa: BLE001 - a private MLflow helper: without it, nothing is cached
        return None
    return json.dumps({"registry": registry, "registered_model": name, "version": version, "artifacts": underlying},
                      sort_keys=True)


def _downloaded(uri: str, wanted: dict[str, tuple[str, int]]) -> str:
    """The artifacts ``wanted`` (``{local name: (artifact path, size)}``) of the model at ``uri``
    in one local folder: the node's cached copy of its resolved version, else a private one."""
    import os

    from wmtp_core import model_cache

    def fetch(name: str, local: str) -> None:
        _download_one(uri, wanted[name][0], local)

    key = resolved(uri)
    if key is not None:
        listing = {name: {"size": size or None, "version": None} for name, (_, size) in wanted.items()}
        return model_cache.cached(key, listing, fetch, uri)
    target = tempfile.mkdtemp(prefix="wmtp-model-")
    try:  # nothing is left behind in the temporary directory, whatever stops the download
        for name in wanted:
            fetch(name, os.path.join(target, name))
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    return target


def _download_one(uri: str, path: str, local: str) -> None:
    """The artifact ``path`` of the model at ``uri`` at ``local`` (through a scratch folder
    beside it, removed after)."""
    import os

    import mlflow
    from mlflow.exceptions import MlflowException

    scratch = tempfile.mkdtemp(prefix=".wmtp-download-", dir=os.path.dirname(local))
    try:
        try:
            landed = mlflow.artifacts.download_artifacts(artifact_uri=f"{uri}/{path}", dst_path=scratch)
        except MlflowException as e:
            raise ModelLoadError(f"{uri}: {e.message}") from None
        except OSError as e:
            raise ModelLoadError(f"{uri}: {path} cannot be downloaded ({type(e).__name__}: {e.strerror or e})") from None
        os.replace(landed, local)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def safetensors_weights(path: str, uri: str) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise UnsafeModelError(f"{uri}: its safetensors file cannot be read ({e})") from None


class _Pt2Archive:
    """A ``torch.export`` archive opened for its weights only."""

    def __init__(self, archive: zipfile.ZipFile, uri: str) -> None:
        self.archive, self.uri = archive, uri
        self.names = set(archive.namelist())
        self.records: dict[str, Any] = {}

    def refuse(self, why: str) -> UnsafeModelError:
        return UnsafeModelError(f"{self.uri}: its pt2 archive {why}; refused")

    def table(self) -> tuple[str, dict[str, Any]]:
        """The archive's root folder and its weight table (JSON)."""
        configs = [n for n in self.names if _PT2_WEIGHTS_CONFIG.fullmatch(n)]
        if len(configs) != 1:
            raise self.refuse(f"holds {len(configs)} weight tables, expected exactly one")
        root = configs[0].split("/", 1)[0]
        byteorder = f"{root}/byteorder"
        if byteorder in self.names and \
                self.archive.read(byteorder).decode("ascii", "replace").strip() != sys.byteorder:
            raise self.refuse(f"was written on a {self.archive.read(byteorder)!r}-endian machine")
        try:
            table = json.loads(self.archive.read(configs[0]))["config"]
        except (ValueError, KeyError, TypeError):
            raise self.refuse("has an unreadable weight table") from None
        if not isinstance(table, dict):
            raise self.refuse("has an unreadable weight table")
        return root, table

    def weight(self, root: str, fqn: str, meta: Any) -> Any:
        import torch
        from torch._export.serde.schema import ScalarType
        from torch._export.serde.serialize import deserialize_scalar_type

        try:
            record = meta["path_name"]
            if not isinstance(record, str) or not _PT2_RECORD.fullmatch(record):
                raise self.refuse(f"names a weight record {record!r}")
            full = f"{root}/data/weights/{record}"
            if full not in self.names:
                raise self.refuse(f"lacks the record {record}")
            if meta.get("use_pickle") is not False:  # a pickled tensor: weights-only, or nothing
                return self._pickled(full, fqn)
            tm = meta["tensor_meta"]
            dtype = deserialize_scalar_type(ScalarType(tm["dtype"]))
            sizes = [int(s["as_int"]) for s in tm["sizes"]]
            strides = [int(s["as_int"]) for s in tm["strides"]]
            offset = int(tm["storage_offset"]["as_int"])
        except UnsafeModelError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise self.refuse(f"describes weight {fqn!r} in a form WMTP does not read ({e!r})") from None
        flat = self._raw(full, record, dtype)
        if any(s < 0 for s in sizes) or any(st < 0 for st in strides) or offset < 0 or len(sizes) != len(strides):
            raise self.refuse(f"describes weight {fqn!r} with a negative shape or stride")
        extent = offset + sum((s - 1) * st for s, st in zip(sizes, strides)) + 1 if all(sizes) else 0
        if extent > flat.numel():
            raise self.refuse(f"describes weight {fqn!r} past the end of its record {record}")
        return torch.as_strided(flat, sizes, strides, offset).clone()

    def _pickled(self, full: str, fqn: str) -> Any:
        import torch

        from wmtp_core.safe_load import load_part

        try:
            tensor = load_part(self.archive.read(full), f"{self.uri} ({fqn})")
        except Exception as e:  # CheckpointError: refused by weights-only loading
            raise self.refuse(f"holds a weight that is not plain tensor data ({e})") from None
        if not isinstance(tensor, torch.Tensor):
            raise self.refuse(f"holds a {type(tensor).__name__} as weight {fqn!r}")
        return tensor

    def _raw(self, full: str, record: str, dtype: Any) -> Any:
        """A record's raw bytes as a flat tensor of ``dtype`` (read once, shared by its views)."""
        import torch

        if record not in self.records:
            if self.archive.getinfo(full).compress_type != zipfile.ZIP_STORED:
                raise self.refuse(f"stores {record} compressed; torch.export writes raw records")
            raw = bytearray(self.archive.read(full))
            if len(raw) % torch.empty((), dtype=dtype).element_size():
                raise self.refuse(f"has a record {record} that is not a whole number of {dtype} values")
            self.records[record] = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        flat = self.records[record]
        if flat.dtype != dtype:
            raise self.refuse(f"reads record {record} as two dtypes")
        return flat


def pt2_weights(path: str, uri: str) -> dict[str, Any]:
    """The weights of a ``torch.export`` archive, read without unpickling anything but
    weights-only records: the JSON weight table says each tensor's dtype, shape, strides and
    record; raw records become tensors directly, their bounds checked."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        raise UnsafeModelError(f"{uri}: its pt2 archive is not a zip archive; refused") from None
    with archive:
        pt2 = _Pt2Archive(archive, uri)
        root, table = pt2.table()
        return {fqn: pt2.weight(root, fqn, meta) for fqn, meta in table.items()}
