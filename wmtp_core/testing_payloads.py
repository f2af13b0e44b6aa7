"""The payloads the sink contract stores: small but real (a one-layer model, an AdamW state after
one step, trainer state with an RNG stream), and structural equality for what comes back."""

from __future__ import annotations

from typing import Any, Mapping

import attrs
import torch

from wmtp_core.engine.model import ModelConfig, MTPModel
from wmtp_core.events import CheckpointEmitted, Payload, RunInfo
from wmtp_core.roles import Role
from wmtp_core.tensors import tensor_bytes

TINY = ModelConfig(d_model=16, n_layers=1, n_heads=2, n_future=2, max_seq_len=16)
"""The architecture of every model the contract stores."""


def tiny_model(seed: int) -> MTPModel:
    """A :data:`TINY` model whose weights depend on ``seed`` (so two steps differ)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MTPModel(TINY)


def resume_payload(step: int) -> Payload:
    """The three parts the engine stores for the resume role, made real at ``step``."""
    model = tiny_model(step)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for i, p in enumerate(model.parameters()):  # gradients without autograd: quick and fixed
        p.grad = torch.full_like(p, 0.01 * (i + step))
    optimizer.step()
    trainer = {
        "step": step,
        "rng": {"torch": torch.random.get_rng_state()},
        "data": {"epoch": 0, "index": 4 * step, "seed": 7},
        "early_stopping": {"best": None, "bad_evals": 0},
        "algo": {},
    }
    return Payload(parts={"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                          "trainer": trainer})


def final_payload(step: int) -> Payload:
    """What the engine hands the final sink: the weights, the module, an input, the architecture."""
    model = tiny_model(step).eval()
    return Payload(parts={"model": model.state_dict()}, model=model,
                   example_input=torch.arange(16).view(2, 8) % TINY.vocab_size,
                   model_config=attrs.asdict(TINY))


def payload_for(role: Role, step: int) -> Payload:
    return final_payload(step) if role is Role.FINAL else resume_payload(step)


def event_for(run: RunInfo, role: Role, step: int, payload: Payload) -> CheckpointEmitted:
    """The event the router would emit for ``payload``."""
    return CheckpointEmitted(run=run, role=role, step=step, parts=tuple(payload.parts),
                             nbytes=tensor_bytes(payload.parts), metrics={"loss": 1.0 / step})


def assert_same(expected: Any, actual: Any, where: str = "parts") -> None:
    """Structural equality, ``torch.equal`` (and the same dtype) for tensors."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), f"{where}: expected a tensor, got {type(actual).__name__}"
        assert actual.dtype == expected.dtype, f"{where}: dtype {actual.dtype} != {expected.dtype}"
        assert torch.equal(actual, expected), f"{where}: the tensor differs from what was stored"
    elif isinstance(expected, Mapping):
        assert isinstance(actual, Mapping), f"{where}: expected a mapping, got {type(actual).__name__}"
        assert set(actual) == set(expected), (
            f"{where}: keys {sorted(map(str, actual))} != {sorted(map(str, expected))}")
        for k in expected:
            assert_same(expected[k], actual[k], f"{where}[{k!r}]")
    elif isinstance(expected, (list, tuple)):
        assert isinstance(actual, (list, tuple)) and len(actual) == len(expected), (
            f"{where}: expected a sequence of {len(expected)}, got {actual!r}")
        for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
            assert_same(e, a, f"{where}[{i}]")
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


