"""Which peers this node reaches without a gateway (flannel's DirectRouting test, pure)."""

from __future__ import annotations

import dataclasses
from typing import Iterable, Optional

from vxlan_net.core.desired import MainRoute
from vxlan_net.core.families import IPAddress
from vxlan_net.core.names import ROUTE_PROTO


@dataclasses.dataclass(frozen=True)
class DirectReach:
    """The node's main-table routes reduced to what decides a peer's mode: a longest-prefix match.

    A peer is direct when the best route to its PublicIP (longest prefix, then lowest
    metric, as the kernel's lookup) has no gateway and leaves through the underlay
    device: the kernel would put its packets straight on our segment. flannel asks the
    kernel (RouteGet) once per peer; one dump per pass and a dictionary walk of at most
    33 prefix lengths per peer costs far less at 5,000 peers. Our own routes (protocol
    ROUTE_PROTO: pod subnets) never decide: a PublicIP never lies in the pod network.
    """

    underlay: str
    best: frozenset[tuple[int, int, int, bool]]
    """(family, prefix length, network as int, direct) of each destination's best route."""
    _tables: tuple[tuple[int, int, dict[int, bool]], ...] = dataclasses.field(compare=False, repr=False, hash=False)
    """(family, netmask as int, {network: direct}) per family and prefix length, longest first."""

    @classmethod
    def from_routes(cls, routes: Iterable[MainRoute], underlay: str) -> "DirectReach":
        chosen: dict[tuple[int, int, int], MainRoute] = {}
        for route in routes:
            if route.protocol == ROUTE_PROTO:
                continue
            key = (route.dst.version, route.dst.prefixlen, int(route.dst.network_address))
            if key not in chosen or route.metric < chosen[key].metric:
                chosen[key] = route
        best = frozenset((family, length, net, r.gateway is None and r.device == underlay)
                         for (family, length, net), r in chosen.items())
        by_len: dict[tuple[int, int], dict[int, bool]] = {}
        for family, length, net, direct in best:
            by_len.setdefault((family, length), {})[net] = direct
        tables = []
        for family, length in sorted(by_len, key=lambda k: (k[0], -k[1])):
            bits = 32 if family == 4 else 128
            tables.append((family, ((1 << bits) - 1) ^ ((1 << (bits - length)) - 1), by_len[(family, length)]))
        return cls(underlay, best, tuple(tables))

    def is_direct(self, address: IPAddress) -> bool:
        value, version = int(address), address.version
        for family, mask, table in self._tables:
            if family != version:
                continue
            found = table.get(value & mask)
            if found is not None:
                return found
        return False  # no route at all: the kernel could not send it either way


DIRECT, TUNNELLED = "direct", "tunnelled"


def mode_of(reach: Optional[DirectReach], public_ip: IPAddress) -> str:
    """How this node reaches a peer at `public_ip`: DIRECT or TUNNELLED (always, with direct routing off)."""
    return DIRECT if reach is not None and reach.is_direct(public_ip) else TUNNELLED
