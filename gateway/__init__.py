"""mirrorgate: a mirroring gateway.

The public API for protocol plugins is what this module exports; plugins import
nothing else from ``gateway``.
"""

from .accounting import DropReason, ListenerStats, MirrorStats
from .mirror import (
    Mirror,
    MirrorError,
    MirrorSession,
    MirrorSet,
    MirrorTimeout,
    MirrorUnavailable,
    Replayer,
    Unit,
    UnitCut,
    sample,
)
from .plugins import PluginError, ProtocolRegistry, hookimpl
from .pool import UpstreamPool
from .protocol import ClientSession, ListenerContext, NoOptions, ProtocolHandler

__version__ = "0.1.0"

__all__ = [
    "ClientSession", "DropReason", "ListenerContext", "ListenerStats", "Mirror",
    "MirrorError", "MirrorSession", "MirrorSet", "MirrorStats", "MirrorTimeout",
    "MirrorUnavailable", "NoOptions", "PluginError", "ProtocolHandler", "ProtocolRegistry",
    "Replayer", "Unit", "UnitCut", "UpstreamPool", "__version__", "hookimpl", "sample",
]
