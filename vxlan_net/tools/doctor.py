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
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, TypeVar, Union

from cni import subnet_file

from vxlan_net.core.config import VXLAN_OVERHEAD, NetworkConfig
from vxlan_net.core.desired import MainRoute, OverlayEntries, Route, desired_entries
from vxlan_net.core.direct import DIRECT, DirectReach, mode_of
from vxlan_net.core.lease import Lease, subnet_key_name, trusted_peers
from vxlan_net.core.names import NFT_TABLE, ROUTE_PROTO, VTEP_PREFIX, vtep_name


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
    local: Optional[IPv4Address]
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
    addresses: tuple[IPv4Interface, ...] = ()
    vxlan: Optional[VxlanAttrs] = None

    @classmethod
    def from_info(cls, info: Mapping[str, Any]) -> "Link":
        vx = info.get("vxlan")
        return cls(
            name=info["name"], kind=info.get("kind"), mtu=int(info.get("mtu") or 0),
            mac=(info.get("mac") or "").lower(), up=bool(info.get("up")),
            addresses=tuple(IPv4Interface(a) for a in info.get("addresses", ())),
            vxlan=VxlanAttrs(vni=vx["vni"], port=vx["port"],
                             local=IPv4Address(vx["local"]) if vx.get("local") else None,
                             underlay=vx.get("underlay"), learning=bool(vx.get("learning")))
            if vx else None,
        )


@dataclasses.dataclass(frozen=True)
class NodeFacts:
    """Everything doctor read about one node; each fact is its value or Unavailable(why)."""

    config: Fact[NetworkConfig]
    leases: Fact[Mapping[IPv4Network, Lease]]
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
    """Every IPv4 route of the main table, whoever installed it (to name routes that block ours)."""
    node_addresses: Fact[frozenset[IPv4Address]] = Unavailable("not read")
    """Every IPv4 address on this node (is the lease's PublicIP still one of them?)."""


def _missing(*facts: Any) -> Optional[str]:
    """The reason of the first Unavailable among `facts`, if any."""
    return next((f.reason for f in facts if isinstance(f, Unavailable)), None)


# --- derived facts ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SubnetFile:
    network: IPv4Network
    gateway: IPv4Interface
    mtu: int
    ip_masq: bool


def parse_subnet_values(text: str) -> SubnetFile:
    """The subnet file's four values, by the plugin's own rules (cni/subnet_file.py), or ValueError
    naming what is wrong."""
    try:
        node = subnet_file.parse(text)
    except subnet_file.NotASubnetFile as exc:
        raise ValueError(f"not a vxlan-net subnet file ({exc})") from None
    return SubnetFile(IPv4Network((node.network, node.network_prefix)), IPv4Interface((node.gateway, node.prefix)),
                      node.mtu, node.ipmasq)


def subnet_file_values(facts: NodeFacts) -> Fact[SubnetFile]:
    if isinstance(facts.subnet_file, Unavailable):
        return facts.subnet_file
    try:
        return parse_subnet_values(facts.subnet_file)
    except ValueError as exc:
        return Unavailable(f"{facts.subnet_file_path} does not parse: {exc}")


def own_subnet(facts: NodeFacts) -> Fact[IPv4Network]:
    """Our subnet: the one whose network address the VTEP carries, else the subnet file's."""
    if not isinstance(facts.vtep, Unavailable) and not isinstance(facts.config, Unavailable):
        for address in facts.vtep.addresses:
            if address.ip in facts.config.network:
                return facts.config.subnet_at(address.ip)
    values = subnet_file_values(facts)
    if not isinstance(values, Unavailable):
        return values.gateway.network
    return Unavailable(f"neither {facts.vtep_name} nor the subnet file names this node's subnet")


def own_lease(facts: NodeFacts) -> Fact[Lease]:
    subnet = own_subnet(facts)
    why = _missing(facts.leases, subnet)
    if why:
        return Unavailable(why)
    lease = facts.leases.get(subnet)
    return lease if lease is not None else Unavailable(f"no lease for {subnet} in etcd")


def expected_mtu(facts: NodeFacts) -> Fact[int]:
    """The config's MTU, else the underlay's minus the VXLAN overhead."""
    if not isinstance(facts.config, Unavailable) and facts.config.mtu:
        return facts.config.mtu
    if isinstance(facts.underlay, Unavailable):
        return Unavailable(f"underlay unknown: {facts.underlay.reason}")
    return facts.underlay.mtu - VXLAN_OVERHEAD


