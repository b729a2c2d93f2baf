"""The firewall door's IPv6 half in a dual-underlay lab: `table ip6 vxlan-net` (ingress filter of VXLAN over
IPv6, the pod-to-VXLAN-port drop, masquerade) and our rules in `ip6 filter FORWARD`, read back with `nft -j`
and proved with packets: VXLAN over IPv6 crafted with scapy, ping -6 from an IPv6 pod."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from integration.lab import REPO

pytestmark = pytest.mark.lab

PORT = 8472
POD6 = "fd19::/56"
BRIDGE, VTEP, VTEP6 = "cni0", "vxnet.1", "vxnet6.1"
# Runs one call of vxlan_net.doors.firewall inside a node: argv[1] is a Python expression over the
# module (`fw`) and the ipaddress names, so each test states exactly the call it makes.
CALL = """
import json, sys
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from vxlan_net.doors import firewall as fw
result = eval(sys.argv[1])
print(json.dumps(result if isinstance(result, (bool, type(None))) else [str(x) for x in result]))
"""
# VXLAN over IPv6 (VNI 1) to <dst>:8472 carrying an ICMP echo of id 0x6161, three times.
INJECT6 = """
import sys
from scapy.all import ICMP, IP, IPv6, UDP, Ether, send
from scapy.layers.vxlan import VXLAN
dst, inner_mac = sys.argv[1:3]
frame = (IPv6(dst=dst) / UDP(sport=40000, dport=8472) / VXLAN(vni=1, flags=0x08)
         / Ether(src="0a:00:00:00:00:66", dst=inner_mac) / IP(src="198.19.9.9", dst="198.19.1.2") / ICMP(id=0x6161))
send(frame, count=3, inter=0.05, verbose=False)
"""
DROP_POLICY6 = """
add table ip6 filter
add chain ip6 filter FORWARD { type filter hook forward priority filter; policy drop; }
add rule ip6 filter FORWARD ct state invalid counter drop comment "docker: invalid"
"""


def call(node, expression: str):
    out = node.run(sys.executable, "-c", CALL, expression, check=True).stdout
    return json.loads(out)


def apply(node, peers: str = "[]", network6: str | None = f"IPv6Network('{POD6}')", masq: bool = True,
          underlay6: bool = False, devices: str = f"fw.ForwardDevices('{BRIDGE}', '{VTEP}')") -> None:
    call(node, f"fw.apply_rules(IPv4Network('198.19.0.0/16'), {masq}, {PORT}, {devices}, {peers}, True, "
               f"ipv6_network={network6}, ipv6_underlay={underlay6})")


def table(node, family: str) -> list[dict] | None:
    """`nft -j list table <family> vxlan-net` items; None when the table does not exist."""
    proc = node.run("nft", "-j", "list", "table", family, "vxlan-net")
    return json.loads(proc.stdout)["nftables"] if proc.returncode == 0 else None


def peer_set(node, family: str) -> dict:
    [found] = [i["set"] for i in table(node, family) if "set" in i]
    return found


def rules(items: list[dict]) -> dict[str, list[dict]]:
    """chain -> its rules' expressions."""
    out: dict[str, list] = {}
    for item in items:
        if "rule" in item:
            out.setdefault(item["rule"]["chain"], []).append(item["rule"]["expr"])
    return out


def drop_counter(node) -> int:
    for item in table(node, "ip6"):
        rule = item.get("rule", {})
        if rule.get("comment") == "vxlan-net: VXLAN from a non-node":
            return next(e["counter"]["packets"] for e in rule["expr"] if "counter" in e)
    raise AssertionError("no ingress drop rule in table ip6 vxlan-net")


@pytest.fixture
def dual(lab):
    return lab(nodes=2, etcd=False, underlay="dual")


def test_ipv4_only_rules_make_no_ip6_table_and_a_bad_peer_changes_nothing(dual):
    node, peer = dual.nodes
    apply(node, peers=f"['{peer.public_ip}']", network6="None")
    assert table(node, "ip6") is None
    assert peer_set(node, "ip")["elem"] == [peer.public_ip]

    bad = node.run(sys.executable, "-c", CALL, "fw.apply_rules(IPv4Network('198.19.0.0/16'), True, 8472, "
                   "fw.ForwardDevices('cni0', 'vxnet.1'), ['fd18::2', 'fd18::zz'], ipv6_underlay=True)")
    assert bad.returncode != 0 and "fd18::zz" in bad.stderr
    assert table(node, "ip6") is None and peer_set(node, "ip")["elem"] == [peer.public_ip]


