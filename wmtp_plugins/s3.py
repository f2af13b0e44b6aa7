"""S3 sink: resume state as objects in any S3-compatible store, through s3fs.

Endpoint and credentials follow the AWS conventions (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``) or come from
``storage.resume.options`` (s3fs storage options such as ``endpoint_url``, ``key``,
``secret``, ``profile``). They never reach logs, manifests or MLflow params. Large files go up
as multipart uploads (s3fs streams parts of ``block_size`` bytes, 256 MiB by default here:
fewer, larger parts upload faster).

Faults are retried by the clients, never by WMTP: botocore retries each request
(:data:`RETRIES`, within :data:`TIMEOUTS`), and s3fs repeats a call whose response broke off
(:data:`S3FS_ATTEMPTS`). Options given in ``storage.<role>.options.config_kwargs`` win over
these defaults. An option s3fs does not take is refused before the run starts
(:func:`check`).
"""

import difflib
import inspect
import os
from collections.abc import Mapping

import attrs

from wmtp_core import BindingError, FileSink, Role, SinkSpec, hookimpl, redact

BLOCK_SIZE = 256 << 20
PROTOCOLS = ("s3", "s3a")
RETRIES = {"mode": "standard", "max_attempts": 4}
"""botocore's retries unless ``config_kwargs.retries`` (or ``AWS_RETRY_MODE``/``AWS_MAX_ATTEMPTS``)
says otherwise: 5 attempts per request (4 retries) on 5xx, throttling (``SlowDown``), timeouts
and broken connections, with exponential backoff and jitter (at most 1 + 2 + 4 + 8 s of
waiting in all)."""
TIMEOUTS = {"connect_timeout": 5, "read_timeout": 15}
"""botocore's timeouts in seconds, per attempt (the read timeout: for each read of a response)
unless ``config_kwargs`` gives them (s3fs's own values, stated here so they are documented)."""
S3FS_ATTEMPTS = 3
"""Attempts s3fs makes of a whole call (its ``retries``, 5 by default) when botocore gave up on
a broken connection or ``SlowDown``, or a response broke off mid-body (which botocore does not
retry). 3, so that a read survives two broken responses in a row while the time before a call
fails stays bounded by three times botocore's: at most 45 s when the endpoint answers every
attempt at once with an error or a reset, 3 × (5 × (5 + 15) + 15) = 345 s when every attempt
runs into its timeouts."""
FSSPEC_OPTIONS = ("use_listings_cache", "listings_expiry_time", "max_paths", "skip_instance_cache")
"""Options s3fs hands to fsspec (listing and instance caches)."""
SESSION_OPTIONS = ("profile",)
"""Options s3fs hands to botocore's session."""
_NOT_FROM_CONFIG = ("self", "kwargs", "loop", "session", "asynchronous")
"""s3fs parameters that take Python objects or would change how WMTP calls it."""


def accepted_options() -> list[str]:
    """Every storage option the ``s3`` sink accepts: s3fs's ``S3FileSystem`` parameters and the
    options s3fs hands on to fsspec and to botocore's session."""
    from s3fs import S3FileSystem

    own = [n for n in inspect.signature(S3FileSystem.__init__).parameters if n not in _NOT_FROM_CONFIG]
    return sorted({*own, *FSSPEC_OPTIONS, *SESSION_OPTIONS})


def storage_options(options) -> dict:
    """``options`` with the sink's defaults under them: the multipart block size, botocore's
    retries (:data:`RETRIES`) and timeouts (:data:`TIMEOUTS`). A value the user gives wins."""
    options = {"default_block_size": BLOCK_SIZE, **options}
    config = dict(options.get("config_kwargs") or {})
    retries = dict(RETRIES)
    if os.environ.get("AWS_RETRY_MODE"):
        retries.pop("mode")
    if os.environ.get("AWS_MAX_ATTEMPTS"):
        retries.pop("max_attempts")
    config["retries"] = {**retries, **(config.get("retries") or {})}
    options["config_kwargs"] = {**TIMEOUTS, **config}
    return options


def _where(binding) -> str:
    origin = binding.origin
    return origin.removesuffix(".sink") if origin.endswith(".sink") else f"{origin}: storage.{binding.role.value}"


def check_options(options, where: str) -> None:
    """Refuse a storage option s3fs does not take, and ``config_kwargs`` botocore would refuse,
    naming the key, the value and what is accepted (``where``: the key the options are under)."""
    accepted = accepted_options()
    for key, value in options.items():
        if key not in accepted:
            close = difflib.get_close_matches(str(key), accepted, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise BindingError(f"{where}.options.{key}: {redact.value(key, value)!r} is not accepted: sink 's3' "
                               f"takes no option {key!r}; {hint}accepted (s3fs storage options): "
                               f"{', '.join(accepted)}")
    config = options.get("config_kwargs")
    if config is None:
        return
    where = f"{where}.options.config_kwargs"
    if not isinstance(config, Mapping):
        raise BindingError(f"{where}: {config!r} is not accepted: a mapping of botocore Config options is, "
                           "e.g. {retries: {mode: standard, max_attempts: 4}}")
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError

    unknown = next((k for k in config if k not in Config.OPTION_DEFAULTS), None)
    if unknown is not None:
        raise BindingError(f"{where}.{unknown}: {redact.value(unknown, config[unknown])!r} is not accepted: "
                           f"botocore's Config takes no option {unknown!r}; accepted: "
                           f"{', '.join(sorted(Config.OPTION_DEFAULTS))}")
    for key in ("connect_timeout", "read_timeout"):
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            raise BindingError(f"{where}.{key}: {value!r} is not accepted: a number of seconds above 0 is")
    retries = config.get("retries")
    if retries is not None and not isinstance(retries, Mapping):
        raise BindingError(f"{where}.retries: {retries!r} is not accepted: a mapping is, e.g. "
                           "{mode: standard, max_attempts: 4}")
    for key in ("max_attempts", "total_max_attempts"):
        value = (retries or {}).get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise BindingError(f"{where}.retries.{key}: {value!r} is not accepted: a whole number is")
    try:
        Config(**storage_options(options)["config_kwargs"])
    except (BotoCoreError, TypeError, ValueError) as e:  # retries: an unknown key, mode or a negative count
        raise BindingError(f"{where}.retries: {dict(retries or {})!r} is not accepted: {e}") from None


def check(binding) -> None:
    """``s3`` keeps objects in S3: a base path of another protocol is another sink's. Its options
    must be ones s3fs takes (:func:`check_options`)."""
    from fsspec.core import split_protocol

    protocol = split_protocol(binding.base_path)[0] or "file"
    if protocol not in PROTOCOLS:
        raise BindingError(f"{binding.origin}: sink 's3' keeps objects in S3, but the "
                           f"{binding.role.value} base path {binding.base_path!r} is not an s3:// URL")
    check_options(binding.options, _where(binding))


class S3Sink(FileSink):
    """Objects in an S3-compatible store; large files in multipart uploads of ``BLOCK_SIZE``;
    faults retried by botocore and s3fs as :data:`RETRIES`, :data:`TIMEOUTS` and
    :data:`S3FS_ATTEMPTS` say."""

    def __init__(self, context):
        super().__init__(attrs.evolve(context, options=storage_options(context.options)))
        # s3fs takes its own repeat count as an attribute only (see S3FS_ATTEMPTS)
        self.checkpoints.fs.retries = S3FS_ATTEMPTS


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
