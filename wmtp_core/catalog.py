"""The catalog: every sink and policy the installed plugins registered, checked and named."""

from __future__ import annotations

import re
import types
from typing import Any, Callable, Mapping

import attrs

from wmtp_core.errors import BindingError
from wmtp_core.roles import Role, parse_role
from wmtp_core.validators import full_match

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")
_check_name = full_match(_NAME, "a plugin name is a letter, then letters, digits, '_', '.' or "
                         "'-'; at most 64 characters", BindingError)


def _name(instance: Any, attribute: attrs.Attribute, value: str) -> None:
    try:
        _check_name(instance, attribute, value)
    except BindingError as e:
        raise BindingError(f"{attribute.name}: {value!r} is not a valid plugin name ({e})") from None


def _roles(value: Any) -> frozenset[Role]:
    return frozenset(parse_role(v, "roles") for v in value)


def _some_roles(instance: Any, attribute: attrs.Attribute, value: frozenset) -> None:
    if not value:
        raise BindingError(f"{instance.name}: a sink or policy must declare at least one role")


@attrs.frozen
class SinkSpec:
    """A sink a plugin offers. Registered through ``wmtp_register_sinks``."""

    name: str = attrs.field(validator=_name)
    """Unique name used in configuration (``storage.resume.sink: NAME``)."""
    roles: frozenset[Role] = attrs.field(converter=_roles, validator=_some_roles)
    """The roles this sink can serve. Binding it to any other role is refused."""
    factory: Callable[..., Any] = attrs.field(hash=False, eq=False)
    """Called with a :class:`wmtp_core.events.SinkContext`; returns the sink object
    (:class:`wmtp_core.sinks.Sink`)."""
    protocols: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    """fsspec protocols this sink serves when ``base_path`` picks the resume sink implicitly."""
    description: str = ""
    """One line shown by ``--dry-run`` and ``wmtp plugins``."""
    registry: bool = False
    """A model registry: with an ``mlflow`` section and no ``storage.final``, the final model
    goes to the sink that declares itself one."""
    check: Callable[..., None] | None = attrs.field(default=None, hash=False, eq=False)
    """Optional: called with a :class:`~wmtp_core.bindings.SinkBinding` before anything is built
    (also under ``--dry-run``); raises :class:`~wmtp_core.errors.BindingError` for a binding the
    sink cannot serve (a base path of another protocol, say). Look only at the binding: no I/O."""
    store: type | None = attrs.field(default=None, hash=False, eq=False)
    """Optional, for a file-like sink: the :class:`~wmtp_core.commit.CheckpointStore` subclass
    for its ``protocols``, whose hooks do what differs on them (incomplete uploads, conditional
    writes). Commands and sinks that open a URL of those protocols use it
    (:func:`wmtp_core.commit.store_class`); ``None``: ``CheckpointStore`` itself."""


@attrs.frozen
class PolicySpec:
    """A retention policy a plugin offers. Registered through ``wmtp_register_policies``."""

    name: str = attrs.field(validator=_name)
    """Unique name used in configuration (``storage.policies[].policy``)."""
    roles: frozenset[Role] = attrs.field(converter=_roles, validator=_some_roles)
    """The roles whose checkpoints this policy may prune."""
    factory: Callable[..., Any] = attrs.field(hash=False, eq=False)
    """Called with the policy's options mapping; returns an object with ``select(manifests)``."""
    description: str = ""


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

    def sink_for_protocol(self, protocol: str, role: Role | None = None) -> SinkSpec | None:
        """The sink that declares ``protocol`` (and serves ``role``, when given)."""
        return next((s for s in self._sinks.values()
                     if protocol in s.protocols and (role is None or role in s.roles)), None)

    def store_for_protocol(self, protocol: str) -> type | None:
        """The store class a sink serving ``protocol`` registered (``SinkSpec.store``), if any."""
        return next((s.store for s in self._sinks.values() if protocol in s.protocols and s.store is not None),
                    None)

    def describe_sinks(self) -> str:
        if not self._sinks:
            return "no sinks are installed"
        return "; ".join(
            f"{s.name} ({', '.join(sorted(r.value for r in s.roles))})"
            for s in sorted(self._sinks.values(), key=lambda s: s.name)
        )
