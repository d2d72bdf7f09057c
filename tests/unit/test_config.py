"""Configuration loading: the model, value formats, and every validation rule."""

import textwrap

import attrs
import pytest

from gateway.config import (
    Address,
    Admin,
    Config,
    ConfigError,
    Duration,
    General,
    Mirror,
    Problem,
    ProtocolSpec,
    Size,
    Upstream,
    load_config,
    parse_config,
)
from gateway.config_values import key_lines, line_of, parse_duration, parse_size

# --- fake protocols -------------------------------------------------------------


@attrs.frozen
class PgListenerOptions:
    pass


def _fraction(_inst: object, _attr: object, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"exposure must be between 0.0 and 1.0, got {value}")


@attrs.frozen
class PgMirrorOptions:
    exposure: float = attrs.field(default=1.0, validator=_fraction)


class FakePostgres:
    id = "postgres"
    url_schemes = ("postgres", "postgresql")
    ListenerOptions = PgListenerOptions
    MirrorOptions = PgMirrorOptions


@attrs.frozen
class Route:
    prefix: str = "/"
    primary: str | None = None
    mirror: tuple[Mirror, ...] = ()


@attrs.frozen
class HttpListenerOptions:
    route: tuple[Route, ...] = ()
    max_body: Size = Size(1 << 20)
    idle_timeout: Duration = Duration(60.0)


@attrs.frozen
class HttpMirrorOptions:
    percent: float = 100.0


class FakeHttp:
    id = "http"
    url_schemes = ("http",)
    ListenerOptions = HttpListenerOptions
    MirrorOptions = HttpMirrorOptions


PROTOCOLS: dict[str, ProtocolSpec] = {"postgres": FakePostgres, "http": FakeHttp}

BASE = """\
[[upstream]]
name = "prod"
url = "postgres://10.0.0.1:5432"

[[upstream]]
name = "staging"
url = "postgres://10.0.2.25/staging_db"

[[listener]]
name = "db"
protocol = "postgres"
listen = "127.0.0.1:6432"
primary = "prod"
"""

DESIGN_EXAMPLE = """\
[general]
shutdown_timeout = "30s"             # SIGTERM: sessions finish and queues drain within this
startup_timeout = "15s"              # a client must complete its startup packet within this

[admin]
listen = "127.0.0.1:9930"            # /metrics, /status (JSON), /healthz, dashboard

[[upstream]]
name = "prod"
url = "postgres://10.0.0.1:5432"      # a primary: the client's own credentials are relayed,
                                      # so user and password here are an error

[[upstream]]
name = "staging"
url = "postgres://10.0.2.25:5432/staging_db"   # database named: every session uses it
password = "${STAGING_PASSWORD}"      # ${VAR} is read from the environment
# users = { app = "${APP_PW}", reporting = "${REPORT_PW}" }   # per-user passwords

[[listener]]
name = "db"
protocol = "postgres"
listen = "0.0.0.0:6432"
primary = "prod"
max_clients = 1000

[[listener.mirror]]
upstream = "staging"
exposure = 1.0
queue = 500                          # units per client session (PgDog's mirror_queue)
queue_bytes = "64MiB"                # bytes across all sessions of this mirror
timeout = "5s"
"""


def parse(text: str, env: dict[str, str] | None = None) -> Config:
    return parse_config(textwrap.dedent(text), PROTOCOLS, env=env or {})


def problems(text: str, env: dict[str, str] | None = None) -> list[Problem]:
    with pytest.raises(ConfigError) as info:
        parse(text, env)
    return info.value.problems


def only_problem(text: str, env: dict[str, str] | None = None) -> Problem:
    found = problems(text, env)
    assert len(found) == 1, found
    return found[0]


def with_mirror(extra: str) -> str:
    return BASE + '\n[[listener.mirror]]\nupstream = "staging"\n' + extra


# --- whole documents ------------------------------------------------------------


