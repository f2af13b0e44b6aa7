"""From configuration to role bindings: explicit ``storage:`` or implied by paths and mlflow.

Each binding carries everything its sink is built with (options and base path), so the router
builds every sink from its binding alone."""

from __future__ import annotations

import fsspec.core

from wmtp_core.bindings import Bindings, PolicyBinding, SinkBinding
from wmtp_core.catalog import Catalog
from wmtp_core.config import Settings
from wmtp_core.errors import BindingError
from wmtp_core.roles import Role


def protocol_of(url: str) -> str:
    protocol, _ = fsspec.core.split_protocol(url)
    return protocol or "file"


def resume_base(settings: Settings) -> str:
    st = settings.config.storage
    if st is not None and st.resume is not None and st.resume.base_path:
        return st.resume.base_path
    return settings.config.paths.checkpoints.base_path


def base_path_for(role: Role, settings: Settings) -> str:
    """``storage.<role>.base_path``, else the resume base path (``storage.resume.base_path`` or
    ``paths.checkpoints.base_path``)."""
    st = settings.config.storage
    role_cfg = getattr(st, role.value, None) if st is not None else None
    if role_cfg is not None and role_cfg.base_path:
        return role_cfg.base_path
    return resume_base(settings)


def required_roles(settings: Settings) -> frozenset[Role]:
    ck = settings.config.paths.checkpoints
    roles = {Role.RESUME}
    if ck.save_final:
        roles.add(Role.FINAL)
    return frozenset(roles)


def bindings_for(settings: Settings, catalog: Catalog) -> Bindings:
    """The run's bindings. Explicit ``storage.<role>`` wins; otherwise resume follows the base
    path's protocol and final goes to the MLflow registry when ``mlflow`` is configured."""
    cfg = settings.config
    st = cfg.storage
    src = settings.config_source
    sinks: list[SinkBinding] = []
    roles = required_roles(settings)
    for role in (Role.RESUME, Role.FINAL):
        explicit = getattr(st, role.value, None) if st is not None else None
        if explicit is not None:
            sinks.append(SinkBinding(role=role, sink=explicit.sink, options=dict(explicit.options),
                                     origin=f"{src}: storage.{role.value}.sink",
                                     base_path=base_path_for(role, settings)))
        elif role in roles:
            sinks.append(_implied(role, settings, catalog))
    if st is not None and st.policies is not None:
        policies = [
            PolicyBinding(role=p.role, policy=p.policy, options=p.options,
                          origin=f"{src}: storage.policies[{i}]")
            for i, p in enumerate(st.policies)
        ]
    else:
        ck = cfg.paths.checkpoints
        options = {"keep_last": ck.keep_last, "keep_every": ck.keep_every}
        if ck.keep_best is not None:
            options["keep_best"] = {"k": ck.keep_best.k, "monitor": ck.keep_best.monitor, "mode": ck.keep_best.mode}
        policies = [PolicyBinding(role=Role.RESUME, policy="keep_last", options=options,
                                  origin=f"{src}: paths.checkpoints.keep_last")]
    return Bindings(sinks=sinks, policies=policies)


def _implied(role: Role, settings: Settings, catalog: Catalog) -> SinkBinding:
    src = settings.config_source
    if role is Role.RESUME:
        base = resume_base(settings)
        protocol = protocol_of(base)
        spec = catalog.sink_for_protocol(protocol)
        if spec is None:
            raise BindingError(
                f"{src}: paths.checkpoints.base_path: {base!r} uses protocol {protocol!r}, which no "
                f"installed sink serves; installed sinks: {catalog.describe_sinks()}. Install a "
                "plugin for it or set storage.resume.sink"
            )
        return SinkBinding(role=role, sink=spec.name, origin=f"{src}: paths.checkpoints.base_path",
                           base_path=base)
    base = base_path_for(role, settings)
    if settings.config.mlflow is not None:  # a model registry: the sink that declares itself one
        spec = next((s for s in catalog.sinks.values() if s.registry and Role.FINAL in s.roles), None)
        if spec is None:
            raise BindingError(f"{src}: mlflow: the final model goes to a model registry, but no installed "
                               f"sink is one; installed sinks: {catalog.describe_sinks()}. Set "
                               "storage.final.sink, or remove the mlflow section")
        return SinkBinding(role=role, sink=spec.name, origin=f"{src}: mlflow (save_final: true)", base_path=base)
    # no registry: files beside the resume state, else on local disk
    for protocol in (protocol_of(resume_base(settings)), "file"):
        spec = catalog.sink_for_protocol(protocol, Role.FINAL)
        if spec is not None:
            return SinkBinding(role=role, sink=spec.name, origin=f"{src}: paths.checkpoints.save_final (no mlflow)",
                               base_path=base)
    raise BindingError(f"{src}: paths.checkpoints.save_final: no installed sink stores a final model as files; "
                       f"installed sinks: {catalog.describe_sinks()}. Set storage.final.sink")
