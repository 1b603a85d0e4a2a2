"""The status page in headless Chromium (Debian's), with a live stream.

A screenshot must show the stream's thumbnail and audio levels; when this
Chromium can play H.264 through MSE, the hls.js preview must play >= 3 s.
The admin listener's page shows the code version and generations.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time

import pytest
from playwright import sync_api

from media import SMALL, http_get

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",
]
LONG = dataclasses.replace(SMALL, duration=20.0, width=320, height=180)


def db_to_pct(db: float) -> float:
    return max(0.0, min(100.0, (db + 60) / 60 * 100))


def test_status_page_shows_thumbnail_levels_and_plays(server_factory, clips, ffmpeg_publisher, tmp_path):
    server = server_factory(previews={"thumbnail_interval": 1.0, "levels_interval": 1.0})
    ffmpeg_publisher(clips.path(LONG), server.rtmp_url("cam"))
    deadline = time.monotonic() + 15
    status = {}
    while time.monotonic() < deadline:
        response = http_get(server.http_url("/live/cam/status.json"))
        if response.status == 200:
            status = json.loads(response.body)
            if status["levels"] and status["thumbnail"] and status["segments"] >= 2:
                break
        time.sleep(0.3)
    assert status.get("levels"), status

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 800, "height": 600})
            page.goto(server.http_url("/"))
            card = '.card[data-stream="cam"]'
            page.wait_for_function(
                f"() => {{ const i = document.querySelector('{card} img.thumbnail');"
                " return i && i.complete && i.naturalWidth > 0; }", timeout=15000
            )
            page.wait_for_selector(f"{card} .meter", timeout=10000)
            assert page.eval_on_selector(f"{card} img.thumbnail", "i => i.naturalWidth") == 320
            assert float(page.get_attribute(card, "data-bitrate")) > 10_000
            assert abs(float(page.get_attribute(card, "data-fps")) - LONG.fps) < 3
            assert page.text_content(f"{card} .protocol") == "RTMP"
            meters = page.query_selector_all(f"{card} .meter")
            assert len(meters) == len(status["levels"])
            for meter in meters:
                rms = float(meter.get_attribute("data-rms-db"))
                width = meter.eval_on_selector(".rms", "e => parseFloat(e.style.width)")
                assert width == pytest.approx(db_to_pct(rms), abs=0.5)
                assert -60 < rms < 0
            shot = tmp_path / "status.png"
            page.screenshot(path=str(shot))
            assert shot.stat().st_size > 10_000

            h264 = page.evaluate(
                "() => window.MediaSource && MediaSource.isTypeSupported('video/mp4; codecs=\"avc1.42E01E,mp4a.40.2\"')"
            )
            if h264:
                page.wait_for_function(
                    f"() => parseFloat(document.querySelector('{card} video').getAttribute('data-current-time')) >= 3",
                    timeout=20000,
                )
                print("preview: this Chromium plays H.264 via MSE; hls.js played >= 3 s")
            else:
                print("preview: this Chromium cannot play H.264 via MSE; playback not checked")

            admin = browser.new_page()
            admin.goto(f"http://127.0.0.1:{server.admin_port}/")
            admin.fill("#token", (server.data_dir / "admin.token").read_text().strip())
            admin.click("#token-form button")
            admin.wait_for_selector("#version", timeout=10000)
            assert admin.inner_text("#version") == "code version 1.0.0"
            assert "current" in admin.inner_text("#generations")
            assert "cam" in admin.inner_text("#sessions")
            admin.screenshot(path=str(tmp_path / "admin.png"))
        finally:
            browser.close()