def test_design_example_parses_to_its_values() -> None:
    config = parse(DESIGN_EXAMPLE, env={"STAGING_PASSWORD": "s3cret"})
    assert config.general == General(shutdown_timeout=30.0, startup_timeout=15.0)
    assert config.admin == Admin(listen=Address("127.0.0.1", 9930))
    assert list(config.upstreams) == ["prod", "staging"]
    prod, staging = config.upstreams["prod"], config.upstreams["staging"]
    assert (prod.scheme, prod.host, prod.port, prod.database, prod.user, prod.password) == (
        "postgres", "10.0.0.1", 5432, None, None, None)
    assert (staging.host, staging.port, staging.database) == ("10.0.2.25", 5432, "staging_db")
    assert staging.password == "s3cret"
    (listener,) = config.listeners
    assert (listener.name, listener.protocol, listener.primary, listener.max_clients) == (
        "db", "postgres", "prod", 1000)
    assert listener.listen == Address("0.0.0.0", 6432)
    assert listener.options == PgListenerOptions()
    (mirror,) = listener.mirrors
    assert mirror == Mirror(name="staging", upstream="staging", queue=500,
                            queue_bytes=64 * 1024 * 1024, timeout=5.0,
                            options=PgMirrorOptions(exposure=1.0))
    assert config.path is None


def test_defaults_are_applied() -> None:
    config = parse(with_mirror(""))
    assert config.general == General(shutdown_timeout=30.0, startup_timeout=15.0)
    assert config.admin == Admin(listen=Address("127.0.0.1", 9930), log_level="info",
                                 log_format="text")
    staging = config.upstreams["staging"]
    assert (staging.port, staging.pool_size, staging.connect_timeout) == (5432, 100, 5.0)
    assert staging.users == {}
    (listener,) = config.listeners
    assert listener.max_clients == 1000
    (mirror,) = listener.mirrors
    assert (mirror.name, mirror.queue, mirror.queue_bytes, mirror.timeout) == (
        "staging", 500, 64 * 1024 * 1024, 5.0)
    assert mirror.options == PgMirrorOptions(exposure=1.0)


def test_listener_without_mirrors_is_valid() -> None:
    assert parse(BASE).listeners[0].mirrors == ()


def test_admin_listen_false_turns_admin_off() -> None:
    config = parse('[admin]\nlisten = false\nlog_level = "debug"\nlog_format = "json"\n' + BASE)
    assert config.admin == Admin(listen=None, log_level="debug", log_format="json")


def test_load_config_reads_a_file(tmp_path) -> None:
    path = tmp_path / "mirrorgate.toml"
    path.write_text(DESIGN_EXAMPLE)
    config = load_config(path, PROTOCOLS, env={"STAGING_PASSWORD": "x"})
    assert config.path == str(path)
    assert load_config(str(path), PROTOCOLS, env={"STAGING_PASSWORD": "x"}).path == str(path)


def test_load_config_accepts_text() -> None:
    assert load_config(BASE, PROTOCOLS, env={}).listeners[0].name == "db"


def test_missing_file_is_a_config_error(tmp_path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.toml", PROTOCOLS)
    assert "cannot read" in str(info.value)
    assert str(info.value).startswith(str(tmp_path / "nope.toml"))


def test_toml_syntax_error_has_its_line() -> None:
    problem = only_problem(BASE + "oops = \n")
    assert problem.line == 14
    assert problem.message.startswith("TOML syntax")


# --- value formats --------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    (123, 123), ("123", 123), ("64MiB", 64 * 2**20), ("512KiB", 512 * 1024),
    ("1GiB", 2**30), ("100kB", 100_000), ("10MB", 10_000_000), ("2 GB", 2 * 10**9),
    ("1.5KiB", 1536), ("7B", 7), ("64mib", 64 * 2**20),
])
def test_size_forms(text: object, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["12XB", "-1", "MiB", "0.5B", "", "1,5MiB"])
def test_bad_size_strings_are_refused(text: str) -> None:
    problem = only_problem(with_mirror(f'queue_bytes = "{text}"\n'))
    assert problem.path == "listener[0].mirror[0].queue_bytes"
    assert "bad size" in problem.message


@pytest.mark.parametrize("value", ["1.5", "true", "[1]"])
def test_size_of_wrong_type_names_expected_type(value: str) -> None:
    problem = only_problem(with_mirror(f"queue_bytes = {value}\n"))
    assert problem.message.startswith("expected a size")


@pytest.mark.parametrize(("text", "expected"), [
    (5, 5.0), (2.5, 2.5), ("30s", 30.0), ("250ms", 0.25), ("1m", 60.0), ("1h", 3600.0),
    ("1m30s", 90.0), ("1.5s", 1.5),
])
def test_duration_forms(text: object, expected: float) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("value", ['"5"', '"s"', '"-1s"', '"5 sec"', "true", "nan", "inf"])
def test_bad_durations_are_refused(value: str) -> None:
    problem = only_problem(f"[general]\nshutdown_timeout = {value}\n" + BASE)
    assert problem.path == "general.shutdown_timeout"
    assert problem.line == 2
    assert "duration" in problem.message


