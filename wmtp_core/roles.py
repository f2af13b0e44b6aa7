"""Roles, the specs plugins register, and the bindings that tie each role to one sink.

Nothing here stores bytes. :mod:`wmtp_core.router` enforces the bindings at run time.
"""

from __future__ import annotations

import enum
import re
import types
from typing import Any, Callable, Mapping

import attrs


class Role(str, enum.Enum):
    """What a stored checkpoint is for."""

    RESUME = "resume"
    """Everything needed to continue an interrupted run. Written often, pruned by retention."""
    FINAL = "final"
    """The trained weights people evaluate and deploy. Written once, kept."""

    def __str__(self) -> str:
        return self.value


ROLE_NAMES = tuple(r.value for r in Role)
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")


class BindingError(ValueError):
    """A role binding that cannot work. Raised before the first training step."""


def parse_role(value: Any, where: str = "role") -> Role:
    try:
        return Role(value)
    except ValueError:
        raise BindingError(
            f"{where}: {value!r} is not a role; accepted: {', '.join(ROLE_NAMES)}"
        ) from None


def _roles(value: Any) -> frozenset[Role]:
    return frozenset(parse_role(v, "roles") for v in value)


def _check_name(instance: Any, attribute: attrs.Attribute, value: str) -> None:
    if not isinstance(value, str) or not _NAME.match(value):
        raise BindingError(
            f"{attribute.name}: {value!r} is not a valid plugin name "
            "(a letter, then letters, digits, '_', '.' or '-'; at most 64 characters)"
        )


def _check_roles(instance: Any, attribute: attrs.Attribute, value: frozenset) -> None:
    if not value:
        raise BindingError(f"{instance.name}: a sink or policy must declare at least one role")


@attrs.frozen
class SinkSpec:
    """A sink a plugin offers. Registered through ``wmtp_register_sinks``."""

    name: str = attrs.field(validator=_check_name)
    """Unique name used in configuration (``storage.resume.sink: NAME``)."""
    roles: frozenset[Role] = attrs.field(converter=_roles, validator=_check_roles)
    """The roles this sink can serve. Binding it to any other role is refused."""
    factory: Callable[..., Any] = attrs.field(hash=False, eq=False)
    """Called with a :class:`wmtp_core.events.SinkContext`; returns the sink object."""
    protocols: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    """fsspec protocols this sink serves when ``base_path`` picks the resume sink implicitly."""
    description: str = ""
    """One line shown by ``--dry-run`` and ``wmtp plugins``."""


@attrs.frozen
class PolicySpec:
    """A retention policy a plugin offers. Registered through ``wmtp_register_policies``."""

    name: str = attrs.field(validator=_check_name)
    """Unique name used in configuration (``storage.policies[].policy``)."""
    roles: frozenset[Role] = attrs.field(converter=_roles, validator=_check_roles)
    """The roles whose checkpoints this policy may prune."""
    factory: Callable[..., Any] = attrs.field(hash=False, eq=False)
    """Called with the policy's options mapping; returns an object with ``select(...)``."""
    description: str = ""


@attrs.frozen
class SinkBinding:
    """One role bound to one sink, with the options the sink is built with."""

    role: Role = attrs.field(converter=Role)
    sink: str
    options: Mapping[str, Any] = attrs.field(factory=dict, converter=types.MappingProxyType,
                                             hash=False)
    origin: str = "storage"
    """Where the binding came from (a config key), so errors can point at it."""


@attrs.frozen
class PolicyBinding:
    """One role pruned by one policy."""

    role: Role = attrs.field(converter=Role)
    policy: str
    options: Mapping[str, Any] = attrs.field(factory=dict, converter=types.MappingProxyType,
                                             hash=False)
    origin: str = "storage.policies"


@attrs.frozen
class Bindings:
    """The run's complete storage plan: which sink serves each role, which policy prunes it."""

    sinks: tuple[SinkBinding, ...] = attrs.field(converter=tuple)
    policies: tuple[PolicyBinding, ...] = attrs.field(converter=tuple, default=())

    def sink_for(self, role: Role) -> SinkBinding | None:
        return next((b for b in self.sinks if b.role is role), None)

    def policy_for(self, role: Role) -> PolicyBinding | None:
        return next((p for p in self.policies if p.role is role), None)


