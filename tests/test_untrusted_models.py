"""A model from the registry never runs code: hostile models registered in a real MLflow store
are refused from their MLmodel file and artifact listing before a byte of them is read."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest
import torch
from builders import files, tiny_config

from wmtp_core.engine.model import ModelConfig, MTPModel

pytestmark = pytest.mark.slow

CFG = ModelConfig(d_model=16, n_layers=1, n_heads=2, n_future=2, max_seq_len=32)


class Hostile(torch.nn.Module):
    """Pickles as a call that writes a marker file: whoever unpickles it runs that code."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker = marker
        self.lin = torch.nn.Linear(2, 2)

    def forward(self, x):
        return self.lin(x)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


class Exploit:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


@pytest.fixture
def store(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.chdir(tmp_path)  # artifacts under ./mlruns
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    mlflow.set_experiment("hostile")
    yield uri
    mlflow.end_run()


def register_pickled(name: str, marker: str) -> str:
    import mlflow
    import mlflow.pytorch

    with mlflow.start_run():
        mlflow.pytorch.log_model(Hostile(marker), name="model", serialization_format="pickle",
                                 registered_model_name=name, pip_requirements=["torch"],
                                 metadata={"wmtp_model_config": {"d_model": 16}})
    return f"models:/{name}/1"


def rho1(tmp_path: Path, ref: str, capsys) -> tuple[int, str]:
    from wmtp_core.run import main

    config = tiny_config(tmp_path, paths={"models": {"ref": ref}})
    capsys.readouterr()  # what registering the fixture printed
    code = main(files(tmp_path, config, {"train": {"algo": "rho1-wmtp"}}))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, err


def test_a_pickled_registry_model_is_refused_and_its_code_never_runs(tmp_path, store, capsys):
    """The reproduction of the report: a pickle-format model registered as wmtp_baseline-mtp
    whose __reduce__ writes a marker, used as rho1-wmtp's reference."""
    import mlflow.pytorch

    marker = tmp_path / "marker"
    uri = register_pickled("wmtp_baseline-mtp", str(marker))
    # the fixture is really hostile: MLflow's own loader runs its code
    with pytest.raises(AttributeError):  # exec() returned None where a module was expected
        mlflow.pytorch.load_model(uri)
    assert marker.exists()
    marker.unlink()

    code, err = rho1(tmp_path, uri, capsys)
    assert code == 2
    assert not marker.exists(), "loading the reference model ran its code"
    line = " ".join(err.split())
    assert "paths.models.ref" in line and "models:/wmtp_baseline-mtp/1" in line
    assert "is an MLflow pytorch model in pickle format (data/model.pth): loading it can run code" in line
    assert "Accepted: WMTP's own export" in line and "safetensors" in line
    assert len(err.strip().splitlines()) == 1, err


def test_a_python_function_model_is_refused(tmp_path, store, capsys):
    import mlflow
    import mlflow.pyfunc

    marker = tmp_path / "marker"

    class Model(mlflow.pyfunc.PythonModel):
        def __init__(self):
            self.payload = Exploit(str(marker))

        def predict(self, context, model_input):
            return model_input

    with mlflow.start_run():
        mlflow.pyfunc.log_model(name="model", python_model=Model(), registered_model_name="wmtp_pyfunc",
                                pip_requirements=["mlflow"], metadata={"wmtp_model_config": {}})
    code, err = rho1(tmp_path, "models:/wmtp_pyfunc/1", capsys)
    assert code == 2 and not marker.exists()
    assert "an MLflow python_function model (cloudpickle)" in " ".join(err.split())


def wmtp_export(tmp_path: Path, name: str) -> tuple[str, MTPModel]:
    """A final model registered by WMTP's own registry sink, as the end of a run does."""
    from wmtp_core import Payload, Role, RunInfo
    from wmtp_core.events import CheckpointEmitted, SinkContext
    from wmtp_plugins.mlflow_registry import MlflowRegistrySink

    torch.manual_seed(3)
    model = MTPModel(CFG).eval()
    run = RunInfo(name="exported", algo=name.removeprefix("wmtp_"), lineage="L5")
    sink = MlflowRegistrySink(SinkContext(role=Role.FINAL, run=run, base_path=str(tmp_path),
                                          mlflow={"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}))
    import attrs

    payload = Payload(parts={"model": model.state_dict()}, model=model,
                      example_input=torch.randint(0, 256, (2, 8)), model_config=attrs.asdict(CFG))
    receipt = sink.store(CheckpointEmitted(run=run, role=Role.FINAL, step=1, parts=("model",),
                                           nbytes=1), payload)
    return receipt.uri, model


def test_wmtps_own_export_loads_weight_for_weight_without_unpickling(tmp_path, store):
    from wmtp_plugins.mlflow_registry import wmtp_load_model

    uri, model = wmtp_export(tmp_path, "wmtp_baseline-mtp")
    loaded = wmtp_load_model(uri=uri, mlflow_config={"tracking_uri": store})
    assert loaded.model_config == {**loaded.model_config, "d_model": 16, "n_future": 2}
    expected = model.state_dict()
    assert set(loaded.weights) == set(expected)
    for k, v in expected.items():
        assert torch.equal(loaded.weights[k], v), k


def test_a_pt2_archive_with_a_pickled_weight_is_refused(tmp_path, store, capsys):
    """A crafted archive: WMTP's export with one weight record replaced by a pickle that would
    run code. torch.export.load would unpickle it without weights_only."""
    import mlflow

    uri, _ = wmtp_export(tmp_path, "wmtp_baseline-mtp")
    marker = tmp_path / "marker"
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp_path / "dl")))
    archive = local / "data" / "model.pt2"
    with zipfile.ZipFile(archive) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    table = next(n for n in entries if n.endswith("_weights_config.json"))
    config = json.loads(entries[table])
    first = next(iter(config["config"].values()))
    first["use_pickle"] = True
    entries[table] = json.dumps(config).encode()
    buf = io.BytesIO()
    torch.save(Exploit(str(marker)), buf)
    entries[table.rsplit("/", 1)[0] + "/" + first["path_name"]] = buf.getvalue()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as z:
        for n, data in entries.items():
            z.writestr(n, data)
    with mlflow.start_run():
        mlflow.log_artifacts(str(local), "model")
        run_id = mlflow.active_run().info.run_id
    mlflow.register_model(f"runs:/{run_id}/model", "wmtp_crafted")

    code, err = rho1(tmp_path, "models:/wmtp_crafted/1", capsys)
    assert code == 2 and not marker.exists(), err
    assert "pt2 archive holds a weight that is not plain tensor data" in " ".join(err.split())


def test_registry_model_that_lies_about_its_size_is_refused_before_allocation(tmp_path, store, capsys):
    """The architecture in the metadata is untrusted too: weights that do not fit it are
    refused with the first mismatching tensor, not loaded into a model of another shape."""
    import mlflow

    uri, _ = wmtp_export(tmp_path, "wmtp_baseline-mtp")
    # re-register the same artifacts with an architecture that claims a bigger model
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp_path / "dl2")))
    text = (local / "MLmodel").read_text().replace("d_model: 16", "d_model: 4096")
    (local / "MLmodel").write_text(text)
    with mlflow.start_run():
        mlflow.log_artifacts(str(local), "model")
        run_id = mlflow.active_run().info.run_id
    mlflow.register_model(f"runs:/{run_id}/model", "wmtp_liar")
    code, err = rho1(tmp_path, "models:/wmtp_liar/1", capsys)
    assert code == 2
    assert "its weights do not fit the architecture it records" in " ".join(err.split())
