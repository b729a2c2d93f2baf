"""The nftables door: our own tables (ingress filter of VXLAN to node IPs, the pod-to-VXLAN-port drop, optional
masquerade; `table ip vxlan-net` for IPv4, `table ip6 vxlan-net` for IPv6) and the tagged FORWARD rules in
iptables-nft's filter tables (`ip filter`, `ip6 filter`) that let pod traffic through."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import socket
import struct
import subprocess
import threading
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from typing import Iterable, Optional, Union

from cni import netlink as wire

from vxlan_net.core.errors import KernelError
from vxlan_net.core.names import NFT_TABLE

log = logging.getLogger(__name__)

TABLE = NFT_TABLE
# iptables-nft keeps the FORWARD chain (and its policy) in `ip filter`; an accept in
# our own table cannot override a drop there, so we append tagged rules to it when it exists.
IPTABLES_FORWARD = ("ip", "filter", "FORWARD")
IP6TABLES_FORWARD = ("ip6", "filter", "FORWARD")
# Ours are the FORWARD rules whose comment starts with this (also the one-rule-per-direction
# "vxlan-net pod network" of earlier versions, which an upgrade replaces).
FORWARD_TAG = "vxlan-net"


PEER_SET = "vxlan_peers"
# nft answers in milliseconds even with thousands of peers; one that takes longer hangs (a stuck
# lock, a broken binary), and the agent's loop must not wait with it: it retries later instead.
NFT_TIMEOUT = 5.0
NOT_A_NODE = "vxlan-net: VXLAN from a non-node"
POD_TO_VXLAN_PORT = "vxlan-net: pod traffic to the VXLAN port"

IPAddress = Union[IPv4Address, IPv6Address]
# Per nft family: the address type of the peer set and the multicast range masquerade leaves alone
# (flannel's MasqRules / MasqIP6Rules).
_FAMILY = {"ip": ("ipv4_addr", "224.0.0.0/4"), "ip6": ("ipv6_addr", "ff00::/8")}


@dataclasses.dataclass(frozen=True)
class ForwardDevices:
    """The devices pod traffic is forwarded between: the CNI bridge and our VTEP, and with direct routing
    the underlay device, from which the pod network's packets arrive unencapsulated."""

    bridge: str
    vtep: str
    underlay: Optional[str] = None
    """Set with direct routing (then `pod_network` too)."""
    pod_network: Optional[IPv4Network] = None
    vtep6: Optional[str] = None
    """The VTEP over the IPv6 underlay (`vxnet6.<VNI>`), when the node has one: pods' traffic of
    either family arrives on it."""
    pod_network6: Optional[IPv6Network] = None
    """The IPv6 pod network: set when pods have IPv6, which gets the same rules in `ip6 filter FORWARD`."""


def render_ruleset(network: Optional[IPv4Network], ip_masq: bool, vxlan_port: int,
                   peer_ips: Iterable[IPAddress] = (), ingress_filter: bool = True,
                   ipv6_network: Optional[IPv6Network] = None, ipv6_underlay: bool = False) -> str:
    """Our whole tables, replaced atomically by one `nft -f` transaction.

    No forward chain of our own: an accept there cannot override a drop in
    another table, and every base chain costs each forwarded packet (measured:
    ~10 us of pod-to-pod RTT); forwarding under a drop policy is handled by the
    tagged rules in iptables-nft's FORWARD chains instead.

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

    IPv6 gets the same in `table ip6 vxlan-net`, which exists only when there is
    something IPv6 to guard: an IPv6 pod network (`ipv6_network`: its own
    anti-laundering drop and masquerade), an IPv6 underlay (`ipv6_underlay`: the
    ingress filter, an empty set dropping all VXLAN over IPv6 until the first
    IPv6 peer) or IPv6 peers. Without them the text is exactly the IPv4 table.
    `peer_ips` may hold both families; each goes to its table's set.
    """
    peers4, peers6 = _by_family(peer_ips)
    text = _render_table("ip", network, ip_masq, vxlan_port, peers4, ingress_filter)
    if ipv6_network is not None or ipv6_underlay or peers6:
        text += _render_table("ip6", ipv6_network, ip_masq, vxlan_port, peers6, ingress_filter)
    return text


def _render_table(family: str, network: Optional[IPv4Network | IPv6Network], ip_masq: bool, vxlan_port: int,
                  peer_ips: Iterable[IPAddress], ingress_filter: bool) -> str:
    """One family's table (see render_ruleset); `network` None: no pod network of this family."""
    address_type, multicast = _FAMILY[family]
    ingress = ""
    if ingress_filter:
        elements = _elements(peer_ips)
        ingress = f"""
    set {PEER_SET} {{
        type {address_type};{f"{chr(10)}        elements = {{ {elements} }}" if elements else ""}
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        udp dport {vxlan_port} {family} saddr != @{PEER_SET} counter drop comment "{NOT_A_NODE}"
    }}"""
    no_laundering = ""
    if network is not None:
        no_laundering = f"""
    chain pod_to_vxlan_port {{
        type nat hook postrouting priority srcnat - 10; policy accept;
        {family} saddr {network} udp dport {vxlan_port} counter drop comment "{POD_TO_VXLAN_PORT}"
    }}"""
    masquerade = ""
    if ip_masq and network is not None:
        masquerade = f"""
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        {family} saddr {network} {family} daddr {network} return
        {family} saddr {network} {family} daddr {multicast} return
        {family} saddr {network} masquerade fully-random
    }}"""
    return f"""table {family} {TABLE}
delete table {family} {TABLE}
table {family} {TABLE} {{{no_laundering}{masquerade}{ingress}
}}
"""


def render_peer_update(peer_ips: Iterable[IPAddress], ipv6: bool = False) -> str:
    """Replace the sets' elements in one transaction (counters and rules untouched). The IPv6 set is
    rewritten when there are IPv6 peers or `ipv6` says the node keeps an ip6 table (then emptied when
    no IPv6 peer is left); otherwise the text is exactly the IPv4 set's update."""
    peers4, peers6 = _by_family(peer_ips)
    text = ""
    for family, peers in (("ip", peers4), ("ip6", peers6)):
        if family == "ip6" and not (peers or ipv6):
            continue
        elements = _elements(peers)
        text += f"flush set {family} {TABLE} {PEER_SET}\n"
        text += f"add element {family} {TABLE} {PEER_SET} {{ {elements} }}\n" if elements else ""
    return text


def _peer_changes(added: Iterable[IPAddress], removed: Iterable[IPAddress]) -> list[tuple[str, str, set]]:
    """(verb, nft family, addresses) of each set to change, in the order of the transaction: just these
    elements, each address in its family's set (a bad one raises ValueError).

    Deletions go first, so an address both removed and added (never both from one caller)
    ends up present. nft refuses to delete an element that is not there, which fails
    the whole transaction: the caller then knows the set is not what it thought."""
    added4, added6 = _by_family(added)
    removed4, removed6 = _by_family(removed)
    return [(verb, family, ips) for verb, family, ips in (("delete", "ip", removed4), ("delete", "ip6", removed6),
                                                          ("add", "ip", added4), ("add", "ip6", added6)) if ips]


def _change_text(verb: str, family: str, ips: Iterable[IPAddress]) -> str:
    """One change as `nft` would write it (what a refusal names)."""
    return f"{verb} element {family} {TABLE} {PEER_SET} {{ {_elements(ips)} }}"


def _by_family(ips: Iterable[IPAddress | str]) -> tuple[set[IPv4Address], set[IPv6Address]]:
    """The addresses split into (IPv4, IPv6); strings are parsed (a bad one raises ValueError)."""
    v4: set[IPv4Address] = set()
    v6: set[IPv6Address] = set()
    for ip in ips:
        if not isinstance(ip, (IPv4Address, IPv6Address)):
            ip = ip_address(ip)
        (v4 if ip.version == 4 else v6).add(ip)
    return v4, v6


def _elements(peer_ips: Iterable[IPAddress]) -> str:
    # Sorted as addresses, none parsed again: a key function parsing 5,000 strings took ~20 ms.
    # One family per call (the callers split them).
    return ", ".join(map(str, sorted(peer_ips, key=int)))


def apply_rules(network: Optional[IPv4Network], ip_masq: bool, vxlan_port: int, devices: ForwardDevices,
                peer_ips: Iterable[IPAddress] = (), ingress_filter: bool = True,
                ipv6_network: Optional[IPv6Network] = None, ipv6_underlay: bool = False) -> None:
    """Install (or replace) our rules; idempotent.

    Peers already in the sets are kept until the next update_peers(), so that
    re-applying the rules (an agent restart) never drops tunnel traffic. When
    nothing IPv6 is asked for any more (no IPv6 network, underlay or peer), an
    ip6 table left from before is deleted in the same transaction, with its peers.
    """
    given4, given6 = _by_family(peer_ips)
    old4, old6, ip6_table = _current_sets()
    wants_ip6 = ipv6_network is not None or ipv6_underlay or bool(given6)
    peers = given4 | old4 | (given6 | old6 if wants_ip6 else set())
    text = render_ruleset(network, ip_masq, vxlan_port, peers, ingress_filter, ipv6_network, ipv6_underlay)
    if ip6_table and not wants_ip6:
        text += f"delete table ip6 {TABLE}\n"
    _nft(["-f", "-"], text)
    ensure_forward_rules(devices, ipv6=True)


