"""The nftables door: our own table (ingress filter of VXLAN to node IPs, the pod-to-VXLAN-port drop, optional
masquerade) and the tagged FORWARD rules in iptables-nft's filter table that let pod traffic through."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import subprocess
from ipaddress import IPv4Address, IPv4Network
from typing import Iterable, Optional

from vxlan_net.core.errors import KernelError
from vxlan_net.core.names import NFT_TABLE

log = logging.getLogger(__name__)

TABLE = NFT_TABLE
# iptables-nft keeps the FORWARD chain (and its policy) in `ip filter`; an accept in
# our own table cannot override a drop there, so we append tagged rules to it when it exists.
IPTABLES_FORWARD = ("ip", "filter", "FORWARD")
# Ours are the FORWARD rules whose comment starts with this (also the one-rule-per-direction
# "vxlan-net pod network" of earlier versions, which an upgrade replaces).
FORWARD_TAG = "vxlan-net"


PEER_SET = "vxlan_peers"
# nft answers in milliseconds even with thousands of peers; one that takes longer hangs (a stuck
# lock, a broken binary), and the agent's loop must not wait with it: it retries later instead.
NFT_TIMEOUT = 5.0
NOT_A_NODE = "vxlan-net: VXLAN from a non-node"
POD_TO_VXLAN_PORT = "vxlan-net: pod traffic to the VXLAN port"


@dataclasses.dataclass(frozen=True)
class ForwardDevices:
    """The devices pod traffic is forwarded between: the CNI bridge and our VTEP, and with direct routing
    the underlay device, from which the pod network's packets arrive unencapsulated."""

    bridge: str
    vtep: str
    underlay: Optional[str] = None
    """Set with direct routing (then `pod_network` too)."""
    pod_network: Optional[IPv4Network] = None


def render_ruleset(network: IPv4Network, ip_masq: bool, vxlan_port: int,
                   peer_ips: Iterable[IPv4Address] = (), ingress_filter: bool = True) -> str:
    """Our whole table, replaced atomically by one `nft -f` transaction.

    No forward chain of our own: an accept there cannot override a drop in
    another table, and every base chain costs each forwarded packet (measured:
    ~10 us of pod-to-pod RTT); forwarding under a drop policy is handled by the
    tagged rules in iptables-nft's FORWARD chain instead.

    With `ingress_filter`, UDP to `vxlan_port` is accepted only from the nodes'
    public IPs (the set `vxlan_peers`); anyone else could inject frames that look
    like they come from any pod, since VXLAN has no authentication.

    Always, UDP from the pod network to `vxlan_port` is dropped before any
    source NAT: masqueraded to this node's address, a pod's frame would pass the
    peers' ingress filter as if this node had sent it. The drop sits in a nat
    chain ahead of srcnat, which only a connection's first packet traverses, so
    established pod traffic pays nothing for it (a forward chain would cost every
    packet); a dropped first packet leaves no connection, so every later one is
    first again and dropped too.
    """
    ingress = ""
    if ingress_filter:
        elements = _elements(peer_ips)
        ingress = f"""
    set {PEER_SET} {{
        type ipv4_addr;{f"{chr(10)}        elements = {{ {elements} }}" if elements else ""}
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        udp dport {vxlan_port} ip saddr != @{PEER_SET} counter drop comment "{NOT_A_NODE}"
    }}"""
    no_laundering = f"""
    chain pod_to_vxlan_port {{
        type nat hook postrouting priority srcnat - 10; policy accept;
        ip saddr {network} udp dport {vxlan_port} counter drop comment "{POD_TO_VXLAN_PORT}"
    }}"""
    masquerade = ""
    if ip_masq:
        masquerade = f"""
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr {network} ip daddr {network} return
        ip saddr {network} ip daddr 224.0.0.0/4 return
        ip saddr {network} masquerade fully-random
    }}"""
    return f"""table ip {TABLE}
delete table ip {TABLE}
table ip {TABLE} {{{no_laundering}{masquerade}{ingress}
}}
"""


