"""mirrorgate: a mirroring gateway.

The public API for protocol plugins is what this module exports; plugins import
nothing else from ``gateway``.
"""

from .accounting import DropReason, ListenerStats, MirrorStats
from .config import Mirror as MirrorConfig
from .config_values import Duration, Size
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
    "ClientSession", "DropReason", "Duration", "ListenerContext", "ListenerStats", "Mirror",
    "MirrorConfig", "MirrorError", "MirrorSession", "MirrorSet", "MirrorStats", "MirrorTimeout",
    "MirrorUnavailable", "NoOptions", "PluginError", "ProtocolHandler", "ProtocolRegistry",
    "Replayer", "Size", "Unit", "UnitCut", "UpstreamPool", "__version__", "hookimpl", "sample",
]
