"""DTLS with GnuTLS for publishers whose certificate aiortc's OpenSSL refuses.

Why: FFmpeg's WHIP muxer (libavformat/whip.c) makes its DTLS certificate
itself. Built with GnuTLS, as PyAV's wheels and Debian's ffmpeg are,
tls_gnutls.c generates the key with
`gnutls_sec_param_to_pk_bits(GNUTLS_PK_ECDSA, GNUTLS_SEC_PARAM_MEDIUM)`, that
is an ECDSA key on secp224r1 (P-224). aiortc does DTLS with pyOpenSSL on the
OpenSSL that `cryptography` bundles, 4.0 here, and OpenSSL 4.0 no longer has
the curves RFC 8422 deprecated (P-224 among them) as TLS groups. In DTLS 1.2
OpenSSL checks the curve of the peer's ECDSA key against its own groups when
it verifies the peer's signature (tls12_check_peer_sigalg ->
tls1_check_group_id), so it ends every handshake with FFmpeg with a fatal
illegal_parameter alert: as the DTLS client on FFmpeg's ServerKeyExchange,
as the server on its CertificateVerify (a server also requires the curve to be
in the peer's supported_groups, which GnuTLS's default priorities leave P-224
out of, so no OpenSSL version could be the server here). FFmpeg reports "A TLS
fatal alert has been received". No OpenSSL setting brings the curve back
(`SSL_CTX_set1_groups_list` refuses "P-224"), so for such a peer the handshake
is done by GnuTLS instead:
the library FFmpeg itself uses, loaded from PyAV's wheel (or the system).

How: a peer connection chosen by `use_gnutls` gets, on each of its DTLS
transports, a certificate object whose "SSL context" is a `GnuTlsContext`;
aiortc's `rtcdtlstransport.SSL` is wrapped so that `SSL.Connection` of such a
context is a `GnuTlsConnection`, which offers the few pyOpenSSL calls
RTCDtlsTransport makes (memory BIO in and out, handshake, DTLS timer, peer
certificate, SRTP profile, keying material). Everything else stays aiortc's:
the same certificate and so the same fingerprints in the answer, the role from
the SDP `setup` attribute, fingerprint verification of the peer, SRTP. Other
connections keep OpenSSL; aiortc is pinned to 1.16 (pyproject.toml) because
this reaches into it.
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import errno
import glob
import os
import weakref
from typing import Any

from aiortc import rtcdtlstransport
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL

GNUTLS_SERVER = 1
GNUTLS_CLIENT = 1 << 1
GNUTLS_DATAGRAM = 1 << 2
GNUTLS_NONBLOCK = 1 << 3
GNUTLS_CRD_CERTIFICATE = 1
GNUTLS_X509_FMT_PEM = 1
GNUTLS_CERT_REQUIRE = 2
GNUTLS_SHUT_WR = 1
GNUTLS_E_AGAIN = -28
GNUTLS_E_INTERRUPTED = -52
GNUTLS_E_FATAL_ALERT_RECEIVED = -12
GNUTLS_SRTP_AES128_CM_HMAC_SHA1_80 = 1
# aiortc's names for the SRTP profiles GnuTLS can negotiate (the mandatory one, RFC 8827).
SRTP_PROFILES = {GNUTLS_SRTP_AES128_CM_HMAC_SHA1_80: b"SRTP_AES128_CM_SHA1_80"}
MTU = 1200

_PUSH = ctypes.CFUNCTYPE(ctypes.c_ssize_t, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
_PULL = ctypes.CFUNCTYPE(ctypes.c_ssize_t, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
_PULL_TIMEOUT = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_uint)


class _Datum(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("size", ctypes.c_uint)]


def _library_paths() -> list[str]:
    """PyAV's own GnuTLS first (the build its FFmpeg uses), then the system's."""
    paths = []
    try:
        import av

        paths += sorted(glob.glob(os.path.join(os.path.dirname(av.__file__), os.pardir, "av.libs", "libgnutls*.so*")))
    except ImportError:
        pass
    found = ctypes.util.find_library("gnutls")
    if found:
        paths.append(found)
    return paths + ["libgnutls.so.30"]


def _load() -> Any:
    errors = []
    for path in _library_paths():
        try:
            lib = ctypes.CDLL(path)
            _declare(lib)
        except (OSError, AttributeError) as exc:  # not there, or too old (no DTLS-SRTP, no RFC 5705 export)
            errors.append(f"{path}: {exc}")
            continue
        return lib
    raise OSError("GnuTLS is not available: " + "; ".join(errors))


def _declare(lib: Any) -> None:
    p, i, u, s = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint, ctypes.c_size_t
    signatures: dict[str, tuple[Any, list[Any]]] = {
        "gnutls_init": (i, [ctypes.POINTER(p), u]),
        "gnutls_deinit": (None, [p]),
        "gnutls_certificate_allocate_credentials": (i, [ctypes.POINTER(p)]),
        "gnutls_certificate_free_credentials": (None, [p]),
        "gnutls_certificate_set_x509_key_mem": (i, [p, ctypes.POINTER(_Datum), ctypes.POINTER(_Datum), i]),
        "gnutls_certificate_server_set_request": (None, [p, i]),
        "gnutls_certificate_get_peers": (ctypes.POINTER(_Datum), [p, ctypes.POINTER(u)]),
        "gnutls_credentials_set": (i, [p, i, p]),
        "gnutls_set_default_priority": (i, [p]),
        "gnutls_srtp_set_profile": (i, [p, i]),
        "gnutls_srtp_get_selected_profile": (i, [p, ctypes.POINTER(i)]),
        "gnutls_prf_rfc5705": (i, [p, s, ctypes.c_char_p, s, ctypes.c_char_p, s, ctypes.c_char_p]),
        "gnutls_transport_set_push_function": (None, [p, _PUSH]),
        "gnutls_transport_set_pull_function": (None, [p, _PULL]),
        "gnutls_transport_set_pull_timeout_function": (None, [p, _PULL_TIMEOUT]),
        "gnutls_transport_set_errno": (None, [p, i]),
        "gnutls_dtls_set_mtu": (None, [p, u]),
        "gnutls_dtls_get_timeout": (u, [p]),
        "gnutls_handshake": (i, [p]),
        "gnutls_error_is_fatal": (i, [i]),
        "gnutls_strerror": (ctypes.c_char_p, [i]),
        "gnutls_alert_get": (i, [p]),
        "gnutls_alert_get_name": (ctypes.c_char_p, [i]),
        "gnutls_record_recv": (ctypes.c_ssize_t, [p, p, s]),
        "gnutls_record_send": (ctypes.c_ssize_t, [p, ctypes.c_char_p, s]),
        "gnutls_bye": (i, [p, i]),
    }
    for name, (restype, argtypes) in signatures.items():
        function = getattr(lib, name)
        function.restype = restype
        function.argtypes = argtypes


_lib: Any = None


def gnutls() -> Any:
    global _lib
    if _lib is None:
        _lib = _load()
    return _lib


class GnuTlsContext:
    """What `SSL.Connection` is given for a GnuTLS transport: our certificate and key, PEM."""

    def __init__(self, certificate: rtcdtlstransport.RTCCertificate) -> None:
        self.cert_pem = certificate._cert.public_bytes(serialization.Encoding.PEM)
        self.key_pem = certificate._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        )


class GnuTlsCertificate(rtcdtlstransport.RTCCertificate):
    """aiortc's certificate (same key, same fingerprints) whose DTLS is done by GnuTLS."""

    def _create_ssl_context(self, srtp_profiles: list[Any]) -> Any:  # type: ignore[override]
        return GnuTlsContext(self)


