"""GET /metrics: Prometheus text, checked against a real publish's counts."""

from __future__ import annotations

import time

from prometheus_client.parser import text_string_to_metric_families

from media import SMALL, http_get, read_hls, wait_for_endlist, wait_proc


def scrape(server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = http_get(server.http_url("/metrics"))
    assert response.status == 200
    assert response.header("Content-Type").startswith("text/plain; version=0.0.4")
    values = {}
    for family in text_string_to_metric_families(response.body.decode()):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def test_metrics_match_a_published_stream(server, clips, ffmpeg_publisher):
    clip = clips.get(SMALL)
    proc = ffmpeg_publisher(clips.path(SMALL), server.rtmp_url("m"))
    time.sleep(3.5)
    live = scrape(server)
    assert live[("mediaserver_sessions", (("version", "1.0.0"),))] == 1
    assert live[("mediaserver_connections", ())] == 1
    fps = live[("mediaserver_stream_fps", (("stream", "m"),))]
    assert abs(fps - SMALL.fps) < 3, fps
    assert live[("mediaserver_stream_bitrate_bps", (("stream", "m"),))] > 0
    assert live[("mediaserver_stream_publish_seconds", (("stream", "m"),))] > 2
    assert wait_proc(proc, 60) == 0
    wait_for_endlist(server.hls_url("m"), 10)
    done = scrape(server)
    video = sum(1 for p in clip.packets if p.kind == "video")
    audio = sum(1 for p in clip.packets if p.kind == "audio")
    for track, count in (("video", video), ("audio", audio)):
        labels = (("stream", "m"), ("track", track))
        assert done[("mediaserver_stream_frames_in_total", labels)] == count
        assert done[("mediaserver_stream_frames_out_total", labels)] == count
    segments = len(read_hls(server.hls_url("m"), probe=False).segments)
    assert done[("mediaserver_stream_segments_total", (("stream", "m"),))] == segments
    assert done[("mediaserver_stream_received_bytes_total", (("stream", "m"),))] > sum(len(p.data) for p in clip.packets)
    assert done[("mediaserver_session_restarts_total", ())] == 0
    assert ("mediaserver_sessions", (("version", "1.0.0"),)) not in done
    assert done[("mediaserver_event_loop_lag_seconds_count", ())] > 5
