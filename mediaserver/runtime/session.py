"""A session process: one live stream's mailbox, state and pinned generation.

The handler runs synchronously between two messages, so within one event
loop thread nothing can observe a half-handled message or two code versions.
A message that makes the handler raise is retried once from the same (last
good) state, then quarantined; the stream goes on. A full mailbox asks the
transport to stop reading (backpressure); nothing is dropped.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any, Callable, Protocol

from ..logsetup import event
from .generation import Generation

log = logging.getLogger("mediaserver.session")
RECENT_MESSAGES = 8


class EffectRunner(Protocol):
    def run(self, effects: list[tuple[Any, ...]]) -> None: ...


class Session:
    def __init__(
        self,
        *,
        name: str,
        generation: Generation,
        state: Any,
        effects: EffectRunner,
        mailbox_limit: int,
        on_backpressure: Callable[[bool], None],
        client: str = "",
    ) -> None:
        self.name = name
        self.generation = generation
        self.state = state
        self.effects = effects
        self.mailbox: deque[Any] = deque()
        self.mailbox_limit = mailbox_limit
        self.on_backpressure = on_backpressure
        self.client = client
        self.suspended = False
        self.reading_paused = False
        self.started = time.monotonic()
        self.crashes = 0
        self.quarantined = 0
        self.recent: deque[Any] = deque(maxlen=RECENT_MESSAGES)
        """The last messages handled, for a relup's dry run on a copy of the state."""

    # -- messages ------------------------------------------------------------

    def deliver(self, message: Any) -> None:
        if self.suspended or self.mailbox:
            self.mailbox.append(message)
            if len(self.mailbox) >= self.mailbox_limit and not self.reading_paused:
                self.reading_paused = True
                self.on_backpressure(True)
            return
        self._handle(message)

    def _handle(self, message: Any) -> None:
        for attempt in (1, 2):
            try:
                state, effects = self.generation.handle(self.state, message)
                break
            except BaseException as exc:  # user code can raise anything
                self.crashes += 1
                reason = f"{type(exc).__name__}: {exc}"
                if attempt == 2:
                    self.quarantined += 1
                    event(
                        log, logging.ERROR, "message quarantined after a retry",
                        stream=self.name, message=getattr(message, "kind", "?"), reason=reason,
                    )
                    return
                event(
                    log, logging.WARNING, "handler raised; retrying from the last good state",
                    stream=self.name, message=getattr(message, "kind", "?"), reason=reason,
                )
        self.state = state
        self.recent.append(message)
        if effects:
            self.effects.run(effects)

    # -- system messages -----------------------------------------------------

    def suspend(self) -> None:
        self.suspended = True

    def resume(self) -> None:
        self.suspended = False
        self.drain()

    def drain(self) -> None:
        while self.mailbox and not self.suspended:
            self._handle(self.mailbox.popleft())
        if self.reading_paused and len(self.mailbox) < self.mailbox_limit // 2:
            self.reading_paused = False
            self.on_backpressure(False)

    def get_state(self) -> Any:
        return self.state

    def change_code(self, generation: Generation, state: Any) -> None:
        """Pin to `generation` with `state` already migrated for it."""
        self.generation = generation
        self.state = state

    def describe(self) -> dict[str, Any]:
        info = dict(self.generation.describe(self.state))
        info.update(
            generation=self.generation.number,
            version=self.generation.version,
            uptime=round(time.monotonic() - self.started, 3),
            client=self.client,
            crashes=self.crashes,
            quarantined=self.quarantined,
            mailbox=len(self.mailbox),
        )
        return info
