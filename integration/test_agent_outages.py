"""The agent through etcd outages and compaction: the data plane never notices."""

from __future__ import annotations

import contextlib
import json
import time
from urllib.parse import urlsplit

import pytest

from integration.cluster import VTEP, PingStream, add_pod, fdb, neighbours, node_subnet, overlay_routes, \
    running_cluster, start_agents, wait_converged

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
    # The agent retries with back-off (at most 10 s apart): wait for the retry that finds etcd up.
    lab.wait_for(lambda: "no config at /vxlan-net/config" in lab.nodes[0].agent.log_text(), timeout=15,
                 message="the agent did not report the missing config once etcd was back")
    from integration.cluster import write_config

    write_config(lab)
    lab.wait_for(lambda: all(node_subnet(n) for n in lab.nodes), timeout=20)
    wait_converged(lab, lab.nodes)


@contextlib.contextmanager
def etcd_blackholed(lab, source: str | None = None):
    """etcd keeps running but drops every packet to its client port, or only those from `source`
    (nftables in etcd's namespace)."""
    port = urlsplit(lab.etcd_url).port
    rule = (f"ip saddr {source} " if source else "") + f"tcp dport {port} drop"
    lab.etcd_host.run("nft", "-f", "-", check=True, input=(
        "table inet vxlan-test-blackhole {\n"
        f"  chain input {{ type filter hook input priority filter - 10; policy accept; {rule}; }}\n"
        "}\n"))
    try:
        yield
    finally:
        lab.etcd_host.run("nft", "delete", "table", "inet", "vxlan-test-blackhole", check=True)


def test_etcd_dropping_packets_never_delays_the_resync_or_pod_traffic(lab):
    """etcd calls hang (deadline 5 s, then a retry) while etcd drops packets; the resync must not wait.

    Resync every 1 s; a lease TTL of 30 s renews every 10 s, so a renewal starts inside the 12 s
    blackhole, yet the lease outlives it (a TTL under the blackhole's length would let it expire,
    and the peers drop our routes afterwards: a different story, told by the outage tests above).
    """
    resync, blackhole = 1.0, 12.0
    lab = lab(nodes=2)
    node, peer = running_cluster(lab, "--resync-interval", str(resync), "--subnet-lease-ttl", "30")
    decoy = json.dumps({"PublicIP": "198.18.9.2", "BackendType": "vxlan",
                        "BackendData": {"VNI": 1, "VtepMAC": "0a:00:00:00:00:09"}})
    lab.etcdctl("put", "/vxlan-net/subnets/198.19.250.0-24", decoy)  # a peer whose entries we may delete
    lab.wait_for(lambda: "198.19.250.0/24" in overlay_routes(node), timeout=5)
    pod_a, pod_b = add_pod(lab, node, 1), add_pod(lab, peer, 1)
    deletions = {
        "route": (["ip", "route", "del", "198.19.250.0/24", "dev", VTEP],
                  lambda: overlay_routes(node).get("198.19.250.0/24") == "198.19.250.0"),
        "neighbour": (["ip", "neigh", "del", "198.19.250.0", "dev", VTEP],
                      lambda: neighbours(node).get("198.19.250.0") == "0a:00:00:00:00:09"),
        "fdb": (["bridge", "fdb", "del", "0a:00:00:00:00:09", "dev", VTEP, "dst", "198.18.9.2"],
                lambda: "198.18.9.2" in fdb(node).get("0a:00:00:00:00:09", [])),
    }
    restored_in: list[tuple[str, float]] = []
    stream = PingStream(pod_a, pod_b.ip, count=int(blackhole * 10), interval=0.1)
    with etcd_blackholed(lab):
        end = time.monotonic() + blackhole - 1
        for round_ in range(int(blackhole)):  # bounded; the clock ends it first
            if time.monotonic() >= end:
                break
            what = sorted(deletions)[round_ % len(deletions)]
            command, present = deletions[what]
            node.run(*command, check=True)
            deleted_at = time.monotonic()
            lab.wait_for(present, timeout=2 * resync + 1, interval=0.05,
                         message=f"hand-deleted {what} not restored within two resyncs while etcd drops packets")
            restored_in.append((what, round(time.monotonic() - deleted_at, 2)))
            time.sleep(0.3)
    assert stream.lost() == 0, "pod traffic stopped while etcd dropped packets"
    assert len(restored_in) >= 6, restored_in
    assert node.agent.alive() and peer.agent.alive()
    wait_converged(lab, [node, peer], timeout=30)
    lab.wait_for(lambda: "198.19.250.0/24" in overlay_routes(peer), timeout=20)
