"""The node agent on a multi-node L3 lab: real etcd, real kernel, independent tools."""

from __future__ import annotations

import ipaddress
import json
import time

import pytest

from integration.cluster import (POD_NETWORK, PingStream, VTEP, add_pod, fdb, neighbours, node_subnet,
                                 overlay_routes, running_cluster)

pytestmark = pytest.mark.lab

FAST = ("--resync-interval", "2")


def test_pods_reach_each_other_across_nodes_and_on_one_node(lab):
    lab = lab(nodes=3)
    nodes = running_cluster(lab, *FAST)
    subnets = {str(node_subnet(n)) for n in nodes}
    assert len(subnets) == 3 and all(ipaddress.ip_network(s).subnet_of(ipaddress.ip_network(POD_NETWORK))
                                     for s in subnets)
    underlay = nodes[0].ip_json("route", "get", "198.18.2.2")[0]
    assert underlay["gateway"] == "198.18.1.1", "nodes must reach each other only through the router"
    pods = [add_pod(lab, n, 1) for n in nodes] + [add_pod(lab, nodes[0], 2)]
    for a in pods:
        for b in pods:
            if a is not b:
                assert a.ping(b.ip, count=1, timeout=3), f"{a.pod_name} -> {b.pod_name} ({b.ip})"
    link = nodes[0].ip_json("-d", "link", "show", "dev", VTEP)[0]
    vxlan = link["linkinfo"]["info_data"]
    assert (vxlan["id"], vxlan["port"], vxlan["local"], vxlan["learning"]) == (1, 8472, "198.18.1.2", False)
    assert link["mtu"] == 1450


def test_agent_sigkill_and_restart_keeps_subnet_mac_and_traffic(lab):
    lab = lab(nodes=2)
    nodes = running_cluster(lab, *FAST)
    pod_a, pod_b = add_pod(lab, nodes[0], 1), add_pod(lab, nodes[1], 1)
    subnet, mac = node_subnet(nodes[1]), nodes[1].ip_json("link", "show", "dev", VTEP)[0]["address"]
    stream = PingStream(pod_a, pod_b.ip, count=100, interval=0.05)  # 20/s for 5 s
    time.sleep(1)
    nodes[1].agent.kill()
    restarted = lab.start_agent(nodes[1], *FAST)
    lab.wait_for(lambda: "node subnet" in restarted.log_text(), timeout=15, message="agent did not restart")
    assert stream.lost() <= 1
    assert node_subnet(nodes[1]) == subnet
    assert nodes[1].ip_json("link", "show", "dev", VTEP)[0]["address"] == mac
    assert fdb(nodes[0]) == {mac: ["198.18.2.2"]}


def test_a_node_that_leaves_is_removed_everywhere(lab):
    lab = lab(nodes=3)
    nodes = running_cluster(lab, *FAST, "--subnet-lease-ttl", "6")
    leaving = nodes[2]
    gone = str(node_subnet(leaving))
    mac = leaving.ip_json("link", "show", "dev", VTEP)[0]["address"]
    leaving.agent.stop()  # a clean stop keeps the lease: it must expire (short TTL)
    for node in nodes[:2]:
        assert gone in overlay_routes(node)
    lab.wait_for(lambda: all(gone not in overlay_routes(n) for n in nodes[:2]), timeout=20,
                 message="expired lease still programmed")
    for node in nodes[:2]:
        assert mac not in fdb(node)
        assert str(ipaddress.ip_network(gone).network_address) not in neighbours(node)
    # and a revoked lease goes at once
    key = f"/vxlan-net/subnets/{node_subnet(nodes[1]).network_address}-24"
    lease_id = json.loads(lab.etcdctl("get", key, "-w", "json").stdout)["kvs"][0]["lease"]
    nodes[1].agent.stop()
    lab.etcdctl("lease", "revoke", format(lease_id, "x"))
    lab.wait_for(lambda: str(node_subnet(nodes[1])) not in overlay_routes(nodes[0]), timeout=5,
                 message="revoked lease still programmed")


def test_a_node_back_with_a_new_vtep_mac_replaces_its_entries(lab):
    lab = lab(nodes=2)
    nodes = running_cluster(lab, *FAST)
    pod_a, pod_b = add_pod(lab, nodes[0], 1), add_pod(lab, nodes[1], 1)
    old_mac = nodes[1].ip_json("link", "show", "dev", VTEP)[0]["address"]
    nodes[1].agent.stop()
    (nodes[1].state_dir / "node.json").unlink()  # a rebuilt node: its MAC is new
    restarted = lab.start_agent(nodes[1], *FAST)
    lab.wait_for(lambda: "node subnet" in restarted.log_text(), timeout=15, message="agent did not restart")
    new_mac = nodes[1].ip_json("link", "show", "dev", VTEP)[0]["address"]
    assert new_mac != old_mac
    lab.wait_for(lambda: fdb(nodes[0]) == {new_mac: ["198.18.2.2"]}, timeout=10,
                 message=f"peer FDB not replaced: {fdb(nodes[0])}")
    gateway = str(node_subnet(nodes[1]).network_address)
    assert neighbours(nodes[0]) == {gateway: new_mac}
    assert pod_a.ping(pod_b.ip, count=1, timeout=3)


