"""The ``tiered`` sink's options, checked before anything is written (also under ``--dry-run``):
its two tiers, how many checkpoints the fast one keeps, and the durable tier's storage options
(every other ``options`` key)."""

from __future__ import annotations

from typing import Any

import fsspec
from fsspec.core import split_protocol

from wmtp_core import BindingError
from wmtp_core.base_paths import check_base_path
from wmtp_core.commit import store_class_of
from wmtp_core.validators import MAX_COUNT, is_int, shown

FAST_KEEP_LAST = 1
"""Committed checkpoints kept on the fast tier when ``fast_keep_last`` is not set."""
RETRIES = {"max_attempts": 5, "mode": "standard"}
"""botocore's retries for an S3 durable tier, unless ``config_kwargs.retries`` is given."""
TIER_KEYS = ("fast", "durable", "fast_keep_last", "fast_scope", "node_timeout_s")
SCOPES = ("node", "shared")
"""``fast_scope``: each node's fast tier is its own disk (``node``, the default), or one
filesystem every node sees (``shared``: NFS, Lustre). Only a job that spans nodes tells them apart."""
NODE_TIMEOUT_S = 120.0
"""``node_timeout_s``: how long rank 0 waits for a node whose heartbeat stopped changing."""


def tiers(options: Any, where: str = "storage.resume") -> tuple[str, str, int]:
    """``(fast, durable, fast_keep_last)`` from the sink's options, or a :class:`BindingError`
    naming the key (``where``: the config key of the binding)."""
    urls = []
    for key, example in (("fast", "file:///local/disk/checkpoints"), ("durable", "s3://bucket/checkpoints")):
        url = options.get(key)
        if not url or not isinstance(url, str):
            raise BindingError(f"{where}.options.{key}: sink 'tiered' needs a {key} tier; set {where}.options.{key} to "
                               f"a URL (e.g. {example!r}), got {url!r}")
        protocol = split_protocol(url)[0] or "file"
        if protocol not in fsspec.available_protocols():
            raise BindingError(f"{where}.options.{key}: {url!r} uses protocol {protocol!r}, which fsspec does "
                               "not know; use a local path or an s3:// URL")
        check_base_path(url, f"{where}.options.{key}: the {key} tier")
        urls.append(url)
    if urls[0].rstrip("/") == urls[1].rstrip("/"):
        raise BindingError(f"{where}.options.durable: {urls[1]!r} is the fast tier too; the durable tier is "
                           "another place (for example s3://)")
    keep = options.get("fast_keep_last")
    if keep is None:
        keep = FAST_KEEP_LAST
    if not is_int(keep) or not 1 <= keep <= MAX_COUNT:
        raise BindingError(f"{where}.options.fast_keep_last: {shown(keep)} is not accepted; accepted: an "
                           f"integer from 1 to {MAX_COUNT:,}")
    return urls[0], urls[1], keep


def scope(options: Any, where: str = "storage.resume") -> tuple[str, float]:
    """``(fast_scope, node_timeout_s)`` from the sink's options, or a :class:`BindingError`."""
    value = options.get("fast_scope")
    if value is None:
        value = "node"
    if value not in SCOPES:
        raise BindingError(f"{where}.options.fast_scope: {shown(value)} is not accepted; accepted: "
                           f"{' or '.join(SCOPES)} (node: each node's fast tier is its own disk; shared: one "
                           "filesystem every node sees)")
    timeout = options.get("node_timeout_s")
    if timeout is None:
        timeout = NODE_TIMEOUT_S
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 86400:
        raise BindingError(f"{where}.options.node_timeout_s: {shown(timeout)} is not accepted; accepted: a "
                           "number of seconds above 0, at most 86400")
    return value, float(timeout)


def _where(binding: Any) -> str:
    """``c.yaml: storage.resume`` from the binding's origin ``c.yaml: storage.resume.sink``."""
    origin = binding.origin
    return origin.removesuffix(".sink") if origin.endswith(".sink") else f"{origin}: storage.{binding.role.value}"


def check(binding) -> None:
    """``tiered`` needs both tiers: a missing ``fast`` or ``durable`` is refused before anything
    is written (also under ``--dry-run``), and so are durable storage options its store says
    cannot work (an S3 key without its secret)."""
    where = _where(binding)
    _, durable, _ = tiers(binding.options, where)
    scope(binding.options, where)
    rest = {k: v for k, v in binding.options.items() if k not in TIER_KEYS}
    problem = store_class_of(durable).options_problem(rest, lambda key: f"{where}.options.{key}")
    if problem:
        raise BindingError(problem)


def durable_options(url: str, options: dict[str, Any]) -> dict[str, Any]:
    """Storage options of the durable tier: what the store of its protocol needs under them
    (``with_defaults``; for S3: the ``s3`` sink's multipart block size and botocore's retries,
    :data:`RETRIES`) unless given."""
    return store_class_of(url).with_defaults(options, retries=RETRIES)
