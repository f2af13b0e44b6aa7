"""S3 sink: resume state as objects in any S3-compatible store, through s3fs.

Endpoint and credentials follow the AWS conventions (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``) or come from
``storage.resume.options`` (s3fs storage options such as ``endpoint_url``, ``key``,
``secret``, ``profile``). They never reach logs, manifests or MLflow params. Large files go up
as multipart uploads (s3fs streams parts of ``block_size`` bytes, 256 MiB by default here:
fewer, larger parts upload faster).
"""

import attrs

from wmtp_core import BindingError, FileSink, Role, SinkSpec, hookimpl

BLOCK_SIZE = 256 << 20
PROTOCOLS = ("s3", "s3a")


def check(binding) -> None:
    """``s3`` keeps objects in S3: a base path of another protocol is another sink's."""
    from fsspec.core import split_protocol

    protocol = split_protocol(binding.base_path)[0] or "file"
    if protocol not in PROTOCOLS:
        raise BindingError(f"{binding.origin}: sink 's3' keeps objects in S3, but the "
                           f"{binding.role.value} base path {binding.base_path!r} is not an s3:// URL")


class S3Sink(FileSink):
    """Objects in an S3-compatible store; large files in multipart uploads of ``BLOCK_SIZE``."""

    def __init__(self, context):
        options = {"default_block_size": BLOCK_SIZE, **context.options}
        super().__init__(attrs.evolve(context, options=options))


@hookimpl
def wmtp_register_sinks(register):
    register(SinkSpec(
        name="s3",
        roles={Role.RESUME, Role.FINAL},
        factory=S3Sink,
        protocols=PROTOCOLS,
        description="objects in any S3-compatible store via s3fs (resume, or final without a "
                    "registry; multipart for large files)",
        check=check,
    ))