def pod_network(facts: NodeFacts) -> Fact[IPv4Network]:
    """The config's network, else the subnet file's (so the firewall is checked while etcd is away)."""
    if not isinstance(facts.config, Unavailable):
        return facts.config.network
    values = subnet_file_values(facts)
    if isinstance(values, Unavailable):
        return Unavailable("neither the config nor the subnet file names the pod network")
    return values.network


def peer_leases(facts: NodeFacts) -> Fact[list[Lease]]:
    subnet = own_subnet(facts)
    why = _missing(facts.leases, subnet)
    if why:
        return Unavailable(why)
    return trusted_peers(sorted(facts.leases.values()), subnet)


# --- the checks -------------------------------------------------------------------


AGENT_FIX = "start (or restart) `vxlan-net agent` on this node and read its log; it sets this up at start-up"


def check_config(facts: NodeFacts) -> Finding:
    config = facts.config
    if isinstance(config, Unavailable):
        fix = (f"make etcd reachable at {facts.etcd_endpoints} (or give --etcd-endpoints/--etcd-prefix)"
               if "etcd" in config.reason else "write it with `vxlan-net config set --network CIDR`")
        return Finding(False, "config", config.reason, fix)
    mtu = config.mtu or "auto"
    return Finding(True, "config", f"Network {config.network}, SubnetLen {config.subnet_len}, VNI {config.vni}, "
                                   f"Port {config.port}, MTU {mtu}")


def check_own_lease(facts: NodeFacts) -> Finding:
    lease = own_lease(facts)
    if isinstance(lease, Unavailable):
        fix = "fix the failures above first" if isinstance(facts.leases, Unavailable) else \
            "the agent re-acquires its lease when it is gone; " + AGENT_FIX
        return Finding(False, "own lease", lease.reason, fix)
    item = f"own lease {lease.subnet}"
    if not isinstance(facts.node_addresses, Unavailable) and lease.public_ip not in facts.node_addresses:
        return Finding(False, item, f"PublicIP {lease.public_ip} is not on this node any more (renumbered?): "
                                    "peers send its pods' traffic to an address nobody answers",
                       "an agent run with --iface only moves to the interface's new address by itself within "
                       "seconds; one run with --public-ip keeps it: restart it with the node's new address "
                       "(`--public-ip <new>`, or without --public-ip to follow --iface); the subnet and MAC stay")
    problems = []
    if isinstance(facts.vtep, Unavailable):
        problems.append(f"cannot compare with {facts.vtep_name}: {facts.vtep.reason}")
    else:
        local = facts.vtep.vxlan.local if facts.vtep.vxlan else None
        if local != lease.public_ip:
            problems.append(f"PublicIP {lease.public_ip} but {facts.vtep_name} sends from {local}")
        if facts.vtep.mac != lease.vtep_mac:
            problems.append(f"VtepMAC {lease.vtep_mac} but {facts.vtep_name} has MAC {facts.vtep.mac}")
    if problems:
        return Finding(False, item, "; ".join(problems),
                       "peers send to the lease's PublicIP/VtepMAC: restart the agent so it rewrites the lease "
                       "and the device to agree")
    ttl = f", expires in {facts.own_lease_ttl}s" if facts.own_lease_ttl is not None else ""
    return Finding(True, item, f"PublicIP {lease.public_ip}, VtepMAC {lease.vtep_mac}{ttl}")


def check_state_dir(facts: NodeFacts) -> Finding:
    item = f"state {facts.state_path}"
    if isinstance(facts.state, Unavailable):
        return Finding(False, item, facts.state.reason,
                       "the agent creates it at start-up; without it a restart picks a new VTEP MAC")
    problems = []
    mac = str(facts.state.get("VtepMAC", "")).lower()
    if not isinstance(facts.vtep, Unavailable) and mac != facts.vtep.mac:
        problems.append(f"persisted VtepMAC {mac or 'none'} but {facts.vtep_name} has {facts.vtep.mac}")
    subnet = own_subnet(facts)
    if not isinstance(subnet, Unavailable) and facts.state.get("Subnet") != str(subnet):
        problems.append(f"persisted Subnet {facts.state.get('Subnet')} but this node holds {subnet}")
    if problems:
        return Finding(False, item, "; ".join(problems),
                       "a restarted agent would change its MAC or subnet: restart the agent now, so it persists "
                       "what it uses")
    return Finding(True, item, f"VtepMAC {mac}, Subnet {facts.state.get('Subnet')}")


