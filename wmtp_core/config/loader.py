"""YAML to attrs, with errors that name the file, the key, the bad value and what is accepted."""

from __future__ import annotations

import difflib
import re
import types
import typing
from collections.abc import Hashable
from typing import Any, Mapping

import attrs
import fsspec
import yaml

from wmtp_core import redact
from wmtp_core.bounded import read_bounded
from wmtp_core.errors import ConfigError
from wmtp_core.validators import shown


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses duplicate keys: PyYAML silently keeps the last one."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        # PyYAML lets Python's own errors escape for values such as `2024-13-01` or `!!int x`.
        try:
            return super().construct_object(node, deep=deep)
        except ConfigError:
            raise
        except (ValueError, TypeError, KeyError, OverflowError) as e:
            raise ConfigError(
                f"{self.name}: line {node.start_mark.line + 1}: {shown(node.value)} cannot be read as "
                f"{node.tag.rsplit(':', 1)[-1]} ({type(e).__name__}: {e})"
            ) from None


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # `<<: *defaults` then `lr: 0.1`: an explicit key overrides a merged one
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, Hashable):
            raise ConfigError(
                f"{loader.name}: line {key_node.start_mark.line + 1}: a "
                f"{'list' if isinstance(key, list) else 'mapping'} cannot be a key; keys are names "
                "such as `seed` or `paths`"
            )
        if key in seen:
            first = seen[key].start_mark.line + 1
            raise ConfigError(
                f"{loader.name}: line {key_node.start_mark.line + 1}: key {key!r} appears twice in "
                f"the same mapping (first on line {first}); YAML would silently keep only the last. "
                "Keep one of them"
            )
        seen[key] = key_node
    loader.flatten_mapping(node)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
# YAML 1.1 (PyYAML) reads `lr: 1e-3` as the string "1e-3"; recipes are full of such numbers, so
# read exponent floats without a dot as YAML 1.2 does. (add_implicit_resolver copies the table:
# yaml.SafeLoader itself is unchanged.)
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


MAX_BYTES = 1 << 20
"""A config or recipe file is at most 1 MiB: real ones are a few kilobytes."""
MAX_VALUES = 100_000
"""Values in a file once every alias is expanded. A few lines of YAML aliases can stand for
billions of values (an "alias bomb"); such a file is refused before anything expands it."""
MAX_DEPTH = 64
"""Nesting depth of mappings and lists."""


def load_yaml(url: str) -> dict[str, Any]:
    """Read one YAML mapping from any fsspec URL, refusing duplicate keys."""
    try:  # a FIFO or a link to /dev/zero is refused, never read
        fs, path = fsspec.core.url_to_fs(url)
        text = read_bounded(fs, path, MAX_BYTES, "a config or recipe",
                            where=f"{url}:", error=ConfigError).decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{url}: file not found") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{url}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
    except (OSError, ValueError, ImportError) as e:  # a folder, no permission, unknown protocol
        raise ConfigError(f"{url}: cannot be read ({type(e).__name__}: {e})") from None
    return parse_yaml(text, name=url)


def parse_yaml(text: str, name: str = "<string>") -> dict[str, Any]:
    try:
        loader = _UniqueKeyLoader(text)  # refuses control characters already
    except yaml.YAMLError as e:
        raise _yaml_error(name, text, e) from None
    loader.name = name
    try:
        node = loader.get_single_node()
        if node is not None:
            _check_size(node, name)
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        raise _yaml_error(name, text, e) from None
    except RecursionError:
        raise ConfigError(f"{name}: nested too deeply; at most {MAX_DEPTH} levels of mappings "
                          "and lists are accepted") from None
    finally:
        loader.dispose()
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{name}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


_TAG = re.compile(r"could not determine a constructor for the tag '([^']*)'")