def test_duration_strings_are_read_in_the_model() -> None:
    config = parse(with_mirror('timeout = "250ms"\n'))
    assert config.listeners[0].mirrors[0].timeout == 0.25


def test_address_forms() -> None:
    config = parse(BASE.replace("127.0.0.1:6432", "[::1]:6432"))
    assert config.listeners[0].listen == Address("::1", 6432)
    assert str(config.listeners[0].listen) == "[::1]:6432"
    assert str(Address("127.0.0.1", 9930)) == "127.0.0.1:9930"


@pytest.mark.parametrize("address", ["127.0.0.1:0", "127.0.0.1:70000", "127.0.0.1", ":6432",
                                     "::1:6432", "[::1]6432", "host:port"])
def test_bad_listen_addresses_are_refused(address: str) -> None:
    problem = only_problem(BASE.replace("127.0.0.1:6432", address))
    assert problem.path == "listener[0].listen"
    assert problem.line == 12


def test_postgresql_scheme_is_normalised_and_ports_default() -> None:
    config = parse(BASE.replace("postgres://10.0.2.25/", "postgresql://app:pw@10.0.2.25/"))
    staging = config.upstreams["staging"]
    assert (staging.scheme, staging.port, staging.user, staging.password) == (
        "postgres", 5432, "app", "pw")


def test_http_upstream_port_defaults_to_80() -> None:
    config = parse(BASE + '[[upstream]]\nname = "web"\nurl = "http://example.com"\n')
    web = config.upstreams["web"]
    assert (web.scheme, web.host, web.port, web.database) == ("http", "example.com", 80, None)


@pytest.mark.parametrize(("url", "needle"), [
    ("mysql://h", "unknown URL scheme 'mysql' (known: http, postgres)"),
    ("postgres://", "no host"),
    ("postgres://h:0", "1-65535"),
    ("postgres://h:99999", "bad URL"),
    ("postgres://h/db?sslmode=require", "query parameters"),
    ("10.0.0.5:5432", "bad URL"),
])
def test_bad_upstream_urls_are_refused(url: str, needle: str) -> None:
    problem = only_problem(BASE.replace("postgres://10.0.2.25/staging_db", url))
    assert problem.path == "upstream[1].url"
    assert needle in problem.message


def test_password_in_url_and_key_is_refused() -> None:
    text = BASE.replace("postgres://10.0.2.25/", "postgres://u:a@10.0.2.25/")
    text = text.replace('staging_db"\n', 'staging_db"\npassword = "b"\n')
    problem = only_problem(text)
    assert problem.path == "upstream[1].password"


# --- ${VAR} ---------------------------------------------------------------------


def test_vars_are_expanded_from_env() -> None:
    text = BASE.replace('staging_db"\n', 'staging_db"\npassword = "${PW}"\n'
                        'users = { app = "x${APP}y", lit = "$${NOT_A_VAR}" }\n')
    staging = parse(text, env={"PW": "one", "APP": "two"}).upstreams["staging"]
    assert staging.password == "one"
    assert staging.users == {"app": "xtwoy", "lit": "${NOT_A_VAR}"}


def test_vars_default_to_os_environ(monkeypatch) -> None:
    monkeypatch.setenv("MIRRORGATE_TEST_HOST", "10.9.9.9")
    text = BASE.replace("10.0.2.25", "${MIRRORGATE_TEST_HOST}")
    config = parse_config(text, PROTOCOLS)
    assert config.upstreams["staging"].host == "10.9.9.9"


def test_missing_var_is_named() -> None:
    text = BASE.replace('staging_db"\n', 'staging_db"\nusers = { app = "${APP_PW}" }\n')
    problem = only_problem(text)
    assert problem.path == "upstream[1].users.app"
    assert problem.line == 8
    assert "APP_PW" in problem.message


def test_unterminated_var_is_refused() -> None:
    problem = only_problem(BASE.replace("10.0.2.25", "${HOST"))
    assert "unterminated" in problem.message


# --- keys and types -------------------------------------------------------------


def test_unknown_top_level_key() -> None:
    problem = only_problem("[generl]\nshutdown_timeout = 1\n" + BASE)
    assert (problem.path, problem.line) == ("generl", 1)
    assert "did you mean 'general'" in problem.message


def test_unknown_key_in_listener() -> None:
    problem = only_problem(BASE + "max_client = 5\n")
    assert (problem.path, problem.line) == ("listener[0].max_client", 14)
    assert "did you mean 'max_clients'" in problem.message


def test_unknown_key_in_mirror() -> None:
    problem = only_problem(with_mirror("exposur = 0.5\n"))
    assert (problem.path, problem.line) == ("listener[0].mirror[0].exposur", 17)
    assert "did you mean 'exposure'" in problem.message


def test_unknown_key_in_general_and_upstream() -> None:
    text = "[general]\nfoo = 1\n" + BASE.replace('staging_db"\n', 'staging_db"\nbar = 2\n')
    assert [(p.path, p.line) for p in problems(text)] == [("general.foo", 2),
                                                           ("upstream[1].bar", 10)]


def test_missing_required_keys_point_at_their_table() -> None:
    text = BASE.replace('url = "postgres://10.0.2.25/staging_db"\n', "")
    text = text.replace('listen = "127.0.0.1:6432"\n', "")
    found = [(p.path, p.line, p.message) for p in problems(text)]
    assert found == [("upstream[1].url", 5, "missing required key"),
                     ("listener[0].listen", 8, "missing required key")]


def test_missing_upstream_and_listener_tables() -> None:
    found = problems("[general]\n")
    assert [(p.path, p.line) for p in found] == [("listener", None), ("upstream", None)]


def test_mirror_without_upstream() -> None:
    problem = only_problem(BASE + "\n[[listener.mirror]]\nqueue = 5\n")
    assert (problem.path, problem.line) == ("listener[0].mirror[0].upstream", 15)


@pytest.mark.parametrize(("line", "path", "expected"), [
    ('max_clients = "5"', "listener[0].max_clients", "expected an integer, got a string ('5')"),
    ("max_clients = 5.0", "listener[0].max_clients", "expected an integer, got a float (5.0)"),
    ("max_clients = true", "listener[0].max_clients", "expected an integer, got a boolean (True)"),
    ("primary = 3", "listener[0].primary", "expected a string, got an integer (3)"),
    ("mirror = 3", "listener[0].mirror", "expected an array, got an integer (3)"),
])
def test_wrong_types_name_the_expected_type(line: str, path: str, expected: str) -> None:
    key = line.split(" ")[0]
    text = "\n".join(x for x in BASE.splitlines() if not x.startswith(key + " ")) + "\n"
    problem = only_problem(text + line + "\n")
    assert (problem.path, problem.message) == (path, expected)


def test_upstream_given_as_a_table_instead_of_an_array() -> None:
    text = BASE.replace("[[upstream]]", "[upstream]", 1).split("[[upstream]]")[0]
    found = problems(text + '[[listener]]\nname = "x"\nprotocol = "postgres"\n'
                            'listen = "127.0.0.1:1"\nprimary = "prod"\n')
    assert any(p.path == "upstream" and "array of tables" in p.message for p in found)


def test_users_must_be_a_table_of_strings() -> None:
    text = BASE.replace('staging_db"\n', 'staging_db"\nusers = { app = 1 }\n')
    problem = only_problem(text)
    assert problem.path == "upstream[1].users.app"
    assert problem.message == "expected a string, got an integer (1)"


# --- validation rules -----------------------------------------------------------


def test_upstream_names_are_unique() -> None:
    problem = only_problem(BASE + '[[upstream]]\nname = "prod"\nurl = "postgres://h"\n')
    assert (problem.path, problem.line) == ("upstream[2].name", 15)
    assert "duplicate upstream name 'prod' (line 2)" in problem.message


def test_listener_names_are_unique() -> None:
    text = BASE + '\n[[listener]]\nname = "db"\nprotocol = "postgres"\n' \
        'listen = "127.0.0.1:6433"\nprimary = "prod"\n'
    problem = only_problem(text)
    assert (problem.path, problem.line) == ("listener[1].name", 16)
    assert "duplicate listener name 'db' (line 10)" in problem.message


