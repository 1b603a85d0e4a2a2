"""A WHIP publisher built on aiortc that sends pre-encoded packets from a file.

The packets go out as they are in the file (aiortc's encoders `pack` them
into RTP without re-encoding), paced by their timestamps, so the server's HLS
output can be compared packet by packet against the file. Used by the tests
(in-process or as a subprocess) and by benchmarks/whip_ingest.py.

    python tests/whip_client.py URL FILE [--token T] [--video-codec h264|vp8] [--loop] [--duration S]
        [--progress FILE] [--quit-on-stdin]

`--progress FILE` appends a block every 0.5 s, in the shape of ffmpeg's
`-progress` (`frame=` video packets sent, `out_time_us=` media time sent,
`progress=continue`, and a last block with `progress=end` once the resource
is deleted). `--quit-on-stdin` ends the publish cleanly (tracks end, DELETE,
final block and JSON result) when `q` or end of file is read on stdin, as
ffmpeg does with `q`. With `--loop`, timestamps go on across loops, so a run
can last as long as wanted.

ICE gathers on 127.0.0.1 only (the tests stay on loopback).
"""

from __future__ import annotations

import argparse
import asyncio
import fractions
import json
import os
import sys
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import av
from aioice import ice as aioice_ice
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError


def loopback_only() -> None:
    aioice_ice.get_host_addresses = lambda use_ipv4=True, use_ipv6=True: ["127.0.0.1"]


@dataclass
class FilePackets:
    """Every packet of one stream of a file, in decode order, as (pts seconds, av.Packet)."""

    kind: str
    codec: str
    packets: list[av.Packet]
    time_base: fractions.Fraction
    duration: float


def read_packets(path: Path) -> dict[str, FilePackets]:
    out: dict[str, FilePackets] = {}
    with av.open(str(path)) as container:
        streams = {s.index: s for s in container.streams if s.type in ("video", "audio")}
        packets: dict[int, list[av.Packet]] = {i: [] for i in streams}
        for packet in container.demux(*streams.values()):
            if packet.size and packet.pts is not None:
                packets[packet.stream.index].append(packet)
        for index, stream in streams.items():
            items = packets[index]
            first = items[0].pts
            for p in items:
                p.pts -= first
                p.dts = p.pts
            tb = stream.time_base
            duration = float((items[-1].pts - items[0].pts) * tb) if items else 0.0
            out[stream.type] = FilePackets(stream.type, stream.codec_context.name, items, tb, duration)
    return out


class PacketTrack(MediaStreamTrack):
    """Yields a file's packets in real time (optionally looping, timestamps going on)."""

    def __init__(
        self,
        source: FilePackets,
        start: asyncio.Future,
        loop: bool,
        stop_after: float | None,
        quit_event: asyncio.Event | None = None,
    ) -> None:
        super().__init__()
        self.kind = source.kind
        self.source = source
        self.start = start
        self.loop = loop
        self.stop_after = stop_after
        self.quit_event = quit_event
        self.index = 0
        self.offset = 0
        self.sent = 0
        self.sent_bytes = 0
        self.media_time = 0.0
        period = source.duration
        if source.packets:
            p = source.packets
            step = (p[-1].pts - p[0].pts) / max(1, len(p) - 1)
            period = float((p[-1].pts + step) * source.time_base)
        self.period = period

    async def recv(self) -> av.Packet:
        packets = self.source.packets
        if self.quit_event is not None and self.quit_event.is_set():
            self.stop()
            raise MediaStreamError
        if self.index >= len(packets):
            if not self.loop:
                self.stop()
                raise MediaStreamError
            self.index = 0
            self.offset += round(self.period / self.source.time_base)
        template = packets[self.index]
        self.index += 1
        pts = template.pts + self.offset
        seconds = float(pts * self.source.time_base)
        if self.stop_after is not None and seconds >= self.stop_after:
            self.stop()
            raise MediaStreamError
        t0 = await self.start
        delay = t0 + seconds - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        packet = av.Packet(bytes(template))
        packet.pts = pts
        packet.dts = pts
        packet.time_base = self.source.time_base
        self.sent += 1
        self.sent_bytes += packet.size
        self.media_time = seconds
        return packet


@dataclass
class WhipResult:
    status: int
    location: str | None = None
    body: str = ""
    sent: dict[str, int] = field(default_factory=dict)
    delete_status: int | None = None
    states: list[str] = field(default_factory=list)
    """The peer connection's states in the order they came (connecting, connected, failed...)."""


