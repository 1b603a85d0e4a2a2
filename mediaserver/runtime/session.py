"""A session process: one live stream's mailbox, state and pinned generation.

The handler runs synchronously between two messages, so within one event
loop thread nothing can observe a half-handled message or two code versions.
Supervision: a handler that raises leaves the state as it was (handlers are
pure), so the session restarts from its last good state with the connection
up; the message is retried once, then quarantined. More than `max_restarts`
crashes within `restart_window` seconds stop the session with a reason. A
full mailbox asks the transport to stop reading (backpressure); nothing is
dropped.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any, Callable, Protocol

from ..logsetup import event
from .generation import Generation

log = logging.getLogger("mediaserver.session")
RECENT_MESSAGES = 4


class EffectRunner(Protocol):
    def run(self, effects: list[tuple[Any, ...]]) -> None: ...


class Supervisor(Protocol):
    """What a session reports to; implemented by the stream registry."""

    def crashed(self, session: Session, message: Any, reason: str) -> None: ...

    def quarantined(self, session: Session, message: Any, reason: str) -> None: ...

    def give_up(self, session: Session, reason: str) -> None: ...


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
        supervisor: Supervisor | None = None,
        max_restarts: int = 5,
        restart_window: float = 10.0,
        client: str = "",
    ) -> None:
        self.name = name
        self.generation = generation
        self.state = state
        self.effects = effects
        self.mailbox: deque[Any] = deque()
        self.mailbox_limit = mailbox_limit
        self.on_backpressure = on_backpressure
        self.supervisor = supervisor
        self.max_restarts = max_restarts
        self.restart_window = restart_window
        self.client = client
        self.suspended = False
        self.stopped = False
        self.reading_paused = False
        self.started = time.monotonic()
        self.crashes = 0
        self.restarts: deque[float] = deque()
        self.quarantined = 0
        self.handled = 0
        self.recent: deque[Any] = deque(maxlen=RECENT_MESSAGES)
        """The last messages handled, replayed on a copy of the state by a relup's preflight."""

    # -- messages ------------------------------------------------------------

    def deliver(self, message: Any) -> None:
        if self.stopped:
            return
        if self.suspended or self.mailbox:
            self.mailbox.append(message)
            if len(self.mailbox) >= self.mailbox_limit and not self.reading_paused:
                self.reading_paused = True
                self.on_backpressure(True)
            return
        self._handle(message)

    def _handle(self, message: Any) -> None:
        try:
            state, effects = self.generation.handle(self.state, message)
        except BaseException as first:  # user code can raise anything
            if not self._restart(message, first):
                return
            try:
                state, effects = self.generation.handle(self.state, message)
            except BaseException as second:
                reason = f"{type(second).__name__}: {second}"
                self.quarantined += 1
                event(
                    log, logging.ERROR, "message quarantined after its retry crashed too",
                    stream=self.name, message=getattr(message, "kind", "?"),
                    generation=self.generation.number, reason=reason,
                )
                if self.supervisor is not None:
                    self.supervisor.quarantined(self, message, reason)
                self._restart(message, second, retrying=False)
                return
        self.state = state
        self.handled += 1
        self.recent.append(message)
        if effects:
            self.effects.run(effects)

    def _restart(self, message: Any, exc: BaseException, retrying: bool = True) -> bool:
        """Count a crash against the intensity window; False when the session is stopped."""
        reason = f"{type(exc).__name__}: {exc}"  # the text only: a traceback pins a generation
        del exc
        self.crashes += 1
        now = time.monotonic()
        self.restarts.append(now)
        while self.restarts and now - self.restarts[0] > self.restart_window:
            self.restarts.popleft()
        if self.supervisor is not None:
            self.supervisor.crashed(self, message, reason)
        if len(self.restarts) > self.max_restarts:
            self.stop(
                f"session crashed {len(self.restarts)} times within {self.restart_window:g} s "
                f"(limit {self.max_restarts}); last error: {reason}"
            )
            return False
        if retrying:
            event(
                log, logging.WARNING, "handler raised; session restarted from its last good state",
                stream=self.name, message=getattr(message, "kind", "?"),
                generation=self.generation.number, reason=reason,
            )
        return not self.stopped

    def stop(self, reason: str) -> None:
        if self.stopped:
            return
        self.stopped = True
        self.mailbox.clear()
        event(log, logging.ERROR, "session stopped", stream=self.name, reason=reason)
        if self.supervisor is not None:
            self.supervisor.give_up(self, reason)

    # -- system messages -----------------------------------------------------

    def suspend(self) -> None:
        self.suspended = True

    def resume(self) -> None:
        self.suspended = False
        self.drain()

    def drain(self) -> None:
        while self.mailbox and not self.suspended and not self.stopped:
            self._handle(self.mailbox.popleft())
        if self.reading_paused and len(self.mailbox) < self.mailbox_limit // 2:
            self.reading_paused = False
            self.on_backpressure(False)

    def get_state(self) -> Any:
        return self.state

    def change_code(self, generation: Generation, state: Any) -> None:
        """Pin to `generation` with `state` already migrated for it (between two messages)."""
        self.generation = generation
        self.state = state

    def describe(self) -> dict[str, Any]:
        try:
            info = dict(self.generation.describe(self.state))
        except BaseException as exc:  # a broken describe must not break status
            info = {"name": self.name, "describe_error": f"{type(exc).__name__}: {exc}"}
        info.update(
            name=self.name,
            generation=self.generation.number,
            version=self.generation.version,
            state_version=getattr(self.state, "version", None),
            uptime=round(time.monotonic() - self.started, 3),
            client=self.client,
            crashes=self.crashes,
            quarantined=self.quarantined,
            mailbox=len(self.mailbox),
            stopped=self.stopped,
        )
        return info
