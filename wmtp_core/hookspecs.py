"""Every hook WMTP calls, typed and documented.

Plugins implement these with ``@wmtp_core.hookimpl``. WMTP always calls hooks with keyword
arguments. Checkpoint bytes never travel through a hook: the router hands them to the one sink
bound to the role, and the hooks below only describe what happened.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping

import pluggy

if TYPE_CHECKING:
    from wmtp_core.catalog import PolicySpec, SinkSpec
    from wmtp_core.events import (
        CheckpointEmitted,
        CheckpointEvaluated,
        LoadedModel,
        Receipt,
        RunEnded,
        RunStarted,
        StepEnded,
    )

hookspec = pluggy.HookspecMarker("wmtp")
hookimpl = pluggy.HookimplMarker("wmtp")


@hookspec
def wmtp_register_sinks(register: Callable[[SinkSpec], None]) -> None:
    """Contribute checkpoint sinks.

    Call ``register(SinkSpec(...))`` once per sink. The spec names the sink, the roles it can
    serve and a factory that builds it for a run. Names must be unique across all plugins.

    :param register: callback that validates and records one :class:`~wmtp_core.catalog.SinkSpec`.
    """


@hookspec
def wmtp_register_policies(register: Callable[[PolicySpec], None]) -> None:
    """Contribute retention policies.

    Call ``register(PolicySpec(...))`` once per policy. At most one policy may be bound to a role.

    :param register: callback that validates and records one :class:`~wmtp_core.catalog.PolicySpec`.
    """


@hookspec(firstresult=True)
def wmtp_load_model(uri: str, mlflow_config: Mapping[str, Any]) -> LoadedModel | None:
    """Load trained weights named by a URI (a reference or reward model, a model to register).

    Implement it for the URIs your plugin understands and return ``None`` for the others.
    Stops at the first non-None result. Committed checkpoint URIs are handled by the core when
    no plugin answers.

    :param uri: e.g. ``models:/wmtp_baseline-mtp/1`` or a committed checkpoint's URI.
    :param mlflow_config: the ``mlflow`` config section, for plugins that read a registry.
    :returns: the weights and the architecture, or ``None``.
    """


@hookspec
def wmtp_check_config(config: Mapping[str, Any]) -> None:
    """A run is being planned, for real or under ``--dry-run``: refuse a configuration this
    plugin could not work with, before anything is written.

    Raise a :class:`wmtp_core.ConfigError` (or another ``WmtpError``) naming the key, the value
    and what would work; the run and the dry run then stop with the same message and exit
    status 2. Look only at the configuration: no network, no files.

    :param config: the config file's settings as plain data (``paths``, ``mlflow``, ``devices``,
        ``storage``...; ``mlflow`` is ``None`` when the section is null).
    """


@hookspec
def wmtp_run_started(event: RunStarted) -> None:
    """A run passed validation and is about to take its first step.

    :param event: the run's identity, its flattened configuration and the role bindings.
    """


@hookspec
def wmtp_step_ended(event: StepEnded) -> None:
    """One optimisation step finished.

    :param event: the step number and its metrics (loss, per-head CE, learning rate, ...).
    """


@hookspec
def wmtp_resume_checkpoint_emitted(event: CheckpointEmitted) -> None:
    """The engine emitted resume state; the router is about to hand it to the resume sink.

    Observers see what is being stored (step, parts, estimated bytes), never the bytes.

    :param event: the emitted checkpoint, with ``role`` equal to ``Role.RESUME``.
    """


@hookspec
def wmtp_final_model_emitted(event: CheckpointEmitted) -> None:
    """The engine emitted the final model; the router is about to hand it to the final sink.

    :param event: the emitted model, with ``role`` equal to ``Role.FINAL``.
    """


@hookspec
def wmtp_checkpoint_committed(receipt: Receipt) -> None:
    """A sink committed a checkpoint: its manifest (or registry version) exists.

    :param receipt: where it landed, how many bytes, how long the store took.
    """


@hookspec
def wmtp_checkpoint_deleted(receipt: Receipt) -> None:
    """A retention policy removed a committed checkpoint.

    :param receipt: the receipt of the checkpoint that no longer exists.
    """


@hookspec
def wmtp_checkpoint_evaluated(event: CheckpointEvaluated) -> None:
    """A checkpoint or model was evaluated on code tasks, or its evaluation failed.

    Called on the training process (rank 0) once its background evaluation reports, and by
    ``wmtp evaluate`` with a config. The tracking plugin logs the metrics at ``event.step`` to
    the lineage's MLflow run; the registry plugin tags a ``models:/`` version with them.

    :param event: what was evaluated, at which step, and its ``eval/<task>/pass_at_<k>``.
    """


@hookspec
def wmtp_run_ended(event: RunEnded) -> None:
    """The run finished, stopped early or failed; every receipt is known.

    :param event: the outcome, the final metrics and every receipt of the run.
    """
