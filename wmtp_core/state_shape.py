"""The structure of the resume state WMTP writes, checked before anything believes it.

A checkpoint's bytes can match its manifest and still hold something no run can use: an empty
trainer state, a step other than its directory's, an optimizer state without parameter groups.
``wmtp checkpoints verify`` checks this after deserialising every part (weights-only), and so
does a resume before the engine restores anything; what fails is
:class:`~wmtp_core.errors.UnusableError`, quarantined like a corrupt checkpoint. The engine
checks the finer points it alone knows (its scheduler's keys, its model's shapes) when it
restores.
"""

from __future__ import annotations

from typing import Any, Mapping

from wmtp_core.errors import UnusableError
from wmtp_core.tensors import is_tensor

RESUME_PARTS = ("model", "optimizer", "trainer")
"""The parts of a single-process resume checkpoint (``model.pt``, ``optimizer.pt``, ``trainer.pt``)."""

TRAINER_KEYS: dict[str, type | tuple[type, ...]] = {
    "step": int, "losses": (list, tuple), "scheduler": Mapping, "rng": Mapping, "data": Mapping,
    "early_stopping": Mapping, "algo": Mapping,
}
"""What a trainer state holds at least, and the type of each (``model_config``, ``scaler`` and
``clock`` are optional)."""

MAX_STEP = 2 ** 53
"""No run takes more steps than this (a float still counts them exactly)."""


def check_resume_parts(parts: Mapping[str, Any], step: int, where: str, *, sharded: bool = False) -> None:
    """Raise :class:`UnusableError` naming ``where`` unless ``parts`` (deserialised) has the
    structure of WMTP's resume state at ``step``. ``sharded``: only this rank's ``trainer``
    (the weights and optimizer are DCP shards, checked as they are read)."""
    names = ("trainer",) if sharded else RESUME_PARTS
    missing = [n for n in names if n not in parts]
    if missing:
        raise UnusableError(f"{where} holds no {', '.join(missing)} state: it is not resume state "
                            "WMTP wrote (a resume needs " + ", ".join(names) + ")")
    if not sharded:
        check_weights(parts["model"], f"{where}/model.pt")
        check_optimizer(parts["optimizer"], f"{where}/optimizer.pt")
    check_trainer(parts["trainer"], step, f"{where}/trainer.pt")


def check_weights(obj: Any, where: str) -> None:
    """A state dict: a non-empty mapping of parameter names to tensors."""
    if not isinstance(obj, Mapping) or not obj:
        raise UnusableError(f"{where} holds {_kind(obj)}, not model weights (a mapping of names to tensors)")
    bad = next((k for k, v in obj.items() if not isinstance(k, str) or not is_tensor(v)), None)
    if bad is not None:
        raise UnusableError(f"{where}: its entry {bad!r} holds {_kind(obj[bad])}, not a tensor")


def check_optimizer(obj: Any, where: str) -> None:
    """A torch optimizer state dict: ``state`` (a mapping) and ``param_groups`` (a list of
    mappings, each naming its parameters by number)."""
    if not isinstance(obj, Mapping) or not isinstance(obj.get("state"), Mapping) \
            or not isinstance(obj.get("param_groups"), (list, tuple)):
        raise UnusableError(f"{where} holds {_kind(obj)}, not an optimizer state "
                            "(a mapping with 'state' and 'param_groups')")
    for i, group in enumerate(obj["param_groups"]):
        params = group.get("params") if isinstance(group, Mapping) else None
        if not isinstance(params, (list, tuple)) or not all(_is_int(p) for p in params):
            raise UnusableError(f"{where}: param_groups[{i}] does not name its parameters by number")


def check_trainer(obj: Any, step: int, where: str) -> None:
    """The trainer state: its keys, their types, and its step, which must be the checkpoint's."""
    if not isinstance(obj, Mapping):
        raise UnusableError(f"{where} holds {_kind(obj)}, not a trainer state (a mapping)")
    for key, kind in TRAINER_KEYS.items():
        if key not in obj:
            raise UnusableError(f"{where}: the trainer state has no {key!r}; it is not state WMTP wrote")
        if not isinstance(obj[key], kind) or (kind is int and not _is_int(obj[key])):
            raise UnusableError(f"{where}: the trainer state's {key!r} holds {_kind(obj[key])}")
    if not 0 <= obj["step"] <= MAX_STEP or obj["step"] != step:
        raise UnusableError(f"{where}: the trainer state says step {_short(obj['step'])}, but the "
                            f"checkpoint is step {step}")
    bad = next((x for x in obj["losses"] if not _is_number(x)), None)
    if bad is not None or len(obj["losses"]) > MAX_STEP:
        raise UnusableError(f"{where}: the trainer state's 'losses' holds {_kind(bad)}, not numbers")
    for key in ("model_config", "scaler", "clock"):
        if obj.get(key) is not None and not isinstance(obj[key], Mapping):
            raise UnusableError(f"{where}: the trainer state's {key!r} holds {_kind(obj[key])}, not a mapping")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return _is_int(x) or isinstance(x, float)


def _short(x: Any) -> str:
    text = repr(x)
    return text if len(text) <= 40 else text[:37] + "..."


def _kind(obj: Any) -> str:
    if isinstance(obj, Mapping) and not obj:
        return "an empty mapping"
    if is_tensor(obj):
        return "a tensor"
    return f"a {type(obj).__name__}" + (f" ({_short(obj)})" if isinstance(obj, (int, float, str)) else "")
