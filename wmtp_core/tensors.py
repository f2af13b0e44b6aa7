"""Tensor trees: what storage and the engine share about nested state (no training, no I/O)."""

from __future__ import annotations

from typing import Any, Mapping


def tensor_bytes(obj: Any, *, storages: bool = False) -> int:
    """Bytes of the tensors in a nested structure: their elements, or (``storages``) what
    ``torch.save`` writes for them, each storage once and whole (tied weights and views share
    one), a lower bound of the files' size: what a save needs on disk at least."""
    import torch

    sizes: dict[Any, int] = {}
    elements = [0]

    def visit(o: Any) -> None:
        if isinstance(o, torch.Tensor):
            if not storages:
                elements[0] += o.numel() * o.element_size()
                return
            try:
                storage = o.untyped_storage()
                key, size = ("storage", storage.data_ptr(), o.device), storage.nbytes()
            except (RuntimeError, NotImplementedError):  # a tensor without plain storage
                key, size = ("tensor", id(o)), o.numel() * o.element_size()
            sizes[key] = max(sizes.get(key, 0), size)
        elif isinstance(o, Mapping):
            for v in o.values():
                visit(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                visit(v)

    visit(obj)
    return elements[0] + sum(sizes.values())


def cpu_copy(obj: Any) -> Any:
    """A detached CPU copy of every tensor (the model's final weights for the final role)."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, Mapping):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v) for v in obj)
    return obj


class StagingBuffers:
    """Copies a tree of tensors into CPU buffers it keeps between calls: the one short pause of
    an asynchronous save. Reusing the buffers avoids allocating (and faulting in) fresh memory
    each time; it is safe because the caller never restages while a copy is still being read.
    A sharded tensor (DTensor) keeps its layout: its local shard is copied."""

    def __init__(self) -> None:
        self._buffers: dict[str, Any] = {}

    def copy(self, tree: Mapping[str, Any]) -> dict[str, Any]:
        import torch
        from torch.distributed.tensor import DTensor

        def copy(obj: Any, key: str) -> Any:
            if isinstance(obj, DTensor):
                local = copy(obj.to_local(), key)
                return DTensor.from_local(local, obj.device_mesh, obj.placements, run_check=False,
                                          shape=obj.shape, stride=obj.stride())
            if isinstance(obj, torch.Tensor):
                buf = self._buffers.get(key)
                if buf is None or buf.shape != obj.shape or buf.dtype != obj.dtype or buf.device.type != "cpu":
                    buf = torch.empty(obj.shape, dtype=obj.dtype, device="cpu",
                                      pin_memory=obj.is_cuda and torch.cuda.is_available())
                    self._buffers[key] = buf
                buf.copy_(obj.detach(), non_blocking=obj.is_cuda)
                return buf
            if isinstance(obj, Mapping):
                return {k: copy(v, f"{key}/{k}") for k, v in obj.items()}
            if isinstance(obj, (list, tuple)):
                return type(obj)(copy(v, f"{key}/{i}") for i, v in enumerate(obj))
            return obj  # numbers and strings are immutable

        out = {name: copy(obj, name) for name, obj in tree.items()}
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return out


def is_tensor(obj: Any) -> bool:
    """Whether ``obj`` is a torch tensor (torch is imported only when something could be one)."""
    if type(obj).__module__.split(".")[0] != "torch":
        return False
    import torch

    return isinstance(obj, torch.Tensor)
