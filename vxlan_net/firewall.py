"""nftables rules of our own: pod-network forwarding and masquerade of egress traffic."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from ipaddress import IPv4Address, IPv4Network
from typing import Iterable, Optional

from .errors import KernelError

log = logging.getLogger(__name__)

TABLE = "vxlan-net"
RULE_COMMENT = "vxlan-net pod network"
# iptables-nft keeps the FORWARD chain (and its policy) in `ip filter`; an accept in
# our own table cannot override a drop there, so we add tagged rules to it when it exists.
IPTABLES_FORWARD = ("ip", "filter", "FORWARD")


PEER_SET = "vxlan_peers"
# nft answers in milliseconds even with thousands of peers; one that takes longer hangs (a stuck
# lock, a broken binary), and the agent's loop must not wait with it: it retries later instead.
NFT_TIMEOUT = 5.0
NOT_A_NODE = "vxlan-net: VXLAN from a non-node"


def render_ruleset(network: IPv4Network, ip_masq: bool, vxlan_port: Optional[int] = None,
                   peer_ips: Iterable[IPv4Address] = ()) -> str:
    """Our whole table, replaced atomically by one `nft -f` transaction.

    No forward chain of our own: an accept there cannot override a drop in
    another table, and every base chain costs each forwarded packet (measured:
    ~10 us of pod-to-pod RTT); forwarding under a drop policy is handled by the
    tagged rules in iptables-nft's FORWARD chain instead.

    With `vxlan_port`, UDP to that port is accepted only from the nodes' public
    IPs (the set `vxlan_peers`); anyone else could inject frames that look like
    they come from any pod, since VXLAN has no authentication.
    """
    ingress = ""
    if vxlan_port is not None:
        elements = _elements(peer_ips)
        ingress = f"""
    set {PEER_SET} {{
        type ipv4_addr;{f"{chr(10)}        elements = {{ {elements} }}" if elements else ""}
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        udp dport {vxlan_port} ip saddr != @{PEER_SET} counter drop comment "{NOT_A_NODE}"
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
table ip {TABLE} {{{masquerade}{ingress}
}}
"""


def render_peer_update(peer_ips: Iterable[IPv4Address]) -> str:
    """Replace the set's elements in one transaction (counters and rules untouched)."""
    elements = _elements(peer_ips)
    text = f"flush set ip {TABLE} {PEER_SET}\n"
    return text + (f"add element ip {TABLE} {PEER_SET} {{ {elements} }}\n" if elements else "")


def _elements(peer_ips: Iterable[IPv4Address]) -> str:
    return ", ".join(sorted({str(ip) for ip in peer_ips}, key=lambda a: IPv4Address(a)))


def apply_rules(network: IPv4Network, ip_masq: bool, vxlan_port: Optional[int] = None,
                peer_ips: Iterable[IPv4Address] = ()) -> None:
    """Install (or replace) our rules; idempotent.

    Peers already in the set are kept until the next update_peers(), so that
    re-applying the rules (an agent restart) never drops tunnel traffic.
    """
    peers = set(peer_ips) | set(current_peers())
    _nft(["-f", "-"], render_ruleset(network, ip_masq, vxlan_port, peers))
    _ensure_iptables_forward_accept(network)


def update_peers(peer_ips: Iterable[IPv4Address]) -> None:
    """Set the public IPs allowed to send us VXLAN frames."""
    _nft(["-f", "-"], render_peer_update(peer_ips))


def current_peers() -> list[IPv4Address]:
    """The set's elements now; empty when the table or the set does not exist."""
    proc = _run(["-j", "list", "set", "ip", TABLE, PEER_SET], check=False)
    if proc.returncode != 0:
        return []
    for item in json.loads(proc.stdout).get("nftables", []):
        if "set" in item:
            return [IPv4Address(e) for e in item["set"].get("elem", []) if isinstance(e, str)]
    return []


def _ensure_iptables_forward_accept(network: IPv4Network) -> None:
    if not _chain_exists(*IPTABLES_FORWARD):
        return
    for handle in _tagged_forward_handles():
        _nft(["delete", "rule", *IPTABLES_FORWARD, "handle", str(handle)])
    for direction in ("daddr", "saddr"):
        _nft(["insert", "rule", *IPTABLES_FORWARD, "ip", direction, str(network), "counter", "accept",
              "comment", f'"{RULE_COMMENT}"'])


def _chain_exists(family: str, table: str, chain: str) -> bool:
    return _run(["list", "chain", family, table, chain], check=False).returncode == 0


def _tagged_forward_handles() -> list[int]:
    if not _chain_exists(*IPTABLES_FORWARD):
        return []
    listing = _nft(["-j", "list", "chain", *IPTABLES_FORWARD])
    handles = []
    for item in json.loads(listing).get("nftables", []):
        rule = item.get("rule")
        if rule and rule.get("comment") == RULE_COMMENT:
            handles.append(rule["handle"])
    return handles


def _nft(args: list[str], stdin: str | None = None) -> str:
    proc = _run(args, stdin=stdin, check=True)
    return proc.stdout


def _run(args: list[str], stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run nft; a hang, a missing binary and (with `check`) a non-zero exit are KernelErrors."""
    nft = shutil.which("nft") or "/usr/sbin/nft"
    try:
        proc = subprocess.run([nft, *args], input=stdin, capture_output=True, text=True, timeout=NFT_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise KernelError(f"nft {' '.join(args)}: no answer within {NFT_TIMEOUT:g}s (killed)") from None
    except OSError as exc:  # missing, not executable, or its interpreter is missing
        raise KernelError(f"cannot run {nft}: {exc.strerror}") from None
    if check and proc.returncode != 0:
        raise KernelError(f"nft {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc
