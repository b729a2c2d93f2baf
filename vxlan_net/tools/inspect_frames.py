"""What one captured underlay packet says about the overlay: pure VXLAN decoding and anomaly checks.

No I/O here: `decode_frame` takes a scapy packet and what we know of the cluster and returns a
`VxlanFrame` (or None for anything that is not a VXLAN frame to our port); `decode_direct` returns a
`DirectPacket` for a pod-to-pod packet that crosses the underlay unencapsulated (direct routing).
Outer and inner headers may be IPv4 or IPv6; IPv6 headers are read from the captured bytes by a
small bounded walker (`_walk_ipv6`), never by trusting their length fields.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import struct
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from typing import Any, Iterable, Mapping, NamedTuple, Optional, Union

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import CookedLinux
from scapy.layers.l2 import ARP, Dot3, Ether
from scapy.packet import Packet

from vxlan_net.core.config import DEFAULT_PORT
from vxlan_net.core.lease import Lease

VXLAN_HEADER_LEN = 8
# Where the inner IPv4 addresses sit in the UDP datagram: UDP 8 + VXLAN 8 + Ether 14 + IP 12 / 16.
_INNER_SRC_AT = 42
_INNER_DST_AT = 46

# The same offsets behind an IPv6 outer header (no extension headers), from its start: IPv6 40 + UDP 8 +
# VXLAN 8 + Ether 14 = 70; an inner IPv4's addresses at +12/+16, an inner IPv6's at +8/+24.
_V6_OUTER_INNER_AT = 70
_ETHERTYPE_IPV6 = 0x86DD
_VLAN_TAGS = (0x8100, 0x88A8)
IPV6_HEADER_LEN = 40
MAX_EXTENSION_HEADERS = 8
"""IPv6 extension headers walked before giving up: a chain of them costs a parser per header."""
# Extension headers by next-header number: Hop-by-Hop, Routing, Destination Options (length in 8-byte
# units after the first 8), Fragment (always 8), Authentication Header (4-byte units after the first 8).
_EXTENSIONS = {0, 43, 60, 44, 51}
_FRAGMENT, _AUTH, _NO_NEXT = 44, 51, 59
_ICMPV6, _TCP, _UDP = 58, 6, 17

InnerAddress = Union[IPv4Address, IPv6Address]
Network = Union[IPv4Network, IPv6Network]


@dataclasses.dataclass(frozen=True)
class InspectContext:
    """What we know of the cluster when judging a frame; unknown parts skip their checks."""

    port: int = DEFAULT_PORT
    """UDP destination port of the tunnel: only datagrams to it are decoded."""
    vni: Optional[int] = None
    """Our VNI; None skips the foreign-VNI check."""
    pod_network: Optional[IPv4Network] = None
    """The IPv4 pod network; None (and no pod_network6) skips the inner-address checks."""
    nodes: Mapping[InnerAddress, Network] = dataclasses.field(default_factory=dict, hash=False)
    """Known nodes: public IP (either family; a node with both is listed under each) -> the subnet
    its lease is known by. Empty skips the outer-source check."""
    path_mtu: Optional[int] = None
    """Largest outer IP packet the underlay path carries; None skips the size check."""
    pod_network6: Optional[IPv6Network] = None
    """The IPv6 pod network. With either pod network known, an inner address of a family the
    cluster has no pod network for is outside the pod networks."""
    ipv6_subnets: Mapping[InnerAddress, IPv6Network] = dataclasses.field(default_factory=dict, hash=False)
    """A dual-stack node's IPv6 subnet, under each of its public IPs (its `nodes` entry has the IPv4 one)."""

    @classmethod
    def from_leases(cls, leases: Iterable[Lease], **kwargs: Any) -> "InspectContext":
        nodes: dict[InnerAddress, Network] = {}
        ipv6_subnets: dict[InnerAddress, IPv6Network] = {}
        for lease in leases:
            for public in (lease.public_ip, lease.public_ipv6):
                if public is None:
                    continue
                nodes[public] = lease.subnet
                if lease.ipv6_subnet is not None and lease.subnet.version == 4:
                    ipv6_subnets[public] = lease.ipv6_subnet
        return cls(nodes=nodes, ipv6_subnets=ipv6_subnets, **kwargs)

    def node_holding(self, address: Optional[InnerAddress], version: int = 4) -> Optional[InnerAddress]:
        """The public IP of the node whose lease covers `address`: of IP version `version` (the outer
        header's) when the node has one, else its other."""
        if address is None:
            return None
        found = [ip for ip, subnet in (*self.nodes.items(), *self.ipv6_subnets.items())
                 if subnet.version == address.version and address in subnet]
        return next((ip for ip in found if ip.version == version), found[0] if found else None)

    def subnet_of_node(self, public: InnerAddress) -> Optional[Network]:
        return self.nodes.get(public)

    @property
    def pod_networks(self) -> tuple[Network, ...]:
        return tuple(n for n in (self.pod_network, self.pod_network6) if n is not None)


@dataclasses.dataclass(frozen=True)
class Anomaly:
    """Something about a frame that a healthy overlay does not send."""

    kind: str
    """Stable name: inner-src-outside-pod-network, inner-dst-outside-pod-network, foreign-vni,
    unknown-outer-src, oversize, fragmented, misdirected."""
    message: str


@dataclasses.dataclass(frozen=True)
class PodPacket:
    """What any pod packet seen on the underlay says, tunnelled or not ("inner": the pods' own headers)."""

    time: float
    """Capture time, seconds since the epoch."""
    inner_src_mac: Optional[str]
    inner_dst_mac: Optional[str]
    inner_src: Optional[InnerAddress]
    inner_dst: Optional[InnerAddress]
    protocol: str
    """icmp, icmp6, tcp, udp, arp, ip-proto-<n> (also an IPv6 next header), ipv6-ext-chain (more than
    MAX_EXTENSION_HEADERS extension headers), ethertype-0x<hex>, 802.3, or truncated."""
    sport: Optional[int]
    dport: Optional[int]
    icmp_type: Optional[int]
    icmp_code: Optional[int]
    length: int
    """IP packet length in bytes (the outer one of a VXLAN frame: what the path MTU limits)."""
    inner_src_node: Optional[InnerAddress]
    """Public IP of the node whose lease covers inner_src, when known."""
    inner_dst_node: Optional[InnerAddress]


@dataclasses.dataclass(frozen=True)
class VxlanFrame(PodPacket):
    """One VXLAN frame seen on the underlay, decoded and judged."""

    outer_src: InnerAddress
    outer_dst: InnerAddress
    outer_sport: int
    outer_dport: int
    vni: int
    inner_length: int
    """Inner Ethernet frame length in bytes."""
    outer_src_subnet: Optional[Network]
    """The subnet leased by the node at outer_src, when known."""
    outer_dst_subnet: Optional[Network]
    aggregate: bool = False
    """A TCP frame longer than the path MTU: a GSO/GRO aggregate the kernel cuts into (or merged
    from) wire-sized frames, not an oversize frame; captures on veths and NICs show these."""
    anomalies: tuple[Anomaly, ...] = ()


def decode_frame(packet: Packet, context: InspectContext) -> Optional[VxlanFrame]:
    """The VXLAN frame carried by `packet`, or None when it is no IPv4 or IPv6 UDP datagram to our port."""
    outer_layer = _network_layer(packet)
    if isinstance(outer_layer, IPv6):
        return _decode_v6_frame(packet, _raw(outer_layer), context)
    if outer_layer is None:
        return None
    outer = IP(bytes(outer_layer))  # re-dissect so hand-built and captured packets look alike
    if outer.frag > 0 or UDP not in outer or outer[UDP].dport != context.port:
        return None
    udp = outer[UDP]
    return _frame(packet, context, IPv4Address(outer.src), IPv4Address(outer.dst), udp.sport, udp.dport,
                  bytes(udp.payload), outer.len or len(bytes(outer)), fragmented=bool(outer.flags.MF))


