"""The plugin manager factory and the catalog of what installed plugins contribute."""

from __future__ import annotations

import pluggy

from wmtp_core import hookspecs
from wmtp_core.catalog import Catalog

ENTRY_POINT_GROUP = "wmtp"


CORE_PLUGINS = ("wmtp_core.checkpoint_models",)
"""The core's own hook implementations (``trylast``: any plugin answers before them)."""


def make_plugin_manager(*, entry_points: bool = True) -> pluggy.PluginManager:
    """A fresh manager with WMTP's hookspecs and the core's own hook implementations;
    installed plugins are loaded if ``entry_points``.

    Loading is idempotent (pluggy skips names already registered), so calling
    :func:`load_plugins` again is harmless.
    """
    import importlib

    pm = pluggy.PluginManager("wmtp")
    pm.add_hookspecs(hookspecs)
    for name in CORE_PLUGINS:
        pm.register(importlib.import_module(name), name=name)
    if entry_points:
        load_plugins(pm)
    return pm


def load_plugins(pm: pluggy.PluginManager) -> None:
    """Load every plugin declared in the ``wmtp`` entry-point group, then check the hooks."""
    pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    pm.check_pending()


def build_catalog(pm: pluggy.PluginManager) -> Catalog:
    """Ask every plugin to register its sinks and policies; names are checked here."""
    pm.check_pending()
    catalog = Catalog()
    pm.hook.wmtp_register_sinks(register=catalog.add_sink)
    pm.hook.wmtp_register_policies(register=catalog.add_policy)
    return catalog


def distributions(pm: pluggy.PluginManager) -> dict[str, str]:
    """Plugin name -> ``distribution==version`` for plugins loaded from entry points."""
    out = {}
    for plugin, dist in pm.list_plugin_distinfo():
        name = pm.get_name(plugin) or getattr(plugin, "__name__", repr(plugin))
        out[name] = f"{dist.metadata['name']}=={dist.version}"
    return out
