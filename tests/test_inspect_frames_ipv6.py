"""IPv6 in `inspect`: VXLAN over an IPv6 outer header, IPv6 inner packets, direct-routed IPv6 pod packets, on
hand-built scapy packets; the capture filters checked by tcpdump reading scapy-made pcaps (no root)."""

from __future__ import annotations

import json
import struct
import subprocess
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (HBHOptUnknown, ICMPv6EchoRequest, IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment,
                                IPv6ExtHdrHopByHop, Jumbo)
from scapy.layers.l2 import Ether
from scapy.layers.vxlan import VXLAN
from scapy.packet import Raw
from scapy.utils import rdpcap, wrpcap

from vxlan_net.tools.inspect_frames import (MAX_EXTENSION_HEADERS, DirectPacket, InspectContext, capture_bpf,
                                            decode_direct, decode_frame, format_line, parse_filter, to_json)

NODE_1, NODE_2, STRANGER = "fd18:0:0:1::2", "fd18:0:0:2::2", "fd18:0:0:200::2"
NODE_1_V4, NODE_2_V4 = "198.18.1.2", "198.18.2.2"
SUBNET_1, SUBNET_2 = IPv4Network("198.19.5.0/24"), IPv4Network("198.19.9.0/24")
SUBNET6_1, SUBNET6_2 = IPv6Network("fd19:0:0:5::/64"), IPv6Network("fd19:0:0:9::/64")
POD_A, POD_B = "fd19:0:0:5::2", "fd19:0:0:9::2"
POD_A4, POD_B4 = "198.19.5.2", "198.19.9.2"
MAC_A, MAC_B = "5e:00:00:00:00:0a", "5e:00:00:00:00:0b"
# Two dual-stack nodes over a dual-stack underlay, as InspectContext.from_leases makes them.
CONTEXT = InspectContext(
    port=8472, vni=1, pod_network=IPv4Network("198.19.0.0/16"), pod_network6=IPv6Network("fd19::/56"),
    nodes={IPv4Address(NODE_1_V4): SUBNET_1, IPv6Address(NODE_1): SUBNET_1,
           IPv4Address(NODE_2_V4): SUBNET_2, IPv6Address(NODE_2): SUBNET_2},
    ipv6_subnets={IPv4Address(NODE_1_V4): SUBNET6_1, IPv6Address(NODE_1): SUBNET6_1,
                  IPv4Address(NODE_2_V4): SUBNET6_2, IPv6Address(NODE_2): SUBNET6_2},
    path_mtu=1500)


def over6(inner, *, src=NODE_1, dst=NODE_2, vni=1, port=8472, ext=(), time=1_700_000_000.25):
    """VXLAN over IPv6 (with extension headers `ext` between IPv6 and UDP) carrying `inner` in Ethernet."""
    outer = IPv6(src=src, dst=dst)
    for header in ext:
        outer = outer / header
    packet = (Ether(src="02:00:00:00:01:02", dst="02:00:00:00:01:01") / outer / UDP(sport=40000, dport=port)
              / VXLAN(vni=vni) / Ether(src=MAC_A, dst=MAC_B) / inner)
    packet.time = time
    return Ether(bytes(packet))  # as captured: dissected from bytes


def over4(inner, *, src=NODE_1_V4, dst=NODE_2_V4):
    return Ether(bytes(Ether() / IP(src=src, dst=dst) / UDP(sport=40000, dport=8472) / VXLAN(vni=1)
                       / Ether(src=MAC_A, dst=MAC_B) / inner))


def echo6(src=POD_A, dst=POD_B, payload=56):
    return IPv6(src=src, dst=dst) / ICMPv6EchoRequest(id=7, seq=1) / Raw(b"x" * payload)


def kinds(frame) -> set[str]:
    return {a.kind for a in frame.anomalies}


# --- hostile input first ---------------------------------------------------------------


