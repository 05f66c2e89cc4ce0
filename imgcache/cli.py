"""The ``imgcache`` command: ``serve`` runs the cache, ``demo`` shows it at work, and the
management commands (list, prefetch, pin, ...) talk to a running server."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from imgcache.config import OPTIONS, load_settings
from imgcache.ctl import COMMANDS, add_command, add_commands, run_command
from imgcache.errors import ConfigError, ImgcacheError
from imgcache.logs import flush_logs, setup_logging


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imgcache", description="Caching sidecar for the OpenStack Glance image API.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve", help="run the cache in front of Glance",
        description="Options may also come from the INI file (--config or IMGCACHE_CONFIG) "
                    "and IMGCACHE_* variables; flags win over the environment, which wins "
                    "over the file.")
    serve.add_argument("--config", type=Path, help="INI config file (see config/imgcache.conf)")
    for option in OPTIONS:
        serve.add_argument(f"--{option.flag}", dest=option.name, metavar=option.key.upper(),
                           help=f"{option.help} [{option.ini_name}, {option.env}; "
                                f"default {option.default}]")
    add_commands(commands)
    from imgcache.sizing_cli import add_arguments as add_sizing_arguments

    add_sizing_arguments(add_command(commands, "sizing", "predict the hit ratio of other "
                                                         "cache sizes from the access history"))
    demo = commands.add_parser(
        "demo", help="boot-storm demo against a throwaway Glance stand-in")
    demo.add_argument("--clients", type=int, default=16, help="concurrent clients (16)")
    demo.add_argument("--image-size", default="64M", help="size of the demo image (64M)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    args = _parser().parse_args(argv)
    if args.command == "sizing":
        from imgcache.sizing_cli import run as run_sizing

        return run_sizing(args)
    if args.command in COMMANDS:
        return run_command(args)
    if args.command == "demo":
        from imgcache.demo import run_demo

        return run_demo(clients=args.clients, image_size=args.image_size)
    flags = {option.name: getattr(args, option.name) for option in OPTIONS}
    try:
        settings = load_settings(flags, args.config)
    except ConfigError as exc:
        print(f"imgcache: configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level, settings.log_format)
    from imgcache.app import run

    try:
        run(settings, lambda: load_settings(flags, args.config))
    except ConfigError as exc:  # found at start-up: a CA, certificate or key file
        return _cannot_start(f"configuration error: {exc}", 2)
    except ImgcacheError as exc:
        return _cannot_start(f"cannot start: {exc}", 2)
    except OSError as exc:
        return _cannot_start(f"cannot start: {exc}", 1)
    except BaseException:
        flush_logs()  # the traceback Python prints comes after the lines that led to it
        raise
    return 0


def _cannot_start(message: str, status: int) -> int:
    """Say why on stderr, after the log lines that came before; return ``status``."""
    flush_logs()
    print(f"imgcache: {message}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
