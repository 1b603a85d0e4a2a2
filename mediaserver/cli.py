"""The `mediaserver` command line."""

from __future__ import annotations

import argparse
import asyncio
import sys

from . import __version__
from .config import ConfigError, load_config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mediaserver",
        description="Live RTMP ingest to HLS, upgraded in place by relups.",
    )
    parser.add_argument("--version", action="version", version=f"mediaserver {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="run the server (embedded defaults when no config file is given)",
        description="Run the server: RTMP on 0.0.0.0:1935 and HTTP on 0.0.0.0:8080 by default, "
        "HLS written under ./mediaserver-data unless the config says otherwise.",
    )
    serve.add_argument("--config", metavar="FILE", help="TOML config file (optional)")
    serve.add_argument("--log-format", choices=["text", "json"], help="override log_format")
    serve.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], help="override log_level"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    return 2


def _serve(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"mediaserver: {exc}", file=sys.stderr)
        return 2
    if args.log_format:
        config.log_format = args.log_format
    if args.log_level:
        config.log_level = args.log_level
    from . import logsetup, server

    logsetup.configure(config.log_level, config.log_format)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; stay usable without it
        return asyncio.run(server.serve(config))
    return uvloop.run(server.serve(config))


if __name__ == "__main__":
    sys.exit(main())
