"""VXLAN frame decoding and anomaly checks on hand-built scapy packets (no capture, no root)."""

from __future__ import annotations

import json
import sys
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import ARP, LLC, Dot3, Ether
from scapy.layers.vxlan import VXLAN
from scapy.packet import Raw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vxlan_net.tools.inspect_frames import (DirectPacket, FrameFilter, InspectContext, capture_bpf, decode_direct,
                                            decode_frame, format_line, parse_filter, to_json)

NODE_1, NODE_2, STRANGER = "198.18.1.2", "198.18.2.2", "198.18.200.2"
SUBNET_1, SUBNET_2 = IPv4Network("198.19.5.0/24"), IPv4Network("198.19.9.0/24")
POD_A, POD_B = "198.19.5.2", "198.19.9.2"
MAC_A, MAC_B = "5e:00:00:00:00:0a", "5e:00:00:00:00:0b"
CONTEXT = InspectContext(port=8472, vni=1, pod_network=IPv4Network("198.19.0.0/16"),
                         nodes={IPv4Address(NODE_1): SUBNET_1, IPv4Address(NODE_2): SUBNET_2}, path_mtu=1500)


def tunnelled(inner, *, src=NODE_1, dst=NODE_2, vni=1, port=8472, sport=40000, time=1_700_000_000.25):
    packet = (Ether(src="02:00:00:00:01:02", dst="02:00:00:00:01:01") / IP(src=src, dst=dst)
              / UDP(sport=sport, dport=port) / VXLAN(vni=vni) / Ether(src=MAC_A, dst=MAC_B) / inner)
    packet.time = time
    return packet


def test_icmp_echo_is_decoded_with_outer_inner_and_resolved_nodes():
    frame = decode_frame(tunnelled(IP(src=POD_A, dst=POD_B) / ICMP(type=8, id=7, seq=1) / Raw(b"x" * 56)), CONTEXT)
    assert frame is not None
    assert (str(frame.outer_src), str(frame.outer_dst), frame.outer_sport, frame.outer_dport) == (
        NODE_1, NODE_2, 40000, 8472)
    assert frame.vni == 1
    assert (frame.inner_src_mac, frame.inner_dst_mac) == (MAC_A, MAC_B)
    assert (str(frame.inner_src), str(frame.inner_dst)) == (POD_A, POD_B)
    assert (frame.protocol, frame.icmp_type, frame.icmp_code, frame.sport, frame.dport) == ("icmp", 8, 0, None, None)
    assert frame.length == 20 + 8 + 8 + 14 + 20 + 8 + 56 and frame.inner_length == 14 + 20 + 8 + 56
    assert (frame.outer_src_subnet, frame.outer_dst_subnet) == (SUBNET_1, SUBNET_2)
    assert (str(frame.inner_src_node), str(frame.inner_dst_node)) == (NODE_1, NODE_2)
    assert frame.anomalies == ()
    assert frame.time == pytest.approx(1_700_000_000.25)


@pytest.mark.parametrize("layer, protocol, ports", [
    (TCP(sport=43210, dport=80, flags="S"), "tcp", (43210, 80)),
    (UDP(sport=5353, dport=53), "udp", (5353, 53)),
])
def test_tcp_and_udp_inner_ports_are_decoded(layer, protocol, ports):
    frame = decode_frame(tunnelled(IP(src=POD_A, dst=POD_B) / layer), CONTEXT)
    assert (frame.protocol, frame.sport, frame.dport) == (protocol, *ports)
    assert frame.anomalies == ()


def test_inner_arp_and_other_ip_protocols_are_named():
    arp = decode_frame(tunnelled(ARP(psrc=POD_A, pdst=POD_B)), CONTEXT)
    assert (arp.protocol, str(arp.inner_src), str(arp.inner_dst)) == ("arp", POD_A, POD_B)
    gre = decode_frame(tunnelled(IP(src=POD_A, dst=POD_B, proto=47)), CONTEXT)
    assert gre.protocol == "ip-proto-47"


