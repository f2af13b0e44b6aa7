"""Past one machine with the existing engine: torch.distributed, FSDP2, and
``torch.distributed.checkpoint`` (DCP) for sharded resume state.

One process is a world of one. Launched by ``torchrun``, every rank runs the same program;
rank 0 alone talks to observers, the registry and retention.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from typing import Any

import attrs
import torch
import torch.distributed as dist

from wmtp_core.errors import DeviceError


@attrs.frozen
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    initialised: bool = False
    """True when this program created a process group (and must destroy it)."""
    group: Any = attrs.field(default=None, eq=False)
    """A gloo group of its own for checkpoint collectives, so a save written in the background
    never interleaves with the training loop's collectives on the default group."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier(group=self.group)

    def broadcast(self, obj: Any, *, group: Any = attrs.NOTHING) -> Any:
        """Rank 0's ``obj`` on every rank, over the checkpoint group (``group``: another one)."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, group=self.group if group is attrs.NOTHING else group)
        return box[0]

    def tell(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank, over the training loop's group: for the training
        thread, while a background save may be using the checkpoint group (two threads issuing
        collectives on one group interleave in a different order on each rank)."""
        return self.broadcast(obj, group=None)

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank (the checkpoint group)."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def agree(self, value: float, *flags: bool) -> tuple:
        """``(mean of value, *flags)`` where each flag is true when it is true on any rank: one
        collective for the loss and every per-step decision (a signal, a timed save)."""
        if not dist.is_initialized() or self.size == 1:
            return (value, *flags)
        t = torch.tensor([value, *(1.0 if f else 0.0 for f in flags)], dtype=torch.float64)
        dist.all_reduce(t)
        return (float(t[0]) / self.size, *(bool(x > 0) for x in t[1:].tolist()))

    def total(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over every rank (the training loop's group; no gradient): the global
        batch's statistics (:class:`wmtp_core.engine.algorithms.Ranks`)."""
        if not dist.is_initialized() or self.size == 1:
            return t.detach()
        out = t.detach().clone()
        dist.all_reduce(out)
        return out

    def mean(self, value: float) -> float:
        if not dist.is_initialized() or self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t[0]) / self.size

    def close(self) -> None:
        global _GROUP
        if self.initialised and dist.is_initialized():
            dist.destroy_process_group()
            _GROUP = None


def check(devices: Any, device: torch.device) -> None:
    """Refuse a distributed setting this launch cannot honour, before anything starts (the dry
    run calls it too). ``devices.distributed.enabled: false`` under torchrun is refused: every
    rank would train alone and write the same checkpoints."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    wanted = devices.distributed.enabled
    if size > 1 and wanted is False:
        raise DeviceError("devices.distributed.enabled is false but this program was launched with "
                          f"WORLD_SIZE={size}; enable it (or leave it null) or launch one process")
    if wanted and size == 1 and "RANK" not in os.environ:
        raise DeviceError("devices.distributed.enabled is true but no launcher set RANK/WORLD_SIZE; "
                          "launch with torchrun --nproc_per_node=N -m wmtp_core.run ...")
    if size > 1 and not devices.fsdp.enabled:
        raise DeviceError(f"{size} processes were launched but devices.fsdp.enabled is false: "
                          "each rank would train its own copy; enable fsdp")
    backend = devices.distributed.backend or ("nccl" if device.type == "cuda" else "gloo")
    if (size > 1 or devices.fsdp.enabled) and backend == "nccl" and device.type != "cuda":
        raise DeviceError("devices.distributed.backend: 'nccl' needs CUDA devices; use gloo on CPU")


def setup(devices: Any, device: torch.device) -> World:
    """Join the process group torchrun describes (or make a world of one for FSDP on one
    process), after :func:`check`."""
    check(devices, device)
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1 and not devices.fsdp.enabled:
        return World()
    if dist.is_initialized():
        return World(rank=dist.get_rank(), size=dist.get_world_size(),
                     local_rank=int(os.environ.get("LOCAL_RANK", "0")), group=_checkpoint_group())
    backend = devices.distributed.backend or ("nccl" if device.type == "cuda" else "gloo")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as s:  # a world of one: any free loopback port
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    timeout = dt.timedelta(seconds=devices.distributed.timeout)
    store = _attempt_store(timeout)
    if store is None:
        dist.init_process_group(backend=backend, timeout=timeout)
    else:
        dist.init_process_group(backend=backend, timeout=timeout, store=store,
                                rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local)
    return World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=local, initialised=True,
                 group=_checkpoint_group())


def _attempt_store(timeout: dt.timedelta) -> Any:
    """The store this attempt's process groups meet in, when torchrun shares its agent's store
    with the workers (``TORCHELASTIC_USE_AGENT_STORE=True``: the default of its c10d rendezvous,
    ``--standalone`` included); ``None`` otherwise (``env://`` as usual).

    That store outlives the workers: after a restart (``--max-restarts``), the new workers would
    find the keys the previous attempt's process groups wrote (peers' addresses), connect to
    dead ports and fail again (pytorch/pytorch#135712). Each attempt gets keys of its own,
    under ``TORCHELASTIC_RESTART_COUNT``. That count is each node's agent's own: for several
    nodes, ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (docs/distributed.md, "Elastic restarts")."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    if os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE")) != os.environ.get("WORLD_SIZE"):
        if os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") != "0":  # several nodes: counts differ
            logging.getLogger("wmtp").warning(
                "torchrun shares its store with the workers of this multi-node job: a restart will "
                "find the previous attempt's keys there; launch with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "
                "(docs/distributed.md, \"Elastic restarts\")")
        return None
    shared = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                           timeout=timeout)
    return dist.PrefixStore(f"wmtp/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", shared)


