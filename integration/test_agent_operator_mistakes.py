"""Operator mistakes on a lab: a node whose underlay sits inside the pod network, and someone else's
route for a peer's subnet. Checked with etcdctl, `ip -j route` and `vxlan-net doctor`."""

from __future__ import annotations

import base64
import json
import time

import pytest

from integration.cluster import VTEP, add_pod, node_subnet, overlay_routes, start_agents, write_config
from integration.test_doctor import doctor

pytestmark = pytest.mark.lab

FAST = ("--resync-interval", "2")
NARROW = ("--subnet-min", "198.19.5.0", "--subnet-max", "198.19.6.0")  # two subnets: .5 and .6


def records(lab) -> dict[str, tuple[str, int]]:
    """{key: (PublicIP, etcd lease id)} of every record under <prefix>/subnets/, from etcdctl."""
    out = json.loads(lab.etcdctl("get", "/vxlan-net/subnets/", "--prefix", "-w", "json").stdout)
    return {base64.b64decode(kv["key"]).decode(): (json.loads(base64.b64decode(kv["value"]))["PublicIP"], kv["lease"])
            for kv in out.get("kvs", [])}


def leases(lab) -> dict[str, str]:
    return {key: public_ip for key, (public_ip, _) in records(lab).items()}


def main_routes(node, prefix: str) -> list[dict]:
    return [{k: r.get(k) for k in ("dst", "gateway", "dev", "protocol")}
            for r in node.ip_json("route", "show", "table", "main", "exact", prefix)]


def test_an_agent_never_leases_over_its_underlay_waits_when_nothing_is_left_and_leaves_foreign_routes(lab):
    lab = lab(nodes=2)
    n1, n2 = lab.nodes
    write_config(lab, *NARROW)

    # n1's underlay carries an address inside 198.19.5.0/24: it must take 198.19.6.0/24.
    n1.run("ip", "addr", "add", "198.19.5.1/24", "dev", n1.underlay_ifname, check=True)
    n1_connected = main_routes(n1, "198.19.5.0/24")
    assert [r["protocol"] for r in n1_connected] == ["kernel"]
    start_agents(lab, [n1], *FAST)
    assert str(node_subnet(n1)) == "198.19.6.0/24"
    assert leases(lab) == {"/vxlan-net/subnets/198.19.6.0-24": n1.public_ip}

    # n2's underlay covers the only subnet left: no lease, no device, its routes untouched, and it says why.
    n2.run("ip", "addr", "add", "198.19.5.77/24", "dev", n2.underlay_ifname, check=True)
    n2_routes_before = n2.ip_json("route", "show", "table", "all")
    agent2 = lab.start_agent(n2, *FAST)
    why = (f"every free /24 between 198.19.5.0 and 198.19.6.0 overlaps this node's underlay: "
           f"address 198.19.5.77/24 on {n2.underlay_ifname}")
    lab.wait_for(lambda: why in agent2.log_text(), timeout=15, message="the agent did not say why it waits")
    assert agent2.alive() and node_subnet(n2) is None and not n2.has_link(VTEP)
    assert n2.ip_json("route", "show", "table", "all") == n2_routes_before
    assert set(leases(lab)) == {"/vxlan-net/subnets/198.19.6.0-24"}

    # The address goes: n2 takes 198.19.5.0/24 on its next retry (back-off at most 10 s).
    n2.run("ip", "addr", "del", "198.19.5.77/24", "dev", n2.underlay_ifname, check=True)
    lab.wait_for(lambda: node_subnet(n2) is not None, timeout=25, message="n2 did not lease after the fix")
    assert str(node_subnet(n2)) == "198.19.5.0/24"
    assert leases(lab) == {"/vxlan-net/subnets/198.19.6.0-24": n1.public_ip,
                           "/vxlan-net/subnets/198.19.5.0-24": n2.public_ip}
    lab.wait_for(lambda: overlay_routes(n2).get("198.19.6.0/24") == "198.19.6.0", timeout=10,
                 message="n2 has no route to n1's subnet")

    # On n1, n2's subnet holds n1's own address (and connected route): never routed into the overlay,
    # logged once, the route left alone, named by doctor.
    conflict = f"routing 198.19.5.0/24 into the tunnel would capture this node's address on {n1.underlay_ifname}"
    lab.wait_for(lambda: conflict in n1.agent.log_text(), timeout=10, message="n1 did not report the conflict")
    time.sleep(5)  # two more resyncs (every 2 s) meet the same conflict
    assert n1.agent.log_text().count(conflict) == 1
    assert "overlay reconcile failed" not in n1.agent.log_text()
    assert main_routes(n1, "198.19.5.0/24") == n1_connected
    assert "198.19.5.0/24" not in overlay_routes(n1)

    # n1 restarted with a pod (so cni0 holds 198.19.6.1/24, its VTEP 198.19.6.0/32): its own devices
    # do not count as underlay, so it keeps its subnet and its etcd lease.
    add_pod(lab, n1, 1)
    before = records(lab)
    n1.agent.stop()
    restarted = lab.start_agent(n1, *FAST)
    lab.wait_for(lambda: "reusing subnet 198.19.6.0/24" in restarted.log_text(), timeout=15,
                 message="n1 did not keep its subnet")
    assert records(lab) == before
    lab.wait_for(lambda: conflict in restarted.log_text(), timeout=10, message="the restarted n1 did not see it")
    verdict = doctor(lab, n1)
    assert verdict.rc == 1 and set(verdict.failed) == {"lease records"}, verdict
    assert "198.19.5.0-24" in verdict.failed["lease records"] and conflict in verdict.failed["lease records"]
    assert n1.agent.alive() and n2.agent.alive()
