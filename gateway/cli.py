# The `mirrorgate` command: run, check, reload, version.
#
# Owns: argument parsing, logging set-up (libraries never configure logging; the
# CLI does), and exit codes.
# Must not know: protocols; they come from the plugin registry.
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterable, Sequence

from . import __version__

DEFAULT_CONFIG = "./mirrorgate.toml"


def _load(path: str):  # type: ignore[no-untyped-def]
    from .config import ConfigError, load_config
    from .plugins import load_plugins

    pm, registry = load_plugins()
    protocols = dict(registry.items())
    try:
        config = load_config(path, protocols)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return None, None, None
    except OSError as exc:
        print(f"{path}: cannot read config: {exc.strerror or exc}", file=sys.stderr)
        return None, None, None
    return pm, registry, config


def _cmd_check(args: argparse.Namespace) -> int:
    _, _, config = _load(args.config)
    if config is None:
        return 1
    print(f"{args.config}: ok ({_count(len(config.listeners), 'listener')}, "
          f"{_count(len(config.upstreams), 'upstream')})")
    return 0


def _setup_logging(level: str, fmt: str, secrets: Iterable[str]) -> None:
    from .logs import configure

    configure(level, fmt, secrets)


def _cmd_run(args: argparse.Namespace) -> int:
    import anyio

    from .config import Config
    from .secrets import secret_values
    from .server import install_event_loop_policy, run

    pm, registry, config = _load(args.config)
    if config is None:
        return 1
    _setup_logging(args.log_level or config.admin.log_level, config.admin.log_format,
                   secret_values(config))
    loop_name = install_event_loop_policy()
    logging.getLogger("mirrorgate").info("mirrorgate %s on %s, config %s",
                                         __version__, loop_name, args.config)
    pm.hook.gateway_configured(config=config)

    def reconfigured(new: Config) -> None:
        # A reload: log level, format and the secrets to scrub follow the file
        # (a --log-level given on the command line still wins).
        _setup_logging(args.log_level or new.admin.log_level, new.admin.log_format,
                       secret_values(new))

    try:
        anyio.run(run, config, registry, reconfigured)
    except KeyboardInterrupt:
        pass
    except BaseExceptionGroup as group:
        # The task group wraps a bind error (port in use, address not local).
        oserrors, rest = group.split(OSError)
        if rest is not None or oserrors is None:
            raise
        for exc in _leaves(oserrors):
            logging.getLogger("mirrorgate").error("cannot serve: %s", exc)
        return 1
    except OSError as exc:
        logging.getLogger("mirrorgate").error("cannot serve: %s", exc)
        return 1
    return 0


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


def _cmd_reload(args: argparse.Namespace) -> int:
    """Ask the gateway serving ``--config`` to read it again, through its admin
    listener. The file is checked here first: a broken one is never sent for."""
    import httpx

    from .config_values import Address

    _, _, config = _load(args.config)
    if config is None:
        print("reload not asked: fix the config first", file=sys.stderr)
        return 1
    listen = config.admin.listen
    if listen is None:
        print(f"{args.config}: [admin] listen is off, so there is no admin listener to ask; "
              "send SIGHUP to the mirrorgate process instead", file=sys.stderr)
        return 1
    host = listen.host if listen.host not in ("", "0.0.0.0", "::") else "127.0.0.1"
    url = f"http://{Address(host, listen.port)}/reload"
    try:
        response = httpx.post(url, timeout=args.timeout)
    except httpx.HTTPError as exc:
        print(f"cannot reach the gateway's admin listener at {url}: {exc}", file=sys.stderr)
        return 1
    try:
        answer = response.json()
    except ValueError:
        print(f"{url} answered {response.status_code}: {response.text.strip()}",
              file=sys.stderr)
        return 1
    for line in answer.get("changes", []):
        print(f"  {line}")
    print(answer.get("message", ""), file=sys.stdout if answer.get("ok") else sys.stderr)
    return 0 if answer.get("ok") else 1


def _cmd_version(args: argparse.Namespace) -> int:
    print(f"mirrorgate {__version__}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mirrorgate",
        description="Serve clients from the primary; replay their traffic on mirrors.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="serve every listener in the config")
    p_run.add_argument("--config", default=DEFAULT_CONFIG, help="config file (TOML)")
    p_run.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                       help="overrides [admin] log_level")
    p_run.set_defaults(func=_cmd_run)
    p_check = sub.add_parser("check", help="validate a config file and report every error")
    p_check.add_argument("--config", default=DEFAULT_CONFIG, help="config file (TOML)")
    p_check.set_defaults(func=_cmd_check)
    p_reload = sub.add_parser(
        "reload", help="make the running gateway read its config again (via the admin listener)")
    p_reload.add_argument("--config", default=DEFAULT_CONFIG,
                          help="config file (TOML): checked, and its [admin] listen is asked")
    p_reload.add_argument("--timeout", type=float, default=10.0, help="seconds to wait")
    p_reload.set_defaults(func=_cmd_reload)
    p_ver = sub.add_parser("version", help="print the version")
    p_ver.set_defaults(func=_cmd_version)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