class Catalog:
    """Every sink and policy the installed plugins registered, by name. Read-only views."""

    def __init__(self) -> None:
        self._sinks: dict[str, SinkSpec] = {}
        self._policies: dict[str, PolicySpec] = {}
        self.sinks: Mapping[str, SinkSpec] = types.MappingProxyType(self._sinks)
        self.policies: Mapping[str, PolicySpec] = types.MappingProxyType(self._policies)

    def add_sink(self, spec: SinkSpec) -> None:
        if not isinstance(spec, SinkSpec):
            raise BindingError(f"register() expects a SinkSpec, got {type(spec).__name__}")
        if spec.name in self._sinks:
            raise BindingError(f"two plugins register a sink named {spec.name!r}; names must be unique")
        self._sinks[spec.name] = spec

    def add_policy(self, spec: PolicySpec) -> None:
        if not isinstance(spec, PolicySpec):
            raise BindingError(f"register() expects a PolicySpec, got {type(spec).__name__}")
        if spec.name in self._policies:
            raise BindingError(f"two plugins register a policy named {spec.name!r}; names must be unique")
        self._policies[spec.name] = spec

    def sink_for_protocol(self, protocol: str) -> SinkSpec | None:
        return next((s for s in self._sinks.values() if protocol in s.protocols), None)

    def describe_sinks(self) -> str:
        if not self._sinks:
            return "no sinks are installed"
        return "; ".join(
            f"{s.name} ({', '.join(sorted(r.value for r in s.roles))})"
            for s in sorted(self._sinks.values(), key=lambda s: s.name)
        )


def validate(bindings: Bindings, catalog: Catalog, required: frozenset[Role]) -> None:
    """Refuse any plan that could store a checkpoint twice, nowhere, or in the wrong place.

    :param required: the roles this run will emit; each needs exactly one sink.
    """
    installed = catalog.describe_sinks()
    seen: dict[Role, SinkBinding] = {}
    for b in bindings.sinks:
        if b.role in seen:
            raise BindingError(
                f"role {b.role.value!r} is bound twice ({seen[b.role].origin}: "
                f"{seen[b.role].sink!r} and {b.origin}: {b.sink!r}); bind each role to exactly "
                "one sink"
            )
        seen[b.role] = b
        spec = catalog.sinks.get(b.sink)
        if spec is None:
            raise BindingError(
                f"{b.origin}: sink {b.sink!r} for role {b.role.value!r} is not installed; "
                f"installed sinks: {installed}. Install the plugin that provides it or bind "
                "one of these"
            )
        if b.role not in spec.roles:
            able = [s.name for s in catalog.sinks.values() if b.role in s.roles]
            raise BindingError(
                f"{b.origin}: sink {b.sink!r} does not serve role {b.role.value!r} (it declares "
                f"{', '.join(sorted(r.value for r in spec.roles))}); sinks that serve "
                f"{b.role.value!r}: {', '.join(sorted(able)) or 'none installed'}"
            )
    for role in sorted(required, key=lambda r: r.value):
        if role not in seen:
            able = sorted(s.name for s in catalog.sinks.values() if role in s.roles)
            raise BindingError(
                f"role {role.value!r} has no sink but this run emits it; bind one with "
                f"storage.{role.value}.sink (sinks that serve it: {', '.join(able) or 'none installed'})"
            )
    policed: dict[Role, PolicyBinding] = {}
    for p in bindings.policies:
        if p.role in policed:
            raise BindingError(
                f"{p.origin}: two policies for role {p.role.value!r} "
                f"({policed[p.role].policy!r} and {p.policy!r}); at most one policy may prune a role"
            )
        policed[p.role] = p
        spec = catalog.policies.get(p.policy)
        if spec is None:
            raise BindingError(
                f"{p.origin}: policy {p.policy!r} is not installed; installed policies: "
                f"{', '.join(sorted(catalog.policies)) or 'none'}"
            )
        if p.role not in spec.roles:
            raise BindingError(
                f"{p.origin}: policy {p.policy!r} does not apply to role {p.role.value!r} "
                f"(it declares {', '.join(sorted(r.value for r in spec.roles))})"
            )
        if p.role not in seen:
            raise BindingError(
                f"{p.origin}: policy {p.policy!r} prunes role {p.role.value!r}, which has no sink"
            )