def test_the_ip6_table_masquerades_drops_laundering_and_filters_vxlan_by_peer(dual):
    node, peer = dual.nodes
    apply(node, peers=f"['{peer.public_ip}', '{peer.underlay_ipv6}']")

    assert peer_set(node, "ip")["elem"] == [peer.public_ip], "each address in its family's set"
    six = peer_set(node, "ip6")
    assert (six["type"], six["elem"]) == ("ipv6_addr", [peer.underlay_ipv6])
    chains = rules(table(node, "ip6"))
    masq = json.dumps(chains["postrouting"])
    assert '"ff00::"' in masq and '"len": 8' in masq and '"masquerade"' in masq
    assert [next(iter(e[-1])) for e in chains["postrouting"]] == ["return", "return", "masquerade"]
    assert '"dport"' in json.dumps(chains["pod_to_vxlan_port"]) and '"drop"' in json.dumps(chains["pod_to_vxlan_port"])
    [ingress] = chains["input"]
    assert {"match": {"op": "!=", "left": {"payload": {"protocol": "ip6", "field": "saddr"}},
                      "right": "@vxlan_peers"}} in ingress
    assert '"ip6"' not in json.dumps(table(node, "ip")), "IPv6 stays out of the IPv4 table"


def test_peers_change_one_element_at_a_time_per_family_and_a_full_rewrite_empties_the_ipv6_set(dual):
    node, peer = dual.nodes
    apply(node, peers=f"['{peer.public_ip}', '{peer.underlay_ipv6}']")
    third6 = "fd18:0:0:3::2"

    call(node, f"fw.change_peers(['{third6}', '198.18.3.2'], ['{peer.underlay_ipv6}'])")
    assert peer_set(node, "ip6")["elem"] == [third6]
    assert sorted(peer_set(node, "ip")["elem"]) == sorted([peer.public_ip, "198.18.3.2"])

    # Hostile: an IPv6 element removed by hand, then "removed" again: nft refuses, nothing changes.
    node.run("nft", "delete", "element", "ip6", "vxlan-net", "vxlan_peers", f"{{ {third6} }}", check=True)
    refused = node.run(sys.executable, "-c", CALL, f"fw.change_peers(['fd18:0:0:4::2'], ['{third6}'])")
    assert refused.returncode != 0 and "KernelError" in refused.stderr
    assert "elem" not in peer_set(node, "ip6"), "the failed transaction added nothing"

    call(node, f"fw.update_peers(['{peer.underlay_ipv6}', '{peer.public_ip}'])")
    assert (peer_set(node, "ip6")["elem"], peer_set(node, "ip")["elem"]) == ([peer.underlay_ipv6], [peer.public_ip])
    call(node, f"fw.update_peers(['{peer.public_ip}'], ipv6=True)")
    assert "elem" not in peer_set(node, "ip6"), "the last IPv6 peer left: the set is empty"
    assert sorted(call(node, "fw.current_peers()")) == [peer.public_ip]


# One process changing the peer sets of two namespaces in turn, as fw.change_peers keeps its netlink
# socket open between calls: each change must land in the namespace the caller is in at that moment.
SWITCHING = """
import sys
from vxlan_net.doors import firewall as fw, kernel
first, second, ip1, ip2 = sys.argv[1:5]
kernel.enter_netns(first)
fw.change_peers([ip1], [])
kernel.enter_netns(second)
fw.change_peers([ip2], [])
fw.change_peers([ip2], [])  # an add of an element already there is no error, as with `nft add element`
"""