class GnuTlsConnection:
    """The part of pyOpenSSL's `SSL.Connection` that aiortc's RTCDtlsTransport uses, on GnuTLS.

    Datagrams go in with `bio_write` and come out with `bio_read`, as with
    OpenSSL's memory BIOs; GnuTLS runs non-blocking over two queues.
    """

    def __init__(self, context: GnuTlsContext) -> None:
        self._lib = gnutls()
        self._context = context
        self._server: bool | None = None
        self._session = ctypes.c_void_p()
        self._credentials = ctypes.c_void_p()
        self._incoming: collections.deque[bytes] = collections.deque()
        self._outgoing: collections.deque[bytes] = collections.deque()
        self._received = False
        self._done = False
        self._error: str | None = None
        # The callbacks hold a weak reference: the session must not keep the connection alive.
        ref = weakref.ref(self)
        self._callbacks = (
            _PUSH(lambda _, data, size: _push(ref, data, size)),
            _PULL(lambda _, buf, size: _pull(ref, buf, size)),
            _PULL_TIMEOUT(lambda _, ms: _pending(ref)),
        )

    # -- set up

    def set_accept_state(self) -> None:
        self._server = True

    def set_connect_state(self) -> None:
        self._server = False

    def _open(self) -> None:
        lib, session = self._lib, self._session
        flags = (GNUTLS_SERVER if self._server else GNUTLS_CLIENT) | GNUTLS_DATAGRAM | GNUTLS_NONBLOCK
        self._check(lib.gnutls_init(ctypes.byref(session), flags), "gnutls_init")
        self._check(lib.gnutls_certificate_allocate_credentials(ctypes.byref(self._credentials)), "credentials")
        cert = ctypes.create_string_buffer(self._context.cert_pem, len(self._context.cert_pem))
        key = ctypes.create_string_buffer(self._context.key_pem, len(self._context.key_pem))
        self._check(
            lib.gnutls_certificate_set_x509_key_mem(
                self._credentials,
                ctypes.byref(_Datum(ctypes.cast(cert, ctypes.c_void_p), len(self._context.cert_pem))),
                ctypes.byref(_Datum(ctypes.cast(key, ctypes.c_void_p), len(self._context.key_pem))),
                GNUTLS_X509_FMT_PEM,
            ),
            "certificate",
        )
        self._check(lib.gnutls_credentials_set(session, GNUTLS_CRD_CERTIFICATE, self._credentials), "credentials")
        self._check(lib.gnutls_set_default_priority(session), "priority")
        self._check(lib.gnutls_srtp_set_profile(session, GNUTLS_SRTP_AES128_CM_HMAC_SHA1_80), "use_srtp")
        if self._server:
            # The peer's certificate is what the SDP fingerprint authenticates: it is required.
            lib.gnutls_certificate_server_set_request(session, GNUTLS_CERT_REQUIRE)
        lib.gnutls_dtls_set_mtu(session, MTU)
        lib.gnutls_transport_set_push_function(session, self._callbacks[0])
        lib.gnutls_transport_set_pull_function(session, self._callbacks[1])
        lib.gnutls_transport_set_pull_timeout_function(session, self._callbacks[2])

    def _check(self, ret: int, what: str) -> None:
        if ret < 0:
            raise SSL.Error(f"GnuTLS {what}: {self._lib.gnutls_strerror(ret).decode()}")

    def __del__(self) -> None:
        if getattr(self, "_session", None):
            self._lib.gnutls_deinit(self._session)
            self._session = ctypes.c_void_p()
        if getattr(self, "_credentials", None):
            self._lib.gnutls_certificate_free_credentials(self._credentials)
            self._credentials = ctypes.c_void_p()

    # -- handshake

    def do_handshake(self) -> None:
        if not self._session:
            self._open()
        if self._error is not None:
            raise SSL.Error(self._error)
        if self._done:
            return
        ret = self._lib.gnutls_handshake(self._session)
        if ret == 0:
            self._done = True
            return
        if self._lib.gnutls_error_is_fatal(ret):
            self._error = self._describe(ret)
            raise SSL.Error(self._error)
        raise SSL.WantReadError()

    def _describe(self, ret: int) -> str:
        reason = self._lib.gnutls_strerror(ret).decode()
        if ret == GNUTLS_E_FATAL_ALERT_RECEIVED:
            name = self._lib.gnutls_alert_get_name(self._lib.gnutls_alert_get(self._session))
            reason += f" ({(name or b'?').decode()})"
        return "GnuTLS DTLS handshake failed: " + reason

    def DTLSv1_get_timeout(self) -> float | None:
        """Seconds until the flight in progress is sent again; None while nothing is awaited."""
        if self._done or not self._session or self._error is not None:
            return None
        if self._server and not self._received:
            return None  # a server waits for the ClientHello as long as it takes
        return max(self._lib.gnutls_dtls_get_timeout(self._session), 1) / 1000

    def DTLSv1_handle_timeout(self) -> bool:
        """Send the last flight again (GnuTLS does when its timer ran out)."""
        if self._done or not self._session or self._error is not None:
            return False
        self._outgoing.clear()  # what was not sent yet is part of the flight sent again
        ret = self._lib.gnutls_handshake(self._session)
        if ret == 0:
            self._done = True
        elif self._lib.gnutls_error_is_fatal(ret):
            self._error = self._describe(ret)
        return True

    # -- datagrams

    def bio_write(self, data: bytes) -> int:
        self._incoming.append(bytes(data))
        self._received = True
        return len(data)

    def bio_read(self, size: int) -> bytes:
        """The next datagrams GnuTLS sent, whole records only, joined up to `size` bytes (at least one)."""
        if not self._outgoing:
            raise SSL.WantReadError()
        out = [self._outgoing.popleft()]
        total = len(out[0])
        while self._outgoing and total + len(self._outgoing[0]) <= size:
            total += len(self._outgoing[0])
            out.append(self._outgoing.popleft())
        return b"".join(out)

    def recv(self, size: int) -> bytes:
        # As SSL_read does, go on with the handshake first: aiortc hands the
        # datagrams it receives to recv() and then sends what came out, which
        # is how a server's last flight (ChangeCipherSpec, Finished) leaves.
        self.do_handshake()
        buf = ctypes.create_string_buffer(size)
        ret = self._lib.gnutls_record_recv(self._session, buf, size)
        if ret > 0:
            return buf.raw[:ret]
        if ret == 0:
            raise SSL.ZeroReturnError()
        if ret in (GNUTLS_E_AGAIN, GNUTLS_E_INTERRUPTED) or not self._lib.gnutls_error_is_fatal(ret):
            raise SSL.WantReadError()
        raise SSL.Error(self._lib.gnutls_strerror(ret).decode())

    def send(self, data: bytes) -> int:
        ret = self._lib.gnutls_record_send(self._session, bytes(data), len(data))
        if ret < 0:
            raise SSL.Error(self._lib.gnutls_strerror(ret).decode())
        return ret

    def shutdown(self) -> bool:
        if self._done and self._error is None:
            self._lib.gnutls_bye(self._session, GNUTLS_SHUT_WR)
        return True

    # -- after the handshake

    def get_peer_certificate(self, *, as_cryptography: bool = False) -> Any:
        size = ctypes.c_uint(0)
        chain = self._lib.gnutls_certificate_get_peers(self._session, ctypes.byref(size))
        if not chain or size.value == 0:
            return None
        certificate = x509.load_der_x509_certificate(ctypes.string_at(chain[0].data, chain[0].size))
        if as_cryptography:
            return certificate
        from OpenSSL import crypto

        return crypto.X509.from_cryptography(certificate)

    def get_selected_srtp_profile(self) -> bytes:
        profile = ctypes.c_int(0)
        if self._lib.gnutls_srtp_get_selected_profile(self._session, ctypes.byref(profile)) < 0:
            return b""
        return SRTP_PROFILES.get(profile.value, b"")

    def export_keying_material(self, label: bytes, olen: int, context: bytes | None = None) -> bytes:
        out = ctypes.create_string_buffer(olen)
        ret = self._lib.gnutls_prf_rfc5705(
            self._session, len(label), label, len(context or b""), context, olen, out
        )
        self._check(ret, "keying material export")
        return out.raw