def _decode_v6_frame(packet: Packet, raw: bytes, context: InspectContext) -> Optional[VxlanFrame]:
    walked = _walk_ipv6(raw)
    if walked is None or walked.later_fragment or walked.next_header != _UDP:
        return None
    udp = raw[walked.offset:walked.offset + 8]
    if len(udp) < 8:
        return None
    sport, dport = struct.unpack("!HH", udp[:4])
    if dport != context.port:
        return None
    # Everything captured after the UDP header: a jumbogram's UDP length is 0, and neither length
    # field is trusted (what the wire carried is what the path MTU limits).
    return _frame(packet, context, IPv6Address(raw[8:24]), IPv6Address(raw[24:40]), sport, dport,
                  raw[walked.offset + 8:], len(raw), fragmented=walked.first_fragment)


def _frame(packet: Packet, context: InspectContext, outer_src: InnerAddress, outer_dst: InnerAddress,
           sport: int, dport: int, payload: bytes, length: int, fragmented: bool) -> Optional[VxlanFrame]:
    """The frame from its outer facts and the UDP payload (VXLAN header + inner Ethernet frame)."""
    if len(payload) < VXLAN_HEADER_LEN:
        return None
    inner_raw = payload[VXLAN_HEADER_LEN:]
    inner = Ether(inner_raw) if len(inner_raw) >= 14 else None
    fields = _inner_fields(inner, inner_raw)
    inner_src, inner_dst = fields["inner_src"], fields["inner_dst"]
    frame = VxlanFrame(
        time=float(packet.time),
        outer_src=outer_src,
        outer_dst=outer_dst,
        outer_sport=sport,
        outer_dport=dport,
        vni=int.from_bytes(payload[4:7], "big"),  # read here: scapy's VXLAN layer raises on odd flag bits
        length=length,
        inner_length=len(inner_raw),
        outer_src_subnet=context.subnet_of_node(outer_src),
        outer_dst_subnet=context.subnet_of_node(outer_dst),
        inner_src_node=context.node_holding(inner_src, outer_src.version),
        inner_dst_node=context.node_holding(inner_dst, outer_dst.version),
        **fields,
    )
    aggregate = context.path_mtu is not None and frame.length > context.path_mtu and frame.protocol == "tcp"
    frame = dataclasses.replace(frame, aggregate=aggregate)
    return dataclasses.replace(frame, anomalies=_anomalies(frame, context, fragmented=fragmented))


def _network_layer(packet: Packet) -> Optional[Packet]:
    """The first IPv4 or IPv6 layer after the link layer (not an inner one further down)."""
    layer = packet
    for _ in range(4):  # Ethernet, VLAN tags, a cooked-capture header: the network layer comes early
        if isinstance(layer, (IP, IPv6)):
            return layer
        if not isinstance(layer, (Ether, CookedLinux)) and layer.name not in ("802.1Q", "802_1AD"):
            return None
        layer = layer.payload
    return None


def _raw(layer: Packet) -> bytes:
    """The bytes a dissected layer was made from (a hand-built one: its serialization)."""
    original = getattr(layer, "original", None)
    return bytes(original) if original else bytes(layer)


class WalkedIPv6(NamedTuple):
    """Where an IPv6 packet's upper-layer header starts, after its extension headers."""

    next_header: Optional[int]
    """The upper-layer protocol; None when the chain is longer than MAX_EXTENSION_HEADERS."""
    offset: int
    first_fragment: bool
    """A Fragment header with offset 0 and more to come: the rest is elsewhere."""
    later_fragment: bool
    """A Fragment header with a non-zero offset: no upper-layer header here."""