def test_a_custom_port_is_decoded_even_where_scapy_binds_nothing():
    context = InspectContext(port=9999, vni=1)
    frame = decode_frame(tunnelled(IP(src=POD_A, dst=POD_B) / ICMP(), port=9999), context)
    assert frame is not None and frame.vni == 1 and str(frame.inner_dst) == POD_B
    assert decode_frame(tunnelled(IP(src=POD_A, dst=POD_B) / ICMP(), port=8472), context) is None


@pytest.mark.parametrize("packet", [
    Ether() / IP(src=NODE_1, dst=NODE_2) / ICMP(),
    Ether() / IP(src=NODE_1, dst=NODE_2) / UDP(sport=8472, dport=53) / Raw(b"x" * 40),
    Ether() / IP(src=NODE_1, dst=NODE_2) / TCP(dport=8472),
    Ether() / IP(src=NODE_1, dst=NODE_2) / UDP(dport=8472) / Raw(b"1234"),
    Ether() / ARP(psrc=NODE_1, pdst=NODE_2),
    Ether() / IP(src=NODE_1, dst=NODE_2, frag=100) / Raw(b"x" * 40),
], ids=["icmp", "udp-other-port", "tcp-to-port", "short-udp", "arp", "later-fragment"])
def test_a_packet_that_is_no_vxlan_frame_is_ignored(packet):
    assert decode_frame(packet, CONTEXT) is None


def kinds(frame) -> set[str]:
    return {a.kind for a in frame.anomalies}


def test_foreign_vni_is_flagged():
    frame = decode_frame(tunnelled(IP(src=POD_A, dst=POD_B) / ICMP(), vni=42), CONTEXT)
    assert frame.vni == 42 and kinds(frame) == {"foreign-vni"}
    assert "VNI 42" in frame.anomalies[0].message


def test_outer_source_that_is_no_known_node_is_flagged():
    frame = decode_frame(tunnelled(IP(src=POD_A, dst=POD_B) / ICMP(), src=STRANGER), CONTEXT)
    assert kinds(frame) == {"unknown-outer-src"} and frame.outer_src_subnet is None


@pytest.mark.parametrize("src, dst, kind", [
    ("10.0.0.1", POD_B, "inner-src-outside-pod-network"),
    (POD_A, "10.0.0.1", "inner-dst-outside-pod-network"),
])
def test_inner_address_outside_the_pod_network_is_flagged(src, dst, kind):
    frame = decode_frame(tunnelled(IP(src=src, dst=dst) / ICMP()), CONTEXT)
    assert kinds(frame) == {kind}
    assert "10.0.0.1" in frame.anomalies[0].message


def test_frame_larger_than_the_path_mtu_is_flagged():
    fits = decode_frame(tunnelled(IP(src=POD_A, dst=POD_B) / ICMP() / Raw(b"x" * (1450 - 28))), CONTEXT)
    assert fits.length == 1500 and fits.anomalies == ()
    big = decode_frame(tunnelled(IP(src=POD_A, dst=POD_B) / ICMP() / Raw(b"x" * (1451 - 28))), CONTEXT)
    assert big.length == 1501 and kinds(big) == {"oversize"} and not big.aggregate


def test_tcp_larger_than_the_path_mtu_is_an_offload_aggregate_not_an_anomaly():
    frame = decode_frame(tunnelled(IP(src=POD_A, dst=POD_B) / TCP(sport=1, dport=2) / Raw(b"x" * 7000)), CONTEXT)
    assert frame.aggregate and frame.anomalies == ()
    assert format_line(frame).endswith(f"len {frame.length} (offload aggregate)")
    small = decode_frame(tunnelled(IP(src=POD_A, dst=POD_B) / TCP(sport=1, dport=2) / Raw(b"x" * 100)), CONTEXT)
    assert not small.aggregate


def test_fragmented_outer_packet_and_misdirected_frame_are_flagged():
    packet = tunnelled(IP(src=POD_A, dst=POD_B) / ICMP())
    packet[IP].flags = "MF"
    assert kinds(decode_frame(packet, CONTEXT)) == {"fragmented"}
    misdirected = decode_frame(tunnelled(IP(src=POD_A, dst=POD_B) / ICMP(), dst=NODE_1), CONTEXT)
    assert kinds(misdirected) == {"misdirected"}


