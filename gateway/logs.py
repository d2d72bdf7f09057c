# Logging set-up for the CLI: text or JSON lines on stderr, with secrets scrubbed.
#
# Owns: the log line format (one line per event; the structured fields a call
# site passes with ``extra={...}`` as `key=value` after a text message, or as
# top-level keys of a JSON object) and the last line of defence for secrets: a
# filter on the one handler that replaces every secret value in a rendered
# line with REDACTED. Libraries (gateway modules, plugins) only call
# logging.getLogger and log; ``configure`` is called once, by the CLI.
# Must not know: the configuration model (the CLI hands over the secret values,
# from gateway.secrets) or any protocol.
#
# Fields: call sites name what a line concerns with these keys, whichever apply:
# ``listener``, ``session`` (the client's peer address), ``mirror``,
# ``upstream``; then event details such as ``user``, ``database``, ``status``.
from __future__ import annotations

import json
import logging
import re
import sys
import time
import urllib.parse
from collections.abc import Iterable, Mapping
from typing import Any

from .secrets import REDACTED

__all__ = ["JsonFormatter", "SecretFilter", "TextFormatter", "configure", "fields_of",
           "set_secrets"]

# Attributes every LogRecord has; anything else on a record came from ``extra``.
_RECORD_KEYS = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message", "asctime", "taskName"}
# Keys the JSON formatter writes itself: a field of the same name cannot replace them.
_JSON_KEYS = ("ts", "level", "logger", "msg", "exc", "stack")
# A text field value that needs no quoting.
_BARE = re.compile(r'[^\s"=\\]+')


def fields_of(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields a call site gave ``record`` (its ``extra``), in order,
    leaving out those that are None."""
    return {k: v for k, v in record.__dict__.items()
            if k not in _RECORD_KEYS and v is not None and not k.startswith("_")}


class TextFormatter(logging.Formatter):
    """``2026-11-22 22:40:07,596 INFO mirrorgate.postgres: message key=value ...``"""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        line = super().formatMessage(record)
        fields = fields_of(record)
        if not fields:
            return line
        return line + " " + " ".join(f"{k}={_text_value(v)}" for k, v in fields.items())


def _text_value(value: Any) -> str:
    if isinstance(value, list | tuple | set | frozenset):
        text = ",".join(str(v) for v in value)
    elif isinstance(value, Mapping):
        text = json.dumps(value, default=str, sort_keys=True)
    else:
        text = str(value)
    return text if _BARE.fullmatch(text) else json.dumps(text)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC), level, logger, msg, then the fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in fields_of(record).items():
            if key not in _JSON_KEYS:
                out[key] = _json_value(value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str)


def _json_value(value: Any) -> Any:
    if isinstance(value, set | frozenset):
        return sorted(value, key=str)
    return value


class SecretFilter(logging.Filter):
    """Replaces every secret value with REDACTED in a record's message, its
    arguments, its fields and its traceback, before any formatter sees it.

    A secret is also looked for as it would be written in a URL
    (percent-encoded), in a Python repr or JSON string (escaped), and, for a
    header value such as ``Bearer <token>``, without its scheme. Every
    occurrence is replaced, so a secret that is also an ordinary word is
    redacted wherever that word appears.
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self._pattern: re.Pattern[str] | None = None
        self.set_secrets(secrets)

    def set_secrets(self, secrets: Iterable[str]) -> None:
        """Scrub these values from now on (instead of the previous ones)."""
        variants = {v for s in secrets if s for v in _variants(s) if v}
        if not variants:
            self._pattern = None
            return
        # Longest first: where one secret contains another, the whole goes.
        ordered = sorted(variants, key=lambda v: (-len(v), v))
        self._pattern = re.compile("|".join(map(re.escape, ordered)))

    def scrub(self, text: str) -> str:
        """``text`` with every secret replaced by REDACTED."""
        pattern = self._pattern
        return text if pattern is None else pattern.sub(REDACTED, text)

    def filter(self, record: logging.LogRecord) -> bool:
        if self._pattern is None:
            return True
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad call site must not break its caller
            message = f"{record.msg!r} (log arguments did not match: {record.args!r})"
        record.msg = self.scrub(message)
        record.args = None
        for key in fields_of(record):
            setattr(record, key, self._scrub_value(getattr(record, key)))
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.scrub(record.exc_text)
        if record.stack_info:
            record.stack_info = self.scrub(record.stack_info)
        return True

    def _scrub_value(self, value: Any) -> Any:
        if value is None or isinstance(value, bool | int | float):
            return value
        if isinstance(value, str):
            return self.scrub(value)
        if isinstance(value, list | tuple | set | frozenset):
            return [self._scrub_value(v) for v in value]
        if isinstance(value, Mapping):
            return {self.scrub(str(k)): self._scrub_value(v) for k, v in value.items()}
        return self.scrub(str(value))


def _variants(secret: str) -> set[str]:
    """The forms in which ``secret`` could show up in a rendered log line."""
    forms = {secret}
    parts = secret.split(None, 1)
    if len(parts) == 2:
        forms.add(parts[1])  # the credentials of "Bearer <token>", "Basic <b64>"
    out = set()
    for form in forms:
        out.add(form)
        out.add(urllib.parse.quote(form, safe=""))
        out.add(urllib.parse.quote_plus(form, safe=""))
        out.add(repr(form)[1:-1])
        out.add(repr(form.encode())[2:-1])
        out.add(json.dumps(form)[1:-1])
        out.add(json.dumps(form, ensure_ascii=False)[1:-1])
    return out


# The filter configure() installs; set_secrets() updates it on reload.
_scrubber = SecretFilter()


def set_secrets(secrets: Iterable[str]) -> None:
    """Scrub these values (gateway.secrets.secret_values of the configuration
    now serving) from every line logged from now on, in place of the previous
    ones. Call it when a reload swaps the configuration."""
    _scrubber.set_secrets(secrets)


def configure(level: str = "info", fmt: str = "text", secrets: Iterable[str] = ()) -> None:
    """Send logs to stderr, one line per event, with ``secrets`` scrubbed.

    The gateway's own loggers (``mirrorgate.*``) log at ``level``; other
    libraries (asyncio, uvloop) at warning and above, through the same format
    and filter, so nothing reaches stderr unscrubbed.

    :param level: debug, info, warning or error (``[admin] log_level``).
    :param fmt: text or json (``[admin] log_format``).
    :param secrets: values never to be shown (gateway.secrets.secret_values).
    :raises ValueError: ``level`` is not a level name.
    """
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    set_secrets(secrets)
    handler.addFilter(_scrubber)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(logging.WARNING, numeric))
    ours = logging.getLogger("mirrorgate")
    ours.handlers.clear()
    ours.setLevel(numeric)
    ours.propagate = True
