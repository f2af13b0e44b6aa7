"""The shipped sink contract (wmtp_core.testing), run against every built-in sink: local, s3 on
the loopback S3 server, and mlflow_registry for the final role on a real MLflow store."""


import pytest
from conftest import S3_ENV

from wmtp_core import Role, SinkContext
from wmtp_core.testing import SinkContract
from wmtp_plugins import local, mlflow_registry, s3


class TestLocalSink(SinkContract):
    sink_name = "local"
    roles = (Role.RESUME, Role.FINAL)
    plugin = local

    def make_sink(self, context):
        return local.LocalSink(context)


@pytest.mark.slow
class TestS3Sink(SinkContract):
    sink_name = "s3"
    roles = (Role.RESUME, Role.FINAL)
    plugin = s3

    @pytest.fixture(autouse=True)
    def _server(self, s3_server, bucket):
        self.endpoint, self.bucket = s3_server, bucket

    def make_sink(self, context):
        return s3.S3Sink(context)

    def base_path(self, tmp_path):
        return f"s3://{self.bucket}/contract"

    def storage_options(self, tmp_path):
        return {"endpoint_url": self.endpoint, "key": S3_ENV["AWS_ACCESS_KEY_ID"],
                "secret": S3_ENV["AWS_SECRET_ACCESS_KEY"]}


@pytest.mark.slow
class TestMlflowRegistrySink(SinkContract):
    sink_name = "mlflow_registry"
    roles = (Role.FINAL,)
    plugin = mlflow_registry

    @pytest.fixture(autouse=True)
    def _store(self, tmp_path, monkeypatch):
        monkeypatch.chdir(tmp_path)  # MLflow puts artifacts under ./mlruns
        self.tracking = f"sqlite:///{tmp_path}/mlflow.db"
        yield
        import mlflow

        mlflow.end_run()

    def make_sink(self, context):
        return mlflow_registry.MlflowRegistrySink(context)

    def make_context(self, tmp_path, role, run):
        return SinkContext(role=role, run=run, base_path=self.base_path(tmp_path),
                           mlflow={"tracking_uri": self.tracking, "experiment": "contract"})