def test_unknown_context_skips_its_checks():
    frame = decode_frame(tunnelled(IP(src="10.0.0.1", dst="10.0.0.2") / ICMP() / Raw(b"x" * 2000),
                                   src=STRANGER, vni=42), InspectContext())
    assert frame.anomalies == ()
    assert (frame.outer_src_subnet, frame.inner_src_node) == (None, None)


def test_json_is_one_line_with_plain_types():
    frame = decode_frame(tunnelled(IP(src=POD_A, dst=POD_B) / TCP(sport=1234, dport=80), vni=42), CONTEXT)
    text = to_json(frame)
    assert "\n" not in text
    doc = json.loads(text)
    assert set(doc) == {
        "time", "outer_src", "outer_dst", "outer_sport", "outer_dport", "vni", "inner_src_mac", "inner_dst_mac",
        "inner_src", "inner_dst", "protocol", "sport", "dport", "icmp_type", "icmp_code", "length", "inner_length",
        "outer_src_subnet", "outer_dst_subnet", "inner_src_node", "inner_dst_node", "aggregate", "anomalies"}
    assert doc["outer_src"] == NODE_1 and doc["outer_dst_subnet"] == str(SUBNET_2)
    assert doc["inner_src"] == POD_A and doc["inner_dst_node"] == NODE_2
    assert (doc["protocol"], doc["sport"], doc["dport"], doc["vni"]) == ("tcp", 1234, 80, 42)
    assert doc["anomalies"] == [{"kind": "foreign-vni", "message": "VNI 42 is not ours (1)"}]


def test_format_line_names_everything_an_operator_needs():
    frame = decode_frame(tunnelled(IP(src=POD_A, dst=POD_B) / ICMP(type=8)), CONTEXT)
    line = format_line(frame)
    assert f"{NODE_1}[{SUBNET_1}] > {NODE_2}[{SUBNET_2}] vni 1" in line
    assert f"{MAC_A} > {MAC_B}" in line and f"{POD_A} > {POD_B} icmp echo-request" in line
    assert f"len {frame.length}" in line and "!!" not in line
    tcp = format_line(decode_frame(tunnelled(IP(src=POD_A, dst=POD_B) / TCP(sport=1234, dport=80), vni=3), CONTEXT))
    assert f"{POD_A}.1234 > {POD_B}.80 tcp" in tcp and "!! foreign-vni: VNI 3 is not ours (1)" in tcp


def test_filters_parse_and_match_pod_or_node_addresses():
    frame = decode_frame(tunnelled(IP(src=POD_A, dst=POD_B) / ICMP()), CONTEXT)
    assert parse_filter(f"pod {POD_B}") == FrameFilter("pod", address=IPv4Address(POD_B))
    assert parse_filter(f"pod {POD_B}").matches(frame) and not parse_filter("pod 198.19.1.1").matches(frame)
    assert parse_filter(f"node {NODE_1}").matches(frame) and not parse_filter(f"node {STRANGER}").matches(frame)
    assert parse_filter("icmp or tcp") == FrameFilter("bpf", bpf="icmp or tcp")
    assert parse_filter(None).kind == "all"
    with pytest.raises(ValueError):
        parse_filter("pod 198.19.1")
    with pytest.raises(ValueError):
        parse_filter("node")


def test_capture_bpf_matches_inner_pod_addresses_at_their_fixed_offsets():
    pod = capture_bpf(parse_filter(f"pod {POD_B}"), 8472)
    assert pod.startswith("(udp dst port 8472 and (udp[42:4] = 0xc6130902 or udp[46:4] = 0xc6130902)) or (ip6 and ")
    raw = bytes(tunnelled(IP(src=POD_A, dst=POD_B) / ICMP())[UDP])
    assert raw[46:50] == IPv4Address(POD_B).packed and raw[42:46] == IPv4Address(POD_A).packed
    assert capture_bpf(parse_filter(f"node {NODE_2}"), 4789) == f"udp dst port 4789 and host {NODE_2}"
    assert capture_bpf(parse_filter("icmp"), 8472) == "udp dst port 8472 and (icmp)"
    assert capture_bpf(parse_filter(None), 8472) == "udp dst port 8472"


