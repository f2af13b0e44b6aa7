"""S3 sink: resume state as objects in any S3-compatible store, through s3fs.

Endpoint and credentials follow the AWS conventions (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``) or come from
``storage.resume.options`` (s3fs storage options such as ``endpoint_url``, ``key``,
``secret``, ``profile``). They never reach logs, manifests or MLflow params. Large files go up
as multipart uploads (s3fs streams parts of ``block_size`` bytes, 256 MiB by default here:
fewer, larger parts upload faster).
"""

import attrs

from wmtp_core import FileSink, Role, SinkSpec, hookimpl

BLOCK_SIZE = 256 << 20


class S3Sink(FileSink):
    """Objects in an S3-compatible store; large files in multipart uploads of ``BLOCK_SIZE``."""

    def __init__(self, context):
        options = {"default_block_size": BLOCK_SIZE, **context.options}
        super().__init__(attrs.evolve(context, options=options))


@hookimpl
def wmtp_register_sinks(register):
    register(SinkSpec(
        name="s3",
        roles={Role.RESUME},
        factory=S3Sink,
        protocols=("s3", "s3a"),
        description="objects in any S3-compatible store via s3fs (multipart for large files)",
    ))
