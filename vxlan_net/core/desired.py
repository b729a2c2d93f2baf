"""The overlay's kernel entries: their types, and the desired set computed from leases."""

from __future__ import annotations

import dataclasses
from ipaddress import IPv4Address, IPv4Network
from typing import TYPE_CHECKING, Iterable, Optional

if TYPE_CHECKING:
    from vxlan_net.core.lease import Lease


@dataclasses.dataclass(frozen=True, order=True)
class Neighbour:
    """`ip neigh`: the remote VTEP's overlay address resolves to its MAC."""

    ip: IPv4Address
    mac: str


@dataclasses.dataclass(frozen=True, order=True)
class FdbEntry:
    """`bridge fdb`: frames for the remote VTEP's MAC go to its public IP."""

    mac: str
    dst: IPv4Address


@dataclasses.dataclass(frozen=True, order=True)
class Route:
    """`ip route`: the remote pod subnet is reached via its VTEP, onlink."""

    subnet: IPv4Network
    gateway: IPv4Address


ROUTE_PROTOCOL_NAMES = {2: "kernel", 3: "boot", 4: "static", 11: "zebra", 12: "bird", 16: "dhcp",
                        18: "keepalived", 42: "babel", 186: "bgp", 187: "isis", 188: "ospf", 189: "rip"}
"""iproute2's names (/etc/iproute2/rt_protos) of the routing protocols a node commonly carries."""
RT_SCOPE_LINK = 253


@dataclasses.dataclass(frozen=True, order=True)
class MainRoute:
    """Any IPv4 route of the main table, whoever installed it: what conflict and underlay checks read."""

    dst: IPv4Network
    gateway: Optional[IPv4Address]
    device: Optional[str]
    protocol: int
    scope: int = 0
    metric: int = 0

    def __str__(self) -> str:
        """In `ip route` syntax, so `ip route del <this>` deletes exactly this route."""
        words = [str(self.dst)]
        if self.gateway is not None:
            words += ["via", str(self.gateway)]
        if self.device:
            words += ["dev", self.device]
        words += ["proto", ROUTE_PROTOCOL_NAMES.get(self.protocol, str(self.protocol))]
        if self.scope == RT_SCOPE_LINK:
            words += ["scope", "link"]
        if self.metric:
            words += ["metric", str(self.metric)]
        return " ".join(words)


@dataclasses.dataclass(frozen=True)
class OverlayEntries:
    """A full set of overlay entries on one VXLAN device: desired or actual."""

    neighbours: frozenset[Neighbour] = frozenset()
    fdb: frozenset[FdbEntry] = frozenset()
    routes: frozenset[Route] = frozenset()

    def __len__(self) -> int:
        return len(self.neighbours) + len(self.fdb) + len(self.routes)


def desired_entries(peers: Iterable[Lease]) -> OverlayEntries:
    """Three entries per remote lease: a permanent neighbour (its gateway -> its VtepMAC), an FDB entry
    (its VtepMAC -> its PublicIP) and an onlink route (its subnet via its gateway)."""
    neighbours, fdb, routes = set(), set(), set()
    for lease in peers:
        gateway = lease.subnet.network_address
        neighbours.add(Neighbour(gateway, lease.vtep_mac))
        fdb.add(FdbEntry(lease.vtep_mac, lease.public_ip))
        routes.add(Route(lease.subnet, gateway))
    return OverlayEntries(frozenset(neighbours), frozenset(fdb), frozenset(routes))