def _walk_ipv6(raw: bytes) -> Optional[WalkedIPv6]:
    """Walks the extension headers of the IPv6 packet in `raw`; None when the fixed header or an extension
    header is cut short or it is no IPv6. Bounded: at most MAX_EXTENSION_HEADERS headers, each checked
    against the bytes actually there (a length field can claim anything)."""
    if len(raw) < IPV6_HEADER_LEN or raw[0] >> 4 != 6:
        return None
    next_header, offset = raw[6], IPV6_HEADER_LEN
    first = later = False
    for _ in range(MAX_EXTENSION_HEADERS):
        if next_header not in _EXTENSIONS:
            return WalkedIPv6(next_header, offset, first, later)
        if len(raw) < offset + 8:
            return None
        if next_header == _FRAGMENT:
            fragment_offset, more = struct.unpack("!H", raw[offset + 2:offset + 4])[0] >> 3, raw[offset + 3] & 1
            later, first = later or fragment_offset > 0, first or (fragment_offset == 0 and bool(more))
            size = 8
        elif next_header == _AUTH:
            size = (raw[offset + 1] + 2) * 4
        else:
            size = (raw[offset + 1] + 1) * 8
        next_header, offset = raw[offset], offset + size
        if offset > len(raw):
            return None
    if next_header in _EXTENSIONS:
        return WalkedIPv6(None, offset, first, later)
    return WalkedIPv6(next_header, offset, first, later)


@dataclasses.dataclass(frozen=True)
class DirectPacket(PodPacket):
    """One pod-to-pod packet on the underlay without a tunnel header: direct routing between two nodes
    of one segment."""

    path: str = "direct"
    anomalies: tuple[Anomaly, ...] = ()


def decode_direct(packet: Packet, context: InspectContext) -> Optional[DirectPacket]:
    """The packet as a DirectPacket when it is IPv4 (IPv6) from the IPv4 (IPv6) pod network to it, not to
    our tunnel port; None otherwise, or when that pod network is unknown."""
    if Ether not in packet:
        return None
    layer = _network_layer(packet)
    if isinstance(layer, IP):
        network: Optional[Network] = context.pod_network
        src, dst = IPv4Address(layer.src), IPv4Address(layer.dst)
        to_port = UDP in layer and layer[UDP].dport == context.port
        length = layer.len or len(bytes(layer))
    elif isinstance(layer, IPv6):
        raw = _raw(layer)
        walked = _walk_ipv6(raw)
        if walked is None:
            return None
        network, src, dst = context.pod_network6, IPv6Address(raw[8:24]), IPv6Address(raw[24:40])
        udp = raw[walked.offset:walked.offset + 4]
        to_port = walked.next_header == _UDP and len(udp) == 4 and struct.unpack("!HH", udp)[1] == context.port
        length = len(raw)
    else:
        return None
    if network is None or src not in network or dst not in network or to_port:
        return None
    ether = packet[Ether]
    fields = _inner_fields(ether, _raw(ether))
    return DirectPacket(time=float(packet.time), length=length,
                        inner_src_node=context.node_holding(fields["inner_src"], src.version),
                        inner_dst_node=context.node_holding(fields["inner_dst"], dst.version), **fields)


