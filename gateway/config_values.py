# Owns the scalar value formats of the configuration file and the map from
# TOML paths to source lines: sizes ("64MiB"), durations ("250ms"), listen
# addresses ("host:port", "[::1]:port"), upstream URLs, `${VAR}` expansion.
# It must not know the configuration model (gateway.config builds on it) nor
# any protocol: every function here takes plain values and returns plain values
# or raises ValueProblem with a message written for the person editing the file.
from __future__ import annotations

import math
import re
import urllib.parse
from collections.abc import Iterable, Mapping
from decimal import Decimal, InvalidOperation
from typing import Any, NewType

import attrs

__all__ = [
    "Address",
    "Duration",
    "Size",
    "UrlParts",
    "ValueProblem",
    "describe",
    "expand_document",
    "expand_vars",
    "join_path",
    "key_lines",
    "line_of",
    "parse_address",
    "parse_duration",
    "parse_optional_address",
    "parse_size",
    "parse_url",
    "redact_url",
    "same_host",
]

#: A byte count: an integer, or a string such as "64MiB", "512KiB", "100kB".
Size = NewType("Size", int)
#: Seconds: a number, or a string such as "5s", "250ms", "1m", "1h", "1m30s".
Duration = NewType("Duration", float)


class ValueProblem(ValueError):
    """A value that has the right TOML type but cannot be used; str() is the message."""


def describe(value: object) -> str:
    """Name a TOML value's type for an error message ("a string ('12')").

    :param value: the value found in the document.
    """
    kinds = {bool: "a boolean", int: "an integer", float: "a float", str: "a string",
             dict: "a table", list: "an array"}
    kind = kinds.get(type(value), f"a {type(value).__name__}")
    if isinstance(value, (dict, list)):
        return kind
    text = repr(value)
    return f"{kind} ({text if len(text) <= 40 else text[:37] + '...'})"


# --- sizes --------------------------------------------------------------------

_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*")


def parse_size(value: object) -> int:
    """Read a byte count: an integer, or a number with a unit.

    kB, MB, GB, TB are powers of 1000; KiB, MiB, GiB, TiB powers of 1024; B or no
    unit is bytes. Units are case-insensitive; "1.5MiB" is allowed when it is a
    whole number of bytes.

    :param value: the TOML value.
    :raises ValueProblem: the value is neither an integer nor such a string.
    """
    if type(value) is int:
        return value
    if not isinstance(value, str):
        raise ValueProblem(f"expected a size (integer bytes or \"64MiB\"), got {describe(value)}")
    match = _SIZE_RE.fullmatch(value)
    unit = match and _SIZE_UNITS.get(match.group(2).lower())
    if match is None or unit is None:
        raise ValueProblem(
            f"bad size {value!r}: use bytes or a number with B, kB, MB, GB, KiB, MiB or GiB"
        )
    amount = Decimal(match.group(1)) * unit
    if amount != amount.to_integral_value():
        raise ValueProblem(f"bad size {value!r}: not a whole number of bytes")
    return int(amount)


# --- durations ----------------------------------------------------------------

_DURATION_UNITS = {"ms": Decimal("0.001"), "s": Decimal(1), "m": Decimal(60), "h": Decimal(3600)}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")


def parse_duration(value: object) -> float:
    """Read a duration in seconds: a number, or a string like "5s", "250ms", "1m30s".

    :param value: the TOML value.
    :raises ValueProblem: the value is neither a number nor such a string, or is
        not finite.
    """
    if type(value) in (int, float):
        seconds = float(value)  # type: ignore[arg-type]
        if not math.isfinite(seconds):
            raise ValueProblem(f"bad duration {value!r}: not a finite number")
        return seconds
    if not isinstance(value, str):
        raise ValueProblem(
            f"expected a duration (seconds or \"5s\", \"250ms\"), got {describe(value)}"
        )
    text = value.replace(" ", "")
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueProblem(f"bad duration {value!r}: use seconds or a string like "
                           "\"5s\", \"250ms\", \"1m\", \"1h\", \"1m30s\"")
    try:
        total = sum((Decimal(n) * _DURATION_UNITS[u] for n, u in parts), Decimal(0))
    except InvalidOperation:  # pragma: no cover - the regex admits only decimals
        raise ValueProblem(f"bad duration {value!r}") from None
    return float(total)


