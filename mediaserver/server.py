"""Assembles the server from its config and runs it until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from pathlib import Path

from .admin_token import load_or_create_token
from .auth import PublishAuth
from .config import Config
from .logsetup import event
from .metrics import ServerMetrics
from .runtime.generation import installed_logic_dir, load_generation
from .runtime.relup import CodeServer
from .runtime.streams import Streams
from .transport.admin_server import AdminServer
from .transport.http_server import HttpServer
from .transport.rtmp_server import RtmpServer
from .transport.whip_server import WhipServer

log = logging.getLogger("mediaserver")


async def serve(config: Config) -> int:
    data_dir = Path(config.data_dir)
    (data_dir / "hls").mkdir(parents=True, exist_ok=True)
    generation = load_generation(installed_logic_dir())
    streams = Streams(config, generation)
    streams.recover()
    code_server = CodeServer(config.relup, streams, generation)
    auth = PublishAuth(config.publish)
    rtmp_server = RtmpServer(config.rtmp, streams, auth, config.limits)
    metrics = ServerMetrics(streams, code_server, lambda: rtmp_server.connections)
    whip_server = WhipServer(config.webrtc, config.hls, streams, auth, config.limits) if config.webrtc.enabled else None
    http_server = HttpServer(config.http, data_dir / "hls", metrics, config.limits, streams, whip_server)
    admin_server = AdminServer(config.admin, code_server, load_or_create_token(config))
    await rtmp_server.start()
    await http_server.start()
    if whip_server is not None:
        await whip_server.start()
    metrics.start()
    await admin_server.start()
    event(
        log, logging.INFO, "mediaserver started",
        version=generation.version,
        rtmp=" ".join(f"{h}:{p}" for h, p in rtmp_server.addresses),
        http=" ".join(f"{h}:{p}" for h, p in http_server.addresses),
        admin=" ".join(f"{h}:{p}" for h, p in admin_server.addresses),
        data_dir=str(data_dir.resolve()),
        relups=str(Path(config.relup.directory).resolve()),
    )

    # Everything loaded so far lives as long as the process: keep it out of the
    # cyclic collector's full passes, which would otherwise stall the loop.
    gc.collect()
    gc.freeze()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()

    event(log, logging.INFO, "shutting down: ending every stream")
    rtmp_server.stop_accepting()
    if whip_server is not None:
        await whip_server.close("server shutting down")
    streams.shutdown("server shutting down")
    await rtmp_server.close("server shutting down")
    await admin_server.close()
    metrics.stop()
    await auth.close()
    await http_server.close()
    event(log, logging.INFO, "stopped")
    return 0
