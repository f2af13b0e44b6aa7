"""Local sink: checkpoints as files on local disk, through fsspec and the commit protocol."""

from wmtp_core import FileSink, Role, SinkSpec, hookimpl


class LocalSink(FileSink):
    """Files on local disk (``file://`` paths)."""


@hookimpl
def wmtp_register_sinks(register):
    register(SinkSpec(
        name="local",
        roles={Role.RESUME, Role.FINAL},
        factory=LocalSink,
        protocols=("file", "local"),
        description="files on local disk (resume, or final for users without a registry)",
    ))
