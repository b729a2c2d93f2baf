"""`vxlan-net doctor`: a node's health as pure checks over gathered facts, one Finding each.

The checks (top half) take a NodeFacts and never do I/O, so every failure can be
tested on hand-made facts; gather_facts and run_probe (bottom half) read etcd,
the kernel, nftables and the underlay through the doors.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import threading
import time
from ipaddress import IPv4Interface, IPv4Network, IPv6Interface, IPv6Network, ip_address, ip_interface, ip_network
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, TypeVar, Union

from cni import subnet_file

from vxlan_net.core.config import NetworkConfig
from vxlan_net.core.desired import MainRoute, OverlayEntries, desired_by_vtep, tunnel_underlay
from vxlan_net.core.direct import DIRECT, DirectReach, mode_of
from vxlan_net.core.families import VXLAN_OVERHEAD_BY_UNDERLAY, IPAddress, IPInterface, IPNetwork
from vxlan_net.core.lease import Lease, trusted_peers
from vxlan_net.core.names import NFT_TABLE, ROUTE_PROTO, VTEP6_PREFIX, VTEP_PREFIX, vtep_name, vtep_names
from vxlan_net.tools.status import in_order, lease_mode


@dataclasses.dataclass(frozen=True)
class Finding:
    """One line of the verdict: what was checked, whether it holds, why, and what to do."""

    ok: bool
    item: str
    reason: str
    fix: str = ""


@dataclasses.dataclass(frozen=True)
class Unavailable:
    """A fact that could not be read, and why (etcd down, no such device, unreadable file)."""

    reason: str


T = TypeVar("T")
Fact = Union[T, Unavailable]
"""A fact as read: its value, or why it could not be read."""


@dataclasses.dataclass(frozen=True)
class VxlanAttrs:
    vni: int
    port: int
    local: Optional[IPAddress]
    """IPv4 on vxnet.<VNI>, IPv6 on vxnet6.<VNI>."""
    underlay: Optional[str]
    learning: bool


@dataclasses.dataclass(frozen=True)
class Link:
    """The parts of a network device the checks look at (from kernel.link_info)."""

    name: str
    kind: Optional[str]
    mtu: int
    mac: str
    up: bool
    addresses: tuple[IPInterface, ...] = ()
    """IPv4 ones first, then global IPv6 ones (link-local left out: the kernel's own)."""
    vxlan: Optional[VxlanAttrs] = None

    @classmethod
    def from_info(cls, info: Mapping[str, Any]) -> "Link":
        vx = info.get("vxlan")
        return cls(
            name=info["name"], kind=info.get("kind"), mtu=int(info.get("mtu") or 0),
            mac=(info.get("mac") or "").lower(), up=bool(info.get("up")),
            addresses=tuple(ip_interface(a) for a in (*info.get("addresses", ()), *info.get("ipv6_addresses", ()))),
            vxlan=VxlanAttrs(vni=vx["vni"], port=vx["port"],
                             local=ip_address(vx["local"]) if vx.get("local") else None,
                             underlay=vx.get("underlay"), learning=bool(vx.get("learning")))
            if vx else None,
        )


@dataclasses.dataclass(frozen=True)
class NodeFacts:
    """Everything doctor read about one node; each fact is its value or Unavailable(why)."""

    config: Fact[NetworkConfig]
    leases: Fact[Mapping[IPNetwork, Lease]]
    """By the subnet a lease is known by (its IPv4 one; on an IPv6-only network its IPv6 one)."""
    vtep_name: str
    vtep: Fact[Link]
    underlay: Fact[Link]
    entries: Fact[OverlayEntries]
    bridge: Fact[Link]
    subnet_file: Fact[str]
    """The subnet file's text."""
    nft: Fact[Mapping[str, Any]]
    """`nft -j list table ip vxlan-net`, parsed; Unavailable when the table is missing."""
    ip_forward: Fact[bool]
    invalid_leases: tuple[str, ...] = ()
    own_lease_ttl: Optional[int] = None
    state: Fact[Mapping[str, Any]] = Unavailable("not read")
    """`<state-dir>/node.json`."""
    subnet_file_path: str = "/run/vxlan-net/subnet.env"
    state_path: str = "/var/lib/vxlan-net/node.json"
    bridge_name: str = "cni0"
    etcd_endpoints: str = ""
    main_routes: Fact[tuple[MainRoute, ...]] = Unavailable("not read")
    """Every route of the main table (IPv4; IPv6 too with IPv6 in the config), whoever installed it (to name
    routes that block ours)."""
    node_addresses: Fact[frozenset[IPAddress]] = Unavailable("not read")
    """Every address on this node, both families (is the lease's PublicIP / PublicIPv6 still one of them?)."""
    vtep6_name: str = "vxnet6.1"
    vtep6: Fact[Link] = Unavailable("not read")
    """The VXLAN device over the IPv6 underlay, `vxnet6.<VNI>`."""
    entries6: Fact[OverlayEntries] = Unavailable("not read")
    """The entries on vtep6 (its tunnel entries; direct routes are read with the first VTEP's)."""
    underlay6: Optional[Fact[Link]] = None
    """The device vtep6 sits on; None: the same as `underlay`."""
    ip6_forward: Fact[bool] = Unavailable("not read")
    """net.ipv6.conf.all.forwarding."""
    nft6: Fact[Mapping[str, Any]] = Unavailable("not read")
    """`nft -j list table ip6 vxlan-net`, parsed."""
    ipv6_disabled: frozenset[str] = frozenset()
    """Those of our VTEPs and the bridge with net.ipv6.conf.<device>.disable_ipv6 = 1 (they refuse every IPv6
    address, neighbour and route)."""


def _missing(*facts: Any) -> Optional[str]:
    """The reason of the first Unavailable among `facts`, if any."""
    return next((f.reason for f in facts if isinstance(f, Unavailable)), None)


# --- derived facts ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SubnetFile:
    network: Optional[IPv4Network]
    """None on an IPv6-only network (no VXLAN_NET_NETWORK)."""
    gateway: Optional[IPv4Interface]
    mtu: int
    ip_masq: bool
    ipv6_network: Optional[IPv6Network] = None
    """VXLAN_NET_IPV6_NETWORK, when the file has it."""
    ipv6_gateway: Optional[IPv6Interface] = None
    """VXLAN_NET_IPV6_SUBNET: the IPv6 gateway with the subnet's prefix."""


_IPV6_TAG = 1 << 128
"""cni/config.py keeps an IPv6 address as an int tagged with this bit (the plugin is stdlib-only)."""


def _ipv6_of(tagged: Optional[int], prefix: Optional[int]) -> Optional[IPv6Interface]:
    if tagged is None or prefix is None:
        return None
    return IPv6Interface((tagged & (_IPV6_TAG - 1), prefix))


def parse_subnet_values(text: str) -> SubnetFile:
    """The subnet file's values, by the plugin's own rules (cni/subnet_file.py), or ValueError
    naming what is wrong. The IPv6 fields are read with getattr: a plugin without them reads none."""
    try:
        node = subnet_file.parse(text)
    except subnet_file.NotASubnetFile as exc:
        raise ValueError(f"not a vxlan-net subnet file ({exc})") from None
    network6 = _ipv6_of(getattr(node, "ipv6_network", None), getattr(node, "ipv6_network_prefix", None))
    return SubnetFile(
        IPv4Network((node.network, node.network_prefix)) if node.network is not None else None,
        IPv4Interface((node.gateway, node.prefix)) if node.gateway is not None else None, node.mtu, node.ipmasq,
        network6.network if network6 is not None else None,
        _ipv6_of(getattr(node, "ipv6_gateway", None), getattr(node, "ipv6_prefix", None)))


def subnet_file_values(facts: NodeFacts) -> Fact[SubnetFile]:
    if isinstance(facts.subnet_file, Unavailable):
        return facts.subnet_file
    try:
        return parse_subnet_values(facts.subnet_file)
    except ValueError as exc:
        return Unavailable(f"{facts.subnet_file_path} does not parse: {exc}")


def vtep_of(facts: NodeFacts, underlay_family: int) -> tuple[str, Fact[Link], Fact[OverlayEntries], Fact[Link]]:
    """(name, device, entries, underlay device) of this node's VTEP over that underlay family."""
    if underlay_family == 4:
        return facts.vtep_name, facts.vtep, facts.entries, facts.underlay
    return facts.vtep6_name, facts.vtep6, facts.entries6, facts.underlay if facts.underlay6 is None \
        else facts.underlay6


def _vtep_addresses(facts: NodeFacts) -> list[IPInterface]:
    return [a for family in (4, 6) if not isinstance(link := vtep_of(facts, family)[1], Unavailable)
            for a in link.addresses]


def _own_subnet_of(facts: NodeFacts, version: int) -> Optional[IPNetwork]:
    """Our subnet of one pod family, from the network address a VTEP holds, else from the subnet file."""
    config = facts.config
    if not isinstance(config, Unavailable):
        space = config.space(version)
        if space is None:
            return None
        for address in _vtep_addresses(facts):
            if address.ip.version == version and address.ip in space.network:
                return space.subnet_at(address.ip)
    values = subnet_file_values(facts)
    if not isinstance(values, Unavailable):
        gateway = values.gateway if version == 4 else values.ipv6_gateway
        return gateway.network if gateway is not None else None
    return None


def own_subnet(facts: NodeFacts) -> Fact[IPNetwork]:
    """Our subnet, the one our lease is known by (IPv4; on an IPv6-only network IPv6): the one whose
    network address a VTEP carries, else the subnet file's."""
    versions = (facts.config.primary.version,) if not isinstance(facts.config, Unavailable) else (4, 6)
    subnet = next((s for s in (_own_subnet_of(facts, v) for v in versions) if s is not None), None)
    if subnet is not None:
        return subnet
    return Unavailable(f"neither {facts.vtep_name}, {facts.vtep6_name} nor the subnet file names this node's subnet")


def own_lease(facts: NodeFacts) -> Fact[Lease]:
    subnet = own_subnet(facts)
    why = _missing(facts.leases, subnet)
    if why:
        return Unavailable(why)
    lease = facts.leases.get(subnet)
    return lease if lease is not None else Unavailable(f"no lease for {subnet} in etcd")


def own_subnets(facts: NodeFacts) -> list[IPNetwork]:
    """Our subnets, IPv4 first: the lease's, else those the VTEPs or the subnet file name."""
    lease = own_lease(facts)
    if not isinstance(lease, Unavailable):
        return list(lease.subnets)
    return [s for s in (_own_subnet_of(facts, v) for v in (4, 6)) if s is not None]


def own_underlays(facts: NodeFacts) -> tuple[int, ...]:
    """The underlay families this node has a VTEP over: those its lease has an endpoint on (PublicIP,
    PublicIPv6); without the lease, those whose device is here; else IPv4."""
    lease = own_lease(facts)
    if not isinstance(lease, Unavailable):
        return tuple(sorted(lease.underlays))
    return tuple(f for f in (4, 6) if not isinstance(vtep_of(facts, f)[1], Unavailable)) or (4,)


def pod_families(facts: NodeFacts) -> tuple[int, ...]:
    if isinstance(facts.config, Unavailable):
        return tuple(s.version for s in own_subnets(facts)) or (4,)
    return tuple(space.version for space in facts.config.spaces)


def expected_mtu(facts: NodeFacts, underlay_family: int = 4) -> Fact[int]:
    """The config's MTU, else the underlay's minus the VXLAN overhead over that underlay family."""
    if not isinstance(facts.config, Unavailable) and facts.config.mtu:
        return facts.config.mtu
    underlay = vtep_of(facts, underlay_family)[3]
    if isinstance(underlay, Unavailable):
        return Unavailable(f"underlay unknown: {underlay.reason}")
    return underlay.mtu - VXLAN_OVERHEAD_BY_UNDERLAY[underlay_family]


def pod_network(facts: NodeFacts, version: int = 4) -> Optional[Fact[IPNetwork]]:
    """The config's pod network of that family, else the subnet file's (so the firewall is checked while
    etcd is away); None when the network has no such family."""
    if not isinstance(facts.config, Unavailable):
        space = facts.config.space(version)
        return space.network if space is not None else None
    values = subnet_file_values(facts)
    if isinstance(values, Unavailable):
        return Unavailable("neither the config nor the subnet file names the pod network")
    return values.network if version == 4 else values.ipv6_network


def peer_leases(facts: NodeFacts) -> Fact[list[Lease]]:
    subnet = own_subnet(facts)
    why = _missing(facts.leases, subnet)
    if why:
        return Unavailable(why)
    return trusted_peers(sorted(facts.leases.values()), subnet)


# --- the checks -------------------------------------------------------------------


AGENT_FIX = "start (or restart) `vxlan-net agent` on this node and read its log; it sets this up at start-up"
_ENDPOINT_FIELDS = {4: ("PublicIP", "VtepMAC", "--public-ip"), 6: ("PublicIPv6", "BackendV6Data.VtepMAC",
                                                                   "--public-ipv6")}
"""The lease's field names of each underlay family's endpoint, and the agent flag that sets its address."""


def check_config(facts: NodeFacts) -> Finding:
    config = facts.config
    if isinstance(config, Unavailable):
        fix = (f"make etcd reachable at {facts.etcd_endpoints} (or give --etcd-endpoints/--etcd-prefix)"
               if "etcd" in config.reason else "write it with `vxlan-net config set --network CIDR`")
        return Finding(False, "config", config.reason, fix)
    mtu = config.mtu or "auto"
    spaces = [f"{tag}Network {space.network}, {tag}SubnetLen {space.subnet_len}"
              for tag, space in (("", config.ipv4), ("IPv6", config.ipv6)) if space is not None]
    return Finding(True, "config", f"{', '.join(spaces)}, VNI {config.vni}, Port {config.port}, MTU {mtu}")


def check_own_lease(facts: NodeFacts) -> Finding:
    lease = own_lease(facts)
    if isinstance(lease, Unavailable):
        fix = "fix the failures above first" if isinstance(facts.leases, Unavailable) else \
            "the agent re-acquires its lease when it is gone; " + AGENT_FIX
        return Finding(False, "own lease", lease.reason, fix)
    item = f"own lease {' + '.join(map(str, lease.subnets))}"
    endpoints = {f: lease.endpoint(f) for f in sorted(lease.underlays)}
    for family, (address, _mac) in endpoints.items():  # type: ignore[misc]
        field, _, flag = _ENDPOINT_FIELDS[family]
        if not isinstance(facts.node_addresses, Unavailable) and address not in facts.node_addresses:
            return Finding(False, item, f"{field} {address} is not on this node any more (renumbered?): "
                                        "peers send its pods' traffic to an address nobody answers",
                           f"an agent run with --iface only moves to the interface's new address by itself within "
                           f"seconds; one run with {flag} keeps it: restart it with the node's new address "
                           f"(`{flag} <new>`, or without {flag} to follow --iface); the subnet and MAC stay")
    problems = []
    for family, (address, mac) in endpoints.items():  # type: ignore[misc]
        field, mac_field, _ = _ENDPOINT_FIELDS[family]
        name, link, _, _ = vtep_of(facts, family)
        if isinstance(link, Unavailable):
            problems.append(f"cannot compare with {name}: {link.reason}")
            continue
        local = link.vxlan.local if link.vxlan else None
        if local != address:
            problems.append(f"{field} {address} but {name} sends from {local}")
        if link.mac != mac:
            problems.append(f"{mac_field} {mac} but {name} has MAC {link.mac}")
    if problems:
        return Finding(False, item, "; ".join(problems),
                       "peers send to the lease's PublicIP/VtepMAC: restart the agent so it rewrites the lease "
                       "and the device to agree")
    ttl = f", expires in {facts.own_lease_ttl}s" if facts.own_lease_ttl is not None else ""
    said = ", ".join(f"{_ENDPOINT_FIELDS[f][0]} {address}, {_ENDPOINT_FIELDS[f][1]} {mac}"
                     for f, (address, mac) in endpoints.items())  # type: ignore[misc]
    return Finding(True, item, f"{said}{ttl}")


_STATE_MAC = {4: "VtepMAC", 6: "VtepMACv6"}
"""node.json's field for the persisted MAC of the VTEP over each underlay family (doors/state.py)."""
_STATE_SUBNET = {4: "Subnet", 6: "IPv6Subnet"}


def check_state_dir(facts: NodeFacts) -> Finding:
    item = f"state {facts.state_path}"
    if isinstance(facts.state, Unavailable):
        return Finding(False, item, facts.state.reason,
                       "the agent creates it at start-up; without it a restart picks a new VTEP MAC")
    problems, said = [], []
    for family in own_underlays(facts):
        name, link, _, _ = vtep_of(facts, family)
        mac = str(facts.state.get(_STATE_MAC[family], "")).lower()
        said.append(f"{_STATE_MAC[family]} {mac}")
        if not isinstance(link, Unavailable) and mac != link.mac:
            problems.append(f"persisted {_STATE_MAC[family]} {mac or 'none'} but {name} has {link.mac}")
    for subnet in own_subnets(facts):
        key = _STATE_SUBNET[subnet.version]
        said.append(f"{key} {facts.state.get(key)}")
        if facts.state.get(key) != str(subnet):
            problems.append(f"persisted {key} {facts.state.get(key)} but this node holds {subnet}")
    if problems:
        return Finding(False, item, "; ".join(problems),
                       "a restarted agent would change its MAC or subnet: restart the agent now, so it persists "
                       "what it uses")
    return Finding(True, item, ", ".join(said))


def _ipv6_disabled_problem(facts: NodeFacts, device: str) -> tuple[list[str], str]:
    """(the problem, its fix) when the network has IPv6 pods but the device has IPv6 disabled."""
    if device not in facts.ipv6_disabled or 6 not in pod_families(facts):
        return [], ""
    key = f"net.ipv6.conf.{device.replace('.', '/')}.disable_ipv6"  # sysctl writes a dot in a name as /
    return ([f"IPv6 is disabled on it ({key}=1): it can hold no IPv6 address, neighbour or route"],
            f"`sysctl -w {key}=0` (and net.ipv6.conf.default.disable_ipv6=0, so a recreated device has it); then ")


def check_vtep(facts: NodeFacts, underlay_family: int = 4) -> Finding:
    """The VTEP over that underlay family: VXLAN attributes, local = the lease's public address of that
    family, MTU, up, and exactly our subnets' network addresses (/32, /128)."""
    name, link, _, underlay = vtep_of(facts, underlay_family)
    item = f"device {name}"
    if isinstance(link, Unavailable):
        return Finding(False, item, link.reason, "the agent creates it (and recreates it on resync); " + AGENT_FIX)
    problems = []
    vx = link.vxlan
    if vx is None:
        return Finding(False, item, f"is a {link.kind or 'device'}, not a VXLAN device",
                       f"delete it (`ip link del {link.name}`); the agent recreates it")
    config, lease = facts.config, own_lease(facts)
    if not isinstance(config, Unavailable):
        if vx.vni != config.vni:
            problems.append(f"VNI {vx.vni}, config says {config.vni}")
        if vx.port != config.port:
            problems.append(f"port {vx.port}, config says {config.port}")
    if not isinstance(lease, Unavailable):
        endpoint = lease.endpoint(underlay_family)
        field = _ENDPOINT_FIELDS[underlay_family][0]
        if endpoint is None:
            problems.append(f"the lease has no {field}: this node has no tunnel over IPv{underlay_family}")
        elif vx.local != endpoint[0]:
            problems.append(f"local {vx.local}, the lease's {field} is {endpoint[0]}")
    if not isinstance(underlay, Unavailable) and vx.underlay != underlay.name:
        problems.append(f"underlay {vx.underlay}, expected {underlay.name}")
    if vx.learning:
        problems.append("learning is on (must be nolearning)")
    mtu = expected_mtu(facts, underlay_family)
    if isinstance(mtu, Unavailable):
        problems.append(f"cannot check the MTU: {mtu.reason}")
    elif link.mtu != mtu:
        source = "config MTU" if not isinstance(config, Unavailable) and config.mtu else \
            f"underlay {underlay.name} MTU {underlay.mtu} - {VXLAN_OVERHEAD_BY_UNDERLAY[underlay_family]}"
        problems.append(f"MTU {link.mtu}, expected {mtu} ({source})")
    if not link.up:
        problems.append("down")
    disabled, first = _ipv6_disabled_problem(facts, name)
    problems += disabled
    wanted = [ip_interface((s.network_address, s.max_prefixlen)) for s in own_subnets(facts)]
    problems += [f"lacks address {want}" for want in wanted if want not in link.addresses]
    extra = [str(a) for a in link.addresses if a not in wanted]
    if wanted and extra:
        problems.append(f"extra addresses {', '.join(extra)}")
    if problems:
        return Finding(False, item, "; ".join(problems),
                       f"{first}the agent fixes MTU, state and address and recreates a device with wrong VXLAN "
                       f"attributes at start-up; restart it (or e.g. `ip link set {link.name} mtu "
                       f"{mtu if not isinstance(mtu, Unavailable) else 'N'} up`)")
    return Finding(True, item, f"VNI {vx.vni}, port {vx.port}, local {vx.local} on {vx.underlay}, nolearning, "
                               f"MTU {link.mtu}, up, {', '.join(map(str, link.addresses))}")


def _entry_problems(want: OverlayEntries, have: OverlayEntries) -> list[str]:
    """Missing entries of one peer, naming a present entry with the wrong value as such."""
    problems = []
    for n in in_order(want.neighbours - have.neighbours):
        other = [h.mac for h in have.neighbours if h.ip == n.ip]
        problems.append(f"neighbour {n.ip} has lladdr {other[0]}, lease says {n.mac}" if other
                        else f"missing neighbour {n.ip} lladdr {n.mac}")
    for f in in_order(want.fdb - have.fdb):
        other = sorted(str(h.dst) for h in have.fdb if h.mac == f.mac)
        problems.append(f"FDB entry {f.mac} points to {', '.join(other)}, lease says {f.dst}" if other
                        else f"missing FDB entry {f.mac} dst {f.dst}")
    for r in in_order(want.routes - have.routes):
        other = [str(h.gateway) for h in have.routes if h.subnet == r.subnet]
        problems.append(f"route {r.subnet} goes via {other[0]}, expected via {r.gateway}" if other
                        else f"missing route {r.subnet} via {r.gateway}")
    for r in in_order(want.direct_routes - have.direct_routes):
        other = [str(h.gateway) for h in have.direct_routes if h.subnet == r.subnet]
        problems.append(f"direct route {r.subnet} goes via {other[0]}, expected via {r.gateway}" if other
                        else f"missing direct route {r.subnet} via {r.gateway}")
    return problems


def peer_reach(facts: NodeFacts) -> Optional[DirectReach]:
    """Which peers this node reaches directly, decided as the agent decides; None with direct routing off
    or when the routes or the underlay are unknown (then every peer is checked as tunnelled)."""
    if (isinstance(facts.config, Unavailable) or not facts.config.direct_routing
            or isinstance(facts.main_routes, Unavailable) or isinstance(facts.underlay, Unavailable)):
        return None
    return DirectReach.from_routes(facts.main_routes, facts.underlay.name)


def _restore_commands(want: Mapping[int, OverlayEntries], facts: NodeFacts) -> str:
    """What the agent would write for these entries (one peer's, by underlay family of their VTEP)."""
    commands = []
    for family, entries in want.items():
        device = vtep_of(facts, family)[0]
        commands += [f"ip neigh replace {n.ip} lladdr {n.mac} dev {device} nud permanent"
                     for n in in_order(entries.neighbours)]
        commands += [f"bridge fdb append {f.mac} dev {device} dst {f.dst} self permanent"
                     for f in in_order(entries.fdb)]
        commands += [f"ip route replace {r.subnet} via {r.gateway} dev {device} onlink proto {ROUTE_PROTO}"
                     for r in in_order(entries.routes)]
        underlay = facts.underlay.name if not isinstance(facts.underlay, Unavailable) else "<underlay>"
        commands += [f"ip route replace {r.subnet} via {r.gateway} dev {underlay} proto {ROUTE_PROTO}"
                     for r in in_order(entries.direct_routes)]
    return f"`{'; '.join(commands)}`"


def _foreign_routes(facts: NodeFacts, lease: Lease) -> list[MainRoute]:
    """Main-table routes for the peer's subnets that someone else installed with metric 0, the slot ours
    needs (one with another metric lives beside ours and does not keep it out)."""
    if isinstance(facts.main_routes, Unavailable):
        return []
    return in_order(r for r in facts.main_routes
                    if r.dst in lease.subnets and r.protocol != ROUTE_PROTO and r.metric == 0)


def _desired(facts: NodeFacts, peers: Sequence[Lease], underlays: Sequence[int],
             reach: Optional[DirectReach]) -> dict[int, OverlayEntries]:
    """The entries of each of our VTEPs for `peers`, as the agent computes them (one place: desired_by_vtep)."""
    return desired_by_vtep(peers, own_underlays=underlays, own_families=pod_families(facts),
                           is_direct=reach.is_direct if reach else None)


def _peer_item(lease: Lease, mode: Optional[str]) -> str:
    addresses = ", ".join(str(lease.endpoint(f)[0]) for f in sorted(lease.underlays))  # type: ignore[index]
    return f"peer {' + '.join(map(str, lease.subnets))} at {addresses}" + (f" ({mode})" if mode else "")


def check_peers(facts: NodeFacts) -> list[Finding]:
    """One finding per peer lease (its routes, neighbours and FDB entries, on the VTEP that carries each
    pod family to it), then one for entries of no peer."""
    peers = peer_leases(facts)
    underlays = own_underlays(facts)
    vteps = {f: vtep_of(facts, f) for f in underlays}
    why = _missing(peers, *(entries for _, _, entries, _ in vteps.values()))
    if why:
        return [Finding(False, "peer entries", f"not checked: {why}", "fix the failures above first")]
    have: dict[int, OverlayEntries] = {f: entries for f, (_, _, entries, _) in vteps.items()}  # type: ignore[misc]
    named = len(underlays) > 1  # say which VTEP, once there are two

    def on(family: int, lines: list[str]) -> list[str]:
        return [f"{vteps[family][0]}: {line}" for line in lines] if named else lines

    findings = []
    fix = ("the agent restores them on its next resync (--resync-interval); if they stay missing, read its log; "
           "by hand: ")
    reach = peer_reach(facts)
    for lease in peers:
        mode = lease_mode(reach, lease, pod_families(facts))
        item = _peer_item(lease, mode if reach is not None else None)
        want = _desired(facts, [lease], underlays, reach)
        missing_routes = any(not (want[f].routes <= have[f].routes and want[f].direct_routes <= have[f].direct_routes)
                             for f in underlays)
        blocking = _foreign_routes(facts, lease) if missing_routes else []
        blocked = {str(r.dst) for r in blocking}
        problems = [p for f in underlays for p in on(f, [
            line for line in _entry_problems(want[f], have[f])
            if not any(line.startswith(f"missing route {subnet} ") for subnet in blocked)])]
        if blocking:
            problems += [f"route {r} is not vxlan-net's, so the agent does not route {r.dst} into the "
                         f"overlay" for r in blocking]
            findings.append(Finding(False, item, "; ".join(problems),
                                    "delete it: " + "; ".join(f"`ip route del {r}`" for r in blocking)
                                    + "; the agent adds its own route on its next resync"))
        elif problems:
            findings.append(Finding(False, item, "; ".join(problems), fix + _restore_commands(want, facts)))
        elif mode == DIRECT:
            via = ", ".join(str(r.gateway) for e in want.values() for r in in_order(e.direct_routes))
            findings.append(Finding(True, item, f"route via {via} dev {facts.underlay.name} in place, "
                                                f"no tunnel entries needed"))
        else:
            held = "; ".join(f"{'route' if len(e.routes) < 2 else 'routes'}, neighbour "
                             f"{', '.join(str(n.ip) for n in in_order(e.neighbours))} and FDB entry "
                             f"{', '.join(sorted({x.mac for x in e.fdb}))}" + (f" on {vteps[f][0]}" if named else "")
                             for f, e in want.items() if e.neighbours)
            direct = [str(r.subnet) for e in want.values() for r in in_order(e.direct_routes)]
            held += f"{'; ' if held else ''}direct route {', '.join(direct)}" if direct else ""
            findings.append(Finding(True, item, f"{held} in place"))
    want_all = _desired(facts, peers, underlays, reach)
    extra = []
    for f in underlays:
        want, got = want_all[f], have[f]
        extra += on(f, [f"neighbour {n.ip} lladdr {n.mac}" for n in in_order(got.neighbours - want.neighbours)
                        if n.ip not in {w.ip for w in want.neighbours}]
                    + [f"FDB entry {e.mac} dst {e.dst}" for e in in_order(got.fdb - want.fdb)]
                    + [f"route {r.subnet} via {r.gateway}" for r in in_order(got.routes - want.routes)
                       if r.subnet not in {w.subnet for w in want.routes}]
                    + [f"direct route {r.subnet} via {r.gateway}"
                       for r in in_order(got.direct_routes - want.direct_routes)
                       if r.subnet not in {w.subnet for w in want.direct_routes}])
    if extra:
        findings.append(Finding(False, "stale entries", f"entries for no current lease: {'; '.join(extra)}",
                                "the agent removes them on its next resync; if they stay, read its log"))
    else:
        names = " and ".join(name for name, _, _, _ in vteps.values())
        count = f"{len(peers)} peer{'s' if len(peers) != 1 else ''}"
        findings.append(Finding(True, "stale entries", f"none on {names} ({count})"))
    return findings


def check_bridge(facts: NodeFacts) -> Finding:
    item = f"bridge {facts.bridge_name}"
    link = facts.bridge
    values = subnet_file_values(facts)
    gateways: Fact[list[IPInterface]]
    if isinstance(values, Unavailable):
        subnets = own_subnets(facts)
        gateways = ([ip_interface((s.network_address + 1, s.prefixlen)) for s in subnets] if subnets
                    else Unavailable(values.reason))
    else:
        gateways = [g for g in (values.gateway, values.ipv6_gateway) if g is not None]
    if isinstance(link, Unavailable):
        return Finding(False, item, link.reason,
                       "the CNI plugin creates it with the first pod; run a pod, or check --bridge")
    problems = []
    if link.kind != "bridge":
        problems.append(f"is a {link.kind or 'device'}, not a bridge")
    if not link.up:
        problems.append("down")
    disabled, first = _ipv6_disabled_problem(facts, link.name)
    problems += disabled
    if isinstance(gateways, Unavailable):
        problems.append(f"cannot check its address: {gateways.reason}")
    else:
        lacking = [g for g in gateways if g not in link.addresses]
        if lacking:
            have = ", ".join(map(str, link.addresses)) or "none"
            problems.append(f"lacks the gateway address {', '.join(map(str, lacking))} (has {have})")
    if problems:
        return Finding(False, item, "; ".join(problems),
                       f"{first}`ip link set {link.name} up`"
                       + "".join(f"; `ip addr replace {g} dev {link.name}`"
                                 for g in (gateways if not isinstance(gateways, Unavailable) else ())
                                 if g not in link.addresses))
    return Finding(True, item, f"up, {', '.join(map(str, gateways))}")


def check_subnet_file(facts: NodeFacts) -> Finding:
    item = f"subnet file {facts.subnet_file_path}"
    values = subnet_file_values(facts)
    if isinstance(values, Unavailable):
        return Finding(False, item, values.reason, "the agent writes it at start-up: restart the agent")
    problems = []
    config, lease = facts.config, own_lease(facts)
    families = (("VXLAN_NET_NETWORK", "VXLAN_NET_SUBNET", values.network, values.gateway, 4),
                ("VXLAN_NET_IPV6_NETWORK", "VXLAN_NET_IPV6_SUBNET", values.ipv6_network, values.ipv6_gateway, 6))
    for network_key, subnet_key, network, gateway, version in families:
        if not isinstance(config, Unavailable):
            space = config.space(version)
            want = space.network if space is not None else None
            if network != want:
                problems.append(f"{network_key} {network or 'missing'}, config says "
                                f"{want or f'the network has no IPv{version}'}")
        if gateway is None:
            continue
        if not isinstance(lease, Unavailable) and gateway.network != lease.subnet_of(version):
            problems.append(f"{subnet_key} {gateway}, our lease is {lease.subnet_of(version)}")
        if gateway.ip != gateway.network.network_address + 1:
            problems.append(f"{subnet_key} {gateway} is not the subnet's first host address")
    # Pods send through whichever VTEP carries a peer: the pod MTU must fit the narrowest.
    mtus = [expected_mtu(facts, f) for f in own_underlays(facts)]
    mtu = min((m for m in mtus if not isinstance(m, Unavailable)), default=None)
    if mtu is not None and values.mtu != mtu:
        problems.append(f"VXLAN_NET_MTU {values.mtu}, expected {mtu}")
    if problems:
        return Finding(False, item, "; ".join(problems),
                       "the agent rewrites it at start-up: restart the agent (pods made since use wrong values)")
    said = [f"{kind} {value}" for kind, value in (("network", values.network), ("subnet", values.gateway),
                                                 ("IPv6 network", values.ipv6_network),
                                                 ("IPv6 subnet", values.ipv6_gateway)) if value is not None]
    return Finding(True, item, f"{', '.join(said)}, MTU {values.mtu}, IPMASQ {'true' if values.ip_masq else 'false'}")


def _prefix_match(expr: Mapping[str, Any], field: str) -> Optional[IPNetwork]:
    """The network of an `ip <field> <prefix>` (or `ip6 ...`) match expression, else None."""
    match = expr.get("match") if isinstance(expr, Mapping) else None
    if not isinstance(match, Mapping) or match.get("op", "==") != "==":
        return None
    left, right = match.get("left"), match.get("right")
    if not isinstance(left, Mapping) or left.get("payload", {}).get("field") != field:
        return None
    try:
        if isinstance(right, Mapping) and "prefix" in right:
            return ip_network(f"{right['prefix']['addr']}/{right['prefix']['len']}")
        if isinstance(right, str):
            return ip_network(right)
    except (KeyError, TypeError, ValueError):
        return None
    return None


def _rules(nft: Mapping[str, Any], chain: str) -> list[list[Mapping[str, Any]]]:
    """The expression lists of the table's rules in `chain`, in chain order."""
    return [item["rule"].get("expr", []) for item in nft.get("nftables", [])
            if isinstance(item, Mapping) and isinstance(item.get("rule"), Mapping)
            and item["rule"].get("chain") == chain]


def _matches(expr_list, saddr: Optional[IPNetwork], daddr: Optional[IPNetwork], verdict: str) -> bool:
    found_s = [n for n in (_prefix_match(e, "saddr") for e in expr_list) if n]
    found_d = [n for n in (_prefix_match(e, "daddr") for e in expr_list) if n]
    return (found_s == ([saddr] if saddr else []) and found_d == ([daddr] if daddr else [])
            and any(isinstance(e, Mapping) and verdict in e for e in expr_list))


def _nft_of(facts: NodeFacts, family: str) -> Fact[Mapping[str, Any]]:
    return facts.nft if family == "ip" else facts.nft6


def check_firewall(facts: NodeFacts, family: str = "ip") -> Finding:
    """Our table of that nftables family ("ip", "ip6") exists; with the ingress filter on, every peer's
    public address of that family may send us VXLAN."""
    item, nft = f"nftables table {family} {NFT_TABLE}", _nft_of(facts, family)
    if isinstance(nft, Unavailable):
        return Finding(False, item, nft.reason, "the agent installs it at start-up: restart the agent")
    filtering = any(isinstance(e, Mapping) and "drop" in e for r in _rules(nft, "input") for e in r)
    if not filtering:
        return Finding(True, item, "present; VXLAN ingress filter off")
    allowed = {str(e) for item_ in nft.get("nftables", []) if isinstance(item_, Mapping)
               and isinstance(item_.get("set"), Mapping) for e in item_["set"].get("elem", [])}
    peers = peer_leases(facts)
    if isinstance(peers, Unavailable):  # etcd down: the config line already fails; say what we could see
        return Finding(True, item, f"VXLAN ingress filter on ({len(allowed)} addresses allowed; "
                                   f"not compared with the leases: {peers.reason})")
    # Each table filters its family's underlay: a peer without a public address of that family sends none.
    senders = [address for address in (lease.public_ip if family == "ip" else lease.public_ipv6 for lease in peers)
               if address is not None]
    blocked = sorted({str(address) for address in senders} - allowed)
    if blocked:
        return Finding(False, item, f"ingress filter drops VXLAN from peer nodes {', '.join(blocked)}",
                       "the agent updates the set with the leases: restart it if this persists past a resync")
    return Finding(True, item, f"VXLAN accepted only from the {len(senders)} peer nodes' addresses")


def check_masquerade(facts: NodeFacts, family: str = "ip") -> Finding:
    """With VXLAN_NET_IPMASQ, the table of that family masquerades traffic leaving its pod network, and
    never pod-to-pod traffic."""
    item = "masquerade" if family == "ip" else "ipv6 masquerade"
    version = 4 if family == "ip" else 6
    network = pod_network(facts, version)
    if network is None:
        return Finding(True, item, f"no IPv{version} pod network: nothing for table {family} to masquerade")
    values = subnet_file_values(facts)
    why = _missing(values, network)
    if why:
        return Finding(False, item, f"not checked: {why}", "fix the failures above first")
    if not values.ip_masq:
        return Finding(True, item, "off (VXLAN_NET_IPMASQ=false)")
    nft = _nft_of(facts, family)
    if isinstance(nft, Unavailable):
        return Finding(False, item, f"VXLAN_NET_IPMASQ=true but {nft.reason}",
                       "the agent installs it with --ip-masq at start-up: restart the agent")
    rules = _rules(nft, "postrouting")
    masq = next((i for i, r in enumerate(rules) if _matches(r, network, None, "masquerade")), None)
    keep = next((i for i, r in enumerate(rules) if _matches(r, network, network, "return")), None)
    if masq is None:
        return Finding(False, item, f"VXLAN_NET_IPMASQ=true but no `{family} saddr {network} masquerade` rule",
                       "restart the agent with --ip-masq")
    if keep is None or keep > masq:
        return Finding(False, item, f"pod-to-pod traffic would be masqueraded: no `{family} saddr {network} "
                                    f"{family} daddr {network} return` before the masquerade rule",
                       "restart the agent, which replaces the whole table")
    return Finding(True, item, f"traffic from {network} leaving it is masqueraded; pod-to-pod is not")


def check_ip_forward(facts: NodeFacts) -> Finding:
    if isinstance(facts.ip_forward, Unavailable):
        return Finding(False, "ip_forward", facts.ip_forward.reason, "`sysctl -w net.ipv4.ip_forward=1`")
    if not facts.ip_forward:
        return Finding(False, "ip_forward", "net.ipv4.ip_forward is 0: pod traffic is not routed",
                       "`sysctl -w net.ipv4.ip_forward=1` (the agent sets it at start-up)")
    return Finding(True, "ip_forward", "on")


def check_ipv6_forwarding(facts: NodeFacts) -> Finding:
    item, fix = "ipv6 forwarding", "`sysctl -w net.ipv6.conf.all.forwarding=1` (the agent sets it at start-up)"
    if isinstance(facts.ip6_forward, Unavailable):
        return Finding(False, item, facts.ip6_forward.reason, fix)
    if not facts.ip6_forward:
        return Finding(False, item, "net.ipv6.conf.all.forwarding is 0: IPv6 pod traffic is not routed", fix)
    return Finding(True, item, "on")


def has_ipv6(facts: NodeFacts) -> bool:
    """The network has IPv6 pods: by the config, or (etcd away) by the subnet file or an IPv6 VTEP."""
    if not isinstance(facts.config, Unavailable):
        return facts.config.ipv6 is not None
    return 6 in pod_families(facts) or not isinstance(facts.vtep6, Unavailable)


def run_checks(facts: NodeFacts) -> list[Finding]:
    findings = [check_config(facts)]
    if facts.invalid_leases:
        findings.append(Finding(False, "lease records", "records skipped: " + "; ".join(facts.invalid_leases),
                                "delete or rewrite them (`etcdctl del <prefix>/subnets/<key>`)"))
    findings += [check_own_lease(facts), check_state_dir(facts)]
    findings += [check_vtep(facts, family) for family in own_underlays(facts)]
    findings += check_peers(facts)
    findings += [check_bridge(facts), check_subnet_file(facts), check_firewall(facts), check_masquerade(facts)]
    if has_ipv6(facts) or 6 in own_underlays(facts):  # when the agent keeps `table ip6` (firewall.apply_rules)
        findings.append(check_firewall(facts, "ip6"))
    if has_ipv6(facts):
        findings.append(check_masquerade(facts, "ip6"))
    findings.append(check_ip_forward(facts))
    if has_ipv6(facts):
        findings.append(check_ipv6_forwarding(facts))
    return findings


# --- the probe (the pure half) ------------------------------------------------------


ECHO_REQUEST = {4: 8, 6: 128}
"""ICMP / ICMPv6 echo request type, by the probe's IP family."""
ECHO_REPLY = {4: 0, 6: 129}


@dataclasses.dataclass(frozen=True)
class TunnelFrame:
    """One VXLAN frame seen on the underlay, reduced to what the probe check needs."""

    outer_src: IPAddress
    outer_dst: IPAddress
    vni: int
    inner_src: Optional[IPAddress]
    inner_dst: Optional[IPAddress]
    icmp_type: Optional[int] = None
    """ICMP type (8 echo request, 0 echo reply) or ICMPv6 type (128, 129); None for anything else."""


@dataclasses.dataclass(frozen=True)
class ProbePlan:
    """What a probe to `dest` must look like on the underlay."""

    dest: IPAddress
    source: IPAddress
    """Our bridge gateway address of dest's family: a pod-network source."""
    peer: Lease
    """The lease whose subnet holds `dest`."""
    vni: int
    port: int
    local: Optional[IPAddress]
    """Where our VTEP sends from: the one carrying dest's family to that peer (desired_by_vtep's choice)."""
    underlay: str
    peer_address: IPAddress
    """The peer's public address of that VTEP's family: the outer destination."""

    @property
    def peer_subnet(self) -> IPNetwork:
        return self.peer.subnet_of(self.dest.version)  # type: ignore[return-value]


def plan_probe(facts: NodeFacts, dest: IPAddress) -> Fact[ProbePlan]:
    """Where a probe to `dest` (either family) must go, or why it cannot be planned."""
    why = _missing(facts.config, facts.leases)
    if why:
        return Unavailable(why)
    space = facts.config.space(dest.version)
    if space is None or dest not in space.network:
        networks = " or ".join(str(s.network) for s in facts.config.spaces)
        return Unavailable(f"{dest} is outside the pod network {networks}")
    subnet = _own_subnet_of(facts, dest.version)
    if subnet is not None and dest in subnet:
        return Unavailable(f"{dest} is in this node's own subnet {subnet}: it never crosses the tunnel")
    peer = next((lease for lease in facts.leases.values()
                 if (held := lease.subnet_of(dest.version)) is not None and dest in held), None)
    if peer is None:
        return Unavailable(f"no lease covers {dest}: no node holds its subnet")
    values = subnet_file_values(facts)
    gateway = None if isinstance(values, Unavailable) else (values.gateway if dest.version == 4
                                                           else values.ipv6_gateway)
    if gateway is not None:
        source = gateway.ip
    elif subnet is not None:
        source = subnet.network_address + 1
    else:
        reason = (values.reason if isinstance(values, Unavailable)
                  else f"the subnet file has no IPv{dest.version} subnet")
        return Unavailable(f"no source address: {reason}")
    underlay_family = tunnel_underlay(peer, dest.version, own_underlays(facts))
    if underlay_family is None:
        return Unavailable(f"{dest} is on a node with no underlay family in common with this one: no tunnel")
    name, vtep, _, underlay = vtep_of(facts, underlay_family)
    if isinstance(underlay, Unavailable):
        return Unavailable(f"underlay unknown: {underlay.reason}")
    direct = peer.endpoint(dest.version)
    if direct is not None and mode_of(peer_reach(facts), direct[0]) == DIRECT:
        return Unavailable(f"{dest} is on a direct peer ({direct[0]}): its packets leave unencapsulated, "
                           f"and the probe checks the tunnel; ping it, or watch `vxlan-net inspect` on "
                           f"{underlay.name}")
    local = vtep.vxlan.local if not isinstance(vtep, Unavailable) and vtep.vxlan else None
    return ProbePlan(dest, source, peer, facts.config.vni, facts.config.port, local, underlay.name,
                     peer.endpoint(underlay_family)[0])  # type: ignore[index]


def check_probe(plan: ProbePlan, frames: Sequence[TunnelFrame], replied: bool) -> list[Finding]:
    """Did a frame carrying our probe leave for the right node, with our VNI and untouched inner addresses?"""
    item = f"probe {plan.source} -> {plan.dest}"
    request, reply = ECHO_REQUEST[plan.dest.version], ECHO_REPLY[plan.dest.version]
    out = [f for f in frames if f.inner_dst == plan.dest and f.icmp_type == request]
    if not out:
        seen = "; ".join(f"{f.outer_src}->{f.outer_dst} vni {f.vni} inner {f.inner_src}->{f.inner_dst}"
                         for f in frames[:3]) or "no VXLAN frames at all"
        return [Finding(False, item, f"no VXLAN frame carrying an echo request to {plan.dest} left {plan.underlay} "
                                     f"(seen: {seen})",
                        f"check the route, neighbour and FDB entries for {plan.peer_subnet} above")]
    frame = out[0]
    problems = []
    if frame.outer_dst != plan.peer_address:
        problems.append(f"outer destination {frame.outer_dst}, but {plan.peer_subnet} is held by "
                        f"{plan.peer_address}")
    if plan.local is not None and frame.outer_src != plan.local:
        problems.append(f"outer source {frame.outer_src}, expected {plan.local}")
    if frame.vni != plan.vni:
        problems.append(f"VNI {frame.vni}, expected {plan.vni}")
    if frame.inner_src != plan.source:
        problems.append(f"inner source {frame.inner_src}, expected {plan.source} (rewritten: NAT?)")
    summary = (f"outer {frame.outer_src} -> {frame.outer_dst} (node of {plan.peer_subnet}), VNI {frame.vni}, "
               f"inner {frame.inner_src} -> {frame.inner_dst}")
    if problems:
        return [Finding(False, item, "; ".join(problems) + f" [{summary}]",
                        "compare the FDB entry for the peer's VtepMAC with its lease; check the nftables rules")]
    findings = [Finding(True, item, summary)]
    back = [f for f in frames if f.inner_src == plan.dest and f.inner_dst == plan.source and f.icmp_type == reply]
    if back:
        findings.append(Finding(True, f"reply {plan.dest} -> {plan.source}",
                                f"outer {back[0].outer_src} -> {back[0].outer_dst}, VNI {back[0].vni}"))
    elif replied:
        findings.append(Finding(True, f"reply {plan.dest} -> {plan.source}",
                                "ping got a reply, but it was not captured on the underlay"))
    else:
        findings.append(Finding(False, f"reply {plan.dest} -> {plan.source}",
                                f"no reply from {plan.dest} (the probe left correctly)",
                                f"run `vxlan-net doctor` on the node {plan.peer_address}: its entries back to us, "
                                f"its bridge, or the pod itself"))
    return findings


# --- rendering ----------------------------------------------------------------------


def render(findings: Sequence[Finding]) -> str:
    lines = []
    for f in findings:
        lines.append(f"{'OK' if f.ok else 'FAIL':<4}  {f.item}: {f.reason}")
        if not f.ok and f.fix:
            lines.append(f"      fix: {f.fix}")
    failed = sum(not f.ok for f in findings)
    lines.append(f"{len(findings)} checks, {failed} failed" if failed else f"{len(findings)} checks, all OK")
    return "\n".join(lines)


def render_json(findings: Sequence[Finding]) -> str:
    return json.dumps({"ok": all(f.ok for f in findings),
                       "findings": [dataclasses.asdict(f) for f in findings]}, indent=2)


# --- gathering (I/O through the doors) ----------------------------------------------


@dataclasses.dataclass(frozen=True)
class DoctorOptions:
    """Where this node keeps its files and devices (etcd is reached through the store given)."""

    etcd_prefix: str = "/vxlan-net"
    etcd_endpoints: str = ""
    """Only for the messages."""
    subnet_file: Path = Path("/run/vxlan-net/subnet.env")
    state_dir: Path = Path("/var/lib/vxlan-net")
    bridge: str = "cni0"
    iface: Optional[str] = None
    """Underlay; None: the one the VXLAN device sits on."""


def _read_config(store, prefix: str) -> Fact[NetworkConfig]:
    from vxlan_net.core.config import parse_config
    from vxlan_net.core.errors import InvalidConfig, VxlanNetError

    try:
        raw = store.get_config()
    except VxlanNetError as exc:
        return Unavailable(f"etcd unavailable: {exc}")
    if raw is None:
        return Unavailable(f"no config at {prefix}/config")
    try:
        return parse_config(raw)
    except InvalidConfig as exc:
        return Unavailable(f"config at {prefix}/config is invalid: {exc}")


def _read_leases(store, config: NetworkConfig, protected: Mapping[IPAddress, str]):
    """({subnet: Lease} of the records this node's agent programs (and its own) or Unavailable,
    skipped records with their reasons, {subnet: etcd lease id})."""
    from vxlan_net.core.errors import VxlanNetError
    from vxlan_net.core.lease_book import LeaseBook
    from vxlan_net.core.untrusted import shown

    try:
        snapshot = store.list_leases()
    except VxlanNetError as exc:
        return Unavailable(f"etcd unavailable listing leases: {exc}"), (), {}
    book = LeaseBook(config)
    book.replace(snapshot.events())
    book.set_protected(protected)
    leases = {lease.subnet: lease for lease in book.peers()}
    ids = {lease.subnet: snapshot.records[lease.key_name].lease_id for lease in book.peers()}
    skipped = tuple(f"{shown(key)}: {reason}" for key, reason in sorted(book.skipped().items()))
    return leases, skipped, ids


def _link(kernel, name: str) -> Fact[Link]:
    from vxlan_net.core.errors import KernelError, LinkNotFound

    try:
        return Link.from_info(kernel.link_info(name))
    except LinkNotFound:
        return Unavailable(f"no device named {name}")
    except KernelError as exc:
        return Unavailable(str(exc))


def _read_nft(family: str = "ip") -> Fact[Mapping[str, Any]]:
    nft = shutil.which("nft") or "/usr/sbin/nft"
    try:
        proc = subprocess.run([nft, "-j", "list", "table", family, NFT_TABLE], capture_output=True, text=True,
                              timeout=15)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Unavailable(f"cannot run nft: {exc}")
    if proc.returncode != 0:
        if "No such file" in proc.stderr:
            return Unavailable(f"the nftables table {family} {NFT_TABLE} does not exist")
        return Unavailable(f"nft -j list table {family} {NFT_TABLE}: {proc.stderr.strip()}")
    try:
        return json.loads(proc.stdout)
    except ValueError:
        return Unavailable("nft printed no JSON")


def _read_text(path: Path) -> Fact[str]:
    try:
        return Path(path).read_text()
    except FileNotFoundError:
        return Unavailable(f"{path} does not exist")
    except (OSError, UnicodeDecodeError) as exc:
        return Unavailable(f"cannot read {path}: {exc}")


def _read_state(path: Path) -> Fact[Mapping[str, Any]]:
    text = _read_text(path)
    if isinstance(text, Unavailable):
        return text
    try:
        doc = json.loads(text)
    except ValueError:
        return Unavailable(f"{path} is not JSON")
    return doc if isinstance(doc, dict) else Unavailable(f"{path} is not a JSON object")


def _read_ip_forward(path: str = "/proc/sys/net/ipv4/ip_forward") -> Fact[bool]:
    text = _read_text(Path(path))
    return text if isinstance(text, Unavailable) else text.strip() == "1"


def _read_entries(kernel, device: str, vtep: Fact[Link], underlay: Optional[Fact[Link]]) -> Fact[OverlayEntries]:
    """The entries on `device`; with `underlay` known, also our direct routes on it."""
    from vxlan_net.core.errors import KernelError

    if isinstance(vtep, Unavailable):
        return Unavailable(vtep.reason)
    try:
        return kernel.read_overlay_entries(
            device, underlay=None if underlay is None or isinstance(underlay, Unavailable) else underlay.name)
    except KernelError as exc:
        return Unavailable(f"cannot read the entries of {device}: {exc}")


def gather_facts(options: DoctorOptions, store) -> NodeFacts:
    """Read everything the checks need from `store` (an EtcdStore, closed by the caller) and this
    namespace's kernel and files; nothing is written anywhere."""
    from vxlan_net.doors import kernel
    from vxlan_net.core.errors import KernelError, VxlanNetError

    from vxlan_net.core.underlay import families_read, node_underlay

    config = _read_config(store, options.etcd_prefix)
    if isinstance(config, Unavailable):
        # The data plane can still be checked while etcd is away.
        names = kernel.vxlan_link_names()
        device = next((n for n in names if n.startswith(VTEP_PREFIX)), vtep_name(1))
        device6 = next((n for n in names if n.startswith(VTEP6_PREFIX)), vtep_name(1, 6))
    else:
        device, device6 = vtep_names(config.vni)
    vtep, vtep6 = _link(kernel, device), _link(kernel, device6)
    try:
        # The families whose addresses and routes the agent reads.
        has6 = not isinstance(vtep6, Unavailable)
        families = (4, 6) if has6 else (4,) if isinstance(config, Unavailable) else families_read(config, has6)
        main_routes: Fact[tuple[MainRoute, ...]] = tuple(
            r for family in families for r in kernel.main_table_routes(family=family))
        protected = {} if isinstance(config, Unavailable) else node_underlay(
            config, [a for family in families for a in kernel.node_addresses(family=family)], main_routes,
            store.endpoint_addresses()).protected()
    except KernelError as exc:
        main_routes, protected = Unavailable(f"cannot read the main routing table: {exc}"), {}
    try:
        node_addresses: Fact[frozenset] = frozenset(
            a.interface.ip for family in (4, 6) for a in kernel.node_addresses(family=family))
    except KernelError as exc:
        node_addresses = Unavailable(f"cannot read this node's addresses: {exc}")
    leases, invalid, ids = (Unavailable("leases not read: see the config line"), (), {}) \
        if isinstance(config, Unavailable) else _read_leases(store, config, protected)

    def sits_on(link: Fact[Link]) -> Optional[str]:
        return link.vxlan.underlay if not isinstance(link, Unavailable) and link.vxlan else None

    iface = options.iface or sits_on(vtep) or sits_on(vtep6)
    underlay = _link(kernel, iface) if iface else Unavailable(f"{device} names no underlay: give --iface")
    underlay6 = None
    if sits_on(vtep6) and sits_on(vtep6) != iface:
        underlay6 = _link(kernel, sits_on(vtep6))  # type: ignore[arg-type]
    # Direct routes live on the underlay device, read beside the first VTEP's entries (as the agent writes them).
    entries = _read_entries(kernel, device, vtep, underlay)
    entries6 = _read_entries(kernel, device6, vtep6, underlay if isinstance(vtep, Unavailable) else None)
    state_path = Path(options.state_dir) / "node.json"
    bridge = _link(kernel, options.bridge)
    facts = NodeFacts(
        config=config, leases=leases, invalid_leases=invalid, vtep_name=device, vtep=vtep,
        underlay=underlay, entries=entries, bridge=bridge,
        subnet_file=_read_text(options.subnet_file), nft=_read_nft(), ip_forward=_read_ip_forward(),
        state=_read_state(state_path), subnet_file_path=str(options.subnet_file), state_path=str(state_path),
        bridge_name=options.bridge, etcd_endpoints=options.etcd_endpoints, main_routes=main_routes,
        node_addresses=node_addresses, vtep6_name=device6, vtep6=vtep6, entries6=entries6, underlay6=underlay6,
        ip6_forward=_read_ip_forward("/proc/sys/net/ipv6/conf/all/forwarding"), nft6=_read_nft("ip6"),
        ipv6_disabled=frozenset(link.name for link in (vtep, vtep6, bridge) if not isinstance(link, Unavailable)
                                and _read_text(Path(f"/proc/sys/net/ipv6/conf/{link.name}/disable_ipv6")) != "0\n"),
    )
    lease = own_lease(facts)
    lease_id = ids.get(lease.subnet) if not isinstance(lease, Unavailable) else None
    if lease_id:
        try:
            facts = dataclasses.replace(facts, own_lease_ttl=store.lease_ttl(lease_id))
        except VxlanNetError:
            pass
    return facts


# --- the probe (I/O) ----------------------------------------------------------------


def tunnel_frame(packet, port: int) -> Optional[TunnelFrame]:
    """A scapy packet from the underlay (outer IPv4 or IPv6) as a TunnelFrame, or None if it is no VXLAN
    frame to `port`."""
    from vxlan_net.tools.inspect_frames import InspectContext, decode_frame

    frame = decode_frame(packet, InspectContext(port=port))
    if frame is None:
        return None
    return TunnelFrame(frame.outer_src, frame.outer_dst, frame.vni, frame.inner_src, frame.inner_dst,
                       frame.icmp_type if frame.protocol in ("icmp", "icmp6") else None)


def run_probe(plan: ProbePlan, timeout: float = 3.0) -> tuple[list[TunnelFrame], bool]:
    """Ping `plan.dest` (ping -6 for IPv6) from the bridge address while capturing `udp port <port>` on the
    underlay.

    Bounded: one echo request, the capture stops `timeout` seconds after it started at the latest."""
    from scapy.sendrecv import AsyncSniffer

    from vxlan_net.tools import inspect_frames  # noqa: F401 (loads scapy's Ethernet/IP layers, so captures are dissected)

    started = threading.Event()
    sniffer = AsyncSniffer(iface=plan.underlay, filter=f"udp port {plan.port}", store=True,
                           started_callback=started.set)
    sniffer.start()
    try:
        if not started.wait(timeout) and sniffer.exception is None:
            raise RuntimeError(f"the capture on {plan.underlay} did not start within {timeout:g} s")
        ping = shutil.which("ping") or "/usr/bin/ping"
        proc = subprocess.run([ping, f"-{plan.dest.version}", "-n", "-c", "1", "-W", str(int(max(1, timeout))),
                               "-I", str(plan.source), str(plan.dest)], capture_output=True, text=True,
                              timeout=timeout + 5)
        time.sleep(0.2)  # let the reply's frame reach the capture
    finally:
        if sniffer.running:
            sniffer.stop(join=False)
        sniffer.join(timeout + 3)
    if sniffer.exception is not None:
        raise RuntimeError(f"the capture on {plan.underlay} failed: {sniffer.exception}")
    frames = [f for f in (tunnel_frame(p, plan.port) for p in (sniffer.results or [])) if f is not None]
    return frames, proc.returncode == 0