def _inner_fields(inner: Optional[Ether], raw: bytes = b"") -> dict[str, Any]:
    """What the inner Ethernet frame says; `raw` its bytes (IPv6 is read from them, not from scapy)."""
    fields: dict[str, Any] = dict(inner_src_mac=None, inner_dst_mac=None, inner_src=None, inner_dst=None,
                                  protocol="truncated", sport=None, dport=None, icmp_type=None, icmp_code=None)
    if inner is None:
        return fields
    fields.update(inner_src_mac=inner.src.lower(), inner_dst_mac=inner.dst.lower())
    ipv6_at = _ipv6_payload_at(raw)
    if ipv6_at is not None:
        fields.update(_ipv6_fields(raw[ipv6_at:]))
    elif IP in inner:
        ip = inner[IP]
        fields.update(inner_src=IPv4Address(ip.src), inner_dst=IPv4Address(ip.dst), protocol=f"ip-proto-{ip.proto}")
        if ICMP in ip:
            fields.update(protocol="icmp", icmp_type=ip[ICMP].type, icmp_code=ip[ICMP].code)
        elif TCP in ip or UDP in ip:
            layer = ip[TCP] if TCP in ip else ip[UDP]
            fields.update(protocol="tcp" if TCP in ip else "udp", sport=layer.sport, dport=layer.dport)
    elif ARP in inner:
        arp = inner[ARP]
        fields.update(protocol="arp", inner_src=_address_or_none(arp.psrc), inner_dst=_address_or_none(arp.pdst))
    elif isinstance(inner, Dot3):  # a length where the EtherType would be: 802.3 with LLC, no EtherType
        fields.update(protocol="802.3")
    else:
        fields.update(protocol=f"ethertype-0x{inner.type:04x}")
    return fields


def _ipv6_payload_at(frame: bytes) -> Optional[int]:
    """Where an Ethernet frame's IPv6 packet starts (after up to two VLAN tags); None if it carries none."""
    offset = 12
    for _ in range(3):
        if len(frame) < offset + 2:
            return None
        ethertype = struct.unpack("!H", frame[offset:offset + 2])[0]
        if ethertype == _ETHERTYPE_IPV6:
            return offset + 2
        if ethertype not in _VLAN_TAGS:
            return None
        offset += 4
    return None


def _ipv6_fields(raw: bytes) -> dict[str, Any]:
    """Addresses and upper-layer facts of the IPv6 packet in `raw` (as far as it was captured)."""
    if len(raw) < IPV6_HEADER_LEN:
        return dict(protocol="truncated")
    fields: dict[str, Any] = dict(inner_src=IPv6Address(raw[8:24]), inner_dst=IPv6Address(raw[24:40]))
    walked = _walk_ipv6(raw)
    if walked is None:
        return dict(fields, protocol="truncated")
    if walked.next_header is None:
        return dict(fields, protocol="ipv6-ext-chain")
    upper = raw[walked.offset:]
    if walked.later_fragment or walked.next_header == _NO_NEXT:
        return dict(fields, protocol=f"ip-proto-{walked.next_header}")
    if walked.next_header == _ICMPV6 and len(upper) >= 2:
        return dict(fields, protocol="icmp6", icmp_type=upper[0], icmp_code=upper[1])
    if walked.next_header in (_TCP, _UDP) and len(upper) >= 4:
        sport, dport = struct.unpack("!HH", upper[:4])
        return dict(fields, protocol="tcp" if walked.next_header == _TCP else "udp", sport=sport, dport=dport)
    if walked.next_header in (_ICMPV6, _TCP, _UDP):
        return dict(fields, protocol="truncated")
    return dict(fields, protocol=f"ip-proto-{walked.next_header}")


def _address_or_none(text: Any) -> Optional[InnerAddress]:
    try:
        return ip_address(text)
    except ValueError:
        return None


def _anomalies(frame: VxlanFrame, context: InspectContext, fragmented: bool) -> tuple[Anomaly, ...]:
    found = []
    if context.vni is not None and frame.vni != context.vni:
        found.append(Anomaly("foreign-vni", f"VNI {frame.vni} is not ours ({context.vni})"))
    if context.nodes and frame.outer_src not in context.nodes:
        found.append(Anomaly("unknown-outer-src", f"outer source {frame.outer_src} is no known node"))
    networks = context.pod_networks
    if networks:
        for end, address in (("src", frame.inner_src), ("dst", frame.inner_dst)):
            if address is not None and not any(address in n for n in networks if n.version == address.version):
                found.append(Anomaly(f"inner-{end}-outside-pod-network",
                                     f"inner {'source' if end == 'src' else 'destination'} {address} "
                                     f"is outside the pod network {' and '.join(map(str, networks))}"))
    if context.path_mtu is not None and frame.length > context.path_mtu and not frame.aggregate:
        found.append(Anomaly("oversize", f"{frame.length}-byte outer packet exceeds the path MTU {context.path_mtu}"))
    if fragmented:
        found.append(Anomaly("fragmented", "the outer packet was fragmented (tunnel MTU above the path's)"))
    if frame.inner_dst_node is not None and frame.outer_dst_subnet is not None \
            and frame.inner_dst_node != frame.outer_dst:
        found.append(Anomaly("misdirected", f"inner destination {frame.inner_dst} lives on {frame.inner_dst_node}, "
                                            f"but the frame goes to {frame.outer_dst}"))
    return tuple(found)


