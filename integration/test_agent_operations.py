"""What an operator relies on: VXLAN ingress filtering, health and metrics, JSON logs."""

from __future__ import annotations

import json
import sys
import time

import pytest

from integration.cluster import VTEP, add_pod, http_get, running_cluster, start_agents, wait_converged, \
    write_config

pytestmark = pytest.mark.lab

FAST = ("--resync-interval", "2")
HEALTHZ = "127.0.0.1:9180"

INJECT = """
import sys
from scapy.all import IP, UDP, Ether, ICMP, send
from scapy.layers.vxlan import VXLAN
src, dst, inner_src, inner_dst, inner_mac = sys.argv[1:6]
frame = (IP(src=src, dst=dst) / UDP(sport=40000, dport=8472) / VXLAN(vni=1, flags=0x08)
         / Ether(src="0a:00:00:00:00:66", dst=inner_mac) / IP(src=inner_src, dst=inner_dst) / ICMP(id=0x5151))
send(frame, count=3, inter=0.05, verbose=False)
"""


def _drop_counter(node) -> int:
    chain = json.loads(node.run("nft", "-j", "list", "chain", "ip", "vxlan-net", "input", check=True).stdout)
    for item in chain["nftables"]:
        rule = item.get("rule", {})
        for expr in rule.get("expr", []):
            if "counter" in expr and rule.get("comment", "").startswith("vxlan-net: VXLAN from a non-node"):
                return expr["counter"]["packets"]
    raise AssertionError(f"no drop counter in {chain}")


def _injected_seen_by(lab, pod, sender, src_ip: str, target_node, pod_src: str) -> bool:
    capture = lab.capture(pod, iface="eth0", bpf="icmp[icmptype] == icmp-echo", count=1, timeout=3)
    mac = target_node.ip_json("link", "show", "dev", VTEP)[0]["address"]
    sender.run(sys.executable, "-c", INJECT, src_ip, target_node.public_ip, pod_src, pod.ip, mac, check=True)
    return bool(capture.wait().packets())


def test_vxlan_from_a_non_node_is_dropped_and_from_a_node_gets_through(lab):
    lab = lab(nodes=2)
    nodes = running_cluster(lab, *FAST)
    pod_a, pod_b = add_pod(lab, nodes[0], 1), add_pod(lab, nodes[1], 1)
    before = _drop_counter(nodes[0])
    assert not _injected_seen_by(lab, pod_a, lab.outside, lab.outside.public_ip, nodes[0], pod_b.ip)
    assert _drop_counter(nodes[0]) >= before + 3
    assert _injected_seen_by(lab, pod_a, nodes[1], nodes[1].public_ip, nodes[0], pod_b.ip)
    assert pod_a.ping(pod_b.ip, count=1, timeout=3)


def test_ingress_filter_follows_the_leases(lab):
    lab = lab(nodes=3)
    running_cluster(lab, *FAST, nodes=lab.nodes[:2])

    def allowed(node) -> set[str]:
        doc = json.loads(node.run("nft", "-j", "list", "set", "ip", "vxlan-net", "vxlan_peers", check=True).stdout)
        return {e for item in doc["nftables"] if "set" in item for e in item["set"].get("elem", [])}

    assert allowed(lab.nodes[0]) == {lab.nodes[1].public_ip}
    start_agents(lab, [lab.nodes[2]], *FAST)
    wait_converged(lab, lab.nodes)
    lab.wait_for(lambda: allowed(lab.nodes[0]) == {lab.nodes[1].public_ip, lab.nodes[2].public_ip}, timeout=5)
    key = json.loads(lab.etcdctl("get", "/vxlan-net/subnets/", "--prefix", "-w", "json").stdout)
    lease_of_node3 = next(kv["lease"] for kv in key["kvs"] if lab.nodes[2].public_ip.encode() in
                          __import__("base64").b64decode(kv["value"]))
    lab.nodes[2].agent.stop()
    lab.etcdctl("lease", "revoke", format(lease_of_node3, "x"))
    lab.wait_for(lambda: allowed(lab.nodes[0]) == {lab.nodes[1].public_ip}, timeout=5)


def _get(node, path: str) -> tuple[int, str]:
    return http_get(node, f"http://{HEALTHZ}{path}")


def test_health_readiness_and_metrics(lab):
    lab = lab(nodes=2)
    node = lab.nodes[0]
    lab.start_agent(node, *FAST, "--healthz-addr", HEALTHZ)
    lab.wait_for(lambda: node.run("ss", "-ltn").stdout.count(":9180"), timeout=10)
    assert _get(node, "/healthz")[0] == 200
    status, body = _get(node, "/readyz")  # no config in etcd yet: alive but not ready
    assert status == 503 and "no subnet lease held" in json.loads(body)["problems"]
    write_config(lab)
    start_agents(lab, [lab.nodes[1]], *FAST)
    wait_converged(lab, lab.nodes)
    lab.wait_for(lambda: _get(node, "/readyz")[0] == 200, timeout=10)
    lab.etcdctl("put", "/vxlan-net/subnets/198.19.250.0-24", "{garbage")
    time.sleep(1)
    metrics = _get(node, "/metrics")[1]
    values = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
              if line and not line.startswith("#")}
    assert values["vxlan_net_leases_known"] == 2
    assert values["vxlan_net_peers_programmed"] == 1
    assert values["vxlan_net_invalid_leases_skipped_total"] == 1
    assert values["vxlan_net_reconcile_duration_seconds_count"] >= 1
    assert values["vxlan_net_reconcile_errors_total"] == 0
    assert 86000 < values["vxlan_net_lease_expiry_seconds"] <= 86400
    lab.etcd.stop()
    lab.etcd.start()
    lab.wait_for(lambda: "vxlan_net_etcd_watch_restarts_total 1.0" in _get(node, "/metrics")[1], timeout=20)


def test_json_logs_have_stable_keys(lab):
    lab = lab(nodes=1)
    write_config(lab)
    node = lab.nodes[0]
    agent = lab.start_agent(node, *FAST)
    agent.stop()
    agent = lab.start_agent(node, *FAST, env={"VXLAN_NET_LOG_FORMAT": "json"})
    lab.wait_for(lambda: "node subnet" in agent.log_text(), timeout=10)
    agent.stop()
    lines = [json.loads(line) for line in agent.log_text().splitlines() if line.strip()]
    assert lines and all({"time", "level", "logger", "message"} <= set(doc) for doc in lines)
    assert any(doc["message"].startswith("node subnet") and doc["level"] == "info" for doc in lines)