@pytest.mark.parametrize("cut", [0, 1, 20, 39])
def test_a_truncated_outer_ipv6_header_is_no_frame_and_no_crash(cut):
    whole = bytes(over6(echo6()))
    packet = Ether(whole[:14 + cut])
    assert decode_frame(packet, CONTEXT) is None
    assert decode_direct(packet, CONTEXT) is None


@pytest.mark.parametrize("cut, protocol", [(0, "truncated"), (39, "truncated"), (41, "truncated")])
def test_a_truncated_inner_ipv6_packet_is_named_truncated(cut, protocol):
    inner = bytes(echo6())[:cut]
    packet = Ether(bytes(Ether() / IP(src=NODE_1_V4, dst=NODE_2_V4) / UDP(sport=1, dport=8472) / VXLAN(vni=1)
                         / Ether(src=MAC_A, dst=MAC_B, type=0x86DD) / Raw(inner)))
    frame = decode_frame(packet, CONTEXT)
    assert frame is not None and frame.protocol == protocol
    if cut < 40:
        assert frame.inner_src is None and frame.anomalies == ()
    else:
        assert str(frame.inner_src) == POD_A and frame.icmp_type is None


def test_an_extension_header_chain_is_walked_only_so_far():
    within = [IPv6ExtHdrDestOpt() for _ in range(MAX_EXTENSION_HEADERS - 1)]
    frame = decode_frame(over6(echo6(), ext=within), CONTEXT)
    assert frame is not None and frame.protocol == "icmp6" and frame.anomalies == ()

    too_long = [IPv6ExtHdrDestOpt() for _ in range(MAX_EXTENSION_HEADERS + 1)]
    assert decode_frame(over6(echo6(), ext=too_long), CONTEXT) is None, "no UDP found within the bound"
    inner = IPv6(src=POD_A, dst=POD_B) / IPv6ExtHdrDestOpt()
    for _ in range(MAX_EXTENSION_HEADERS):
        inner = inner / IPv6ExtHdrDestOpt()
    frame = decode_frame(over4(inner / ICMPv6EchoRequest()), CONTEXT)
    assert frame.protocol == "ipv6-ext-chain" and str(frame.inner_dst) == POD_B


def test_an_extension_header_claiming_more_bytes_than_there_are_is_truncated_not_a_read_past_the_end():
    inner = bytearray(bytes(IPv6(src=POD_A, dst=POD_B) / IPv6ExtHdrDestOpt() / ICMPv6EchoRequest()))
    inner[41] = 255  # Hdr Ext Len: (255 + 1) * 8 = 2048 bytes, in a packet of 56
    tagged = Ether(bytes(Ether() / IP(src=NODE_1_V4, dst=NODE_2_V4) / UDP(sport=1, dport=8472) / VXLAN(vni=1)
                         / Ether(src=MAC_A, dst=MAC_B, type=0x86DD) / Raw(bytes(inner))))
    frame = decode_frame(tagged, CONTEXT)
    assert (frame.protocol, str(frame.inner_src)) == ("truncated", POD_A)

    outer = bytearray(bytes(over6(echo6(), ext=[IPv6ExtHdrDestOpt()])))
    outer[14 + 41] = 255
    assert decode_frame(Ether(bytes(outer)), CONTEXT) is None


@pytest.mark.parametrize("plen, jumbo", [(0, 100_000), (65535, None), (3, None)], ids=["jumbo", "long", "short"])
def test_payload_lengths_that_lie_change_nothing_but_are_not_believed(plen, jumbo):
    ext = [IPv6ExtHdrHopByHop(options=[Jumbo(jumboplen=jumbo)])] if jumbo else []
    honest = over6(echo6(), ext=ext)
    raw = bytearray(bytes(honest))
    raw[14 + 4:14 + 6] = struct.pack("!H", plen)
    frame = decode_frame(Ether(bytes(raw)), CONTEXT)
    assert frame is not None, "the captured bytes are decoded whatever the length field says"
    assert frame.length == len(raw) - 14 and "oversize" not in kinds(frame)
    assert (frame.protocol, str(frame.inner_dst), frame.icmp_type) == ("icmp6", POD_B, 128)