def test_entries_deleted_by_hand_return_within_one_resync(lab):
    lab = lab(nodes=2)
    nodes = running_cluster(lab, *FAST)
    peer = node_subnet(nodes[1])
    gateway = str(peer.network_address)
    mac = nodes[1].ip_json("link", "show", "dev", VTEP)[0]["address"]
    node = nodes[0]
    node.run("ip", "route", "del", str(peer), "dev", VTEP, check=True)
    node.run("ip", "neigh", "del", gateway, "dev", VTEP, check=True)
    node.run("bridge", "fdb", "del", mac, "dev", VTEP, "dst", "198.18.2.2", check=True)
    assert str(peer) not in overlay_routes(node) and mac not in fdb(node)
    lab.wait_for(lambda: overlay_routes(node).get(str(peer)) == gateway and neighbours(node).get(gateway) == mac
                 and fdb(node).get(mac) == ["198.18.2.2"], timeout=2 * 2 + 2, message="drift not healed")


def test_garbage_in_etcd_is_skipped_and_logged(lab):
    lab = lab(nodes=2)
    nodes = running_cluster(lab, *FAST)
    own = node_subnet(nodes[0])
    valid = {"PublicIP": "198.18.9.2", "BackendType": "vxlan", "BackendData": {"VNI": 1, "VtepMAC": "0a:00:00:00:00:09"}}
    garbage = {
        "198.19.201.0-24": "{not json",
        f"{own.supernet(1).network_address}-23": json.dumps(valid),  # overlaps node 1's subnet
        "198.19.202.0-24": json.dumps({**valid, "BackendData": {"VNI": 1, "VtepMAC": "zz:zz"}}),
        "198.19.203.0-24": json.dumps({**valid, "BackendData": {"VNI": 77, "VtepMAC": "0a:00:00:00:00:0a"}}),
        "198.19.204.0-24": json.dumps({**valid, "PublicIP": "not-an-ip"}),
    }
    for name, value in garbage.items():
        lab.etcdctl("put", f"/vxlan-net/subnets/{name}", value)
    lab.etcdctl("put", "/vxlan-net/subnets/198.19.205.0-24", json.dumps(valid))  # a valid one, as a marker
    for node in nodes:
        lab.wait_for(lambda: "198.19.205.0/24" in overlay_routes(node), timeout=5, message="valid lease missed")
    time.sleep(2.5)  # one more resync pass
    for node in nodes:
        routes = overlay_routes(node)
        assert not set(routes) & {"198.19.201.0/24", "198.19.202.0/24", "198.19.203.0/24", "198.19.204.0/24",
                                  str(own.supernet(1))}
        assert set(fdb(node)) == {nodes[1 - nodes.index(node)].ip_json("link", "show", "dev", VTEP)[0]["address"],
                                  "0a:00:00:00:00:09"}
        assert node.agent.alive()
        log = node.agent.log_text()
        for name in garbage:
            assert log.count(f"skipping lease record {name!r}") == 1, (name, log[-2000:])


def test_a_vtep_deleted_by_hand_comes_back_with_the_same_mac(lab):
    lab = lab(nodes=2)
    nodes = running_cluster(lab, *FAST)
    pod_a, pod_b = add_pod(lab, nodes[0], 1), add_pod(lab, nodes[1], 1)
    mac = nodes[0].ip_json("link", "show", "dev", VTEP)[0]["address"]
    nodes[0].run("ip", "link", "del", VTEP, check=True)
    lab.wait_for(lambda: str(node_subnet(nodes[1])) in overlay_routes(nodes[0]), timeout=6,
                 message="VTEP not recreated within a resync")
    assert nodes[0].ip_json("link", "show", "dev", VTEP)[0]["address"] == mac
    assert pod_a.ping(pod_b.ip, count=1, timeout=3)


def test_our_lease_deleted_under_us_is_reacquired_on_the_same_subnet(lab):
    lab = lab(nodes=2)
    nodes = running_cluster(lab, *FAST)
    subnet = node_subnet(nodes[0])
    key = f"/vxlan-net/subnets/{subnet.network_address}-{subnet.prefixlen}"
    lab.etcdctl("del", key)

    def stored():
        out = lab.etcdctl("get", key, "--print-value-only").stdout.strip()
        return json.loads(out) if out else None

    value = lab.wait_for(stored, timeout=10, message="lease not re-acquired")
    assert value["PublicIP"] == nodes[0].public_ip
    assert node_subnet(nodes[0]) == subnet
    assert nodes[0].agent.alive()
    assert overlay_routes(nodes[1])[str(subnet)] == str(subnet.network_address)