def _push(ref: weakref.ref[GnuTlsConnection], data: int, size: int) -> int:
    connection = ref()
    if connection is None:
        return -1
    connection._outgoing.append(ctypes.string_at(data, size))
    return size


def _pull(ref: weakref.ref[GnuTlsConnection], buf: int, size: int) -> int:
    connection = ref()
    if connection is None or not connection._incoming:
        if connection is not None:
            connection._lib.gnutls_transport_set_errno(connection._session, errno.EAGAIN)
        return -1
    datagram = connection._incoming.popleft()
    n = min(len(datagram), size)
    ctypes.memmove(buf, datagram, n)
    return n


def _pending(ref: weakref.ref[GnuTlsConnection]) -> int:
    connection = ref()
    return 1 if connection is not None and connection._incoming else 0


class _SslWithGnuTls:
    """Stands for `OpenSSL.SSL` in aiortc.rtcdtlstransport: a GnuTLS context gets a GnuTLS connection."""

    def __getattr__(self, name: str) -> Any:
        return getattr(SSL, name)

    @staticmethod
    def Connection(context: Any, socket: Any = None) -> Any:
        if isinstance(context, GnuTlsContext):
            return GnuTlsConnection(context)
        return SSL.Connection(context, socket)


def install() -> None:
    """Let aiortc's DTLS transports be given GnuTLS contexts (once per process; OpenSSL otherwise unchanged)."""
    if not isinstance(rtcdtlstransport.SSL, _SslWithGnuTls):
        rtcdtlstransport.SSL = _SslWithGnuTls()  # type: ignore[assignment]


def available() -> bool:
    try:
        gnutls()
    except (OSError, AttributeError):
        return False
    return True


def needs_gnutls(offer: str) -> bool:
    """An offer from FFmpeg's WHIP muxer: `o=FFmpeg ...` and `s=FFmpegPublishSession` (libavformat/whip.c)."""
    lines = offer.splitlines()
    return any(line.startswith("o=FFmpeg ") for line in lines) or "s=FFmpegPublishSession" in lines


def use_gnutls(pc: Any) -> None:
    """Make `pc`'s DTLS transports do their handshake with GnuTLS (before the answer is applied)."""
    install()
    for transceiver in pc.getTransceivers():
        transport = transceiver.receiver.transport
        current = transport._RTCDtlsTransport__local_certificate
        if not isinstance(current, GnuTlsCertificate):
            transport._RTCDtlsTransport__local_certificate = GnuTlsCertificate(current._key, current._cert)
