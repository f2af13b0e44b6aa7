"""One coordinator: how the processes of one job agree, as storage sees them.

A sink never talks to ``torch.distributed``: the engine hands it a :class:`Coordinator` in its
:class:`~wmtp_core.events.SinkContext` (``context.coordinator``), and the resume service and the
router take the same one. A process that runs alone has :data:`ALONE`.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import attrs


@runtime_checkable
class Coordinator(Protocol):
    """The processes of one job, as storage needs them: who is main, and three collectives.
    Every rank calls each collective, in the same order."""

    rank: int
    size: int

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that commits manifests, prunes and talks to observers."""
        ...

    @property
    def group(self) -> Any:
        """An opaque handle a sharded writer passes on to ``torch.distributed.checkpoint``
        (``process_group=``); ``None`` alone."""
        ...

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        ...

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        ...

    def barrier(self) -> None:
        """Return once every rank got here."""
        ...


@attrs.frozen
class Alone:
    """The coordinator of a process that runs alone: it is main and agrees with itself."""

    rank: int = 0
    size: int = 1
    group: Any = None

    @property
    def is_main(self) -> bool:
        return True

    def broadcast(self, obj: Any) -> Any:
        return obj

    def gather(self, obj: Any) -> list[Any]:
        return [obj]

    def barrier(self) -> None:
        return None


ALONE = Alone()
"""The coordinator of every process that is not part of a distributed job."""
