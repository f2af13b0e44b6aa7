"""A trainer's parts, chosen from the settings and checked: the device and precision, the
byte-level architecture, the algorithm with its reference or reward model, and the documents of
the data sources. The dry run (:func:`wmtp_core.plan.preflight`) calls the checks too, so it
refuses in the same words as a run."""

from __future__ import annotations

from typing import Callable

import torch

from wmtp_core.config import Settings
from wmtp_core.engine import corpus, models
from wmtp_core.engine import data as data_mod
from wmtp_core.engine.algorithms import Algorithm, BaselineMTP, CriticWMTP, Rho1WMTP
from wmtp_core.engine.model import ModelConfig, MTPModel, model_from_weights
from wmtp_core.engine.model_sources import local_path
from wmtp_core.engine.models import Base
from wmtp_core.errors import (
    DataError,
    DeviceError,
    ModelLoadError,
    TrainingError,
    WmtpError,
)
from wmtp_core.events import LoadedModel

LoadModel = Callable[[str], LoadedModel]
"""Resolves a model URI to weights and architecture (the ``wmtp_load_model`` hook); raises a
:class:`~wmtp_core.errors.WmtpError` when it cannot."""


def model_config(settings: Settings) -> ModelConfig:
    """The byte-level model's architecture (the recipe's ``model`` section)."""
    return models.byte_config(settings)


def choose_device(backend: str) -> torch.device:
    """Honour ``devices.compute_backend`` or refuse it with the reason."""
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if backend == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if backend == "cuda" and not cuda:
        raise DeviceError("devices.compute_backend: 'cuda' was asked for but this machine has no "
                          "usable CUDA device (torch.cuda.is_available() is False); use cpu or auto")
    if backend == "mps" and not mps:
        raise DeviceError("devices.compute_backend: 'mps' was asked for but MPS is not available "
                          "here; use cpu or auto")
    return torch.device(backend)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """Honour ``devices.mixed_precision`` or refuse it with the reason."""
    if precision in ("no", "fp32"):
        return None
    if precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise DeviceError("devices.mixed_precision: 'bf16' is not supported by this GPU; use fp16 or no")
        return torch.bfloat16
    if device.type != "cuda":
        raise DeviceError(f"devices.mixed_precision: 'fp16' needs a CUDA device (this run uses "
                          f"{device.type}); use bf16 or no")
    return torch.float16


def resolve_model(load: LoadModel, uri: str, key: str) -> MTPModel:
    """A frozen model from a URI: ``load`` resolves it (plugins, or the core for committed
    checkpoints); its architecture and weights are checked before the module is built."""
    try:
        loaded = load(uri)
        if not isinstance(loaded, LoadedModel):
            raise ModelLoadError(f"{uri!r} did not resolve to a model")
        model = model_from_weights(dict(loaded.model_config), dict(loaded.weights), uri)
    except WmtpError as e:
        message = str(e) if uri in str(e) else f"{uri!r} could not be loaded: {e}"
        raise ModelLoadError(f"{key}: {message}") from None
    return model.eval().requires_grad_(False)


def check_algorithm(settings: Settings) -> None:
    """Refuse an algorithm whose requirements the configuration does not meet, before anything
    starts (the dry run calls it too, so it refuses in the same words)."""
    recipe, cfg = settings.recipe, settings.config
    algo = recipe.train.algo
    if algo == "rho1-wmtp" and not cfg.paths.models.ref:
        raise TrainingError(f"{settings.config_source}: paths.models.ref is required by rho1-wmtp: "
                            "a Hugging Face causal LM folder, a models:/NAME/VERSION URI or a committed "
                            "WMTP checkpoint (.../step_N or .../final), sharing the base model's vocabulary")
    if algo == "critic-wmtp" and cfg.paths.models.rm is None and not recipe.critic.use_pseudo_rewards:
        raise TrainingError(f"{settings.config_source}: paths.models.rm is null and "
                            "critic.use_pseudo_rewards is false: give a reward model or allow pseudo-rewards")


