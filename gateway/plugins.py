# Plugin management: pluggy, the entry-point group, and the protocol registry.
#
# Owns: loading plugins (built-in ones through the same entry-point group
# ``mirrorgate`` as third-party ones), the typed ProtocolRegistry they fill, and
# catching misspelt hooks (``check_pending``).
# Must not know: any particular plugin; gateway/ never imports one.
from __future__ import annotations

from collections.abc import Iterable, Iterator

import pluggy

from . import hookspecs
from .protocol import ProtocolHandler

__all__ = ["ENTRY_POINT_GROUP", "PluginError", "ProtocolRegistry", "hookimpl", "load_plugins"]

ENTRY_POINT_GROUP = "mirrorgate"
hookimpl = pluggy.HookimplMarker("mirrorgate")


class PluginError(Exception):
    """A plugin is broken: bad registration, duplicate id, misspelt hook."""


class ProtocolRegistry:
    """Protocol classes by their static ``id``."""

    def __init__(self) -> None:
        self._protocols: dict[str, type[ProtocolHandler]] = {}

    def add(self, cls: type[ProtocolHandler]) -> None:
        """Register a protocol class.

        :raises PluginError: not a ProtocolHandler, no id, or the id is taken.
        """
        if not (isinstance(cls, type) and issubclass(cls, ProtocolHandler)):
            raise PluginError(f"{cls!r} is not a gateway.ProtocolHandler subclass")
        pid = getattr(cls, "id", None)
        if not isinstance(pid, str) or not pid:
            raise PluginError(f"{cls.__qualname__} has no static string `id`")
        if pid in self._protocols and self._protocols[pid] is not cls:
            raise PluginError(
                f"protocol id {pid!r} registered twice: {self._protocols[pid].__module__} "
                f"and {cls.__module__}"
            )
        if not getattr(cls, "url_schemes", None):
            raise PluginError(f"{cls.__qualname__} declares no `url_schemes`")
        self._protocols[pid] = cls

    def __getitem__(self, pid: str) -> type[ProtocolHandler]:
        return self._protocols[pid]

    def __contains__(self, pid: object) -> bool:
        return pid in self._protocols

    def __iter__(self) -> Iterator[str]:
        return iter(self._protocols)

    def items(self) -> Iterable[tuple[str, type[ProtocolHandler]]]:
        return self._protocols.items()

    def __repr__(self) -> str:
        return f"<ProtocolRegistry {sorted(self._protocols)}>"


def load_plugins(extra: Iterable[object] = ()) -> tuple[pluggy.PluginManager, ProtocolRegistry]:
    """Load every installed plugin and collect the protocols they register.

    :param extra: plugin objects to register besides the entry points (tests).
    :raises PluginError: a plugin implements a hook that does not exist.
    """
    pm = pluggy.PluginManager("mirrorgate")
    pm.add_hookspecs(hookspecs)
    pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    for plugin in extra:
        pm.register(plugin)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(str(exc)) from exc
    registry = ProtocolRegistry()
    pm.hook.gateway_register_protocols.call_historic(kwargs={"registry": registry})
    return pm, registry
