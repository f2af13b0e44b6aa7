"""MLflow registry sink: the final model, once, as a registered MLflow model.

Stores the weights only, no optimizer, no pickle: the byte-level model as a ``torch.export``
program (pytorch flavor), a Hugging Face model as its folder (transformers flavor: safetensors,
config, tokenizer, extra heads). Registers a version of ``wmtp_{algo}``, logs the final metrics, and tags the run with where the resume state
lives: a reference, never a copy.

Storing is two steps: log the model (an MLflow logged model tagged with the run's lineage and
step), then create the version from it, with its description and tags in the same request. A
registration that failed between the two is completed from the logged model, never logged
twice: exactly one version per run lineage, fully tagged.
"""

from __future__ import annotations

import attrs

from wmtp_core import BindingError, Holding, Receipt, Role, Sink, SinkSpec, hookimpl, redact
from wmtp_plugins._mlflow import DEFAULT_TRACKING_URI, configure, lineage_run, request_bounds, unreachable


def logged_model_bytes(client, model_id: str | None) -> int | None:
    """Bytes an MLflow logged model occupies in its artifact store (``client`` is an
    ``mlflow.MlflowClient``); ``None`` without a model id."""
    if not model_id:
        return None
    total, stack = 0, [None]
    while stack:
        for f in client.list_logged_model_artifacts(model_id, stack.pop()):
            if f.is_dir:
                stack.append(f.path)
            else:
                total += f.file_size or 0
    return total


def _model_id(version) -> str | None:
    """The logged model behind a version: MLflow 3 leaves ``model_id`` empty on versions it
    registered from a logged model, whose ``source`` is then ``models:/<model id>``."""
    source = version.source or ""
    return version.model_id or (source.removeprefix("models:/") if source.startswith("models:/m-") else None)


def _description(event) -> tuple[str, dict[str, str]]:
    """What makes a version answer "where did this come from" on its own registry page: a
    description and the tags wmtp.lineage, wmtp.run, wmtp.algo, wmtp.step, wmtp.resume_location."""
    where = redact.text(event.resume_location) if event.resume_location else "not stored"
    loss = event.metrics.get("loss")
    description = (f"Final model of WMTP run '{event.run.name}' ({event.run.algo}) after {event.step} steps"
                   + (f", final loss {loss:.4f}" if loss is not None else "")
                   + f". Resume state: {where} (lineage {event.run.lineage}).")
    tags = {"wmtp.lineage": event.run.lineage, "wmtp.run": event.run.name, "wmtp.algo": event.run.algo,
            "wmtp.step": str(event.step), "wmtp.resume_location": where}
    if event.supersedes:
        tags["wmtp.supersedes"] = event.supersedes
        description += f" Supersedes {event.supersedes}, stored before the run trained further."
    return description, tags


def _logged_before(client, experiment_id: str, event):
    """A model this lineage logged at this step whose registration never happened (the
    registry failed after the upload), the newest if several, or ``None``. Only a complete
    upload (``READY``) counts."""
    from mlflow.entities import LoggedModelStatus

    found = client.search_logged_models(
        experiment_ids=[experiment_id],
        filter_string=f"tags.`wmtp.lineage` = '{event.run.lineage}' AND tags.`wmtp.step` = '{event.step}'")
    ready = [m for m in found if m.status == LoggedModelStatus.READY]
    return max(ready, key=lambda m: m.creation_timestamp) if ready else None


def _register(client, name: str, model_id: str, run_id: str, event):
    """One version of ``name`` from the logged model ``model_id``, created with its description
    and tags in one request: a version that exists is complete."""
    import json

    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    try:
        client.create_registered_model(name)
    except MlflowException as e:
        if e.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
    description, tags = _description(event)
    version = client.create_model_version(name, source=f"models:/{model_id}", run_id=run_id, tags=tags,
                                          description=description, model_id=model_id, await_creation_for=60)
    try:  # the logged model's page links its version, as MLflow's own registration does
        client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(
            [{"name": name, "version": version.version}])})
    except MlflowException as e:
        import logging

        logging.getLogger("wmtp").warning("registered %s version %s; could not link it from logged model "
                                          "%s: %s", name, version.version, model_id, e.message)
    return version


