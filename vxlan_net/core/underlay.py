"""What this node's underlay occupies: the networks its own subnet must not overlap (pure)."""

from __future__ import annotations

import dataclasses
import ipaddress
from collections import defaultdict
from typing import Iterable, Mapping, Optional

from vxlan_net.core.config import NetworkConfig
from vxlan_net.core.desired import RT_SCOPE_LINK, MainRoute
from vxlan_net.core.families import IPAddress, IPInterface, IPNetwork
from vxlan_net.core.names import vtep_names


@dataclasses.dataclass(frozen=True)
class NodeAddress:
    """An address (either family) on one of the node's devices (from kernel.node_addresses)."""

    device: str
    kind: Optional[str]
    """The device's link kind ("vxlan", "bridge", ...); None for a physical device."""
    interface: IPInterface


def families_read(config: NetworkConfig, ipv6_underlay: bool) -> tuple[int, ...]:
    """The address families whose addresses and routes a node's agent reads (and status and doctor with it):
    IPv6's too when the network has IPv6 or the node has a VTEP over an IPv6 underlay."""
    return (4, 6) if config.ipv6 is not None or ipv6_underlay else (4,)


def is_pod_gateway(config: NetworkConfig, interface: IPInterface) -> bool:
    """The address the CNI plugin gives its bridge: the first host of a SubnetLen subnet of the network
    (of the address's family)."""
    space, net = config.space(interface.version), interface.network
    return (space is not None and net.prefixlen == space.subnet_len and net.subnet_of(space.network)
            and interface.ip == net.network_address + 1)


def is_vtep_address(config: NetworkConfig, interface: IPInterface) -> bool:
    """The address the agent gives its VTEP: a SubnetLen subnet's network address, /32 or /128."""
    space = config.space(interface.version)
    return (space is not None and interface.network.prefixlen == interface.max_prefixlen
            and interface.ip in space.network and int(interface.ip) % space.step == 0)


_OWN_KINDS = {"bridge": is_pod_gateway, "vxlan": is_vtep_address}


def _own_devices(addresses: Iterable[NodeAddress], config: NetworkConfig, vtep: "str | Iterable[str]") -> set[str]:
    """Our VTEP and the pod bridges: what they hold lies inside our own (or a former) subnet by design.

    A bridge (or VXLAN device, e.g. the VTEP of a former VNI) counts as ours only when
    every address on it is one we would give it, so an underlay bridge (br0 enslaving
    eth0) is never mistaken for a pod bridge."""
    held: dict[str, list[IPInterface]] = defaultdict(list)
    kinds: dict[str, str] = {}
    for a in addresses:
        if a.kind in _OWN_KINDS:
            held[a.device].append(a.interface)
            kinds[a.device] = a.kind
    vteps = {vtep} if isinstance(vtep, str) else set(vtep)
    return vteps | {name for name, interfaces in held.items()
                     if all(_OWN_KINDS[kinds[name]](config, i) for i in interfaces)}


@dataclasses.dataclass(frozen=True)
class Underlay:
    """What this node's underlay holds, from one reading: its addresses and main-table routes (of the
    families read, see families_read) and the etcd endpoints, our own devices (VTEPs, pod bridges) left
    out. Two views of it: the networks our own subnet must not overlap, the addresses a peer subnet must
    never capture."""

    addresses: tuple[NodeAddress, ...]
    routes: tuple[MainRoute, ...]
    etcd_endpoints: Mapping[IPAddress, str]

    def networks(self) -> dict[IPNetwork, str]:
        """{network: what it is} of the node's addresses (with their prefix), its connected (link-scope)
        routes, the gateways of its routes and the etcd endpoints (for choosing our subnet).

        A gatewayed route's destination is not claimed: a route such as 10.0.0.0/8 via a
        router only says where the node sends traffic, and the overlay's more specific
        routes win over it. A link-scope default route (PPP) claims nothing."""
        claims = {ipaddress.ip_network(address): f"etcd endpoint {url}"
                  for address, url in self.etcd_endpoints.items()}
        for a in self.addresses:
            claims.setdefault(a.interface.network, f"address {a.interface} on {a.device}")
        for r in self.routes:
            if r.gateway is not None:
                claims.setdefault(ipaddress.ip_network(r.gateway), f"gateway {r.gateway} of route {r}")
            elif r.scope == RT_SCOPE_LINK and r.dst.prefixlen:
                claims.setdefault(r.dst, f"connected route {r}")
        return claims

    def protected(self) -> dict[IPAddress, str]:
        """What a peer subnet must never capture, each with what it is (for LeaseBook.set_protected):
        the etcd endpoints, the node's addresses and the gateways of its routes."""
        protected = {address: f"etcd endpoint {url}" for address, url in self.etcd_endpoints.items()}
        protected.update((r.gateway, "this node's gateway") for r in self.routes if r.gateway)
        protected.update((a.interface.ip, f"this node's address on {a.device}") for a in self.addresses)
        return protected


def node_underlay(config: NetworkConfig, addresses: Iterable[NodeAddress], routes: Iterable[MainRoute],
                  etcd_endpoints: Mapping[IPAddress, str] = {},
                  vteps: "str | Iterable[str] | None" = None) -> Underlay:
    """The node's underlay from what the kernel door read (node_addresses, main_table_routes) and the
    store's endpoint_addresses. `vteps`: our VTEP names, by default both of the config's VNI."""
    addresses = list(addresses)
    own = _own_devices(addresses, config, vtep_names(config.vni) if vteps is None else vteps)
    return Underlay(tuple(a for a in addresses if a.device not in own),
                    tuple(r for r in routes if r.device not in own), etcd_endpoints)
