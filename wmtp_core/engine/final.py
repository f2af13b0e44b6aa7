"""The final model as the final sink gets it: one function for the end of a run and for
``wmtp register`` (which rebuilds it from a committed checkpoint)."""

from __future__ import annotations

import tempfile
from typing import Any, Mapping

import torch

from wmtp_core.engine import models
from wmtp_core.events import Payload

EXAMPLE_LENGTH = 128
"""Tokens per row of the example input when none is given: the recipe's default
``data.*.max_length``, so a model registered later accepts what one registered at the end of a
default run accepts."""


def final_payload(weights: Mapping[str, Any], record: Mapping[str, Any], source: str, *,
                  dtype: torch.dtype | None = None, example: torch.Tensor | None = None,
                  tokenizer: Any = None, meta: Mapping[str, Any] | None = None,
                  max_shard_size: int | str | None = None) -> Payload:
    """The module rebuilt from ``weights`` and its architecture ``record`` (in ``dtype``, in eval
    mode), an example input (``example``, else two seeded random rows: two, so an exported
    program keeps a dynamic batch dimension) and, for a Hugging Face model, the model as a
    Hugging Face folder with ``tokenizer`` and ``meta`` in it, its weights split past
    ``max_shard_size`` (``storage.final.max_shard_size``; the caller removes the folder once it
    is stored). Raises :class:`~wmtp_core.errors.ModelLoadError` naming ``source`` for weights
    that do not fit the architecture."""
    module = models.rebuild(dict(record), dict(weights), source)
    if dtype is not None:
        module = module.to(dtype)
        if record.get("kind") != "hf" and dtype != torch.float32:  # served in float32 (MLflow pyfunc)
            module.float_logits = True
    module.eval()
    generator = torch.Generator().manual_seed(0)
    folder = None
    if record.get("kind") == "hf":
        from wmtp_core.engine import hf
        from wmtp_core.engine.final_shards import limit

        if example is None:
            example = torch.randint(0, len(tokenizer), (2, 16), generator=generator)
        folder = hf.export(module, tokenizer, tempfile.mkdtemp(prefix="wmtp-final-"), dict(meta or {}),
                           max_shard_size=limit(max_shard_size))
    elif example is None:
        cfg = module.cfg
        example = torch.randint(0, cfg.vocab_size, (2, min(EXAMPLE_LENGTH, cfg.max_seq_len)), generator=generator)
    return Payload(parts={"model": dict(weights)}, model=module, example_input=example,
                   model_config=dict(record), folder=folder)