def render_peer_update(peer_ips: Iterable[IPv4Address]) -> str:
    """Replace the set's elements in one transaction (counters and rules untouched)."""
    elements = _elements(peer_ips)
    text = f"flush set ip {TABLE} {PEER_SET}\n"
    return text + (f"add element ip {TABLE} {PEER_SET} {{ {elements} }}\n" if elements else "")


def render_peer_changes(added: Iterable[IPv4Address], removed: Iterable[IPv4Address]) -> str:
    """Add and delete just these elements, in one transaction (the rest of the set untouched).

    Deletions go first, so an address both removed and added (never both from one caller)
    ends up present. nft refuses to delete an element that is not there, which fails
    the whole transaction: the caller then knows the set is not what it thought."""
    text = ""
    for verb, ips in (("delete", removed), ("add", added)):
        elements = _elements(ips)
        if elements:
            text += f"{verb} element ip {TABLE} {PEER_SET} {{ {elements} }}\n"
    return text


def _elements(peer_ips: Iterable[IPv4Address]) -> str:
    # Sorted as addresses, none parsed again: a key function parsing 5,000 strings took ~20 ms.
    addresses = {ip if isinstance(ip, IPv4Address) else IPv4Address(ip) for ip in peer_ips}
    return ", ".join(map(str, sorted(addresses, key=int)))


def apply_rules(network: IPv4Network, ip_masq: bool, vxlan_port: int, devices: ForwardDevices,
                peer_ips: Iterable[IPv4Address] = (), ingress_filter: bool = True) -> None:
    """Install (or replace) our rules; idempotent.

    Peers already in the set are kept until the next update_peers(), so that
    re-applying the rules (an agent restart) never drops tunnel traffic.
    """
    peers = set(peer_ips) | set(current_peers())
    _nft(["-f", "-"], render_ruleset(network, ip_masq, vxlan_port, peers, ingress_filter))
    ensure_forward_rules(devices)


def update_peers(peer_ips: Iterable[IPv4Address]) -> None:
    """Set the public IPs allowed to send us VXLAN frames."""
    _nft(["-f", "-"], render_peer_update(peer_ips))


def change_peers(added: Iterable[IPv4Address], removed: Iterable[IPv4Address]) -> None:
    """Allow `added` and stop allowing `removed`, leaving every other element as it is: a join or a
    leave costs one small `nft` run, however many peers there are. Fails (KernelError) when an
    address to remove is not in the set."""
    text = render_peer_changes(added, removed)
    if text:
        _nft(["-f", "-"], text)


def current_peers() -> list[IPv4Address]:
    """The set's elements now; empty when the table or the set does not exist."""
    proc = _run(["-j", "list", "set", "ip", TABLE, PEER_SET], check=False)
    if proc.returncode != 0:
        return []
    for item in json.loads(proc.stdout).get("nftables", []):
        if "set" in item:
            return [IPv4Address(e) for e in item["set"].get("elem", []) if isinstance(e, str)]
    return []