@pytest.mark.parametrize("address", ["127.0.0.1:6432", "localhost:6432", "0.0.0.0:6432"])
def test_listen_addresses_are_unique_across_listeners(address: str) -> None:
    text = BASE + f'\n[[listener]]\nname = "db2"\nprotocol = "postgres"\n' \
        f'listen = "{address}"\nprimary = "prod"\n'
    problem = only_problem(text)
    assert problem.path == "listener[1].listen"
    assert "listener 'db' (line 12)" in problem.message


def test_listen_address_must_not_be_the_admins() -> None:
    problem = only_problem(BASE.replace("127.0.0.1:6432", "127.0.0.1:9930"))
    assert problem.path == "listener[0].listen"
    assert "the admin listener" in problem.message


def test_same_port_on_other_hosts_is_fine() -> None:
    text = BASE + '\n[[listener]]\nname = "db2"\nprotocol = "postgres"\n' \
        'listen = "10.1.1.1:6432"\nprimary = "prod"\n'
    assert len(parse(text).listeners) == 2


def test_mirror_names_are_unique_within_a_listener() -> None:
    text = with_mirror("") + '\n[[listener.mirror]]\nupstream = "staging"\n'
    problem = only_problem(text)
    assert (problem.path, problem.line) == ("listener[0].mirror[1].name", 18)
    assert "duplicate mirror name 'staging'" in problem.message
    renamed = text + 'name = "staging-2"\n'
    names = [m.name for m in parse(renamed).listeners[0].mirrors]
    assert names == ["staging", "staging-2"]


def test_primary_must_name_an_upstream() -> None:
    problem = only_problem(BASE.replace('primary = "prod"', 'primary = "prd"'))
    assert (problem.path, problem.line) == ("listener[0].primary", 13)
    assert "no [[upstream]] is named 'prd' (known: prod, staging)" == problem.message


def test_mirror_upstream_must_name_an_upstream() -> None:
    problem = only_problem(BASE + '\n[[listener.mirror]]\nupstream = "stagin"\n')
    assert (problem.path, problem.line) == ("listener[0].mirror[0].upstream", 16)


def test_upstream_scheme_must_suit_the_protocol() -> None:
    text = BASE + '[[upstream]]\nname = "web"\nurl = "http://h"\n'
    text = text.replace('primary = "prod"', 'primary = "web"')
    problem = only_problem(text)
    assert problem.path == "listener[0].primary"
    assert "is a http URL; protocol 'postgres' accepts postgres" in problem.message


def test_unknown_protocol_lists_known_ones() -> None:
    problem = only_problem(BASE.replace('protocol = "postgres"', 'protocol = "mysql"'))
    assert (problem.path, problem.line) == ("listener[0].protocol", 11)
    assert problem.message == "unknown protocol 'mysql' (known: http, postgres)"


@pytest.mark.parametrize(("extra", "path"), [
    ('password = "x"\n', "upstream[0].password"),
    ('users = { app = "x" }\n', "upstream[0].users"),
])
def test_primary_must_not_carry_credentials(extra: str, path: str) -> None:
    text = BASE.replace('postgres://10.0.0.1:5432"\n', 'postgres://10.0.0.1:5432"\n' + extra)
    problem = only_problem(text)
    assert problem.path == path
    assert "credentials are relayed" in problem.message


def test_primary_must_not_have_a_user_in_its_url() -> None:
    problem = only_problem(BASE.replace("postgres://10.0.0.1", "postgres://admin@10.0.0.1"))
    assert problem.path == "upstream[0].url"
    assert "primary of listener 'db'" in problem.message
    assert "credentials are relayed" in problem.message


@pytest.mark.parametrize("url", ["postgres://10.0.0.1:5432", "postgresql://10.0.0.1",
                                 "postgres://u:p@10.0.0.1/"])
def test_mirror_that_is_its_own_primary_is_refused(url: str) -> None:
    text = with_mirror("").replace('upstream = "staging"', 'upstream = "self"')
    text += f'\n[[upstream]]\nname = "self"\nurl = "{url}"\n'
    problem = only_problem(text)
    assert problem.path == "listener[0].mirror[0].upstream"
    assert "is the primary 'prod' itself" in problem.message


def test_loopback_names_are_one_host() -> None:
    text = BASE.replace("10.0.0.1:5432", "localhost:5432")
    text = text.replace("10.0.2.25/staging_db", "[::1]:5432")
    text += '\n[[listener.mirror]]\nupstream = "staging"\n'
    assert "is the primary 'prod' itself" in only_problem(text).message


