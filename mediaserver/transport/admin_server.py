"""The admin listener: `/api/v1/` with a bearer token, on its own address.

Every request passes the token check first (a middleware, so no route can
forget it, and an unknown path is 401 before it is 404), compared in constant
time. Relups load code, so this listener defaults to 127.0.0.1 and the token
is never optional. The one exception is the status page itself (`GET /` and
its whitelisted `/static/` files): it carries no data, asks for the token and
calls the API with it.

Every answer, errors included, is JSON: `{"error": "..."}` for a refused or
malformed request, the relup report (200 done, 409 refused) for relup and revert.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from typing import Any, Awaitable, Callable

import msgspec
from aiohttp import web

from ..config import AdminConfig, HttpConfig
from ..logsetup import event
from ..runtime.relup import CodeServer
from . import static_files
from .http_guard import GuardedListener

log = logging.getLogger("mediaserver.admin")

API = "/api/v1"
MAX_BODY = 64 * 1024
ADMIN_MAX_CONNECTIONS = 64
"""Open connections to the admin listener (in total and per address): the CLI uses one."""
_json = msgspec.json.Encoder()


class RelupRequest(msgspec.Struct, forbid_unknown_fields=True):
    path: str | None = None
    """A package name in the relups directory ("1.1.0") or an absolute path in it;
    none: the package that upgrades from the running version."""
    dry_run: bool = False


class RevertRequest(msgspec.Struct, forbid_unknown_fields=True):
    pass


class UpgradeRequest(msgspec.Struct, forbid_unknown_fields=True):
    dry_run: bool = False
    keeper: bool = False
    """Re-execute the keeper itself (its sockets and workers kept)."""
    drain_timeout: float = 0.0
    """Seconds the old worker may keep WHIP publishers; 0: the configured default."""


_relup_request = msgspec.json.Decoder(RelupRequest)
_upgrade_request = msgspec.json.Decoder(UpgradeRequest)
_revert_request = msgspec.json.Decoder(RevertRequest)


def _reply(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=_json.encode(body),
        status=status,
        content_type="application/json",
        headers={"Cache-Control": "no-store", **(headers or {})},
    )


def _error(status: int, text: str, headers: dict[str, str] | None = None) -> web.Response:
    return _reply({"error": text}, status, headers)


def _digest(secret: bytes) -> bytes:
    # Comparing fixed-size digests keeps even the token's length out of the timing.
    return hashlib.sha256(secret).digest()


def _http_error_text(request: web.Request, exc: web.HTTPException) -> str:
    if exc.status == 404:
        return f"no such endpoint: {request.method} {request.path}"
    if exc.status == 405:
        return f"method {request.method} not allowed on {request.path}"
    if exc.status == 413:
        return f"request body larger than {MAX_BODY} bytes"
    return exc.reason


def _allow(exc: web.HTTPException) -> dict[str, str] | None:
    return {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None


class AdminServer:
    def __init__(
        self, config: AdminConfig, code_server: CodeServer, token: str,
        upgrader: Callable[[bool, bool, float], Awaitable[dict[str, Any]]] | None = None,
        status_extra: Callable[[], Awaitable[dict[str, Any]]] | None = None,
    ) -> None:
        token = token.strip()  # as the header's value is compared
        if not token:
            raise ValueError("the admin API needs a token")
        self.config = config
        self.code = code_server
        self.upgrader = upgrader
        self.status_extra = status_extra
        self._token_digest = _digest(token.encode())
        self.app = web.Application(middlewares=[self._require_token], client_max_size=MAX_BODY)
        self.app.router.add_get(f"{API}/status", self.status)
        self.app.router.add_get(f"{API}/sessions", self.sessions)
        self.app.router.add_get(f"{API}/relups", self.relups)
        self.app.router.add_post(f"{API}/relup", self.relup)
        self.app.router.add_post(f"{API}/revert", self.revert)
        self.app.router.add_post(f"{API}/upgrade", self.upgrade)
        static_files.add_routes(self.app, admin=True)
        # The public listener's defaults: a local process must not be able to
        # hold the admin port with slow or idle connections either.
        defaults = HttpConfig()
        self.listener = GuardedListener(
            self.app, config.host, config.port,
            header_timeout=defaults.header_timeout,
            keepalive_timeout=defaults.keepalive_timeout,
            max_connections=ADMIN_MAX_CONNECTIONS,
            max_connections_per_client=ADMIN_MAX_CONNECTIONS,
        )

    def _authorised(self, request: web.Request) -> bool:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        # Header bytes that are not UTF-8 arrive as surrogates: compare them as sent.
        given_bytes = given.strip().encode("utf-8", "surrogateescape")
        return hmac.compare_digest(_digest(given_bytes), self._token_digest)

    @web.middleware
    async def _require_token(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.method == "GET" and static_files.is_public_path(request.path):
            return await handler(request)
        if not self._authorised(request):
            event(
                log, logging.WARNING, "admin request refused: missing or wrong bearer token",
                client=request.remote, method=request.method, path=request.raw_path[:200],
            )
            return _error(
                401, "missing or wrong bearer token",
                {"WWW-Authenticate": 'Bearer realm="mediaserver admin"'},
            )
        try:
            return await handler(request)
        except web.HTTPException as exc:
            # 404, 405, 413...: the same JSON shape as every other answer.
            if exc.status < 400:
                raise
            return _error(exc.status, _http_error_text(request, exc), _allow(exc))
        except Exception as exc:
            log.exception("admin request %s %s failed", request.method, request.raw_path[:200])
            return _error(500, f"internal error: {type(exc).__name__}: {exc}")

    async def start(self, sockets: list[Any] | None = None, accept: bool = True) -> None:
        await self.listener.start(sockets, accept)

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return self.listener.addresses

    async def close(self) -> None:
        await self.listener.close()

    # -- routes ----------------------------------------------------------------

    async def status(self, request: web.Request) -> web.Response:
        status = self.code.status()
        if self.status_extra is not None:
            status.update(await self.status_extra())
        return _reply(status)

    async def upgrade(self, request: web.Request) -> web.Response:
        body = await request.read()
        if not body.strip():
            return _error(400, 'request body must be a JSON object: {"dry_run": ..., "keeper": ...}')
        try:
            wanted = _upgrade_request.decode(body)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            return _error(400, f"bad request body: {exc}")
        if self.upgrader is None:
            return _error(409, "this server runs without a keeper: there is nothing to hand over to")
        report = await self.upgrader(wanted.dry_run, wanted.keeper, wanted.drain_timeout)
        return _reply(report, status=200 if report.get("ok") else 409)

    async def sessions(self, request: web.Request) -> web.Response:
        return _reply(self.code.streams.describe())

    async def relups(self, request: web.Request) -> web.Response:
        return _reply(msgspec.to_builtins(self.code.history))

    async def relup(self, request: web.Request) -> web.Response:
        body = await request.read()
        if not body.strip():
            # A bare POST must not upgrade anything: the caller says what it wants.
            return _error(400, 'request body must be a JSON object: {"path": ..., "dry_run": ...}')
        try:
            wanted = _relup_request.decode(body)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            return _error(400, f"bad request body: {exc}")
        if wanted.path is not None and "\x00" in wanted.path:
            return _error(400, "bad request body: `path` contains a NUL byte - at `$.path`")
        report = await self.code.apply(wanted.path, dry_run=wanted.dry_run)
        return _reply(msgspec.to_builtins(report), status=200 if report.ok else 409)

    async def revert(self, request: web.Request) -> web.Response:
        body = await request.read()
        if body.strip():
            try:
                _revert_request.decode(body)
            except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                return _error(400, f"bad request body: {exc}")
        report = await self.code.revert()
        return _reply(msgspec.to_builtins(report), status=200 if report.ok else 409)