# --- direct routing (issue 10): pod packets on the underlay without a tunnel header ---


def plain(src, dst, inner, time=1_700_000_000.5):
    packet = Ether(src="02:00:00:00:01:02", dst="02:00:00:00:01:03") / IP(src=src, dst=dst) / inner
    packet.time = time
    return packet


@pytest.mark.parametrize("packet", [
    plain(NODE_1, NODE_2, ICMP()),                      # node to node: not pod traffic
    plain(POD_A, "198.18.200.2", ICMP()),               # a pod to the outside (masqueraded or not)
    plain(NODE_1, POD_B, ICMP()),                       # a node to a pod
    tunnelled(IP(src=POD_A, dst=POD_B) / ICMP()),       # a VXLAN frame is decode_frame's
])
def test_only_pod_to_pod_ip_without_a_tunnel_header_is_a_direct_packet(packet):
    assert decode_direct(packet, CONTEXT) is None


def test_a_direct_packet_is_shown_as_plain_ip_between_the_pods_with_their_nodes():
    packet = plain(POD_A, POD_B, ICMP(type=8) / Raw(b"x" * 56))
    direct = decode_direct(packet, CONTEXT)
    assert isinstance(direct, DirectPacket) and not direct.anomalies
    assert (str(direct.inner_src), str(direct.inner_dst), direct.protocol, direct.length) == (POD_A, POD_B, "icmp", 84)
    assert (str(direct.inner_src_node), str(direct.inner_dst_node)) == (NODE_1, NODE_2)
    assert format_line(direct).endswith(
        "direct | 02:00:00:00:01:02 > 02:00:00:00:01:03 | 198.19.5.2 > 198.19.9.2 icmp echo-request | len 84")
    assert json.loads(to_json(direct))["path"] == "direct"
    assert parse_filter(f"pod {POD_A}").matches(direct) and not parse_filter(f"node {NODE_1}").matches(direct)
    assert decode_direct(packet, InspectContext(port=8472)) is None  # pod network unknown: nothing to judge by


def test_capture_bpf_with_direct_routing_also_lets_plain_pod_to_pod_packets_through():
    net = IPv4Network("198.19.0.0/16")
    direct = "(ip src net 198.19.0.0/16 and ip dst net 198.19.0.0/16)"
    assert capture_bpf(parse_filter(None), 8472, net) == f"(udp dst port 8472 or {direct})"
    assert capture_bpf(parse_filter("icmp"), 8472, net) == f"(udp dst port 8472 or {direct}) and (icmp)"
    assert capture_bpf(parse_filter(f"pod {POD_B}"), 8472, net).endswith(f"or (({direct}) and host {POD_B})")
    assert capture_bpf(parse_filter(f"node {NODE_2}"), 8472, net) == f"udp dst port 8472 and host {NODE_2}"


def test_an_inner_802_3_frame_is_named_not_a_crash():
    packet = (Ether() / IP(src=NODE_1, dst=NODE_2) / UDP(sport=40000, dport=8472) / VXLAN(vni=1)
              / Dot3(src=MAC_A, dst="01:80:c2:00:00:00") / LLC() / Raw(b"x" * 30))  # e.g. a spanning-tree BPDU
    frame = decode_frame(packet, CONTEXT)
    assert frame.protocol == "802.3" and frame.inner_src is None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prefix=st.sampled_from([bytes(Ether(type=0x0800)), bytes(tunnelled(IP(src=POD_A, dst=POD_B) / ICMP()))[:50],
                               bytes(plain(POD_A, POD_B, ICMP()))[:34]]),
       tail=st.binary(max_size=120))
def test_any_captured_bytes_decode_to_a_frame_a_packet_or_nothing(prefix, tail):
    """Whatever crosses the wire (truncated headers, garbage after a valid prefix), neither decoder raises."""
    packet = Ether(prefix + tail)
    decode_frame(packet, CONTEXT)
    decode_direct(packet, CONTEXT)
