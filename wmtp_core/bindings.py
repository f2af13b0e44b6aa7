"""Bindings: which sink serves each role and which policy prunes it, checked before training.

Nothing here stores bytes. :mod:`wmtp_core.router` enforces the bindings at run time.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

import attrs

from wmtp_core.base_paths import check_base_path
from wmtp_core.catalog import Catalog
from wmtp_core.errors import BindingError, ConfigError
from wmtp_core.roles import Role
from wmtp_core.validators import frozen_copy


@attrs.frozen
class SinkBinding:
    """One role bound to one sink, with everything the sink is built with."""

    role: Role = attrs.field(converter=Role)
    sink: str
    options: Mapping[str, Any] = attrs.field(factory=dict, converter=frozen_copy, hash=False)
    """Sink options (for file-like sinks: fsspec storage options)."""
    origin: str = "storage"
    """Where the binding came from (a config key), so errors can point at it."""
    base_path: str = ""
    """Where a file-like sink keeps the role's checkpoints (``<base_path>/<run>/...``)."""


@attrs.frozen
class PolicyBinding:
    """One role pruned by one policy."""

    role: Role = attrs.field(converter=Role)
    policy: str
    options: Mapping[str, Any] = attrs.field(factory=dict, converter=frozen_copy, hash=False)
    origin: str = "storage.policies"


@attrs.frozen
class Bindings:
    """The run's complete storage plan: which sink serves each role, which policy prunes it."""

    sinks: tuple[SinkBinding, ...] = attrs.field(converter=tuple)
    policies: tuple[PolicyBinding, ...] = attrs.field(converter=tuple, default=())
    checked_for: frozenset[Role] | None = attrs.field(default=None, eq=False)
    """The roles :func:`validate` checked these bindings for (``None``: not checked): a plan
    validates once, and the router built from it does not check again."""

    def sink_for(self, role: Role) -> SinkBinding | None:
        return next((b for b in self.sinks if b.role is role), None)

    def policy_for(self, role: Role) -> PolicyBinding | None:
        return next((p for p in self.policies if p.role is role), None)


def validate(bindings: Bindings, catalog: Catalog, required: frozenset[Role]) -> Bindings:
    """Refuse any plan that could store a checkpoint twice, nowhere, or in the wrong place;
    return the bindings marked as checked for ``required``.

    :param required: the roles this run will emit; each needs exactly one sink.
    """
    seen = _check_sinks(bindings, catalog)
    _check_required(seen, catalog, required)
    _check_policies(bindings, catalog, seen)
    return attrs.evolve(bindings, checked_for=frozenset(required))


def _check_sinks(bindings: Bindings, catalog: Catalog) -> dict[Role, SinkBinding]:
    """Each role bound once, to an installed sink that serves it and accepts its binding (the
    spec's own ``check``); returns the binding of each bound role."""
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
        if spec.protocols and b.base_path:  # a file-like sink: a place that can hold directories
            check_base_path(b.base_path, f"{b.origin}: the {b.role.value} base path")
        if spec.check is not None:
            spec.check(b)
    return seen


def _check_required(seen: Mapping[Role, SinkBinding], catalog: Catalog, required: frozenset[Role]) -> None:
    """Every role the run emits has a sink."""
    for role in sorted(required, key=lambda r: r.value):
        if role not in seen:
            able = sorted(s.name for s in catalog.sinks.values() if role in s.roles)
            raise BindingError(
                f"role {role.value!r} has no sink but this run emits it; bind one with "
                f"storage.{role.value}.sink (sinks that serve it: {', '.join(able) or 'none installed'})"
            )


def _check_policies(bindings: Bindings, catalog: Catalog, seen: Mapping[Role, SinkBinding]) -> None:
    """At most one installed policy per role, one that applies to the role, and only to a role
    that has a sink."""
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


def build_sink(catalog: Catalog, bindings: Bindings, role: Role, run: Any,
               mlflow: Mapping[str, Any] | None = None, *, coordinator: Any = None) -> Any:
    """The sink bound to ``role``, built from its binding outside any router: for reading what a
    run committed before the run's own router exists (its resume point), and for the ``wmtp``
    command. The router builds its sinks the same way."""
    from wmtp_core.coordination import ALONE
    from wmtp_core.events import SinkContext
    from wmtp_core.sinks import ResumableSink, Sink

    b = bindings.sink_for(role)
    sink = catalog.sinks[b.sink].factory(SinkContext(role=role, run=run, base_path=b.base_path,
                                                     options=copy.deepcopy(dict(b.options)),
                                                     mlflow=dict(mlflow or {}),
                                                     coordinator=coordinator or ALONE))
    base = ResumableSink if role is Role.RESUME else Sink
    if not isinstance(sink, base):
        raise BindingError(f"{b.origin}: sink {b.sink!r} built a {type(sink).__name__}, which is not a "
                           f"wmtp_core.{base.__name__}; a sink subclasses {base.__name__} (which declares "
                           "every operation and its default, see docs/plugins.md)")
    return sink


def build_policies(bindings: Bindings, catalog: Catalog) -> dict[Role, Any]:
    """Build each bound policy now, so bad options fail before training (and in --dry-run).
    A policy factory refuses bad options with ``ValueError`` or ``TypeError`` (documented for
    plugin authors); they become a configuration error naming the binding."""
    out = {}
    for p in bindings.policies:
        try:
            out[p.role] = catalog.policies[p.policy].factory(copy.deepcopy(dict(p.options)))
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{p.origin}: policy {p.policy!r}: {e}") from None
    return out
