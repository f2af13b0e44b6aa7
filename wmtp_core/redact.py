"""The one redaction rule: what counts as a secret, and how it is hidden wherever WMTP writes.

Applied to MLflow params and tags, console lines, log records, error messages, the run summary
and manifests. It covers:

- a **key** whose name contains ``key``, ``secret``, ``token``, ``password``/``passwd``,
  ``passphrase``, ``credential``, ``signature``, ``auth``, ``private``, ``session``, ``cookie``
  or ``connection string`` (case, ``_``, ``-``, ``.`` and spaces ignored: ``SSECustomerKey``,
  ``aws_secret_access_key``, ``ConnectionString`` and ``AccountKey`` all match). Its value
  becomes ``***``;
- the **user-info** part of a URL (``https://alice:pw@host`` -> ``https://***@host``);
- **signature query parameters** and ``name=value`` pairs whose name is secret by the rule
  above, or is ``sig`` (``?X-Amz-Signature=...``, ``&sig=...``, ``AccountKey=...;``);
- any **value known to be secret**: the values of secret keys in the configuration and of
  secret-named environment variables (``AWS_SECRET_ACCESS_KEY``, ``MLFLOW_TRACKING_PASSWORD``...),
  wherever they appear in text (a library's error message quoting one, for instance).

Keys of WMTP's own configuration that only look secret (``recipe.critic.token_spread``) are
listed in :data:`NOT_SECRET` and shown as they are.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from typing import Any, Iterable, Mapping

REDACTED = "***"

SECRET_WORDS = ("key", "secret", "token", "passw", "passphrase", "credential", "signature",
                "connectionstring", "auth", "private", "session", "cookie")
"""Substrings that make a key secret, matched on the key lowercased with separators removed."""

NOT_SECRET = frozenset({"recipe.critic.token_spread", "critic.token_spread"})
"""Full dotted names of WMTP's own settings that contain a secret word but hold no secret."""

MIN_KNOWN = 6
"""Known secret values shorter than this are not scrubbed from text (``"1"`` would blank out
every digit). Their keys are still redacted."""

_SEPARATORS = re.compile(r"[\s_.\-]")
# Each pattern is anchored on what it cannot do without ("://", "=", "%3D") and reads the name
# before it from a run found in one pass: the time is linear in the text, whatever its length
# (a 40 kB value used to take 17 s to redact, a hostile configuration could hang an error).
_SCHEME_RUN = re.compile(r"[a-z0-9+.\-]+", re.I)
_INFO = re.compile(r"[^/?#@\s]+@")
_NAME_RUN = re.compile(r"[A-Za-z0-9_.\-]+")
_VALUE = re.compile(r"[^&;\s'\"<>,)\]}]+")
_LETTER = re.compile(r"[A-Za-z]")

_lock = threading.Lock()
_known: set[str] = set()


def is_secret_key(name: Any, path: str | None = None) -> bool:
    """Whether a key's value must never be shown. ``path``: its full dotted name, checked
    against :data:`NOT_SECRET`."""
    if path is not None and path in NOT_SECRET:
        return False
    norm = _SEPARATORS.sub("", str(name).lower())
    return any(word in norm for word in SECRET_WORDS)


def remember(values: Iterable[Any]) -> None:
    """Add values that must be scrubbed from any text WMTP writes, for the process' lifetime."""
    with _lock:
        _known.update(str(v) for v in values if v is not None and len(str(v)) >= MIN_KNOWN)


def forget() -> None:
    """Forget every remembered value (between independent runs in one process, such as tests)."""
    with _lock:
        _known.clear()


def remember_environment(environ: Mapping[str, str] | None = None) -> None:
    """Remember the values of secret-named environment variables (AWS, MLflow, ...)."""
    env = os.environ if environ is None else environ
    remember(v for k, v in env.items() if is_secret_key(k))


def secrets_in(data: Any, path: str = "") -> list[str]:
    """Every value under a secret key in a nested mapping, and every URL password."""
    found: list[str] = []
    if isinstance(data, Mapping):
        for k, v in data.items():
            sub = f"{path}.{k}" if path else str(k)
            if is_secret_key(k, sub) and v is not None and not isinstance(v, (Mapping, list, tuple)):
                found.append(str(v))
            else:
                found += secrets_in(v, sub)
    elif isinstance(data, (list, tuple)):
        for v in data:
            found += secrets_in(v, path)
    elif isinstance(data, str):
        for _, info, _ in _userinfos(data):
            user, _, password = info.partition(":")
            found += [password or user]
    return found


