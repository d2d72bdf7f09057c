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
from .protocol import (
    ClientSession,
    Control,
    ListenerContext,
    NoOptions,
    ProtocolHandler,
    ReloadResult,
)
from .secrets import is_secret_header
from .status import mirror_health

__version__ = "0.1.0"

__all__ = [
    "ClientSession", "Control", "DropReason", "Duration", "ListenerContext", "ListenerStats",
    "Mirror", "MirrorConfig", "MirrorError", "MirrorSession", "MirrorSet", "MirrorStats",
    "MirrorTimeout", "MirrorUnavailable", "NoOptions", "PluginError", "ProtocolHandler",
    "ProtocolRegistry", "ReloadResult", "Replayer", "Size", "Unit", "UnitCut", "UpstreamPool",
    "__version__", "hookimpl", "is_secret_header", "mirror_health", "sample",
]