# --- addresses ----------------------------------------------------------------


def _format_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


@attrs.frozen
class Address:
    """A TCP address to listen on; str() gives "host:port" ("[::1]:port" for IPv6)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"{_format_host(self.host)}:{self.port}"


def parse_address(value: object) -> Address:
    """Read a listen address, "host:port" or "[ipv6]:port", port 1-65535.

    :param value: the TOML value.
    :raises ValueProblem: not a string of that form, or the port is out of range.
    """
    if not isinstance(value, str):
        raise ValueProblem(f"expected an address \"host:port\", got {describe(value)}")
    if value.startswith("["):
        host, sep, port_text = value[1:].partition("]:")
        if not sep:
            raise ValueProblem(f"bad address {value!r}: expected \"[ipv6]:port\"")
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep:
            raise ValueProblem(f"bad address {value!r}: expected \"host:port\"")
        if ":" in host:
            raise ValueProblem(f"bad address {value!r}: write IPv6 hosts in brackets, "
                               "\"[::1]:6432\"")
    if not host:
        raise ValueProblem(f"bad address {value!r}: the host is missing "
                           "(0.0.0.0 listens on every interface)")
    if not re.fullmatch(r"[0-9]{1,5}", port_text) or not 1 <= int(port_text) <= 65535:
        raise ValueProblem(f"bad address {value!r}: the port must be 1-65535")
    return Address(host, int(port_text))


def parse_optional_address(value: object) -> Address | None:
    """Read a listen address that `false` turns off (None).

    :param value: the TOML value.
    :raises ValueProblem: neither false nor a valid address.
    """
    if value is False:
        return None
    if value is True:
        raise ValueProblem("expected an address \"host:port\", or false to turn it off")
    return parse_address(value)


_LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})
_WILDCARD = frozenset({"0.0.0.0", "::", "*"})


def same_host(a: str, b: str) -> bool:
    """Whether two host names name the same machine, counting every loopback as one.

    :param a: a host name or address.
    :param b: another.
    """
    a, b = a.lower(), b.lower()
    return a == b or (a in _LOOPBACK and b in _LOOPBACK)


def addresses_clash(a: Address, b: Address) -> bool:
    """Whether two listen addresses cannot both be bound (same port, overlapping host).

    :param a: one listen address.
    :param b: another.
    """
    return a.port == b.port and (
        same_host(a.host, b.host) or a.host in _WILDCARD or b.host in _WILDCARD
    )


# --- upstream URLs ------------------------------------------------------------

_DEFAULT_PORTS = {"postgres": 5432, "http": 80, "https": 443}
_SCHEME_ALIASES = {"postgresql": "postgres"}


def normalise_scheme(scheme: str) -> str:
    """Map a URL scheme to its canonical name ("postgresql" is "postgres").

    :param scheme: the scheme as written.
    """
    scheme = scheme.lower()
    return _SCHEME_ALIASES.get(scheme, scheme)


@attrs.frozen
class UrlParts:
    """The pieces of an upstream URL; the password is kept out of repr()."""

    scheme: str
    host: str
    port: int
    database: str | None
    user: str | None
    password: str | None = attrs.field(default=None, repr=False)


def parse_url(url: str, known_schemes: Iterable[str]) -> UrlParts:
    """Split an upstream URL such as "postgres://user:pw@host:5432/db".

    :param url: the URL after ${VAR} expansion.
    :param known_schemes: the schemes some registered protocol accepts.
    :raises ValueProblem: the URL cannot be used, with the reason.
    """
    known = sorted({normalise_scheme(s) for s in known_schemes})
    try:
        split = urllib.parse.urlsplit(url)
        port = split.port
    except ValueError as exc:
        raise ValueProblem(f"bad URL: {exc}") from None
    scheme = normalise_scheme(split.scheme)
    if not split.scheme or "//" not in url:
        raise ValueProblem(f"bad URL {redact_url(url)!r}: expected scheme://host[:port]")
    if scheme not in known:
        raise ValueProblem(f"unknown URL scheme {split.scheme!r} (known: {', '.join(known)})")
    if not split.hostname:
        raise ValueProblem("the URL has no host")
    if port is None:
        port = _DEFAULT_PORTS.get(scheme)
        if port is None:
            raise ValueProblem(f"the URL needs a port: {scheme} has no default")
    if not 1 <= port <= 65535:
        raise ValueProblem("the URL's port must be 1-65535")
    if split.fragment:
        raise ValueProblem("the URL must not have a #fragment")
    database = None
    if scheme == "postgres":
        if split.query:
            raise ValueProblem("query parameters are not supported in a postgres URL")
        path = urllib.parse.unquote(split.path.lstrip("/"))
        if "/" in path:
            raise ValueProblem(f"bad database name {path!r} in the URL")
        database = path or None
    elif split.path not in ("", "/") or split.query:
        raise ValueProblem(f"a {scheme} upstream URL names a server only (scheme://host:port), "
                           "not a path or query")
    user = urllib.parse.unquote(split.username) if split.username else None
    password = urllib.parse.unquote(split.password) if split.password is not None else None
    return UrlParts(scheme, split.hostname, port, database, user, password)


_USERINFO_RE = re.compile(r"(//[^/@:]*):[^/@]*@")


def redact_url(url: str) -> str:
    """Return the URL with the password of its userinfo replaced by "***".

    :param url: a URL, valid or not.
    """
    return _USERINFO_RE.sub(r"\1:***@", url, count=1)


# --- ${VAR} -------------------------------------------------------------------

_VAR_RE = re.compile(r"\$\$\{|\$\{([^}]*)\}|\$\{")
_VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def expand_vars(text: str, env: Mapping[str, str]) -> tuple[str, list[str]]:
    """Replace each ${NAME} with env[NAME]; "$${" stands for a literal "${".

    :param text: a string value of the document.
    :param env: the variables.
    :returns: the expanded text, and one message per reference that failed (a
        missing variable expands to the empty string so that checking goes on).
    """
    problems: list[str] = []

    def replace(match: re.Match[str]) -> str:
        token = match.group(0)
        if token == "$${":
            return "${"
        name = match.group(1)
        if name is None:
            problems.append("unterminated ${ (write $${ for a literal ${)")
            return ""
        if not _VAR_NAME.fullmatch(name):
            problems.append(f"bad variable name ${{{name}}}")
            return ""
        if name not in env:
            problems.append(f"environment variable {name} is not set")
            return ""
        return env[name]

    return _VAR_RE.sub(replace, text), problems


def expand_document(value: Any, env: Mapping[str, str], path: str,
                    out: list[tuple[str, str]]) -> Any:
    """Expand ${VAR} in every string value of a document (keys are left alone).

    :param value: the unwrapped document, or a value inside it.
    :param env: the variables.
    :param path: the TOML path of `value`.
    :param out: receives (path, message) for each reference that failed.
    """
    if isinstance(value, str):
        text, problems = expand_vars(value, env)
        out.extend((path, message) for message in problems)
        return text
    if isinstance(value, dict):
        return {k: expand_document(v, env, join_path(path, k), out) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_document(v, env, join_path(path, i), out) for i, v in enumerate(value)]
    return value


# --- TOML path -> line --------------------------------------------------------


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_SCALAR = re.compile(r"[^,\]}\n#]*")


class _LineScanner:
    """Walks TOML text (already known to parse) and notes the line of each key.

    Paths look like `listener[0].mirror[1].queue_bytes`: tables of an array of
    tables `[[a.b]]` and elements of inline arrays get their index.
    """

    def __init__(self, text: str) -> None:
        self.s = text
        self.i = 0
        self.line = 1
        self.lines: dict[str, int] = {}
        self.aot_next: dict[str, int] = {}  # "listener[0].mirror" -> next index

    def peek(self, n: int = 1) -> str:
        return self.s[self.i:self.i + n]

    def advance(self, n: int = 1) -> None:
        self.line += self.s.count("\n", self.i, self.i + n)
        self.i += n

    def skip_blank(self, newlines: bool) -> None:
        while self.i < len(self.s):
            c = self.s[self.i]
            if c in " \t\r" or (newlines and c == "\n"):
                self.advance()
            elif c == "#":
                end = self.s.find("\n", self.i)
                self.advance((len(self.s) if end < 0 else end) - self.i)
            else:
                return

    def note(self, path: str, line: int) -> None:
        self.lines.setdefault(path, line)

    def run(self) -> dict[str, int]:
        table = ""
        while True:
            self.skip_blank(newlines=True)
            if self.i >= len(self.s):
                return self.lines
            line = self.line
            if self.peek(2) == "[[":
                self.advance(2)
                keys = self.key()
                self.advance(2)
                prefix = self.resolve(keys[:-1])
                base = f"{prefix}.{keys[-1]}" if prefix else keys[-1]
                index = self.aot_next.get(base, 0)
                self.aot_next[base] = index + 1
                table = f"{base}[{index}]"
                self.note(base, line)
            elif self.peek() == "[":
                self.advance()
                table = self.resolve(self.key())
                self.advance()
            else:
                keys = self.key()
                self.skip_blank(newlines=False)
                self.advance()  # "="
                path = table
                for k in keys:
                    path = f"{path}.{k}" if path else k
                    self.note(path, line)
                self.value(path)
                continue
            self.note(table, line)

    def resolve(self, keys: list[str]) -> str:
        path = ""
        for k in keys:
            path = f"{path}.{k}" if path else k
            if path in self.aot_next:
                path = f"{path}[{self.aot_next[path] - 1}]"
        return path

    def key(self) -> list[str]:
        keys: list[str] = []
        while True:
            self.skip_blank(newlines=False)
            c = self.peek()
            if c in ("\"", "'"):
                start = self.i
                self.string()
                raw = self.s[start + 1:self.i - 1]
                keys.append(raw.replace('\\"', '"').replace("\\\\", "\\") if c == '"' else raw)
            else:
                m = _BARE_KEY.match(self.s, self.i)
                if m is None:
                    return keys or [""]
                keys.append(m.group(0))
                self.advance(m.end() - self.i)
            self.skip_blank(newlines=False)
            if self.peek() != ".":
                self.skip_blank(newlines=False)
                return keys
            self.advance()

    def string(self) -> None:
        quote = self.peek(3) if self.peek(3) in ('"""', "'''") else self.peek()
        self.advance(len(quote))
        while self.i < len(self.s):
            if quote[0] == '"' and self.peek() == "\\":
                self.advance(2)
            elif self.peek(len(quote)) == quote:
                self.advance(len(quote))
                while len(quote) == 3 and self.peek() == quote[0]:  # """a"""" ends late
                    self.advance()
                return
            else:
                self.advance()

    def value(self, path: str) -> None:
        self.skip_blank(newlines=False)
        c = self.peek()
        if c in ("\"", "'"):
            self.string()
        elif c == "[":
            self.advance()
            index = 0
            while True:
                self.skip_blank(newlines=True)
                if self.peek() in ("]", ""):
                    self.advance()
                    return
                if self.peek() == ",":
                    self.advance()
                    continue
                self.note(f"{path}[{index}]", self.line)
                self.value(f"{path}[{index}]")
                index += 1
        elif c == "{":
            self.advance()
            while True:
                self.skip_blank(newlines=True)
                if self.peek() in ("}", ""):
                    self.advance()
                    return
                if self.peek() == ",":
                    self.advance()
                    continue
                line, inner = self.line, path
                for k in self.key():
                    inner = f"{inner}.{k}"
                    self.note(inner, line)
                self.skip_blank(newlines=False)
                self.advance()  # "="
                self.value(inner)
        else:
            m = _SCALAR.match(self.s, self.i)
            assert m is not None
            self.advance(m.end() - self.i)


def key_lines(text: str) -> dict[str, int]:
    """Map each TOML path of a document to the 1-based line where it is written.

    A table's path maps to its header line; `[[listener.mirror]]` tables get
    indices counted within their parent (`listener[1].mirror[0]`).

    :param text: the document, which must already have parsed as TOML.
    """
    try:
        return _LineScanner(text).run()
    except (IndexError, ValueError):  # pragma: no cover - a guard, not a parser
        return {}


def join_path(path: str, key: str | int) -> str:
    """Extend a TOML path by a key or an array index: `a` + 0 + `b` is `a[0].b`.

    :param path: the path so far ("" at the top).
    :param key: a key, or an array index.
    """
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def line_of(lines: Mapping[str, int], path: str) -> int | None:
    """Find the line of a path, or of its nearest enclosing key or table.

    :param lines: the map from key_lines().
    :param path: a dotted path such as `listener[0].mirror[1].queue`.
    """
    while path:
        if path in lines:
            return lines[path]
        cut = path.rfind("[") if path.endswith("]") else path.rfind(".")
        path = path[:max(cut, 0)]
    return None
