"""Local sink: checkpoints as files on local disk, through fsspec and the commit protocol."""

from wmtp_core import BindingError, FileSink, Role, SinkSpec, hookimpl


class LocalSink(FileSink):
    """Files on local disk (``file://`` paths)."""


PROTOCOLS = ("file", "local")


def check(binding) -> None:
    """``local`` keeps files on local disk: a base path of another protocol is another sink's."""
    from fsspec.core import split_protocol

    protocol = split_protocol(binding.base_path)[0] or "file"
    if protocol not in PROTOCOLS:
        raise BindingError(f"{binding.origin}: sink 'local' keeps files on local disk, but the "
                           f"{binding.role.value} base path {binding.base_path!r} is {protocol}://; bind "
                           f"the sink that serves {protocol}:// (for s3://: sink s3) or use a local path")


@hookimpl
def wmtp_register_sinks(register):
    register(SinkSpec(
        name="local",
        roles={Role.RESUME, Role.FINAL},
        factory=LocalSink,
        protocols=PROTOCOLS,
        description="files on local disk (resume, or final for users without a registry)",
        check=check,
    ))
