"""Preflight: everything a run is, decided and checked before anything is written.

:func:`preflight` turns the command line and the two YAML files into a frozen :class:`Plan`:
settings, the plugin catalog, the role bindings and built policies, the run name and tags, the
model architecture and its size, the device and precision, and the data sources. ``--dry-run``
prints that plan; a real run executes that same plan (:mod:`wmtp_core.session`).
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Mapping

import attrs
import pluggy

from wmtp_core import evaluating, report
from wmtp_core.bindings import Bindings, build_policies, validate
from wmtp_core.catalog import Catalog
from wmtp_core.commit import check_run_name
from wmtp_core.config import Settings, load_settings
from wmtp_core.config.routing import bindings_for, required_roles
from wmtp_core.errors import ConfigError, ModelLoadError, WmtpError, first_line
from wmtp_core.plugins import build_catalog
from wmtp_core.roles import Role
from wmtp_core.validators import frozen_copy


@attrs.frozen
class Plan:
    """One run, fully decided. Nothing is written while a plan is made."""

    settings: Settings
    catalog: Catalog = attrs.field(eq=False)
    bindings: Bindings
    required: frozenset[Role]
    """The roles this run emits; each is bound to exactly one sink."""
    policies: Mapping[Role, Any] = attrs.field(converter=dict, eq=False)
    """Each bound retention policy, built (bad options fail here, under --dry-run too)."""
    run_name: str
    tags: Mapping[str, str] = attrs.field(converter=frozen_copy)
    models: Mapping[str, str] = attrs.field(converter=frozen_copy)
    """What each model of the run is (``model`` or ``paths.models.base``, and the reference or
    reward model), read from listings and configs, none loaded."""
    parameters: int | None
    """Parameters of the model being trained, counted on the meta device (``None``: a registered
    base model, resolved when the run starts)."""
    device: str
    """Where it trains (``cpu``, ``cuda``, ``mps``)."""
    resume: str | None = None
    """``latest``, a checkpoint URI, or ``None`` for a new run."""
    mlflow: Mapping[str, Any] = attrs.field(factory=dict, converter=frozen_copy)
    """The ``mlflow`` section (empty when it is null)."""
    steps: Any = None
    """The steps the run takes and the limit that binds (a ``StepCount``) once :func:`count_steps`
    read the data (the dry run), or why only the run can count them; ``None`` before."""

    @property
    def estimate(self) -> report.Estimate:
        ck = self.settings.config.paths.checkpoints
        keeper = self.policies.get(Role.RESUME)
        final = self.settings.config.storage.final if self.settings.config.storage is not None else None
        known = self.steps is not None and not isinstance(self.steps, str)
        steps = self.steps.steps if known else self.settings.recipe.train.max_steps or 0
        return report.estimate(self.parameters or 0, steps,
                               ck.save_interval, getattr(keeper, "keep_last", 10**9),
                               getattr(keeper, "keep_every", 0), ck.save_final,
                               2 if final is not None and final.dtype != "fp32" else 4,
                               getattr(getattr(keeper, "keep_best", None), "k", 0))


def parse_tags(recipe_tags: list[str], cli: str | None) -> dict[str, str]:
    tags: dict[str, str] = {}
    for item in list(recipe_tags) + [t for t in (cli or "").split(",") if t.strip()]:
        name, _, value = item.strip().partition("=")
        if not name:
            raise ConfigError(f"--tags: {item!r} is not accepted; use NAME or NAME=VALUE")
        tags[name] = value or "true"
    return tags


def run_name_for(settings: Settings, cli: str | None) -> str:
    """``--run-name``, else ``run.name``, else ``<algo>-<YYYYmmdd-HHMMSS>``. An empty name is
    refused rather than silently replaced."""
    name, where = (cli, "--run-name") if cli is not None else (settings.recipe.run.name, "run.name")
    if name == "":
        raise ConfigError(f"{where}: '' is not accepted; give a name, or leave run.name null (and "
                          "--run-name out) for the default <algo>-<YYYYmmdd-HHMMSS>")
    if name is None:
        name = f"{settings.recipe.train.algo}-{dt.datetime.now():%Y%m%d-%H%M%S}"
    try:
        return check_run_name(name)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def preflight(pm: pluggy.PluginManager, *, config: str | None = None, recipe: str | None = None,
              run_name: str | None = None, tags: str | None = None,
              resume: str | None = None) -> Plan:
    """Load and check everything; raise a :class:`~wmtp_core.errors.WmtpError` for the first
    problem in the files, or for every problem with this machine and its storage (see
    :class:`Facts`). Loads no data (the dry run counts the steps afterwards: :func:`count_steps`),
    allocates no model, loads no reference model, writes nothing."""
    settings = load_settings(config, recipe)
    catalog = build_catalog(pm)
    bindings = bindings_for(settings, catalog)
    required = required_roles(settings)
    bindings = validate(bindings, catalog, required)
    _check_final_from(settings)
    evaluating.check(settings)
    policies = build_policies(bindings, catalog)
    name = run_name_for(settings, run_name)
    tag_map = parse_tags(settings.recipe.run.tags, tags)
    _check_architecture(settings)
    device, checked = _check_this_machine(pm, settings)
    mlflow = settings.mlflow
    return Plan(settings=settings, catalog=catalog, bindings=bindings, required=required,
                policies=policies, run_name=name, tags=tag_map, models=checked.descriptions,
                parameters=checked.parameters, device=device.type, resume=resume, mlflow=mlflow)


def _check_final_from(settings: Settings) -> None:
    """``storage.final.from: best`` needs ``paths.checkpoints.keep_best`` to rank by."""
    final = settings.config.storage.final if settings.config.storage is not None else None
    if final is not None and final.from_ == "best" and settings.config.paths.checkpoints.keep_best is None:
        raise ConfigError(f"{settings.config_source}: storage.final.from: 'best' needs paths.checkpoints.keep_best "
                          "(the metric that ranks the checkpoints), e.g. keep_best: {k: 1, monitor: eval_loss}")


def _check_architecture(settings: Settings) -> None:
    """The byte-level architecture (the recipe's ``model`` section) is consistent."""
    from wmtp_core.engine.parts import model_config

    try:
        if not settings.config.paths.models.base:
            model_config(settings)
    except (ValueError, ModelLoadError) as e:
        raise ConfigError(f"{settings.recipe_source}: {e}") from None


def _check_this_machine(pm: pluggy.PluginManager, settings: Settings) -> tuple[Any, Any]:
    """What this machine and its storage can do, every check run to the end (:class:`Facts`):
    the plugins' checks of the config, the device and precision, the algorithm, the models, the
    data. Returns ``(device, models.Checked)``, or raises every problem found."""
    from wmtp_core.config.loader import to_plain
    from wmtp_core.engine import distributed, models
    from wmtp_core.engine.parts import autocast_dtype, check_algorithm, choose_device

    devices = settings.config.devices
    facts = Facts()
    with facts:
        pm.hook.wmtp_check_config(config=to_plain(settings.config))
    device = None
    with facts:
        device = choose_device(devices.compute_backend)
        autocast_dtype(devices.mixed_precision, device)
        distributed.check(devices, device)
    with facts:
        check_algorithm(settings)
    checked = None
    with facts:
        checked = models.check(settings)
    _check_data(settings, checked, facts)
    facts.raise_any()
    return device, checked


def _check_data(settings: Settings, checked: Any, facts: Facts) -> None:
    """Each split's sources exist and hold that split; its rows fit the model's positions
    (``checked``: what the model check found, ``None`` when it failed)."""
    from wmtp_core.engine.parts import check_source

    for split in ("train", "eval"):
        data = getattr(settings.recipe.data, split)
        if data is None:
            continue
        for source in data.sources:
            with facts:
                check_source(settings, source, f"data.{split}.sources", split)
        if checked is not None and data.max_length > checked.max_positions:
            limit = ("model.max_seq_len" if not settings.config.paths.models.base
                     else "the positions of paths.models.base")
            with facts:
                raise ConfigError(
                    f"{settings.recipe_source}: data.{split}.max_length: {data.max_length} is not accepted; "
                    f"it must be <= {limit} ({checked.max_positions})"
                )


class Facts:
    """The checks of what this machine and its storage can do (devices, tracking store, models,
    data) each run to the end, so one dry run reports every problem, not only the first. Used as
    a context manager around each check; :meth:`raise_any` raises the one problem as it is, or
    all of them in one error."""

    def __init__(self) -> None:
        self.problems: list[WmtpError] = []

    def __enter__(self) -> Facts:
        return self

    def __exit__(self, kind, error, tb) -> bool:
        if isinstance(error, WmtpError):
            if str(error) not in map(str, self.problems):  # the same source in train and eval
                self.problems.append(error)
            return True
        return False

    def raise_any(self) -> None:
        if len(self.problems) == 1:
            raise self.problems[0]
        if self.problems:
            lines = "\n".join(f"  - {p}" for p in self.problems)
            raise ConfigError(f"this run cannot start here; {len(self.problems)} problems:\n{lines}")


def count_steps(plan: Plan) -> Plan:
    """The plan with the steps its run takes (:func:`wmtp_core.engine.parts.count_steps`): the
    dry run reads and tokenizes the training data for it, as the run will."""
    from wmtp_core.engine.parts import count_steps as count

    counted = count(plan.settings)
    if counted is None:
        max_steps = plan.settings.recipe.train.max_steps
        counted = ((f"at most {max_steps:,} steps (train.max_steps); " if max_steps else "")
                   + "the training rows are counted once the run has resolved the base model's tokenizer")
    return attrs.evolve(plan, steps=counted)


def final_outlook(plan: Plan) -> str | None:
    """What the run will do with the final model, as the dry run says it: for a resumed run,
    read (never written, no lease taken) from the newest committed checkpoint of the resume
    sink and from the final sink's ``stored_final`` for that checkpoint's lineage: a final
    model already stored for the steps the run reaches is not stored again; one of an earlier
    step is superseded by a new one. ``None``: no final role, or a fresh run (it stores one)."""
    from wmtp_core.bindings import build_sink
    from wmtp_core.events import RunInfo

    if Role.FINAL not in plan.required or not plan.resume:
        return None
    steps = plan.steps.steps if hasattr(plan.steps, "steps") else None
    fresh = RunInfo(name=plan.run_name, algo=plan.settings.recipe.train.algo, lineage="",
                    experiment=plan.mlflow.get("experiment", "wmtp"), tags=plan.tags)
    try:
        probe = build_sink(plan.catalog, plan.bindings, Role.RESUME, fresh, plan.mlflow)
        try:
            committed = probe.committed()
        finally:
            probe.close()
        if plan.resume not in ("latest", "auto"):
            committed = [(u, m) for u, m in committed if u.rstrip("/") == plan.resume.rstrip("/")]
        if not committed:
            if plan.resume == "auto":
                return "final model: no committed checkpoint to resume from; the run starts fresh and stores one"
            return (f"final model: --resume {plan.resume}: no such committed checkpoint under "
                    f"{probe.location()}; the run will refuse to start")
        uri, manifest = committed[-1]
        run = attrs.evolve(fresh, lineage=manifest.lineage, resumed_from=uri)
        sink = build_sink(plan.catalog, plan.bindings, Role.FINAL, run, plan.mlflow)
        try:
            stored = sink.stored_final(run)
        finally:
            sink.close()
    except WmtpError:
        raise
    except Exception as e:  # the run itself will say it, with its exit status
        return f"final model: cannot tell whether one is stored ({type(e).__name__}: {first_line(e, 300)})"
    start = manifest.step
    reach = (f"step {steps:,}" if steps is not None else "its last step")
    if stored is None:
        return (f"final model: none stored for this run's lineage; resuming from step {start:,} "
                f"({uri}), the run trains to {reach} and stores its final model")
    if steps is not None and stored.step >= max(steps, start):
        return (f"final model: step {stored.step:,} is already stored at {stored.uri}; the run ends at "
                f"step {max(steps, start):,} and stores no new final model (raise train.max_steps "
                "or train.num_epochs to train further)")
    return (f"final model: step {stored.step:,} is stored at {stored.uri}; resuming from step {start:,}, "
            f"the run trains to {reach} and stores a new final model that supersedes it (tagged with "
            "its step and the one it supersedes)")


def describe(plan: Plan) -> list[Any]:
    """What ``--dry-run`` prints: the bindings, the storage estimate, the verdict."""
    descriptions = {n: s.description for n, s in plan.catalog.sinks.items()}
    models = "\n".join(f"{key}: {what}" for key, what in plan.models.items())
    size = (f"{plan.parameters:,} parameters" if plan.parameters is not None
            else "size known when the registered base model is resolved")
    steps = f"\n{plan.steps}" if isinstance(plan.steps, str) else \
        f"\n{plan.steps.describe()}" if plan.steps is not None else ""
    return ["\n".join(report.bindings_lines(plan.bindings, descriptions)) + f"\n{models}\n({size}){steps}",
            report.estimate_table(plan.estimate),
            f"dry run: run {plan.run_name!r} is valid; nothing was written."]
