"""Assembles the server from its config and runs it until SIGINT/SIGTERM.

Run by the keeper (`worker.py`), it listens on the keeper's sockets and takes
part in upgrades: as the serving worker it hands its connections over
(`handover.HandoverSender`), as a successor it takes them
(`handover.HandoverReceiver`) before it accepts anything itself.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import platform
import signal
import socket
import time
from pathlib import Path
from typing import Any

import msgspec

from . import __version__
from .admin_token import load_or_create_token
from .auth import PublishAuth
from .config import Config
from .handover import HandoverReceiver, HandoverSender
from .logsetup import event
from .metrics import ServerMetrics
from .runtime.generation import installed_logic_dir, load_generation
from .runtime.relup import CodeServer, RelupReport
from .runtime.streams import Streams
from .transport.admin_server import AdminServer
from .transport.http_server import HttpServer
from .transport.rtmp_server import RtmpServer
from .transport.whip_server import WhipServer

log = logging.getLogger("mediaserver")

DRAIN_TIMEOUT = 3600.0
"""Default seconds a retiring worker keeps its WHIP publishers."""
RETIRE_CHECK = 0.5


async def serve(
    config: Config, link: Any = None, listeners: list[tuple[str, socket.socket]] | None = None
) -> int:
    return await WorkerApp(config, link, listeners).run()


class WorkerApp:
    def __init__(self, config: Config, link: Any, listeners: list[tuple[str, socket.socket]] | None) -> None:
        self.config = config
        self.link = link
        """The keeper's channel (worker.KeeperLink), or None when run alone."""
        self.role = link.role if link is not None else "standalone"
        self.sockets: dict[str, list[socket.socket]] | None = None
        if listeners is not None:
            self.sockets = {}
            for kind, sock in listeners:
                self.sockets.setdefault(kind, []).append(sock)
        self.data_dir = Path(config.data_dir)
        (self.data_dir / "hls").mkdir(parents=True, exist_ok=True)
        self.generation = load_generation(installed_logic_dir())
        self.streams = Streams(config, self.generation)
        self.code_server = CodeServer(config.relup, self.streams, self.generation)
        self.auth = PublishAuth(config.publish)
        self.rtmp = RtmpServer(config.rtmp, self.streams, self.auth, config.limits)
        self.metrics = ServerMetrics(self.streams, self.code_server, lambda: self.rtmp.connections)
        self.whip = (
            WhipServer(config.webrtc, config.hls, self.streams, self.auth, config.limits)
            if config.webrtc.enabled else None
        )
        self.http = HttpServer(config.http, self.data_dir / "hls", self.metrics, config.limits, self.streams, self.whip)
        self.admin = AdminServer(
            config.admin, self.code_server, load_or_create_token(config),
            upgrader=self.upgrade if link is not None else None,
            status_extra=self.status_extra,
        )
        self.upgrade_history: list[dict[str, Any]] = []
        self.stop = asyncio.Event()
        self.retiring = False
        self.handover_busy = False

    def _socks(self, kind: str) -> list[socket.socket] | None:
        return None if self.sockets is None else self.sockets.get(kind, [])

    async def run(self) -> int:
        successor = self.role == "successor"
        if not successor:
            self.streams.recover()
        await self.rtmp.start(self._socks("rtmp"), accept=not successor)
        await self.http.start(self._socks("http"), accept=not successor)
        if self.whip is not None:
            await self.whip.start(open_port=not successor)
        self.metrics.start()
        await self.admin.start(self._socks("admin"), accept=not successor)
        if self.link is not None:
            self.link.handlers["handover"] = self._on_handover
            self.link.handlers["webrtc"] = lambda message, fds: asyncio.get_running_loop().create_task(
                self._open_webrtc_port()
            )
            self.link.handlers["foreign"] = self._on_foreign
            self.link.handlers["whip_delete"] = self._on_whip_delete
            if self.whip is not None:
                self.whip.forward_delete = self._forward_whip_delete
        event(
            log, logging.INFO,
            "worker loaded, waiting for the hand-over" if successor else "mediaserver started",
            version=self.generation.version, pid=os.getpid(),
            rtmp=" ".join(f"{h}:{p}" for h, p in self.rtmp.addresses),
            http=" ".join(f"{h}:{p}" for h, p in self.http.addresses),
            admin=" ".join(f"{h}:{p}" for h, p in self.admin.addresses),
            data_dir=str(self.data_dir.resolve()),
            relups=str(Path(self.config.relup.directory).resolve()),
        )
        if self.link is not None:
            self.link.send({"type": "ready", "info": self.info()})

        # Everything loaded so far lives as long as the process: keep it out of the
        # cyclic collector's full passes, which would otherwise stall the loop.
        gc.collect()
        gc.freeze()

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop.set)
        waits = [asyncio.ensure_future(self.stop.wait())]
        if self.link is not None:
            waits.append(asyncio.ensure_future(self.link.keeper_gone.wait()))
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for each in waits:
            each.cancel()
        await self.shutdown("server shutting down")
        return 0

    def info(self) -> dict[str, Any]:
        return {
            "version": self.code_server.current.version,
            "package_version": __version__,
            "python": platform.python_version(),
            "pid": os.getpid(),
        }

    async def shutdown(self, reason: str) -> None:
        event(log, logging.INFO, "shutting down: ending every stream", pid=os.getpid())
        self.rtmp.stop_accepting()
        if self.whip is not None:
            await self.whip.close(reason)
        self.streams.shutdown(reason)
        await self.rtmp.close(reason)
        await self.admin.close()
        self.metrics.stop()
        await self.auth.close()
        await self.http.close()
        event(log, logging.INFO, "stopped", pid=os.getpid())

    # -- status ----------------------------------------------------------------

    async def status_extra(self) -> dict[str, Any]:
        extra: dict[str, Any] = {"pid": os.getpid(), "package_version": __version__}
        if self.link is not None:
            try:
                reply = await self.link.request({"type": "workers"}, timeout=2.0)
                extra["keeper"] = reply.get("keeper")
            except Exception as exc:  # status must answer even if the keeper does not
                extra["keeper"] = {"error": f"{type(exc).__name__}: {exc}"}
        return extra

    # -- upgrades: the serving side ---------------------------------------------------

    async def upgrade(self, dry_run: bool, keeper: bool, drain_timeout: float) -> dict[str, Any]:
        """POST /api/v1/upgrade: ask the keeper, which runs the choreography."""
        if self.retiring:
            return {"ok": False, "error": "this worker is retiring: ask again (the new worker answers)"}
        kind = "upgrade_keeper" if keeper else "upgrade"
        try:
            reply = await self.link.request(
                {"type": kind, "dry_run": dry_run, "drain_timeout": drain_timeout}, timeout=300.0
            )
        except Exception as exc:
            return {"ok": False, "action": kind, "error": f"the keeper did not answer: {type(exc).__name__}: {exc}"}
        report = dict(reply.get("report", {}))
        if report.get("ok") and not dry_run and not keeper:
            asyncio.get_running_loop().call_later(0.2, self._retire, drain_timeout or DRAIN_TIMEOUT)
        return report

    def _on_handover(self, message: dict[str, Any], fds: list[int]) -> None:
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            return
        sock = socket.socket(fileno=fds[0])
        loop = asyncio.get_running_loop()
        if message.get("side") == "receive":
            loop.create_task(self._receive(sock))
        else:
            loop.create_task(self._send(message, sock))

    async def _send(self, message: dict[str, Any], sock: socket.socket) -> None:
        if self.handover_busy or self.retiring:
            report = {"ok": False, "error": "this worker is already handing over"}
        else:
            self.handover_busy = True
            try:
                report = await HandoverSender(self, sock, bool(message.get("dry_run"))).run()
            finally:
                self.handover_busy = False
        if report.get("ok") and not message.get("dry_run"):
            self.link.send({"type": "kept", "kept": self.whip_names()})
        event(
            log, logging.INFO if report.get("ok") else logging.WARNING,
            "hand-over done" if report.get("ok") else "hand-over refused",
            dry_run=bool(message.get("dry_run")), moved=report.get("moved"),
            switch_ms=report.get("switch_ms"), reason=report.get("error") or None,
        )
        self.link.channel.reply(message, {"type": "handed_over", "ok": bool(report.get("ok")), "report": report})

    def whip_names(self) -> list[str]:
        if self.whip is None:
            return []
        names = {p.name for p in self.whip.resources.values()} | set(self.whip.reserved)
        return sorted(names)

    def stop_public_listeners(self) -> None:
        self.http.listener.stop_accepting()
        self.admin.listener.stop_accepting()

    async def resume_public_listeners(self) -> None:
        await self.http.listener.resume_accepting()
        await self.admin.listener.resume_accepting()

    def _retire(self, drain_timeout: float) -> None:
        """Every RTMP connection moved: serve WHIP publishers until they end, then exit."""
        self.retiring = True
        asyncio.get_running_loop().create_task(self._retire_loop(drain_timeout))

    async def _retire_loop(self, drain_timeout: float) -> None:
        deadline = time.monotonic() + drain_timeout
        last: list[str] | None = None
        while True:
            # WHIP publishers, and RTMP connections that could not move (webhook
            # still pending after the wait, half-closed): served until they end.
            names = self.whip_names() + sorted(c.stream_name for c in self.rtmp.connections if c.stream_name)
            if not names and not self.rtmp.connections:
                break
            if names != last:
                event(log, logging.INFO, "retiring worker keeps its publishers", streams=",".join(names),
                      connections=len(self.rtmp.connections))
                self.link.send({"type": "kept", "kept": names})
                last = names
            if time.monotonic() > deadline:
                reason = f"drain timeout of {drain_timeout:g} s after an upgrade"
                event(log, logging.WARNING, "drain timeout: ending the publishers left", streams=",".join(names))
                if self.whip is not None:
                    await self.whip.close(reason)
                for connection in list(self.rtmp.connections):
                    connection.disconnect(reason)
                break
            await asyncio.sleep(RETIRE_CHECK)
        if self.whip is not None:
            self.whip.release_shared_port()
        self.link.send({"type": "released", "kept": []})
        try:
            await self.link.channel.drain()
        except Exception:
            pass
        self.stop.set()

    # -- upgrades: the successor's side --------------------------------------------------

    async def _receive(self, sock: socket.socket) -> None:
        receiver = HandoverReceiver(self, sock)
        await receiver.finished.wait()
        if receiver.failed:
            event(log, logging.INFO, "hand-over not taken: this worker exits", reason=receiver.failed)
            for connection in list(self.rtmp.connections):
                connection.disconnect("hand-over abandoned")
            self.stop.set()

    def adopt_history(self, relups: list[Any], upgrades: list[dict[str, Any]]) -> None:
        older = [msgspec.convert(item, RelupReport) for item in relups]
        self.code_server.history[:0] = older
        self.upgrade_history = list(upgrades)

    async def take_over(self, kept: list[str]) -> None:
        """Every connection is here: accept, and pick up the playlists nobody publishes."""
        self.streams.foreign = set(kept)
        self.streams.recover(skip=frozenset(kept))
        await self.rtmp.resume_accepting()
        await self.http.listener.resume_accepting()
        await self.admin.listener.resume_accepting()
        event(log, logging.INFO, "mediaserver started", version=self.code_server.current.version,
              pid=os.getpid(), adopted=len(self.rtmp.connections),
              rtmp=" ".join(f"{h}:{p}" for h, p in self.rtmp.addresses),
              http=" ".join(f"{h}:{p}" for h, p in self.http.addresses),
              admin=" ".join(f"{h}:{p}" for h, p in self.admin.addresses))

    async def _forward_whip_delete(self, name: str, resource: str, token: str) -> tuple[int, str]:
        try:
            reply = await self.link.request(
                {"type": "whip_delete", "name": name, "resource": resource, "token": token}, timeout=10.0
            )
        except Exception as exc:
            return 503, f"the previous worker did not answer: {type(exc).__name__}\n"
        return int(reply.get("status", 502)), str(reply.get("text", ""))

    def _on_whip_delete(self, message: dict[str, Any], fds: list[int]) -> None:
        async def answer() -> None:
            status, text = 404, "no such resource\n"
            if self.whip is not None:
                status, text = await self.whip.delete_for_another_worker(
                    str(message.get("name")), str(message.get("resource")), str(message.get("token", ""))
                )
            self.link.channel.reply(message, {"status": status, "text": text})

        asyncio.get_running_loop().create_task(answer())

    def _on_foreign(self, message: dict[str, Any], fds: list[int]) -> None:
        self.streams.foreign = set(message.get("names", []))

    async def _open_webrtc_port(self) -> None:
        if self.whip is None:
            return
        try:
            await self.whip.open_shared_port()
        except OSError as exc:
            event(log, logging.ERROR, "WebRTC UDP port not opened", reason=str(exc))