def test_mirror_on_same_server_with_other_database_is_fine() -> None:
    text = with_mirror("").replace("10.0.2.25/staging_db", "10.0.0.1/other")
    assert parse(text).listeners[0].mirrors[0].upstream == "staging"


def test_mirror_of_its_own_primary_upstream_is_refused() -> None:
    text = BASE + '\n[[listener.mirror]]\nupstream = "prod"\n'
    assert "itself" in only_problem(text).message


@pytest.mark.parametrize(("key", "value", "path", "needle"), [
    ("queue", "0", "listener[0].mirror[0].queue", "at least 1"),
    ("queue_bytes", "0", "listener[0].mirror[0].queue_bytes", "at least 1"),
    ("timeout", "0", "listener[0].mirror[0].timeout", "greater than 0"),
    ("timeout", '"0s"', "listener[0].mirror[0].timeout", "greater than 0"),
    ("exposure", "1.5", "listener[0].mirror[0].exposure", "exposure must be between 0.0 and 1.0"),
])
def test_mirror_ranges(key: str, value: str, path: str, needle: str) -> None:
    problem = only_problem(with_mirror(f"{key} = {value}\n"))
    assert problem.path == path
    assert needle in problem.message


@pytest.mark.parametrize(("text", "path"), [
    ("[general]\nstartup_timeout = -1\n" + BASE, "general.startup_timeout"),
    ('[admin]\nlog_level = "loud"\n' + BASE, "admin.log_level"),
    ('[admin]\nlog_format = "xml"\n' + BASE, "admin.log_format"),
    ('[admin]\nlisten = "127.0.0.1:0"\n' + BASE, "admin.listen"),
    ("[admin]\nlisten = true\n" + BASE, "admin.listen"),
    (BASE + "max_clients = 0\n", "listener[0].max_clients"),
    (BASE.replace('staging_db"\n', 'staging_db"\npool_size = 0\n'), "upstream[1].pool_size"),
    (BASE.replace('staging_db"\n', 'staging_db"\nconnect_timeout = 0\n'),
     "upstream[1].connect_timeout"),
    (BASE.replace('name = "db"', 'name = ""'), "listener[0].name"),
])
def test_ranges_and_choices(text: str, path: str) -> None:
    assert only_problem(text).path == path


# --- many problems at once ------------------------------------------------------


def test_every_problem_is_reported_at_once_by_line() -> None:
    text = textwrap.dedent("""\
        [general]
        shutdown_timeout = "soon"
        colour = "blue"

        [[upstream]]
        name = "prod"
        url = "postgres://10.0.0.1"

        [[listener]]
        name = "db"
        protocol = "postgres"
        listen = "127.0.0.1:6432"
        primary = "prod"

        [[listener.mirror]]
        upstream = "nowhere"
        queue = 0

        [[listener.mirror]]
        upstream = "prod"
        name = "again"
        queue_bytes = "lots"
        exposure = 2.0
        timeout = "5s"
        flavour = 1
        """)
    with pytest.raises(ConfigError) as info:
        parse_config(text, PROTOCOLS, path="gw.toml", env={})
    found = [(p.line, p.path) for p in info.value.problems]
    assert found == [
        (2, "general.shutdown_timeout"),
        (3, "general.colour"),
        (16, "listener[0].mirror[0].upstream"),
        (17, "listener[0].mirror[0].queue"),
        (20, "listener[0].mirror[1].upstream"),
        (22, "listener[0].mirror[1].queue_bytes"),
        (23, "listener[0].mirror[1].exposure"),
        (25, "listener[0].mirror[1].flavour"),
    ]
    lines = str(info.value).splitlines()
    assert len(lines) == 8
    assert lines[0].startswith("gw.toml:2: general.shutdown_timeout: bad duration 'soon'")
    assert lines[-1].startswith("gw.toml:25: listener[0].mirror[1].flavour: unknown key")


def test_problems_in_two_listeners_keep_their_indices() -> None:
    text = BASE + "max_clients = 0\n" + '\n[[listener.mirror]]\nupstream = "staging"\nqueue = 0\n'
    text += '\n[[listener]]\nname = "db2"\nprotocol = "postgres"\nlisten = "127.0.0.1:7000"\n'
    text += 'primary = "prod"\n\n[[listener.mirror]]\nupstream = "staging"\nqueue = -1\n'
    found = [(p.line, p.path) for p in problems(text)]
    assert found == [(14, "listener[0].max_clients"), (18, "listener[0].mirror[0].queue"),
                     (28, "listener[1].mirror[0].queue")]


