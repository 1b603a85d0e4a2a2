"""A worker: the server, run by the keeper on the sockets the keeper bound.

`python -m mediaserver worker` with MEDIASERVER_KEEPER_FD naming its end of
the keeper's channel. The first message says the role (first, restart,
successor), the config file to read now, and carries the listening sockets.
A worker dies with its keeper (PR_SET_PDEATHSIG): nothing is left holding
ports when the keeper is killed.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from .config import Config, ConfigError, load_config
from .fdchannel import Channel
from .keeper import CHANNEL_ENV

PR_SET_PDEATHSIG = 1


class KeeperLink:
    """The worker's side of the keeper's channel."""

    def __init__(self, sock: socket.socket) -> None:
        self.handlers: dict[str, Any] = {}
        self._first: asyncio.Future[tuple[dict[str, Any], list[int]]] = asyncio.get_running_loop().create_future()
        self.channel = Channel(sock, self._on_message, self._on_closed)
        self.start: dict[str, Any] = {}
        self.role = "first"
        self.keeper_gone = asyncio.Event()

    def _on_message(self, message: dict[str, Any], fds: list[int]) -> None:
        kind = message.get("type")
        if not self._first.done():
            self._first.set_result((message, fds))
            return
        handler = self.handlers.get(kind)
        if handler is not None:
            handler(message, fds)
        else:
            for fd in fds:
                os.close(fd)

    def _on_closed(self) -> None:
        self.keeper_gone.set()

    async def first_message(self) -> tuple[dict[str, Any], list[int]]:
        return await self._first

    def send(self, message: dict[str, Any]) -> None:
        if not self.channel.closed:
            self.channel.send(message)

    async def request(self, message: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        reply, fds = await self.channel.request(message, timeout=timeout)
        for fd in fds:
            os.close(fd)
        return reply


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass


def unchangeable(config: Config, listeners: list[tuple[str, socket.socket]], data_dir: str) -> list[str]:
    """Settings of `config` that cannot take effect under live connections: the
    listening ports the keeper holds, and the data directory the streams are written in."""
    wanted = {"rtmp": config.rtmp, "http": config.http, "admin": config.admin}
    problems = []
    for kind, section in wanted.items():
        socks = [s for k, s in listeners if k == kind]
        ports = sorted({s.getsockname()[1] for s in socks})
        if section.port and ports and section.port not in ports:
            problems.append(
                f"{kind}.port is {section.port} in the config but the server listens on "
                f"{', '.join(map(str, ports))}: a listening port cannot change under live "
                "connections (stop and start the server to change it)"
            )
    if data_dir and str(Path(config.data_dir).resolve()) != data_dir:
        problems.append(
            f"data_dir is {config.data_dir!r} in the config but the server writes in {data_dir}: the "
            "data directory cannot change under live streams (stop and start the server to change it)"
        )
    return problems


async def _run(fd: int) -> int:
    link = KeeperLink(socket.socket(fileno=fd))
    start, fds = await link.first_message()
    link.start = start
    link.role = start.get("role", "first")
    if os.getppid() != start.get("keeper_pid"):
        return 1  # the keeper died before PR_SET_PDEATHSIG was set

    listeners = [
        (item["kind"], socket.socket(fileno=fd)) for item, fd in zip(start["listeners"], fds)
    ]
    try:
        config = load_config(start.get("config"))
    except ConfigError as exc:
        link.send({"type": "failed", "reason": f"config refused: {exc}"})
        await link.channel.drain()
        print(f"mediaserver: {exc}", file=sys.stderr)
        return 2
    options = start.get("options", {})
    if options.get("log_format"):
        config.log_format = options["log_format"]
    if options.get("log_level"):
        config.log_level = options["log_level"]
    problems = unchangeable(config, listeners, start.get("data_dir", ""))
    if problems:
        link.send({"type": "failed", "reason": "config refused: " + "; ".join(problems)})
        await link.channel.drain()
        print(f"mediaserver: {'; '.join(problems)}", file=sys.stderr)
        return 2
    try:
        from . import logsetup, server
    except BaseException as exc:  # an install that cannot import: the keeper says why
        link.send({"type": "failed", "reason": f"the server cannot be imported: {type(exc).__name__}: {exc}"})
        await link.channel.drain()
        raise
    logsetup.configure(config.log_level, config.log_format)
    try:
        return await server.serve(config, link=link, listeners=listeners)
    except OSError as exc:  # a UDP port in use, an address not on this machine: said, not a traceback
        link.send({"type": "failed", "reason": f"cannot start: {exc}"})
        await link.channel.drain()
        print(f"mediaserver: cannot start: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        link.send({"type": "failed", "reason": f"{type(exc).__name__}: {exc}"})
        await link.channel.drain()
        raise


def main() -> int:
    fd = int(os.environ.pop(CHANNEL_ENV))
    _die_with_parent()
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(_run(fd))
    return uvloop.run(_run(fd))