def check_vtep(facts: NodeFacts) -> Finding:
    item = f"device {facts.vtep_name}"
    link = facts.vtep
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
    if not isinstance(lease, Unavailable) and vx.local != lease.public_ip:
        problems.append(f"local {vx.local}, the lease's PublicIP is {lease.public_ip}")
    if not isinstance(facts.underlay, Unavailable) and vx.underlay != facts.underlay.name:
        problems.append(f"underlay {vx.underlay}, expected {facts.underlay.name}")
    if vx.learning:
        problems.append("learning is on (must be nolearning)")
    mtu = expected_mtu(facts)
    if isinstance(mtu, Unavailable):
        problems.append(f"cannot check the MTU: {mtu.reason}")
    elif link.mtu != mtu:
        source = "config MTU" if not isinstance(config, Unavailable) and config.mtu else \
            f"underlay {facts.underlay.name} MTU {facts.underlay.mtu} - {VXLAN_OVERHEAD}"
        problems.append(f"MTU {link.mtu}, expected {mtu} ({source})")
    if not link.up:
        problems.append("down")
    subnet = own_subnet(facts)
    if not isinstance(subnet, Unavailable):
        want = IPv4Interface((subnet.network_address, 32))
        if want not in link.addresses:
            problems.append(f"lacks address {want}")
        extra = [str(a) for a in link.addresses if a != want]
        if extra:
            problems.append(f"extra addresses {', '.join(extra)}")
    if problems:
        return Finding(False, item, "; ".join(problems),
                       f"the agent fixes MTU, state and address and recreates a device with wrong VXLAN attributes "
                       f"at start-up; restart it (or e.g. `ip link set {link.name} mtu "
                       f"{mtu if not isinstance(mtu, Unavailable) else 'N'} up`)")
    return Finding(True, item, f"VNI {vx.vni}, port {vx.port}, local {vx.local} on {vx.underlay}, nolearning, "
                               f"MTU {link.mtu}, up, {', '.join(map(str, link.addresses))}")


def _entry_problems(want: OverlayEntries, have: OverlayEntries) -> list[str]:
    """Missing entries of one peer, naming a present entry with the wrong value as such."""
    problems = []
    for n in sorted(want.neighbours - have.neighbours):
        other = [h.mac for h in have.neighbours if h.ip == n.ip]
        problems.append(f"neighbour {n.ip} has lladdr {other[0]}, lease says {n.mac}" if other
                        else f"missing neighbour {n.ip} lladdr {n.mac}")
    for f in sorted(want.fdb - have.fdb):
        other = sorted(str(h.dst) for h in have.fdb if h.mac == f.mac)
        problems.append(f"FDB entry {f.mac} points to {', '.join(other)}, lease says {f.dst}" if other
                        else f"missing FDB entry {f.mac} dst {f.dst}")
    for r in sorted(want.routes - have.routes):
        other = [str(h.gateway) for h in have.routes if h.subnet == r.subnet]
        problems.append(f"route {r.subnet} goes via {other[0]}, expected via {r.gateway}" if other
                        else f"missing route {r.subnet} via {r.gateway}")
    for r in sorted(want.direct_routes - have.direct_routes):
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


def _restore_commands(lease: Lease, device: str, underlay: Optional[str] = None) -> str:
    """What the agent would write for this peer; `underlay` set: the peer is direct."""
    if underlay is not None:
        return f"`ip route replace {lease.subnet} via {lease.public_ip} dev {underlay} proto {ROUTE_PROTO}`"
    g = lease.gateway
    return (f"`ip neigh replace {g} lladdr {lease.vtep_mac} dev {device} nud permanent; "
            f"bridge fdb append {lease.vtep_mac} dev {device} dst {lease.public_ip} self permanent; "
            f"ip route replace {lease.subnet} via {g} dev {device} onlink proto {ROUTE_PROTO}`")


def _foreign_routes(facts: NodeFacts, lease: Lease) -> list[MainRoute]:
    """Main-table routes for the peer's subnet that someone else installed with metric 0, the slot ours
    needs (one with another metric lives beside ours and does not keep it out)."""
    if isinstance(facts.main_routes, Unavailable):
        return []
    return sorted(r for r in facts.main_routes
                  if r.dst == lease.subnet and r.protocol != ROUTE_PROTO and r.metric == 0)