def update_peers(peer_ips: Iterable[IPAddress], ipv6: bool = False) -> None:
    """Set the public IPs (both families) allowed to send us VXLAN frames. `ipv6`: the node keeps an
    ip6 table (IPv6 network or underlay), whose set is then rewritten even with no IPv6 peer."""
    _nft(["-f", "-"], render_peer_update(peer_ips, ipv6))


def change_peers(added: Iterable[IPAddress], removed: Iterable[IPAddress]) -> None:
    """Allow `added` and stop allowing `removed`, leaving every other element as it is: a join or a
    leave costs one small nftables transaction, however many peers there are. Fails (KernelError) when
    an address to remove is not in its set, or an IPv6 one is given and there is no ip6 table; then
    nothing changed.

    The per-event path, so it does not fork `nft`: the transaction (_peer_changes) goes to the kernel
    over a netlink socket of this process (_PeerSetSocket). A bad address raises ValueError before."""
    changes = _peer_changes(added, removed)
    if changes:
        _peer_sets.change(changes)


def current_peers() -> list[IPAddress]:
    """The sets' elements now (IPv4 first, then IPv6); empty when the tables or sets do not exist."""
    v4, v6, _ = _current_sets()
    return sorted(v4, key=int) + sorted(v6, key=int)


def _current_sets() -> tuple[set[IPv4Address], set[IPv6Address], bool]:
    """(IPv4 set elements, IPv6 set elements, whether `table ip6 vxlan-net` exists)."""
    v4 = set(_listed_elements(["-j", "list", "set", "ip", TABLE, PEER_SET], IPv4Address))
    # The whole ip6 table is listed: one run tells whether it exists (a table without the set, ingress
    # filter off, must still be found to be deleted) and what its set holds.
    proc = _run(["-j", "list", "table", "ip6", TABLE], check=False)
    if proc.returncode != 0:
        return v4, set(), False
    return v4, set(_parse_elements(proc.stdout, IPv6Address)), True


def _listed_elements(args: list[str], kind: type) -> list:
    proc = _run(args, check=False)
    return _parse_elements(proc.stdout, kind) if proc.returncode == 0 else []


def _parse_elements(listing: str, kind: type) -> list:
    """The peer set's plain address elements in an `nft -j` listing."""
    try:
        items = json.loads(listing).get("nftables", [])
    except (ValueError, AttributeError):
        raise KernelError("nft -j list printed something that is not an nft JSON listing") from None
    for item in items:
        if isinstance(item, dict) and "set" in item and item["set"].get("name") == PEER_SET:
            return [kind(e) for e in item["set"].get("elem", []) if isinstance(e, str)]
    return []


def forward_rules(devices: ForwardDevices, family: str = "ip") -> list[tuple[str, list[dict]]]:
    """(comment, nft JSON expressions) of our FORWARD rules in `family`'s filter table, in chain order.

    Only our devices are matched, never the pod network's addresses: an
    address match would also accept spoofed traffic arriving on any interface.
    New connections into pods are accepted only from the overlay or when port-
    mapped (DNAT, e.g. the portmap plugin's hostPorts); anything else reaches
    pods only as replies. `ip6` gets the same rules when pods have IPv6
    (`devices.pod_network6`), none otherwise.
    """
    def name(key: str, value: str) -> dict:
        return {"match": {"op": "==", "left": {"meta": {"key": key}}, "right": value}}

    def conntrack(key: str, value) -> dict:
        return {"match": {"op": "in", "left": {"ct": {"key": key}}, "right": value}}

    network = devices.pod_network if family == "ip" else devices.pod_network6
    if family == "ip6" and network is None:
        return []
    accept = [{"counter": None}, {"accept": None}]
    bridge, vtep = devices.bridge, devices.vtep
    direct = []
    if devices.underlay is not None and network is not None:
        # Direct peers' pods arrive on the underlay with their own addresses. Here the source
        # must be matched (the underlay also carries everything else), and strict rp_filter
        # backs it: a pod source is accepted on the underlay only where its subnet routes there.
        from_pods = {"match": {"op": "==", "left": {"payload": {"protocol": family, "field": "saddr"}},
                               "right": {"prefix": {"addr": str(network.network_address), "len": network.prefixlen}}}}
        direct = [(f"{FORWARD_TAG}: direct peers' pods to pods",
                   [name("iifname", devices.underlay), name("oifname", bridge), from_pods, *accept])]
    overlay6 = []
    if devices.vtep6 is not None:
        overlay6 = [(f"{FORWARD_TAG}: IPv6 underlay's overlay to pods",
                     [name("iifname", devices.vtep6), name("oifname", bridge), *accept])]
    return [
        (f"{FORWARD_TAG}: overlay to pods", [name("iifname", vtep), name("oifname", bridge), *accept]),
        *overlay6,
        *direct,
        (f"{FORWARD_TAG}: pods to the overlay and out", [name("iifname", bridge), *accept]),
        (f"{FORWARD_TAG}: replies to pods", [name("oifname", bridge),
                                              conntrack("state", ["established", "related"]), *accept]),
        (f"{FORWARD_TAG}: port-mapped to pods", [name("oifname", bridge), conntrack("status", "dnat"), *accept]),
    ]


