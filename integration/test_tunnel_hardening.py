"""Pods cannot reach another node's VXLAN port through masquerade, the VTEP drops unicast in L2 broadcast,
and the agent restores its FORWARD rules when someone removes them. Frames crafted with scapy in a pod."""

from __future__ import annotations

import json
import sys

import pytest

from integration.cluster import VTEP, add_pod, running_cluster

pytestmark = pytest.mark.lab

PORT = 8472
BROADCAST = "ff:ff:ff:ff:ff:ff"
# From the pod: UDP to <outer_dst>:8472 carrying a VXLAN frame (VNI 1) with an ICMP echo of id <icmp_id>.
CRAFT = """
import sys
from scapy.all import ICMP, IP, UDP, Ether, send
from scapy.layers.vxlan import VXLAN
outer_dst, inner_mac, inner_src, inner_dst, icmp_id = sys.argv[1:6]
frame = (IP(dst=outer_dst) / UDP(sport=40001, dport=8472) / VXLAN(vni=1, flags=0x08)
         / Ether(src="0a:00:00:00:00:77", dst=inner_mac) / IP(src=inner_src, dst=inner_dst)
         / ICMP(type=8, id=int(icmp_id)))
send(frame, count=3, inter=0.05, verbose=False)
"""
OTHER_TOOL = """
add table ip filter
add chain ip filter FORWARD { type filter hook forward priority filter; policy drop; }
add rule ip filter FORWARD ct state invalid counter drop comment "docker: invalid"
"""


def _send(pod, outer_dst: str, inner_mac: str, inner_src: str, inner_dst: str, icmp_id: int) -> None:
    pod.run(sys.executable, "-c", CRAFT, outer_dst, inner_mac, inner_src, inner_dst, icmp_id, check=True)


def _seen(lab, ns, bpf: str, send, iface: str = "") -> bool:
    """Whether a packet matching `bpf` shows up on `iface` (default: eth0/ul0) while `send()` runs (3 s at most)."""
    iface = iface or ("eth0" if ns in lab.pods.values() else "ul0")
    capture = lab.capture(ns, iface=iface, bpf=bpf, count=1, timeout=3)
    send()
    return bool(capture.wait().packets())


def _drop_rule(node) -> dict:
    table = json.loads(node.run("nft", "-j", "list", "table", "ip", "vxlan-net", check=True).stdout)
    rules = [i["rule"] for i in table["nftables"]
             if "rule" in i and i["rule"].get("comment") == "vxlan-net: pod traffic to the VXLAN port"]
    assert len(rules) == 1, f"no anti-laundering rule in {table}"
    return rules[0]


def _dropped(node) -> int:
    return next(e["counter"]["packets"] for e in _drop_rule(node)["expr"] if "counter" in e)


def _ours_in_forward(node) -> list[dict]:
    chain = json.loads(node.run("nft", "-j", "list", "chain", "ip", "filter", "FORWARD", check=True).stdout)
    return [i["rule"] for i in chain["nftables"] if "rule" in i and i["rule"]["comment"].startswith("vxlan-net")]


def test_pods_cannot_launder_vxlan_and_the_vtep_drops_unicast_in_broadcast_frames(lab):
    lab = lab(nodes=2)
    node1, node2 = lab.nodes
    node1.run("nft", "-f", "-", input=OTHER_TOOL, check=True)  # pod traffic needs our FORWARD rules
    running_cluster(lab, "--ip-masq", "--resync-interval", "1")
    pod_a, pod_b = add_pod(lab, node1, 1), add_pod(lab, node2, 1)
    vtep2_mac = node2.ip_json("link", "show", "dev", VTEP)[0]["address"]
    assert pod_a.ping(pod_b.ip, count=1, timeout=3), "pod traffic does not cross a drop-policy FORWARD chain"

    # (a) A VXLAN frame for pod_b, sent by pod_a to node2's VXLAN port: node1 would masquerade it to its own
    # address, which node2's ingress filter trusts. It must not leave node1.
    before = _dropped(node1)
    echo_to_b = f"icmp[icmptype] == icmp-echo and dst host {pod_b.ip}"
    launder = lambda: _send(pod_a, node2.public_ip, vtep2_mac, "198.19.250.9", pod_b.ip, 0x5151)  # noqa: E731
    assert not _seen(lab, pod_b, echo_to_b, launder), "the laundered frame reached pod_b"
    assert not _seen(lab, node2, f"udp dst port {PORT} and src host {node1.public_ip}", launder)
    assert _dropped(node1) >= before + 6, "the drop rule's counter did not count the frames"

    # The same frame does get through without the rule: the check above can fail.
    node1.run("nft", "delete", "rule", "ip", "vxlan-net", "pod_to_vxlan_port", "handle",
              str(_drop_rule(node1)["handle"]), check=True)
    assert _seen(lab, pod_b, echo_to_b, launder), "control: even without the drop rule nothing arrives"

    # (b) Unicast IP inside an L2 broadcast frame, to node2's own address on the pod network: the VTEP drops it
    # (a pod-addressed one is dropped by forwarding anyway, as it is not PACKET_HOST), so node2 never answers.
    sysctl = f"net/ipv4/conf/{VTEP}/drop_unicast_in_l2_multicast"  # slashes: the name has a dot
    assert node2.run("sysctl", "-n", sysctl, check=True).stdout.strip() == "1"
    gateway2 = node2.subnet_env()["VXLAN_NET_SUBNET"].split("/")[0]
    reply = f"icmp[icmptype] == icmp-echoreply and src host {gateway2}"  # seen leaving node2 into the tunnel
    broadcast = lambda: _send(pod_a, node2.public_ip, BROADCAST, pod_a.ip, gateway2, 0x5152)  # noqa: E731
    assert not _seen(lab, node2, reply, broadcast, VTEP), "node2 answered unicast sent in a broadcast frame"
    node2.sysctl(sysctl, 0)
    assert _seen(lab, node2, reply, broadcast, VTEP), "control: without the sysctl node2 does not answer either"


def test_the_agent_restores_its_forward_rules_at_the_next_resync(lab):
    lab = lab(nodes=1)
    node = lab.nodes[0]
    node.run("nft", "-f", "-", input=OTHER_TOOL, check=True)
    running_cluster(lab, "--resync-interval", "1")
    # The firewall step runs after the subnet file that running_cluster waits for: wait for it too.
    lab.wait_for(lambda: len(_ours_in_forward(node)) == 4, timeout=5, message="FORWARD rules not installed")
    ours = _ours_in_forward(node)
    assert len(ours) == 4
    node.run("nft", "delete", "rule", "ip", "filter", "FORWARD", "handle", str(ours[1]["handle"]), check=True)
    assert len(_ours_in_forward(node)) == 3
    lab.wait_for(lambda: len(_ours_in_forward(node)) == 4, timeout=5, message="FORWARD rule not restored")
    assert [r["comment"] for r in _ours_in_forward(node)] == [r["comment"] for r in ours]
    assert "restored the vxlan-net rules" in node.agent.log_text()