def check_peers(facts: NodeFacts) -> list[Finding]:
    """One finding per peer lease (its route, neighbour and FDB entry), then one for entries of no peer."""
    peers = peer_leases(facts)
    why = _missing(peers, facts.entries)
    if why:
        return [Finding(False, "peer entries", f"not checked: {why}", "fix the failures above first")]
    have: OverlayEntries = facts.entries
    findings = []
    fix = ("the agent restores them on its next resync (--resync-interval); if they stay missing, read its log; "
           "by hand: ")
    reach = peer_reach(facts)
    for lease in peers:
        mode = mode_of(reach, lease.public_ip)
        item = f"peer {lease.subnet} at {lease.public_ip}" + (f" ({mode})" if reach is not None else "")
        want = desired_entries([lease], reach.is_direct if reach else None)
        problems = _entry_problems(want, have)
        blocking = _foreign_routes(facts, lease) if not (want.routes <= have.routes
                                                         and want.direct_routes <= have.direct_routes) else []
        if blocking:
            problems = [p for p in problems if not p.startswith(f"missing route {lease.subnet} ")]
            problems += [f"route {r} is not vxlan-net's, so the agent does not route {lease.subnet} into the "
                         f"overlay" for r in blocking]
            findings.append(Finding(False, item, "; ".join(problems),
                                    "delete it: " + "; ".join(f"`ip route del {r}`" for r in blocking)
                                    + "; the agent adds its own route on its next resync"))
        elif problems:
            underlay = facts.underlay.name if mode == DIRECT else None
            findings.append(Finding(False, item, "; ".join(problems),
                                    fix + _restore_commands(lease, facts.vtep_name, underlay)))
        elif mode == DIRECT:
            findings.append(Finding(True, item, f"route via {lease.public_ip} dev {facts.underlay.name} in place, "
                                                f"no tunnel entries needed"))
        else:
            findings.append(Finding(True, item, f"route, neighbour {lease.gateway} and FDB entry {lease.vtep_mac} "
                                                f"in place"))
    want = desired_entries(peers, reach.is_direct if reach else None)
    extra = ([f"neighbour {n.ip} lladdr {n.mac}" for n in sorted(have.neighbours - want.neighbours)
              if n.ip not in {w.ip for w in want.neighbours}]
             + [f"FDB entry {f.mac} dst {f.dst}" for f in sorted(have.fdb - want.fdb)]
             + [f"route {r.subnet} via {r.gateway}" for r in sorted(have.routes - want.routes)
                if r.subnet not in {w.subnet for w in want.routes}]
             + [f"direct route {r.subnet} via {r.gateway}" for r in sorted(have.direct_routes - want.direct_routes)
                if r.subnet not in {w.subnet for w in want.direct_routes}])
    if extra:
        findings.append(Finding(False, "stale entries", f"entries for no current lease: {'; '.join(extra)}",
                                "the agent removes them on its next resync; if they stay, read its log"))
    else:
        findings.append(Finding(True, "stale entries", f"none on {facts.vtep_name} ({len(peers)} peer{'s' if len(peers) != 1 else ''})"))
    return findings


def check_bridge(facts: NodeFacts) -> Finding:
    item = f"bridge {facts.bridge_name}"
    link = facts.bridge
    values = subnet_file_values(facts)
    if isinstance(values, Unavailable):
        subnet = own_subnet(facts)
        gateway = (Unavailable(values.reason) if isinstance(subnet, Unavailable)
                   else IPv4Interface((int(subnet.network_address) + 1, subnet.prefixlen)))
    else:
        gateway = values.gateway
    if isinstance(link, Unavailable):
        return Finding(False, item, link.reason,
                       "the CNI plugin creates it with the first pod; run a pod, or check --bridge")
    problems = []
    if link.kind != "bridge":
        problems.append(f"is a {link.kind or 'device'}, not a bridge")
    if not link.up:
        problems.append("down")
    if isinstance(gateway, Unavailable):
        problems.append(f"cannot check its address: {gateway.reason}")
    elif gateway not in link.addresses:
        have = ", ".join(map(str, link.addresses)) or "none"
        problems.append(f"lacks the gateway address {gateway} (has {have})")
    if problems:
        return Finding(False, item, "; ".join(problems),
                       f"`ip link set {link.name} up`"
                       + (f"; `ip addr replace {gateway} dev {link.name}`" if not isinstance(gateway, Unavailable)
                          else ""))
    return Finding(True, item, f"up, {gateway}")


