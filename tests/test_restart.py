"""A server restarted on the same data directory continues every playlist."""

from __future__ import annotations

import time

from media import SMALL, check_playlist_text, http_get, wait_for_endlist, wait_proc


def test_playlists_continue_across_a_restart_and_a_crash(server, clips, ffmpeg_publisher):
    assert wait_proc(ffmpeg_publisher(clips.path(SMALL), server.rtmp_url("r")), 60) == 0
    first = check_playlist_text(wait_for_endlist(server.hls_url("r"), 10))
    last_seq = first.media_sequence + len(first.segments) - 1
    assert server.stop() == 0

    # Killed while live: the restart ends the orphaned playlist.
    server.start()
    proc = ffmpeg_publisher(clips.path(SMALL), server.rtmp_url("r"))
    server.wait_for_log("publish started.*stream=r")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        live = check_playlist_text(http_get(server.hls_url("r")).body.decode())
        if live.media_sequence + len(live.segments) - 1 > last_seq:
            break
        time.sleep(0.2)
    server.kill()
    wait_proc(proc, 30)
    crashed = check_playlist_text((server.hls_dir("r") / "index.m3u8").read_text())
    assert not crashed.is_endlist
    crashed_last = crashed.media_sequence + len(crashed.segments) - 1
    assert crashed_last > last_seq

    server.start()
    recovered = check_playlist_text(http_get(server.hls_url("r")).body.decode())
    assert recovered.is_endlist
    assert recovered.media_sequence + len(recovered.segments) - 1 == crashed_last

    # Republish after the restart: the sequence goes on, after a discontinuity.
    assert wait_proc(ffmpeg_publisher(clips.path(SMALL), server.rtmp_url("r")), 60) == 0
    final_text = wait_for_endlist(server.hls_url("r"), 10)
    final = check_playlist_text(final_text)
    new = [s for i, s in enumerate(final.segments) if final.media_sequence + i > crashed_last]
    assert new and new[0].discontinuity, final_text
    assert final.media_sequence >= recovered.media_sequence
