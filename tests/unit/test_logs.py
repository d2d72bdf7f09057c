# The log line formats and the secret-scrubbing filter of gateway/logs.py.
#
# Owns: evidence that a line carries its call site's fields (after a text
# message, as top-level JSON keys), that JSON mode gives one object per line,
# and that a secret never survives into a rendered line, in whatever part of
# the record or whatever encoding it hides. Uses private handlers on private
# loggers, except the configure() test, which restores the global loggers.
from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator

import pytest

from gateway import logs
from gateway.logs import JsonFormatter, SecretFilter, TextFormatter
from gateway.secrets import REDACTED


def _logger(formatter: logging.Formatter, scrub: SecretFilter | None = None
            ) -> tuple[logging.Logger, io.StringIO]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    if scrub is not None:
        handler.addFilter(scrub)
    logger = logging.Logger("mirrorgate.test")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    return logger, out


def _json_lines(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


# -- text ----------------------------------------------------------------------


def test_text_line_ends_with_the_fields_as_key_value() -> None:
    logger, out = _logger(TextFormatter())
    logger.warning("mirror unreachable: %s", "connection refused",
                   extra={"listener": "db", "mirror": "staging", "upstream": "staging"})
    line = out.getvalue().rstrip("\n")
    assert line.endswith(" WARNING mirrorgate.test: mirror unreachable: connection refused "
                         "listener=db mirror=staging upstream=staging")


def test_text_quotes_values_with_spaces_and_leaves_out_none() -> None:
    logger, out = _logger(TextFormatter())
    logger.info("answered", extra={"session": None, "reason": 'bad "head" here',
                                   "mirrors": ["a", "b"], "status": 400})
    line = out.getvalue().rstrip("\n")
    assert line.endswith(' answered reason="bad \\"head\\" here" mirrors=a,b status=400')
    assert "session" not in line


def test_text_line_without_fields_is_the_plain_message() -> None:
    logger, out = _logger(TextFormatter())
    logger.info("received %s", "SIGTERM")
    assert out.getvalue().rstrip("\n").endswith(" INFO mirrorgate.test: received SIGTERM")


# -- JSON ----------------------------------------------------------------------


def test_json_gives_one_object_per_line_with_the_fields_as_keys() -> None:
    logger, out = _logger(JsonFormatter())
    logger.info("listening on %s", "127.0.0.1:6432", extra={"listener": "db"})
    logger.warning("mirror refused the login", extra={"mirror": "m", "user": "app"})
    first, second = _json_lines(out)
    assert first["msg"] == "listening on 127.0.0.1:6432"
    assert (first["level"], first["logger"], first["listener"]) == ("info", "mirrorgate.test",
                                                                   "db")
    assert str(first["ts"]).endswith("Z")
    assert (second["level"], second["mirror"], second["user"]) == ("warning", "m", "app")


def test_json_fields_cannot_replace_the_line_s_own_keys() -> None:
    logger, out = _logger(JsonFormatter())
    logger.error("real", extra={"level": "fake", "ts": "fake", "mirror": "m"})
    (line,) = _json_lines(out)
    assert (line["level"], line["msg"], line["mirror"]) == ("error", "real", "m")
    assert line["ts"] != "fake"


def test_json_keeps_a_traceback_on_its_one_line() -> None:
    logger, out = _logger(JsonFormatter())
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logger.exception("replayer failed", extra={"mirror": "m"})
    assert len(out.getvalue().splitlines()) == 1
    (line,) = _json_lines(out)
    assert "RuntimeError: boom" in str(line["exc"])


# -- scrubbing -----------------------------------------------------------------

SECRET = "s3cr3t-Pa55/word"


def test_a_secret_in_the_arguments_message_or_fields_is_redacted() -> None:
    logger, out = _logger(TextFormatter(), SecretFilter([SECRET]))
    logger.warning("refused with %s", SECRET)
    logger.warning(f"inline {SECRET}")
    logger.warning("fields", extra={"user": SECRET, "mirrors": [SECRET, "x"],
                                    "headers": {"a": SECRET}, "thing": RuntimeError(SECRET)})
    text = out.getvalue()
    assert SECRET not in text
    assert text.count(REDACTED) >= 6


def test_a_secret_in_json_mode_is_redacted_before_escaping() -> None:
    quoted = 'pa"ss\\word'
    logger, out = _logger(JsonFormatter(), SecretFilter([quoted]))
    logger.warning("got %r", quoted, extra={"value": quoted})
    (line,) = _json_lines(out)
    assert quoted not in json.dumps(line) and quoted not in str(line)
    assert REDACTED in str(line["msg"]) and line["value"] == REDACTED


@pytest.mark.parametrize("rendered", [
    "postgres://app:s3cr3t-Pa55%2Fword@db:5432/x",       # percent-encoded in a URL
    "b'Bearer s3cr3t-Pa55/word'",                        # bytes repr of a header value
    '{"password": "s3cr3t-Pa55/word"}',                 # JSON text
])
def test_a_secret_is_found_in_the_forms_it_takes_in_text(rendered: str) -> None:
    scrub = SecretFilter([SECRET])
    assert "s3cr3t-Pa55" not in scrub.scrub(rendered)


def test_the_credentials_of_a_header_value_are_secret_without_their_scheme() -> None:
    scrub = SecretFilter(["Bearer tok-123456"])
    assert scrub.scrub("token tok-123456 expired") == f"token {REDACTED} expired"
    assert scrub.scrub("Authorization: Bearer tok-123456") == f"Authorization: {REDACTED}"


def test_a_longer_secret_containing_a_shorter_one_goes_whole() -> None:
    scrub = SecretFilter(["abc", "xxabcxx"])
    assert scrub.scrub("[xxabcxx] [abc]") == f"[{REDACTED}] [{REDACTED}]"


def test_a_secret_in_a_traceback_is_redacted() -> None:
    logger, out = _logger(TextFormatter(), SecretFilter([SECRET]))
    try:
        raise ValueError(f"cannot use {SECRET}")
    except ValueError:
        logger.exception("failed")
    assert "ValueError: cannot use " + REDACTED in out.getvalue()
    assert SECRET not in out.getvalue()


def test_set_secrets_replaces_the_values_scrubbed() -> None:
    scrub = SecretFilter(["old-secret"])
    scrub.set_secrets(["new-secret"])
    assert scrub.scrub("old-secret new-secret") == f"old-secret {REDACTED}"
    scrub.set_secrets([])
    assert scrub.scrub("new-secret") == "new-secret"


def test_empty_values_are_not_secrets() -> None:
    scrub = SecretFilter(["", "x-secret"])
    assert scrub.scrub("plain text") == "plain text"


def test_a_call_with_mismatched_arguments_does_not_raise_and_is_scrubbed() -> None:
    logger, out = _logger(TextFormatter(), SecretFilter([SECRET]))
    logger.warning("two %s %s", SECRET)
    assert "did not match" in out.getvalue()
    assert SECRET not in out.getvalue()


# -- configure -----------------------------------------------------------------


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root, ours = logging.getLogger(), logging.getLogger("mirrorgate")
    saved = (root.handlers[:], root.level, ours.handlers[:], ours.level, ours.propagate)
    try:
        yield
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
        ours.handlers[:], ours.level, ours.propagate = saved[2], saved[3], saved[4]
        logs.set_secrets([])


def test_configure_sends_every_logger_through_one_scrubbed_handler(
        restore_logging: None, monkeypatch: pytest.MonkeyPatch) -> None:
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    logs.configure("debug", "json", secrets=["hunter22"])
    logging.getLogger("mirrorgate.x").debug("pw hunter22", extra={"listener": "db"})
    logging.getLogger("asyncio").info("not shown: other libraries log warnings only")
    logging.getLogger("asyncio").error("callback failed with hunter22")
    logs.set_secrets(["rotated99"])
    logging.getLogger("mirrorgate.x").info("now rotated99")
    lines = _json_lines(err)
    assert [line["msg"] for line in lines] == [
        f"pw {REDACTED}", f"callback failed with {REDACTED}", f"now {REDACTED}"]
    assert lines[0]["listener"] == "db"


def test_configure_refuses_an_unknown_level(restore_logging: None) -> None:
    with pytest.raises(ValueError, match="verbose"):
        logs.configure("verbose")
