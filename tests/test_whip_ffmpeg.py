"""WHIP ingest with FFmpeg's own WHIP muxer (PyAV 18 bundles FFmpeg 8.1) as the publisher.

FFmpeg makes its DTLS certificate with GnuTLS on the P-224 curve, which
aiortc's OpenSSL 4 refuses in either DTLS role; the server does those
handshakes with GnuTLS (mediaserver/transport/dtls_compat.py). The first tests
show both halves of that in memory; the others publish the flash/beep clip of
test_whip.py through `av.open(URL, "w", format="whip")` in a subprocess, in
both DTLS roles, and compare the HLS output with the file:

- video: every H.264 access unit in order, byte for byte. As in test_whip.py
  the compared NAL units leave out AUD, SEI, SPS and PPS (the server keeps
  parameter sets in the stream's config and the HLS writer puts them back in
  front of keyframes); the SPS/PPS written are checked to be the file's own.
- audio: the Opus packets arrive as AAC covering the same 8 s, in sync with
  video (a white flash and a beep at every whole second);
- every segment probes clean, and the playlist ends (FFmpeg sends DELETE when
  the muxer is closed).

    python tests/test_whip_ffmpeg.py URL FILE [--dtls-active]   # the publisher
"""

from __future__ import annotations

import json
import sys
import time

import av

# -- the publisher (a subprocess: the muxer blocks in C) ------------------------


def publish_main(url: str, clip: str, dtls_active: bool) -> None:
    """Mux the clip's H.264 and Opus packets, as they are, paced in real time; print what was sent (JSON).

    FFmpeg's log (the SDP offer and answer, the DTLS steps) goes to stderr.
    """
    av.logging.restore_default_callback()
    av.logging.set_libav_level(av.logging.VERBOSE)
    options = {"whip_flags": "dtls_active"} if dtls_active else {}
    sent = {"video": 0, "audio": 0}
    with av.open(clip) as source:
        inputs = [source.streams.video[0], source.streams.audio[0]]
        out = av.open(url, mode="w", format="whip", options=options)
        try:
            streams = {s.index: out.add_stream_from_template(s) for s in inputs}
            start = first = 0.0
            for packet in source.demux(*inputs):
                if packet.dts is None or not packet.size:
                    continue
                at = float(packet.pts * packet.time_base)
                if start:
                    delay = start + (at - first) - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                kind = packet.stream.type
                packet.stream = streams[packet.stream.index]
                out.mux(packet)  # the first one connects: POST, ICE, DTLS
                sent[kind] += 1
                if not start:
                    start, first = time.monotonic(), at
        finally:
            out.close()  # DELETE
    print(json.dumps(sent), flush=True)


if __name__ == "__main__":
    # Before the test imports below: the publisher needs PyAV only.
    publish_main(sys.argv[1], sys.argv[2], "--dtls-active" in sys.argv[3:])
    sys.exit(0)

import datetime
import io
import subprocess
from pathlib import Path

import numpy as np
import pytest
from aiortc.rtcdtlstransport import SRTP_PROFILES, RTCCertificate
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from media import demux_segment, split_annexb, wait_for_endlist
from OpenSSL import SSL
from OpenSSL._util import lib as openssl_lib
from test_whip import assert_beeps_on_flashes, file_video_payloads, flash_clip, hls_frames, whip_url  # noqa: F401 (flash_clip: the fixture)

from mediaserver.transport import dtls_compat

PUBLISH_TIMEOUT = 90.0


def ffmpeg_publish(url: str, clip: Path, dtls_active: bool) -> tuple[dict, str]:
    args = [sys.executable, __file__, url, str(clip)] + (["--dtls-active"] if dtls_active else [])
    proc = subprocess.run(args, check=False, capture_output=True, text=True, timeout=PUBLISH_TIMEOUT)
    assert proc.returncode == 0, f"FFmpeg WHIP publisher failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def setup_lines(log: str, block: str) -> list[str]:
    """The a=setup lines of the SDP offer or answer in FFmpeg's log."""
    text = log[log.index(f"{block}: v=0"):]
    if "\n\n" in text:
        text = text[: text.index("\n\n")]
    return sorted({line.strip() for line in text.splitlines() if line.startswith("a=setup:")})