class MlflowRegistrySink(Sink):
    """The final role's sink: a registered version of ``wmtp_<algo>`` per run lineage."""

    def __init__(self, context) -> None:
        self.context = context
        self.settings = dict(context.mlflow)

    def location(self) -> str:
        return f"models:/{self.model_name(self.context.run.algo)}"

    @staticmethod
    def model_name(algo: str) -> str:
        return f"wmtp_{algo}"

    def store(self, event, payload) -> Receipt:  # noqa: C901
        """Log the model (unless a failed registration of this lineage and step logged it
        already), then register its version."""
        if event.role is not Role.FINAL:
            raise BindingError(f"mlflow_registry serves the final role only, got {event.role.value!r}")
        import mlflow

        configure(self.settings)
        name = self.model_name(event.run.algo)
        owns_run = mlflow.active_run() is None
        ended = "FINISHED"
        if owns_run:
            # registering later (wmtp register): log into the run's own MLflow run if it exists,
            # and leave it ended as it was
            found = lineage_run(event.run.lineage)
            if found is not None:
                ended = found.info.status if found.info.status != "RUNNING" else ended
                mlflow.start_run(run_id=found.info.run_id)
            else:
                mlflow.start_run(run_name=event.run.name, tags={"wmtp.lineage": event.run.lineage})
        try:
            client = mlflow.MlflowClient()
            run = mlflow.active_run().info
            logged = _logged_before(client, run.experiment_id, event)
            model_id = logged.model_id if logged is not None else None
            if logged is not None and not event.resume_location:  # wmtp register: as recorded at the upload
                event = attrs.evolve(event, resume_location=logged.tags.get("wmtp.resume_location"))
            if event.resume_location:
                mlflow.set_tag("wmtp.resume_location", redact.text(event.resume_location))
            if model_id is None:  # the first try: the final metrics, then the model
                if event.metrics:
                    mlflow.log_metrics({f"final_{k}": float(v) for k, v in event.metrics.items()},
                                       step=event.step)
                model_id = _log(payload, event, client, run.experiment_id)
            version = _register(client, name, model_id, run.run_id, event).version
            nbytes = logged_model_bytes(client, model_id) or 0
        finally:
            if owns_run:
                mlflow.end_run(status=ended)
        return Receipt(role=Role.FINAL, run=event.run.name, step=event.step,
                       uri=f"models:/{name}/{version}", nbytes=nbytes, meta={"model_uri": f"models:/{model_id}"})

    def stored_final(self, run) -> Receipt | None:
        """The newest registered version made from this run's lineage (the highest
        ``wmtp.step``), if any. A registry that cannot be asked raises: whether it holds one is
        not known."""
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        name = self.model_name(run.algo)
        try:
            configure(self.settings)
            versions = MlflowClient().search_model_versions(f"name='{name}'")
        except MlflowException as e:  # "not stored" would be a guess: the caller says it is not registered
            why = unreachable(e)
            if why is None:
                raise
            registry = self.settings.get("registry_uri") or self.settings.get("tracking_uri") or DEFAULT_TRACKING_URI
            raise ConnectionError(f"the MLflow registry at {redact.text(registry)} cannot be reached ({why}; "
                                  f"gave up after {request_bounds()})") from None
        mine = [v for v in versions if (v.tags or {}).get("wmtp.lineage") == run.lineage]
        if not mine:
            return None
        step = lambda v: int((v.tags or {}).get("wmtp.step") or 0)  # noqa: E731
        newest = max(mine, key=lambda v: (step(v), int(v.version)))
        return Receipt(role=Role.FINAL, run=run.name, step=step(newest), uri=f"models:/{name}/{newest.version}",
                       nbytes=0, meta={"version": str(newest.version)})

    def held(self, run_name: str, lineages: set[str] | None = None) -> list[Holding]:
        """Registered versions of any ``wmtp_*`` model made from one of ``lineages``, with the
        bytes their artifacts occupy. A sqlite store that does not exist holds nothing (and is
        not created by asking)."""
        from pathlib import Path

        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        from wmtp_core import ModelLoadError

        tracking = self.settings.get("tracking_uri") or "sqlite:///mlflow.db"
        registry = self.settings.get("registry_uri") or tracking
        for uri in {tracking, registry}:
            if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
                return []
        configure(self.settings)
        client = MlflowClient(tracking_uri=tracking, registry_uri=registry)
        found = []
        try:
            for model in client.search_registered_models(filter_string="name LIKE 'wmtp_%'"):
                for v in client.search_model_versions(f"name='{model.name}'"):
                    if lineages is None or (v.tags or {}).get("wmtp.lineage") in lineages:
                        found.append(Holding(role=Role.FINAL, uri=f"models:/{model.name}/{v.version}", step=None,
                                             nbytes=logged_model_bytes(client, _model_id(v))))
        except MlflowException as e:
            raise ModelLoadError(f"the MLflow registry at {registry} cannot be read: {e.message}") from None
        return sorted(found, key=lambda h: h.uri)

    def close(self) -> None:
        pass