def test_a_real_jumbogram_larger_than_the_path_is_oversize():
    raw = bytearray(bytes(over6(echo6(payload=9000), ext=[IPv6ExtHdrHopByHop(options=[Jumbo(jumboplen=9100)])])))
    raw[14 + 4:14 + 6] = b"\0\0"
    frame = decode_frame(Ether(bytes(raw)), CONTEXT)
    assert frame.length == len(raw) - 14 > 1500 and kinds(frame) == {"oversize"}


def test_outer_ipv6_fragments_first_flagged_later_ignored():
    first = decode_frame(over6(echo6(), ext=[IPv6ExtHdrFragment(offset=0, m=1, id=9)]), CONTEXT)
    assert kinds(first) == {"fragmented"}
    later = over6(echo6(), ext=[IPv6ExtHdrFragment(offset=10, m=0, id=9)])
    assert decode_frame(later, CONTEXT) is None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prefix=st.sampled_from([bytes(over6(echo6()))[:60], bytes(over6(echo6()))[:90], bytes(over4(echo6()))[:70],
                               bytes(Ether() / IPv6(src=POD_A, dst=POD_B))[:54],
                               bytes(over6(echo6(), ext=[IPv6ExtHdrHopByHop(options=[HBHOptUnknown()])]))[:70]]),
       tail=st.binary(max_size=160))
def test_any_captured_ipv6_bytes_decode_to_a_frame_a_packet_or_nothing(prefix, tail):
    packet = Ether(prefix + tail)
    for decoded in (decode_frame(packet, CONTEXT), decode_direct(packet, CONTEXT)):
        if decoded is not None:
            json.loads(to_json(decoded))
            format_line(decoded)


# --- what a healthy frame shows ---------------------------------------------------------------


def test_icmpv6_echo_over_an_ipv6_underlay_is_decoded_with_its_nodes():
    frame = decode_frame(over6(echo6()), CONTEXT)
    assert (str(frame.outer_src), str(frame.outer_dst), frame.outer_dport, frame.vni) == (NODE_1, NODE_2, 8472, 1)
    assert (str(frame.inner_src), str(frame.inner_dst)) == (POD_A, POD_B)
    assert (frame.protocol, frame.icmp_type, frame.icmp_code) == ("icmp6", 128, 0)
    assert frame.length == 40 + 8 + 8 + 14 + 40 + 8 + 56 and frame.inner_length == 14 + 40 + 8 + 56
    assert (frame.outer_src_subnet, frame.outer_dst_subnet) == (SUBNET_1, SUBNET_2)
    assert (str(frame.inner_src_node), str(frame.inner_dst_node)) == (NODE_1, NODE_2), "the outer family's address"
    assert frame.anomalies == ()
    line = format_line(frame)
    assert f"{NODE_1}[{SUBNET_1}] > {NODE_2}[{SUBNET_2}] vni 1 |" in line
    assert f"{POD_A} > {POD_B} icmp6 echo-request | len {frame.length}" in line and "!!" not in line
    doc = json.loads(to_json(frame))
    assert (doc["outer_src"], doc["inner_dst"], doc["inner_dst_node"]) == (NODE_1, POD_B, NODE_2)


@pytest.mark.parametrize("layer, protocol", [(TCP(sport=4321, dport=80), "tcp"), (UDP(sport=5353, dport=53), "udp")])
def test_inner_ipv6_tcp_and_udp_ports_also_behind_extension_headers(layer, protocol):
    frame = decode_frame(over6(IPv6(src=POD_A, dst=POD_B) / IPv6ExtHdrDestOpt() / layer), CONTEXT)
    assert (frame.protocol, frame.sport, frame.dport) == (protocol, layer.sport, layer.dport)
    assert f"{POD_A}.{layer.sport} > {POD_B}.{layer.dport} {protocol}" in format_line(frame)


