"""Configuration: the two YAML files, validated into attrs classes, and the role bindings."""

from __future__ import annotations

from typing import Any

import attrs

from wmtp_core import redact
from wmtp_core.config.loader import (
    flatten,
    load_yaml,
    structure,
    to_plain,
    unused_keys,
)
from wmtp_core.config.schema import Config, Recipe
from wmtp_core.errors import ConfigError

__all__ = ["ConfigError", "Settings", "load_settings"]


@attrs.frozen
class Settings:
    config: Config
    recipe: Recipe
    config_source: str = "<defaults>"
    recipe_source: str = "<defaults>"
    unused: tuple[str, ...] = ()
    """Keys the user set that are accepted but have no effect here."""
    deprecated: tuple[str, ...] = ()
    """One line for each key the user set where it used to go: it was read from there."""

    @property
    def mlflow(self) -> dict[str, Any]:
        """The ``mlflow`` section as the sinks and plugins get it (empty when there is none)."""
        return attrs.asdict(self.config.mlflow) if self.config.mlflow is not None else {}

    def params(self) -> dict[str, Any]:
        """The flattened configuration for tracking, secrets redacted."""
        return {**flatten(to_plain(self.config), "config"), **flatten(to_plain(self.recipe), "recipe")}


BYTE_MODEL_KEYS = ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "dropout")
"""The byte-level model's architecture keys, which a run with ``paths.models.base`` ignores."""


def load_settings(config: str | None = None, recipe: str | None = None) -> Settings:
    """Load and validate both files (any fsspec URL); a missing one means embedded defaults."""
    cdata = load_yaml(config) if config else {}
    rdata = load_yaml(recipe) if recipe else {}
    # secret values are known before anything can quote them (an error about a bad value)
    redact.remember(redact.secrets_in(cdata) + redact.secrets_in(rdata))
    csrc, rsrc = config or "<defaults>", recipe or "<defaults>"
    cdata, deprecated = sink_keys_into_options(cdata, csrc)
    c = structure(Config, cdata, source=csrc)
    r = structure(Recipe, rdata, source=rsrc)
    unused = [f"{csrc}: {k}" for k in unused_keys(c, cdata)] + [f"{rsrc}: {k}" for k in unused_keys(r, rdata)]
    if c.paths.models.base:  # the architecture comes from the base model's folder
        unused += [f"{rsrc}: model.{k}" for k in BYTE_MODEL_KEYS if k in (rdata.get("model") or {})]
    return Settings(config=c, recipe=r, config_source=csrc, recipe_source=rsrc, unused=tuple(unused),
                    deprecated=tuple(deprecated))


MOVED_TO_OPTIONS = ("fast", "durable", "fast_keep_last")
"""Keys of ``storage.<role>`` that belong to one sink (``tiered``) and now live in its
``options``, which the sink itself checks. Config files that set them where they were still
load, with a one-line notice."""


def sink_keys_into_options(data: dict[str, Any], source: str) -> tuple[dict[str, Any], list[str]]:
    """``storage.<role>.fast`` (and the other :data:`MOVED_TO_OPTIONS`) moved into
    ``storage.<role>.options``; returns the data and a notice for each moved key. A key set in
    both places is an error naming both."""
    storage = data.get("storage")
    if not isinstance(storage, dict):
        return data, []
    notes, storage = [], dict(storage)
    for role in ("resume", "final"):
        section = storage.get(role)
        if not isinstance(section, dict) or not any(k in section for k in MOVED_TO_OPTIONS):
            continue
        section = dict(section)
        options = dict(section.get("options") or {}) if isinstance(section.get("options") or {}, dict) else None
        if options is None:
            continue  # the schema names the bad options value
        for key in MOVED_TO_OPTIONS:
            if key not in section:
                continue
            if key in options:
                raise ConfigError(f"{source}: storage.{role}.{key} and storage.{role}.options.{key} are both "
                                  f"set; keep storage.{role}.options.{key}")
            options[key] = section.pop(key)
            notes.append(f"{source}: storage.{role}.{key} is deprecated; write it as storage.{role}.options.{key} "
                         "(read from there now)")
        section["options"] = options
        storage[role] = section
    return {**data, "storage": storage}, notes