def _userinfos(s: str) -> list[tuple[int, str, int]]:
    """Every ``scheme://user:password@`` in ``s`` as ``(start, user:password, end)`` of the
    user-info part: where a scheme (a letter, then letters, digits, ``+.-``) ends in ``://`` and
    what follows up to ``@`` holds no ``/?#@`` or space."""
    out = []
    for run in _SCHEME_RUN.finditer(s):  # every run once: no backtracking into it
        if not s.startswith("://", run.end()) or not _LETTER.search(run.group()):
            continue
        start = run.end() + 3
        info = _INFO.match(s, start)
        if info:
            out.append((start, info.group()[:-1], info.end() - 1))
    return out


def _pairs(s: str) -> list[tuple[str, int, int]]:
    """Every ``name=value`` (or ``name%3Dvalue``) in ``s`` as ``(name, start, end)`` of the
    value: a name (a letter, then letters, digits, ``_.-``) and a value up to ``&;`` space,
    a quote, ``<>,)]}``."""
    out, pos = [], 0
    for run in _NAME_RUN.finditer(s):  # every run once: no backtracking into it
        if run.start() < pos or not (s.startswith("=", run.end()) or s.startswith("%3D", run.end())):
            continue  # not a name, or inside the value of the pair before
        letter = _LETTER.search(run.group())
        if letter is None:
            continue
        sep = run.end() + (1 if s.startswith("=", run.end()) else 3)
        value = _VALUE.match(s, sep)
        if value:
            out.append((run.group()[letter.start():], value.start(), value.end()))
            pos = value.end()
    return out


def text(value: Any) -> str:
    """``value`` as text with every secret hidden."""
    s = str(value)
    if not s:
        return s
    s = _replace(s, [(start, end) for start, _, end in _userinfos(s)])
    s = _replace(s, [(start, end) for name, start, end in _pairs(s)
                     if is_secret_key(name) or name.lower() == "sig"])
    with _lock:
        known = sorted(_known, key=len, reverse=True)
    for secret in known:
        if secret in s:
            s = s.replace(secret, REDACTED)
    return s


def _replace(s: str, spans: list[tuple[int, int]]) -> str:
    """``s`` with each of the (ordered, disjoint) spans replaced by :data:`REDACTED`."""
    if not spans:
        return s
    parts, last = [], 0
    for start, end in spans:
        parts += [s[last:start], REDACTED]
        last = end
    return "".join(parts) + s[last:]


def value(key: str, v: Any, path: str | None = None) -> Any:
    """A value for display under ``key``: ``***`` when the key is secret, else scrubbed text."""
    if is_secret_key(key, path):
        return REDACTED
    if isinstance(v, str):
        return text(v)
    if isinstance(v, Mapping):
        return mapping(v, path)
    if isinstance(v, (list, tuple)):
        return [value(key, x, path) for x in v]
    return v


def mapping(data: Mapping[str, Any], path: str | None = None) -> dict[str, Any]:
    """A copy of a nested mapping with every secret hidden."""
    out = {}
    for k, v in data.items():
        sub = f"{path}.{k}" if path else str(k)
        out[k] = value(str(k), v, sub)
    return out


class RedactingStream:
    """A text stream that hides secrets in everything written through it (the console)."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, s: str) -> int:
        self._stream.write(text(s))
        return len(s)

    def __getattr__(self, name: str) -> Any:  # isatty, flush, fileno, encoding...
        return getattr(self._stream, name)


class RedactingFilter(logging.Filter):
    """Hides secrets in log records, whoever logs them (WMTP, MLflow, botocore...)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: let logging report it as it would
            return True
        record.msg, record.args = text(message), ()
        if record.exc_info and not record.exc_text:
            # formatters reuse exc_text when it is set: the traceback is scrubbed too
            record.exc_text = text(logging.Formatter().formatException(record.exc_info))
        return True


def install_logging_filter() -> None:
    """Attach :class:`RedactingFilter` to every handler of every logger that has one: the root
    logger's, and those libraries install for themselves (MLflow's do not propagate). Call it
    again after importing such a library; it is idempotent."""
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    for logger in loggers:
        for handler in logger.handlers:
            if not any(isinstance(f, RedactingFilter) for f in handler.filters):
                handler.addFilter(RedactingFilter())


class CurrentStderr:
    """Whatever ``sys.stderr`` is when written to (a handler made once keeps working when a
    notebook or test harness swaps the stream)."""

    def write(self, s: str) -> int:
        return sys.stderr.write(s)

    def flush(self) -> None:
        sys.stderr.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(sys.stderr, name)
