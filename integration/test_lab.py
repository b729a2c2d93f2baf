"""The lab itself, checked with independent tools (ip -j, ping, etcdctl, tcpdump)."""

from __future__ import annotations

import ipaddress
import json
import os
import stat
import subprocess
import time

import pytest

from integration.lab import Lab, LabError, list_namespaces

pytestmark = pytest.mark.lab

LAB_RANGE = ipaddress.IPv4Network("198.18.0.0/15")


def _inet(ns, ifname: str) -> list[ipaddress.IPv4Interface]:
    link = ns.ip_json("addr", "show", "dev", ifname)[0]
    return [ipaddress.IPv4Interface(f"{a['local']}/{a['prefixlen']}")
            for a in link["addr_info"] if a["family"] == "inet"]


def _root_ip_json(*args: str) -> list:
    return json.loads(subprocess.check_output(["ip", "-j", *args], text=True, timeout=10))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_each_node_has_its_own_underlay_subnet_with_mtu_1500(lab):
    cluster = lab(nodes=3, etcd=False)

    subnets = set()
    for node in cluster.nodes:
        link = node.ip_json("link", "show", "dev", node.underlay_ifname)[0]
        assert link["mtu"] == 1500
        [addr] = _inet(node, node.underlay_ifname)
        assert str(addr.ip) == node.public_ip
        assert addr.network.prefixlen == 24 and addr.network.subnet_of(LAB_RANGE)
        subnets.add(addr.network)
    assert len(subnets) == 3


def test_nodes_reach_each_other_only_through_the_router(lab):
    cluster = lab(nodes=2, etcd=False)
    one, two = cluster.nodes

    [route] = one.ip_json("route", "get", two.public_ip)
    assert route["gateway"] == cluster.router.ip_on(one.segment) == one.gateway
    reply = one.ping(two.public_ip)
    assert reply, reply.output
    assert reply.ttl == 63, "one routed hop decrements the TTL once"
    neighbours = {n["dst"] for n in one.ip_json("neigh", "show", "dev", one.underlay_ifname)}
    assert two.public_ip not in neighbours, "no L2 adjacency between nodes"

    cluster.router.sysctl("net.ipv4.ip_forward", 0)
    cut = one.ping(two.public_ip, timeout=1)
    assert not cut and "1 packets transmitted, 0 received" in cut.output
    cluster.router.sysctl("net.ipv4.ip_forward", 1)
    assert one.ping(two.public_ip)


@pytest.mark.parametrize("groups", [[(1,)], [(1, 2), (2, 3)], [(1, 4)], [(0, 1)]])
def test_a_shared_segment_that_names_no_valid_group_of_nodes_is_refused(groups):
    with pytest.raises(ValueError, match="shared_segments"):
        Lab(nodes=3, shared_segments=groups)


def test_nodes_on_a_shared_segment_reach_each_other_without_the_router_and_others_through_it(lab):
    lab = lab(nodes=3, etcd=False, shared_segments=[(1, 2)])
    n1, n2, n3 = lab.nodes
    assert (n1.public_ip, n2.public_ip, n3.public_ip) == ("198.18.1.2", "198.18.1.3", "198.18.3.2")
    direct = n1.ip_json("route", "get", n2.public_ip)[0]
    assert direct["dev"] == "ul0" and "gateway" not in direct
    assert n2.ip_json("route", "get", n3.public_ip)[0]["gateway"] == "198.18.1.1"
    assert n1.ping(n2.public_ip) and n2.ping(n3.public_ip) and n3.ping(n1.public_ip)
    assert {p["ifname"] for p in lab.router.ip_json("link", "show", "master", "sw1")} == {"to-n1", "to-n2"}


def test_the_root_namespace_gets_no_lab_address_or_route(lab):
    cluster = lab(nodes=2, pods_per_node=1, etcd=False)

    assert cluster.nodes[0].ping(cluster.nodes[1].public_ip)
    root_addrs = _root_ip_json("addr", "show")
    for link in root_addrs:
        for addr in link.get("addr_info", []):
            if addr["family"] == "inet":
                assert not ipaddress.ip_address(addr["local"]) in LAB_RANGE, link["ifname"]
    for route in _root_ip_json("route", "show", "table", "all"):
        dst = route.get("dst", "default")
        if dst[0].isdigit():
            assert not ipaddress.ip_network(dst, strict=False).subnet_of(LAB_RANGE), route


def test_outside_host_is_reached_through_the_router(lab):
    cluster = lab(nodes=1, etcd=False)

    reply = cluster.nodes[0].ping(cluster.outside.public_ip)
    assert reply and reply.ttl == 63
    assert not ipaddress.ip_address(cluster.outside.public_ip) in cluster.pod_network


def test_etcd_answers_from_inside_a_node(lab):
    cluster = lab(nodes=2)
    one, two = cluster.nodes

    health = one.run("etcdctl", "--endpoints", cluster.etcd_url, "endpoint", "health")
    assert health.returncode == 0 and "is healthy" in health.stdout + health.stderr
    one.run("etcdctl", "--endpoints", cluster.etcd_url, "put", "/lab/probe", "hello", check=True)
    got = two.run("etcdctl", "--endpoints", cluster.etcd_url, "get", "--print-value-only",
                  "/lab/probe", check=True)
    assert got.stdout.strip() == "hello"
    assert cluster.etcdctl("get", "--print-value-only", "/lab/probe").stdout.strip() == "hello"

    cluster.etcd.kill()
    assert one.run("etcdctl", "--endpoints", cluster.etcd_url, "--dial-timeout", "1s",
                   "--command-timeout", "1s", "endpoint", "health").returncode != 0
    cluster.etcd.start()
    assert cluster.etcdctl("get", "--print-value-only", "/lab/probe").stdout.strip() == "hello"


