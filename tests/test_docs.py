"""Hook governance: every hook is documented in docs/hooks.md with its exact signature."""

import inspect
from pathlib import Path

from wmtp_core import hookspecs

ROOT = Path(__file__).resolve().parent.parent
HOOKS_MD = ROOT / "docs" / "hooks.md"
TESTS = ROOT / "tests"


def hook_names():
    return sorted(n for n in dir(hookspecs) if n.startswith("wmtp_"))


def documented_signature(name: str) -> str:
    """``name(arg: Type, ...) -> Ret`` spelled from the hookspec's annotations."""
    fn = getattr(hookspecs, name)
    params = ", ".join(f"{p}: {fn.__annotations__[p]}" for p in inspect.signature(fn).parameters)
    return f"{name}({params}) -> {fn.__annotations__['return']}"


def test_every_hook_has_documented_signature():
    text = HOOKS_MD.read_text()
    missing = [documented_signature(n) for n in hook_names() if f"`{documented_signature(n)}`" not in text]
    assert not missing, f"docs/hooks.md lacks these signatures (as headings in backticks): {missing}"


def test_docs_name_no_hook_that_does_not_exist():
    import re

    text = HOOKS_MD.read_text()
    named = set(re.findall(r"`(wmtp_[a-z_]+)\(", text))
    assert named <= set(hook_names()), f"docs/hooks.md documents unknown hooks: {named - set(hook_names())}"


def test_every_hook_has_a_test_named_after_it():
    source = "\n".join(p.read_text() for p in TESTS.glob("test_*.py"))
    untested = [n for n in hook_names() if f"def test_{n}" not in source]
    assert not untested, f"hooks without a test named test_<hook>: {untested}"


def test_every_hook_has_a_docstring_with_params():
    for name in hook_names():
        fn = getattr(hookspecs, name)
        doc = inspect.getdoc(fn) or ""
        assert doc, name
        for p in inspect.signature(fn).parameters:
            assert f":param {p}:" in doc, f"{name} does not document :param {p}:"