def _log(payload, event, client, experiment_id: str) -> str:
    """Log the model; returns its id. MLflow marks a logged model whose upload raised an
    exception ``FAILED``, but not one cut short by Ctrl-C (``KeyboardInterrupt``): that one is
    marked here, found by its tags, so that no ``PENDING`` model outlives the run."""
    try:
        return (_log_folder if payload.folder else _log_program)(payload, event).model_id
    except BaseException:
        _fail_pending(client, experiment_id, event)
        raise


def _fail_pending(client, experiment_id: str, event) -> None:
    """Mark ``FAILED`` every logged model of this lineage and step still ``PENDING``: an upload
    that will never finish. A registry that cannot be asked is a warning, never the run's end."""
    import logging

    from mlflow.entities import LoggedModelStatus

    try:
        found = client.search_logged_models(
            experiment_ids=[experiment_id],
            filter_string=f"tags.`wmtp.lineage` = '{event.run.lineage}' AND tags.`wmtp.step` = '{event.step}'")
        for model in found:
            if model.status == LoggedModelStatus.PENDING:
                client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
    except Exception as e:
        logging.getLogger("wmtp").warning("could not mark the unfinished logged model of step %s failed: %s: %s",
                                          event.step, type(e).__name__, redact.text(e))


def _log_program(payload, event):
    """The byte-level model as a ``torch.export`` program (MLflow's pytorch flavor, pt2)."""
    import mlflow.pytorch
    import torch

    model = payload.model.eval()
    example = payload.example_input
    return mlflow.pytorch.log_model(
        model,
        name="model",
        input_example=example.numpy() if isinstance(example, torch.Tensor) else example,
        signature=_signature(payload),
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        tags=_model_tags(event),
        metadata={"wmtp_run": event.run.name, "wmtp_step": event.step,
                  "wmtp_model_config": dict(payload.model_config)},
        # MLflow's JSON serving check does not apply to a tensor-in export; skip its noise
        validate_serving_input=False,
    )


def _log_folder(payload, event):
    """A Hugging Face model folder with MLflow's transformers flavor (task text-generation):
    ``mlflow.transformers.load_model`` gives back the model and tokenizer, and the folder's
    extra heads and ``wmtp.json`` travel with it under ``model/``."""
    import logging

    import mlflow.transformers
    import torch
    import transformers

    record = payload.model_config
    quiet = logging.getLogger("mlflow.transformers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # it warns that a local folder has no hub model card
    try:
        info = mlflow.transformers.log_model(
            transformers_model=payload.folder,
            name="model",
            task="text-generation",
            tags=_model_tags(event),
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}",
                              f"transformers=={transformers.__version__}"],
            metadata={"wmtp_run": event.run.name, "wmtp_step": event.step,
                      "wmtp_model_config": {k: record[k] for k in ("kind", "base", "n_future", "head")
                                            if k in record}},
        )
    finally:
        quiet.setLevel(level)
    _name_the_source(info.model_id, _base_model(payload))
    return info


