"""The docs agree with the code: the roles they give each sink and policy are the ones the
plugins register, and their YAML examples load.

Sinks and roles. The catalog is built as ``wmtp plugins`` builds it (every installed plugin
through the ``wmtp`` entry points). Every place in README.md and docs/*.md that gives a sink or
policy its roles is checked against it:

- a table row with a cell ``sink `NAME` ...`` or ``policy `NAME` ...``: the next cell holds the
  roles (the README's plugin table);
- a table under a header ``| sink | roles |`` (or ``| policy | roles |``): ``| `NAME` | roles |``;
- running text ``NAME (resume, final; ...)`` or ``NAME (final)``: a sink or policy name, then in
  parentheses nothing but role names up to ``;`` or ``)``;
- the list an error prints, ``installed sinks: ...``, is exactly what the catalog prints.

Every built-in sink and policy (the ones pyproject.toml's ``wmtp`` entry points declare) has a
row in the README's plugin table.

YAML blocks. Every ```` ```yaml ```` block in README.md and docs/*.md parses with
``yaml.safe_load``. Each block is then a config or recipe, or a fragment of one: omitted keys
take their defaults, so every block must load with ``load_settings``. Its top-level keys are
split by the schema into the config's (``paths``, ``storage``, ...) and the recipe's (``train``,
``data``, ...), so a block that shows both (docs/models.md's datasets example) loads as a
config and a recipe together; a ``# config.yaml`` block and the ``# recipe.yaml`` block after it
load as one pair. A block that has a top-level ``paths:`` key says where the checkpoints go, so
its role bindings are resolved and validated as a run's are (the sinks' own checks included,
nothing constructed). A block without ``paths:`` is a fragment placed into someone's config
(``storage.resume.sink: s3`` with no base path), so only its keys and values are checked. The
``tarball`` sink that docs/plugins.md binds is the example package in
examples/wmtp-tarball-sink, registered here from its source. The README's fine-tune pair needs
model folders and data; its dry run is in tests/test_dry_run_steps.py. Nothing trains and no
model is loaded.
"""

from __future__ import annotations

import importlib.util
import re
import tomllib
from pathlib import Path

import attrs
import pytest
import yaml

from wmtp_core.bindings import validate
from wmtp_core.config import load_settings
from wmtp_core.config.routing import bindings_for, required_roles
from wmtp_core.config.schema import Config, Recipe
from wmtp_core.plugins import build_catalog, make_plugin_manager

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
ROLE_WORDS = ("resume", "final")


def _catalog():
    return build_catalog(make_plugin_manager())


CATALOG = _catalog()
ROLES = {**{name: {r.value for r in s.roles} for name, s in CATALOG.sinks.items()},
         **{name: {r.value for r in p.roles} for name, p in CATALOG.policies.items()}}
BUILT_IN = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["wmtp"])


def _built_in(hook) -> set[str]:
    """Names the built-in plugins register through ``hook`` (as ``wmtp plugins`` lists them)."""
    names: list = []
    for impl in hook.get_hookimpls():
        if impl.plugin_name in BUILT_IN:
            impl.function(register=names.append)
    return {spec.name for spec in names}


def roles_in(cell: str) -> set[str]:
    return {w for w in ROLE_WORDS if re.search(rf"\b{w}\b", cell)}


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def documented_roles(path: Path) -> list[tuple[int, str, set[str]]]:
    """``(line, name, roles)`` for every place ``path`` gives a sink or policy its roles."""
    out = []
    names = "|".join(sorted(map(re.escape, ROLES), key=len, reverse=True))
    text_form = re.compile(rf"`?\b({names})\b`? \(((?:resume|final)(?:, (?:resume|final))*)[;)]")
    header: list[str] = []
    for no, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith("|"):
            row = cells(line)
            if not header:
                header = [c.lower() for c in row]
            for i, cell in enumerate(row[:-1]):
                m = re.fullmatch(r"(?:sink|policy) `([a-z0-9_]+)`.*", cell)
                if m:
                    out.append((no, m[1], roles_in(row[i + 1])))
            m = re.fullmatch(r"`([a-z0-9_]+)`", row[0])
            if m and header[:2] in (["sink", "roles"], ["policy", "roles"]):
                out.append((no, m[1], roles_in(row[1])))
            continue
        header = []
        for m in text_form.finditer(line):
            out.append((no, m[1], set(m[2].split(", "))))
    return out


