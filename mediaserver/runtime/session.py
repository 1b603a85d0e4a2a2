"""A session process: one live stream's mailbox, state and pinned generation.

The handler runs synchronously between two messages, so within one event
loop thread nothing can observe a half-handled message or two code versions.
Supervision: a handler that raises leaves the state as it was (handlers are
pure), so the session restarts from its last good state with the connection
up; the message is retried once, then quarantined. One failing message is one
crash (its try and its retry together), for the intensity limit and for the
relup engine's auto-revert alike. More than `max_restarts` crashes within
`restart_window` seconds stop the session with a reason. A full mailbox asks
the transport to stop reading (backpressure); nothing is dropped.

A message quarantined by a generation that may still be reverted is held in
memory (at most HELD_MESSAGES); if that generation is reverted, the session
handles the held messages again on the generation it returns to, in order,
before its mailbox. Held messages go to the dead letters once a newer message
has been handled (re-handling them then would put them out of order), when
the hold overflows, or when the session ends.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from typing import Any, Callable, Protocol

from ..logsetup import event
from .generation import Generation

log = logging.getLogger("mediaserver.session")
RECENT_MESSAGES = 4
HELD_MESSAGES = 512
"""Quarantined messages kept in memory per session for a revert to re-handle."""


class EffectRunner(Protocol):
    def run(self, effects: list[tuple[Any, ...]]) -> None: ...


class Supervisor(Protocol):
    """What a session reports to; implemented by the stream registry."""

    def crashed(self, session: Session, message: Any, reason: str) -> None: ...

    def quarantined(self, session: Session, message: Any, reason: str, generation: Generation) -> None:
        """`message` failed twice on `generation` and will not be handled again."""
        ...

    def give_up(self, session: Session, reason: str) -> None: ...

    def can_revert(self, generation: Generation) -> bool:
        """True while `generation` may still be reverted (its failed messages are held)."""
        ...


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
        self.restarts: deque[tuple[float, int]] = deque()
        """(time, generation number) of each crash in the intensity window."""
        self.quarantined = 0
        self.held: deque[tuple[Any, str, Generation]] = deque()
        """(message, reason, generation) quarantined by a generation that may be reverted."""
        self.rehandled = 0
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
            if not self.suspended and not self._draining:
                self.drain()  # messages a revert put back are handled first
            return
        self._handle(message)
        if self.mailbox and not self.suspended and not self._draining:
            self.drain()

    _draining = False

    def _handle(self, message: Any) -> None:
        generation = self.generation
        try:
            state, effects = generation.handle(self.state, message)
        except BaseException as first:  # user code can raise anything
            if not self._restart(message, first):
                return
            if self.generation is not generation:
                # The crash report reverted this session: the held messages are
                # at the front of the mailbox; this one follows them.
                self.mailbox.insert(self._front, message)
                self._front += 1
                return
            try:
                state, effects = generation.handle(self.state, message)
            except BaseException as second:
                self._quarantine(message, f"{type(second).__name__}: {second}")
                return
        self.state = state
        self.handled += 1
        self.recent.append(message)
        if self._front:
            self._front -= 1
        if self.held:
            self.release_held()  # a newer message went out: the held ones can no longer be in order
        if effects:
            self.effects.run(effects)

    _front = 0
    """Messages at the mailbox's front that a revert put back (handled before the rest)."""

    def _quarantine(self, message: Any, reason: str) -> None:
        self.quarantined += 1
        event(
            log, logging.ERROR, "message quarantined after its retry crashed too",
            stream=self.name, message=getattr(message, "kind", "?"),
            generation=self.generation.number, reason=reason,
        )
        if self._front:
            self._front -= 1
        if self.supervisor is None:
            return
        if self.supervisor.can_revert(self.generation):
            self.held.append((message, reason, self.generation))
            if len(self.held) > HELD_MESSAGES:
                held_message, held_reason, held_generation = self.held.popleft()
                self.supervisor.quarantined(self, held_message, held_reason, held_generation)
        else:
            self.supervisor.quarantined(self, message, reason, self.generation)

    def release_held(self) -> None:
        """Write the held messages to the dead letters (they will not be re-handled)."""
        while self.held:
            message, reason, generation = self.held.popleft()
            if self.supervisor is not None:
                self.supervisor.quarantined(self, message, reason, generation)

    def return_to(self, generation: Generation, state: Any, reverted: Generation) -> None:
        """Pin back to `generation` after `reverted` was reverted: its crashes are
        forgiven and the messages it quarantined are handled again, first."""
        self.change_code(generation, state)
        self.restarts = deque(r for r in self.restarts if r[1] != reverted.number)
        again = [m for m, _, g in self.held if g is reverted]
        kept = [h for h in self.held if h[2] is not reverted]
        self.held = deque(kept)
        if again:
            self.quarantined -= len(again)
            self.rehandled += len(again)
            self.mailbox.extendleft(reversed(again))
            self._front += len(again)
            event(
                log, logging.WARNING, "quarantined messages handled again after the revert",
                stream=self.name, messages=len(again), generation=generation.number,
            )

    def _restart(self, message: Any, exc: BaseException) -> bool:
        """Count a crash against the intensity window; False when the session is stopped."""
        reason = f"{type(exc).__name__}: {exc}"  # the text only: a traceback pins a generation
        del exc
        self.crashes += 1
        crashed_on = self.generation.number  # the report below may revert the session
        now = time.monotonic()
        self.restarts.append((now, crashed_on))
        while self.restarts and now - self.restarts[0][0] > self.restart_window:
            self.restarts.popleft()
        if self.supervisor is not None:
            # May revert this session's generation synchronously (and forgive its crashes).
            self.supervisor.crashed(self, message, reason)
        if len(self.restarts) > self.max_restarts:
            self.stop(
                f"session crashed {len(self.restarts)} times within {self.restart_window:g} s "
                f"(limit {self.max_restarts}); last error: {reason}"
            )
            return False
        event(
            log, logging.WARNING, "handler raised; session restarted from its last good state",
            stream=self.name, message=getattr(message, "kind", "?"),
            generation=crashed_on, reason=reason,
        )
        return not self.stopped

    def stop(self, reason: str) -> None:
        if self.stopped:
            return
        self.stopped = True
        self.mailbox.clear()
        self._front = 0
        self.release_held()
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
        if self._draining:
            return
        self._draining = True
        try:
            while self.mailbox and not self.suspended and not self.stopped:
                self._handle(self.mailbox.popleft())
        finally:
            self._draining = False
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
            pid=os.getpid(),
            crashes=self.crashes,
            quarantined=self.quarantined,
            held=len(self.held),
            rehandled=self.rehandled,
            mailbox=len(self.mailbox),
            stopped=self.stopped,
        )
        return info
