"""The overlay's kernel entries: their types, and the desired set computed from leases."""

from __future__ import annotations

import dataclasses
from ipaddress import IPv4Address, IPv4Network
from typing import TYPE_CHECKING, Callable, Iterable, Optional

from vxlan_net.core.families import IPAddress, IPNetwork

if TYPE_CHECKING:
    from vxlan_net.core.lease import Lease


@dataclasses.dataclass(frozen=True, order=True)
class Neighbour:
    """`ip neigh`: the remote VTEP's overlay address (IPv4 or IPv6: the pod family) resolves to its MAC."""

    ip: IPAddress
    mac: str


@dataclasses.dataclass(frozen=True, order=True)
class FdbEntry:
    """`bridge fdb`: frames for the remote VTEP's MAC go to its public IP (the family of the VTEP's underlay)."""

    mac: str
    dst: IPAddress


@dataclasses.dataclass(frozen=True, order=True)
class Route:
    """`ip route`: the remote pod subnet is reached via its VTEP, onlink (a tunnel route on the VTEP), or
    via its PublicIP on the underlay device (a direct route)."""

    subnet: IPNetwork
    gateway: IPAddress


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
    """A full set of overlay entries: desired or actual. The tunnel entries live on the VXLAN device;
    direct routes on the underlay device, a class of their own (as felix keeps them) so that a peer
    changing mode is diffed in both and leaves nothing behind."""

    neighbours: frozenset[Neighbour] = frozenset()
    fdb: frozenset[FdbEntry] = frozenset()
    routes: frozenset[Route] = frozenset()
    direct_routes: frozenset[Route] = frozenset()

    def __len__(self) -> int:
        return len(self.neighbours) + len(self.fdb) + len(self.routes) + len(self.direct_routes)


def desired_entries(peers: Iterable[Lease],
                    is_direct: Optional[Callable[[IPv4Address], bool]] = None) -> OverlayEntries:
    """Three entries per tunnelled lease: a permanent neighbour (its gateway -> its VtepMAC), an FDB entry
    (its VtepMAC -> its PublicIP) and an onlink route (its subnet via its gateway). One per direct lease
    (`is_direct(PublicIP)`): a route of its subnet via its PublicIP, and nothing on the VXLAN device."""
    neighbours, fdb, routes, direct = set(), set(), set(), set()
    for lease in peers:
        if is_direct is not None and is_direct(lease.public_ip):
            direct.add(Route(lease.subnet, lease.public_ip))
            continue
        gateway = lease.subnet.network_address
        neighbours.add(Neighbour(gateway, lease.vtep_mac))
        fdb.add(FdbEntry(lease.vtep_mac, lease.public_ip))
        routes.add(Route(lease.subnet, gateway))
    return OverlayEntries(frozenset(neighbours), frozenset(fdb), frozenset(routes), frozenset(direct))
