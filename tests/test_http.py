"""The HTTP side: health, HLS headers, 404s and path traversal.

One server and one live stream (ffmpeg looping a clip) serve the whole module.
"""

from __future__ import annotations

import subprocess
import urllib.parse
import uuid
from pathlib import Path

import m3u8
import pytest

import media
from conftest import DEFAULT_CONFIG, ServerProcess, free_ports, merge
from media import SMALL, http_get, wait_for_playlist

NAME = "httpcam"


@pytest.fixture(scope="module")
def live(tmp_path_factory, clips):
    """(server, secret) with stream NAME live for the whole module."""
    workdir = tmp_path_factory.mktemp("http")
    rtmp, http, admin = free_ports(3)
    config = merge(
        DEFAULT_CONFIG,
        {
            "data_dir": str(workdir / "data"),
            "rtmp": {"port": rtmp},
            "http": {"port": http},
            "admin": {"port": admin},
        },
    )
    server = ServerProcess(workdir / "server", config)
    server.start()
    secret = f"SECRET-{uuid.uuid4()}"
    # Files a traversal would reach: next to the data dir, in it, in hls/, in
    # another stream's directory, and the config file itself.
    data = Path(config["data_dir"])
    for path in (workdir / "secret.txt", data / "secret.txt", data / "hls" / "secret.txt",
                 data / "hls" / "secret.ts", data / "secret.m3u8"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secret)
    with open(server.config_path, "a") as f:
        f.write(f"# {secret}\n")
    # The stream stays live for the whole module: ffmpeg loops the clip.
    with open(workdir / "ffmpeg.log", "wb") as log:
        proc = subprocess.Popen(
            [media.FFMPEG, "-hide_banner", "-nostdin", "-v", "warning", "-re", "-stream_loop", "-1",
             "-i", str(clips.path(SMALL)), "-c", "copy", "-f", "flv", server.rtmp_url(NAME)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
        )
    try:
        wait_for_playlist(server.hls_url(NAME), 15, lambda t: "#EXTINF" in t)
        yield server, secret
    finally:
        proc.kill()
        proc.wait()
        server.kill()
        print(server.log_tail(100))


def test_healthz(live):
    server, _ = live
    r = http_get(server.http_url("/healthz"))
    assert r.status == 200


def test_playlist_headers(live):
    server, _ = live
    r = http_get(server.hls_url(NAME))
    assert r.status == 200
    assert r.header("content-type").split(";")[0].strip() == "application/vnd.apple.mpegurl", r.headers
    assert "no-cache" in (r.header("cache-control") or ""), r.headers
    assert r.header("access-control-allow-origin") == "*", r.headers
    playlist = m3u8.loads(r.body.decode())
    assert playlist.segments


def test_segment_headers_and_body(live):
    server, _ = live
    text = http_get(server.hls_url(NAME)).body.decode()
    playlist = m3u8.loads(text)
    uri = playlist.segments[0].uri
    r = http_get(urllib.parse.urljoin(server.hls_url(NAME), uri))
    assert r.status == 200, (uri, r.status)
    assert r.header("content-type").split(";")[0].strip() == "video/mp2t", r.headers
    assert r.header("access-control-allow-origin") == "*", r.headers
    assert len(r.body) % 188 == 0 and r.body[:1] == b"\x47", "segment is not MPEG-TS"
    media.ffprobe_check(r.body, uri)


@pytest.mark.parametrize(
    "path",
    [
        "/live/nosuchstream/index.m3u8",
        "/live/nosuchstream/seg0.ts",
        f"/live/{NAME}/nosuchsegment.ts",
        f"/live/{NAME}/index.m3u9",
        "/live/",
        "/live",
        "/nosuchapp/x/index.m3u8",
        "/static/nosuch.js",
        "/static/../config.py",
    ],
)
def test_unknown_paths_404(live, path):
    server, _ = live
    r = http_get(server.http_url(path))
    assert r.status == 404, f"GET {path} -> {r.status}: {r.body[:200]!r}"


TRAVERSALS = [
    f"/live/{NAME}/../secret.txt",
    f"/live/{NAME}/../secret.ts",
    f"/live/{NAME}/../../secret.txt",
    f"/live/{NAME}/../../../secret.txt",
    f"/live/{NAME}/../../../server/config.toml",
    "/live/../secret.txt",
    "/live/../../secret.txt",
    "/live/..%2fsecret.txt",
    "/live/%2e%2e/secret.txt",
    "/live/%2E%2E/%2E%2E/secret.txt",
    f"/live/{NAME}/%2e%2e/secret.txt",
    f"/live/{NAME}/%2e%2e/secret.ts",
    f"/live/{NAME}/%2e%2e%2fsecret.ts",
    f"/live/{NAME}/..%2f..%2fsecret.txt",
    f"/live/{NAME}/%2e%2e%2f%2e%2e%2f%2e%2e%2fsecret.txt",
    f"/live/{NAME}/..%5csecret.ts",
    f"/live/{NAME}/%2fetc%2fpasswd",
    f"/live/{NAME}//etc/passwd",
    f"/live/{NAME}/%252e%252e/secret.ts",
    "/live/%2fetc/passwd",
    "/live/..%00/secret.txt",
    f"/live/{NAME}/secret.ts%00.ts",
    "//etc/passwd",
    "/live/" + "%2e%2e/" * 12 + "etc/passwd",
    "/live/.././secret.m3u8",
    "/live/./secret.ts",
    "/live/./index.m3u8",
    "/live/secret.ts/index.m3u8",
    "/live/.../secret.txt",
]


@pytest.mark.parametrize("path", TRAVERSALS)
def test_traversal_never_leaves_the_stream_dir(live, path):
    server, secret = live
    r = http_get(server.http_url("/"), raw_path=path)
    assert r.status in (400, 403, 404), f"GET {path} -> {r.status}: {r.body[:200]!r}"
    assert secret.encode() not in r.body
    assert b"root:" not in r.body


def test_absolute_uri_request_target(live):
    """An absolute-form request target (proxy style) must not reach the disk either."""
    server, secret = live
    for target in ("http://127.0.0.1/etc/passwd", "file:///etc/passwd", "/etc/passwd"):
        r = http_get(server.http_url("/"), raw_path=target)
        assert r.status in (400, 403, 404), f"GET {target} -> {r.status}"
        assert b"root:" not in r.body and secret.encode() not in r.body


def test_server_survives_the_probing(live):
    server, _ = live
    assert server.alive()
    assert http_get(server.http_url("/healthz")).status == 200
    assert http_get(server.hls_url(NAME)).status == 200