# --- protocol options -----------------------------------------------------------

HTTP = """\
[[upstream]]
name = "mimir"
url = "http://10.0.0.1:8080"

[[upstream]]
name = "mimir-new"
url = "http://10.0.0.2:8080"

[[listener]]
name = "web"
protocol = "http"
listen = "127.0.0.1:8000"
primary = "mimir"
max_body = "8MiB"

[[listener.route]]
prefix = "/api/v1/push"

[[listener.route.mirror]]
upstream = "mimir-new"
percent = 50.0
timeout = "2s"

[[listener.route]]
prefix = "/prometheus"
primary = "mimir-new"
"""


def test_nested_route_mirrors_get_the_protocols_mirror_options() -> None:
    (listener,) = parse(HTTP).listeners
    options = listener.options
    assert isinstance(options, HttpListenerOptions)
    assert options.max_body == 8 * 2**20
    assert options.idle_timeout == 60.0
    push, prometheus = options.route
    assert push.mirror == (Mirror(name="mimir-new", upstream="mimir-new", timeout=2.0,
                                  options=HttpMirrorOptions(percent=50.0)),)
    assert prometheus.primary == "mimir-new"


def test_nested_mirrors_are_checked_like_listener_mirrors() -> None:
    text = HTTP.replace("percent = 50.0", "percent = 50.0\nexposure = 1.0\nqueue = 0")
    text += '\n[[listener.route.mirror]]\nupstream = "mimir-new"\n'
    text += '\n[[listener.route.mirror]]\nupstream = "nowhere"\n'
    found = [(p.line, p.path, p.message.split(" ")[0]) for p in problems(text)]
    assert found == [
        (22, "listener[0].route[0].mirror[0].exposure", "unknown"),
        (23, "listener[0].route[0].mirror[0].queue", "must"),
        (30, "listener[0].route[1].mirror[0].name", "duplicate"),  # as route[0]'s mirror
        (31, "listener[0].route[1].mirror[0].upstream", "upstream"),  # mimir-new is its primary
        (34, "listener[0].route[1].mirror[1].upstream", "no"),
    ]


def test_nested_mirror_names_are_unique_across_the_listener() -> None:
    text = HTTP + '\n[[listener.mirror]]\nupstream = "mimir-new"\n'
    problem = only_problem(text)
    assert problem.path == "listener[0].mirror[0].name"
    assert "duplicate mirror name 'mimir-new' in this listener (line 19)" in problem.message


def test_nested_primary_is_checked() -> None:
    problem = only_problem(HTTP.replace('primary = "mimir-new"', 'primary = "gone"'))
    assert problem.path == "listener[0].route[1].primary"


def test_unknown_key_in_a_route() -> None:
    problem = only_problem(HTTP.replace('prefix = "/prometheus"', 'prefx = "/prometheus"'))
    assert (problem.path, problem.line) == ("listener[0].route[1].prefx", 25)


def test_protocol_listener_keys_are_typed() -> None:
    problem = only_problem(HTTP.replace('"8MiB"', '"8 potatoes"'))
    assert (problem.path, problem.line) == ("listener[0].max_body", 14)


# --- attrs validators and converters of options ------------------------------------


def _ratio(_inst: object, attribute: "attrs.Attribute[float]", value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{attribute.name} must be between 0.0 and 1.0, not {value}")


def _level(value: str) -> str:
    if value not in ("low", "high"):
        raise ValueError(f"level must be low or high, not {value!r}")
    return value


@attrs.frozen
class CheckedMirrorOptions:
    ratio: float = attrs.field(default=1.0, converter=float, validator=_ratio)
    level: str = attrs.field(default="low", converter=_level)
    weight: int = attrs.field(default=1, validator=attrs.validators.ge(0))


class FakeChecked:
    id = "checked"
    url_schemes = ("postgres",)
    ListenerOptions = PgListenerOptions
    MirrorOptions = CheckedMirrorOptions


CHECKED = BASE.replace('"postgres"\n', '"checked"\n') + """
[[listener.mirror]]
upstream = "staging"
name = "one"
ratio = 0.5
level = "high"

[[listener.mirror]]
upstream = "staging"
name = "two"
"""


def checked_problems(text: str) -> list[tuple[int | None, str, str]]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, {"checked": FakeChecked})
    return [(p.line, p.path, p.message) for p in info.value.problems]


