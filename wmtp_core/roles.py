"""Roles: what a stored checkpoint is for. Every stored checkpoint has exactly one."""

from __future__ import annotations

import enum
from typing import Any

from wmtp_core.errors import BindingError


class Role(str, enum.Enum):
    """What a stored checkpoint is for."""

    RESUME = "resume"
    """Everything needed to continue an interrupted run. Written often, pruned by retention."""
    FINAL = "final"
    """The trained weights people evaluate and deploy. Written once, kept."""

    def __str__(self) -> str:
        return self.value


ROLE_NAMES = tuple(r.value for r in Role)


def parse_role(value: Any, where: str = "role") -> Role:
    """``value`` as a Role, or a :class:`BindingError` naming ``where`` and the roles there are."""
    try:
        return Role(value)
    except ValueError:
        raise BindingError(
            f"{where}: {value!r} is not a role; accepted: {', '.join(ROLE_NAMES)}"
        ) from None