# -- the root cause and the GnuTLS handshake, in memory -----------------------


def certificate(curve: ec.EllipticCurve) -> RTCCertificate:
    """An aiortc certificate on `curve` (FFmpeg's GnuTLS makes P-224 ones)."""
    key = ec.generate_private_key(curve)
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "lavf")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return RTCCertificate(key, cert)


def gnutls_connection(cert: RTCCertificate, server: bool) -> dtls_compat.GnuTlsConnection:
    connection = dtls_compat.GnuTlsConnection(dtls_compat.GnuTlsContext(cert))
    connection.set_accept_state() if server else connection.set_connect_state()
    return connection


def openssl_connection(cert: RTCCertificate, server: bool) -> SSL.Connection:
    """Exactly what aiortc's RTCDtlsTransport makes."""
    connection = SSL.Connection(cert._create_ssl_context(srtp_profiles=SRTP_PROFILES))
    connection.set_accept_state() if server else connection.set_connect_state()
    return connection


def handshake(a, b, rounds: int = 20) -> None:
    """Run two DTLS endpoints against each other, moving datagrams by hand."""
    done = {id(a): False, id(b): False}
    for _ in range(rounds):
        for me, peer in ((a, b), (b, a)):
            if not done[id(me)]:
                try:
                    me.do_handshake()
                    done[id(me)] = True
                except SSL.WantReadError:
                    pass
            while True:
                try:
                    datagram = me.bio_read(1500)
                except SSL.WantReadError:
                    break
                peer.bio_write(datagram)
        if all(done.values()):
            # The server's last flight may still be queued for the client.
            for me, peer in ((a, b), (b, a)):
                try:
                    peer.bio_write(me.bio_read(1500))
                    peer.recv(1500)
                except SSL.WantReadError:
                    pass
            return
    raise AssertionError("DTLS handshake did not finish")


@pytest.mark.parametrize("openssl_is_server", [True, False], ids=["openssl-server", "openssl-client"])
def test_openssl_refuses_a_p224_peer_in_either_role(openssl_is_server):
    """The root cause: aiortc's own DTLS (OpenSSL 4) against a GnuTLS peer whose certificate is on P-224."""
    ours = openssl_connection(RTCCertificate.generateCertificate(), server=openssl_is_server)
    ffmpeg_like = gnutls_connection(certificate(ec.SECP224R1()), server=not openssl_is_server)
    with pytest.raises(SSL.Error) as failure:
        handshake(ours, ffmpeg_like)
    assert "wrong curve" in str(failure.value)
    # ...and no OpenSSL setting brings the curve back.
    context = SSL.Context(SSL.DTLS_METHOD)
    assert openssl_lib.SSL_CTX_set1_curves_list(context._context, b"P-224") == 0
    assert openssl_lib.SSL_CTX_set1_curves_list(context._context, b"P-256") == 1


@pytest.mark.parametrize("we_are_server", [True, False], ids=["gnutls-server", "gnutls-client"])
def test_gnutls_connection_completes_with_a_p224_peer(we_are_server):
    ours_cert, theirs_cert = RTCCertificate.generateCertificate(), certificate(ec.SECP224R1())
    ours = gnutls_connection(ours_cert, server=we_are_server)
    theirs = gnutls_connection(theirs_cert, server=not we_are_server)
    handshake(ours, theirs)
    # What aiortc does next: the peer's certificate (fingerprint check), the SRTP profile, the keys.
    assert ours.get_peer_certificate(as_cryptography=True) == theirs_cert._cert
    assert theirs.get_peer_certificate(as_cryptography=True) == ours_cert._cert
    assert ours.get_selected_srtp_profile() == theirs.get_selected_srtp_profile() == b"SRTP_AES128_CM_SHA1_80"
    keys = ours.export_keying_material(b"EXTRACTOR-dtls_srtp", 60)
    assert len(keys) == 60 and keys == theirs.export_keying_material(b"EXTRACTOR-dtls_srtp", 60)
    assert ours.DTLSv1_get_timeout() is None
    # close_notify reaches the other side as the end of the connection.
    theirs.shutdown()
    ours.bio_write(theirs.bio_read(1500))
    with pytest.raises(SSL.ZeroReturnError):
        ours.recv(1500)