def build_algorithm(settings: Settings, load: LoadModel, base: Base) -> Algorithm:
    recipe, cfg = settings.recipe, settings.config
    algo = recipe.train.algo
    check_algorithm(settings)
    loss = recipe.loss
    if algo == "baseline-mtp":
        return BaselineMTP(scale=loss.lambda_)
    if algo == "rho1-wmtp":
        return Rho1WMTP(models.build_reference(settings, load, base),
                        mode=recipe.rho1.selection_mode, min_ce_diff=recipe.rho1.min_ce_diff,
                        skip_percentile=recipe.rho1.skip_threshold_percentile,
                        temperature=loss.weight_temperature, max_weight=loss.max_weight,
                        epsilon=loss.epsilon, norm=loss.weight_norm)
    reward = models.build_reward(settings, load, base) if cfg.paths.models.rm else None
    return CriticWMTP(base.hidden_size, recipe.critic, loss.weight_temperature, reward,
                      max_weight=loss.max_weight, epsilon=loss.epsilon, norm=loss.weight_norm)


def check_source(settings: Settings, source: str, key: str = "data.train.sources",
                 split: str = "train") -> None:
    """The source is built in or named in ``paths.datasets``, and its URL holds data of the
    split asked for (``train``, ``eval``, or the one ``NAME:SPLIT`` names)."""
    datasets = settings.config.paths.datasets
    name, split = corpus.parse_source(source, split)
    if name not in datasets and name != corpus.STDLIB:
        raise DataError(
            f"{key}: data source {source!r} is neither built in ({corpus.STDLIB!r}) nor a key of "
            f"paths.datasets (defined: {', '.join(sorted(datasets)) or 'none'})"
        )
    url = datasets.get(name, corpus.STDLIB)
    if url != corpus.STDLIB:
        corpus.source_files(url, split, f"paths.datasets.{name}",
                            models.options_for(url, settings))


def load_documents(settings: Settings, sources: list[str], split: str, key: str) -> list[str]:
    """The documents of ``split`` from each source, in order."""
    docs: list[str] = []
    datasets = settings.config.paths.datasets
    for source in sources:
        check_source(settings, source, key, split)
        name, named = corpus.parse_source(source, split)
        url = datasets.get(name, corpus.STDLIB)
        docs += corpus.stdlib_documents() if url == corpus.STDLIB else \
            corpus.documents(url, named, f"paths.datasets.{name}",
                             models.options_for(url, settings))
    return docs


def count_steps(settings: Settings) -> data_mod.StepCount | None:
    """The steps the run will take, counted as the trainer counts them: the training data read
    and cut into rows with the base model's tokenizer (bytes for the byte-level model), the
    global batch (``batch_size`` times ``WORLD_SIZE``), ``num_epochs`` and ``max_steps``. None
    when the tokenizer is known only once the run resolves its base model (a registered model, a
    folder on object storage)."""
    import os

    uri = settings.config.paths.models.base
    if not uri:
        tokenizer: object = data_mod.ByteTokenizer()
    else:
        folder = local_path(uri)
        if folder is None:
            return None
        from wmtp_core.engine import hf

        tokenizer = hf.load_tokenizer(folder, "paths.models.base", settings.config.paths.models.trust_remote_code)
    recipe = settings.recipe
    split = recipe.data.train
    rows = len(data_mod.split_windows(load_documents(settings, split.sources, "train", "data.train.sources"),
                                      split, tokenizer))
    if recipe.data.eval is None:
        rows -= data_mod.held_out(rows)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    accum = recipe.train.grad_accum_steps
    count = data_mod.StepCount(rows=max(0, rows), rows_per_step=split.batch_size * world * accum,
                               epochs=recipe.train.num_epochs, max_steps=recipe.train.max_steps)
    if count.rows < count.rows_per_step:
        parts = [f"data.train.batch_size {split.batch_size}"] + ([f"{world} ranks"] if world > 1 else []) + \
            ([f"train.grad_accum_steps {accum}"] if accum > 1 else [])
        raise DataError(f"data.train.batch_size: a step takes {count.rows_per_step} rows ({' x '.join(parts)}) "
                        f"but the data yields {count.rows} training rows; lower batch_size"
                        f"{' or grad_accum_steps' if accum > 1 else ''} or max_length, or add data")
    return count
