"""The map is the test: the layer table of docs/architecture.md, read from the code.

The table in the doc places every module of ``wmtp_core`` in one layer and says what each layer
may import; the imports of every module are read with ``ast`` (including imports inside
functions, but not those under ``if TYPE_CHECKING:``, which never run), so a rule cannot be
broken by a lazy import either. Each rule is also shown to fail on a module that breaks it.

The sizes are rules too: no module of ``wmtp_core`` or ``wmtp_plugins`` over 420 lines, no function
or method over 50.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "architecture.md"

MAY_IMPORT = {
    "values": {"values"},
    "storage": {"values", "storage"},
    "engine": {"values", "engine"},
    "orchestration": {"values", "storage", "engine", "orchestration"},
    "faces": {"values", "storage", "engine", "orchestration", "faces"},
    "kit": {"values", "storage", "engine", "kit"},
    "public": {"values", "storage"},
}
"""Which layers a module of each layer may import (the table's last column, as data)."""

DCP = "torch.distributed.checkpoint"
"""The one part of ``torch.distributed`` storage uses: DCP's readers and writers of shards.
Every collective goes through the coordinator the engine hands in."""

SINK_HANDLERS = ("wmtp_core.router", "wmtp_core.resume", "wmtp_core.session", "wmtp_core.registering",
                 "wmtp_core.bindings", "wmtp_core.cli.commands", "wmtp_core.cli.gc", "wmtp_core.cli.holdings",
                 "wmtp_core.cli.inventory", "wmtp_core.testing", "wmtp_plugins.tiered")
"""Modules that hold sinks: none of them asks a sink whether it has a method."""


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def imports_of(source: str, name: str, is_package: bool = False) -> set[str]:
    """Every module ``source`` (the module ``name``) imports, absolute, at any depth."""
    tree = ast.parse(source)
    skip = _type_checking_only(tree)
    package = name if is_package else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)  # `from pkg import module`
    return out


def modules(package: str) -> dict[str, set[str]]:
    return {module_name(p): imports_of(p.read_text(), module_name(p), p.name == "__init__.py")
            for p in (ROOT / package).rglob("*.py")}


def layer_table(text: str) -> dict[str, str]:
    """``{module prefix: layer}`` from the doc's layer table: each row names its layer in bold
    (its first word) and its modules in backticks."""
    layers = {}
    for row in re.findall(r"^\| \*\*(\w+)\*\*[^|]*\| ([^|]+) \|", text, re.M):
        for module in re.findall(r"`([\w./*]+)`", row[1]):
            layers[module.removesuffix("/*").removesuffix(".py").replace("/", ".")] = row[0]
    return layers


def layer_of(module: str, table: dict[str, str]) -> str | None:
    """The layer of a ``wmtp_core`` module: the longest entry of the table that names it or a
    package above it."""
    if module == "wmtp_core":
        return "public"  # __init__.py: the names a plugin imports
    rel = module.removeprefix("wmtp_core").removeprefix(".")
    best = max((p for p in table if rel == p or rel.startswith(p + ".")), key=len, default=None)
    return table[best] if best is not None else None


def within(name: str, prefixes) -> bool:
    prefixes = (prefixes,) if isinstance(prefixes, str) else prefixes
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def violations(core: dict[str, set[str]], plugins: dict[str, set[str]], table: dict[str, str]) -> list[str]:
    """Every broken rule, one line each."""
    out = []
    for module, imported in core.items():
        layer = layer_of(module, table)
        if layer is None:
            out.append(f"{module}: placed in no layer of docs/architecture.md")
            continue
        for dep in sorted(imported):
            if within(dep, ("mlflow", "wmtp_plugins")):
                out.append(f"{module} imports {dep}: wmtp_core never imports mlflow or the built-in plugins")
            target = layer_of(dep, table) if _is_module(dep, core) else None
            if target is not None and target not in MAY_IMPORT[layer]:
                out.append(f"{module} ({layer}) imports {dep} ({target})")
            if layer == "storage" and within(dep, "torch.distributed") and not within(dep, DCP):
                out.append(f"{module} (storage) imports {dep}: storage agrees with other ranks only "
                           "through its Coordinator")
    for module, imported in plugins.items():
        for dep in sorted(imported):
            if within(dep, "wmtp_plugins") and dep != module and not _private(dep) and _is_module(dep, plugins):
                out.append(f"{module} imports {dep}: a plugin imports no other plugin")
            if dep.startswith("wmtp_core.") and _is_module(dep, core):
                target = layer_of(dep, table)
                if target not in MAY_IMPORT["storage"]:
                    out.append(f"{module} (plugin) imports {dep} ({target})")
            if within(dep, "torch.distributed") and not within(dep, DCP):
                out.append(f"{module} (plugin) imports {dep}: a sink agrees with other ranks only "
                           "through its Coordinator")
    return out


def _is_module(name: str, known: dict[str, set[str]]) -> bool:
    """A module of the package (not the package itself: ``from wmtp_core import redact`` is
    read as an import of ``wmtp_core.redact``)."""
    return name in known and "." in name


def _private(name: str) -> bool:
    return name.split(".")[1].startswith("_") if name.count(".") >= 1 else False


CORE = modules("wmtp_core")
PLUGINS = modules("wmtp_plugins")
TABLE = layer_table(DOC.read_text())


def test_every_module_is_on_the_map_and_every_rule_holds():
    assert not violations(CORE, PLUGINS, TABLE), "\n".join(violations(CORE, PLUGINS, TABLE))


def test_the_map_places_no_module_that_does_not_exist():
    missing = [p for p in TABLE if not any(layer_of(m, {p: "x"}) for m in CORE)]
    assert not missing, f"docs/architecture.md places modules that do not exist: {missing}"