def test_valid_checked_options_are_converted() -> None:
    (listener,) = parse_config(CHECKED, {"checked": FakeChecked}).listeners
    assert [m.options for m in listener.mirrors] == [
        CheckedMirrorOptions(ratio=0.5, level="high"), CheckedMirrorOptions()]


def test_validator_error_is_reported_at_its_key() -> None:
    assert checked_problems(CHECKED.replace("ratio = 0.5", "ratio = 1.5")) == [
        (18, "listener[0].mirror[0].ratio", "ratio must be between 0.0 and 1.0, not 1.5")]


def test_converter_error_is_reported_at_its_key() -> None:
    assert checked_problems(CHECKED.replace('"high"', '"max"')) == [
        (19, "listener[0].mirror[0].level", "level must be low or high, not 'max'")]


def test_validator_errors_in_two_mirrors_are_all_reported() -> None:
    text = CHECKED.replace("ratio = 0.5", "ratio = -1\nweight = -2")
    text += "ratio = 2.0\nqueue = 0\n"
    found = [(line, path) for line, path, _ in checked_problems(text)]
    assert found == [(18, "listener[0].mirror[0].ratio"), (19, "listener[0].mirror[0].weight"),
                     (25, "listener[0].mirror[1].ratio"), (26, "listener[0].mirror[1].queue")]


def test_postgres_plugin_exposure_is_reported_at_its_key() -> None:
    from gateway.plugins import load_plugins

    _, registry = load_plugins()
    text = BASE + '\n[[listener.mirror]]\nupstream = "staging"\nexposure = 1.5\n'
    with pytest.raises(ConfigError) as info:
        parse_config(text, dict(registry.items()), env={})
    (problem,) = info.value.problems
    assert (problem.line, problem.path) == (17, "listener[0].mirror[0].exposure")
    assert problem.message == "exposure must be between 0.0 and 1.0, not 1.5"


# --- the model ------------------------------------------------------------------


def test_upstream_repr_hides_passwords() -> None:
    text = BASE.replace("postgres://10.0.2.25/", "postgres://app:hunter2@10.0.2.25/")
    text = text.replace('staging_db"\n', 'staging_db"\nusers = { rep = "swordfish" }\n')
    staging = parse(text).upstreams["staging"]
    assert staging.password == "hunter2"
    shown = repr(staging) + repr(parse(text))
    assert "hunter2" not in shown
    assert "swordfish" not in shown
    assert "postgres://app:***@10.0.2.25/staging_db" in shown


def test_model_is_frozen() -> None:
    upstream = Upstream(name="a", url="postgres://h", scheme="postgres", host="h", port=5432,
                        database=None, user=None)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        upstream.port = 1  # type: ignore[misc]


def test_key_lines_counts_array_tables_within_their_parent() -> None:
    text = textwrap.dedent("""\
        [[listener]]
        name = "a"
        [[listener.mirror]]
        x = 1
        [[listener]]
        [[listener.mirror]]
        [[listener.mirror]]
        y = { z = 1 }
        arr = [
          1,
          { k = 2 },
        ]
        s = \"\"\"
        [fake]
        \"\"\"
        [listener.tls]
        """)
    lines = key_lines(text)
    assert lines["listener[0].mirror[0].x"] == 4
    assert lines["listener[1].mirror[1]"] == 7
    assert lines["listener[1].mirror[1].y.z"] == 8
    assert lines["listener[1].mirror[1].arr[1].k"] == 11
    assert "fake" not in lines
    assert lines["listener[1].tls"] == 16
    assert line_of(lines, "listener[1].mirror[0].missing") == 6
    assert line_of(lines, "nothing.here") is None


def test_every_core_key_is_documented() -> None:
    from pathlib import Path

    from gateway.config import _ListenerTable, _MirrorTable, _UpstreamTable

    doc = (Path(__file__).parents[2] / "docs" / "configuration.md").read_text()
    for cl in (General, Admin, _UpstreamTable, _ListenerTable, _MirrorTable):
        for field in attrs.fields(cl):
            assert f"| `{field.name}` |" in doc, (cl.__name__, field.name)
    assert "| `exposure` |" in doc
