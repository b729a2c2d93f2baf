"""What one captured underlay packet says about the overlay: pure VXLAN decoding and anomaly checks.

No I/O here: `decode_frame` takes a scapy packet and what we know of the cluster and returns a
`VxlanFrame` (or None for anything that is not a VXLAN frame to our port); `decode_direct` returns a
`DirectPacket` for a pod-to-pod packet that crosses the underlay unencapsulated (direct routing).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from ipaddress import IPv4Address, IPv4Network, IPv6Address, ip_address
from typing import Any, Iterable, Mapping, Optional, Union

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Dot3, Ether
from scapy.layers.vxlan import VXLAN
from scapy.packet import Packet

from vxlan_net.core.config import DEFAULT_PORT
from vxlan_net.core.lease import Lease

VXLAN_HEADER_LEN = 8
# Where the inner IPv4 addresses sit in the UDP datagram: UDP 8 + VXLAN 8 + Ether 14 + IP 12 / 16.
_INNER_SRC_AT = 42
_INNER_DST_AT = 46

InnerAddress = Union[IPv4Address, IPv6Address]


@dataclasses.dataclass(frozen=True)
class InspectContext:
    """What we know of the cluster when judging a frame; unknown parts skip their checks."""

    port: int = DEFAULT_PORT
    """UDP destination port of the tunnel: only datagrams to it are decoded."""
    vni: Optional[int] = None
    """Our VNI; None skips the foreign-VNI check."""
    pod_network: Optional[IPv4Network] = None
    """The pod network; None skips the inner-address checks."""
    nodes: Mapping[IPv4Address, IPv4Network] = dataclasses.field(default_factory=dict, hash=False)
    """Known nodes: public IP -> the subnet it leases. Empty skips the outer-source check."""
    path_mtu: Optional[int] = None
    """Largest outer IP packet the underlay path carries; None skips the size check."""

    @classmethod
    def from_leases(cls, leases: Iterable[Lease], **kwargs: Any) -> "InspectContext":
        return cls(nodes={lease.public_ip: lease.subnet for lease in leases}, **kwargs)

    def node_holding(self, address: Optional[InnerAddress]) -> Optional[IPv4Address]:
        """The public IP of the node whose lease covers `address`."""
        if not isinstance(address, IPv4Address):
            return None
        return next((ip for ip, subnet in self.nodes.items() if address in subnet), None)


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
    """icmp, tcp, udp, arp, ipv6, ip-proto-<n>, ethertype-0x<hex>, or truncated."""
    sport: Optional[int]
    dport: Optional[int]
    icmp_type: Optional[int]
    icmp_code: Optional[int]
    length: int
    """IP packet length in bytes (the outer one of a VXLAN frame: what the path MTU limits)."""
    inner_src_node: Optional[IPv4Address]
    """Public IP of the node whose lease covers inner_src, when known."""
    inner_dst_node: Optional[IPv4Address]


@dataclasses.dataclass(frozen=True)
class VxlanFrame(PodPacket):
    """One VXLAN frame seen on the underlay, decoded and judged."""

    outer_src: IPv4Address
    outer_dst: IPv4Address
    outer_sport: int
    outer_dport: int
    vni: int
    inner_length: int
    """Inner Ethernet frame length in bytes."""
    outer_src_subnet: Optional[IPv4Network]
    """The subnet leased by the node at outer_src, when known."""
    outer_dst_subnet: Optional[IPv4Network]
    aggregate: bool = False
    """A TCP frame longer than the path MTU: a GSO/GRO aggregate the kernel cuts into (or merged
    from) wire-sized frames, not an oversize frame; captures on veths and NICs show these."""
    anomalies: tuple[Anomaly, ...] = ()


def decode_frame(packet: Packet, context: InspectContext) -> Optional[VxlanFrame]:
    """The VXLAN frame carried by `packet`, or None when it is no IPv4/UDP datagram to our port."""
    if IP not in packet:
        return None
    outer = IP(bytes(packet[IP]))  # re-dissect so hand-built and captured packets look alike
    if outer.frag > 0 or UDP not in outer or outer[UDP].dport != context.port:
        return None
    udp = outer[UDP]
    payload = bytes(udp.payload)
    if len(payload) < VXLAN_HEADER_LEN:
        return None
    header = VXLAN(payload[:VXLAN_HEADER_LEN])
    inner = Ether(payload[VXLAN_HEADER_LEN:]) if len(payload) >= VXLAN_HEADER_LEN + 14 else None
    fields = _inner_fields(inner)
    outer_src, outer_dst = IPv4Address(outer.src), IPv4Address(outer.dst)
    inner_src, inner_dst = fields["inner_src"], fields["inner_dst"]
    frame = VxlanFrame(
        time=float(packet.time),
        outer_src=outer_src,
        outer_dst=outer_dst,
        outer_sport=udp.sport,
        outer_dport=udp.dport,
        vni=int(header.vni),
        length=outer.len or len(bytes(outer)),
        inner_length=len(payload) - VXLAN_HEADER_LEN,
        outer_src_subnet=context.nodes.get(outer_src),
        outer_dst_subnet=context.nodes.get(outer_dst),
        inner_src_node=context.node_holding(inner_src),
        inner_dst_node=context.node_holding(inner_dst),
        **fields,
    )
    aggregate = context.path_mtu is not None and frame.length > context.path_mtu and frame.protocol == "tcp"
    frame = dataclasses.replace(frame, aggregate=aggregate)
    return dataclasses.replace(frame, anomalies=_anomalies(frame, context, fragmented=bool(outer.flags.MF)))


@dataclasses.dataclass(frozen=True)
class DirectPacket(PodPacket):
    """One pod-to-pod packet on the underlay without a tunnel header: direct routing between two nodes
    of one segment."""

    path: str = "direct"
    anomalies: tuple[Anomaly, ...] = ()


def decode_direct(packet: Packet, context: InspectContext) -> Optional[DirectPacket]:
    """The packet as a DirectPacket when it is IPv4 from the pod network to the pod network, not to our
    tunnel port; None otherwise, or when the pod network is unknown."""
    if context.pod_network is None or Ether not in packet or IP not in packet:
        return None
    ip = packet[IP]
    if not (IPv4Address(ip.src) in context.pod_network and IPv4Address(ip.dst) in context.pod_network):
        return None
    if UDP in ip and ip[UDP].dport == context.port:
        return None
    fields = _inner_fields(packet[Ether])
    return DirectPacket(time=float(packet.time), length=ip.len or len(bytes(ip)),
                        inner_src_node=context.node_holding(fields["inner_src"]),
                        inner_dst_node=context.node_holding(fields["inner_dst"]), **fields)


def _inner_fields(inner: Optional[Ether]) -> dict[str, Any]:
    fields: dict[str, Any] = dict(inner_src_mac=None, inner_dst_mac=None, inner_src=None, inner_dst=None,
                                  protocol="truncated", sport=None, dport=None, icmp_type=None, icmp_code=None)
    if inner is None:
        return fields
    fields.update(inner_src_mac=inner.src.lower(), inner_dst_mac=inner.dst.lower())
    if IP in inner:
        ip = inner[IP]
        fields.update(inner_src=IPv4Address(ip.src), inner_dst=IPv4Address(ip.dst), protocol=f"ip-proto-{ip.proto}")
        if ICMP in ip:
            fields.update(protocol="icmp", icmp_type=ip[ICMP].type, icmp_code=ip[ICMP].code)
        elif TCP in ip or UDP in ip:
            layer = ip[TCP] if TCP in ip else ip[UDP]
            fields.update(protocol="tcp" if TCP in ip else "udp", sport=layer.sport, dport=layer.dport)
    elif IPv6 in inner:
        fields.update(inner_src=ip_address(inner[IPv6].src), inner_dst=ip_address(inner[IPv6].dst), protocol="ipv6")
    elif ARP in inner:
        arp = inner[ARP]
        fields.update(protocol="arp", inner_src=_address_or_none(arp.psrc), inner_dst=_address_or_none(arp.pdst))
    elif isinstance(inner, Dot3):  # a length where the EtherType would be: 802.3 with LLC, no EtherType
        fields.update(protocol="802.3")
    else:
        fields.update(protocol=f"ethertype-0x{inner.type:04x}")
    return fields


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
    if context.pod_network is not None:
        for end, address in (("src", frame.inner_src), ("dst", frame.inner_dst)):
            if address is not None and address not in context.pod_network:
                found.append(Anomaly(f"inner-{end}-outside-pod-network",
                                     f"inner {'source' if end == 'src' else 'destination'} {address} "
                                     f"is outside the pod network {context.pod_network}"))
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
    address: Optional[IPv4Address] = None
    bpf: Optional[str] = None

    def matches(self, frame: PodPacket) -> bool:
        if self.kind == "pod":
            return self.address in (frame.inner_src, frame.inner_dst)
        if self.kind == "node":
            return isinstance(frame, VxlanFrame) and self.address in (frame.outer_src, frame.outer_dst)
        return True  # raw BPF was applied by the capture


def parse_filter(text: Optional[str]) -> FrameFilter:
    """`--filter` text -> FrameFilter; ValueError when `pod`/`node` is not followed by one IPv4 address."""
    if text is None or not text.strip():
        return FrameFilter("all")
    words = text.split()
    if words[0] in ("pod", "node") and len(words) <= 2:
        try:
            return FrameFilter(words[0], address=IPv4Address(words[1] if len(words) == 2 else ""))
        except ValueError:
            raise ValueError(f"--filter {text!r}: `{words[0]}` takes one IPv4 address") from None
    return FrameFilter("bpf", bpf=text.strip())


def capture_bpf(frame_filter: FrameFilter, port: int, direct_network: Optional[IPv4Network] = None) -> str:
    """The BPF expression that lets through only what `frame_filter` can match; with `direct_network`
    (direct routing on), also unencapsulated packets between two of its addresses."""
    base = f"udp dst port {port}"
    direct = f"(ip src net {direct_network} and ip dst net {direct_network})" if direct_network else None
    if frame_filter.kind == "pod":
        value = f"0x{int(frame_filter.address):08x}"
        tunnelled = f"{base} and (udp[{_INNER_SRC_AT}:4] = {value} or udp[{_INNER_DST_AT}:4] = {value})"
        return f"({tunnelled}) or ({direct} and host {frame_filter.address})" if direct else tunnelled
    if frame_filter.kind == "node":
        return f"{base} and host {frame_filter.address}"
    either = f"({base} or {direct})" if direct else base
    if frame_filter.kind == "bpf":
        return f"{either} and ({frame_filter.bpf})"
    return either


# -- output --------------------------------------------------------------------------------

_ICMP_NAMES = {0: "echo-reply", 3: "unreachable", 5: "redirect", 8: "echo-request", 11: "time-exceeded"}


def _clock(time: float) -> str:
    return datetime.datetime.fromtimestamp(time).strftime("%H:%M:%S.%f")


def _endpoint(address: IPv4Address, subnet: Optional[IPv4Network]) -> str:
    return f"{address}[{subnet}]" if subnet is not None else str(address)


def _with_port(address: Optional[InnerAddress], port: Optional[int]) -> str:
    text = str(address) if address is not None else "?"
    return f"{text}.{port}" if port is not None else text


def _what(frame: PodPacket) -> str:
    if frame.protocol == "icmp":
        name = _ICMP_NAMES.get(frame.icmp_type, f"type-{frame.icmp_type}")
        return f"icmp {name}" + (f" code {frame.icmp_code}" if frame.icmp_code else "")
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
        elif isinstance(value, (IPv4Address, IPv6Address, IPv4Network)):
            value = str(value)
        out[field.name] = value
    return out


def to_json(frame: PodPacket) -> str:
    """One JSON object on one line."""
    return json.dumps(to_dict(frame), sort_keys=True)