def ensure_forward_rules(devices: ForwardDevices, ipv6: Optional[bool] = None) -> bool:
    """Make our rules in iptables-nft's FORWARD chains exactly `forward_rules()`; True if it had to.

    Cheap when nothing changed: one `nft -j list chain` per family looked at. Otherwise our old
    rules go and the new ones are appended (after other tools' rules, which keep deciding first)
    in one `nft -f` transaction for both families, so there is no moment without them. Nothing
    is done to a chain that does not exist (no iptables-nft here).

    `ip6 filter FORWARD` is looked at when pods have IPv6 (`devices.pod_network6`) or `ipv6` is
    True (apply_rules: removes our rules there once IPv6 is gone); so an IPv4-only node's
    periodic check stays one listing.
    """
    chains = [IPTABLES_FORWARD]
    if ipv6 or (ipv6 is None and devices.pod_network6 is not None):
        chains.append(IP6TABLES_FORWARD)
    commands: list[dict] = []
    for family, table, chain in chains:
        proc = _run(["-j", "list", "chain", family, table, chain], check=False)
        if proc.returncode != 0:
            continue
        found, handles = _tagged_rules(proc.stdout)
        wanted = forward_rules(devices, family)
        if found == wanted:
            continue
        where = {"family": family, "table": table, "chain": chain}
        commands += [{"delete": {"rule": {**where, "handle": handle}}} for handle in handles]
        commands += [{"add": {"rule": {**where, "expr": expr, "comment": comment}}} for comment, expr in wanted]
    if not commands:
        return False
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


_NETLINK_NETFILTER = 12
_NFNL_SUBSYS_NFTABLES = 10
_NFNL_MSG_BATCH_BEGIN, _NFNL_MSG_BATCH_END = 16, 17
_NFT_MSG_SETELEM = {"add": 12, "delete": 14}  # NFT_MSG_NEWSETELEM, NFT_MSG_DELSETELEM
_NFPROTO = {"ip": 2, "ip6": 10}  # NFPROTO_IPV4, NFPROTO_IPV6
_NLA_F_NESTED = 0x8000
# Attribute types (linux/netfilter/nf_tables.h): NFTA_SET_ELEM_LIST_{TABLE,SET,ELEMENTS}; inside the
# elements, NFTA_LIST_ELEM holds NFTA_SET_ELEM_KEY, which holds NFTA_DATA_VALUE.
_LIST_TABLE, _LIST_SET, _LIST_ELEMENTS, _LIST_ELEM, _ELEM_KEY, _DATA_VALUE = 1, 2, 3, 1, 1, 1
_BATCH = {kind: wire.request(kind, wire.NLM_F_REQUEST, 0,
                             struct.pack("=BBH", 0, 0, socket.htons(_NFNL_SUBSYS_NFTABLES)))
          for kind in (_NFNL_MSG_BATCH_BEGIN, _NFNL_MSG_BATCH_END)}


def _nested(kind: int, payload: bytes) -> bytes:
    return wire.attr(kind | _NLA_F_NESTED, payload)


