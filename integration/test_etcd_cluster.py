"""A 3-member etcd cluster: killing the leader under churn loses no ping, and every node converges."""

from __future__ import annotations

import json
import re
import subprocess
import time

import pytest

from integration.cluster import PingStream, add_pod, node_subnet, overlay_routes, start_agents, write_config
from integration.etcd_cluster import etcd_cluster, probe_command, probe_env

pytestmark = pytest.mark.lab

FAST = ("--resync-interval", "2")
CHURN = 12.0  # seconds of pinging around the kill


def lease_id(lab, node) -> str:
    """The etcd lease holding `node`'s subnet record, in hex as etcdctl wants it."""
    key = f"/vxlan-net/subnets/{node_subnet(node).network_address}-{node_subnet(node).prefixlen}"
    kvs = json.loads(lab.etcdctl("get", key, "-w", "json").stdout).get("kvs", [])
    assert kvs, f"no record {key}"
    return f"{kvs[0]['lease']:x}"


def test_killing_the_leader_under_churn_loses_no_ping_and_every_node_converges(lab):
    lab = lab(nodes=5, etcd=etcd_cluster)
    cluster = lab.etcd
    assert len(cluster.statuses()) == 3 and lab.etcd_url.count(",") == 2
    write_config(lab)
    a, b, leaving, joining, revoked = lab.nodes
    start_agents(lab, [a, b, leaving, revoked], *FAST)  # agents get all three endpoints (lab.etcd_url)
    pod_a, pod_b = add_pod(lab, a, 1), add_pod(lab, b, 1)
    assert pod_a.ping(pod_b.ip, count=1, timeout=3)
    # Every agent talks to the first endpoint until it fails; make that member the leader so the kill
    # hits every agent's connection (found with `etcdctl endpoint status -w json`).
    target = cluster.members[0]
    cluster.move_leader(target)
    assert cluster.leader() is target

    # How long could an agent not reach etcd? The agents log the first failure but not the recovery,
    # so a probe in every node asks etcd the way the agents do (EtcdStore, same endpoints, same
    # failover) every 50 ms and reports the longest gap between two answers (50 ms when all is well).
    probes = [node.popen(*probe_command(lab.etcd_url, CHURN), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=probe_env()) for node in (a, b, revoked)]
    stream = PingStream(pod_a, pod_b.ip, count=int(CHURN * 20), interval=0.05)
    time.sleep(2)
    target.kill()  # SIGKILL the leader
    lab.start_agent(joining, *FAST)  # churn while the cluster elects a new leader
    leaving.agent.stop()
    lab.etcdctl("lease", "revoke", lease_id(lab, leaving))
    lab.etcdctl("lease", "revoke", lease_id(lab, revoked))
    assert stream.lost() == 0, "pings lost while the leader died"

    new_leader = cluster.leader()
    assert new_leader is not target
    live = [a, b, joining, revoked]
    lab.wait_for(lambda: all(node_subnet(n) for n in live), timeout=15)

    def routes_right() -> bool:
        for node in live:
            want = {str(node_subnet(o)): str(node_subnet(o).network_address) for o in live if o is not node}
            if overlay_routes(node) != want:
                return False
        return True

    lab.wait_for(routes_right, timeout=20, message="routes did not converge to the live nodes")
    assert pod_a.ping(add_pod(lab, joining, 1).ip, count=1, timeout=3)
    for node in live:
        assert node.agent.alive()
        assert "Traceback" not in node.agent.log_text()

    longest = 0.0
    for node, probe in zip((a, b, revoked), probes):
        out, err = probe.communicate(timeout=CHURN + 15)
        report = json.loads(out.strip().splitlines()[-1]) if out.strip() else None
        assert report is not None, f"probe on {node.name} printed nothing: {err[-500:]}"
        assert report["unanswered_at_end"] == 0 and report["answered"] > 0, report
        longest = max(longest, report["longest_unreachable_s"])
    stalls = [line for n in live for line in n.agent.log_text().splitlines() if re.search(r" WARNING .*etcd", line)]
    print(f"\nleader {target.client_url} killed; new leader {new_leader.client_url}; "
          f"longest time etcd could not be reached from a node: {longest:.2f} s; "
          f"agent warnings about etcd: {len(stalls)}")
    print("\n".join(stalls))
