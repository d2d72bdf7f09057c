# The plugin hooks: the reference for plugin authors (docs/plugins.md quotes them).
#
# Owns: the names, signatures and docstrings of every ``gateway_*`` hook.
# Must not know: any plugin. Hooks run at start-up and configuration time, never
# per message: the hot path is the protocol class a plugin registers.
from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from .config import Config
    from .plugins import ProtocolRegistry

hookspec = pluggy.HookspecMarker("mirrorgate")


@hookspec(historic=True)
def gateway_register_protocols(registry: ProtocolRegistry) -> None:
    """Register the protocols this plugin serves.

    Call ``registry.add(cls)`` once per protocol class; ``cls`` subclasses
    :class:`gateway.ProtocolHandler` and has a static ``id`` (the value of a
    listener's ``protocol`` key), ``url_schemes`` (accepted upstream URL schemes),
    and attrs classes ``ListenerOptions`` and ``MirrorOptions`` holding the config
    keys it adds to ``[[listener]]`` and ``[[listener.mirror]]`` tables.

    :param registry: the gateway's protocol registry.
    """


@hookspec
def gateway_configured(config: Config) -> None:
    """Called once the configuration is loaded and valid, before listeners open.

    A plugin may read its listeners' options here. It must not mutate ``config``
    (it is frozen).

    :param config: the validated configuration.
    """
