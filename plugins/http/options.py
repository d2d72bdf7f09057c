# The config keys of an HTTP listener, its routes and its mirrors (issue-level
# contract in docs/configuration.md and docs/http.md).
#
# Owns: the attrs classes the core structures `protocol = "http"` tables into,
# and the checks on their values. Must not know: anything that runs.
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import attrs

from gateway import Duration, MirrorConfig, Size, is_secret_header

__all__ = ["HttpListenerOptions", "HttpMirrorOptions", "MAX_RETRIES", "Route"]

MAX_RETRIES = 10


def _percent(instance: object, attribute: attrs.Attribute, value: float) -> None:
    if not 0.0 <= value <= 100.0:
        raise ValueError(f"{attribute.name} must be between 0 and 100, not {value}")


def _between(low: int, high: int):  # type: ignore[no-untyped-def]
    def check(instance: object, attribute: attrs.Attribute, value: int) -> None:
        if not low <= value <= high:
            raise ValueError(f"{attribute.name} must be between {low} and {high}, not {value}")
    return check


def _positive(instance: object, attribute: attrs.Attribute, value: float) -> None:
    if value <= 0:
        raise ValueError(f"{attribute.name} must be greater than 0, not {value}")


def _header_name(instance: object, attribute: attrs.Attribute, value: object) -> None:
    names = value if isinstance(value, tuple) else tuple(value)  # type: ignore[arg-type]
    for name in names:
        if not name or any(c in name for c in " \t\r\n:") or not name.isascii():
            raise ValueError(f"{attribute.name}: {name!r} is not a valid header name")


def _optional_header_name(instance: object, attribute: attrs.Attribute,
                          value: str | None) -> None:
    if value is not None:
        _header_name(instance, attribute, (value,))


def _header_values(instance: object, attribute: attrs.Attribute,
                   value: Mapping[str, str]) -> None:
    _header_name(instance, attribute, tuple(value))
    for name, v in value.items():
        if "\r" in v or "\n" in v or not v.isascii():
            raise ValueError(f"{attribute.name}: the value of {name!r} must be ASCII on one line")


def _no_crlf(instance: object, attribute: attrs.Attribute, value: str | None) -> None:
    if value is not None and (not value or any(c in value for c in " \t\r\n/")):
        raise ValueError(f"{attribute.name} must be a host name (optionally with :port), "
                         f"got {value!r}")


@attrs.frozen
class HttpMirrorOptions:
    """Keys an HTTP listener's [[listener.mirror]] (and [[listener.route.mirror]]) adds."""

    percent: float = attrs.field(default=100.0, converter=float, validator=_percent)
    sample_by: str | None = attrs.field(default=None, validator=_optional_header_name)
    set_headers: Mapping[str, str] = attrs.field(factory=dict, validator=_header_values)
    remove_headers: tuple[str, ...] = attrs.field(default=(), validator=_header_name)
    host_rewrite: str | None = attrs.field(default=None, validator=_no_crlf)
    shadow_suffix: bool = False
    max_body: Size = attrs.field(default=Size(8 * 1024 * 1024),
                                 validator=_between(0, 2**40))
    retries: int = attrs.field(default=0, validator=_between(0, MAX_RETRIES))

    def secrets(self, secret_headers: Iterable[str]) -> Iterator[str]:
        """Values this mirror sets on secret headers: never to be logged."""
        for name, value in self.set_headers.items():
            if is_secret_header(name, secret_headers):
                yield value


def _prefix(instance: object, attribute: attrs.Attribute, value: str) -> None:
    if not value.startswith("/") or not value.isascii() or any(c in value for c in " \r\n"):
        raise ValueError(f"{attribute.name} must be a path starting with '/', got {value!r}")


def _methods(instance: object, attribute: attrs.Attribute, value: tuple[str, ...]) -> None:
    for m in value:
        if not m or not m.isascii() or not m.isalpha():
            raise ValueError(f"{attribute.name}: {m!r} is not an HTTP method")


@attrs.frozen
class Route:
    """One [[listener.route]]: requests it matches go to its own primary and mirrors."""

    primary: str
    prefix: str = attrs.field(default="/", validator=_prefix)
    methods: tuple[str, ...] = attrs.field(default=(), validator=_methods)
    host: str | None = attrs.field(default=None, validator=_no_crlf)
    mirror: tuple[MirrorConfig, ...] = ()


@attrs.frozen
class HttpListenerOptions:
    """Keys a `protocol = "http"` [[listener]] adds."""

    max_body: Size = attrs.field(default=Size(64 * 1024 * 1024), validator=_between(0, 2**42))
    max_header_bytes: Size = attrs.field(default=Size(64 * 1024),
                                         validator=_between(1024, 16 * 1024 * 1024))
    forwarded_for: bool = True
    primary_timeout: Duration = attrs.field(default=Duration(60.0), validator=_positive)
    idle_timeout: Duration = attrs.field(default=Duration(75.0), validator=_positive)
    route: tuple[Route, ...] = ()

    def nested_mirrors(self) -> Iterator[MirrorConfig]:
        """The mirrors of every route (the listener's own are the core's)."""
        for route in self.route:
            yield from route.mirror