_GROUP: Any = None


def _checkpoint_group() -> Any:
    global _GROUP
    if _GROUP is None:
        _GROUP = dist.new_group(backend="gloo")  # every rank calls this, in the same order
    return _GROUP


def shard(model: torch.nn.Module, fsdp: Any) -> torch.nn.Module:
    """FSDP2: each transformer block its own unit when ``auto_wrap: block`` (the byte-level
    model's trunk and heads; a Hugging Face model's decoder layers and extra heads), then the
    root (embeddings, final norm, LM head); critic-wmtp's value head is a unit of its own.
    ``offload_params`` or ``offload_grads`` keeps the
    shards on the CPU between uses (FSDP2 offloads parameters and their gradients together)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard, register_fsdp_forward_method

    offload = fsdp.offload_params or fsdp.offload_grads
    kwargs = {"reshard_after_forward": fsdp.sharding == "full_shard",
              "offload_policy": CPUOffloadPolicy() if offload else OffloadPolicy()}
    if fsdp.auto_wrap == "block":
        blocks = model.blocks() if hasattr(model, "blocks") else [*model.trunk, *model.heads]
        for block in blocks:
            fully_shard(block, **kwargs)
    value_head = getattr(model, "value_head", None)
    if value_head is not None:  # critic-wmtp's, called on its own: always its own unit
        fully_shard(value_head, **kwargs)
    fully_shard(model, **kwargs)
    # the algorithms call these as well as forward: each gathers the root's parameters too
    for method in ("hidden", "logits_and_hidden", "next_token_logits"):
        if hasattr(model, method):
            register_fsdp_forward_method(model, method)
    return model


def sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Model and optimizer state keyed by parameter names, as shards (DTensors) under FSDP."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    return {"model": msd, "optimizer": osd}


def load_sharded(model: torch.nn.Module, optimizer: torch.optim.Optimizer, reader: Any) -> None:
    """Load a DCP checkpoint into this world's shards, whatever world size wrote it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = sharded_state(model, optimizer)
    dcp.load(state, storage_reader=reader)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) weights on CPU; a collective: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    if not dist.is_initialized():
        return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
