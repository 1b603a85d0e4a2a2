"""The aiortc/aioice internals the WHIP server reaches into still exist.

aiortc and aioice are pinned (pyproject.toml), but a new release inside the
pin, or a bump of the pin, could rename a private attribute: the server would
then fail at the first publish, far from the cause. These checks name every
internal used (mediaserver/transport/webrtc_decoders.py, whip_server.py,
ice_ports.py, ice_mux.py) on real objects of the installed versions.
"""

from __future__ import annotations

import asyncio
import inspect

from aioice import ice as aioice
from aiortc import RTCPeerConnection, rtcrtpreceiver
from aiortc.jitterbuffer import JitterBuffer
from aiortc.rtcrtpreceiver import RTCRtpReceiver

from mediaserver.transport import ice_ports, webrtc_decoders


def test_receiver_thread_looks_up_the_decoder_in_its_module():
    # install() replaces this module attribute; the receive thread must call
    # it by that name, or the replacement would never be used.
    assert callable(rtcrtpreceiver.get_decoder)
    worker = inspect.getsource(rtcrtpreceiver.decoder_worker)
    assert "decoder = get_decoder(codec)" in worker


def test_receiver_private_attributes():
    async def check() -> None:
        pc = RTCPeerConnection()
        try:
            receiver = pc.addTransceiver("video", direction="recvonly").receiver
            assert isinstance(receiver, RTCRtpReceiver)
            for name in ("timestamp_mapper", "jitter_buffer", "decoder_queue", "decoder_thread", "codecs"):
                assert hasattr(receiver, "_RTCRtpReceiver__" + name), name
            assert hasattr(receiver._RTCRtpReceiver__timestamp_mapper, "_origin")
            assert callable(receiver._RTCRtpReceiver__timestamp_mapper.map)
            assert inspect.iscoroutinefunction(receiver._handle_rtcp_packet)
            connection = receiver.transport.transport.iceGatherer._connection
            assert isinstance(connection, aioice.Connection)
            assert ice_ports.ice_connections(pc) == [connection]
            for name in ("_local_candidates_start", "_local_candidates_end", "_protocols", "_local_candidates"):
                assert hasattr(connection, name), name
            assert inspect.iscoroutinefunction(connection.gather_candidates)
            # ice_ports.confine_remote_candidates: every remote candidate, mDNS
            # ones once resolved, goes through _add_remote_candidate(candidate, host).
            assert inspect.iscoroutinefunction(connection.add_remote_candidate)
            assert list(inspect.signature(connection._add_remote_candidate).parameters) == [
                "remote_candidate", "network_host",
            ]
            source = inspect.getsource(aioice.Connection.add_remote_candidate)
            assert source.count("self._add_remote_candidate(") == 2, "direct and mDNS-resolved paths"
            assert "self._remote_candidates_expected()" in inspect.getsource(aioice.Connection._check_periodic)
        finally:
            await pc.close()

    asyncio.run(check())


def test_jitter_buffer_internals_used_by_drain():
    buffer = JitterBuffer(capacity=16)
    for name in ("_origin", "_packets", "_prefetch", "capacity", "remove", "add"):
        assert hasattr(buffer, name), name
    assert buffer._origin is None and len(buffer._packets) == buffer.capacity == 16


def test_install_replaces_the_decoder_lookup():
    webrtc_decoders.install(webrtc_decoders.DecoderSettings())
    assert rtcrtpreceiver.get_decoder is webrtc_decoders.get_decoder

    class Codec:
        def __init__(self, mime: str) -> None:
            self.mimeType = mime
            self.clockRate = 90000 if mime.startswith("video") else 48000
            self.channels = None if mime.startswith("video") else 2
            self.parameters = {}

    assert isinstance(webrtc_decoders.get_decoder(Codec("video/H264")), webrtc_decoders.H264Passthrough)
    assert isinstance(webrtc_decoders.get_decoder(Codec("audio/opus")), webrtc_decoders.OpusToAacDecoder)
    assert isinstance(webrtc_decoders.get_decoder(Codec("video/VP8")), webrtc_decoders.Vp8ToH264Decoder)


def test_dtls_transport_internals_used_for_gnutls():
    """transport/dtls_compat.py swaps the transport's certificate for one whose
    SSL context is GnuTLS's, and wraps the module's `SSL` reference."""
    from aiortc import rtcdtlstransport

    source = "".join(inspect.getsource(rtcdtlstransport.RTCDtlsTransport).split())
    assert "self._ssl=SSL.Connection(self.__local_certificate._create_ssl_context(" in source
    assert hasattr(rtcdtlstransport, "SSL")

    async def check() -> None:
        pc = RTCPeerConnection()
        try:
            transport = pc.addTransceiver("video", direction="recvonly").receiver.transport
            certificate = transport._RTCDtlsTransport__local_certificate
            assert isinstance(certificate, rtcdtlstransport.RTCCertificate)
            assert certificate._cert is not None and certificate._key is not None
        finally:
            await pc.close()

    asyncio.run(check())
