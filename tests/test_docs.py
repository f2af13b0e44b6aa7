"""Hook governance: every hook the plugin manager knows is documented in docs/hooks.md with its
exact signature, has a docstring for each parameter, and has a test named after it."""

import inspect
import re
from pathlib import Path

import pytest

from wmtp_core import hookspecs
from wmtp_core.plugins import make_plugin_manager

ROOT = Path(__file__).resolve().parent.parent
HOOKS_MD = ROOT / "docs" / "hooks.md"
TESTS = ROOT / "tests"
HOOKS = sorted(name for name in vars(make_plugin_manager(entry_points=False).hook) if name.startswith("wmtp_"))


def documented_signature(name: str) -> str:
    """``name(arg: Type, ...) -> Ret`` spelled from the hookspec's annotations."""
    fn = getattr(hookspecs, name)
    params = ", ".join(f"{p}: {fn.__annotations__[p]}" for p in inspect.signature(fn).parameters)
    return f"{name}({params}) -> {fn.__annotations__['return']}"


def test_the_hooks_are_the_hookspecs():
    assert HOOKS == sorted(n for n in dir(hookspecs) if n.startswith("wmtp_")) and len(HOOKS) >= 9


@pytest.mark.parametrize("name", HOOKS)
def test_hook_has_documented_signature(name):
    assert f"`{documented_signature(name)}`" in HOOKS_MD.read_text(), (
        f"docs/hooks.md lacks the signature `{documented_signature(name)}` (as a heading in backticks)")


@pytest.mark.parametrize("name", HOOKS)
def test_hook_has_a_test_named_after_it(name):
    source = "\n".join(p.read_text() for p in TESTS.glob("test_*.py"))
    assert f"def test_{name}" in source, f"no test named test_{name}"


@pytest.mark.parametrize("name", HOOKS)
def test_hook_has_a_docstring_with_params(name):
    fn = getattr(hookspecs, name)
    doc = inspect.getdoc(fn) or ""
    assert doc, name
    for p in inspect.signature(fn).parameters:
        assert f":param {p}:" in doc, f"{name} does not document :param {p}:"


def test_docs_name_no_hook_that_does_not_exist():
    named = set(re.findall(r"`(wmtp_[a-z_]+)\(", HOOKS_MD.read_text()))
    assert named <= set(HOOKS), f"docs/hooks.md documents unknown hooks: {named - set(HOOKS)}"
