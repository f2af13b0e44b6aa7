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


def int_range(lo: int, hi: int, error: type[Exception] = ValueError):
    """An integer in [lo, hi]: huge values would overflow torch (or build a model forever)."""
    return check(lambda v: is_int(v) and lo <= v <= hi, f"accepted: an integer from {lo} to {hi}", error)


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


def frozen_copy(value: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """A converter: a read-only copy, nested values included, so a frozen value never changes
    because the mapping it was built from did."""
    return types.MappingProxyType(copy.deepcopy(dict(value or {})))
