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
    c = structure(Config, cdata, source=csrc)
    r = structure(Recipe, rdata, source=rsrc)
    unused = [f"{csrc}: {k}" for k in unused_keys(c, cdata)] + [f"{rsrc}: {k}" for k in unused_keys(r, rdata)]
    if c.paths.models.base:  # the architecture comes from the base model's folder
        unused += [f"{rsrc}: model.{k}" for k in BYTE_MODEL_KEYS if k in (rdata.get("model") or {})]
    return Settings(config=c, recipe=r, config_source=csrc, recipe_source=rsrc, unused=tuple(unused))