def _yaml_error(name: str, text: str, e: yaml.YAMLError) -> ConfigError:
    """PyYAML's error (three to five lines: the problem, the context, an excerpt with a caret)
    as one line: the file, the line and column, what is wrong and what is accepted."""
    if isinstance(e, yaml.reader.ReaderError):  # a character YAML does not allow, anywhere
        line = text.count("\n", 0, e.position) + 1
        column = e.position - (text.rfind("\n", 0, e.position) + 1) + 1
        char = chr(e.character) if isinstance(e.character, int) else str(e.character)
        return ConfigError(f"{name}: line {line}, column {column}: the character {char!r} "
                           f"(U+{ord(char):04X}) is not accepted; accepted: printable UTF-8 text, tabs "
                           "and line breaks (write such a character as an escape in a double-quoted "
                           "string, e.g. \"\\x07\")")
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    where = f"{name}: line {mark.line + 1}, column {mark.column + 1}" if mark is not None else name
    problem = " ".join(str(getattr(e, "problem", None) or e).split())
    tag = _TAG.search(problem)
    if tag:
        shown_tag = tag.group(1).replace("tag:yaml.org,2002:", "!!")
        return ConfigError(f"{where}: the tag {shown_tag!r} is not accepted; accepted: plain YAML "
                           "(mappings, lists, strings, numbers, true/false, null): a config never "
                           "builds Python objects")
    context = " ".join(str(getattr(e, "context", None) or "").split())
    return ConfigError(f"{where}: not valid YAML: {problem}" + (f" ({context})" if context else ""))


def _check_size(root: yaml.Node, name: str) -> None:
    """Refuse a document that expands to more than MAX_VALUES values or nests deeper than
    MAX_DEPTH, counting each alias as the whole subtree it stands for, without expanding it:
    each node's expanded size is computed once (aliases make the document a graph)."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: yaml.Node, depth: int) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if depth > MAX_DEPTH:
            raise ConfigError(f"{name}: line {node.start_mark.line + 1}: nested deeper than "
                              f"{MAX_DEPTH} levels of mappings and lists; that is not accepted")
        if key in active:
            raise ConfigError(f"{name}: line {node.start_mark.line + 1}: an alias refers to a "
                              "mapping or list that contains it; recursive YAML is not accepted")
        total = 1
        if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
            active.add(key)
            children = ([n for pair in node.value for n in pair]
                        if isinstance(node, yaml.MappingNode) else node.value)
            for child in children:
                total += size(child, depth + 1)
                if total > MAX_VALUES:
                    raise ConfigError(
                        f"{name}: line {node.start_mark.line + 1}: expands to more than "
                        f"{MAX_VALUES} values once its aliases (*name) are expanded; that is not "
                        "accepted (a config is a few hundred values)")
            active.discard(key)
        sizes[key] = total
        return total

    size(root, 0)


def key_of(field: attrs.Attribute) -> str:
    return field.metadata.get("key", field.name)


def structure(cls: type, data: Any, *, source: str, path: str = "") -> Any:
    """Build ``cls`` (an attrs class) from plain YAML data, checking every key and value."""
    where = f"{source}: {path or 'top level'}"
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping of keys, got {shown(data)}")
    attrs.resolve_types(cls)
    fields = {key_of(f): f for f in attrs.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(str(k), list(fields), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}? Accepted keys here" if close else "; accepted keys here"
        raise ConfigError(f"{source}: {_join(path, k)}: unknown key{hint}: {', '.join(sorted(fields))}")
    kwargs = {}
    for key, f in fields.items():
        if key in data:
            kwargs[f.alias or f.name] = _value(f.type, data[key], source=source, path=_join(path, key),
                                               accepted=getattr(f.validator, "accepted", ""))
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise _field_error(cls, e, data, source, path) from None
    except TypeError as e:
        missing = [key_of(f) for f in attrs.fields(cls) if f.default is attrs.NOTHING and key_of(f) not in data]
        if missing:
            raise ConfigError(f"{where}: required key {missing[0]!r} is missing") from None
        raise ConfigError(f"{where}: {e}") from None


def _field_error(cls: type, e: ValueError, data: Mapping, source: str, path: str) -> ConfigError:
    # attrs validators run in field order; find the field whose value the message is about.
    msg = str(e)
    for f in attrs.fields(cls):
        if f.validator is None:
            continue
        key = key_of(f)
        value = data.get(key, f.default.factory() if isinstance(f.default, attrs.Factory) else f.default)
        try:  # the validator sees what attrs gives it: the value after the field's converter
            f.validator(None, f, f.converter(value) if f.converter is not None else value)
        except ValueError:
            return ConfigError(f"{source}: {_join(path, key)}: {shown(value)} is not accepted; {msg}")
    return ConfigError(f"{source}: {path or 'top level'}: {msg}")


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


_SCALARS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _value(tp: Any, value: Any, *, source: str, path: str, accepted: str = "") -> Any:
    """``value`` checked against the type ``tp``; ``accepted``: what the field's validator
    accepts, quoted when the type already rules the value out."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _value(inner[0], value, source=source, path=path, accepted=accepted)
        return value
    if value is None:
        raise ConfigError(f"{source}: {path}: null is not accepted; expected {_describe(tp)}")
    if attrs.has(tp):
        return structure(tp, value, source=source, path=path)
    if origin is list:
        return _list(args, value, source=source, path=path)
    if origin is dict:
        return _mapping(args, value, source=source, path=path)
    return _scalar(tp, value, source=source, path=path, accepted=accepted)


