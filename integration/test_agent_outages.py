"""The agent through etcd outages and compaction: the data plane never notices."""

from __future__ import annotations

import json
import time

import pytest

from integration.cluster import PingStream, add_pod, node_subnet, overlay_routes, running_cluster, start_agents, \
    wait_converged

pytestmark = pytest.mark.lab

FAST = ("--resync-interval", "2")
OUTAGE = 30.0


def warnings_in(log: str) -> int:
    return sum(1 for line in log.splitlines() if " WARNING " in line)


def test_etcd_down_for_30s_loses_no_ping_and_a_later_node_is_programmed_everywhere(lab):
    lab = lab(nodes=3)
    first = lab.nodes[:2]
    running_cluster(lab, *FAST, nodes=first)
    pod_a, pod_b = add_pod(lab, first[0], 1), add_pod(lab, first[1], 1)
    stream = PingStream(pod_a, pod_b.ip, count=int((OUTAGE + 4) * 10), interval=0.1)
    time.sleep(1)
    lab.etcd.stop()
    time.sleep(OUTAGE)
    lab.etcd.start()
    assert stream.lost() == 0
    for node in first:
        assert node.agent.alive()
        assert warnings_in(node.agent.log_text()) <= 10, "an outage must not flood the log"
    start_agents(lab, [lab.nodes[2]], *FAST)
    wait_converged(lab, lab.nodes, timeout=20)
    pod_c = add_pod(lab, lab.nodes[2], 1)
    assert pod_a.ping(pod_c.ip, count=1, timeout=3) and pod_c.ping(pod_b.ip, count=1, timeout=3)


def test_compaction_and_restart_while_watching_resyncs_without_log_flood(lab):
    lab = lab(nodes=2)
    nodes = running_cluster(lab, *FAST)
    churn = json.dumps({"PublicIP": "198.18.9.2", "BackendType": "vxlan",
                        "BackendData": {"VNI": 1, "VtepMAC": "0a:00:00:00:00:09"}})
    for i in range(40):  # history the watchers have seen, then compacted away
        lab.etcdctl("put", "/vxlan-net/subnets/198.19.250.0-24", churn.replace("9.2", f"9.{i + 2}"))
    lab.wait_for(lambda: "198.19.250.0/24" in overlay_routes(nodes[0]), timeout=5)
    lab.etcd.stop()
    lab.etcd.start()
    lab.etcdctl("del", "/vxlan-net/subnets/198.19.250.0-24")
    lab.etcdctl("put", "/vxlan-net/subnets/198.19.251.0-24", churn)
    revision = json.loads(lab.etcdctl("get", "/vxlan-net/config", "-w", "json").stdout)["header"]["revision"]
    lab.etcdctl("compact", str(revision), "--physical")
    for node in nodes:
        lab.wait_for(lambda: "198.19.251.0/24" in overlay_routes(node) and "198.19.250.0/24" not in
                     overlay_routes(node), timeout=20, message="agent did not resync after compaction")
    time.sleep(3)
    for node in nodes:
        assert node.agent.alive()
        assert warnings_in(node.agent.log_text()) <= 6, node.agent.log_text()[-3000:]
    subnet = node_subnet(nodes[1])
    assert overlay_routes(nodes[0])[str(subnet)] == str(subnet.network_address)


def test_agent_waits_for_config_and_for_etcd_then_joins(lab):
    lab = lab(nodes=2)
    lab.etcd.stop()
    for node in lab.nodes:
        lab.start_agent(node, *FAST)
    time.sleep(3)
    assert all(n.agent.alive() and node_subnet(n) is None for n in lab.nodes)
    lab.etcd.start()
    time.sleep(2)
    assert "no config at /vxlan-net/config" in lab.nodes[0].agent.log_text()
    from integration.cluster import write_config

    write_config(lab)
    lab.wait_for(lambda: all(node_subnet(n) for n in lab.nodes), timeout=20)
    wait_converged(lab, lab.nodes)