def forward_rules(devices: ForwardDevices) -> list[tuple[str, list[dict]]]:
    """(comment, nft JSON expressions) of our FORWARD rules, in chain order.

    Only our two devices are matched, never the pod network's addresses: an
    address match would also accept spoofed traffic arriving on any interface.
    New connections into pods are accepted only from the overlay or when port-
    mapped (DNAT, e.g. the portmap plugin's hostPorts); anything else reaches
    pods only as replies.
    """
    def name(key: str, value: str) -> dict:
        return {"match": {"op": "==", "left": {"meta": {"key": key}}, "right": value}}

    def conntrack(key: str, value) -> dict:
        return {"match": {"op": "in", "left": {"ct": {"key": key}}, "right": value}}

    accept = [{"counter": None}, {"accept": None}]
    bridge, vtep = devices.bridge, devices.vtep
    direct = []
    if devices.underlay is not None and devices.pod_network is not None:
        # Direct peers' pods arrive on the underlay with their own addresses. Here the source
        # must be matched (the underlay also carries everything else), and strict rp_filter
        # backs it: a pod source is accepted on the underlay only where its subnet routes there.
        network = devices.pod_network
        from_pods = {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                               "right": {"prefix": {"addr": str(network.network_address), "len": network.prefixlen}}}}
        direct = [(f"{FORWARD_TAG}: direct peers' pods to pods",
                   [name("iifname", devices.underlay), name("oifname", bridge), from_pods, *accept])]
    return [
        (f"{FORWARD_TAG}: overlay to pods", [name("iifname", vtep), name("oifname", bridge), *accept]),
        *direct,
        (f"{FORWARD_TAG}: pods to the overlay and out", [name("iifname", bridge), *accept]),
        (f"{FORWARD_TAG}: replies to pods", [name("oifname", bridge),
                                              conntrack("state", ["established", "related"]), *accept]),
        (f"{FORWARD_TAG}: port-mapped to pods", [name("oifname", bridge), conntrack("status", "dnat"), *accept]),
    ]


def ensure_forward_rules(devices: ForwardDevices) -> bool:
    """Make our rules in iptables-nft's FORWARD chain exactly `forward_rules()`; True if it had to.

    Cheap when nothing changed: one `nft -j list chain`. Otherwise our old rules
    go and the new ones are appended (after other tools' rules, which keep
    deciding first) in one `nft -f` transaction, so there is no moment without
    them. Nothing is done when the chain does not exist (no iptables-nft here).
    """
    proc = _run(["-j", "list", "chain", *IPTABLES_FORWARD], check=False)
    if proc.returncode != 0:
        return False
    found, handles = _tagged_rules(proc.stdout)
    wanted = forward_rules(devices)
    if found == wanted:
        return False
    family, table, chain = IPTABLES_FORWARD
    where = {"family": family, "table": table, "chain": chain}
    commands = [{"delete": {"rule": {**where, "handle": handle}}} for handle in handles]
    commands += [{"add": {"rule": {**where, "expr": expr, "comment": comment}}} for comment, expr in wanted]
    _nft(["-j", "-f", "-"], json.dumps({"nftables": commands}))
    return True


def _tagged_rules(listing: str) -> tuple[list[tuple[str, list[dict]]], list[int]]:
    """Our rules in a `nft -j list chain` (comment, expressions with counters blanked) and their handles."""
    rules, handles = [], []
    try:
        items = json.loads(listing).get("nftables", [])
    except (ValueError, AttributeError):
        raise KernelError("nft -j list chain printed something that is not an nft JSON listing") from None
    for item in items:
        rule = item.get("rule") if isinstance(item, dict) else None
        if isinstance(rule, dict) and str(rule.get("comment", "")).startswith(FORWARD_TAG):
            expr = [{"counter": None} if isinstance(e, dict) and "counter" in e else e for e in rule.get("expr", [])]
            rules.append((rule["comment"], expr))
            handles.append(rule["handle"])
    return rules, handles


def _nft(args: list[str], stdin: str | None = None) -> str:
    proc = _run(args, stdin=stdin, check=True)
    return proc.stdout


def _run(args: list[str], stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """`nft` with a deadline; every way it can fail is a KernelError, which callers retry."""
    nft = shutil.which("nft") or "/usr/sbin/nft"
    try:
        proc = subprocess.run([nft, *args], input=stdin, capture_output=True, text=True, timeout=NFT_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise KernelError(f"nft {' '.join(args)} did not finish within {NFT_TIMEOUT:g}s") from None
    except OSError as exc:
        raise KernelError(f"cannot run {nft}: {exc.strerror or exc}") from None
    if check and proc.returncode != 0:
        raise KernelError(f"nft {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc
