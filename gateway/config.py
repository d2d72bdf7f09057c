# Owns the configuration: the frozen attrs model every other module reads, and
# the loader that turns a TOML document into it. Reading is done in four steps:
# tomlkit parses the text; ${VAR} references are expanded; one cattrs Converter
# per protocol structures the tables (unknown keys forbidden, every error kept
# with its path); then the checks that types cannot express (references,
# uniqueness, a mirror that is its own primary) run over the result. Every
# problem of every step is reported at once, with its TOML path and line.
# It must not know any protocol: a protocol contributes a ProtocolSpec, whose
# attrs classes hold the keys of its own listener and mirror tables.
import difflib
import os
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import Any, Protocol, TypeVar, get_args, get_origin

import attrs
import cattrs
import tomlkit
from cattrs.cols import (
    homogenous_tuple_structure_factory,
    is_mapping,
    list_structure_factory,
    mapping_structure_factory,
)
from cattrs.errors import (
    AttributeValidationNote,
    BaseValidationError,
    ClassValidationError,
    ForbiddenExtraKeysError,
    IterableValidationNote,
)
from cattrs.gen import make_dict_structure_fn, override
from tomlkit.exceptions import TOMLKitError

from gateway.config_values import (
    Address,
    Duration,
    Size,
    ValueProblem,
    addresses_clash,
    describe,
    expand_document,
    join_path,
    key_lines,
    line_of,
    normalise_scheme,
    parse_address,
    parse_duration,
    parse_optional_address,
    parse_size,
    parse_url,
    redact_url,
    same_host,
)

__all__ = [
    "Address",
    "Admin",
    "AdminUser",
    "Config",
    "ConfigError",
    "Duration",
    "General",
    "Listener",
    "Mirror",
    "Problem",
    "ProtocolSpec",
    "Size",
    "Upstream",
    "load_config",
    "parse_config",
]

T = TypeVar("T")

# --- the model ----------------------------------------------------------------


@attrs.frozen
class General:
    """The `[general]` table: process-wide timeouts, in seconds."""

    shutdown_timeout: float = 30.0
    startup_timeout: float = 15.0


@attrs.frozen
class AdminUser:
    """One `[[admin.user]]`: who may use the Postgres admin console."""

    name: str
    password: str = attrs.field(repr=False)


@attrs.frozen
class Admin:
    """The `[admin]` table; `listen = false` turns the admin listener off (None).

    `database` is the database name that opens the admin console on a Postgres
    listener; `user` lists who may log in to it (none: the console is off).
    `secret_headers` names headers, beyond Authorization, Proxy-Authorization,
    Cookie and Set-Cookie, whose values never appear in logs or /status.
    """

    listen: Address | None = Address("127.0.0.1", 9930)
    log_level: str = "info"
    log_format: str = "text"
    database: str = "mirrorgate"
    user: tuple[AdminUser, ...] = ()
    secret_headers: tuple[str, ...] = ()


@attrs.frozen
class Upstream:
    """One `[[upstream]]`: a server that is a primary, a mirror, or both.

    `url` is kept as written (after ${VAR} expansion); its repr hides the password,
    and `password` and `users` are left out of repr altogether.
    """

    name: str
    url: str = attrs.field(repr=lambda url: repr(redact_url(url)))
    scheme: str
    host: str
    port: int
    database: str | None
    user: str | None
    password: str | None = attrs.field(default=None, repr=False)
    users: Mapping[str, str] = attrs.field(factory=dict, repr=False)
    pool_size: int = 100
    connect_timeout: float = 5.0


@attrs.frozen
class Mirror:
    """One `[[listener.mirror]]` (or a mirror nested in protocol options).

    `options` is an instance of the protocol's MirrorOptions; the loader always
    sets it, None is only for models built by hand.
    """

    name: str
    upstream: str
    queue: int = 500
    queue_bytes: int = 64 * 1024 * 1024
    timeout: float = 5.0
    options: object = None


@attrs.frozen
class Listener:
    """One `[[listener]]`; `options` is an instance of the protocol's ListenerOptions."""

    name: str
    protocol: str
    listen: Address
    primary: str
    max_clients: int = 1000
    mirrors: tuple[Mirror, ...] = ()
    options: object = None


@attrs.frozen
class Config:
    """The whole configuration; `upstreams` is keyed by name, in file order."""

    general: General
    admin: Admin
    upstreams: Mapping[str, Upstream]
    listeners: tuple[Listener, ...]
    path: str | None = None


class ProtocolSpec(Protocol):
    """What the loader needs of a protocol (a class or an instance will do).

    `ListenerOptions` and `MirrorOptions` are attrs classes whose fields are the
    protocol's own keys of a listener and a mirror table; every field needs a
    default. Their fields may use `Size`, `Duration`, `Address`, and nested attrs
    classes holding `tuple[Mirror, ...]`, which get this protocol's MirrorOptions.
    A nested table with a str field `primary` is checked like a listener's, and
    gives the mirrors inside it their primary. A field named like a core key of
    the same table (`timeout` in a mirror) never receives a value: the core wins.
    """

    @property
    def id(self) -> str: ...

    @property
    def url_schemes(self) -> tuple[str, ...]: ...

    @property
    def ListenerOptions(self) -> type: ...

    @property
    def MirrorOptions(self) -> type: ...


# --- errors -------------------------------------------------------------------


@attrs.frozen
class Problem:
    """One thing wrong with a configuration.

    :param path: the TOML path, such as `listener[0].mirror[1].queue_bytes`, or ""
        for the document as a whole.
    :param line: the 1-based line of that key, or of the table that lacks it.
    """

    path: str
    line: int | None
    message: str

    def format(self, file: str | None) -> str:
        """Render as `FILE:LINE: path: message`.

        :param file: the file name, or None for text given directly.
        """
        where = file or "<config>"
        if self.line is not None:
            where = f"{where}:{self.line}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ConfigError(Exception):
    """The configuration cannot be used; `problems` lists every reason, by line."""

    def __init__(self, problems: list[Problem], file: str | None = None) -> None:
        self.problems = sorted(problems, key=lambda p: (p.line or 0, p.path))
        self.file = file
        super().__init__(self.problems)

    def __str__(self) -> str:
        return "\n".join(problem.format(self.file) for problem in self.problems)


class _UnknownKeys(Exception):
    def __init__(self, keys: list[str], allowed: list[str]) -> None:
        super().__init__(keys)
        self.keys = keys
        self.allowed = allowed


def _noted(exc: Exception, key: str) -> Exception:
    """Attach the key an error belongs to, the way cattrs does."""
    note = AttributeValidationNote(f"@ attribute {key}", key, object)
    exc.__notes__ = [*getattr(exc, "__notes__", []), note]
    return exc


def _unknown_message(key: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f" (known: {', '.join(sorted(allowed))})"
    return f"unknown key{hint}"


def _flatten(exc: BaseException, path: str, out: list[tuple[str, str]]) -> None:
    """Turn a cattrs exception tree into (path, message) pairs."""
    if isinstance(exc, _UnknownKeys):
        out.extend((join_path(path, k), _unknown_message(k, exc.allowed)) for k in exc.keys)
    elif isinstance(exc, ForbiddenExtraKeysError):
        allowed = [a.name for a in attrs.fields(exc.cl)]
        extra = sorted(exc.extra_fields)
        out.extend((join_path(path, k), _unknown_message(k, allowed)) for k in extra)
    elif isinstance(exc, BaseValidationError):
        for sub in exc.exceptions:
            sub_path = path
            for note in getattr(sub, "__notes__", []):
                if isinstance(note, AttributeValidationNote):
                    sub_path = join_path(path, note.name)
                elif isinstance(note, IterableValidationNote):
                    sub_path = join_path(path, note.index)
            _flatten(sub, sub_path, out)
    elif isinstance(exc, KeyError):
        out.append((path, "missing required key"))
    elif isinstance(exc, ValueProblem):
        out.append((path, str(exc)))
    else:
        out.append((path, f"{exc}" or type(exc).__name__))


# --- structuring --------------------------------------------------------------

_LOG_LEVELS = ("debug", "info", "warning", "error")
_LOG_FORMATS = ("text", "json")


def _at_least(n: int) -> Callable[[Any], str | None]:
    return lambda v: None if v >= n else f"must be at least {n}, got {v}"


def _positive(v: float) -> str | None:
    return None if v > 0 else f"must be greater than 0, got {v}"


def _non_empty(v: str | None) -> str | None:
    return None if v is None or v else "must not be empty"


def _unique_names(users: tuple[AdminUser, ...]) -> str | None:
    names = [u.name for u in users]
    dupes = sorted({n for n in names if names.count(n) > 1})
    return f"duplicate user name {dupes[0]!r}" if dupes else None


def _one_of(*choices: str) -> Callable[[str], str | None]:
    return lambda v: None if v in choices else f"must be one of {', '.join(choices)}, got {v!r}"


@attrs.frozen
class _UpstreamTable:
    name: str
    url: str
    password: str | None = None
    users: dict[str, str] = attrs.field(factory=dict)
    pool_size: int = 100
    connect_timeout: Duration = Duration(5.0)


@attrs.frozen
class _ListenerTable:
    name: str
    protocol: str
    listen: Address
    primary: str
    max_clients: int = 1000
    mirror: tuple[Mirror, ...] = ()


@attrs.frozen
class _MirrorTable:
    upstream: str
    name: str | None = None
    queue: int = 500
    queue_bytes: Size = Size(64 * 1024 * 1024)
    timeout: Duration = Duration(5.0)


# Where a TOML key reads a richer format than the model's type says.
_TOML_TYPES: dict[type, dict[str, Any]] = {
    General: {"shutdown_timeout": Duration, "startup_timeout": Duration},
}

# Checks on values of the right type, run even when a sibling key is wrong.
_RULES: dict[type, dict[str, Callable[[Any], str | None]]] = {
    General: {"shutdown_timeout": _positive, "startup_timeout": _positive},
    Admin: {"log_level": _one_of(*_LOG_LEVELS), "log_format": _one_of(*_LOG_FORMATS),
            "database": _non_empty, "user": _unique_names},
    AdminUser: {"name": _non_empty},
    _UpstreamTable: {"name": _non_empty, "pool_size": _at_least(1), "connect_timeout": _positive},
    _ListenerTable: {"name": _non_empty, "max_clients": _at_least(1)},
    _MirrorTable: {"name": _non_empty, "queue": _at_least(1), "queue_bytes": _at_least(1),
                   "timeout": _positive},
}


def _keys_of(cl: type) -> list[str]:
    return [a.name for a in attrs.fields(cl)]


def _expect_table(value: object) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueProblem(f"expected a table, got {describe(value)}")
    return value


def _strict(kind: type[Any], name: str) -> Callable[[object, type], Any]:
    def structure(value: object, _: type) -> Any:
        if type(value) is kind or (kind is float and type(value) is int):
            return kind(value)
        raise ValueProblem(f"expected {name}, got {describe(value)}")

    return structure


def _failed_init(exc: ClassValidationError) -> bool:
    """Whether cattrs structured every key and then the class's __init__ raised
    (its converters and validators): that lone error carries no key note."""
    if len(exc.exceptions) != 1 or isinstance(exc.exceptions[0], ForbiddenExtraKeysError):
        return False
    notes = getattr(exc.exceptions[0], "__notes__", [])
    return not any(isinstance(n, AttributeValidationNote) for n in notes)


def _is_sequence(t: Any) -> bool:
    origin = get_origin(t)
    if origin is tuple:
        args = get_args(t)
        return len(args) == 2 and args[1] is Ellipsis
    return origin is list


class _Structurer:
    """One cattrs Converter for one protocol (or for the protocol-free tables)."""

    def __init__(self, spec: ProtocolSpec | None) -> None:
        self.spec = spec
        conv = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
        conv.register_structure_hook_factory(attrs.has, self._attrs_factory)
        conv.register_structure_hook_factory(_is_sequence, self._sequence_factory)
        conv.register_structure_hook_factory(is_mapping, self._mapping_factory)
        conv.register_structure_hook(str, _strict(str, "a string"))
        conv.register_structure_hook(int, _strict(int, "an integer"))
        conv.register_structure_hook(float, _strict(float, "a number"))
        conv.register_structure_hook(bool, _strict(bool, "true or false"))
        conv.register_structure_hook(Size, lambda v, _: Size(parse_size(v)))
        conv.register_structure_hook(Duration, lambda v, _: Duration(parse_duration(v)))
        conv.register_structure_hook(Address, lambda v, _: parse_address(v))
        conv.register_structure_hook(Address | None, lambda v, _: parse_optional_address(v))
        conv.register_structure_hook(Mirror, self._structure_mirror)
        self.conv = conv

    def _attrs_factory(self, cl: type) -> Callable[[object, type], Any]:
        toml_types = _TOML_TYPES.get(cl, {})
        overrides: dict[str, Any] = {k: override(struct_hook=self.conv.get_structure_hook(t))
                     for k, t in toml_types.items()}
        generated: Callable[[Any, type], Any] = make_dict_structure_fn(cl, self.conv, **overrides)
        rules = _RULES.get(cl, {})
        types = {a.name: toml_types.get(a.name, a.type) for a in attrs.fields(cl)}

        def structure(value: object, _: type) -> Any:
            table = _expect_table(value)
            errors: list[Exception] = []
            obj = None
            try:
                obj = generated(table, cl)
            except ClassValidationError as exc:
                found = self._field_errors(cl, table, types) if _failed_init(exc) else []
                errors.extend(found or exc.exceptions)
            for key, rule in rules.items():
                if obj is not None:
                    field_value = getattr(obj, key)
                elif key in table:
                    try:
                        field_value = self.conv.structure(table[key], types[key])
                    except Exception:  # reported by the generated hook already
                        continue
                else:
                    continue
                message = rule(field_value)
                if message:
                    errors.append(_noted(ValueProblem(message), key))
            if errors:
                raise ClassValidationError(f"While structuring {cl.__name__}", errors, cl)
            return obj

        return structure

    def _field_errors(self, cl: type, table: Mapping[str, Any], types: Mapping[str, Any],
                      ) -> list[Exception]:
        """Find the fields whose attrs converter or validator refused their value.

        `cl(...)` raised after every key structured; its exception names no field.
        With validators off, each key with a converter is passed alone (beside the
        required keys), then each validator runs on an instance built from all the
        keys. Each error gets its field's key; [] if none is found.
        """
        fields = attrs.fields(cl)
        try:
            values = {a.name: self.conv.structure(table[a.name], types[a.name])
                      for a in fields if a.name in table}
        except Exception:  # pragma: no cover - each key structured a moment ago
            return []
        required = {a.alias: values[a.name] for a in fields
                    if a.name in values and a.default is attrs.NOTHING}
        errors: list[Exception] = []
        with attrs.validators.disabled():
            try:
                cl(**required)
            except Exception:  # a required key's converter, or __attrs_post_init__
                return []
            for a in fields:
                if a.name in values and a.converter is not None and a.alias not in required:
                    try:
                        cl(**required, **{a.alias: values[a.name]})
                    except Exception as exc:
                        errors.append(_noted(exc, a.name))
            if errors:
                return errors
            try:
                obj = cl(**{a.alias: values[a.name] for a in fields if a.name in values})
            except Exception:  # __attrs_post_init__ refused the combination
                return []
        for a in fields:
            if a.validator is not None:
                try:
                    a.validator(obj, a, getattr(obj, a.name))
                except Exception as exc:
                    errors.append(_noted(exc, a.name))
        return errors

    def _sequence_factory(self, t: Any) -> Callable[[object, type], Any]:
        factory = homogenous_tuple_structure_factory if get_origin(t) is tuple else (
            list_structure_factory)
        inner = factory(t, self.conv)

        def structure(value: object, _: type) -> Any:
            if not isinstance(value, list):
                raise ValueProblem(f"expected an array, got {describe(value)}")
            return inner(value, t)

        return structure

    def _mapping_factory(self, t: Any) -> Callable[[object, type], Any]:
        inner = mapping_structure_factory(t, self.conv)

        def structure(value: object, _: type) -> Any:
            return inner(_expect_table(value), t)

        return structure

    def split(self, value: object, core: type, options: type | None,
              ) -> tuple[Any, Any]:
        """Structure a table's core keys into `core`, the rest into `options`.

        :raises ClassValidationError: with every problem of both parts.
        """
        table = _expect_table(value)
        core_keys = _keys_of(core)
        option_keys = _keys_of(options) if options is not None else []
        errors: list[Exception] = []
        unknown = [k for k in table if k not in core_keys and k not in option_keys]
        if unknown:
            errors.append(_UnknownKeys(unknown, core_keys + option_keys))

        def attempt(cl: type | None, keys: list[str]) -> Any:
            if cl is None:
                return None
            try:
                return self.conv.structure({k: v for k, v in table.items() if k in keys}, cl)
            except ClassValidationError as exc:
                errors.extend(exc.exceptions)
            except Exception as exc:
                errors.append(exc)
            return None

        core_obj = attempt(core, core_keys)
        options_obj = attempt(options, [k for k in option_keys if k not in core_keys])
        if errors:
            raise ClassValidationError(f"While structuring {core.__name__}", errors, core)
        return core_obj, options_obj

    def _structure_mirror(self, value: object, _: type) -> Mirror:
        options = self.spec.MirrorOptions if self.spec is not None else None
        table, opts = self.split(value, _MirrorTable, options)
        return Mirror(name=table.upstream if table.name is None else table.name,
                      upstream=table.upstream, queue=table.queue, queue_bytes=table.queue_bytes,
                      timeout=table.timeout, options=opts)

    def listener(self, value: object) -> Listener:
        """Structure one `[[listener]]` table of this protocol.

        :raises ClassValidationError: with every problem found.
        """
        assert self.spec is not None
        table, opts = self.split(value, _ListenerTable, self.spec.ListenerOptions)
        return Listener(name=table.name, protocol=table.protocol, listen=table.listen,
                        primary=table.primary, max_clients=table.max_clients,
                        mirrors=table.mirror, options=opts)

    def upstream(self, value: object, schemes: list[str]) -> Upstream:
        """Structure one `[[upstream]]` table and split its URL.

        :raises ClassValidationError: with every problem found.
        """
        table = self.conv.structure(value, _UpstreamTable)
        try:
            url = parse_url(table.url, schemes)
        except ValueProblem as exc:
            raise ClassValidationError("While structuring upstream", [_noted(exc, "url")],
                                       Upstream) from None
        if url.password is not None and table.password is not None:
            twice = ValueProblem("the password is given both here and in the URL: keep one")
            raise ClassValidationError("While structuring upstream", [_noted(twice, "password")],
                                       Upstream)
        return Upstream(name=table.name, url=table.url, scheme=url.scheme, host=url.host,
                        port=url.port, database=url.database, user=url.user,
                        password=table.password if url.password is None else url.password,
                        users=table.users, pool_size=table.pool_size,
                        connect_timeout=table.connect_timeout)


# --- the loader ---------------------------------------------------------------


def _nested(t: Any) -> tuple[type | None, bool]:
    """The table type a field holds, and whether it holds an array of them."""
    many = _is_sequence(t)
    if many:
        t = get_args(t)[0]
    args = [a for a in get_args(t) if a is not type(None)] if get_origin(t) is not None else []
    if not many and len(args) == 1:  # X | None
        t = args[0]
    return (t, many) if isinstance(t, type) and attrs.has(t) else (None, many)


def _sites(table: object, classes: list[type], path: str, primary: tuple[str, str],
           ) -> Iterator[tuple[str, Mapping[str, Any] | None, tuple[str, str]]]:
    """Walk raw tables guided by their classes' field types, so that references
    are checked even where structuring failed. Yields (path, mirror table,
    (primary name, its path)) for each mirror table, and (path, None, primary)
    for each `primary` key."""
    if not isinstance(table, Mapping):
        return
    for cl in classes:
        attrs.resolve_types(cl)
    own = table.get("primary")
    if isinstance(own, str) and any("primary" in _keys_of(cl) for cl in classes):
        primary = (own, join_path(path, "primary"))
        yield primary[1], None, primary
    for cl in classes:
        for field in attrs.fields(cl):
            nested, many = _nested(field.type)
            value = table.get(field.name)
            if nested is None or value is None:
                continue
            items = enumerate(value) if many and isinstance(value, list) else [(None, value)]
            for index, item in items:
                item_path = join_path(path, field.name)
                item_path = item_path if index is None else join_path(item_path, index)
                if nested is Mirror:
                    if isinstance(item, Mapping):
                        yield item_path, item, primary
                else:
                    yield from _sites(item, [nested], item_path, primary)


class _Loader:
    """Builds a Config from an unwrapped document, collecting (path, message)."""

    def __init__(self, protocols: Mapping[str, ProtocolSpec], lines: Mapping[str, int]) -> None:
        self.protocols = protocols
        self.lines = lines
        self.problems: list[tuple[str, str]] = []
        self.base = _Structurer(None)
        self.schemes = sorted({s for spec in protocols.values() for s in spec.url_schemes})
        self.upstreams: dict[str, tuple[int, Upstream]] = {}
        self.broken: set[object] = set()  # names of upstreams that failed to build
        self.structurers: dict[str, _Structurer] = {}

    def report(self, path: str, message: str) -> None:
        self.problems.append((path, message))

    def where(self, path: str) -> str:
        line = line_of(self.lines, path)
        return f" (line {line})" if line else ""

    def attempt(self, path: str, build: Callable[[], T]) -> T | None:
        try:
            return build()
        except Exception as exc:  # every structuring error carries its own path
            _flatten(exc if isinstance(exc, BaseValidationError) else
                     ClassValidationError("", [exc], object), path, self.problems)
            return None

    def tables(self, doc: Mapping[str, Any], key: str) -> list[Any]:
        if key not in doc:
            self.report(key, f"at least one [[{key}]] table is required")
            return []
        if not isinstance(doc[key], list):
            self.report(key, f"expected an array of tables [[{key}]], got {describe(doc[key])}")
            return []
        return doc[key]

    def build(self, doc: Mapping[str, Any]) -> Config | None:
        top = ["general", "admin", "upstream", "listener"]
        for key in doc:
            if key not in top:
                self.report(key, _unknown_message(key, top))
        structure = self.base.conv.structure
        general = self.attempt("general", lambda: structure(doc.get("general", {}), General))
        admin = self.attempt("admin", lambda: structure(doc.get("admin", {}), Admin))
        for i, raw in enumerate(self.tables(doc, "upstream")):
            upstream = self.attempt(f"upstream[{i}]", partial(self.base.upstream, raw,
                                                                self.schemes))
            if upstream is None:
                if isinstance(raw, Mapping) and isinstance(raw.get("name"), str):
                    self.broken.add(raw["name"])
            elif upstream.name in self.upstreams:
                first = self.upstreams[upstream.name][0]
                self.report(f"upstream[{i}].name", f"duplicate upstream name {upstream.name!r}"
                            f"{self.where(f'upstream[{first}].name')}")
            else:
                self.upstreams[upstream.name] = (i, upstream)
        bound: list[tuple[str, Address, str]] = []
        if admin is not None and admin.listen is not None:
            bound.append(("admin.listen", admin.listen, "the admin listener"))
        names: dict[str, str] = {}
        listeners: list[Listener] = []
        for i, raw in enumerate(self.tables(doc, "listener")):
            path = f"listener[{i}]"
            if not isinstance(raw, Mapping):
                self.report(path, f"expected a table, got {describe(raw)}")
                continue
            self.check_unique(raw.get("name"), f"{path}.name", names, "listener")
            listener = self.listener(path, raw)
            if listener is not None:
                listeners.append(listener)
            try:
                listen = parse_address(raw.get("listen"))
            except ValueProblem:
                continue  # reported by structuring
            for other_path, address, owner in bound:
                if addresses_clash(listen, address):
                    self.report(f"{path}.listen", f"{listen} clashes with {address} of "
                                f"{owner}{self.where(other_path)}")
                    break
            bound.append((f"{path}.listen", listen, f"listener {raw.get('name')!r}"))
        if self.problems or general is None or admin is None:
            return None
        return Config(general=general, admin=admin,
                      upstreams={name: u for name, (_, u) in self.upstreams.items()},
                      listeners=tuple(listeners))

    def check_unique(self, name: object, path: str, seen: dict[str, str], what: str) -> None:
        if not isinstance(name, str):
            return
        if name in seen:
            hint = (" in this listener", "; the name defaults to the upstream's: set `name` "
                    "to tell them apart") if what == "mirror" else ("", "")
            self.report(path, f"duplicate {what} name {name!r}{hint[0]}{self.where(seen[name])}"
                        f"{hint[1]}")
        seen.setdefault(name, path)

    def listener(self, path: str, raw: Mapping[str, Any]) -> Listener | None:
        protocol = raw.get("protocol")
        if protocol is None:
            self.report(f"{path}.protocol", "missing required key")
            return None
        if not isinstance(protocol, str):
            self.report(f"{path}.protocol", f"expected a string, got {describe(protocol)}")
            return None
        spec = self.protocols.get(protocol)
        if spec is None:
            known = ", ".join(sorted(self.protocols)) or "none registered"
            self.report(f"{path}.protocol", f"unknown protocol {protocol!r} (known: {known})")
            return None
        if protocol not in self.structurers:
            self.structurers[protocol] = _Structurer(spec)
        listener = self.attempt(path, partial(self.structurers[protocol].listener, raw))
        schemes = {normalise_scheme(s) for s in spec.url_schemes}
        context = (protocol, raw.get("name"))
        sites = list(_sites(raw, [_ListenerTable, spec.ListenerOptions], path, ("", "")))
        sites.sort(key=lambda site: line_of(self.lines, site[0]) or 0)
        names: dict[str, str] = {}
        for site_path, mirror, (primary, primary_path) in sites:
            if mirror is None:
                self.check_primary(primary, primary_path, schemes, context)
                continue
            target = mirror.get("upstream")
            if not isinstance(target, str):
                continue  # reported by structuring
            self.check_unique(mirror.get("name", target), f"{site_path}.name", names, "mirror")
            self.check_mirror(target, f"{site_path}.upstream", primary, schemes, context)
        return listener

    def check_ref(self, name: str, path: str, schemes: set[str], protocol: str,
                  ) -> tuple[int, Upstream] | None:
        if name in self.broken:
            return None
        if name not in self.upstreams:
            known = ", ".join(self.upstreams) or "none"
            self.report(path, f"no [[upstream]] is named {name!r} (known: {known})")
            return None
        index, upstream = self.upstreams[name]
        if upstream.scheme not in schemes:
            self.report(path, f"upstream {name!r} is a {upstream.scheme} URL; protocol "
                        f"{protocol!r} accepts {', '.join(sorted(schemes))}")
        return index, upstream

    def check_primary(self, name: str, path: str, schemes: set[str],
                      context: tuple[str, object]) -> None:
        found = self.check_ref(name, path, schemes, context[0])
        if found is None:
            return
        index, upstream = found
        relayed = "the client's own credentials are relayed to a primary"
        for key, present in (("url", upstream.user is not None),
                             ("password", upstream.password is not None),
                             ("users", bool(upstream.users))):
            if present:
                what = "a user in its URL" if key == "url" else f"`{key}`"
                self.report(f"upstream[{index}].{key}",
                            f"upstream {name!r} is the primary of listener {context[1]!r}, so "
                            f"it must not have {what}: {relayed}")

    def check_mirror(self, name: str, path: str, primary_name: str, schemes: set[str],
                     context: tuple[str, object]) -> None:
        found = self.check_ref(name, path, schemes, context[0])
        if found is None or primary_name not in self.upstreams:
            return
        target, primary = found[1], self.upstreams[primary_name][1]
        if (target.scheme == primary.scheme and same_host(target.host, primary.host)
                and target.port == primary.port and target.database == primary.database):
            self.report(path, f"upstream {name!r} is the primary {primary_name!r} itself (same "
                        "host, port and database): a mirror must be another server")


def parse_config(text: str, protocols: Mapping[str, ProtocolSpec], path: str | None = None,
                 env: Mapping[str, str] | None = None) -> Config:
    """Build a Config from TOML text.

    :param text: the document.
    :param protocols: the registered protocols, by id.
    :param path: the file the text came from, for messages and `Config.path`.
    :param env: the variables for ${VAR}; os.environ when None.
    :raises ConfigError: with every problem found, each with its path and line.
    """
    try:
        doc = tomlkit.parse(text).unwrap()
    except TOMLKitError as exc:
        message = str(exc)
        line = getattr(exc, "line", None)
        if line is not None:
            message = message.rsplit(f" at line {line}", 1)[0]
        raise ConfigError([Problem("", line, f"TOML syntax: {message}")], path) from None
    lines = key_lines(text)
    problems: list[tuple[str, str]] = []
    doc = expand_document(doc, os.environ if env is None else env, "", problems)
    loader = _Loader(protocols, lines)
    loader.problems = problems
    config = loader.build(doc)
    if config is None:
        unique = list(dict.fromkeys(loader.problems))
        raise ConfigError([Problem(p, line_of(lines, p), m) for p, m in unique], path)
    return attrs.evolve(config, path=path)


def load_config(path_or_text: str | os.PathLike[str], protocols: Mapping[str, ProtocolSpec],
                *, env: Mapping[str, str] | None = None) -> Config:
    """Read a configuration file, or TOML text (a str with a newline in it).

    :param path_or_text: a path, or the document itself.
    :param protocols: the registered protocols, by id.
    :param env: the variables for ${VAR}; os.environ when None.
    :raises ConfigError: the file cannot be read, or with every problem found.
    """
    if isinstance(path_or_text, str) and "\n" in path_or_text:
        return parse_config(path_or_text, protocols, env=env)
    path = os.fspath(path_or_text)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        problem = Problem("", None, f"cannot read: {exc.strerror or exc}")
        raise ConfigError([problem], path) from None
    except UnicodeDecodeError:
        raise ConfigError([Problem("", None, "not UTF-8 text")], path) from None
    return parse_config(text, protocols, path=path, env=env)
