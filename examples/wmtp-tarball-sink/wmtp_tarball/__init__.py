"""A WMTP sink that exports the final model as one ``model.tar``.

The archive holds ``model.pt`` (the weights, ``torch.save`` of the state dict) and
``model_config.json`` (the architecture). It is committed under ``<base_path>/<run>/export/``
with WMTP's commit protocol: the archive first, ``manifest.json`` last.
"""

import io
import json
import tarfile
import time

import torch

from wmtp_core import BindingError, CheckpointError, CheckpointStore, Receipt, Role, Sink, SinkSpec, hookimpl

EXPORT = "export"


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
    tar.addfile(info, io.BytesIO(data))


class TarballSink(Sink):
    """A :class:`wmtp_core.Sink` for the final role, on WMTP's file toolkit: it overrides
    ``store``, ``location`` and ``stored_final``; the base class gives the rest their defaults."""

    def __init__(self, context):
        self.run = context.run.name
        self.checkpoints = CheckpointStore.from_url(context.base_path, **dict(context.options))

    def location(self):
        return self.checkpoints.uri(self.checkpoints.path_of(self.run, EXPORT))

    def store(self, event, payload):
        if event.role is not Role.FINAL:
            raise BindingError(f"tarball serves the final role only, got {event.role.value!r}")

        def write_tar(stream):  # "w|": a pure stream, so it works on any fsspec file
            weights = io.BytesIO()
            torch.save(dict(payload.parts["model"]), weights)
            with tarfile.open(fileobj=stream, mode="w|") as tar:
                _add(tar, "model.pt", weights.getvalue())
                _add(tar, "model_config.json", json.dumps(dict(payload.model_config)).encode())

        manifest = self.checkpoints.write(self.run, EXPORT, {"model.tar": write_tar}, step=event.step,
                                          role=Role.FINAL, lineage=event.run.lineage,
                                          meta={"algo": event.run.algo, "torch": torch.__version__})
        return Receipt(role=Role.FINAL, run=self.run, step=event.step, uri=self.location(),
                       nbytes=manifest.nbytes)

    def stored_final(self, run):
        try:
            m = self.checkpoints.read_manifest(self.checkpoints.path_of(self.run, EXPORT))
        except CheckpointError:
            return None
        return Receipt(role=Role.FINAL, run=self.run, step=m.step, uri=self.location(), nbytes=m.nbytes)


@hookimpl
def wmtp_register_sinks(register):
    register(SinkSpec(name="tarball", roles={Role.FINAL}, factory=TarballSink, protocols=(),
                      description="the final model as one model.tar (weights + model_config.json)"))
