"""Tiny Hugging Face model folders made the way the origin's tests would need them: each model
built from the origin's own ``config.json`` (``../shared/origin-files/tests/test_models/``),
scaled down, random weights, saved as safetensors next to copies of the origin's real tokenizer
files. Nothing is downloaded (``HF_HUB_OFFLINE=1``)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

ORIGIN = Path(__file__).resolve().parents[2] / "shared" / "origin-files"
ORIGIN_MODELS = ORIGIN / "tests" / "test_models"
ORIGIN_DATA = ORIGIN / "tests" / "test_dataset"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "vocab.txt",
                   "spm.model", "special_tokens_map.json", "added_tokens.json")
GPT2_SMALL = {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 256}
DISTILBERT_SMALL = {"n_layers": 2, "dim": 32, "hidden_dim": 64, "n_heads": 2}

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _origin_config(name: str) -> dict:
    return json.loads((ORIGIN_MODELS / name / "config.json").read_text())


def _copy_tokenizer(name: str, target: Path) -> None:
    for f in TOKENIZER_FILES:
        if (ORIGIN_MODELS / name / f).exists():
            shutil.copy(ORIGIN_MODELS / name / f, target / f)
            os.chmod(target / f, 0o644)


def causal_lm(target: Path, origin: str = "distilgpt2-mtp", seed: int = 0, tokenizer: bool = True,
              **scale) -> Path:
    """A GPT-2 causal LM from the origin folder ``origin``'s config, scaled to ``GPT2_SMALL``
    (``scale`` overrides), with its config's ``mtp_config`` kept."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    raw = _origin_config(origin)
    keep = {k: v for k, v in raw.items() if k not in ("architectures", "transformers_version", "_name_or_path")}
    config = GPT2Config(**{**keep, **GPT2_SMALL, **scale})
    model = GPT2LMHeadModel(config)
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target, safe_serialization=True)
    if "mtp_config" in raw:  # the origin's folder declares its heads and names its own class
        saved = json.loads((target / "config.json").read_text())
        saved.update(mtp_config=raw["mtp_config"], architectures=raw["architectures"])
        (target / "config.json").write_text(json.dumps(saved, indent=2))
    if tokenizer:
        _copy_tokenizer("distilgpt2-mtp" if origin != "tiny-reward-model" else origin, target)
    return target


def reward_classifier(target: Path, seed: int = 0, **scale) -> Path:
    """The origin's ``tiny-reward-model``: a DistilBERT sequence classifier with its own
    sentencepiece/WordPiece tokenizer, scaled to ``DISTILBERT_SMALL``."""
    import torch
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(seed)
    raw = _origin_config("tiny-reward-model")
    keep = {k: v for k, v in raw.items() if k not in ("architectures", "transformers_version")}
    model = DistilBertForSequenceClassification(DistilBertConfig(**{**keep, **DISTILBERT_SMALL, **scale}))
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target, safe_serialization=True)
    _copy_tokenizer("tiny-reward-model", target)
    return target


def origin_models(root: Path) -> Path:
    """``root/tests/test_models/`` laid out as the origin's configs expect, with weights."""
    models = root / "tests" / "test_models"
    causal_lm(models / "distilgpt2-mtp", "distilgpt2-mtp", seed=0)
    causal_lm(models / "distilgpt2", "distilgpt2", seed=1, tokenizer=False)
    causal_lm(models / "tiny-reward-model-gpt2", "tiny-reward-model-gpt2", seed=2, tokenizer=False)
    reward_classifier(models / "tiny-reward-model", seed=3)
    for f in ("metadata.json",):
        shutil.copy(ORIGIN_MODELS / "distilgpt2-mtp" / f, models / "distilgpt2-mtp" / f)
    return models
