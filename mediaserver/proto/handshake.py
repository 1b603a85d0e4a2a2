"""The RTMP handshake: plain (C1 version zero) and the FP9 digest form.

Clients that put a non-zero version in C1 (librtmp, OBS, Flash) sign C1 with
an HMAC-SHA256 digest and verify the server's S1/S2 digests in turn. The keys
below are the public constants of that scheme.
"""

from __future__ import annotations

import hashlib
import hmac
import os

SIZE = 1536
VERSION = 3
DIGEST_SIZE = 32
_FP_KEY = b"Genuine Adobe Flash Player 001"
_FMS_KEY = b"Genuine Adobe Flash Media Server 001"
_KEY_TAIL = bytes.fromhex(
    "f0eec24a8068bee82e00d0d1029e7e576eec5d2d29806fab93b8e636cfeb31ae"
)
SERVER_VERSION = b"\x04\x05\x00\x01"
CLIENT_VERSION = b"\x0a\x00\x2d\x02"


def _digest_offset(packet: bytes, scheme: int) -> int:
    """Where the 32-byte digest sits in a C1/S1, for scheme 0 or 1."""
    base = 772 if scheme == 0 else 8
    return sum(packet[base : base + 4]) % 728 + base + 4


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def _sign_at(packet: bytearray, offset: int, key: bytes) -> bytes:
    digest = _hmac(key, bytes(packet[:offset] + packet[offset + DIGEST_SIZE :]))
    packet[offset : offset + DIGEST_SIZE] = digest
    return digest


def find_client_digest(c1: bytes) -> tuple[int, bytes] | None:
    """(scheme, digest) when C1 carries a valid Flash Player digest, else None."""
    for scheme in (1, 0):
        offset = _digest_offset(c1, scheme)
        expected = _hmac(_FP_KEY, c1[:offset] + c1[offset + DIGEST_SIZE :])
        if hmac.compare_digest(expected, c1[offset : offset + DIGEST_SIZE]):
            return scheme, expected
    return None


def server_reply(c1: bytes, now_ms: int = 0) -> bytes:
    """S0 + S1 + S2 for the client's C1."""
    s1 = bytearray(now_ms.to_bytes(4, "big") + b"\x00\x00\x00\x00" + os.urandom(SIZE - 8))
    found = find_client_digest(c1) if c1[4:8] != b"\x00\x00\x00\x00" else None
    if found is None:
        return bytes((VERSION,)) + bytes(s1) + c1  # plain: S2 echoes C1
    scheme, client_digest = found
    s1[4:8] = SERVER_VERSION
    _sign_at(s1, _digest_offset(bytes(s1), scheme), _FMS_KEY)
    s2 = bytearray(os.urandom(SIZE))
    key = _hmac(_FMS_KEY + _KEY_TAIL, client_digest)
    s2[-DIGEST_SIZE:] = _hmac(key, bytes(s2[:-DIGEST_SIZE]))
    return bytes((VERSION,)) + bytes(s1) + bytes(s2)


def client_hello(digest: bool = False) -> tuple[bytes, bytes | None]:
    """C0 + C1, and the client's digest when it signs C1 (as librtmp does)."""
    c1 = bytearray(b"\x00\x00\x00\x00" + b"\x00\x00\x00\x00" + os.urandom(SIZE - 8))
    if not digest:
        return bytes((VERSION,)) + bytes(c1), None
    c1[4:8] = CLIENT_VERSION
    signed = _sign_at(c1, _digest_offset(bytes(c1), 1), _FP_KEY)
    return bytes((VERSION,)) + bytes(c1), signed


def verify_server(s1: bytes, s2: bytes, client_digest: bytes) -> bool:
    """Whether S1 and S2 carry valid server digests, as librtmp checks them."""
    s1_ok = False
    for scheme in (1, 0):
        offset = _digest_offset(s1, scheme)
        expected = _hmac(_FMS_KEY, s1[:offset] + s1[offset + DIGEST_SIZE :])
        if hmac.compare_digest(expected, s1[offset : offset + DIGEST_SIZE]):
            s1_ok = True
            break
    key = _hmac(_FMS_KEY + _KEY_TAIL, client_digest)
    s2_ok = hmac.compare_digest(_hmac(key, s2[:-DIGEST_SIZE]), s2[-DIGEST_SIZE:])
    return s1_ok and s2_ok
