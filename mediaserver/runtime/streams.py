"""The live streams by name: who publishes what, and each name's HLS writer.

A name's writer outlives its publishers so that a republish continues the
playlist (media sequence going on, after an EXT-X-DISCONTINUITY).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

from .. import wire
from ..config import Config
from ..hls.segmenter import HlsWriter, UnsafeStreamPath
from ..media.previews import PreviewPool, StreamPreviews
from ..logsetup import event
from .dead_letters import DeadLetters
from .effects import HlsEffects
from .generation import Generation
from .session import Session

log = logging.getLogger("mediaserver.streams")


class Publisher(Protocol):
    """The transport side of a publish: something that can be disconnected."""

    client: str
    protocol: str
    """"rtmp" or "webrtc": how the publisher is connected (shown in the status)."""

    def disconnect(self, reason: str) -> None: ...


class PublishRefused(Exception):
    """A publish cannot start; the message is the reason given to the client."""


@dataclass(eq=False)
class LiveStream:
    name: str
    session: Session
    publisher: Publisher


class Streams:
    """The registry of live streams, and the supervisor of their sessions."""

    def __init__(self, config: Config, generation: Generation) -> None:
        self.config = config
        self.generation = generation
        """The generation new sessions start on; the relup engine switches it."""
        self.hls_root = Path(config.data_dir) / "hls"
        self.live: dict[str, LiveStream] = {}
        self.writers: dict[str, HlsWriter] = {}
        self.previews: dict[str, StreamPreviews] = {}
        self.preview_pool = PreviewPool(config.previews.workers)
        self.dead_letters = DeadLetters(Path(config.data_dir) / "dead-letters")
        self.crash_listeners: list[Callable[[Session], None]] = []
        self.revertible: Callable[[Generation], bool] = lambda generation: False
        """Whether a generation may still be reverted; set by the relup engine."""
        self.sessions_started = 0
        self.restarts_total = 0
        self.foreign: set[str] = set()
        """Names still published through the previous worker after an upgrade (WHIP draining)."""
        self.received: dict[str, dict[str, int]] = {}
        """Per name: bytes and frames received by publishes that have ended."""

    def publish(
        self, name: str, publisher: Publisher, on_backpressure: Callable[[bool], None]
    ) -> Session:
        if name in self.foreign:
            raise PublishRefused(f"stream {name} is still published through the previous worker")
        current = self.live.get(name)
        if current is None and len(self.live) >= self.config.limits.max_streams:
            raise PublishRefused(f"the server's limit of {self.config.limits.max_streams} live streams is reached")
        if current is not None:
            if self.config.publish.on_conflict == "refuse":
                raise PublishRefused(f"stream {name} is already being published by {current.publisher.client}")
            event(
                log, logging.WARNING, "publisher replaced",
                stream=name, client=current.publisher.client, by=publisher.client,
            )
            self.unpublish(name, current.session, f"replaced by a new publisher from {publisher.client}")
            current.publisher.disconnect(f"replaced by a new publisher from {publisher.client}")
        writer = self.writers.get(name)
        if writer is None:
            try:
                writer = HlsWriter(
                    self.hls_root / name,
                    playlist_size=self.config.hls.playlist_size,
                    segment_target=self.config.hls.segment_target,
                )
            except UnsafeStreamPath as exc:
                event(log, logging.ERROR, "publish refused: unsafe stream directory", stream=name, reason=str(exc))
                raise PublishRefused(f"stream {name} cannot be written: {exc.strerror}") from None
            self.writers[name] = writer
        settings = {
            "thumbnail_interval_ms": round(self.config.previews.thumbnail_interval * 1000),
            "levels_interval_ms": round(self.config.previews.levels_interval * 1000),
            "levels_window_ms": round(self.config.previews.levels_window * 1000),
            "segment_target_ms": round(self.config.hls.segment_target * 1000),
            "timestamp_jump_ms": round(self.config.hls.timestamp_jump * 1000),
            "first_sequence": writer.next_sequence,
            "discontinuity": bool(writer.entries),
        }
        state = self.generation.init(name, time.time(), settings)
        session = self._session(name, publisher, on_backpressure, writer, state)
        self.sessions_started += 1
        self.live[name] = LiveStream(name, session, publisher)
        event(log, logging.INFO, "publish started", stream=name, client=publisher.client)
        return session

    def adopt(
        self, name: str, publisher: Publisher, on_backpressure: Callable[[bool], None],
        logic_state: Any, moved: Any,
    ) -> Session:
        """A publish handed over by the previous worker: its writer and logic state go on."""
        if name in self.live:
            raise PublishRefused(f"stream {name} is already live in this worker")
        writer = HlsWriter(
            self.hls_root / name,
            playlist_size=moved.playlist_size or self.config.hls.playlist_size,
            segment_target=moved.segment_target or self.config.hls.segment_target,
            state=moved.writer,
        )
        self.writers[name] = writer
        session = self._session(name, publisher, on_backpressure, writer, logic_state)
        session.handled = moved.handled
        session.crashes = moved.crashes
        session.quarantined = moved.quarantined
        session.started = time.monotonic() - max(time.time() - moved.started_wall, 0.0)
        self.live[name] = LiveStream(name, session, publisher)
        return session

    def _session(
        self, name: str, publisher: Publisher, on_backpressure: Callable[[bool], None],
        writer: HlsWriter, state: Any,
    ) -> Session:
        previews = self.previews.get(name)
        if previews is None:
            previews = self.previews[name] = StreamPreviews(
                name, self.preview_pool, self.config.previews.thumbnail_width
            )
        return Session(
            name=name,
            generation=self.generation,
            state=state,
            effects=HlsEffects(name, writer, previews),
            mailbox_limit=self.config.rtmp.mailbox_limit,
            on_backpressure=on_backpressure,
            supervisor=self,
            max_restarts=self.config.supervisor.max_restarts,
            restart_window=self.config.supervisor.restart_window,
            client=publisher.client,
        )

    def release(self, name: str, session: Session) -> None:
        """Forget a publish another worker took over: nothing ends, nothing is written."""
        live = self.live.get(name)
        if live is None or live.session is not session:
            return
        del self.live[name]
        session.stopped = True
        writer = self.writers.pop(name, None)
        if writer is not None:
            writer.detach()
        self.previews.pop(name, None)

    def recover(self, skip: frozenset[str] = frozenset()) -> None:
        """Pick up the playlists a previous process left, ending any it left live."""
        if not self.hls_root.is_dir():
            return
        for directory in sorted(self.hls_root.iterdir()):
            if (
                directory.is_dir() and (directory / "index.m3u8").is_file()
                and directory.name not in self.writers and directory.name not in skip
            ):
                try:
                    self.writers[directory.name] = HlsWriter(
                        directory,
                        playlist_size=self.config.hls.playlist_size,
                        segment_target=self.config.hls.segment_target,
                    )
                except UnsafeStreamPath as exc:
                    event(log, logging.WARNING, "playlist not recovered", stream=directory.name, reason=str(exc))

    def sessions(self) -> list[Session]:
        return [live.session for live in self.live.values()]

    def unpublish(self, name: str, session: Session, reason: str) -> None:
        """End `session` (once); the playlist gets EXT-X-ENDLIST."""
        live = self.live.get(name)
        if live is None or live.session is not session:
            return
        del self.live[name]
        publisher = live.publisher
        totals = self.received.setdefault(name, {"bytes": 0, "video": 0, "audio": 0})
        totals["bytes"] += getattr(publisher, "bytes_in", 0)
        for track, count in getattr(publisher, "frames_in", {}).items():
            totals[track] += count
        session.resume()
        if session.stopped:
            self._end_without_logic(session, reason)
        else:
            session.deliver(wire.End(now=time.time(), reason=reason))
            if session.stopped:
                self._end_without_logic(session, reason)
        session.release_held()
        event(
            log, logging.INFO, "publish ended",
            stream=name, client=live.publisher.client, reason=reason,
        )

    # -- supervisor ----------------------------------------------------------

    def crashed(self, session: Session, message: Any, reason: str) -> None:
        self.restarts_total += 1
        for listener in list(self.crash_listeners):
            listener(session)

    def can_revert(self, generation: Generation) -> bool:
        return self.revertible(generation)

    def quarantined(self, session: Session, message: Any, reason: str, generation: Generation) -> None:
        self.dead_letters.keep(session.name, generation.number, generation.version, message, reason)

    def give_up(self, session: Session, reason: str) -> None:
        live = self.live.get(session.name)
        if live is None or live.session is not session:
            return
        self.unpublish(session.name, session, reason)
        live.publisher.disconnect(reason)

    def _end_without_logic(self, session: Session, reason: str) -> None:
        """The logic cannot end this stream: close the playlist from the runtime side."""
        writer = self.writers.get(session.name)
        if writer is not None and not writer.ended:
            writer.salvage_open_segment()
            writer.end_stream()
        event(log, logging.WARNING, "playlist ended by the runtime", stream=session.name, reason=reason)

    def describe(self) -> list[dict[str, Any]]:
        return [live.session.describe() for live in self.live.values()]

    def shutdown(self, reason: str) -> None:
        for name, live in list(self.live.items()):
            self.unpublish(name, live.session, reason)
            live.publisher.disconnect(reason)
        for writer in self.writers.values():
            writer.close()
        self.preview_pool.close()
