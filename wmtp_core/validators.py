"""The validators every attrs class of WMTP uses: one place for what "accepted" means.

Each builds an attrs validator whose error says what is accepted; the caller's error class
(``error=``) lets configuration, manifests and plugin specs raise their own family member.
"""

from __future__ import annotations

import copy
import math
import re
import types
from typing import Any, Callable, Mapping


def check(pred: Callable[[Any], bool], accepted: str, error: type[Exception] = ValueError):
    """A validator raising ``error(accepted)`` when ``pred(value)`` is false. The config loader
    adds the file, the key and the value to the message."""

    def validator(instance: Any, attribute: Any, value: Any) -> None:
        if not pred(value):
            raise error(accepted)

    validator.accepted = accepted  # what error messages elsewhere can quote
    return validator


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def int_range(lo: int, hi: int, error: type[Exception] = ValueError, *, or_null: bool = False):
    """An integer in [lo, hi] (``or_null``: or ``None``): huge values would overflow torch, a
    float or a message (or build a model forever)."""
    accepted = f"accepted: an integer from {lo:,} to {hi:,}" + (", or null for no limit" if or_null else "")
    return check(lambda v: (or_null and v is None) or (is_int(v) and lo <= v <= hi), accepted, error)


MAX_COUNT = 10**12
"""The most steps, or checkpoints, a count or an interval of the configuration may name
(``train.max_steps``, ``save_interval``, ``keep_last``, ``log_interval``, ...): a trillion steps
is 30 years at a thousand steps a second, and far below the counts where a float loses whole
steps (2**53) or torch's int64 counters overflow."""
MAX_REPEATS = 10**6
"""The most times a run may go over its data (``num_epochs``) or accumulate micro-batches in one
step (``grad_accum_steps``)."""
MAX_ROWS = 2**20
"""The most rows in a batch, or tokens in a row (``batch_size``, ``max_length``): a million."""
MAX_SECONDS = 365 * 24 * 3600
"""The longest duration a key may name (``distributed.timeout``, ``save_every``): a year."""

count = int_range(1, MAX_COUNT)
"""A count of steps or checkpoints, from 1 to :data:`MAX_COUNT`."""
count_or_zero = int_range(0, MAX_COUNT)
"""The same, or 0 (off)."""
count_or_null = int_range(1, MAX_COUNT, or_null=True)
"""The same, or null (no limit)."""


def shown(value: Any, limit: int = 120) -> str:
    """``repr(value)`` for a one-line message: at most ``limit`` characters, and an integer too
    long to print (Python refuses more than 4300 digits; a hexadecimal YAML integer can be
    longer) said in words."""
    try:
        text = repr(value)
    except ValueError:  # an int past sys.get_int_max_str_digits()
        text = f"an integer of {value.bit_length():,} bits" if isinstance(value, int) else f"a {type(value).__name__}"
    if len(text) <= limit:
        return text
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{text[:12]}...{text[-4:]} ({len(text.lstrip('-')):,} digits)"
    return text[:limit - 3] + "..."


def one_of(*values: Any, error: type[Exception] = ValueError):
    return check(lambda v: v in values, "accepted: " + ", ".join(repr(v) for v in values), error)


def full_match(pattern: str | re.Pattern, accepted: str, error: type[Exception] = ValueError):
    """A string that matches ``pattern`` entirely (``$`` would let a trailing newline through)."""
    rx = re.compile(pattern) if isinstance(pattern, str) else pattern
    return check(lambda v: isinstance(v, str) and rx.fullmatch(v) is not None, accepted, error)


positive_int = check(lambda v: is_int(v) and v >= 1, "accepted: an integer >= 1")
non_negative_int = check(lambda v: is_int(v) and v >= 0, "accepted: an integer >= 0")
positive = check(lambda v: is_number(v) and v > 0, "accepted: a number > 0")
non_negative = check(lambda v: is_number(v) and v >= 0, "accepted: a number >= 0")
fraction = check(lambda v: is_number(v) and 0 <= v <= 1, "accepted: a number between 0 and 1")
optional_positive_int = check(lambda v: v is None or (is_int(v) and v >= 1),
                              "accepted: an integer >= 1, or null for no limit")


SIZE_UNITS = (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3))
"""The units of a size, tried in this order (transformers' ``convert_file_size_to_int``)."""
SIZE_ACCEPTED = ("accepted: a size as transformers' save_pretrained reads it, an integer and a unit such as "
                 "'5GB', '500MB' or '10KiB' (KB, MB, GB: powers of 1000; KiB, MiB, GiB: of 1024; a lowercase "
                 "final b, as in '5Gb', counts bits), or a number of bytes (an integer >= 1); null: "
                 "transformers' own default")


def file_size(value: Any) -> int | None:
    """``value`` in bytes, read exactly as transformers' ``convert_file_size_to_int`` reads it
    (``"5GB"``, ``"10KiB"``, an integer), when that is at least one byte; else ``None``. Here so
    that a configuration is checked without importing transformers (1.7 s)."""
    if is_int(value):
        return value if value >= 1 else None
    if not isinstance(value, str):
        return None
    for unit, scale in SIZE_UNITS:
        if value.upper().endswith(unit):
            try:
                size = int(value[:-len(unit)]) * scale
            except ValueError:  # '5.5GB', 'five GB', more digits than Python prints
                return None
            if unit in ("GB", "MB", "KB") and value.endswith("b"):
                size //= 8
            return size if size >= 1 else None
    return None


def frozen_copy(value: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """A converter: a read-only copy, nested values included, so a frozen value never changes
    because the mapping it was built from did."""
    return types.MappingProxyType(copy.deepcopy(dict(value or {})))
