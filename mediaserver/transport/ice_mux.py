"""Every WHIP peer connection on one UDP port (`webrtc.udp_port`).

A server behind a firewall or in a container is easier to run with a single
UDP port to open than with a range. aioice binds a socket per peer
connection; here one socket is bound once at start-up and each connection's
aioice `StunProtocol` gets a view of it (`MuxedTransport`). Incoming
datagrams are routed:

- STUN binding requests by the USERNAME attribute, whose first half is the
  ICE ufrag this server put in that connection's answer (RFC 8445 7.2.2);
  the sender's address is then remembered for that connection;
- everything else (DTLS, SRTP/SRTCP, STUN responses) by the sender's address,
  learnt from those requests and from what the connection itself sends.

A datagram from an address no connection knows is dropped and counted. This
is the same scheme MediaMTX's and Pion's single-port modes use.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

from aioice import ice as aioice
from aioice import stun

from .ice_ports import add_host_candidate

log = logging.getLogger("mediaserver.webrtc")

_STUN_COOKIE = b"\x21\x12\xa4\x42"


def _is_stun(data: bytes) -> bool:
    # RFC 7983: the first byte of STUN is 0..3; bytes 4..8 are the magic cookie.
    return len(data) >= 20 and data[0] < 4 and data[4:8] == _STUN_COOKIE


class MuxedTransport(asyncio.DatagramTransport):
    """One peer connection's view of the shared socket."""

    def __init__(self, mux: UdpMux, protocol: aioice.StunProtocol) -> None:
        super().__init__()
        self.mux = mux
        self.protocol = protocol
        self.closing = False

    def sendto(self, data: Any, addr: Any = None) -> None:
        if self.closing or self.mux.transport is None:
            return
        self.mux.learn(addr, self.protocol)
        self.mux.transport.sendto(data, addr)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "sockname":
            return self.mux.sockname
        return default  # no socket of its own: its options are the mux's

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        self.mux.forget(self.protocol)
        asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()


class UdpMux(asyncio.DatagramProtocol):
    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.transport: asyncio.DatagramTransport | None = None
        self.sockname: tuple[str, int] = (host, port)
        self.by_ufrag: dict[str, aioice.StunProtocol] = {}
        self.by_addr: dict[tuple[str, int], aioice.StunProtocol] = {}
        self.unrouted = 0

    async def open(self) -> None:
        # Bound here rather than by the loop: uvloop's error would not say why.
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            raise OSError(f"webrtc.udp_port: cannot bind UDP {self.host}:{self.port}: {exc.strerror or exc}") from exc
        # Every publisher's media arrives on this socket: a deeper queue than
        # one connection's socket needs, so a busy loop does not drop packets.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 1024 * 1024)
        sock.setblocking(False)
        transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(lambda: self, sock=sock)
        self.sockname = tuple(transport.get_extra_info("sockname")[:2])  # type: ignore[assignment]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None

    # -- routing -------------------------------------------------------------

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        addr = (addr[0], addr[1])
        protocol = None
        if _is_stun(data):
            protocol = self._by_username(data)
            if protocol is not None:
                self.learn(addr, protocol)
        if protocol is None:
            protocol = self.by_addr.get(addr)
        if protocol is None:
            self.unrouted += 1
            return
        protocol.datagram_received(data, addr)

    def _by_username(self, data: bytes) -> aioice.StunProtocol | None:
        try:
            message = stun.parse_message(data)
        except ValueError:
            return None
        username = message.attributes.get("USERNAME")
        if message.message_class != stun.Class.REQUEST or not isinstance(username, str):
            return None
        return self.by_ufrag.get(username.split(":", 1)[0])

    def learn(self, addr: tuple[str, int], protocol: aioice.StunProtocol) -> None:
        if self.by_addr.get(addr) is not protocol:
            self.by_addr[addr] = protocol

    def forget(self, protocol: aioice.StunProtocol) -> None:
        for ufrag in [u for u, p in self.by_ufrag.items() if p is protocol]:
            del self.by_ufrag[ufrag]
        for addr in [a for a, p in self.by_addr.items() if p is protocol]:
            del self.by_addr[addr]


def open_muxes(host_addresses: list[str], port: int) -> list[UdpMux]:
    """One shared socket per address peer connections are reachable on (each a host candidate)."""
    hosts = host_addresses or aioice.get_host_addresses(use_ipv4=True, use_ipv6=True)
    return [UdpMux(host, port) for host in hosts]


def attach(connection: Any, muxes: list[UdpMux]) -> None:
    """Make aioice `connection` gather on the shared sockets: one protocol and host candidate per mux."""

    async def gather_candidates() -> None:
        if connection._local_candidates_start:
            return
        connection._local_candidates_start = True
        for mux in muxes:
            protocol = aioice.StunProtocol(connection)
            protocol.connection_made(MuxedTransport(mux, protocol))
            mux.by_ufrag[connection.local_username] = protocol
            add_host_candidate(connection, protocol, *mux.sockname)
        connection._local_candidates_end = True

    connection.gather_candidates = gather_candidates