def test_ipv4_pods_over_an_ipv6_underlay_and_ipv6_pods_over_an_ipv4_one():
    v4_in_v6 = decode_frame(over6(IP(src=POD_A4, dst=POD_B4) / ICMP()), CONTEXT)
    assert (v4_in_v6.protocol, str(v4_in_v6.inner_dst_node), v4_in_v6.anomalies) == ("icmp", NODE_2, ())
    v6_in_v4 = decode_frame(over4(echo6()), CONTEXT)
    assert (v6_in_v4.protocol, str(v6_in_v4.inner_dst_node), v6_in_v4.anomalies) == ("icmp6", NODE_2_V4, ())


# --- anomalies, as for IPv4 ---------------------------------------------------------------


def test_foreign_vni_and_unknown_outer_source_over_ipv6():
    assert kinds(decode_frame(over6(echo6(), vni=42), CONTEXT)) == {"foreign-vni"}
    frame = decode_frame(over6(echo6(), src=STRANGER), CONTEXT)
    assert kinds(frame) == {"unknown-outer-src"} and frame.outer_src_subnet is None
    assert f"outer source {STRANGER} is no known node" in frame.anomalies[0].message


@pytest.mark.parametrize("src, dst, kind", [
    (NODE_1, POD_B, "inner-src-outside-pod-network"),   # a NAT'ed source: the node's own address
    ("fe80::1", POD_B, "inner-src-outside-pod-network"),
    (POD_A, "fd18:0:0:200::2", "inner-dst-outside-pod-network"),
])
def test_inner_ipv6_outside_the_pod_networks_is_flagged(src, dst, kind):
    frame = decode_frame(over6(echo6(src=src, dst=dst)), CONTEXT)
    assert kinds(frame) == {kind}
    assert "fd19::/56" in frame.anomalies[0].message


def test_inner_ipv6_in_an_ipv4_only_cluster_is_outside_its_pod_network():
    context = InspectContext(port=8472, pod_network=IPv4Network("198.19.0.0/16"))
    assert kinds(decode_frame(over4(echo6()), context)) == {"inner-src-outside-pod-network",
                                                           "inner-dst-outside-pod-network"}
    assert decode_frame(over4(echo6()), InspectContext(port=8472)).anomalies == (), "nothing known: nothing judged"


def test_misdirected_and_oversize_ipv6_frames_are_flagged():
    assert kinds(decode_frame(over6(echo6(), dst=NODE_1), CONTEXT)) == {"misdirected"}
    fits = decode_frame(over6(echo6(payload=1500 - 70 - 48)), CONTEXT)
    assert fits.length == 1500 and fits.anomalies == ()
    big = decode_frame(over6(echo6(payload=1501 - 70 - 48)), CONTEXT)
    assert big.length == 1501 and kinds(big) == {"oversize"}
    tcp = decode_frame(over6(IPv6(src=POD_A, dst=POD_B) / TCP() / Raw(b"x" * 7000)), CONTEXT)
    assert tcp.aggregate and tcp.anomalies == ()


# --- direct routing: plain IPv6 between pods on the underlay ----------------------------------------


def plain6(src, dst, inner):
    packet = Ether(bytes(Ether(src="02:00:00:00:01:02", dst="02:00:00:00:01:03") / IPv6(src=src, dst=dst) / inner))
    packet.time = 1_700_000_000.5
    return packet


@pytest.mark.parametrize("packet", [
    plain6(NODE_1, NODE_2, ICMPv6EchoRequest()),                        # node to node
    plain6(POD_A, "fd18:0:0:200::2", ICMPv6EchoRequest()),              # a pod to the outside
    plain6(POD_A, POD_B, UDP(sport=1, dport=8472) / Raw(b"x" * 16)),    # to the tunnel port: decode_frame's
    over6(echo6()),                                                     # a VXLAN frame
])
def test_only_ipv6_pod_to_pod_without_a_tunnel_header_is_a_direct_packet(packet):
    assert decode_direct(packet, CONTEXT) is None


