"""The end of a run's final-model pieces, for ``wmtp register``: a router for the final role
bound exactly as a run binds it, and the final payload rebuilt from a committed checkpoint.

Orchestration, beside :mod:`wmtp_core.session`: it joins the engine (to rebuild the model) and
storage (the router).
"""

from __future__ import annotations

from typing import Any, Mapping

import pluggy

from wmtp_core.bindings import Bindings
from wmtp_core.errors import CheckpointError, ModelLoadError
from wmtp_core.events import RunInfo
from wmtp_core.roles import Role
from wmtp_core.router import Router


def final_router(settings: Any, run: RunInfo, pm: pluggy.PluginManager | None = None) -> Router:
    """A router for the final role alone, bound exactly as a run with this config binds it."""
    from wmtp_core.config.routing import bindings_for
    from wmtp_core.plugins import build_catalog, make_plugin_manager

    pm = pm or make_plugin_manager()
    catalog = build_catalog(pm)
    binding = bindings_for(settings, catalog).sink_for(Role.FINAL)
    bindings = Bindings(sinks=[binding] if binding else [])  # the Router refuses an unbound final
    mlflow = settings.mlflow
    return Router(pm, catalog, bindings, run, required=frozenset({Role.FINAL}), mlflow=mlflow).open()


def final_payload_from(uri: str, storage_options: Mapping[str, Any] | None = None,
                       meta: Mapping[str, Any] | None = None, max_shard_size: int | str | None = None) -> Any:
    """What the end of a run hands the final sink (:func:`wmtp_core.engine.final.final_payload`,
    the same function), rebuilt from a committed checkpoint whose manifest, files, architecture
    and weights are all checked first. A Hugging Face model comes back as a folder too, with the
    tokenizer of the base model its checkpoint records, its weights split past ``max_shard_size``
    (``storage.final.max_shard_size``) as at the end of a run."""
    from wmtp_core.checkpoint_models import load_model_from_checkpoint
    from wmtp_core.engine import hf
    from wmtp_core.engine.final import final_payload
    from wmtp_core.engine.model_sources import local_path

    loaded = load_model_from_checkpoint(uri, storage_options)
    record = dict(loaded.model_config)
    tokenizer = None
    if record.get("kind") == "hf":
        base = str(record.get("base") or "")
        info = hf.inspect(base, f"{uri} (its base model, for the tokenizer)", need_weights=False)
        folder = hf.local_copy(info)
        try:
            tokenizer = hf.load_tokenizer(folder, f"{uri} (its base model {base})")
        finally:
            if folder != local_path(info.uri):  # a private copy of a folder on object storage
                hf.remove(folder)
        meta = {"base_model": base, **dict(meta or {})}
    try:
        return final_payload(dict(loaded.weights), record, uri, tokenizer=tokenizer, meta=meta,
                             max_shard_size=max_shard_size)
    except ModelLoadError as e:
        raise CheckpointError(str(e)) from None


def discard(payload: Any) -> None:
    """Remove the folder a final payload was written to, once it is stored."""
    import shutil

    if payload is not None and payload.folder:
        shutil.rmtree(payload.folder, ignore_errors=True)
