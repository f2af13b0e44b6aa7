"""A fine-tuned Hugging Face model rebuilt from what a checkpoint or registry stored: its
architecture record (``kind: hf``: the base model's config, the heads) and its weights, both
untrusted. The config is checked as a model folder's is (:func:`~wmtp_core.engine.model_size.check_config`),
the model laid out on the meta device and every weight's name and shape compared before any
memory is allocated."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from wmtp_core.engine.hf import HFMTPModel, quiet
from wmtp_core.engine.model_size import check_config
from wmtp_core.errors import ModelLoadError, first_line


def _record_config(record_config: Mapping[str, Any], source: str):
    """A transformers config from a stored dict (untrusted: no code, a known model type)."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if not isinstance(record_config, Mapping):
        raise ModelLoadError(f"{source}: its architecture record holds no Hugging Face config")
    if record_config.get("auto_map"):
        raise ModelLoadError(f"{source}: its config names code to run (auto_map); refused")
    model_type = record_config.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise ModelLoadError(f"{source}: its config names model type {model_type!r}, which this "
                             "transformers version does not know")
    check_config(record_config, f"{source}: its config")
    fields = {k: v for k, v in record_config.items() if k not in ("model_type", "transformers_version")}
    try:
        return AutoConfig.for_model(model_type, **fields)
    except Exception as e:  # noqa: BLE001 - TypeError, ValueError, strict dataclass errors
        raise ModelLoadError(f"{source}: its Hugging Face config is not accepted ({first_line(e)})") from None


def rebuild(record: Mapping[str, Any], weights: Mapping[str, Any], source: str) -> Any:
    """The trained model from its record (``kind: hf``) and weights, both untrusted: laid out on
    the meta device, every weight's name and shape compared, then filled."""
    quiet()
    from transformers import AutoModelForCausalLM

    n_future, head = record.get("n_future"), record.get("head")
    if not (isinstance(n_future, int) and 1 <= n_future <= 256) or head not in ("linear", "transformer"):
        raise ModelLoadError(f"{source}: its architecture record says n_future={n_future!r}, head={head!r}")
    config = _record_config(record.get("config"), source)
    try:
        with torch.device("meta"):
            model = HFMTPModel(AutoModelForCausalLM.from_config(config), n_future, head)
    except Exception as e:  # noqa: BLE001 - transformers' refusals of a config have no common type
        raise ModelLoadError(f"{source}: its Hugging Face config is not accepted ({first_line(e)})") from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in weights.items() if isinstance(v, torch.Tensor)}
    if got != expected or len(got) != len(weights):
        diff = sorted(set(got) ^ set(expected)) or sorted(k for k in got if got[k] != expected[k]) or ["?"]
        raise ModelLoadError(f"{source}: its weights do not fit the architecture it records "
                             f"({diff[0]}: {got.get(diff[0], 'missing')} vs {expected.get(diff[0], 'not in the model')})")
    model.load_state_dict(dict(weights), assign=True)
    model.base.tie_weights()
    return model.eval()