def test_the_catalog_is_what_the_plugins_register():
    assert set(CATALOG.sinks) >= {"local", "s3", "tiered", "mlflow_registry"}
    assert ROLES["s3"] == {"resume", "final"} and ROLES["tiered"] == {"resume"}


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_each_sink_and_policy_is_documented_with_exactly_its_roles(path):
    wrong = [f"{path.name}:{no}: {name} is documented as serving {sorted(said)}; it serves {sorted(ROLES[name])}"
             for no, name, said in documented_roles(path) if name in ROLES and said != ROLES[name]]
    unknown = [f"{path.name}:{no}: {name} is not installed" for no, name, _ in documented_roles(path)
               if name not in ROLES and name != "tarball"]  # docs/plugins.md's example package
    assert not wrong + unknown, "\n".join(wrong + unknown)


def test_the_readme_plugin_table_lists_every_built_in_sink_and_policy():
    rows = {name for _, name, _ in documented_roles(README)}
    pm = make_plugin_manager()
    missing = (_built_in(pm.hook.wmtp_register_sinks) | _built_in(pm.hook.wmtp_register_policies)) - rows
    assert not missing, f"README.md's plugin table leaves out {sorted(missing)}"


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_installed_sinks_in_an_error_are_what_the_error_prints(path):
    said = re.findall(r"installed sinks: ([^.]*)\. ", path.read_text())
    assert all(s == CATALOG.describe_sinks() for s in said), (said, CATALOG.describe_sinks())


# ----------------------------------------------------------------------------- YAML blocks
CONFIG_KEYS = {f.name for f in attrs.fields(Config)}
RECIPE_KEYS = {f.name for f in attrs.fields(Recipe)}


def yaml_blocks() -> list[tuple[str, str]]:
    """``(where, text)`` of every yaml block: ``README.md:25``."""
    out = []
    for path in DOCS:
        text = path.read_text()
        for m in re.finditer(r"^```ya?ml\n(.*?)^```", text, re.DOTALL | re.MULTILINE):
            out.append((f"{path.name}:{text[: m.start()].count(chr(10)) + 1}", m[1]))
    return out


BLOCKS = yaml_blocks()


def units() -> list[tuple[str, list[str]]]:
    """``(where, texts)``: each block on its own, a ``# config.yaml`` block with the
    ``# recipe.yaml`` block that follows it."""
    out = []
    for i, (where, text) in enumerate(BLOCKS):
        if text.startswith("# recipe.yaml") and i and BLOCKS[i - 1][1].startswith("# config.yaml"):
            continue
        texts = [text]
        if text.startswith("# config.yaml") and i + 1 < len(BLOCKS) and BLOCKS[i + 1][1].startswith("# recipe.yaml"):
            texts.append(BLOCKS[i + 1][1])
        out.append((where, texts))
    return out


UNITS = units()


def test_there_are_yaml_blocks_to_check():
    assert len(BLOCKS) >= 10 and any(w.startswith("README.md") for w, _ in BLOCKS)


@pytest.mark.parametrize("where,text", BLOCKS, ids=[w for w, _ in BLOCKS])
def test_every_yaml_block_parses(where, text):
    assert isinstance(yaml.safe_load(text), dict), f"{where} is not a mapping"


def _with_example_plugin():
    """The catalog with the installed plugins and docs/plugins.md's ``tarball`` example."""
    source = ROOT / "examples" / "wmtp-tarball-sink" / "wmtp_tarball" / "__init__.py"
    spec = importlib.util.spec_from_file_location("wmtp_tarball_docs_example", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    pm = make_plugin_manager()
    pm.register(module, name="tarball")
    return build_catalog(pm)


@pytest.fixture(scope="module")
def catalog_with_example():
    return _with_example_plugin()


@pytest.mark.parametrize("where,texts", UNITS, ids=[w for w, _ in UNITS])
def test_every_yaml_block_loads_and_binds(tmp_path, where, texts, catalog_with_example):
    data = {k: v for text in texts for k, v in (yaml.safe_load(text) or {}).items()}
    stray = set(data) - CONFIG_KEYS - RECIPE_KEYS
    assert not stray, f"{where}: keys of neither the config nor the recipe: {sorted(stray)}"
    files = {}
    for name, keys in (("config", CONFIG_KEYS), ("recipe", RECIPE_KEYS)):
        part = {k: v for k, v in data.items() if k in keys}
        if part:  # the block as written when it is all one file's (the loader sees duplicate keys)
            files[name] = tmp_path / f"{name}.yaml"
            files[name].write_text(texts[0] if len(texts) == 1 and part == data else yaml.safe_dump(part))
    settings = load_settings(*(str(files[n]) if n in files else None for n in ("config", "recipe")))
    if "paths" in data:
        validate(bindings_for(settings, catalog_with_example), catalog_with_example, required_roles(settings))
