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


# -- IPv6 underlay (issue 11) -------------------------------------------------------------------

LAB_RANGE6 = ipaddress.IPv6Network("fd18::/16")


def _inet6(ns, ifname: str) -> list[ipaddress.IPv6Interface]:
    link = ns.ip_json("addr", "show", "dev", ifname)[0]
    return [ipaddress.IPv6Interface(f"{a['local']}/{a['prefixlen']}")
            for a in link["addr_info"] if a["family"] == "inet6" and a.get("scope") == "global"]


@pytest.mark.parametrize("underlay", ["", "v5", "V6", None])
def test_an_unknown_underlay_is_refused(underlay):
    with pytest.raises(ValueError, match="underlay"):
        Lab(nodes=1, underlay=underlay)


@pytest.mark.parametrize("pod6", ["fd18::/56", "2001:db8::/56", "fd19::/56 x"])
def test_an_ipv6_pod_network_outside_fd19_is_refused(pod6):
    with pytest.raises(ValueError):
        Lab(nodes=1, pod_network6=pod6)


def test_a_dual_underlay_gives_each_node_both_families_and_routes_ipv6_through_the_router(lab):
    cluster = lab(nodes=3, etcd=False, underlay="dual", shared_segments=[(1, 2)])
    n1, n2, n3 = cluster.nodes

    assert (n1.underlay_ipv6, n2.underlay_ipv6, n3.underlay_ipv6) == (
        "fd18:0:0:1::2", "fd18:0:0:1::3", "fd18:0:0:3::2")
    for node in cluster.nodes:
        [addr6] = _inet6(node, node.underlay_ifname)
        assert str(addr6.ip) == node.underlay_ipv6 and addr6.network.prefixlen == 64
        assert addr6.network.subnet_of(LAB_RANGE6)
        assert [str(a.ip) for a in _inet(node, node.underlay_ifname)] == [node.public_ip]
        [default6] = node.ip_json("-6", "route", "show", "default")
        assert default6["gateway"] == cluster.router.ip6_on(node.segment)
        flags = node.ip_json("-6", "addr", "show", "dev", node.underlay_ifname)[0]["addr_info"]
        assert not any(a.get("tentative") for a in flags), "nodad: usable at once"

    routed = n1.ping(n3.underlay_ipv6)
    assert routed, routed.output
    assert routed.ttl == 63, "one routed hop decrements the hop limit once"
    assert n2.ping6(n1.underlay_ipv6).ttl == 64, "a shared segment is one L2 hop"
    assert n3.ping(n1.public_ip), "IPv4 keeps working beside IPv6"

    cluster.router.sysctl("net.ipv6.conf.all.forwarding", 0)
    cut = n1.ping6(n3.underlay_ipv6, timeout=1)
    assert not cut and "1 packets transmitted, 0 received" in cut.output
    cluster.router.sysctl("net.ipv6.conf.all.forwarding", 1)
    assert n1.ping6(n3.underlay_ipv6)


def test_ping6_refuses_an_ipv4_address(lab):
    cluster = lab(nodes=1, etcd=False, underlay="dual")
    with pytest.raises(ValueError, match="not an IPv6"):
        cluster.nodes[0].ping6(cluster.outside.public_ip)


def test_a_v6_underlay_has_no_ipv4_and_etcd_answers_on_its_ipv6_address(lab):
    cluster = lab(nodes=2, underlay="v6")
    one, two = cluster.nodes

    assert cluster.etcd_url == f"http://[{cluster.etcd_host.public_ipv6}]:2379" == "http://[fd18::2]:2379"
    for host in [one, two, cluster.etcd_host, cluster.outside]:
        assert host.public_ip is None and _inet(host, host.underlay_ifname) == []
        assert host.ip_json("-4", "route", "show") == []
    assert cluster.router.ip_json("-4", "addr", "show", "dev", one.router_ifname) == []

    one.run("etcdctl", "--endpoints", cluster.etcd_url, "put", "/lab/v6", "over-ipv6", check=True)
    got = two.run("etcdctl", "--endpoints", cluster.etcd_url, "get", "--print-value-only", "/lab/v6",
                  check=True)
    assert got.stdout.strip() == "over-ipv6"
    reply = one.ping(two.underlay_ipv6)
    assert reply and reply.ttl == 63
    assert one.ping(cluster.outside.public_ipv6)


def test_dual_stack_pods_get_both_families_and_reach_each_other_and_their_gateway(lab):
    cluster = lab(nodes=1, etcd=False, pods_per_node=2, pod_network6="fd19::/56")
    node = cluster.nodes[0]
    a, b = cluster.pods["n1p1"], cluster.pods["n1p2"]

    assert (str(a.interface6), a.gateway6) == ("fd19:0:0:1::2/64", "fd19:0:0:1::1")
    assert (b.ip, b.ip6) == ("198.19.1.3", "fd19:0:0:1::3")
    assert _inet6(b, "eth0") == [ipaddress.IPv6Interface("fd19:0:0:1::3/64")]
    assert _inet(b, "eth0") == [ipaddress.IPv4Interface("198.19.1.3/24")]
    assert b.ip_json("-6", "route", "show", "default")[0]["gateway"] == "fd19:0:0:1::1"
    assert _inet6(node, "cni0") == [ipaddress.IPv6Interface("fd19:0:0:1::1/64")]
    assert node.underlay_ipv6 is None, "the underlay stays IPv4 only"

    with cluster.capture(node, iface=b.host_ifname, bpf="icmp6 and ip6[40] == 128", count=1,
                         timeout=5) as cap:
        reply = a.ping(b.ip6)
        cap.wait()
    assert reply and reply.ttl == 64, "bridged, not routed"
    assert any(f"{a.ip6} > {b.ip6}: ICMP6, echo request" in line for line in cap.lines()), cap.lines()
    assert a.ping6("fd19:0:0:1::1") and a.ping(b.ip)


def test_ipv6_only_pods_from_the_subnet_file(lab):
    cluster = lab(nodes=1, etcd=False, underlay="v6")
    node = cluster.nodes[0]
    node.subnet_file.write_text("VXLAN_NET_IPV6_NETWORK=fd19::/56\nVXLAN_NET_IPV6_SUBNET=fd19:0:0:5::1/64\n"
                                "VXLAN_NET_MTU=1380\n")

    a = cluster.add_pod_from_subnet_file(node, "a")
    b = cluster.add_pod_from_subnet_file(node, "b")

    assert (a.interface, a.ip) == (None, None)
    assert (str(a.interface6), str(b.interface6)) == ("fd19:0:0:5::2/64", "fd19:0:0:5::3/64")
    assert _inet(b, "eth0") == [] and b.ip_json("-4", "route", "show") == []
    assert b.ip_json("link", "show", "dev", "eth0")[0]["mtu"] == 1380
    assert b.ping6(a.ip6) and b.ping6("fd19:0:0:5::1")


@pytest.mark.parametrize("kwargs", [dict(ip_cidr=None, gateway=None),
                                    dict(ip_cidr=None, gateway=None, ipv6="fd19:0:0:1::2/64"),
                                    dict(ip_cidr=None, gateway=None, ipv6="2001:db8::2/64",
                                         gateway6="2001:db8::1")])
def test_a_pod_without_an_address_or_outside_fd19_is_refused(lab, kwargs):
    cluster = lab(nodes=1, etcd=False)
    with pytest.raises(ValueError, match="add_pod"):
        cluster.add_pod(cluster.nodes[0], "bad", **kwargs)
    assert cluster.pods == {}
