"""An aiohttp application on one address: start, addresses, close."""

from __future__ import annotations

from typing import Any

from aiohttp import web


class HttpListener:
    def __init__(self, app: web.Application, host: str, port: int, **runner_options: Any) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.runner_options = runner_options
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False, **self.runner_options)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await self._site.start()

    @property
    def addresses(self) -> list[tuple[str, int]]:
        server = self._site._server if self._site is not None else None  # noqa: SLF001
        return [s.getsockname()[:2] for s in server.sockets] if server is not None else []

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
