"""Plugin manager and component registry.

Plugins are found through entry points in the group ``harness`` (built-ins
under ``plugins/`` are installed the same way as a third party's); the CLI
finds the commands plugins add in a second, light group ``harness.commands``
(``command_plugins``). Switches (for both groups, by entry-point name):

- ``HARNESS_LOAD_PLUGINS=a,b``: load only these entry points (allow-list;
  an empty value loads none).
- ``HARNESS_DISABLE_PLUGINS=a,b``: skip these entry points (block-list).

A plugin that fails to import is recorded (``Plugins.failures``) and reported
by ``harness plugins`` and at run start; the others keep working.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from harness import hookspecs
from harness.errors import HarnessError, did_you_mean, first_line

GROUP = "harness"
COMMAND_GROUP = "harness.commands"
KINDS = {
    "decomposer": "register_decomposers",
    "allocator": "register_rank_allocators",
    "evaluator": "register_evaluators",
    "profiler": "register_profilers",
    "tracker": "register_trackers",
    "command": "register_commands",
}
PLURAL = {
    "decomposer": "methods",
    "allocator": "allocators",
    "evaluator": "evaluators",
    "profiler": "profilers",
    "tracker": "trackers",
    "command": "commands",
}


@dataclass
class PluginInfo:
    name: str
    version: str
    distribution: str | None
    hooks: list[str]
    registered: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class Registered:
    component: Any
    plugin: str


def _split_env(name: str) -> set[str] | None:
    value = os.environ.get(name)
    if value is None:
        return None
    return {item.strip() for item in value.split(",") if item.strip()}


class Plugins:
    """The pluggy manager plus the registry of named components it yields."""

    def __init__(self, load_entry_points: bool = True, group: str = GROUP) -> None:
        self.group = group
        self.pm = pluggy.PluginManager("harness")
        self.pm.add_hookspecs(hookspecs)
        self.failures: dict[str, str] = {}
        self.distributions: dict[str, metadata.Distribution | None] = {}
        self._registry: dict[str, dict[str, Registered]] | None = None
        if load_entry_points:
            self._load_entry_points()
        self.pm.check_pending()

    # ------------------------------------------------------------ loading
    def _load_entry_points(self) -> None:
        allow = _split_env("HARNESS_LOAD_PLUGINS")
        block = _split_env("HARNESS_DISABLE_PLUGINS") or set()
        seen: set[str] = set()
        for ep in sorted(metadata.entry_points(group=self.group), key=lambda e: e.name):
            if ep.name in seen or ep.name in block or (allow is not None and ep.name not in allow):
                continue
            seen.add(ep.name)
            try:
                plugin = ep.load()
            except Exception as exc:  # a broken third-party plugin must not stop the others
                self.failures[ep.name] = f"{type(exc).__name__}: {exc}"
                continue
            self.pm.register(plugin, name=ep.name)
            self.distributions[ep.name] = ep.dist

    def register(self, plugin: Any, name: str | None = None) -> str:
        """Register a plugin object or module (tests, embedding applications)."""
        registered = self.pm.register(plugin, name=name)
        self.pm.check_pending()
        self._registry = None
        return registered

    def unregister(self, name: str) -> None:
        self.pm.unregister(name=name)
        self._registry = None

    # ------------------------------------------------------------ registry
    @property
    def registry(self) -> dict[str, dict[str, Registered]]:
        if self._registry is None:
            self._registry = self._collect()
        return self._registry

    def _collect(self) -> dict[str, dict[str, Registered]]:
        registry: dict[str, dict[str, Registered]] = {kind: {} for kind in KINDS}
        for kind, hook_name in KINDS.items():
            hook = getattr(self.pm.hook, hook_name)
            for impl in hook.get_hookimpls():
                register = self._registrar(registry[kind], kind, impl.plugin_name)
                if kind != "command":
                    impl.function(register=register)
                    continue
                try:  # a broken command plugin must not cost the core commands
                    impl.function(register=register)
                except HarnessError:
                    raise
                except Exception as exc:
                    self.failures[impl.plugin_name] = first_line(exc)
        return registry

    @staticmethod
    def _registrar(table: dict[str, Registered], kind: str, plugin: str) -> Callable[[Any], None]:
        def register(component: Any) -> None:
            name = getattr(component, "name", None)
            if not isinstance(name, str) or not name:
                raise HarnessError(f"plugin {plugin!r} registered a {kind} without a name: {component!r}")
            if name in table:
                raise HarnessError(
                    f"plugin {plugin!r} registers {kind} {name!r}, already registered by plugin {table[name].plugin!r}"
                )
            table[name] = Registered(component, plugin)

        return register

    def get(self, kind: str, name: str, key: str = "") -> Any:
        """The component ``name`` of ``kind``; HarnessError with the known names if absent."""
        table = self.registry[kind]
        if name in table:
            return table[name].component
        known = ", ".join(sorted(table)) or "none"
        prefix = f"{key}: " if key else ""
        raise HarnessError(f"{prefix}unknown {kind} {name!r}{did_you_mean(name, table)}; known: {known}")

    def names(self, kind: str) -> list[str]:
        return sorted(self.registry[kind])

    def plugin_of(self, kind: str, name: str) -> str:
        return self.registry[kind][name].plugin

    # ------------------------------------------------------------ listing
    def infos(self) -> list[PluginInfo]:
        infos = []
        for plugin_name, plugin in self.pm.list_name_plugin():
            if plugin is None:
                continue
            hooks = sorted(h.name for h in self.pm.get_hookcallers(plugin) or [])
            infos.append(
                PluginInfo(plugin_name, self.version_of(plugin_name, plugin), self._dist_name(plugin_name), hooks)
            )
        by_name = {info.name: info for info in infos}
        for kind, table in self.registry.items():
            for comp_name, entry in table.items():
                if entry.plugin in by_name:
                    by_name[entry.plugin].registered.setdefault(kind, []).append(comp_name)
        return sorted(infos, key=lambda i: i.name)

    def _dist_name(self, plugin_name: str) -> str | None:
        dist = self.distributions.get(plugin_name)
        return dist.metadata["Name"] if dist is not None else None

    def version_of(self, plugin_name: str, plugin: Any = None) -> str:
        dist = self.distributions.get(plugin_name)
        if dist is not None:
            return dist.version
        plugin = plugin if plugin is not None else self.pm.get_plugin(plugin_name)
        return str(getattr(plugin, "__version__", "unknown"))

    def versions(self) -> dict[str, str]:
        """Plugin name -> version, for every loaded plugin (recorded in cell ids)."""
        return {info.name: info.version for info in self.infos()}


_PLUGINS: Plugins | None = None


def get_plugins() -> Plugins:
    """The process-wide plugin manager, loading entry points on first use."""
    global _PLUGINS
    if _PLUGINS is None:
        _PLUGINS = Plugins()
    return _PLUGINS


def set_plugins(plugins: Plugins | None) -> None:
    """Replace the process-wide manager (tests; ``None`` reloads on next use)."""
    global _PLUGINS
    _PLUGINS = plugins


_COMMAND_PLUGINS: Plugins | None = None


def command_plugins() -> Plugins:
    """The plugins of the group ``harness.commands`` (the CLI's commands), loaded afresh on each call
    unless ``set_command_plugins`` fixed them."""
    return _COMMAND_PLUGINS if _COMMAND_PLUGINS is not None else Plugins(group=COMMAND_GROUP)


def set_command_plugins(plugins: Plugins | None) -> None:
    """Fix the command plugins the CLI uses (tests, embedding applications); ``None``: entry points again."""
    global _COMMAND_PLUGINS
    _COMMAND_PLUGINS = plugins