def _list(args: tuple, value: Any, *, source: str, path: str) -> list:
    """A list (a comma-separated string for a list of strings), each item checked."""
    if isinstance(value, str) and args and args[0] is str:
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list):
        raise ConfigError(f"{source}: {path}: {shown(value)} is not accepted; expected a list")
    return [_value(args[0], v, source=source, path=f"{path}[{i}]") for i, v in enumerate(value)] if args else value


def _mapping(args: tuple, value: Any, *, source: str, path: str) -> dict:
    """A mapping (of strings: each value checked)."""
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: {path}: {shown(value)} is not accepted; expected a mapping")
    if args and args[1] is str:
        for k, v in value.items():
            if not isinstance(v, str):
                raise ConfigError(f"{source}: {_join(path, k)}: {shown(v)} is not accepted; expected a string")
    return dict(value)


def _scalar(tp: Any, value: Any, *, source: str, path: str, accepted: str) -> Any:
    """A bool, an integer, a number or a string as ``tp`` says (any other type: as it is)."""
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {path}: {shown(value)} is not accepted; expected true or false")
        return value
    if tp is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{source}: {path}: {shown(value)} is not accepted; expected an integer")
        return value
    if tp is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(f"{source}: {path}: {shown(value)} is not accepted; expected a number")
        return float(value)
    if tp is str:
        also = f" ({accepted})" if accepted else ""
        if isinstance(value, bool):
            raise ConfigError(
                f"{source}: {path}: {shown(value)} is not accepted; expected a string{also}. YAML reads a "
                "bare yes/no/on/off/true/false as a boolean: quote it, e.g. \"no\""
            )
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {path}: {shown(value)} is not accepted; expected a string{also}")
        return value
    return value


def _describe(tp: Any) -> str:
    if attrs.has(tp):
        return "a mapping"
    return _SCALARS.get(tp, str(tp))


def unused_keys(obj: Any, data: Mapping[str, Any] | None, path: str = "") -> list[str]:
    """Keys the user set that WMTP accepts for compatibility but does not act on."""
    out = []
    if not attrs.has(type(obj)) or not isinstance(data, Mapping):
        return out
    for f in attrs.fields(type(obj)):
        key = key_of(f)
        if key not in data:
            continue
        if f.metadata.get("unused"):
            out.append(_join(path, key))
        else:
            out.extend(unused_keys(getattr(obj, f.name), data[key], _join(path, key)))
    return out


def to_plain(obj: Any) -> Any:
    """attrs instance -> plain dict with the YAML key names."""
    if attrs.has(type(obj)):
        return {key_of(f): to_plain(getattr(obj, f.name)) for f in attrs.fields(type(obj))}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``, with every secret hidden (:mod:`wmtp_core.redact`):
    a mapping under a secret key collapses into one ``***``."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = _join(prefix, k)
        if redact.is_secret_key(k, key):
            out[key] = None if v is None else redact.REDACTED
        elif isinstance(v, Mapping) and v:
            out.update(flatten(v, key))
        else:
            out[key] = redact.value(str(k), v, key)
    return out
