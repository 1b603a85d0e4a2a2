"""The `mediaserver` command line."""

from __future__ import annotations

import argparse
import sys
import textwrap

from . import __version__
from .config import ConfigError, load_config


EXIT_CODES = """exit status:
  0  done
  1  the server refused (the error and each session's error are printed)
  2  usage error, no token, or the admin API cannot be reached"""


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

    def admin_options(command: argparse.ArgumentParser) -> None:
        command.add_argument("--config", metavar="FILE", help="the server's TOML config (admin address, data_dir)")
        command.add_argument(
            "--admin", metavar="URL",
            help="admin API base URL, e.g. http://127.0.0.1:8081 (default: [admin] host and port of the config)",
        )
        command.add_argument("--token", help="admin bearer token (default: config, then data_dir/admin.token)")
        command.add_argument("--json", action="store_true", help="print the raw JSON answer")
        # Raw, so the exit codes keep their lines; the description is filled here.
        command.description = textwrap.fill(command.description or "", 78)
        command.epilog = EXIT_CODES
        command.formatter_class = argparse.RawDescriptionHelpFormatter

    status = commands.add_parser(
        "status", help="show version, generations, sessions and relup history",
        description="Ask the running server's admin API for its version, loaded generations, "
        "sessions and relup history.",
    )
    admin_options(status)
    relup = commands.add_parser(
        "relup", help="apply or revert a relup on the running server",
        description="Upgrade the running server's session logic in place, or revert the last upgrade.",
    )
    relup_commands = relup.add_subparsers(dest="relup_command", required=True, metavar="ACTION")
    apply = relup_commands.add_parser(
        "apply", help="apply a relup package (default: the one upgrading from the running version)",
        description="Apply a relup package from the server's relups directory. PATH is a package "
        "name (1.1.0) or a path inside that directory; without it, the package whose `from` is the "
        "running version. --dry-run runs the whole preflight on copies of the live state and changes nothing.",
    )
    apply.add_argument(
        "path", nargs="?", metavar="PATH", help="package name (1.1.0) or path in the relups directory"
    )
    apply.add_argument("--dry-run", action="store_true", help="preflight only; change nothing")
    admin_options(apply)
    revert = relup_commands.add_parser(
        "revert", help="go back to the previous generation",
        description="Revert the last applied relup: every session moves back to the previous "
        "generation (kept in memory) through the down migrations.",
    )
    admin_options(revert)
    upgrade = commands.add_parser(
        "upgrade", help="hand every live connection to a new worker running the code and config on disk now",
        description="Start a new worker from the code and config installed now and move every live RTMP "
        "connection to it with its state (same TCP connection, nothing lost). A new worker that cannot "
        "start, or cannot take a connection's state, changes nothing. --dry-run does everything but the "
        "move. --keeper re-executes the keeper itself, keeping its sockets and workers.",
    )
    upgrade.add_argument("--dry-run", action="store_true", help="start and check the new worker; move nothing")
    upgrade.add_argument("--keeper", action="store_true", help="re-execute the keeper process in place")
    upgrade.add_argument(
        "--drain-timeout", type=float, default=0.0, metavar="SECONDS",
        help="how long the old worker may keep WHIP publishers (default 3600)",
    )
    admin_options(upgrade)
    commands.add_parser("worker", help=argparse.SUPPRESS)
    commands.add_parser("keeper-check", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "keeper-check":
        from . import fdchannel, keeper  # noqa: F401 - what a re-executed keeper imports

        return 0
    if args.command == "worker":
        from . import worker

        return worker.main()
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"mediaserver: {exc}", file=sys.stderr)
        return 2
    from . import admin_client

    if args.command in ("status", "upgrade"):
        return admin_client.run(args.command, config, args)
    return admin_client.run(args.relup_command, config, args)


def _serve(args: argparse.Namespace) -> int:
    from . import keeper

    adopted = keeper.reexecuted_state()
    if adopted is not None:
        return keeper.run_reexecuted(adopted)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"mediaserver: {exc}", file=sys.stderr)
        return 2
    if args.log_format:
        config.log_format = args.log_format
    if args.log_level:
        config.log_level = args.log_level
    from . import logsetup

    logsetup.configure(config.log_level, config.log_format)
    options = {"log_level": args.log_level, "log_format": args.log_format}
    log_settings = {"level": config.log_level, "format": config.log_format}
    return keeper.run(config, args.config, options, log_settings=log_settings)


if __name__ == "__main__":
    sys.exit(main())