def _base_model(payload) -> str:
    """The base model the run fine-tuned, as the run named it (``wmtp.json``'s ``base_model``)."""
    import json
    import os

    try:
        with open(os.path.join(payload.folder, "wmtp.json")) as f:
            named = json.load(f).get("base_model")
    except (OSError, ValueError):
        named = None
    return str(named or payload.model_config.get("base") or "")


def _name_the_source(model_id: str, name: str) -> None:
    """MLflow's transformers flavor records the folder it logged from as ``source_model_name``:
    a temporary folder, gone once logged. Record the base model the run fine-tuned instead, in
    the logged model's ``MLmodel`` (before its version is registered)."""
    import os
    import tempfile

    from mlflow import MlflowClient
    from mlflow.models import Model

    if not name:
        return
    model = Model.load(f"models:/{model_id}")
    flavor = model.flavors.get("transformers")
    if flavor is None or flavor.get("source_model_name") == name:
        return
    flavor["source_model_name"] = name
    with tempfile.TemporaryDirectory(prefix="wmtp-mlmodel-") as folder:
        path = os.path.join(folder, "MLmodel")
        model.save(path)
        MlflowClient().log_model_artifact(model_id, path)


def _model_tags(event) -> dict[str, str]:
    """The logged model's tags: what finds it again if its registration fails."""
    tags = {"wmtp.lineage": event.run.lineage, "wmtp.run": event.run.name, "wmtp.step": str(event.step)}
    if event.resume_location:
        tags["wmtp.resume_location"] = redact.text(event.resume_location)
    return tags


def _signature(payload):
    """Token ids ``[batch, seq]`` (an int64 array) in, float32 logits ``[batch, n_future, seq,
    vocab]`` out, whatever dtype the weights are stored in; batch and sequence length stay dynamic
    in the exported program. The input is unnamed: ``mlflow.pyfunc`` then hands the array to
    the program as it is (a named input becomes a dict, which the pytorch flavor refuses)."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    cfg = payload.model_config
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype("int64"), (-1, -1))]),
        outputs=Schema([TensorSpec(np.dtype("float32"), (-1, cfg["n_future"], -1, cfg["vocab_size"]))]),
    )


@hookimpl
def wmtp_register_sinks(register):
    register(SinkSpec(
        name="mlflow_registry",
        roles={Role.FINAL},
        factory=MlflowRegistrySink,
        description="final weights as a registered MLflow model version (wmtp_{algo})",
        registry=True,
    ))


@hookimpl
def wmtp_load_model(uri, mlflow_config):
    """``models:/NAME/VERSION`` or ``models:/NAME/latest``: the weights of a registered model,
    read only in a format that cannot run code (:mod:`wmtp_plugins._safe_models`); any other
    format is refused, from its ``MLmodel`` file and artifact listing, before a byte of it is read.
    """
    if not uri.startswith("models:/"):
        return None
    from wmtp_core import LoadedModel
    from wmtp_plugins import _safe_models

    configure(mlflow_config or {})
    weights, config, folder = _safe_models.load(uri)
    return LoadedModel(weights=weights, model_config=config, source=uri, folder=folder)


@hookimpl
def wmtp_checkpoint_evaluated(event):
    """A registered version that was evaluated carries its pass@k as version tags
    (``eval/mbpp/pass@1``: the value); evaluated by ``wmtp evaluate`` (no run in progress),
    its metrics also go to the MLflow run that registered it, at the version's step."""
    if not event.uri.startswith("models:/") or not event.metrics:
        return
    import mlflow
    from mlflow.entities import Metric

    configure(event.mlflow or {})
    name, _, version = event.uri.removeprefix("models:/").partition("/")
    client = mlflow.MlflowClient()
    if not version.isdigit():  # models:/NAME/latest
        version = str(max(int(v.version) for v in client.search_model_versions(f"name='{name}'")))
    found = client.get_model_version(name, version)
    for key, value in sorted(event.metrics.items()):
        client.set_model_version_tag(name, found.version, key, f"{float(value):.6g}")
    if event.run is None and found.run_id:
        step = int((found.tags or {}).get("wmtp.step") or 0)
        now = int(__import__("time").time() * 1000)
        client.log_batch(found.run_id, metrics=[Metric(k, float(v), now, step) for k, v in sorted(event.metrics.items())])
