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

What S3 does its own way is :class:`S3CheckpointStore`, the store registered for ``s3://``
(``SinkSpec.store``): incomplete multipart uploads listed and aborted, and the run's lease
written with conditional requests. The core finds it for any s3:// URL (``wmtp gc``, ``wmtp
checkpoints``, a tiered sink's durable tier) through ``wmtp_core.commit.store_class``.
"""

import datetime as dt
import difflib
import errno
import inspect
import os
import posixpath
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from wmtp_core import BindingError, CheckpointStore, FileSink, Role, SinkSpec, hookimpl, redact
from wmtp_core.commit import FINAL_NAME, MANIFEST, STAGING_MARKER, CheckpointState, Incomplete, check_run_name
from wmtp_core.manifest import RUN_NAME
from wmtp_core.naming import STEP_DIR

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


def credentials_problem(options: Mapping[str, Any], name: Callable[[str], str]) -> str | None:
    """Why the credentials in ``options`` cannot work: a key without its secret, or a secret
    without its key (``username``/``password`` are s3fs's other names for them), which botocore
    refuses before any request (``PartialCredentialsError``). ``None`` when both or neither are
    given, or with ``anon``. ``name(option)``: how the missing option is named to the user; no
    value is ever quoted."""
    if options.get("anon"):
        return None
    keys = [k for k in ("key", "username") if options.get(k) is not None and (k == "key" or options[k])]
    secrets = [k for k in ("secret", "password") if options.get(k) is not None and (k == "secret" or options[k])]
    if bool(keys) == bool(secrets):
        return None
    given, missing = (keys[0], "secret") if keys else (secrets[0], "key")
    return (f"{name(missing)} is missing; {given} given alone: S3 takes both key and secret, or neither "
            "(the credentials then come from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE "
            "or the machine's role)")


def storage_options(options, retries: Mapping[str, Any] = RETRIES) -> dict:
    """``options`` with the sink's defaults under them: the multipart block size, botocore's
    ``retries`` (:data:`RETRIES`) and timeouts (:data:`TIMEOUTS`). A value the user gives wins,
    in the options or in the environment (``AWS_RETRY_MODE``, ``AWS_MAX_ATTEMPTS``)."""
    options = {"default_block_size": BLOCK_SIZE, **options}
    config = dict(options.get("config_kwargs") or {})
    retries = dict(retries)
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
    problem = credentials_problem(options, lambda key: f"{where}.options.{key}")
    if problem:
        raise BindingError(problem)
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


class S3CheckpointStore(CheckpointStore):
    """The commit protocol on S3: :class:`~wmtp_core.CheckpointStore` with the S3 calls its
    hooks need: incomplete multipart uploads listed and aborted, and the lease written with
    conditional requests (``If-None-Match: *`` to create, ``If-Match`` on the ETag to replace).
    Every call goes through s3fs's ``call_s3``, so botocore retries it as the store's options say
    (:data:`RETRIES`, :data:`TIMEOUTS` for the ``s3`` sink) and s3fs translates its errors."""

    client_retries = "the S3 client's retries"

    @classmethod
    def with_defaults(cls, options, *, retries=None):
        """``options`` with the ``s3`` sink's settings under them (:func:`storage_options`):
        the multipart block size (:data:`BLOCK_SIZE`), botocore's ``retries`` (by default
        :data:`RETRIES`) and timeouts (:data:`TIMEOUTS`), unless given."""
        return storage_options(options, RETRIES if retries is None else retries)

    @classmethod
    def options_problem(cls, options, name):
        """A key without its secret, or a secret without its key (:func:`credentials_problem`)."""
        return credentials_problem(options, name)

    # -- incomplete uploads --------------------------------------------------------------
    def incomplete_uploads(self, run: str | None = None) -> list[Incomplete]:
        """The multipart uploads S3 lists under ``<root>/<run>/`` (every run's: under ``<root>/``)
        that were never completed nor aborted (see
        :meth:`wmtp_core.leftovers.Leftovers.incomplete_uploads`), each with the bytes of its
        parts."""
        bucket, root_key, _ = self.fs.split_path(self.root)
        root_key = f"{root_key.strip('/')}/" if root_key.strip("/") else ""
        prefix = root_key + (f"{check_run_name(run)}/" if run is not None else "")
        kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
        out, marks = [], {}
        while True:
            page = self.fs.call_s3("list_multipart_uploads", **kwargs)
            for upload in page.get("Uploads") or []:
                key = upload.get("Key", "")
                if not key.startswith(prefix):  # another run's: never ours
                    continue
                problem = self._not_ours(key[len(root_key):].split("/"), marks)
                started = upload.get("Initiated")
                path = f"{bucket}/{key}"
                out.append(Incomplete(kind="upload", uri=self.uri(path), path=path,
                                      bytes=self._uploaded(bucket, key, upload["UploadId"]),
                                      started=started.timestamp() if isinstance(started, dt.datetime) else None,
                                      upload_id=upload["UploadId"], ours=not problem, problem=problem))
            if not page.get("IsTruncated"):
                return out
            kwargs.update(KeyMarker=page.get("NextKeyMarker", ""),
                          UploadIdMarker=page.get("NextUploadIdMarker", ""))

    def _not_ours(self, parts: list[str], marks: dict[str, str]) -> str:
        """Why an upload to ``<run>/<dir>/<file>`` (``parts``) is not WMTP's; empty when it is.
        ``marks``: directories already looked at, and why each carries no mark of WMTP's."""
        if len(parts) < 3 or not RUN_NAME.fullmatch(parts[0]) or ".." in parts[0] or \
                not (STEP_DIR.fullmatch(parts[1]) or parts[1] == FINAL_NAME):
            return "not a file of a run's step_N or final directory"
        directory = posixpath.join(self.root, parts[0], parts[1])
        if directory not in marks:
            marks[directory] = self._unmarked(directory)
        return marks[directory]

    def _unmarked(self, directory: str) -> str:
        """Why ``directory`` carries no mark of WMTP's: neither its staging marker (a save began
        there) nor a manifest that passes every check; empty when it carries one."""
        self.fs.invalidate_cache(directory)
        try:
            listed = {posixpath.basename(e["name"].rstrip("/")): e.get("type")
                      for e in self.fs.ls(directory, detail=True)}
        except FileNotFoundError:
            listed = {}
        where = self.uri(directory)
        if listed.get(STAGING_MARKER) == "file":
            return ""
        if listed.get(MANIFEST) == "file":
            state = self.inspect_dir(directory)
            if state.state is CheckpointState.COMMITTED:
                return ""
            return f"the {MANIFEST} of {where} cannot be believed ({state.problem}): no mark of WMTP's"
        if not listed:
            return f"{where} holds nothing, so no {STAGING_MARKER} marker: no save of WMTP's began there"
        return f"{where} has no {MANIFEST} and no {STAGING_MARKER}: WMTP did not write it"

    def _uploaded(self, bucket: str, key: str, upload_id: str) -> int | None:
        """Bytes of the parts an incomplete upload holds (its first 1000 parts)."""
        try:
            page = self.fs.call_s3("list_parts", Bucket=bucket, Key=key, UploadId=upload_id)
        except (FileNotFoundError, OSError):
            return None
        return sum(int(p.get("Size") or 0) for p in page.get("Parts") or [])

    def abort_upload(self, upload: Incomplete) -> None:
        """Abort one incomplete upload: its parts are deleted. One that completed or was aborted
        meanwhile is left as it is."""
        bucket, key = upload.path.split("/", 1)
        try:
            self.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload.upload_id)
        except FileNotFoundError:  # NoSuchUpload: completed or aborted since it was listed
            pass

    # -- conditional writes (the run's lease) --------------------------------------------
    def read_tagged(self, path: str) -> tuple[bytes, str] | None:
        """The object and its ETag, the ETag read first: a content newer than it makes a later
        ``If-Match`` fail."""
        bucket, key, _ = self.fs.split_path(path)
        try:
            tag = self.fs.call_s3("head_object", Bucket=bucket, Key=key)["ETag"]
            self.fs.invalidate_cache(path)
            raw = self.fs.cat_file(path)
        except FileNotFoundError:
            return None
        return raw, tag

    def put_if_absent(self, path: str, data: bytes) -> bool:
        """A PUT with ``If-None-Match: *``."""
        bucket, key, _ = self.fs.split_path(path)
        try:
            self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        except FileExistsError:
            return False
        return True

    def put_if_unchanged(self, path: str, data: bytes, tag: str | None) -> bool:
        """A PUT with ``If-Match`` on the ETag ``tag``."""
        bucket, key, _ = self.fs.split_path(path)
        try:
            self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfMatch=tag)
        except (FileNotFoundError, OSError) as e:
            if isinstance(e, FileNotFoundError) or "Precondition" in str(e) or \
                    getattr(e, "errno", None) == errno.EINVAL:
                return False
            raise
        return True


class S3Sink(FileSink):
    """Objects in an S3-compatible store; large files in multipart uploads of ``BLOCK_SIZE``;
    faults retried by botocore and s3fs as :data:`RETRIES`, :data:`TIMEOUTS` and
    :data:`S3FS_ATTEMPTS` say."""

    store_class = S3CheckpointStore

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
        store=S3CheckpointStore,
        description="objects in any S3-compatible store via s3fs (resume, or final without a "
                    "registry; multipart for large files)",
        check=check,
    ))
