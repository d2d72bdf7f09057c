# The `mirrorgate` command: run, check, version.
#
# Owns: argument parsing, logging set-up (libraries never configure logging; the
# CLI does), and exit codes.
# Must not know: protocols; they come from the plugin registry.
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

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


def _setup_logging(level: str, fmt: str) -> None:
    from .logs import configure

    configure(level, fmt)


def _cmd_run(args: argparse.Namespace) -> int:
    import anyio

    from .server import install_event_loop_policy, run

    pm, registry, config = _load(args.config)
    if config is None:
        return 1
    _setup_logging(args.log_level or config.admin.log_level, config.admin.log_format)
    loop_name = install_event_loop_policy()
    logging.getLogger("mirrorgate").info("mirrorgate %s on %s, config %s",
                                         __version__, loop_name, args.config)
    pm.hook.gateway_configured(config=config)
    try:
        anyio.run(run, config, registry)
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
    p_ver = sub.add_parser("version", help="print the version")
    p_ver.set_defaults(func=_cmd_version)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
