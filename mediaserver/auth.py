"""Publish authorisation: stream keys from the config, then an HTTP webhook.

Keys are compared in constant time. The webhook (like nginx-rtmp's
on_publish and MediaMTX's HTTP auth) gets a JSON POST and allows the publish
only on a 2xx answer; a timeout, an unreachable hook or any other answer
denies, with the reason logged. `on_unpublish` notifications are fire and
forget.
"""

from __future__ import annotations

import asyncio
import fnmatch
import hmac
import logging
import urllib.parse
from typing import Any

import aiohttp

from .config import PublishConfig
from .logsetup import event

log = logging.getLogger("mediaserver.auth")


class PublishDenied(Exception):
    """The publish may not start; the message is the reason."""


def key_from_query(query: str) -> str:
    values = urllib.parse.parse_qs(query, keep_blank_values=True).get("key")
    return values[0] if values else ""


class PublishAuth:
    def __init__(self, config: PublishConfig) -> None:
        self.config = config
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def check_key(self, name: str, key: str) -> None:
        """Raise PublishDenied unless `key` is right for `name` (when keys are configured)."""
        rules = self.config.keys
        if not rules:
            return
        matching = [rule for rule in rules if fnmatch.fnmatchcase(name, rule.name)]
        if not matching:
            raise PublishDenied(f"no stream key is configured for stream {name!r}")
        given = key.encode()
        # Compare against every matching rule, so timing does not tell which matched.
        ok = False
        for rule in matching:
            ok |= hmac.compare_digest(given, rule.key.encode())
        if not ok:
            raise PublishDenied(f"wrong or missing stream key for stream {name!r}")

    async def authorize(self, protocol: str, name: str, key: str, client: str) -> None:
        """Keys, then the webhook; raise PublishDenied with the reason."""
        self.check_key(name, key)
        if not self.config.webhook:
            return
        body = {"action": "publish", "protocol": protocol, "name": name, "key": key, "client": client}
        try:
            async with self._client().post(
                self.config.webhook,
                json=body,
                timeout=aiohttp.ClientTimeout(total=self.config.webhook_timeout),
            ) as response:
                if not 200 <= response.status < 300:
                    raise PublishDenied(f"publish webhook answered {response.status}")
        except PublishDenied:
            raise
        except asyncio.TimeoutError:
            raise PublishDenied(
                f"publish webhook did not answer within {self.config.webhook_timeout:g} s"
            ) from None
        except aiohttp.ClientError as exc:
            raise PublishDenied(f"publish webhook unreachable: {type(exc).__name__}: {exc}") from None

    def notify_unpublish(self, protocol: str, name: str, client: str, reason: str) -> None:
        if not self.config.unpublish_webhook:
            return
        body = {"action": "unpublish", "protocol": protocol, "name": name, "client": client, "reason": reason}
        task = asyncio.get_running_loop().create_task(self._post_quietly(self.config.unpublish_webhook, body))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _post_quietly(self, url: str, body: dict[str, Any]) -> None:
        try:
            async with self._client().post(
                url, json=body, timeout=aiohttp.ClientTimeout(total=self.config.webhook_timeout)
            ) as response:
                if not 200 <= response.status < 300:
                    event(log, logging.WARNING, "unpublish webhook refused", stream=body["name"], status=response.status)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            event(log, logging.WARNING, "unpublish webhook failed", stream=body["name"], reason=f"{type(exc).__name__}: {exc}")

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._session is not None:
            await self._session.close()