def test_two_pods_on_one_node_ping_each_other_through_the_bridge(lab):
    cluster = lab(nodes=1, etcd=False)
    node = cluster.nodes[0]
    a = cluster.add_pod(node, "a", "198.19.1.2/24", "198.19.1.1", mtu=1450)
    b = cluster.add_pod(node, "b", "198.19.1.3/24", "198.19.1.1", mtu=1450)

    ports = {link["ifname"] for link in node.ip_json("link", "show", "master", "cni0")}
    assert ports == {a.host_ifname, b.host_ifname}
    assert _inet(node, "cni0") == [ipaddress.IPv4Interface("198.19.1.1/24")]
    assert a.ip_json("link", "show", "dev", "eth0")[0]["mtu"] == 1450
    [default] = a.ip_json("route", "show", "default")
    assert default["gateway"] == "198.19.1.1" and default["dev"] == "eth0"

    with cluster.capture(node, iface=b.host_ifname, bpf="icmp", count=2, timeout=5) as cap:
        reply = a.ping(b.ip)
        cap.wait()
    assert reply and reply.ttl == 64, "bridged, not routed"
    lines = cap.lines()
    assert any(f"{a.ip} > {b.ip}: ICMP echo request" in line for line in lines), lines
    assert a.ping(node.public_ip), "the bridge gateway routes to the node"


def test_capture_in_the_router_sees_routed_traffic(lab):
    cluster = lab(nodes=2, etcd=False)
    one, two = cluster.nodes

    cap = cluster.capture(cluster.router, iface=two.router_ifname, bpf="icmp", count=2,
                          timeout=5)
    assert one.ping(two.public_ip)
    cap.wait()
    packets = cap.packets()
    seen = {(p["IP"].src, p["IP"].dst, p["ICMP"].type) for p in packets}
    assert (one.public_ip, two.public_ip, 8) in seen
    assert (two.public_ip, one.public_ip, 0) in seen
    assert cap.pcap_path.exists()


def test_agent_launcher_runs_the_agent_in_the_node_namespace(lab, tmp_path):
    fake = tmp_path / "fake-agent"
    fake.write_text('#!/bin/sh\necho "argv: $*"\necho "netns: $(ip netns identify $$)"\n'
                    'echo "probe: $LAB_PROBE"\nexec sleep 30\n')
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    cluster = lab(nodes=2, agent_exe=str(fake))
    node = cluster.nodes[1]

    agent = cluster.start_agent(node, "--extra", "1", env={"LAB_PROBE": "x"})
    cluster.wait_for(lambda: "probe:" in agent.log_text(), timeout=5)
    log = agent.log_text()
    assert f"netns: {node.name}" in log
    assert "probe: x" in log
    assert (f"argv: agent --etcd-endpoints {cluster.etcd_url} --iface ul0 --public-ip "
            f"{node.public_ip} --subnet-file {node.subnet_file} --state-dir {node.state_dir} "
            "--extra 1") in log
    assert node.state_dir.is_dir() and node.subnet_file.parent.is_dir()
    started = time.monotonic()
    assert agent.stop() == -15
    assert time.monotonic() - started < 5 and not _pid_alive(agent.pid)

    again = cluster.start_agent(node)
    cluster.wait_for(lambda: "probe:" in again.log_text(), timeout=5)
    assert "--extra" not in again.log_text(), "each handle reads only its own output"
    assert again.kill() == -9


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_no_namespace_or_process_remains_after_an_exception_in_the_lab(error):
    the_lab = Lab(nodes=2, pods_per_node=1)
    with pytest.raises(error):
        with the_lab as cluster:
            assert len(cluster.namespaces()) == 7  # router, etcd, outside, 2 nodes, 2 pods
            etcd_pid = cluster.etcd.pid
            raise error("boom")
    assert [ns for ns in list_namespaces() if the_lab.tag in ns] == []
    assert not _pid_alive(etcd_pid)
    assert not the_lab.workdir.exists()


def test_no_namespace_remains_after_a_clean_exit_or_a_failed_build():
    with Lab(nodes=1, etcd=False) as cluster:
        assert cluster.namespaces()
    assert [ns for ns in list_namespaces() if cluster.tag in ns] == []

    def broken_etcd(lab):
        raise LabError("etcd would not start")

    half = Lab(nodes=2, etcd=broken_etcd)
    with pytest.raises(LabError, match="would not start"):
        half.__enter__()
    assert [ns for ns in list_namespaces() if half.tag in ns] == []


def test_pods_from_the_subnet_file_take_gateway_mtu_and_free_addresses(lab):
    cluster = lab(nodes=1, etcd=False)
    node = cluster.nodes[0]
    node.subnet_file.write_text("VXLAN_NET_NETWORK=198.19.0.0/16\nVXLAN_NET_SUBNET=198.19.7.1/24\n"
                                "VXLAN_NET_MTU=1400\nVXLAN_NET_IPMASQ=true\n")

    a = cluster.add_pod_from_subnet_file(node, "a")
    b = cluster.add_pod_from_subnet_file(node, "b")

    assert (str(a.interface), str(b.interface)) == ("198.19.7.2/24", "198.19.7.3/24")
    assert _inet(b, "eth0") == [ipaddress.IPv4Interface("198.19.7.3/24")]
    assert b.ip_json("link", "show", "dev", "eth0")[0]["mtu"] == 1400
    assert b.ping(a.ip) and b.ping("198.19.7.1")