def check_subnet_file(facts: NodeFacts) -> Finding:
    item = f"subnet file {facts.subnet_file_path}"
    values = subnet_file_values(facts)
    if isinstance(values, Unavailable):
        return Finding(False, item, values.reason, "the agent writes it at start-up: restart the agent")
    problems = []
    config, lease = facts.config, own_lease(facts)
    if not isinstance(config, Unavailable) and values.network != config.network:
        problems.append(f"VXLAN_NET_NETWORK {values.network}, config says {config.network}")
    if not isinstance(lease, Unavailable):
        if values.gateway.network != lease.subnet:
            problems.append(f"VXLAN_NET_SUBNET {values.gateway}, our lease is {lease.subnet}")
    if values.gateway.ip != values.gateway.network.network_address + 1:
        problems.append(f"VXLAN_NET_SUBNET {values.gateway} is not the subnet's first host address")
    mtu = expected_mtu(facts)
    if not isinstance(mtu, Unavailable) and values.mtu != mtu:
        problems.append(f"VXLAN_NET_MTU {values.mtu}, expected {mtu}")
    if problems:
        return Finding(False, item, "; ".join(problems),
                       "the agent rewrites it at start-up: restart the agent (pods made since use wrong values)")
    return Finding(True, item, f"network {values.network}, subnet {values.gateway}, MTU {values.mtu}, "
                               f"IPMASQ {'true' if values.ip_masq else 'false'}")


def _prefix_match(expr: Mapping[str, Any], field: str) -> Optional[IPv4Network]:
    """The network of an `ip <field> <prefix>` match expression, else None."""
    match = expr.get("match") if isinstance(expr, Mapping) else None
    if not isinstance(match, Mapping) or match.get("op", "==") != "==":
        return None
    left, right = match.get("left"), match.get("right")
    if not isinstance(left, Mapping) or left.get("payload", {}).get("field") != field:
        return None
    try:
        if isinstance(right, Mapping) and "prefix" in right:
            return IPv4Network(f"{right['prefix']['addr']}/{right['prefix']['len']}")
        if isinstance(right, str):
            return IPv4Network(right)
    except (KeyError, TypeError, ValueError):
        return None
    return None


def _rules(nft: Mapping[str, Any], chain: str) -> list[list[Mapping[str, Any]]]:
    """The expression lists of the table's rules in `chain`, in chain order."""
    return [item["rule"].get("expr", []) for item in nft.get("nftables", [])
            if isinstance(item, Mapping) and isinstance(item.get("rule"), Mapping)
            and item["rule"].get("chain") == chain]


def _matches(expr_list, saddr: Optional[IPv4Network], daddr: Optional[IPv4Network], verdict: str) -> bool:
    found_s = [n for n in (_prefix_match(e, "saddr") for e in expr_list) if n]
    found_d = [n for n in (_prefix_match(e, "daddr") for e in expr_list) if n]
    return (found_s == ([saddr] if saddr else []) and found_d == ([daddr] if daddr else [])
            and any(isinstance(e, Mapping) and verdict in e for e in expr_list))


def check_firewall(facts: NodeFacts) -> Finding:
    """Our table exists; with the ingress filter on, every peer's public IP may send us VXLAN."""
    item = f"nftables table ip {NFT_TABLE}"
    if isinstance(facts.nft, Unavailable):
        return Finding(False, item, facts.nft.reason, "the agent installs it at start-up: restart the agent")
    filtering = any(isinstance(e, Mapping) and "drop" in e for r in _rules(facts.nft, "input") for e in r)
    if not filtering:
        return Finding(True, item, "present; VXLAN ingress filter off")
    allowed = {str(e) for item_ in facts.nft.get("nftables", []) if isinstance(item_, Mapping)
               and isinstance(item_.get("set"), Mapping) for e in item_["set"].get("elem", [])}
    peers = peer_leases(facts)
    if isinstance(peers, Unavailable):  # etcd down: the config line already fails; say what we could see
        return Finding(True, item, f"VXLAN ingress filter on ({len(allowed)} addresses allowed; "
                                   f"not compared with the leases: {peers.reason})")
    blocked = sorted({str(lease.public_ip) for lease in peers} - allowed)
    if blocked:
        return Finding(False, item, f"ingress filter drops VXLAN from peer nodes {', '.join(blocked)}",
                       "the agent updates the set with the leases: restart it if this persists past a resync")
    return Finding(True, item, f"VXLAN accepted only from the {len(peers)} peer nodes' addresses")


