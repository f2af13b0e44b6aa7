"""MLflow registry sink: the final model, once, as a registered MLflow model.

Stores the weights only (a ``torch.export`` program, no optimizer, no pickle), registers a
version of ``wmtp_{algo}``, logs the final metrics, and tags the run with where the resume state
lives: a reference, never a copy.
"""

from __future__ import annotations

import time

import torch

from wmtp_core import Receipt, Role, SinkSpec, hookimpl
from wmtp_plugins._mlflow import configure


class MlflowRegistrySink:
    name = "mlflow_registry"

    def __init__(self, context) -> None:
        self.context = context
        self.settings = dict(context.mlflow)

    def location(self) -> str:
        return f"models:/{self.model_name(self.context.run.algo)}"

    @staticmethod
    def model_name(algo: str) -> str:
        return f"wmtp_{algo}"

    def store(self, event, payload) -> Receipt:  # noqa: C901
        if event.role is not Role.FINAL:
            raise ValueError(f"{self.name} serves the final role only, got {event.role.value!r}")
        import mlflow
        import mlflow.pytorch

        t0 = time.perf_counter()
        configure(self.settings)
        name = self.model_name(event.run.algo)
        owns_run = mlflow.active_run() is None
        if owns_run:
            mlflow.start_run(run_name=event.run.name)
        try:
            if event.resume_location:
                mlflow.set_tag("wmtp.resume_location", event.resume_location)
            if event.metrics:
                mlflow.log_metrics({f"final_{k}": float(v) for k, v in event.metrics.items()},
                                   step=event.step)
            model = payload.model.eval()
            example = payload.example_input
            info = mlflow.pytorch.log_model(
                model,
                name="model",
                input_example=example.numpy() if isinstance(example, torch.Tensor) else example,
                registered_model_name=name,
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
                metadata={"wmtp_run": event.run.name, "wmtp_step": event.step,
                          "wmtp_model_config": dict(payload.model_config)},
                await_registration_for=60,
            )
            version = info.registered_model_version
            nbytes = _artifact_bytes(mlflow.MlflowClient(), info.model_id)
        finally:
            if owns_run:
                mlflow.end_run()
        return Receipt(role=Role.FINAL, sink=self.name, run=event.run.name, step=event.step,
                       uri=f"models:/{name}/{version}", nbytes=nbytes,
                       seconds=time.perf_counter() - t0,
                       meta={"model_uri": info.model_uri})

    def close(self) -> None:
        pass


def _artifact_bytes(client, model_id: str) -> int:
    """Bytes the logged model occupies in the artifact store."""
    total, stack = 0, [None]
    while stack:
        for f in client.list_logged_model_artifacts(model_id, stack.pop()):
            if f.is_dir:
                stack.append(f.path)
            else:
                total += f.file_size or 0
    return total


@hookimpl
def wmtp_register_sinks(register):
    register(SinkSpec(
        name="mlflow_registry",
        roles={Role.FINAL},
        factory=MlflowRegistrySink,
        description="final weights as a registered MLflow model version (wmtp_{algo})",
    ))
