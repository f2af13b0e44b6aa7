"""Where a ``paths.models.*`` value leads, before any model is built from it.

A ``paths.models.*`` value is one of:

- a Hugging Face folder (``config.json``, safetensors weights, tokenizer files) at any fsspec URL;
- ``models:/NAME/VERSION``: a registered model, resolved by the ``wmtp_load_model`` hook (an
  MLflow transformers-flavor model arrives as such a folder, WMTP's own exports as weights);
- a committed WMTP checkpoint: the byte-level model's weights, or a Hugging Face final model
  WMTP stored (its folder and manifest), verified before anything is read.

The storage options of a model or data URL come from the ``storage:`` binding on the same
protocol (:func:`options_for`).
"""

from __future__ import annotations

import posixpath
from typing import Any, Callable

import attrs

from wmtp_core import model_cache
from wmtp_core.engine import hf, model_size
from wmtp_core.errors import ModelLoadError, WmtpError
from wmtp_core.events import LoadedModel

LoadModel = Callable[[str], LoadedModel]


def options_for(url: str, settings: Any) -> dict[str, Any]:
    """fsspec storage options for a model or data URL: those of the ``storage:`` binding on the
    same protocol (an S3 endpoint and credentials given there serve the models too); otherwise
    none, and the protocol's own conventions apply (``AWS_ENDPOINT_URL``, ``AWS_PROFILE``...)."""
    from fsspec.core import split_protocol

    protocol = split_protocol(url)[0] or "file"
    storage = settings.config.storage
    for binding in (storage.resume, storage.final) if storage is not None else ():
        if binding is not None and binding.base_path and binding.options and \
                (split_protocol(binding.base_path)[0] or "file") == protocol:
            return dict(binding.options)
    return {}


def is_folder(uri: str, key: str, settings: Any) -> bool:
    """True when ``uri`` is a Hugging Face folder (it holds a ``config.json``)."""
    import fsspec

    if uri.startswith("models:/"):
        return False
    try:
        fs, path = fsspec.core.url_to_fs(uri, **options_for(uri, settings))
    except (ImportError, ValueError):  # a URI only a plugin understands
        return False
    try:
        return fs.isfile(posixpath.join(path.rstrip("/"), "config.json"))
    except OSError as e:
        raise ModelLoadError(f"{key}: {uri!r} cannot be read ({type(e).__name__}: {e})") from None


@attrs.frozen
class Source:
    """Where a ``paths.models.*`` value led: a local Hugging Face folder, or byte-level weights."""

    uri: str
    info: hf.FolderInfo | None = None
    folder: str | None = None
    loaded: LoadedModel | None = None
    temporary: bool = False
    """``folder`` is a private copy (downloaded), removed by :meth:`release` once read; a cached
    copy (:mod:`wmtp_core.model_cache`) is not temporary and stays."""

    def describe(self) -> str:
        return self.info.describe() if self.info is not None else "WMTP byte-level model"

    def release(self) -> None:
        if self.temporary and self.folder:
            import shutil

            shutil.rmtree(self.folder, ignore_errors=True)


def locate(uri: str, key: str, settings: Any, load: LoadModel) -> Source:
    """Resolve a model reference to a local folder (checked: config, safetensors weights, no
    code without the flag) or to verified byte-level weights."""
    trust = settings.config.paths.models.trust_remote_code
    folder = is_folder(uri, key, settings)
    if uri.startswith("models:/") or not folder or is_committed(uri, settings):
        try:
            loaded = load(uri)
        except WmtpError as e:
            message = str(e) if uri in str(e) else f"{uri!r} could not be loaded: {e}"
            raise ModelLoadError(f"{key}: {message}") from None
        if not isinstance(loaded, LoadedModel):
            raise ModelLoadError(f"{key}: {uri!r} did not resolve to a model")
        if loaded.folder is None:
            return Source(uri=uri, loaded=loaded)
        source = Source(uri=uri, folder=loaded.folder, loaded=loaded, temporary=_temporary(loaded.folder, uri))
        try:  # the folder's own path in messages is a temporary one: name the URI
            info = hf.inspect(loaded.folder, key, trust)
        except BaseException as e:
            source.release()
            if isinstance(e, ModelLoadError):
                raise ModelLoadError(str(e).replace(loaded.folder, uri)) from None
            raise
        return attrs.evolve(source, info=attrs.evolve(info, uri=uri))
    options = options_for(uri, settings)
    info = hf.inspect(uri, key, trust, options)
    folder = hf.local_copy(info, options)
    return Source(uri=uri, info=info, folder=folder, temporary=_temporary(folder, uri))


def _temporary(folder: str, uri: str) -> bool:
    """A private download, removed once read: not the folder itself, nor the node's cached copy
    (:mod:`wmtp_core.model_cache`: kept for the other ranks and the next run)."""
    return folder != local_path(uri) and not model_cache.holds(folder)


def is_committed(uri: str, settings: Any) -> bool:
    """A folder with a WMTP manifest: a committed final model, believed only once verified
    (the ``wmtp_load_model`` hook verifies it)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri, **options_for(uri, settings))
    return fs.isfile(posixpath.join(path.rstrip("/"), "manifest.json"))


def local_path(uri: str) -> str | None:
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError):
        return None
    return path.rstrip("/") if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)) else None


def describe(uri: str, key: str, settings: Any) -> str:
    """For the dry run: what ``uri`` is, from its listing, ``config.json`` and safetensors
    headers only (no model is loaded, its size is checked: :mod:`~wmtp_core.engine.model_size`);
    a :class:`ModelLoadError` when it does not exist or cannot be used."""
    if uri.startswith("models:/"):
        return "a registered model (resolved when the run starts)"
    if is_folder(uri, key, settings):
        trust = settings.config.paths.models.trust_remote_code
        info = hf.inspect(uri, key, trust, options_for(uri, settings))
        model_size.check_folder(info, key, model_size.budget(settings), folder=local_path(uri), trust=trust)
        return info.describe() + (" (its code runs: trust_remote_code)" if info.code else "")
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri, **options_for(uri, settings))
    if not fs.exists(path.rstrip("/")):
        raise ModelLoadError(f"{key}: {uri!r} does not exist")
    if fs.isfile(posixpath.join(path.rstrip("/"), "manifest.json")):
        return "a committed WMTP checkpoint"
    raise ModelLoadError(f"{key}: {uri!r} is neither a Hugging Face model folder (no config.json) nor a "
                         "committed WMTP checkpoint (no manifest.json)")
