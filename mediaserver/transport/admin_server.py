"""The admin listener: `/api/v1/` with a bearer token, on its own address.

Every request passes the token check first (a middleware, so no route can
forget it), compared in constant time. Relups load code, so this listener
defaults to 127.0.0.1 and the token is never optional.
"""

from __future__ import annotations

import hmac
from typing import Any

import msgspec
from aiohttp import web

from ..config import AdminConfig
from ..runtime.relup import CodeServer
from . import static_files
from .listener import HttpListener

_json = msgspec.json.Encoder()


class RelupRequest(msgspec.Struct, forbid_unknown_fields=True):
    path: str | None = None
    """A package name in the relups directory ("1.1.0") or an absolute path in it;
    none: the package that upgrades from the running version."""
    dry_run: bool = False


def _reply(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=_json.encode(body), status=status, content_type="application/json")


class AdminServer:
    def __init__(self, config: AdminConfig, code_server: CodeServer, token: str) -> None:
        self.config = config
        self.code = code_server
        self._token = token.encode()
        self.app = web.Application(middlewares=[self._require_token], client_max_size=64 * 1024)
        self.app.router.add_get("/api/v1/status", self.status)
        self.app.router.add_get("/api/v1/sessions", self.sessions)
        self.app.router.add_get("/api/v1/relups", self.relups)
        self.app.router.add_post("/api/v1/relup", self.relup)
        self.app.router.add_post("/api/v1/revert", self.revert)
        # The page carries no data; it asks for the token and calls the API with it.
        static_files.add_routes(self.app, admin=True)
        self.listener = HttpListener(self.app, config.host, config.port)

    @web.middleware
    async def _require_token(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.method == "GET" and static_files.is_public_path(request.path):
            return await handler(request)
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self._token):
            return web.Response(
                body=_json.encode({"error": "missing or wrong bearer token"}),
                status=401,
                content_type="application/json",
                headers={"WWW-Authenticate": 'Bearer realm="mediaserver admin"'},
            )
        return await handler(request)

    async def start(self) -> None:
        await self.listener.start()

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return self.listener.addresses

    async def close(self) -> None:
        await self.listener.close()

    async def status(self, request: web.Request) -> web.Response:
        return _reply(self.code.status())

    async def sessions(self, request: web.Request) -> web.Response:
        return _reply(self.code.streams.describe())

    async def relups(self, request: web.Request) -> web.Response:
        return _reply(msgspec.to_builtins(self.code.history))

    async def relup(self, request: web.Request) -> web.Response:
        try:
            body = msgspec.json.decode(await request.read() or b"{}", type=RelupRequest)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            return _reply({"error": f"bad request body: {exc}"}, status=400)
        report = await self.code.apply(body.path, dry_run=body.dry_run)
        return _reply(msgspec.to_builtins(report), status=200 if report.ok else 409)

    async def revert(self, request: web.Request) -> web.Response:
        report = await self.code.revert()
        return _reply(msgspec.to_builtins(report), status=200 if report.ok else 409)
