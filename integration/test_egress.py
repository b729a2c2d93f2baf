"""Masquerade only what leaves the pod network; pod-to-pod crosses the tunnel unchanged."""

from __future__ import annotations

import pytest

from integration.cluster import add_pod, running_cluster

pytestmark = pytest.mark.lab

OUTSIDE_IP = "198.18.200.2"


def _sources_seen_outside(lab, pod) -> set[str]:
    capture = lab.capture(lab.outside, iface="ul0", bpf="icmp[icmptype] == icmp-echo", count=2, timeout=6)
    pod.ping(OUTSIDE_IP, count=2, timeout=2)
    return {p["IP"].src for p in capture.wait().packets() if p.haslayer("IP")}


def test_ip_masq_rewrites_egress_to_the_node_address_but_never_pod_to_pod(lab):
    lab = lab(nodes=2)
    nodes = running_cluster(lab, "--ip-masq")
    pod_a, pod_b = add_pod(lab, nodes[0], 1), add_pod(lab, nodes[1], 1)
    assert pod_a.ping(OUTSIDE_IP, count=1, timeout=3), "egress through masquerade failed"
    assert _sources_seen_outside(lab, pod_a) == {nodes[0].public_ip}

    capture = lab.capture(lab.router, iface="any", bpf="udp port 8472", count=4, timeout=8)
    assert pod_a.ping(pod_b.ip, count=2, timeout=3)
    frames = [p for p in capture.wait().packets() if p.haslayer("VXLAN")]
    assert frames, "no VXLAN frame crossed the router"
    inner = {(f["VXLAN"]["IP"].src, f["VXLAN"]["IP"].dst) for f in frames}
    assert (pod_a.ip, pod_b.ip) in inner and (pod_b.ip, pod_a.ip) in inner
    assert all(f["VXLAN"].vni == 1 for f in frames)
    outer = {(f["IP"].src, f["IP"].dst) for f in frames}
    assert outer == {(nodes[0].public_ip, nodes[1].public_ip), (nodes[1].public_ip, nodes[0].public_ip)}


def test_without_ip_masq_egress_keeps_the_pod_address(lab):
    lab = lab(nodes=1)
    nodes = running_cluster(lab)
    pod = add_pod(lab, nodes[0], 1)
    assert _sources_seen_outside(lab, pod) == {pod.ip}
    tables = nodes[0].run("nft", "list", "tables", check=True).stdout
    assert "vxlan-net" in tables
    assert "masquerade" not in nodes[0].run("nft", "list", "table", "ip", "vxlan-net", check=True).stdout


def test_pod_traffic_is_forwarded_even_with_a_drop_forward_policy(lab):
    lab = lab(nodes=2)
    for node in lab.nodes:  # what iptables-nft with `-P FORWARD DROP` (e.g. Docker) leaves behind
        node.run("nft", "add table ip filter; add chain ip filter FORWARD "
                 "{ type filter hook forward priority 0; policy drop; }", check=True)
    nodes = running_cluster(lab)
    pod_a, pod_b = add_pod(lab, nodes[0], 1), add_pod(lab, nodes[1], 1)
    assert pod_a.ping(pod_b.ip, count=1, timeout=3)
    rules = nodes[0].run("nft", "list", "chain", "ip", "filter", "FORWARD", check=True).stdout
    assert rules.count('comment "vxlan-net: ') == 4 and "policy drop" in rules
    # restarting the agent replaces its rules instead of piling them up
    nodes[0].agent.stop()
    lab.start_agent(nodes[0])
    lab.wait_for(lambda: "node subnet" in nodes[0].agent.log_text(), timeout=10)
    rules = nodes[0].run("nft", "list", "chain", "ip", "filter", "FORWARD", check=True).stdout
    assert rules.count('comment "vxlan-net: ') == 4
