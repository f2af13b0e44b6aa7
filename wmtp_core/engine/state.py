"""Capture and restore of the RNG streams a bit-exact resume needs.

Parts are plain tensors, numbers, strings, lists, tuples and dicts, so they load with
``torch.load(weights_only=True)``: a checkpoint is untrusted input.
"""

from __future__ import annotations

import random
from typing import Any, Mapping

import torch

PARTS = ("model", "optimizer", "trainer")


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": _py_state(random.getstate())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def _py_state(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]