def test_a_direct_ipv6_packet_is_shown_as_plain_ipv6_between_the_pods():
    direct = decode_direct(plain6(POD_A, POD_B, ICMPv6EchoRequest() / Raw(b"x" * 56)), CONTEXT)
    assert isinstance(direct, DirectPacket) and direct.anomalies == ()
    assert (str(direct.inner_src), str(direct.inner_dst), direct.protocol, direct.length) == (POD_A, POD_B, "icmp6",
                                                                                                 40 + 8 + 56)
    assert (str(direct.inner_src_node), str(direct.inner_dst_node)) == (NODE_1, NODE_2)
    assert format_line(direct).endswith(f"direct | 02:00:00:00:01:02 > 02:00:00:00:01:03 | {POD_A} > {POD_B} "
                                        f"icmp6 echo-request | len 104")
    assert decode_direct(plain6(POD_A, POD_B, ICMPv6EchoRequest()),
                         InspectContext(pod_network=IPv4Network("198.19.0.0/16"))) is None, "no IPv6 pod network known"


# --- filters: parsed, matched, and the BPF checked by tcpdump ---------------------------------------


def test_ipv6_filters_parse_and_match():
    frame = decode_frame(over6(echo6()), CONTEXT)
    assert parse_filter(f"pod {POD_B}").matches(frame) and not parse_filter("pod fd19:0:0:9::3").matches(frame)
    assert parse_filter(f"node {NODE_1}").matches(frame) and not parse_filter(f"node {NODE_1_V4}").matches(frame)
    for bad in ("pod fd19::zz", "node fd19:::1", "pod fd19::/64"):
        with pytest.raises(ValueError, match="one IPv4 or IPv6 address"):
            parse_filter(bad)


def _tcpdump_count(tmp_path, packets, bpf: str) -> int:
    """How many of `packets` tcpdump lets through `bpf` (it writes them out; scapy counts them)."""
    path = tmp_path / f"f{len(list(tmp_path.iterdir()))}.pcap"
    wrpcap(str(path), packets)
    out = subprocess.run(["tcpdump", "-r", str(path), "-w", f"{path}.out", bpf], capture_output=True, text=True,
                         timeout=10)
    assert out.returncode == 0, out.stderr
    return len(rdpcap(f"{path}.out"))


@pytest.mark.parametrize("address", [POD_B, POD_B4])
def test_the_pod_capture_filter_lets_through_its_frames_over_either_underlay_and_nothing_else(tmp_path, address):
    inner = echo6() if ":" in address else IP(src=POD_A4, dst=POD_B4) / ICMP()
    reply = echo6(POD_B, POD_A) if ":" in address else IP(src=POD_B4, dst=POD_A4) / ICMP()
    other = echo6(POD_A, "fd19:0:0:9::3") if ":" in address else IP(src=POD_A4, dst="198.19.9.3") / ICMP()
    bpf = capture_bpf(parse_filter(f"pod {address}"), 8472)
    assert _tcpdump_count(tmp_path, [over6(inner), over4(inner), over6(reply), over4(reply)], bpf) == 4
    assert _tcpdump_count(tmp_path, [over6(other), over4(other), over6(inner, port=4789)], bpf) == 0


def test_the_direct_capture_filter_lets_ipv6_pod_to_pod_through(tmp_path):
    bpf = capture_bpf(parse_filter(None), 8472, IPv4Network("198.19.0.0/16"), IPv6Network("fd19::/56"))
    wanted = [plain6(POD_A, POD_B, ICMPv6EchoRequest()), over6(echo6()), over4(echo6())]
    assert _tcpdump_count(tmp_path, wanted, bpf) == 3
    assert _tcpdump_count(tmp_path, [plain6(POD_A, STRANGER, ICMPv6EchoRequest())], bpf) == 0
    pod = capture_bpf(parse_filter(f"pod {POD_B}"), 8472, None, IPv6Network("fd19::/56"))
    assert _tcpdump_count(tmp_path, [plain6(POD_A, POD_B, ICMPv6EchoRequest())], pod) == 1
