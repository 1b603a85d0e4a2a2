"""WHIP (RFC 9725) helpers on SDP text: what an offer carries, what an answer advertises.

Sans-I/O: strings in, values out. The full offer/answer negotiation is
aiortc's; this module only answers the questions the HTTP side must settle
before (is there anything we can ingest, and why not) and after (which
addresses the answer advertises) it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .errors import ProtocolError

VIDEO_PASSTHROUGH = "h264"
VIDEO_TRANSCODED = "vp8"
AUDIO_CODEC = "opus"

_RTPMAP = re.compile(r"a=rtpmap:(\d+) ([A-Za-z0-9_.-]+)/(\d+)")
MAX_OFFER_BYTES = 64 * 1024
"""An audio and a video section with every codec a browser offers fit in a
tenth of this; a larger body is refused before it is parsed."""
MAX_SECTIONS_OF_A_KIND = 1
"""A publish ingests one video and one audio track. aiortc makes a transceiver
(and its receive threads) for every section it answers: 500 `m=` lines cost
seconds and hundreds of MB. Extra sections are refused here, before any peer
connection exists, rather than answered and ignored."""
MAX_CANDIDATES = 64
"""A browser offers a handful per section; aioice pairs and checks each one."""
SECTION_KINDS = ("audio", "video")
"""Data channels (`m=application`) and anything else are refused: nothing
would read them, and each would get an ICE transport of its own."""


@dataclass
class MediaSection:
    kind: str
    direction: str = "sendrecv"
    codecs: list[str] = field(default_factory=list)
    """Codec names in the offer's order, lower case, without RTX/FEC helpers."""


@dataclass
class OfferSummary:
    media: list[MediaSection]

    def codecs(self, kind: str) -> list[str]:
        return [c for m in self.media if m.kind == kind and m.direction in ("sendonly", "sendrecv") for c in m.codecs]

    def video_mode(self, vp8_allowed: bool) -> str | None:
        """"h264" (passed through), "vp8" (transcoded), or None when there is no usable video."""
        codecs = self.codecs("video")
        if VIDEO_PASSTHROUGH in codecs:
            return VIDEO_PASSTHROUGH
        if vp8_allowed and VIDEO_TRANSCODED in codecs:
            return VIDEO_TRANSCODED
        return None

    def has_audio(self) -> bool:
        return AUDIO_CODEC in self.codecs("audio")


_HELPERS = {"rtx", "red", "ulpfec", "flexfec-03", "telephone-event", "cn"}


def inspect_offer(sdp: str, vp8_allowed: bool) -> OfferSummary:
    """Parse the media sections of an offer; ProtocolError says why it cannot be ingested."""
    if len(sdp) > MAX_OFFER_BYTES:
        raise ProtocolError(f"SDP offer of {len(sdp)} bytes is larger than {MAX_OFFER_BYTES}")
    lines = [line.strip() for line in sdp.splitlines() if line.strip()]
    if not lines or not lines[0].startswith("v=0"):
        raise ProtocolError("not an SDP offer: it must start with v=0")
    media: list[MediaSection] = []
    fingerprint_in_session = False
    candidates = 0
    fingerprinted: set[int] = set()
    for line in lines:
        if line.startswith("m="):
            kind = line[2:].split(" ", 1)[0]
            if kind not in SECTION_KINDS:
                raise ProtocolError(f"the offer has a media section of kind {kind[:32]!r}; a publish takes audio and video only")
            if sum(1 for m in media if m.kind == kind) >= MAX_SECTIONS_OF_A_KIND:
                raise ProtocolError(f"the offer has more than {MAX_SECTIONS_OF_A_KIND} {kind} section; a publish ingests one of each kind")
            media.append(MediaSection(kind))
        elif line.startswith("a=candidate:"):
            candidates += 1
            if candidates > MAX_CANDIDATES:
                raise ProtocolError(f"the offer has more than {MAX_CANDIDATES} ICE candidates")
        elif line.startswith("a=fingerprint:"):
            if media:
                fingerprinted.add(len(media) - 1)
            else:
                fingerprint_in_session = True
        elif media:
            if line in ("a=sendonly", "a=recvonly", "a=sendrecv", "a=inactive"):
                media[-1].direction = line[2:]
            else:
                match = _RTPMAP.match(line)
                if match:
                    name = match.group(2).lower()
                    if name not in _HELPERS and name not in media[-1].codecs:
                        media[-1].codecs.append(name)
    summary = OfferSummary(media)
    av_sections = [m for m in media if m.kind in ("audio", "video")]
    if not av_sections:
        raise ProtocolError("the offer has no audio or video section")
    if not any(m.direction in ("sendonly", "sendrecv") for m in av_sections):
        raise ProtocolError("the offer sends nothing: every media section is recvonly or inactive")
    video = summary.codecs("video")
    audio = summary.codecs("audio")
    video_mode = summary.video_mode(vp8_allowed)
    if video and video_mode is None:
        takes = "H264 or VP8" if vp8_allowed else "H264"
        raise ProtocolError(f"no usable video codec: the offer has {', '.join(video)}; this server takes {takes}")
    if audio and not summary.has_audio():
        raise ProtocolError(f"no usable audio codec: the offer has {', '.join(audio)}; this server takes Opus")
    if not fingerprint_in_session:
        missing = [f"{i} ({m.kind})" for i, m in enumerate(media) if i not in fingerprinted]
        if missing:
            # Without one DTLS cannot be checked; aiortc would answer and fail later in a task nobody awaits.
            raise ProtocolError(f"the offer has no a=fingerprint for media section {', '.join(missing)}")
    return summary


def advertise_hosts(answer: str, hosts: list[str]) -> str:
    """Add a host candidate for each of `hosts` beside each gathered one (same port).

    For a server behind a 1:1 NAT or a port-forwarding router, whose own
    addresses the publisher cannot reach.
    """
    if not hosts:
        return answer
    out: list[str] = []
    newline = "\r\n" if "\r\n" in answer else "\n"
    for line in answer.split(newline):
        out.append(line)
        if line.startswith("a=candidate:") and " typ host" in line:
            parts = line.split(" ")
            # a=candidate:<foundation> <component> <transport> <priority> <address> <port> typ host ...
            if len(parts) >= 8:
                for number, host in enumerate(hosts, start=1):
                    extra = list(parts)
                    extra[0] = f"{parts[0]}a{number}"
                    extra[3] = str(max(1, int(parts[3]) - number)) if parts[3].isascii() and parts[3].isdigit() else parts[3]
                    extra[4] = host
                    out.append(" ".join(extra))
    return newline.join(out)
