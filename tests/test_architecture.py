"""The layers, read from the code: what may import what (see docs/architecture.md).

The imports of every module are read with ``ast`` (including imports inside functions), so a
rule cannot be broken by a lazy import either.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENGINE = "wmtp_core.engine"
STORAGE = ("wmtp_core.commit", "wmtp_core.store_read", "wmtp_core.store_verify", "wmtp_core.leftovers",
           "wmtp_core.save_failures", "wmtp_core.conditional", "wmtp_core.filesink", "wmtp_core.router",
           "wmtp_core.asyncsave", "wmtp_core.checkpoint_models")
"""Where bytes are written and read. (``wmtp_core.tensors`` is shared by storage and engine.)"""


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports, absolute, at any depth of the code."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
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
    return {module_name(p): imports(p) for p in (ROOT / package.replace(".", "/")).rglob("*.py")}


def within(name: str, prefixes) -> bool:
    prefixes = (prefixes,) if isinstance(prefixes, str) else prefixes
    return any(name == p or name.startswith(p + ".") for p in prefixes)


CORE = modules("wmtp_core")
PLUGINS = modules("wmtp_plugins")


def test_the_engine_imports_no_storage_module():
    bad = {m: sorted(i for i in imps if within(i, STORAGE))
           for m, imps in CORE.items() if within(m, ENGINE)}
    assert not {m: i for m, i in bad.items() if i}, bad


def test_storage_imports_no_engine_module():
    storage = {m: imps for m, imps in {**CORE, **PLUGINS}.items()
               if within(m, STORAGE) or within(m, "wmtp_plugins")}
    bad = {m: sorted(i for i in imps if within(i, ENGINE)) for m, imps in storage.items()}
    assert not {m: i for m, i in bad.items() if i}, bad


@pytest.mark.parametrize("forbidden", ["mlflow", "wmtp_plugins"])
def test_wmtp_core_imports_neither_mlflow_nor_the_built_in_plugins(forbidden):
    bad = {m: sorted(i for i in imps if within(i, forbidden)) for m, imps in CORE.items()}
    assert not {m: i for m, i in bad.items() if i}, bad


def test_the_rules_can_fail():
    """The reader sees lazy and relative imports, so the rules above are not vacuous."""
    assert "wmtp_core.engine.trainer" in CORE["wmtp_core.session"]  # imported inside a method
    assert within("wmtp_core.engine.model", ENGINE) and not within("wmtp_core.engineering", ENGINE)
    assert "mlflow" in PLUGINS["wmtp_plugins.mlflow_registry"]


def test_the_public_names_a_third_party_sink_needs_are_exported():
    import wmtp_core

    for name in ("hookimpl", "SinkSpec", "Role", "Receipt", "Sink", "ResumableSink", "LoadedCheckpoint",
                 "FileSink", "CheckpointStore", "CheckpointError", "WmtpError", "Manifest"):
        assert getattr(wmtp_core, name) is not None


def test_importing_wmtp_core_loads_neither_torch_nor_mlflow():
    code = "import sys, wmtp_core, wmtp_core.cli; print(sorted(m for m in ('torch', 'mlflow') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