def _setelem_request(verb: str, family: str, ips: Iterable[IPAddress], seq: int) -> bytes:
    """NFT_MSG_NEWSETELEM / DELSETELEM of `ips` in our peer set of `family`, as `nft add|delete element`
    sends it: an add creates without NLM_F_EXCL (an element already there is no error), a delete of an
    element that is not there is refused (ENOENT)."""
    flags = wire.NLM_F_REQUEST | wire.NLM_F_ACK | (wire.NLM_F_CREATE if verb == "add" else 0)
    elements = b"".join(_nested(_LIST_ELEM, _nested(_ELEM_KEY, wire.attr(_DATA_VALUE, ip.packed))) for ip in ips)
    body = (struct.pack("=BBH", _NFPROTO[family], 0, 0) + wire.attr_str(_LIST_TABLE, TABLE)
            + wire.attr_str(_LIST_SET, PEER_SET) + _nested(_LIST_ELEMENTS, elements))
    return wire.request((_NFNL_SUBSYS_NFTABLES << 8) | _NFT_MSG_SETELEM[verb], flags, seq, body)


class _PeerSetSocket:
    """The set changes of watch events, sent as one nftables batch (a transaction: all or nothing) over a
    NETLINK_NETFILTER socket kept open: no `nft` process per event. A forked `nft` cost the agent ~1 ms
    of CPU in fork and exec (and the child ~3 ms more, and ~10 ms of waiting that held up the next
    event); libnftables in-process still ~0.3 ms (its cache is fetched again after each change); this
    ~0.05 ms. Kept open, as closing a netfilter socket after a delete waits ~13 ms for the kernel.

    The deadline stays NFT_TIMEOUT, on the answers: the kernel handles a batch within sendmsg, as it does
    the route door's requests, so the hung `nft` the deadline was for (a stuck lock, a broken binary) has
    no equivalent here; an answer not there in time is a KernelError all the same. The socket belongs to
    the network namespace of the thread that opened it, and to one process: it is opened again when the
    caller's namespace differs, and in a forked child."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sock: Optional[socket.socket] = None
        self._owner: Optional[tuple[int, int]] = None  # (process, network namespace) it was opened in
        self._seq = 0

    def change(self, changes: list[tuple[str, str, set]]) -> None:
        """Apply (verb, nft family, addresses) changes in one transaction; KernelError if refused."""
        with self._lock:
            try:
                self._change(changes)
            except OSError as exc:
                self._close()
                raise KernelError(f"changing the nftables peer sets: {exc.strerror or exc}") from None
            except KernelError:
                self._close()  # nothing of a failed batch may be read as the next one's answer
                raise

    def _change(self, changes: list[tuple[str, str, set]]) -> None:
        sock = self._socket()
        if self._seq > 1 << 30:  # a sequence number is 32 bits; 0 is the batch's own
            self._seq = 0
        first = self._seq + 1
        self._seq += len(changes)
        requests = [_setelem_request(verb, family, ips, first + i) for i, (verb, family, ips) in enumerate(changes)]
        sock.sendto(_BATCH[_NFNL_MSG_BATCH_BEGIN] + b"".join(requests) + _BATCH[_NFNL_MSG_BATCH_END], (0, 0))
        refusals, answered = [], 0
        while answered < len(changes):  # every request asked for an answer: an ack or why it was refused
            try:
                data = sock.recv(1 << 16)
            except socket.timeout:
                raise KernelError(f"nftables did not answer within {NFT_TIMEOUT:g}s") from None
            for off, length, kind, flags, seq in wire.messages(data):
                if kind != wire.NLMSG_ERROR:
                    continue
                code = wire.error_code(data, off)
                if seq == 0 and code:  # the batch itself (its begin or end) was refused: no more answers come
                    raise KernelError(f"nftables refused the batch: {wire.ack_reason(data, off, length, flags, code)}")
                if not first <= seq < first + len(changes):
                    continue
                answered += 1
                if code:
                    reason = wire.ack_reason(data, off, length, flags, code)
                    refusals.append(f"{_change_text(*changes[seq - first])}: {reason}")
        if refusals:
            raise KernelError(f"nftables refused the peer set change (nothing changed): {'; '.join(refusals)}")

    def _socket(self) -> socket.socket:
        owner = wire.socket_owner()
        if self._sock is None or owner != self._owner:
            self._close()
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, _NETLINK_NETFILTER)
            try:
                sock.setsockopt(wire.SOL_NETLINK, wire.NETLINK_CAP_ACK, 1)
                sock.setsockopt(wire.SOL_NETLINK, wire.NETLINK_EXT_ACK, 1)  # the kernel's words in a refusal
                sock.settimeout(NFT_TIMEOUT)
                sock.bind((0, 0))
            except BaseException:
                sock.close()
                raise
            self._sock, self._owner = sock, owner
        return self._sock

    def _close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


_peer_sets = _PeerSetSocket()


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
