"""RTP timestamps of a WebRTC publish mapped to one continuous millisecond timeline.

Every RTP track has its own clock with a random origin (RFC 3550 5.1); only
the RTCP sender reports say which RTP timestamp of each track was sampled at
which wall-clock (NTP) instant of the sender. The timeline is the sender's NTP
time, so audio and video line up as they were captured:

- a track's RTP timestamps are unwrapped (32 bits) and counted at the nominal
  clock rate from an anchor (rtp, ntp);
- the anchor is the track's first sender report; until one arrives, frames are
  held (up to `sync_wait` seconds after the first frame) so that the first
  frames written are already in sync;
- a track with no sender report by then is anchored on its first frame's
  arrival, carried into the sender's clock with the offset between the
  sender's NTP and ours seen in any report (zero when none came at all);
- the timeline's zero is the earliest anchored first frame, and it never moves.

The anchor is fixed once set, so a track's timestamps advance exactly with its
RTP clock: no jumps from report jitter. Sans-I/O: callers pass `now`.
"""

from __future__ import annotations

from dataclasses import dataclass

NTP_EPOCH_OFFSET = 2208988800  # seconds from 1900-01-01 to 1970-01-01


def ntp_to_seconds(ntp: int) -> float:
    """A 64-bit NTP timestamp (RFC 3550 4) as seconds since the Unix epoch."""
    return (ntp >> 32) - NTP_EPOCH_OFFSET + (ntp & 0xFFFFFFFF) / 4294967296.0


@dataclass
class TrackClock:
    rate: int
    last: int | None = None
    """The last unwrapped RTP timestamp seen (frames or reports)."""
    first_rtp: int | None = None
    first_arrival: float = 0.0
    report: tuple[int, float] | None = None
    """The first sender report: (unwrapped rtp, sender ntp seconds)."""
    anchor: tuple[int, float] | None = None

    def unwrap(self, rtp: int) -> int:
        rtp &= 0xFFFFFFFF
        if self.last is None:
            self.last = rtp
            return rtp
        # The nearest value to the last one with these 32 low bits: reports and
        # reordered frames may step back a little, wraps step forward.
        delta = (rtp - self.last + (1 << 31)) % (1 << 32) - (1 << 31)
        value = self.last + delta
        if delta > 0:
            self.last = value
        return value


class StreamClock:
    def __init__(self, tracks: dict[str, int], sync_wait: float) -> None:
        """`tracks`: clock rate per track kind the publisher offered."""
        self.tracks = {kind: TrackClock(rate) for kind, rate in tracks.items()}
        self.sync_wait = sync_wait
        self.first_frame_at: float | None = None
        self.sender_minus_local: float | None = None
        self.zero: float | None = None
        """Sender NTP seconds of the timeline's 0 ms, once locked."""

    @property
    def locked(self) -> bool:
        return self.zero is not None

    def sender_report(self, kind: str, ntp: int, rtp: int, now: float) -> None:
        track = self.tracks.get(kind)
        if track is None:
            return
        sender_time = ntp_to_seconds(ntp)
        if self.sender_minus_local is None:
            self.sender_minus_local = sender_time - now
        if track.report is None:
            track.report = (track.unwrap(rtp), sender_time)

    def frame(self, kind: str, rtp: int, now: float) -> int:
        """Record a frame's arrival; returns its unwrapped RTP timestamp."""
        track = self.tracks[kind]
        value = track.unwrap(rtp)
        if track.first_rtp is None:
            track.first_rtp = value
            track.first_arrival = now
            if self.first_frame_at is None:
                self.first_frame_at = now
        return value

    def waiting_for_first_frames(self, now: float) -> bool:
        """Whether a track has sent no frame yet, within `sync_wait` of the first frame of any.

        `poll` locks as soon as every started track has a sender report. A
        publisher that reports before sending (FFmpeg's WHIP muxer sends an SR
        ahead of each stream's first packet) would have it lock on the first
        video frame, before the first audio one: the first segment would open
        without audio, and audio would only join at the next keyframe.
        """
        if self.first_frame_at is None or now - self.first_frame_at >= self.sync_wait:
            return False
        return any(track.first_rtp is None for track in self.tracks.values())

    def poll(self, now: float) -> bool:
        """Lock the timeline when every started track has a report, or when waiting is over."""
        if self.zero is not None:
            return True
        started = [t for t in self.tracks.values() if t.first_rtp is not None]
        if not started or self.first_frame_at is None:
            return False
        waited = now - self.first_frame_at >= self.sync_wait
        if not waited and any(t.report is None for t in started):
            return False
        for track in started:
            self._anchor(track)
        self.zero = min(self._sender_time(t, t.first_rtp) for t in started)  # type: ignore[arg-type]
        return True

    def to_ms(self, kind: str, unwrapped: int, now: float) -> int | None:
        """The frame's time on the timeline in ms, or None while it must wait for a report."""
        if self.zero is None:
            return None
        track = self.tracks[kind]
        if track.anchor is None:
            if track.report is None and now - track.first_arrival < self.sync_wait:
                return None
            self._anchor(track)
        return round((self._sender_time(track, unwrapped) - self.zero) * 1000)

    def _anchor(self, track: TrackClock) -> None:
        if track.anchor is not None:
            return
        if track.report is not None:
            track.anchor = track.report
        else:
            offset = self.sender_minus_local or 0.0
            track.anchor = (track.first_rtp, track.first_arrival + offset)  # type: ignore[assignment]

    def _sender_time(self, track: TrackClock, unwrapped: int) -> float:
        rtp, seconds = track.anchor  # type: ignore[misc]
        return seconds + (unwrapped - rtp) / track.rate
