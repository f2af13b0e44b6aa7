"""The shipped sink contract (wmtp_core.testing), run against the built-in local sink."""

from wmtp_core import Role
from wmtp_core.testing import SinkContract
from wmtp_plugins import local


class TestLocalSink(SinkContract):
    sink_name = "local"
    roles = (Role.RESUME, Role.FINAL)
    plugin = local

    def make_sink(self, context):
        return local.LocalSink(context)
