"""The origin's spellings a configuration key also accepts, converted to the one WMTP uses (attrs
converters: the validator then sees the converted value, and an error names the accepted ones)."""

from __future__ import annotations

from typing import Any


def lower(v: Any) -> Any:
    """A name in any case: ``NCCL`` is ``nccl``."""
    return v.lower() if isinstance(v, str) else v


def sharding(v: Any) -> Any:
    """``devices.fsdp.sharding``: ``full`` is ``full_shard``, ``grad_op`` is ``shard_grad_op``."""
    v = v.lower() if isinstance(v, str) else v
    return {"full": "full_shard", "grad_op": "shard_grad_op"}.get(v, v)


def auto_wrap(v: Any) -> Any:
    """``devices.fsdp.auto_wrap``: ``true`` is ``block``, ``false`` is ``none``."""
    if v is True:
        return "block"
    if v is False:
        return "none"
    return v.lower() if isinstance(v, str) else v


def monitor(v: Any) -> Any:
    """``early_stopping.monitor``: ``wmtp_loss`` is ``loss``."""
    return "loss" if v == "wmtp_loss" else v


def mode(v: Any) -> Any:
    """``early_stopping.mode``: ``loss_only`` is ``min``."""
    return "min" if v == "loss_only" else v


def normalize(v: Any) -> Any:
    """``critic.normalize``: ``true`` is ``zscore``, ``false`` is ``none``."""
    if v is True:
        return "zscore"
    if v is False:
        return "none"
    return v
