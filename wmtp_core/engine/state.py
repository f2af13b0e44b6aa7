"""Capture and restore of the RNG streams a bit-exact resume needs.

Parts are plain tensors, numbers, strings, lists, tuples and dicts, so they load with
``torch.load(weights_only=True)``: a checkpoint is untrusted input.
"""

from __future__ import annotations

import random
from typing import Any, Mapping

import torch

from wmtp_core.errors import CheckpointError, UnusableError
from wmtp_core.state_shape import check_resume_parts

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


MAX_COUNT = 2 ** 53
"""No counter of a run (an epoch, a scheduler's step) exceeds this."""


def check_like(saved: Any, live: Any, where: str) -> None:
    """``saved`` (restored state) has the structure of ``live`` (the same object's state now):
    no key it does not have, the same list lengths, the same kinds of values. A restorer that
    copies every key into its object (``LambdaLR.load_state_dict`` does) would otherwise take
    any value in and fail steps later. Raises :class:`UnusableError` naming the key."""
    if isinstance(live, Mapping):
        if not isinstance(saved, Mapping):
            raise UnusableError(f"{where} holds a {type(saved).__name__}, not a mapping")
        extra = next((k for k in saved if k not in live), None)
        if extra is not None:
            raise UnusableError(f"{where} has the key {_short(extra)}, which it does not have here "
                                f"(it has {', '.join(map(repr, live)) or 'none'})")
        for k in saved:
            check_like(saved[k], live[k], f"{where}.{k}")
    elif isinstance(live, (list, tuple)):
        if not isinstance(saved, (list, tuple)) or len(saved) != len(live):
            raise UnusableError(f"{where} holds {_short(saved)}, not {len(live)} values")
        for i, (s, v) in enumerate(zip(saved, live)):
            check_like(s, v, f"{where}[{i}]")
    elif isinstance(live, bool) or isinstance(live, str) or live is None:
        if type(saved) is not type(live):
            raise UnusableError(f"{where} holds {_short(saved)}, not a {type(live).__name__}")
    elif isinstance(live, (int, float)):
        number = isinstance(saved, (int, float)) and not isinstance(saved, bool)
        if not number or (isinstance(live, int) and not isinstance(saved, int)) or abs(saved) > MAX_COUNT:
            raise UnusableError(f"{where} holds {_short(saved)}, not a {type(live).__name__} "
                                f"of at most {MAX_COUNT}")


def check_counters(data: Mapping[str, Any], early: Mapping[str, Any], windows: int, where: str) -> None:
    """The data position and the early-stopping counters are in range."""
    for key in ("epoch", "index", "seed"):
        if not isinstance(data.get(key), int) or isinstance(data.get(key), bool):
            raise UnusableError(f"{where}: the data position's {key!r} holds {_short(data.get(key))}")
    if not 0 <= data["epoch"] <= MAX_COUNT or not 0 <= data["index"] <= windows:
        raise UnusableError(f"{where}: the data position (epoch {_short(data['epoch'])}, index "
                            f"{_short(data['index'])}) is out of range (epochs from 0, 0 to {windows} windows)")
    best, bad, stopped = early.get("best"), early.get("bad_evals"), early.get("stopped")
    if not (best is None or isinstance(best, (int, float))) or not isinstance(bad, int) \
            or isinstance(bad, bool) or not 0 <= bad <= MAX_COUNT or not isinstance(stopped, bool):
        raise UnusableError(f"{where}: the early-stopping state {_short(dict(early))} is not "
                            "{best: a number or None, bad_evals: a count, stopped: true or false}")


def _short(x: Any) -> str:
    text = repr(x)
    return text if len(text) <= 60 else text[:57] + "..."


def check_restorable(parts: Mapping[str, Any], *, source: str, step: int | None, sharded: bool,
                     scheduler: Mapping[str, Any], clock: Mapping[str, Any], windows: int) -> None:
    """The resume state's structure, checked before anything of it is restored: its parts
    (:func:`~wmtp_core.state_shape.check_resume_parts`; ``step``, the checkpoint's own), the
    scheduler's state against this run's ``scheduler`` state, the data position against its
    ``windows``, the counters' ranges. Raises :class:`UnusableError` naming ``source``."""
    t = parts.get("trainer")
    if step is None and isinstance(t, Mapping):
        step = t.get("step")
    check_resume_parts(parts, step, source, sharded=sharded)
    check_like(t["scheduler"], scheduler, f"{source}: the scheduler state")
    check_counters(t["data"], t["early_stopping"], windows, source)
    if t.get("clock") is not None:
        check_like(t["clock"], dict(clock), f"{source}: the training clock")


def refusal(parts: Mapping[str, Any], record: Mapping[str, Any], message: str) -> CheckpointError:
    """What a restore that failed means: the checkpoint was written for another model (its
    trainer state names another model configuration than ``record``, this run's: the run's
    settings differ, the checkpoint is fine), or it holds what no run can use
    (:class:`UnusableError`, quarantined)."""
    t = parts.get("trainer") if isinstance(parts, Mapping) else None
    theirs = t.get("model_config") if isinstance(t, Mapping) else None
    if isinstance(theirs, Mapping) and dict(theirs) != dict(record):
        key = next((k for k in sorted(set(theirs) | set(record), key=str) if theirs.get(k) != record.get(k)), "?")
        return CheckpointError(f"{message}; it was written by a run of another model ({key}: "
                               f"{_short(theirs.get(key))} there, {_short(record.get(key))} here): "
                               "resume it with that model's settings, or start another --run-name")
    return UnusableError(message)
