"""CPU per packet of the frame path in one process, no sockets.

Replays a clip as RTMP bytes (built with our client core) through
ServerConnection -> FLV parse -> session handler -> HLS writer (our MPEG-TS packetiser), and
prints µs per media packet and per stream-second. `--profile` prints the
top functions. `--writer` times the HLS writer alone (the clip's packets
written straight into HlsWriter, a segment every 2 s at a keyframe; best of
5 runs, so another process's load inflates it less).

    .venv/bin/python benchmarks/frame_path.py CLIP.flv [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path

import av

from mediaserver import wire
from mediaserver.proto import flv, rtmp
from mediaserver.runtime.effects import HlsEffects
from mediaserver.runtime.generation import installed_logic_dir, load_generation
from mediaserver.hls.segmenter import HlsWriter


def rtmp_bytes(clip: str) -> tuple[bytes, int, float]:
    """The publish session's bytes after the handshake, packet count, duration (s)."""
    client = rtmp.ClientConnection()
    client.set_chunk_size(4096)  # what ffmpeg and OBS announce
    with av.open(clip) as src:
        video = src.streams.video[0]
        audio = src.streams.audio[0]
        client.send_video(0, b"\x17\x00\x00\x00\x00" + video.codec_context.extradata)
        client.send_audio(0, b"\xaf\x00" + audio.codec_context.extradata)
        count, last = 0, 0
        for packet in src.demux():
            if not packet.size:
                continue
            ts = int(packet.dts)
            if packet.stream.type == "video":
                cts = int(packet.pts - packet.dts)
                head = bytes((0x17 if packet.is_keyframe else 0x27, 1)) + cts.to_bytes(3, "big", signed=True)
                client.send_video(ts, head + bytes(packet))
            else:
                client.send_audio(ts, b"\xaf\x01" + bytes(packet))
            count += 1
            last = max(last, ts)
    data = client.data_to_send()
    hello = 1 + 1536
    return data[hello:], count, last / 1000.0


def run(data: bytes, out_dir: Path, generation) -> None:
    server = rtmp.ServerConnection()
    server._hs_stage = 2  # noqa: SLF001 - skip the handshake, measure the frame path
    server.connected = server._connect_requested = True  # noqa: SLF001
    # What the connect command would do: lift the small pre-connect message cap.
    server._reader.max_message_size = server._max_message_size  # noqa: SLF001
    writer = HlsWriter(out_dir, playlist_size=6, segment_target=2.0)
    effects = HlsEffects("bench", writer)
    state = generation.init("bench", 0.0, {"segment_target_ms": 2000, "timestamp_jump_ms": 10000})
    handle = generation.handle
    step = 64 * 1024
    for start in range(0, len(data), step):
        for ev in server.feed(data[start : start + step]):
            if type(ev) is rtmp.VideoMessage:
                tag = flv.parse_video(ev.payload)
                if tag.is_config:
                    message = wire.VideoConfig(bytes(tag.data))
                else:
                    message = wire.Video(ev.timestamp, tag.cts, tag.keyframe, tag.data)
            elif type(ev) is rtmp.AudioMessage:
                tag = flv.parse_audio(ev.payload)
                message = wire.AudioConfig(bytes(tag.data)) if tag.is_config else wire.Audio(ev.timestamp, tag.data)
            else:
                continue
            state, out = handle(state, message)
            effects.run(out)
    state, out = handle(state, wire.End(now=0.0, reason="done"))
    effects.run(out)


def clip_packets(clip: str) -> tuple[bytes, bytes, list[tuple[str, int, int, bool, bytes]]]:
    with av.open(clip) as src:
        video = src.streams.video[0].codec_context.extradata
        audio = src.streams.audio[0].codec_context.extradata
        packets = [(p.stream.type, int(p.dts), int(p.pts), p.is_keyframe, bytes(p)) for p in src.demux() if p.size]
    return video, audio, packets


def write_clip(out_dir: Path, video: bytes, audio: bytes, packets) -> None:
    writer = HlsWriter(out_dir, playlist_size=6, segment_target=2.0)
    writer.set_codec("video", video)
    writer.set_codec("audio", audio)
    sequence, start = 0, packets[0][1]
    writer.start_segment(sequence, False)
    for kind, dts, pts, key, data in packets:
        if kind == "video" and key and dts - start >= 2000:
            writer.end_segment(sequence, dts - start)
            sequence, start = sequence + 1, dts
            writer.start_segment(sequence, False)
        writer.write(kind, dts, pts, key, data)
    writer.end_segment(sequence, max(packets[-1][1] - start, 1))
    writer.end_stream()


def writer_only(clip: str) -> None:
    video, audio, packets = clip_packets(clip)
    best = float("inf")
    for _ in range(5):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.process_time()
            write_clip(Path(tmp), video, audio, packets)
            best = min(best, time.process_time() - start)
    print(f"HLS writer alone: {best * 1e6 / len(packets):.1f} µs/packet (best of 5, {len(packets)} packets)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("clip")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--writer", action="store_true", help="time the HLS writer alone")
    args = parser.parse_args()
    if args.writer:
        writer_only(args.clip)
        return 0
    data, packets, seconds = rtmp_bytes(args.clip)
    generation = load_generation(installed_logic_dir())
    with tempfile.TemporaryDirectory() as tmp:
        start = time.process_time()
        if args.profile:
            profiler = cProfile.Profile()
            profiler.runcall(run, data, Path(tmp), generation)
        else:
            run(data, Path(tmp), generation)
        cpu = time.process_time() - start
    print(f"clip: {packets} packets, {seconds:.1f} s, {len(data) / seconds * 8 / 1e6:.2f} Mbit/s")
    print(f"frame path CPU: {cpu * 1e6 / packets:.1f} µs/packet, "
          f"{cpu / seconds * 100:.3f} % of a core per stream")
    if args.profile:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(15)
    return 0


if __name__ == "__main__":
    sys.exit(main())
