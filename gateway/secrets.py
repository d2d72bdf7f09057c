# What must never be shown: which header values and config strings are secret.
#
# Owns: the one rule, used by logs and /status alike, for what is redacted.
# Must not know: protocols; a header is a name and a value.
from __future__ import annotations

from collections.abc import Iterable, Iterator

from .config import Config

__all__ = ["ALWAYS_SECRET_HEADERS", "REDACTED", "is_secret_header", "secret_values"]

REDACTED = "<redacted>"

# Credentials by definition (RFC 9110 §11.6, RFC 6265).
ALWAYS_SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie"})


def is_secret_header(name: str | bytes, configured: Iterable[str] = ()) -> bool:
    """Whether a header's value must be redacted: the always-secret ones, and
    those ``[admin] secret_headers`` names (case-insensitive)."""
    text = (name.decode("latin-1") if isinstance(name, bytes) else name).lower()
    return text in ALWAYS_SECRET_HEADERS or any(text == c.lower() for c in configured)


def secret_values(config: Config) -> Iterator[str]:
    """Every password the configuration holds, and what each mirror's options
    say is secret (for log scrubbing).

    A protocol's options take part by duck typing: mirror options may define
    ``secrets(secret_headers) -> Iterable[str]`` (e.g. the values of secret
    headers they set), listener options ``nested_mirrors() -> Iterable[Mirror]``
    (mirrors declared in the protocol's own tables).
    """
    for upstream in config.upstreams.values():
        if upstream.password:
            yield upstream.password
        yield from (p for p in upstream.users.values() if p)
    for user in config.admin.user:
        if user.password:
            yield user.password
    configured = config.admin.secret_headers
    for listener in config.listeners:
        nested = getattr(listener.options, "nested_mirrors", None)
        for mirror in (*listener.mirrors, *(nested() if nested else ())):
            secrets = getattr(mirror.options, "secrets", None)
            if secrets is not None:
                yield from (v for v in secrets(configured) if v)
