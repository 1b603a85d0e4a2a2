"""Where a WHIP peer connection listens: chosen host addresses and a UDP port range.

aioice binds one ephemeral UDP port on every non-loopback address of the
machine. A server behind a firewall needs a known range, and tests need
loopback only: for a peer connection whose gathering must be restricted, the
ICE connection's `gather_candidates` is replaced by one that binds each
configured address to a free port of the range and adds it as a host
candidate, as aioice itself does (aioice is pinned with aiortc).
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import socket
from typing import Any

from aioice import ice as aioice
from aioice.candidate import Candidate, candidate_foundation, candidate_priority


class NoFreePort(Exception):
    """Every port of the configured range is taken."""


async def bind_in_range(
    loop: asyncio.AbstractEventLoop, factory: Any, address: str, port_min: int, port_max: int
) -> tuple[asyncio.DatagramTransport, Any]:
    if port_min == 0:
        return await loop.create_datagram_endpoint(factory, local_addr=(address, 0))
    ports = list(range(port_min, port_max + 1))
    random.shuffle(ports)
    for port in ports:
        try:
            return await loop.create_datagram_endpoint(factory, local_addr=(address, port))
        except OSError:
            continue
    raise NoFreePort(f"no free UDP port in {port_min}-{port_max} on {address}")


def add_host_candidate(connection: Any, protocol: aioice.StunProtocol, host: str, port: int) -> None:
    """Give `protocol` its host candidate and add both to the aioice connection, as aioice's own gathering does."""
    protocol.local_candidate = Candidate(
        foundation=candidate_foundation("host", "udp", host),
        component=1,
        transport="udp",
        priority=candidate_priority(1, "host"),
        host=host,
        port=port,
        type="host",
    )
    connection._protocols.append(protocol)
    connection._local_candidates.append(protocol.local_candidate)


def restrict_gathering(connection: Any, addresses: list[str], port_min: int, port_max: int) -> None:
    """Make aioice `connection` gather host candidates on `addresses` within the port range only."""

    async def gather_candidates() -> None:
        if connection._local_candidates_start:
            return
        connection._local_candidates_start = True
        loop = asyncio.get_running_loop()
        hosts = addresses or aioice.get_host_addresses(use_ipv4=True, use_ipv6=True)
        for address in hosts:
            transport, protocol = await bind_in_range(
                loop, lambda: aioice.StunProtocol(connection), address, port_min, port_max
            )
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024 * 1024)
            host, port = transport.get_extra_info("sockname")[:2]
            add_host_candidate(connection, protocol, host, port)
        connection._local_candidates_end = True

    connection.gather_candidates = gather_candidates


def ice_connections(pc: Any) -> list[Any]:
    """The aioice connections of a peer connection's transports (one when bundled)."""
    seen: dict[int, Any] = {}
    for transceiver in pc.getTransceivers():
        connection = transceiver.receiver.transport.transport.iceGatherer._connection
        seen[id(connection)] = connection
    return list(seen.values())


def remote_address_filter(client: str, networks: list[str]) -> Any:
    """A predicate on remote candidate addresses: the POST's client address, or inside `networks`."""
    allowed = [ipaddress.ip_network(n, strict=False) for n in networks]
    try:
        own = _plain(ipaddress.ip_address(client))
    except ValueError:
        own = None  # no usable client address (e.g. a Unix socket): only `networks`

    def allow(host: str) -> bool:
        try:
            address = _plain(ipaddress.ip_address(host))
        except ValueError:
            return False
        return address == own or any(address in network for network in allowed)

    return allow


def _plain(address: Any) -> Any:
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped or address


def confine_remote_candidates(connection: Any, allow: Any, on_ignored: Any) -> None:
    """Make aioice `connection` keep only remote candidates whose address `allow`s.

    An offer names any addresses it likes; aioice sends connectivity checks
    to each one (5 packets over 12 s), so a crafted offer turns the server
    into a STUN packet source aimed at a third party. Candidates elsewhere are
    dropped after resolution (mDNS names too). End-of-candidates is not
    passed on: a publisher behind a NAT whose candidates were all dropped is
    still reached through the peer-reflexive candidate its own checks create
    (they come from the address it POSTed from), and one that never checks is
    ended by the WHIP connect deadline rather than by an ICE failure at once.
    """
    add_resolved = connection._add_remote_candidate
    add = connection.add_remote_candidate

    def add_remote_candidate_resolved(candidate: Candidate, network_host: str) -> None:
        if not allow(network_host):
            on_ignored(network_host)
            return
        add_resolved(candidate, network_host)

    async def add_remote_candidate(candidate: Candidate | None) -> None:
        if candidate is None:
            return
        await add(candidate)

    connection._add_remote_candidate = add_remote_candidate_resolved
    connection.add_remote_candidate = add_remote_candidate