def test_only_ffmpeg_offers_get_gnutls():
    ffmpeg = "v=0\r\no=FFmpeg 4489045141692799359 2 IN IP4 127.0.0.1\r\ns=FFmpegPublishSession\r\nt=0 0\r\n"
    chromium = "v=0\r\no=- 4611731400430051336 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"
    assert dtls_compat.needs_gnutls(ffmpeg)
    assert not dtls_compat.needs_gnutls(chromium)
    assert dtls_compat.available()


# -- FFmpeg's WHIP muxer end to end -------------------------------------------


@pytest.mark.parametrize("dtls_active", [False, True], ids=["ffmpeg-dtls-passive", "ffmpeg-dtls-active"])
def test_ffmpeg_whip_muxer_h264_byte_identical_and_audio_in_sync(server, flash_clip, dtls_active):
    name = "ffactive" if dtls_active else "ffpassive"
    sent, log = ffmpeg_publish(whip_url(server, name), flash_clip, dtls_active)

    # The DTLS roles were the ones asked for, and the handshake was GnuTLS's on our side.
    ffmpeg_role, our_role = ("active", "passive") if dtls_active else ("passive", "active")
    assert setup_lines(log, "offer") == [f"a=setup:{ffmpeg_role}"]
    assert setup_lines(log, "answer") == [f"a=setup:{our_role}"]
    assert "DTLS handshake is done" in log and "SRTP setup done" in log
    assert server.log_lines(f"WHIP publish started.*stream={name}.*dtls=gnutls")
    assert server.wait_for_log(f"WHIP publish ended.*stream={name}.*publisher sent DELETE", 10)
    wait_for_endlist(server.hls_url(name), 10)
    out, video, audio = hls_frames(server.hls_url(name))  # every segment probed clean by ffprobe
    assert out.endlist

    # Every access unit, in order, byte for byte, on a continuous 30 fps timeline.
    expected = file_video_payloads(flash_clip)
    assert sent["video"] == len(expected) == 240
    assert [f.payload for f in video] == expected
    steps = np.diff([f.dts for f in video])
    assert steps.min() >= 2900 and steps.max() <= 3100, sorted(set(steps.tolist()))
    parameter_sets = [
        [n for n in split_annexb(first_video_packet(source)) if n[0] & 0x1F in (7, 8)]
        for source in (str(flash_clip), io.BytesIO(out.segments[0].data))
    ]
    assert parameter_sets[0] and parameter_sets[1] == parameter_sets[0]

    # Audio: AAC from the first segment on, covering the 8 s of Opus sent, in sync with video.
    params: dict = {}
    demux_segment(out.segments[0].data, params=params)
    assert params["video"] == ("h264", 320, 240)
    assert params["audio"][0] == "aac"
    assert sent["audio"] == file_audio_packets(flash_clip) == 401
    assert 372 <= len(audio) <= 377, len(audio)
    assert audio[0].dts - video[0].dts <= 1920, "audio missing at the start"
    audio_steps = np.diff([f.dts for f in audio])
    assert audio_steps.min() >= 1800 and audio_steps.max() <= 2000
    assert_beeps_on_flashes(b"".join(s.data for s in out.segments), flash_clip)
    server.assert_no_tracebacks()


def first_video_packet(source) -> bytes:
    with av.open(source, format="mpegts") as container:
        return bytes(next(p for p in container.demux(container.streams.video[0]) if p.size))


def file_audio_packets(path: Path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for p in container.demux(container.streams.audio[0]) if p.size)
