# The plugin hooks: documented, tested, and called the way their docstrings say.
#
# Owns: the meta-tests (every `gateway_*` hookspec is quoted whole in
# docs/plugins.md and has a `test_hook_<name>...` test somewhere under tests/;
# the worked example in the doc is the installable one in examples/), and
# those tests: the registry hook through real entry points and extra plugins,
# the configured hook through the CLI, and misspelt hooks refused.
from __future__ import annotations

import ast
import importlib.metadata
import inspect
import re
from pathlib import Path

import pytest

import gateway
import gateway_postgres
from gateway import (
    PluginError,
    ProtocolHandler,
    ProtocolRegistry,
    cli,
    hookimpl,
    hookspecs,
    logs,
    plugins,
    server,
)
from gateway_postgres import PostgresProtocol

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "plugins.md"
EXAMPLE = ROOT / "examples" / "lines-plugin"

HOOKS = sorted(name for name in vars(hookspecs) if name.startswith("gateway_"))


def _doc() -> str:
    return DOC.read_text(encoding="utf-8")


def _test_names() -> set[str]:
    names = set()
    for path in (ROOT / "tests").rglob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                names.add(node.name)
    return names


# -- meta-tests ---------------------------------------------------------------


def test_hookspecs_exist_and_are_all_marked() -> None:
    assert HOOKS, "no gateway_* hookspec found"
    for name in HOOKS:
        assert hasattr(getattr(hookspecs, name), "mirrorgate_spec"), f"{name} is not a @hookspec"


@pytest.mark.parametrize("name", HOOKS)
def test_hook_is_documented_with_its_exact_signature_and_docstring(name: str) -> None:
    source = inspect.getsource(getattr(hookspecs, name))
    assert source in _doc(), (
        f"docs/plugins.md must quote {name} exactly as gateway/hookspecs.py has it:\n{source}")


@pytest.mark.parametrize("name", HOOKS)
def test_hook_has_a_test(name: str) -> None:
    tests = [t for t in _test_names() if t.startswith(f"test_hook_{name}")]
    assert tests, f"no test named test_hook_{name}... under tests/"


def test_doc_defines_no_hook_that_does_not_exist() -> None:
    defined = set(re.findall(r"\bdef (gateway_\w+)\(", _doc()))
    assert defined and defined <= set(HOOKS), defined - set(HOOKS)


@pytest.mark.parametrize("path", ["pyproject.toml", "mirrorgate_lines/__init__.py"])
def test_doc_quotes_the_example_plugin_whole(path: str) -> None:
    text = (EXAMPLE / path).read_text(encoding="utf-8")
    assert text in _doc(), f"docs/plugins.md is out of step with examples/lines-plugin/{path}"


# -- gateway_register_protocols -----------------------------------------------


class _Echo(ProtocolHandler):
    id = "echo"
    url_schemes = ("echo",)

    def client_protocol(self):  # type: ignore[no-untyped-def]
        raise NotImplementedError


class _EchoPlugin:
    @hookimpl
    def gateway_register_protocols(self, registry: ProtocolRegistry) -> None:
        registry.add(_Echo)


def test_hook_gateway_register_protocols_registers_the_builtin_postgres_by_entry_point() -> None:
    points = importlib.metadata.entry_points(group=plugins.ENTRY_POINT_GROUP)
    assert {(p.name, p.value) for p in points} >= {("postgres", "gateway_postgres")}
    pm, registry = plugins.load_plugins()
    assert pm.get_plugin("postgres") is gateway_postgres  # pluggy names it by the entry point
    assert "postgres" in registry
    assert registry["postgres"] is PostgresProtocol
    assert set(registry["postgres"].url_schemes) == {"postgres", "postgresql"}


def test_hook_gateway_register_protocols_adds_a_plugin_protocol() -> None:
    _, registry = plugins.load_plugins(extra=[_EchoPlugin()])
    assert registry["echo"] is _Echo
    assert {"echo", "postgres"} <= set(registry)


def test_hook_gateway_register_protocols_is_historic() -> None:
    pm, registry = plugins.load_plugins()
    assert "echo" not in registry
    pm.register(_EchoPlugin())  # a plugin registered late is still called, with the same registry
    assert registry["echo"] is _Echo


