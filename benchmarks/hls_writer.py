"""CPU of HlsWriter.write per media packet, segment opens/closes excluded.

Feeds a clip's packets (PyAV demux of an FLV) to HlsWriter with a segment at
every keyframe 2 s on, timing only the write() calls (process CPU), best of
N runs, and separately the whole run with segment files and playlists.

    .venv/bin/python benchmarks/hls_writer.py CLIP.flv [--runs 5]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import av

from mediaserver.hls.segmenter import HlsWriter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("clip")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with av.open(args.clip) as src:
        video = src.streams.video[0].codec_context.extradata
        audio = src.streams.audio[0].codec_context.extradata
        packets = [(p.stream.type, int(p.dts), int(p.pts), p.is_keyframe, bytes(p)) for p in src.demux() if p.size]
    kinds = {"video": [0, 0.0], "audio": [0, 0.0]}
    best_write = best_all = float("inf")
    for _ in range(args.runs):
        spent = {"video": 0.0, "audio": 0.0}
        with tempfile.TemporaryDirectory() as tmp:
            clock = time.process_time
            begin = clock()
            writer = HlsWriter(Path(tmp), playlist_size=6, segment_target=2.0)
            writer.set_codec("video", video)
            writer.set_codec("audio", audio)
            seq, start = 0, packets[0][1]
            writer.start_segment(seq, False)
            for kind, dts, pts, key, data in packets:
                if kind == "video" and key and dts - start >= 2000:
                    writer.end_segment(seq, dts - start)
                    seq, start = seq + 1, dts
                    writer.start_segment(seq, False)
                t0 = clock()
                writer.write(kind, dts, pts, key, data)
                spent[kind] += clock() - t0
            writer.end_segment(seq, 1000)
            writer.end_stream()
            total = clock() - begin
        write = spent["video"] + spent["audio"]
        if write < best_write:
            best_write = write
            for k in kinds:
                kinds[k] = [sum(1 for p in packets if p[0] == k), spent[k]]
        best_all = min(best_all, total)
    n = len(packets)
    print(f"{n} packets, {sum(len(p[4]) for p in packets) / 1e6:.1f} MB")
    print(f"write() alone: {best_write * 1e6 / n:.2f} µs/packet "
          f"(video {kinds['video'][1] * 1e6 / max(kinds['video'][0], 1):.2f}, "
          f"audio {kinds['audio'][1] * 1e6 / max(kinds['audio'][0], 1):.2f}); best of {args.runs}")
    print(f"whole run incl. segment files and playlists: {best_all * 1e6 / n:.2f} µs/packet")


if __name__ == "__main__":
    main()