def test_set_changes_follow_the_callers_namespace_and_an_add_is_idempotent(dual):
    node, peer = dual.nodes
    for each in (node, peer):
        apply(each, peers="['198.18.3.2']", network6="None")
    done = subprocess.run([sys.executable, "-c", SWITCHING, node.name, peer.name, "198.18.7.1", "198.18.7.2"],
                          capture_output=True, text=True, timeout=60, cwd=str(REPO),
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    assert sorted(peer_set(node, "ip")["elem"]) == ["198.18.3.2", "198.18.7.1"]
    assert sorted(peer_set(peer, "ip")["elem"]) == ["198.18.3.2", "198.18.7.2"]


def test_ipv6_going_away_deletes_the_ip6_table_and_its_peers(dual):
    node, peer = dual.nodes
    apply(node, peers=f"['{peer.underlay_ipv6}']", underlay6=True)
    assert table(node, "ip6") is not None

    apply(node, network6="None")  # the kept peers are IPv6 ones: they go with the table
    assert table(node, "ip6") is None
    assert "elem" not in peer_set(node, "ip")

    apply(node, network6="None", underlay6=True)
    chains = rules(table(node, "ip6"))
    assert set(chains) == {"input"}, "an IPv6 underlay alone: only the ingress filter"
    assert "elem" not in peer_set(node, "ip6"), "no IPv6 peer yet: VXLAN over IPv6 dropped from everyone"


def _arrives(lab, node, sender) -> bool:
    """Whether VXLAN over IPv6 that `sender` sends to `node`'s VXLAN port comes out of its VTEP6."""
    mac = node.ip_json("link", "show", "dev", VTEP6)[0]["address"]
    capture = lab.capture(node, iface=VTEP6, bpf="icmp and icmp[4:2] == 0x6161", count=1, timeout=3)
    sender.run(sys.executable, "-c", INJECT6, node.underlay_ipv6, mac, check=True)
    return bool(capture.wait().packets())


def test_vxlan_over_ipv6_from_a_non_peer_is_dropped_and_from_a_peer_reaches_the_vtep(dual):
    node, peer = dual.nodes
    node.ip_batch([f"link add {VTEP6} type vxlan id 1 local {node.underlay_ipv6} dstport {PORT} nolearning",
                   f"link set {VTEP6} up"])
    apply(node, peers=f"['{peer.underlay_ipv6}']", underlay6=True)

    assert not _arrives(dual, node, dual.outside)
    assert drop_counter(node) == 3
    assert _arrives(dual, node, peer)
    assert drop_counter(node) == 3


def test_agents_of_an_ipv6_only_cluster_filter_vxlan_over_ipv6_by_their_peers(lab):
    from vxlan_net.core.config import build_config

    cluster = lab(nodes=2, underlay="v6")
    node, peer = cluster.nodes
    cluster.etcdctl("put", "/vxlan-net/config", build_config(None, ipv6_network=POD6).to_json())
    for one in cluster.nodes:
        cluster.start_agent(one)
    cluster.wait_for(lambda: table(node, "ip6") is not None and peer_set(node, "ip6").get("elem") == [
        peer.underlay_ipv6], timeout=15, message="the peer's IPv6 address never reached the ip6 set")
    assert "elem" not in peer_set(node, "ip"), "no IPv4 peers in an IPv6-only cluster"

    assert not _arrives(cluster, node, cluster.outside)
    assert drop_counter(node) == 3
    assert _arrives(cluster, node, peer)


def test_an_ipv6_pod_is_masqueraded_and_forwarded_under_a_drop_policy(dual):
    node = dual.nodes[0]
    pod = dual.add_pod(node, "p6", None, None, ipv6="fd19:0:0:1::2/64", gateway6="fd19:0:0:1::1")
    node.run("nft", "-f", "-", input=DROP_POLICY6, check=True)
    devices = f"fw.ForwardDevices('{BRIDGE}', '{VTEP}', pod_network6=IPv6Network('{POD6}'))"

    apply(node, devices=f"fw.ForwardDevices('{BRIDGE}', '{VTEP}')")  # IPv4 pods only: ip6 FORWARD untouched
    assert not pod.ping6(dual.outside.public_ipv6, timeout=1), "the drop policy does not apply?"

    apply(node, devices=devices)
    capture = dual.capture(dual.outside, iface="ul0", bpf="icmp6 and ip6[40] == 128", count=1, timeout=5)
    reply = pod.ping6(dual.outside.public_ipv6, timeout=3)
    packets = capture.wait().packets()
    assert reply, reply.output
    assert [p["IPv6"].src for p in packets] == [node.underlay_ipv6], "not masqueraded to the node's address"
    forward = json.loads(node.run("nft", "-j", "list", "chain", "ip6", "filter", "FORWARD", check=True).stdout)
    ours = [i["rule"]["comment"] for i in forward["nftables"] if "rule" in i and "vxlan-net" in i["rule"]["comment"]]
    assert ours == ["vxlan-net: overlay to pods", "vxlan-net: pods to the overlay and out",
                    "vxlan-net: replies to pods", "vxlan-net: port-mapped to pods"]

    assert call(node, f"fw.ensure_forward_rules({devices})") is False, "intact: nothing to write"
    apply(node, network6="None", devices=f"fw.ForwardDevices('{BRIDGE}', '{VTEP}')")
    forward = json.loads(node.run("nft", "-j", "list", "chain", "ip6", "filter", "FORWARD", check=True).stdout)
    assert [i["rule"]["comment"] for i in forward["nftables"] if "rule" in i] == ["docker: invalid"], \
        "IPv6 gone: our ip6 FORWARD rules go too, other tools' stay"
    assert not pod.ping6(dual.outside.public_ipv6, timeout=1)


def test_the_ipv6_underlay_vtep_gets_its_own_overlay_rule_in_both_families(dual):
    node = dual.nodes[0]
    node.run("nft", "-f", "-", input=DROP_POLICY6.replace("ip6", "ip"), check=True)
    node.run("nft", "-f", "-", input=DROP_POLICY6, check=True)
    call(node, f"fw.ensure_forward_rules(fw.ForwardDevices('{BRIDGE}', '{VTEP}', vtep6='{VTEP6}', "
               f"pod_network6=IPv6Network('{POD6}')))")
    for family in ("ip", "ip6"):
        chain = json.loads(node.run("nft", "-j", "list", "chain", family, "filter", "FORWARD", check=True).stdout)
        overlay = [i["rule"]["expr"] for i in chain["nftables"]
                   if "rule" in i and "overlay to pods" in i["rule"]["comment"]]
        assert [[e["match"]["right"] for e in expr if "match" in e] for expr in overlay] == \
            [[VTEP, BRIDGE], [VTEP6, BRIDGE]], family


def test_an_agent_with_a_dual_stack_config_installs_both_tables(lab):
    """The agent wiring: config.ipv4_network to the ip table, config.ipv6_network to the ip6 one, and the
    same FORWARD rules in ip6 filter FORWARD (drop policy there before the agent starts)."""
    from integration.cluster import LAB_SUBNET_MAX, start_agents
    from vxlan_net.core.config import build_config

    cluster = lab(nodes=1)
    node = cluster.nodes[0]
    node.run("nft", "-f", "-", input=DROP_POLICY6, check=True)
    config = build_config("198.19.0.0/16", subnet_max=LAB_SUBNET_MAX, ipv6_network=POD6)
    cluster.etcdctl("put", "/vxlan-net/config", config.to_json())
    start_agents(cluster, [node], "--ip-masq")

    cluster.wait_for(lambda: table(node, "ip6") is not None, timeout=10, message="no table ip6 vxlan-net")
    masq = json.dumps(rules(table(node, "ip6"))["postrouting"])
    assert '"fd19::"' in masq and '"len": 56' in masq and '"ff00::"' in masq
    assert "fd19" not in json.dumps(table(node, "ip")), "the IPv4 table holds the IPv4 network only"
    assert '"198.19.0.0"' in json.dumps(rules(table(node, "ip"))["postrouting"])
    forward = json.loads(node.run("nft", "-j", "list", "chain", "ip6", "filter", "FORWARD", check=True).stdout)
    assert sum("vxlan-net" in i["rule"].get("comment", "") for i in forward["nftables"] if "rule" in i) == 4


SEND_UDP6 = """
import socket, sys
with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
    for _ in range(3):
        sock.sendto(b"laundered?", (sys.argv[1], int(sys.argv[2])))
"""


def test_an_ipv6_pod_cannot_launder_udp_to_the_vxlan_port_through_masquerade(dual):
    node = dual.nodes[0]
    pod = dual.add_pod(node, "p6", None, None, ipv6="fd19:0:0:1::2/64", gateway6="fd19:0:0:1::1")
    apply(node)

    def arrives(port: int) -> list:
        capture = dual.capture(dual.outside, iface="ul0", bpf=f"udp dst port {port}", count=1, timeout=3)
        pod.run(sys.executable, "-c", SEND_UDP6, dual.outside.public_ipv6, port, check=True)
        return capture.wait().packets()

    assert arrives(PORT) == []
    [drop] = [i["rule"] for i in table(node, "ip6")
              if "rule" in i and i["rule"].get("comment") == "vxlan-net: pod traffic to the VXLAN port"]
    assert next(e["counter"]["packets"] for e in drop["expr"] if "counter" in e) >= 1
    control = arrives(PORT + 1)
    assert [p["IPv6"].src for p in control] == [node.underlay_ipv6], "another port: masqueraded and delivered"