@pytest.mark.parametrize("bad, message", [
    (object, "is not a gateway.ProtocolHandler subclass"),
    (type("NoId", (_Echo,), {"id": ""}), "has no static string `id`"),
    (type("NoSchemes", (_Echo,), {"url_schemes": ()}), "declares no `url_schemes`"),
    (type("Twin", (_Echo,), {"__module__": "twin"}), "protocol id 'echo' registered twice"),
])
def test_hook_gateway_register_protocols_refuses_a_bad_registration(bad: type, message: str
                                                                     ) -> None:
    class Plugin:
        @hookimpl
        def gateway_register_protocols(self, registry: ProtocolRegistry) -> None:
            registry.add(bad)

    with pytest.raises(PluginError, match=message.replace("(", r"\(")):
        plugins.load_plugins(extra=[_EchoPlugin(), Plugin()])


def test_misspelt_hook_raises_plugin_error() -> None:
    class Misspelt:
        @hookimpl
        def gateway_register_protocol(self, registry: ProtocolRegistry) -> None:
            raise AssertionError("never called")

    with pytest.raises(PluginError, match="gateway_register_protocol"):
        plugins.load_plugins(extra=[Misspelt()])


def test_public_api_is_what_plugins_import() -> None:
    for name in ("ProtocolHandler", "ListenerContext", "MirrorSet", "Unit", "Replayer",
                 "ProtocolRegistry", "hookimpl", "PluginError"):
        assert name in gateway.__all__


def test_docs_list_the_public_api_exactly() -> None:
    doc = (Path(__file__).parents[2] / "docs" / "plugins.md").read_text()
    block = doc.split("### Only the public API", 1)[1].split("```", 2)[1]
    assert sorted(block.split()) == sorted(gateway.__all__)


# -- gateway_configured -------------------------------------------------------

_CONFIG = """\
[admin]
listen = false

[[upstream]]
name = "prod"
url = "postgres://127.0.0.1:5432"

[[upstream]]
name = "staging"
url = "postgres://127.0.0.1:5432/staging"

[[listener]]
name = "db"
protocol = "postgres"
listen = "127.0.0.1:6432"
primary = "prod"

[[listener.mirror]]
upstream = "staging"
exposure = 0.5
"""


def test_hook_gateway_configured_is_called_with_the_config_before_serving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, object]] = []

    class Recorder:
        @hookimpl
        def gateway_configured(self, config: object) -> None:
            calls.append(("configured", config))

    async def serve(config: object, registry: object, on_config: object = None) -> None:
        calls.append(("serve", config))

    load = plugins.load_plugins
    monkeypatch.setattr(plugins, "load_plugins", lambda extra=(): load([*extra, Recorder()]))
    monkeypatch.setattr(server, "run", serve)
    monkeypatch.setattr(server, "install_event_loop_policy", lambda: "asyncio")
    monkeypatch.setattr(logs, "configure", lambda level, fmt, secrets=(): None)
    path = tmp_path / "mirrorgate.toml"
    path.write_text(_CONFIG)

    assert cli.main(["run", "--config", str(path)]) == 0

    assert [what for what, _ in calls] == ["configured", "serve"]
    config = calls[0][1]
    assert config is calls[1][1]
    assert config.path == str(path)  # type: ignore[attr-defined]
    mirror = config.listeners[0].mirrors[0]  # type: ignore[attr-defined]
    assert mirror.options.exposure == 0.5  # a plugin reads its own options here


def test_hook_gateway_configured_is_not_called_for_a_bad_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[object] = []

    class Recorder:
        @hookimpl
        def gateway_configured(self, config: object) -> None:
            calls.append(config)

    load = plugins.load_plugins
    monkeypatch.setattr(plugins, "load_plugins", lambda extra=(): load([*extra, Recorder()]))
    path = tmp_path / "mirrorgate.toml"
    path.write_text(_CONFIG.replace('protocol = "postgres"', 'protocol = "postgress"'))

    assert cli.main(["run", "--config", str(path)]) == 1
    assert calls == []
    assert "unknown protocol 'postgress' (known: " in capsys.readouterr().err