def check_masquerade(facts: NodeFacts) -> Finding:
    item = "masquerade"
    values, network = subnet_file_values(facts), pod_network(facts)
    why = _missing(values, network)
    if why:
        return Finding(False, item, f"not checked: {why}", "fix the failures above first")
    if not values.ip_masq:
        return Finding(True, item, "off (VXLAN_NET_IPMASQ=false)")
    if isinstance(facts.nft, Unavailable):
        return Finding(False, item, f"VXLAN_NET_IPMASQ=true but {facts.nft.reason}",
                       "the agent installs it with --ip-masq at start-up: restart the agent")
    rules = _rules(facts.nft, "postrouting")
    masq = next((i for i, r in enumerate(rules) if _matches(r, network, None, "masquerade")), None)
    keep = next((i for i, r in enumerate(rules) if _matches(r, network, network, "return")), None)
    if masq is None:
        return Finding(False, item, f"VXLAN_NET_IPMASQ=true but no `ip saddr {network} masquerade` rule",
                       "restart the agent with --ip-masq")
    if keep is None or keep > masq:
        return Finding(False, item, f"pod-to-pod traffic would be masqueraded: no `ip saddr {network} "
                                    f"ip daddr {network} return` before the masquerade rule",
                       "restart the agent, which replaces the whole table")
    return Finding(True, item, f"traffic from {network} leaving it is masqueraded; pod-to-pod is not")


def check_ip_forward(facts: NodeFacts) -> Finding:
    if isinstance(facts.ip_forward, Unavailable):
        return Finding(False, "ip_forward", facts.ip_forward.reason, "`sysctl -w net.ipv4.ip_forward=1`")
    if not facts.ip_forward:
        return Finding(False, "ip_forward", "net.ipv4.ip_forward is 0: pod traffic is not routed",
                       "`sysctl -w net.ipv4.ip_forward=1` (the agent sets it at start-up)")
    return Finding(True, "ip_forward", "on")


def run_checks(facts: NodeFacts) -> list[Finding]:
    findings = [check_config(facts)]
    if facts.invalid_leases:
        findings.append(Finding(False, "lease records", "records skipped: " + "; ".join(facts.invalid_leases),
                                "delete or rewrite them (`etcdctl del <prefix>/subnets/<key>`)"))
    findings += [check_own_lease(facts), check_state_dir(facts), check_vtep(facts)]
    findings += check_peers(facts)
    findings += [check_bridge(facts), check_subnet_file(facts), check_firewall(facts), check_masquerade(facts),
                 check_ip_forward(facts)]
    return findings


# --- the probe (the pure half) ------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TunnelFrame:
    """One VXLAN frame seen on the underlay, reduced to what the probe check needs."""

    outer_src: IPv4Address
    outer_dst: IPv4Address
    vni: int
    inner_src: Optional[IPv4Address]
    inner_dst: Optional[IPv4Address]
    icmp_type: Optional[int] = None
    """8 echo request, 0 echo reply, None for anything but ICMP."""


@dataclasses.dataclass(frozen=True)
class ProbePlan:
    """What a probe to `dest` must look like on the underlay."""

    dest: IPv4Address
    source: IPv4Address
    """Our bridge gateway address: a pod-network source."""
    peer: Lease
    """The lease whose subnet holds `dest`."""
    vni: int
    port: int
    local: Optional[IPv4Address]
    underlay: str


def plan_probe(facts: NodeFacts, dest: IPv4Address) -> Fact[ProbePlan]:
    """Where a probe to `dest` must go, or why it cannot be planned."""
    why = _missing(facts.config, facts.leases)
    if why:
        return Unavailable(why)
    if dest not in facts.config.network:
        return Unavailable(f"{dest} is outside the pod network {facts.config.network}")
    subnet = own_subnet(facts)
    if not isinstance(subnet, Unavailable) and dest in subnet:
        return Unavailable(f"{dest} is in this node's own subnet {subnet}: it never crosses the tunnel")
    peer = next((lease for s, lease in facts.leases.items() if dest in s), None)
    if peer is None:
        return Unavailable(f"no lease covers {dest}: no node holds its subnet")
    values = subnet_file_values(facts)
    if isinstance(values, Unavailable):
        if isinstance(subnet, Unavailable):
            return Unavailable(f"no source address: {values.reason}")
        source = subnet.network_address + 1
    else:
        source = values.gateway.ip
    if isinstance(facts.underlay, Unavailable):
        return Unavailable(f"underlay unknown: {facts.underlay.reason}")
    if mode_of(peer_reach(facts), peer.public_ip) == DIRECT:
        return Unavailable(f"{dest} is on a direct peer ({peer.public_ip}): its packets leave unencapsulated, "
                           f"and the probe checks the tunnel; ping it, or watch `vxlan-net inspect` on "
                           f"{facts.underlay.name}")
    local = facts.vtep.vxlan.local if not isinstance(facts.vtep, Unavailable) and facts.vtep.vxlan else None
    return ProbePlan(dest, source, peer, facts.config.vni, facts.config.port, local, facts.underlay.name)


