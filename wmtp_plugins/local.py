"""Local sink: checkpoints as files on local disk, through fsspec and the commit protocol."""

from wmtp_core import Role, SinkSpec, hookimpl
from wmtp_core.filesink import FileSink


class LocalSink(FileSink):
    name = "local"


@hookimpl
def wmtp_register_sinks(register):
    register(SinkSpec(
        name="local",
        roles={Role.RESUME, Role.FINAL},
        factory=LocalSink,
        protocols=("file", "local"),
        description="files on local disk (resume, or final for users without a registry)",
    ))