async def publish(
    url: str,
    path: Path,
    *,
    token: str = "",
    video_codec: str = "h264",
    loop: bool = False,
    duration: float | None = None,
    send_delete: bool = True,
    on_started=None,
    quit_event: asyncio.Event | None = None,
    progress: Path | None = None,
    answer_filter=None,
    offer_filter=None,
) -> WhipResult:
    """Publish `path` over WHIP to `url` until the file (or `duration`) ends, or `quit_event`
    is set; DELETE at the end. `progress`: a file that gets ffmpeg-style progress blocks.
    `answer_filter`: str -> str applied to the answer before it is used (tests that put a relay
    in the path rewrite the server's candidates with it). `offer_filter`: likewise for the offer
    as it is POSTed (tests that plant candidates in it)."""
    sources = read_packets(path)
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    start: asyncio.Future = asyncio.get_running_loop().create_future()
    tracks: dict[str, PacketTrack] = {}
    for kind, source in sources.items():
        track = PacketTrack(source, start, loop, duration, quit_event)
        tracks[kind] = track
        transceiver = pc.addTransceiver(track, direction="sendonly")
        if kind == "video":
            mime = "video/h264" if video_codec == "h264" else "video/vp8"
            codecs = RTCRtpSender.getCapabilities("video").codecs
            transceiver.setCodecPreferences([c for c in codecs if c.mimeType.lower() == mime])
    await pc.setLocalDescription(await pc.createOffer())
    headers = {"Content-Type": "application/sdp"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    connected = asyncio.Event()
    states: list[str] = []

    @pc.on("connectionstatechange")
    def _state() -> None:
        states.append(pc.connectionState)
        if pc.connectionState == "connected":
            connected.set()

    async with aiohttp.ClientSession() as http:
        offer = pc.localDescription.sdp
        if offer_filter is not None:
            offer = offer_filter(offer)
        async with http.post(url, data=offer, headers=headers) as response:
            body = await response.text()
            result = WhipResult(response.status, response.headers.get("Location"), body, states=states)
        if response.status != 201:
            await pc.close()
            return result
        answer = answer_filter(body) if answer_filter is not None else body
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        await asyncio.wait_for(connected.wait(), 15)
        start.set_result(time.monotonic() + 0.2)
        if on_started is not None:
            started = on_started(result)
            if asyncio.iscoroutine(started):
                await started
        reporter = asyncio.ensure_future(_report_progress(progress, tracks)) if progress else None
        ends = [asyncio.ensure_future(_ended(t)) for t in tracks.values()]
        await asyncio.gather(*ends)
        # The last frames need a moment on the wire before the resource goes.
        await asyncio.sleep(0.5)
        result.sent = {kind: t.sent for kind, t in tracks.items()}
        if send_delete and result.location:
            resource = urllib.parse.urljoin(url, result.location)
            async with http.delete(resource, headers={"Authorization": f"Bearer {token}"} if token else {}) as r:
                result.delete_status = r.status
        if reporter is not None:
            reporter.cancel()
            tail = f"status={result.status}\ndelete_status={result.delete_status}\nprogress=end"
            _write_progress(progress, tracks, tail)
    await pc.close()
    return result


def _write_progress(path: Path, tracks: dict[str, PacketTrack], tail: str) -> None:
    main = tracks.get("video") or next(iter(tracks.values()))
    video = tracks.get("video")
    audio = tracks.get("audio")
    block = (
        f"frame={video.sent if video else 0}\naudio_packets={audio.sent if audio else 0}\n"
        f"total_size={sum(t.sent_bytes for t in tracks.values())}\n"
        f"out_time_us={round(main.media_time * 1e6)}\n{tail}\n"
    )
    with open(path, "a") as f:
        f.write(block)


async def _report_progress(path: Path, tracks: dict[str, PacketTrack], interval: float = 0.5) -> None:
    while True:
        _write_progress(path, tracks, "progress=continue")
        await asyncio.sleep(interval)


def _quit_on_stdin(quit_event: asyncio.Event) -> None:
    """Set `quit_event` when `q` or end of file comes on stdin."""
    loop = asyncio.get_running_loop()
    fd = sys.stdin.fileno()

    def readable() -> None:
        try:
            data = os.read(fd, 4096)
        except OSError:
            data = b""
        if not data or b"q" in data:
            loop.remove_reader(fd)
            quit_event.set()

    loop.add_reader(fd, readable)


async def _ended(track: PacketTrack) -> None:
    ended = asyncio.Event()
    track.on("ended", ended.set)
    if track.readyState == "ended":
        return
    await ended.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("file", type=Path)
    parser.add_argument("--token", default="")
    parser.add_argument("--video-codec", default="h264", choices=["h264", "vp8"])
    parser.add_argument("--loop", action="store_true")
    parser.add_argument("--duration", type=float, default=None)
    parser.add_argument("--progress", type=Path, default=None, help="append ffmpeg-style progress blocks to this file")
    parser.add_argument("--quit-on-stdin", action="store_true", help="end cleanly on `q` or end of file on stdin")
    args = parser.parse_args()
    loopback_only()

    async def run() -> WhipResult:
        quit_event = asyncio.Event()
        if args.quit_on_stdin:
            _quit_on_stdin(quit_event)
        return await publish(
            args.url, args.file, token=args.token, video_codec=args.video_codec,
            loop=args.loop, duration=args.duration,
            on_started=lambda r: print("started", flush=True),
            quit_event=quit_event, progress=args.progress,
        )

    result = asyncio.run(run())
    print(json.dumps({"status": result.status, "location": result.location, "sent": result.sent,
                      "delete_status": result.delete_status, "states": result.states,
                      "body": result.body[:500]}), flush=True)
    return 0 if result.status == 201 else 1


if __name__ == "__main__":
    sys.exit(main())
