"""The overlay's kernel entries: their types, and the desired set computed from leases."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable, Collection, Iterable, Optional

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
    """Any route of the main table (either family), whoever installed it: what conflict and underlay checks read."""

    dst: IPNetwork
    gateway: Optional[IPAddress]
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
                    is_direct: Optional[Callable[[IPAddress], bool]] = None) -> OverlayEntries:
    """An IPv4 node over an IPv4 underlay: the entries of its one VTEP (see desired_by_vtep)."""
    return desired_by_vtep(peers, own_underlays=(4,), own_families=(4,), is_direct=is_direct).get(4, OverlayEntries())


def tunnel_underlay(peer: Lease, pod_family: int, own_underlays: Collection[int]) -> Optional[int]:
    """The underlay family whose VTEP carries pod traffic of `pod_family` to `peer`: the same family
    when both ends have that underlay, else the other one both have (a VXLAN tunnel carries Ethernet,
    so either family rides either underlay); None when they share no underlay family."""
    shared = set(own_underlays) & peer.underlays
    if pod_family in shared:
        return pod_family
    return next(iter(shared), None)


def desired_by_vtep(peers: Iterable[Lease], own_underlays: Collection[int], own_families: Collection[int],
                    is_direct: Optional[Callable[[IPAddress], bool]] = None) -> dict[int, OverlayEntries]:
    """{underlay family: the entries of the VTEP over it}, for a node with VTEPs over `own_underlays` and
    pod subnets of `own_families`.

    Per peer and pod family both ends have, three entries on the VTEP tunnel_underlay chooses: a
    permanent neighbour (the peer subnet's network address -> the peer VTEP's MAC), an FDB entry
    (that MAC -> the peer's public address of the VTEP's family) and an onlink route (the subnet via
    that network address). A peer whose public address of the pod family is direct
    (`is_direct`) gets instead one route, the subnet via that address; direct routes are listed with
    the first VTEP's entries (they live on the underlay device, read and written beside that VTEP's).
    """
    underlays = sorted(set(own_underlays))
    sets = {u: (set(), set(), set()) for u in underlays}
    direct: set[Route] = set()
    for lease in peers:
        for family in own_families:
            subnet = lease.subnet_of(family)
            if subnet is None:
                continue
            endpoint = lease.endpoint(family)
            if is_direct is not None and endpoint is not None and is_direct(endpoint[0]):
                direct.add(Route(subnet, endpoint[0]))
                continue
            underlay = tunnel_underlay(lease, family, underlays)
            if underlay is None:
                continue
            address, mac = lease.endpoint(underlay)  # type: ignore[misc]
            neighbours, fdb, routes = sets[underlay]
            gateway = subnet.network_address
            neighbours.add(Neighbour(gateway, mac))
            fdb.add(FdbEntry(mac, address))
            routes.add(Route(subnet, gateway))
    return {u: OverlayEntries(frozenset(n), frozenset(f), frozenset(r),
                              frozenset(direct) if u == underlays[0] else frozenset())
            for u, (n, f, r) in sets.items()}