def check_probe(plan: ProbePlan, frames: Sequence[TunnelFrame], replied: bool) -> list[Finding]:
    """Did a frame carrying our probe leave for the right node, with our VNI and untouched inner addresses?"""
    item = f"probe {plan.source} -> {plan.dest}"
    out = [f for f in frames if f.inner_dst == plan.dest and f.icmp_type == 8]
    if not out:
        seen = "; ".join(f"{f.outer_src}->{f.outer_dst} vni {f.vni} inner {f.inner_src}->{f.inner_dst}"
                         for f in frames[:3]) or "no VXLAN frames at all"
        return [Finding(False, item, f"no VXLAN frame carrying an echo request to {plan.dest} left {plan.underlay} "
                                     f"(seen: {seen})",
                        f"check the route, neighbour and FDB entries for {plan.peer.subnet} above")]
    frame = out[0]
    problems = []
    if frame.outer_dst != plan.peer.public_ip:
        problems.append(f"outer destination {frame.outer_dst}, but {plan.peer.subnet} is held by "
                        f"{plan.peer.public_ip}")
    if plan.local is not None and frame.outer_src != plan.local:
        problems.append(f"outer source {frame.outer_src}, expected {plan.local}")
    if frame.vni != plan.vni:
        problems.append(f"VNI {frame.vni}, expected {plan.vni}")
    if frame.inner_src != plan.source:
        problems.append(f"inner source {frame.inner_src}, expected {plan.source} (rewritten: NAT?)")
    summary = (f"outer {frame.outer_src} -> {frame.outer_dst} (node of {plan.peer.subnet}), VNI {frame.vni}, "
               f"inner {frame.inner_src} -> {frame.inner_dst}")
    if problems:
        return [Finding(False, item, "; ".join(problems) + f" [{summary}]",
                        "compare the FDB entry for the peer's VtepMAC with its lease; check the nftables rules")]
    findings = [Finding(True, item, summary)]
    back = [f for f in frames if f.inner_src == plan.dest and f.inner_dst == plan.source and f.icmp_type == 0]
    if back:
        findings.append(Finding(True, f"reply {plan.dest} -> {plan.source}",
                                f"outer {back[0].outer_src} -> {back[0].outer_dst}, VNI {back[0].vni}"))
    elif replied:
        findings.append(Finding(True, f"reply {plan.dest} -> {plan.source}",
                                "ping got a reply, but it was not captured on the underlay"))
    else:
        findings.append(Finding(False, f"reply {plan.dest} -> {plan.source}",
                                f"no reply from {plan.dest} (the probe left correctly)",
                                f"run `vxlan-net doctor` on the node {plan.peer.public_ip}: its entries back to us, "
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


def _read_leases(store, config: NetworkConfig, protected: Mapping[IPv4Address, str]):
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
    ids = {lease.subnet: snapshot.records[subnet_key_name(lease.subnet)].lease_id for lease in book.peers()}
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


def _read_nft() -> Fact[Mapping[str, Any]]:
    nft = shutil.which("nft") or "/usr/sbin/nft"
    try:
        proc = subprocess.run([nft, "-j", "list", "table", "ip", NFT_TABLE], capture_output=True, text=True,
                              timeout=15)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Unavailable(f"cannot run nft: {exc}")
    if proc.returncode != 0:
        if "No such file" in proc.stderr:
            return Unavailable(f"the nftables table ip {NFT_TABLE} does not exist")
        return Unavailable(f"nft -j list table ip {NFT_TABLE}: {proc.stderr.strip()}")
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


def _read_ip_forward() -> Fact[bool]:
    text = _read_text(Path("/proc/sys/net/ipv4/ip_forward"))
    return text if isinstance(text, Unavailable) else text.strip() == "1"


def gather_facts(options: DoctorOptions, store) -> NodeFacts:
    """Read everything the checks need from `store` (an EtcdStore, closed by the caller) and this
    namespace's kernel and files; nothing is written anywhere."""
    from vxlan_net.doors import kernel
    from vxlan_net.core.errors import KernelError, VxlanNetError

    from vxlan_net.core.underlay import underlay_addresses

    config = _read_config(store, options.etcd_prefix)
    if isinstance(config, Unavailable):
        # The data plane can still be checked while etcd is away.
        device = next((n for n in kernel.vxlan_link_names() if n.startswith(VTEP_PREFIX)), vtep_name(1))
    else:
        device = vtep_name(config.vni)
    try:
        main_routes: Fact[tuple[MainRoute, ...]] = tuple(kernel.main_table_routes())
        protected = {} if isinstance(config, Unavailable) else underlay_addresses(
            store.endpoint_addresses(), kernel.node_addresses(), main_routes, config, device)
    except KernelError as exc:
        main_routes, protected = Unavailable(f"cannot read the main routing table: {exc}"), {}
    try:
        node_addresses: Fact[frozenset[IPv4Address]] = frozenset(a.interface.ip for a in kernel.node_addresses())
    except KernelError as exc:
        node_addresses = Unavailable(f"cannot read this node's addresses: {exc}")
    leases, invalid, ids = (Unavailable("leases not read: see the config line"), (), {}) \
        if isinstance(config, Unavailable) else _read_leases(store, config, protected)
    vtep = _link(kernel, device)
    iface = options.iface or (vtep.vxlan.underlay if not isinstance(vtep, Unavailable) and vtep.vxlan else None)
    underlay = _link(kernel, iface) if iface else Unavailable(f"{device} names no underlay: give --iface")
    try:
        # Direct routes live on the underlay device; without it, only the tunnel entries are read.
        entries: Fact[OverlayEntries] = kernel.read_overlay_entries(
            device, underlay=None if isinstance(underlay, Unavailable) else underlay.name)
    except KernelError as exc:
        entries = Unavailable(f"cannot read the entries of {device}: {exc}")
    state_path = Path(options.state_dir) / "node.json"
    facts = NodeFacts(
        config=config, leases=leases, invalid_leases=invalid, vtep_name=device, vtep=vtep,
        underlay=underlay, entries=entries, bridge=_link(kernel, options.bridge),
        subnet_file=_read_text(options.subnet_file), nft=_read_nft(), ip_forward=_read_ip_forward(),
        state=_read_state(state_path), subnet_file_path=str(options.subnet_file), state_path=str(state_path),
        bridge_name=options.bridge, etcd_endpoints=options.etcd_endpoints, main_routes=main_routes,
        node_addresses=node_addresses,
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
    """A scapy packet from the underlay as a TunnelFrame, or None if it is no VXLAN frame to `port`."""
    from vxlan_net.tools.inspect_frames import InspectContext, decode_frame

    frame = decode_frame(packet, InspectContext(port=port))
    if frame is None:
        return None
    v4 = lambda a: a if isinstance(a, IPv4Address) else None  # noqa: E731 (an IPv6 or ARP inner is not ours)
    return TunnelFrame(frame.outer_src, frame.outer_dst, frame.vni, v4(frame.inner_src), v4(frame.inner_dst),
                       frame.icmp_type if frame.protocol == "icmp" else None)


def run_probe(plan: ProbePlan, timeout: float = 3.0) -> tuple[list[TunnelFrame], bool]:
    """Ping `plan.dest` from the bridge address while capturing `udp port <port>` on the underlay.

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
        proc = subprocess.run([ping, "-n", "-c", "1", "-W", str(int(max(1, timeout))), "-I", str(plan.source),
                               str(plan.dest)], capture_output=True, text=True, timeout=timeout + 5)
        time.sleep(0.2)  # let the reply's frame reach the capture
    finally:
        if sniffer.running:
            sniffer.stop(join=False)
        sniffer.join(timeout + 3)
    if sniffer.exception is not None:
        raise RuntimeError(f"the capture on {plan.underlay} failed: {sniffer.exception}")
    frames = [f for f in (tunnel_frame(p, plan.port) for p in (sniffer.results or [])) if f is not None]
    return frames, proc.returncode == 0
