"""`vxlan-net inspect` in an IPv6-only lab: it reaches etcd at its IPv6 address, takes the dual-stack config and
leases from there, and decodes a scapy-made pcap of VXLAN over IPv6 (and a direct-routed IPv6 pod packet),
naming nodes and subnets and flagging what a healthy overlay does not send."""

from __future__ import annotations

import json
from ipaddress import IPv4Network, IPv6Address, IPv6Network

import pytest

from vxlan_net.core.config import build_config
from vxlan_net.core.lease import Lease, subnet_key_name

pytestmark = pytest.mark.lab

NODE_1, NODE_2, STRANGER = "fd18:0:0:1::2", "fd18:0:0:2::2", "fd18:0:0:200::2"
POD_A, POD_B = "fd19:0:0:5::2", "fd19:0:0:9::2"
LEASES = [Lease(IPv4Network("198.19.5.0/24"), None, None, 1, IPv6Network("fd19:0:0:5::/64"), IPv6Address(NODE_1),
                "5e:00:00:00:01:01"),
          Lease(IPv4Network("198.19.9.0/24"), None, None, 1, IPv6Network("fd19:0:0:9::/64"), IPv6Address(NODE_2),
                "5e:00:00:00:02:02")]


def _pcap(path) -> None:
    from scapy.layers.inet import UDP
    from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6
    from scapy.layers.l2 import Ether
    from scapy.layers.vxlan import VXLAN
    from scapy.utils import wrpcap

    def over6(src, dst, vni, inner_src, inner_dst):
        return (Ether() / IPv6(src=src, dst=dst) / UDP(sport=40000, dport=8472) / VXLAN(vni=vni)
                / Ether(src="5e:00:00:00:00:0a", dst="5e:00:00:00:00:0b") / IPv6(src=inner_src, dst=inner_dst)
                / ICMPv6EchoRequest())

    wrpcap(str(path), [over6(NODE_1, NODE_2, 1, POD_A, POD_B),
                       over6(STRANGER, NODE_1, 42, NODE_2, POD_A),  # forged: a stranger, a NAT'ed source, VNI 42
                       Ether() / IPv6(src=POD_A, dst=POD_B) / ICMPv6EchoRequest()])  # direct-routed


def _records(cluster) -> None:
    """The dual-stack config and the two nodes' leases, in the lab's etcd (reached over IPv6)."""
    cluster.etcdctl("put", "/vxlan-net/config", build_config("198.19.0.0/16", ipv6_network="fd19::/56").to_json())
    for lease in LEASES:
        cluster.etcdctl("put", f"/vxlan-net/subnets/{subnet_key_name(lease.key)}", lease.to_json())


def test_inspect_reads_ipv6_frames_with_nodes_from_etcd_over_ipv6(lab, tmp_path):
    cluster = lab(nodes=1, underlay="v6")
    node = cluster.nodes[0]
    _records(cluster)
    pcap = tmp_path / "v6.pcap"
    _pcap(pcap)

    read = node.run(cluster.agent_exe, "inspect", "--read", pcap, "--json", "--etcd-endpoints", cluster.etcd_url)
    assert read.returncode == 0, read.stderr
    assert "pod network 198.19.0.0/16 and fd19::/56, 2 nodes known from etcd" in read.stderr, read.stderr
    healthy, forged, direct = [json.loads(line) for line in read.stdout.splitlines()]
    assert (healthy["outer_src"], healthy["outer_src_subnet"], healthy["outer_dst_subnet"]) == (
        NODE_1, "198.19.5.0/24", "198.19.9.0/24")
    assert (healthy["inner_src"], healthy["inner_dst"], healthy["protocol"], healthy["icmp_type"]) == (
        POD_A, POD_B, "icmp6", 128)
    assert (healthy["inner_src_node"], healthy["inner_dst_node"], healthy["anomalies"]) == (NODE_1, NODE_2, [])
    assert {a["kind"] for a in forged["anomalies"]} == {"foreign-vni", "unknown-outer-src",
                                                        "inner-src-outside-pod-network"}
    assert (direct["path"], direct["inner_dst"], direct["inner_dst_node"]) == ("direct", POD_B, NODE_2)

    lines = node.run(cluster.agent_exe, "inspect", "--read", pcap, "--filter", f"pod {POD_B}",
                     "--etcd-endpoints", cluster.etcd_url, check=True).stdout.splitlines()
    assert len(lines) == 2 and all(f"{POD_A} > {POD_B} icmp6 echo-request" in line for line in lines), lines

    # A live capture with an IPv6 pod filter: its BPF compiles for the link and the capture ends in time.
    idle = node.run(cluster.agent_exe, "inspect", "--iface", "ul0", "--filter", f"pod {POD_B}", "--timeout", 1,
                    "--etcd-endpoints", cluster.etcd_url)
    assert idle.returncode == 0 and "0 frames" in idle.stderr, idle.stderr
    bad = node.run(cluster.agent_exe, "inspect", "--read", pcap, "--filter", "pod fd19::zz",
                   "--etcd-endpoints", cluster.etcd_url)
    assert bad.returncode == 2 and "one IPv4 or IPv6 address" in bad.stderr and bad.stdout == ""


def test_inspect_decodes_live_frames_the_kernel_sends_over_an_ipv6_underlay(lab, tmp_path):
    """Two hand-made VXLAN devices over IPv6 (the agent's IPv6 underlay is not needed to make real frames)."""
    from integration.test_inspect import Inspect

    cluster = lab(nodes=2, underlay="v6")
    n1, n2 = cluster.nodes
    _records(cluster)
    for node, peer, pod in ((n1, n2, POD_A), (n2, n1, POD_B)):
        node.ip_batch([f"link add vx6 type vxlan id 1 local {node.underlay_ipv6} remote {peer.underlay_ipv6} "
                       "dstport 8472", f"addr add {pod}/56 dev vx6 nodad", "link set vx6 up"])
    assert (n1.underlay_ipv6, n2.underlay_ipv6) == (NODE_1, NODE_2)

    inspect = Inspect(cluster, n1, tmp_path, "--iface", "ul0", "--count", 4, "--timeout", 15, "--json",
                      "--filter", f"pod {POD_B}", "--etcd-endpoints", cluster.etcd_url)
    reply = n1.ping6(POD_B, count=3, timeout=3)
    assert reply, reply.output
    frames = [json.loads(line) for line in inspect.lines()]
    assert len(frames) == 4, inspect.stderr()
    echoes = [f for f in frames if f["icmp_type"] in (128, 129)]
    assert {(f["outer_src"], f["outer_dst"], f["inner_src"], f["inner_dst"], f["icmp_type"]) for f in echoes} >= {
        (NODE_1, NODE_2, POD_A, POD_B, 128), (NODE_2, NODE_1, POD_B, POD_A, 129)}
    assert all(f["protocol"] == "icmp6" and f["vni"] == 1 and f["anomalies"] == [] for f in frames), frames
    assert {(f["outer_src"], f["outer_src_subnet"]) for f in frames} <= {(NODE_1, "198.19.5.0/24"),
                                                                          (NODE_2, "198.19.9.0/24")}
