"""WMTP's sink contract, run against the tarball sink (only the final-role checks apply)."""

import io
import json
import tarfile

import torch
from wmtp_core import Role
from wmtp_core.testing import SinkContract, final_payload

import wmtp_tarball


class TestTarballSink(SinkContract):
    sink_name = "tarball"
    roles = (Role.FINAL,)
    plugin = wmtp_tarball

    def make_sink(self, context):
        return wmtp_tarball.TarballSink(context)


def test_archive_holds_weights_and_architecture(tmp_path):
    contract = TestTarballSink()
    run = contract.run_info()
    payload = final_payload(6)
    with contract.opened(tmp_path, Role.FINAL, run) as sink:
        contract.store(sink, run, Role.FINAL, 6)
        tar_path = sink.checkpoints.path_of(run.name, "export") + "/model.tar"
    with tarfile.open(tar_path) as tar:
        assert sorted(tar.getnames()) == ["model.pt", "model_config.json"]
        weights = torch.load(io.BytesIO(tar.extractfile("model.pt").read()), weights_only=True)
        config = json.loads(tar.extractfile("model_config.json").read())
    assert config == dict(payload.model_config)
    assert weights.keys() == payload.parts["model"].keys()
    assert all(torch.equal(weights[k], v) for k, v in payload.parts["model"].items())