@pytest.mark.parametrize("module, dep, rule", [
    ("wmtp_core.session", "wmtp_core.cli.commands", "orchestration) imports wmtp_core.cli.commands (faces"),
    ("wmtp_core.events", "wmtp_core.commit", "values) imports wmtp_core.commit (storage"),
    ("wmtp_core.manifest", "wmtp_core.engine.trainer", "values) imports wmtp_core.engine.trainer (engine"),
    ("wmtp_core.filesink", "wmtp_core.engine.distributed", "storage) imports wmtp_core.engine.distributed (engine"),
    ("wmtp_core.engine.trainer", "wmtp_core.router", "engine) imports wmtp_core.router (storage"),
    ("wmtp_core.filesink", "torch.distributed", "through its Coordinator"),
    ("wmtp_core.router", "mlflow", "never imports mlflow"),
    ("wmtp_plugins.tiered", "wmtp_plugins.s3", "a plugin imports no other plugin"),
    ("wmtp_plugins.tiered", "wmtp_core.session", "(plugin) imports wmtp_core.session"),
])
def test_each_rule_fails_when_it_is_broken(module, dep, rule):
    core = {m: set(i) for m, i in CORE.items()}
    plugins = {m: set(i) for m, i in PLUGINS.items()}
    (plugins if module.startswith("wmtp_plugins") else core)[module].add(dep)
    assert any(rule in v for v in violations(core, plugins, TABLE)), (module, dep)


def test_an_unplaced_module_fails():
    core = {**CORE, "wmtp_core.newthing": set()}
    assert "wmtp_core.newthing: placed in no layer of docs/architecture.md" in violations(core, PLUGINS, TABLE)


def test_the_reader_sees_lazy_imports_and_skips_type_checking_ones():
    source = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from wmtp_core.commit import X\n"
              "def f():\n    from wmtp_core.engine import trainer\n")
    found = imports_of(source, "wmtp_core.x")
    assert "wmtp_core.engine.trainer" in found and "wmtp_core.commit" not in found
    assert "wmtp_core.engine.trainer" in CORE["wmtp_core.session"]  # imported inside a method


def _probes(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    return [f"{path.name}:{n.lineno}" for n in ast.walk(tree)
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in ("getattr", "hasattr")]


def test_no_module_that_holds_sinks_probes_one():
    """Every operation is declared by ``Sink``/``ResumableSink`` with its default: a caller
    calls it, it never asks whether it exists (``getattr``/``hasattr``)."""
    found = [hit for m in SINK_HANDLERS for hit in _probes(ROOT / (m.replace(".", "/") + ".py"))]
    assert not found, found


def test_the_probe_check_can_fail(tmp_path):
    probe = tmp_path / "x.py"
    probe.write_text("def close(sink):\n    f = getattr(sink, 'close', None)\n    return hasattr(sink, 'held')\n")
    assert _probes(probe) == ["x.py:2", "x.py:3"]


MAX_MODULE_LINES = 420
"""A module of ``wmtp_core`` or ``wmtp_plugins`` is at most this long (about 400 is the aim)."""
MAX_FUNCTION_LINES = 50
"""A function or method, counted from its ``def`` line to its last line, docstring included."""


def _functions(node: ast.AST, prefix: str = ""):
    """``(qualified name, node)`` of every function and method under ``node``, in source order."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            name = f"{prefix}{child.name}"
            if not isinstance(child, ast.ClassDef):
                yield name, child
            yield from _functions(child, name + ".")
        else:
            yield from _functions(child, prefix)


def _too_long(path: Path) -> list[str]:
    """The module at ``path`` if it is over :data:`MAX_MODULE_LINES`, then each of its functions
    over :data:`MAX_FUNCTION_LINES`, one line each."""
    text = path.read_text()
    label = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
    lines = len(text.splitlines())
    out = [f"{label}: {lines} lines (at most {MAX_MODULE_LINES} a module)"] if lines > MAX_MODULE_LINES else []
    for name, node in _functions(ast.parse(text)):
        size = node.end_lineno - node.lineno + 1
        if size > MAX_FUNCTION_LINES:
            out.append(f"{label}:{node.lineno} {name}: {size} lines (at most {MAX_FUNCTION_LINES} a function)")
    return out


def test_no_module_and_no_function_is_too_long():
    """A long module is split by concept, a long function into helpers that each do one thing."""
    found = [hit for package in ("wmtp_core", "wmtp_plugins")
             for path in sorted((ROOT / package).rglob("*.py")) for hit in _too_long(path)]
    assert not found, "\n".join(found)


def test_the_size_check_can_fail(tmp_path):
    long = tmp_path / "long.py"
    method = "class A:\n    def f(self):\n" + "".join(f"        x = {i}\n" for i in range(50))  # 51 lines
    function = "def g():\n" + "".join(f"    y = {i}\n" for i in range(49))  # 50 lines: allowed
    long.write_text(method + function + "z = 0\n" * (421 - 52 - 50))
    assert _too_long(long) == ["long.py: 421 lines (at most 420 a module)",
                               "long.py:2 A.f: 51 lines (at most 50 a function)"]
    long.write_text(function + "z = 0\n" * (420 - 50))
    assert _too_long(long) == []


def test_the_public_names_a_third_party_sink_needs_are_exported():
    import wmtp_core

    for name in ("hookimpl", "SinkSpec", "Role", "Receipt", "Sink", "ResumableSink", "LoadedCheckpoint",
                 "FileSink", "CheckpointStore", "CheckpointError", "WmtpError", "Manifest", "Coordinator"):
        assert getattr(wmtp_core, name) is not None


def test_importing_wmtp_core_loads_neither_torch_nor_mlflow():
    code = "import sys, wmtp_core, wmtp_core.cli; print(sorted(m for m in ('torch', 'mlflow') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