# -- filters -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FrameFilter:
    """`pod <ip>` (inner source or destination), `node <ip>` (outer source or destination), or raw BPF."""

    kind: str
    """pod, node, bpf or all."""
    address: Optional[InnerAddress] = None
    bpf: Optional[str] = None

    def matches(self, frame: PodPacket) -> bool:
        if self.kind == "pod":
            return self.address in (frame.inner_src, frame.inner_dst)
        if self.kind == "node":
            return isinstance(frame, VxlanFrame) and self.address in (frame.outer_src, frame.outer_dst)
        return True  # raw BPF was applied by the capture


def parse_filter(text: Optional[str]) -> FrameFilter:
    """`--filter` text -> FrameFilter; ValueError when `pod`/`node` is not followed by one IP address."""
    if text is None or not text.strip():
        return FrameFilter("all")
    words = text.split()
    if words[0] in ("pod", "node") and len(words) <= 2:
        try:
            return FrameFilter(words[0], address=ip_address(words[1] if len(words) == 2 else ""))
        except ValueError:
            raise ValueError(f"--filter {text!r}: `{words[0]}` takes one IPv4 or IPv6 address") from None
    return FrameFilter("bpf", bpf=text.strip())


def capture_bpf(frame_filter: FrameFilter, port: int, direct_network: Optional[IPv4Network] = None,
                direct_network6: Optional[IPv6Network] = None) -> str:
    """The BPF expression that lets through only what `frame_filter` can match; with `direct_network`
    (`direct_network6`; direct routing on), also unencapsulated packets between two of its addresses.

    A pod filter compares the inner addresses at their fixed offsets, behind an IPv4 outer header
    (`udp[...]`) and behind an IPv6 one without extension headers (`ip6[...]`: libpcap indexes `udp[]`
    only over IPv4)."""
    base = f"udp dst port {port}"
    directs = [f"({family} src net {net} and {family} dst net {net})"
               for family, net in (("ip", direct_network), ("ip6", direct_network6)) if net is not None]
    direct = " or ".join(directs) if directs else None
    if frame_filter.kind == "pod":
        address = frame_filter.address
        # (where the inner source sits behind an IPv4 outer, its destination; the same behind IPv6)
        src4, dst4, src6, dst6 = ((_INNER_SRC_AT, _INNER_DST_AT, _V6_OUTER_INNER_AT + 12, _V6_OUTER_INNER_AT + 16)
                                  if address.version == 4 else
                                  (_INNER_SRC_AT - 4, _INNER_SRC_AT + 12, _V6_OUTER_INNER_AT + 8,
                                   _V6_OUTER_INNER_AT + 24))
        tunnelled = f"{base} and ({_at('udp', src4, address)} or {_at('udp', dst4, address)})"
        tunnelled6 = f"ip6 and {base} and ({_at('ip6', src6, address)} or {_at('ip6', dst6, address)})"
        either = f"({tunnelled}) or ({tunnelled6})"
        return f"{either} or (({direct}) and host {address})" if direct else either
    if frame_filter.kind == "node":
        return f"{base} and host {frame_filter.address}"
    either = f"({base} or {direct})" if direct else base
    if frame_filter.kind == "bpf":
        return f"{either} and ({frame_filter.bpf})"
    return either


