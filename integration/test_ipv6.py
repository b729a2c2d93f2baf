"""IPv6 end to end (issue 11): dual-stack and IPv6-only pod networks over IPv4, IPv6 and dual-stack underlays,
checked with ping/ping -6, tcpdump, `ip -j` and `bridge -j` from outside the agent."""

from __future__ import annotations

import json

import pytest

from integration.cluster import overlay_routes6, start_agents, wait_converged
from integration.lab import Lab, Pod

pytestmark = pytest.mark.root

DUAL_CONFIG = {"Network": "198.19.0.0/16", "SubnetMax": "198.19.199.0", "EnableIPv6": True,
               "IPv6Network": "fd19::/56", "Backend": {"Type": "vxlan", "VNI": 1}}
V6_CONFIG = {"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": "fd19::/56",
             "Backend": {"Type": "vxlan", "VNI": 1}}
FAST = ("--resync-interval", "2", "--subnet-lease-ttl", "30")


def put_config(lab: Lab, doc: dict) -> None:
    lab.etcdctl("put", "/vxlan-net/config", json.dumps(doc))


def cluster(lab: Lab, doc: dict, *agent_args: str) -> list:
    put_config(lab, doc)
    start_agents(lab, lab.nodes, *FAST, *agent_args)
    wait_converged(lab, lab.nodes, timeout=20)
    return lab.nodes


def pods_on(lab: Lab, nodes, per_node: int = 1) -> list[Pod]:
    return [lab.add_pod_from_subnet_file(node, f"n{node.index}p{i}") for node in nodes for i in range(per_node)]


def unreachable_pairs(pods: list[Pod], family: int) -> list[tuple[str, str]]:
    """Every ordered pair of distinct pods that cannot ping each other over `family`."""
    failed = []
    for a in pods:
        for b in pods:
            if a is b:
                continue
            target = b.interface6 if family == 6 else b.interface
            if target is None:
                raise AssertionError(f"{b.pod_name} has no IPv{family} address")
            ping = a.ping6 if family == 6 else a.ping
            if not ping(str(target.ip), count=1, timeout=3):
                failed.append((a.pod_name, b.pod_name))
    return failed


def test_dual_stack_cluster_over_a_dual_stack_underlay_reaches_every_pod_over_both_families(lab):
    lab = lab(nodes=3, underlay="dual")
    nodes = cluster(lab, DUAL_CONFIG)
    for node in nodes:  # one VTEP per underlay family, each with its own MAC
        v4, v6 = (node.ip_json("-d", "link", "show", "dev", d)[0] for d in ("vxnet.1", "vxnet6.1"))
        assert v4["linkinfo"]["info_data"]["local"] == node.public_ip
        assert v6["linkinfo"]["info_data"]["local6"] == node.public_ipv6 and v4["address"] != v6["address"]
        assert len(overlay_routes6(node)) == 2
        assert {r["dev"] for r in node.ip_json("-6", "route", "show", "proto", "157")} == {"vxnet6.1"}
    pods = pods_on(lab, nodes, per_node=2)
    assert all(p.interface is not None and p.interface6 is not None for p in pods)
    assert unreachable_pairs(pods, 4) == [] and unreachable_pairs(pods, 6) == []
    # On the wire: our VNI over the IPv6 underlay, the pods' IPv6 addresses unchanged inside.
    a, b = pods[0], pods[2]
    capture = lab.capture(nodes[1], iface=nodes[1].underlay_ifname, bpf="ip6 and udp port 8472", count=4,
                          timeout=10)
    assert a.ping6(str(b.interface6.ip), count=2, timeout=3)
    capture.wait()
    inner = [p for p in capture.packets() if p.haslayer("VXLAN") and p["VXLAN"].vni == 1
             and p["VXLAN"].payload.haslayer("IPv6")]
    assert inner, capture.lines()
    addresses = {(p["VXLAN"]["IPv6"].src, p["VXLAN"]["IPv6"].dst) for p in inner}
    assert (str(a.interface6.ip), str(b.interface6.ip)) in addresses
