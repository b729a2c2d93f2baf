"""Hostile records in etcd, written with etcdctl as any node's credentials could: no agent stops,
no node gives up its subnet, no tunnel endpoint moves (real etcd, real kernel, 2-node lab)."""

from __future__ import annotations

import json
import time

import pytest

from integration.cluster import VTEP, add_pod, fdb, neighbours, node_subnet, overlay_routes, running_cluster
from integration.etcd_server import ETCDCTL_EXE

pytestmark = pytest.mark.lab

RESYNC = 1.0
PREFIX = "/vxlan-net/subnets/"
# An address nobody serves, given to the agents as a second etcd endpoint: being one, it must
# never be routed into the tunnel, whatever record claims the subnet around it.
ETCD_IN_POD_NETWORK = "198.19.250.10"


def _record(ip: str, mac: str) -> str:
    return json.dumps({"PublicIP": ip, "BackendType": "vxlan", "BackendData": {"VNI": 1, "VtepMAC": mac}})


def _put(lab, key: str, value: str) -> None:
    """etcdctl put with the value on stdin (a 1 MiB value does not fit in one argument)."""
    lab.etcd_host.run("env", "ETCDCTL_API=3", ETCDCTL_EXE, "--endpoints", lab.etcd_url, "put", key,
                      input=value, check=True, timeout=20)


def _stored(lab, key: str) -> dict:
    kvs = json.loads(lab.etcdctl("get", key, "-w", "json").stdout).get("kvs", [])
    return kvs[0] if kvs else {}


def _mac(node) -> str:
    return node.ip_json("link", "show", "dev", VTEP)[0]["address"]


def test_hostile_records_never_stop_an_agent_move_a_node_or_a_tunnel_endpoint(lab):
    lab = lab(nodes=2)
    endpoints = f"{lab.etcd_url},http://{ETCD_IN_POD_NETWORK}:2379"
    n1, n2 = running_cluster(lab, "--resync-interval", str(RESYNC), "--etcd-endpoints", endpoints)
    pod1, pod2 = add_pod(lab, n1, 1), add_pod(lab, n2, 1)
    s1, s2 = node_subnet(n1), node_subnet(n2)
    mac1, mac2 = _mac(n1), _mac(n2)
    key1 = f"{PREFIX}{s1.network_address}-{s1.prefixlen}"
    lease1 = _stored(lab, key1)["lease"]

    hostile = {
        f"{PREFIX}198.19.240.0-24": "[" * 2000,                                    # RecursionError before
        f"{PREFIX}198.19.241.0-24": "x" * (1 << 20),                               # 1 MiB
        f"{key1}\n": _record("198.18.9.9", "0a:00:00:00:09:09"),                   # alias of node 1's key
        f"{PREFIX}198.19.242.0-24": _record("198.18.9.8", mac2),                   # node 2's MAC, created later
        f"{PREFIX}198.19.243.0-24": _record("198.18.9.7", mac1),                   # node 1's MAC
        f"{PREFIX}198.19.244.0-24": _record(n2.public_ip, "0a:00:00:00:09:07"),    # node 2's PublicIP
        f"{PREFIX}198.19.250.0-24": _record("198.18.9.6", "0a:00:00:00:09:06"),    # would capture etcd
    }
    for key, value in hostile.items():
        _put(lab, key, value)
    marker = f"{PREFIX}198.19.245.0-24"
    _put(lab, marker, _record("198.18.9.5", "0a:00:00:00:09:05"))  # a valid newcomer, to know events were seen
    for node in (n1, n2):
        lab.wait_for(lambda: "198.19.245.0/24" in overlay_routes(node), timeout=5, message="valid record missed")

    for _ in range(3):  # several full passes: nothing moves
        time.sleep(RESYNC + 0.2)
        for node, peer, peer_subnet, peer_mac in ((n1, n2, s2, mac2), (n2, n1, s1, mac1)):
            assert node.agent.alive(), node.agent.log_text()[-2000:]
            assert node_subnet(node) == (s1 if node is n1 else s2)
            assert fdb(node)[peer_mac] == [peer.public_ip], "a duplicated MAC moved the peer's FDB entry"
            assert neighbours(node)[str(peer_subnet.network_address)] == peer_mac
            routes = overlay_routes(node)
            assert routes[str(peer_subnet)] == str(peer_subnet.network_address)
            assert not {"198.19.240.0/24", "198.19.241.0/24", "198.19.242.0/24", "198.19.243.0/24",
                        "198.19.244.0/24", "198.19.250.0/24"} & set(routes)
            assert "198.18.9.9" not in str(fdb(node)) and "198.18.9.8" not in str(fdb(node))
    assert pod1.ping(pod2.ip, count=2, timeout=3)
    stored = _stored(lab, key1)
    assert stored["lease"] == lease1 and json.loads(_b64(stored["value"]))["PublicIP"] == n1.public_ip

    doctor = n1.run(lab.agent_exe, "doctor", "--etcd-endpoints", lab.etcd_url, timeout=60)
    inspect = n1.run(lab.agent_exe, "inspect", "--etcd-endpoints", lab.etcd_url, "--iface", n1.underlay_ifname,
                     "--timeout", "1", timeout=60)
    assert doctor.returncode == 1 and inspect.returncode == 0, (doctor.stdout, doctor.stderr, inspect.stderr)
    for output in (doctor.stdout, inspect.stderr):
        assert "Traceback" not in output
        for key, reason in (("198.19.240.0-24", "not valid JSON"), ("198.19.241.0-24", "more than the 4096"),
                            ("198.19.242.0-24", "created first")):
            assert any(key in line and reason in line for line in output.splitlines()), (key, output)

    for node in (n1, n2):
        log = node.agent.log_text()
        assert log.count("198.19.240.0-24") == 1 and "not valid JSON" in log
        assert log.count("198.19.241.0-24") == 1 and "more than the 4096" in log
        assert "is not of the form" in log  # the alias
        assert "would capture etcd endpoint" in log and ETCD_IN_POD_NETWORK in log
        for key in ("198.19.242.0-24", "198.19.243.0-24", "198.19.244.0-24"):  # lose to the records made first
            assert log.count(f"skipping lease record '{key}'") == 1 and "created first" in log


def test_our_record_rewritten_by_someone_else_is_restored_under_our_lease(lab):
    lab = lab(nodes=2)
    n1, n2 = running_cluster(lab, "--resync-interval", str(RESYNC))
    s1 = node_subnet(n1)
    key1 = f"{PREFIX}{s1.network_address}-{s1.prefixlen}"
    lease1 = _stored(lab, key1)["lease"]
    _put(lab, key1, _record(n2.public_ip, _mac(n2)))  # a plain put: it also detaches the key from our lease

    def restored() -> bool:
        stored = _stored(lab, key1)
        return stored.get("lease") == lease1 and json.loads(_b64(stored["value"]))["PublicIP"] == n1.public_ip

    lab.wait_for(restored, timeout=5, message="our record was not restored")
    assert node_subnet(n1) == s1 and n1.agent.alive()
    assert "overwritten by someone else; restoring it" in n1.agent.log_text()
    time.sleep(RESYNC + 0.5)
    assert fdb(n2)[_mac(n1)] == [n1.public_ip]
    assert overlay_routes(n2)[str(s1)] == str(s1.network_address)


def _b64(value: str) -> str:
    import base64

    return base64.b64decode(value).decode()