def _at(proto: str, offset: int, address: InnerAddress) -> str:
    """BPF: `address` is at `offset` of `proto`'s header (IPv6: four 4-byte words, all equal)."""
    packed = address.packed
    words = [f"{proto}[{offset + i}:4] = 0x{packed[i:i + 4].hex()}" for i in range(0, len(packed), 4)]
    return words[0] if len(words) == 1 else "(" + " and ".join(words) + ")"


# -- output --------------------------------------------------------------------------------

_ICMP_NAMES = {0: "echo-reply", 3: "unreachable", 5: "redirect", 8: "echo-request", 11: "time-exceeded"}
_ICMP6_NAMES = {1: "unreachable", 2: "packet-too-big", 3: "time-exceeded", 128: "echo-request", 129: "echo-reply",
                133: "router-solicitation", 134: "router-advertisement", 135: "neighbor-solicitation",
                136: "neighbor-advertisement"}


def _clock(time: float) -> str:
    return datetime.datetime.fromtimestamp(time).strftime("%H:%M:%S.%f")


def _endpoint(address: InnerAddress, subnet: Optional[Network]) -> str:
    return f"{address}[{subnet}]" if subnet is not None else str(address)


def _with_port(address: Optional[InnerAddress], port: Optional[int]) -> str:
    text = str(address) if address is not None else "?"
    return f"{text}.{port}" if port is not None else text


def _what(frame: PodPacket) -> str:
    if frame.protocol in ("icmp", "icmp6"):
        names = _ICMP_NAMES if frame.protocol == "icmp" else _ICMP6_NAMES
        name = names.get(frame.icmp_type, f"type-{frame.icmp_type}")
        return f"{frame.protocol} {name}" + (f" code {frame.icmp_code}" if frame.icmp_code else "")
    return frame.protocol


def format_line(frame: PodPacket) -> str:
    """One line, tcpdump-like: time, outer, VNI, inner MACs, inner IPs, protocol, length, anomalies;
    a direct packet says `direct` where a frame has its outer addresses and VNI."""
    if isinstance(frame, DirectPacket):
        return (f"{_clock(frame.time)} direct | {frame.inner_src_mac or '?'} > {frame.inner_dst_mac or '?'} | "
                f"{_with_port(frame.inner_src, frame.sport)} > {_with_port(frame.inner_dst, frame.dport)} "
                f"{_what(frame)} | len {frame.length}")
    line = (f"{_clock(frame.time)} {_endpoint(frame.outer_src, frame.outer_src_subnet)} > "
            f"{_endpoint(frame.outer_dst, frame.outer_dst_subnet)} vni {frame.vni} | "
            f"{frame.inner_src_mac or '?'} > {frame.inner_dst_mac or '?'} | "
            f"{_with_port(frame.inner_src, frame.sport)} > {_with_port(frame.inner_dst, frame.dport)} "
            f"{_what(frame)} | len {frame.length}{' (offload aggregate)' if frame.aggregate else ''}")
    if frame.anomalies:
        line += " !! " + "; ".join(f"{a.kind}: {a.message}" for a in frame.anomalies)
    return line


def to_dict(frame: PodPacket) -> dict[str, Any]:
    """The frame as plain JSON types (addresses as strings, anomalies as {kind, message})."""
    out: dict[str, Any] = {}
    for field in dataclasses.fields(frame):
        value = getattr(frame, field.name)
        if field.name == "anomalies":
            value = [dataclasses.asdict(a) for a in value]
        elif isinstance(value, (IPv4Address, IPv6Address, IPv4Network, IPv6Network)):
            value = str(value)
        out[field.name] = value
    return out


def to_json(frame: PodPacket) -> str:
    """One JSON object on one line."""
    return json.dumps(to_dict(frame), sort_keys=True)
