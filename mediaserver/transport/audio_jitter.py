"""A jitter buffer for WebRTC audio that gives up on a lost packet instead of waiting.

aiortc's JitterBuffer lets frames out strictly in sequence: a lost packet
holds everything behind it until the buffer overflows (16 packets, 320 ms of
Opus), and from then on each later loss also throws away a packet that did
arrive, because the full buffer is cut from the front. Audio has no
retransmission (no NACK for audio in aiortc), so waiting for a lost packet
gains nothing beyond reordering. Measured with aiortc's buffer on a
simulated stream of 20000 packets: 0.45 % lost on the network became 2.3 %
of the audio lost, 1.9 % became 9.5 %, and after the first loss every packet
waited 15 packets (300 ms) instead of 4.

This buffer keeps `prefetch` packets for reordering; once that many packets
have arrived behind a hole, the hole is skipped (the Opus -> AAC transcoder
fills it with silence of the same length, so audio stays in sync). Same
interface as aiortc's (the receiver calls `add`; `drain` in
webrtc_decoders.py reads `_origin`, `_packets`, `capacity` and `remove`).
"""

from __future__ import annotations

from typing import Optional

from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.rtp import RtpPacket
from aiortc.utils import uint16_add

_RESET_AFTER = 100
"""Packets this far out of the window (a sender restart, a huge gap) restart the buffer."""


class AudioJitterBuffer(JitterBuffer):
    def __init__(self, capacity: int = 16, prefetch: int = 4) -> None:
        super().__init__(capacity=capacity, prefetch=prefetch)
        self.held = 0
        """Packets stored in the window."""
        self.skipped = 0
        """Holes given up on (lost, or later than the reordering window)."""
        self.late = 0
        """Packets that came after their slot had been given up, dropped."""

    def add(self, packet: RtpPacket) -> tuple[bool, Optional[JitterFrame]]:
        seq = packet.sequence_number
        if self._origin is None:
            self._origin = seq
        delta = uint16_add(seq, -self._origin)
        behind = uint16_add(self._origin, -seq)
        if behind < delta:  # before the window: too late, or far out
            if behind < _RESET_AFTER:
                self.late += 1
                return False, None
            self._restart(seq)
            delta = 0
        elif delta >= self.capacity:
            if delta >= self.capacity + _RESET_AFTER:
                self._restart(seq)
                delta = 0
            else:
                # Let the window slide up to this packet: what is in front goes out or is skipped.
                self._advance(delta - self.capacity + 1)
        pos = seq % self.capacity
        if self._packets[pos] is None:
            self.held += 1
        self._packets[pos] = packet
        return False, self._next()

    def _next(self) -> Optional[JitterFrame]:
        """The frame at the window's front, once `prefetch` more packets are held behind it."""
        if self.held <= self._prefetch:
            return None
        assert self._origin is not None
        while self._packets[self._origin % self.capacity] is None:
            self.skipped += 1
            self._origin = uint16_add(self._origin, 1)
        packet = self._packets[self._origin % self.capacity]
        assert packet is not None
        self.remove(1)
        return JitterFrame(data=packet._data, timestamp=packet.timestamp)  # type: ignore[attr-defined]

    def _advance(self, count: int) -> None:
        """Drop `count` slots from the front (their packets are older than the window now)."""
        for _ in range(count):
            assert self._origin is not None
            if self._packets[self._origin % self.capacity] is None:
                self.skipped += 1
            self.remove(1)

    def _restart(self, seq: int) -> None:
        self.remove(self.capacity)
        self._origin = seq

    def remove(self, count: int) -> None:
        assert self._origin is not None
        for i in range(count):
            if self._packets[uint16_add(self._origin, i) % self.capacity] is not None:
                self.held -= 1
        super().remove(count)
