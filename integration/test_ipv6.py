"""IPv6 end to end (issue 11): dual-stack and IPv6-only pod networks over IPv4, IPv6 and dual-stack underlays,
checked with ping/ping -6, tcpdump, `ip -j` and `bridge -j` from outside the agent."""

from __future__ import annotations

import pytest

from integration.cluster import DUAL_STACK_CONFIG as DUAL_CONFIG
from integration.cluster import (PingStream, direct_routes, fdb, neighbours, node_subnets, overlay_routes6, put_config,
                                 start_agents, wait_converged)
from integration.lab import Lab, Pod

pytestmark = pytest.mark.root

V6_CONFIG = {"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": "fd19::/56",
             "Backend": {"Type": "vxlan", "VNI": 1}}
FAST = ("--resync-interval", "2", "--subnet-lease-ttl", "30")


def cluster(lab: Lab, doc: dict, *agent_args: str) -> list:
    put_config(lab, doc)
    start_agents(lab, lab.nodes, *FAST, *agent_args)
    wait_converged(lab, lab.nodes, timeout=20)
    return lab.nodes


def pods_on(lab: Lab, nodes, per_node: int = 1) -> list[Pod]:
    return [lab.add_pod_from_subnet_file(node, f"n{node.index}p{i}") for node in nodes for i in range(per_node)]


def unreachable_pairs(pods: list[Pod], family: int) -> list[tuple[str, str]]:
    """Every ordered pair of distinct pods that cannot ping each other over `family`."""
    failed = []
    for a in pods:
        for b in pods:
            if a is b:
                continue
            target = b.interface6 if family == 6 else b.interface
            if target is None:
                raise AssertionError(f"{b.pod_name} has no IPv{family} address")
            ping = a.ping6 if family == 6 else a.ping
            if not ping(str(target.ip), count=1, timeout=3):
                failed.append((a.pod_name, b.pod_name))
    return failed


def test_dual_stack_cluster_over_a_dual_stack_underlay_reaches_every_pod_over_both_families(lab):
    lab = lab(nodes=3, underlay="dual")
    nodes = cluster(lab, DUAL_CONFIG)
    for node in nodes:  # one VTEP per underlay family, each with its own MAC
        v4, v6 = (node.ip_json("-d", "link", "show", "dev", d)[0] for d in ("vxnet.1", "vxnet6.1"))
        assert v4["linkinfo"]["info_data"]["local"] == node.public_ip
        assert v6["linkinfo"]["info_data"]["local6"] == node.public_ipv6 and v4["address"] != v6["address"]
        assert len(overlay_routes6(node)) == 2
        assert {r["dev"] for r in node.ip_json("-6", "route", "show", "proto", "157")} == {"vxnet6.1"}
    pods = pods_on(lab, nodes, per_node=2)
    assert all(p.interface is not None and p.interface6 is not None for p in pods)
    assert unreachable_pairs(pods, 4) == [] and unreachable_pairs(pods, 6) == []
    # On the wire: our VNI over the IPv6 underlay, the pods' IPv6 addresses unchanged inside.
    a, b = pods[0], pods[2]
    capture = lab.capture(nodes[1], iface=nodes[1].underlay_ifname, bpf="ip6 and udp port 8472", count=4,
                          timeout=10)
    assert a.ping6(str(b.interface6.ip), count=2, timeout=3)
    capture.wait()
    inner = [p for p in capture.packets() if p.haslayer("VXLAN") and p["VXLAN"].vni == 1
             and p["VXLAN"].payload.haslayer("IPv6")]
    assert inner, capture.lines()
    addresses = {(p["VXLAN"]["IPv6"].src, p["VXLAN"]["IPv6"].dst) for p in inner}
    assert (str(a.interface6.ip), str(b.interface6.ip)) in addresses


def test_dual_stack_pods_over_an_ipv4_only_underlay_share_the_one_ipv4_vtep(lab):
    lab = lab(nodes=2, underlay="v4")
    nodes = cluster(lab, DUAL_CONFIG)
    for node in nodes:
        assert not node.has_link("vxnet6.1")
        assert {r["dev"] for r in node.ip_json("-6", "route", "show", "proto", "157")} == {"vxnet.1"}
    pods = pods_on(lab, nodes, per_node=2)
    assert unreachable_pairs(pods, 4) == [] and unreachable_pairs(pods, 6) == []


def test_ipv6_only_cluster_over_an_ipv6_only_underlay(lab):
    lab = lab(nodes=3, underlay="v6")
    nodes = cluster(lab, V6_CONFIG)
    keys = lab.etcdctl("get", "--prefix", "--keys-only", "/vxlan-net/subnets/").stdout.split()
    assert len(keys) == 3 and all(k.startswith("/vxlan-net/subnets/fd19:") and "&" not in k for k in keys), keys
    for node in nodes:
        assert not node.has_link("vxnet.1") and node.has_link("vxnet6.1")
        env = node.subnet_env()
        assert "VXLAN_NET_SUBNET" not in env and env["VXLAN_NET_IPV6_NETWORK"] == "fd19::/56"
        assert env["VXLAN_NET_MTU"] == "1430"  # 1500 - 70 over IPv6
    pods = pods_on(lab, nodes)
    assert all(p.interface is None and p.interface6 is not None for p in pods)
    assert unreachable_pairs(pods, 6) == []


def test_an_ipv4_cluster_gains_ipv6_by_a_config_change_and_agent_restarts(lab):
    lab = lab(nodes=2, underlay="dual")
    v4_only = {k: v for k, v in DUAL_CONFIG.items() if not k.startswith(("EnableIPv6", "IPv6"))}
    nodes = cluster(lab, v4_only)
    assert not any("VXLAN_NET_IPV6_SUBNET" in n.subnet_env() for n in nodes)
    old = pods_on(lab, nodes)
    assert all(p.interface6 is None for p in old) and unreachable_pairs(old, 4) == []
    keys_before = lab.etcdctl("get", "--prefix", "--keys-only", "/vxlan-net/subnets/").stdout.split()
    put_config(lab, DUAL_CONFIG)
    stream = PingStream(old[0], str(old[1].interface.ip), count=200, interval=0.05)
    for node in nodes:  # a rolling restart, one node at a time
        node.agent.stop()
        lab.start_agent(node, *FAST)
        lab.wait_for(lambda: "VXLAN_NET_IPV6_SUBNET" in node.subnet_env(), timeout=20,
                     message=f"{node.name} did not take an IPv6 subnet")
        assert unreachable_pairs(old, 4) == []  # old pods keep working between restarts
    wait_converged(lab, nodes, timeout=20)
    keys_after = lab.etcdctl("get", "--prefix", "--keys-only", "/vxlan-net/subnets/").stdout.split()
    assert len(keys_after) == 2 and all("&fd19:" in k for k in keys_after), keys_after
    assert sorted(k.split("&")[0] for k in keys_after) == sorted(keys_before)  # same IPv4 subnets
    new = [lab.add_pod_from_subnet_file(node, f"new{node.index}") for node in nodes]
    assert all(p.interface6 is not None for p in new)
    assert unreachable_pairs(old + new, 4) == [] and unreachable_pairs(new, 6) == []
    assert stream.lost() == 0  # not one IPv4 echo lost to the key change


def test_ipv6_tunnel_mtu_crosses_unfragmented_and_one_byte_more_gets_packet_too_big(lab):
    lab = lab(nodes=2, underlay="dual")
    nodes = cluster(lab, DUAL_CONFIG)
    a, b = pods_on(lab, nodes)
    mtu = int(nodes[0].subnet_env()["VXLAN_NET_MTU"])
    assert mtu == 1500 - 70  # the pods' MTU is the IPv6 tunnel's (the smaller of the two VTEPs')
    payload = mtu - 40 - 8  # IPv6 header and ICMPv6 echo header
    capture = lab.capture(nodes[0], iface=nodes[0].underlay_ifname, bpf="ip6 and udp port 8472", count=50,
                          timeout=15)
    assert a.run("ping", "-6", "-c", "2", "-W", "3", "-M", "do", "-s", str(payload), str(b.interface6.ip)).returncode == 0
    # a TCP stream: its MSS is the tunnel MTU's, every byte arrives, nothing is fragmented on the underlay
    got = lab.workdir / "tcp-received"
    server = ("import socket,sys\ns=socket.socket(socket.AF_INET6);s.settimeout(10)\n"
              "s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);s.bind(('::',5201));s.listen(1)\n"
              "c,_=s.accept();c.settimeout(10);n=0\nwhile True:\n d=c.recv(65536)\n if not d: break\n n+=len(d)\n"
              "open(sys.argv[1],'w').write(str(n))")
    b.run("sh", "-c", f"timeout 15 python3 -c \"$0\" {got} >/dev/null 2>&1 &", server, check=True)
    client = (f"import socket,time\nfor _ in range(50):\n try:\n  s=socket.create_connection(('{b.interface6.ip}',5201),timeout=3);break\n"
              " except OSError: time.sleep(0.1)\ns.sendall(b'x'*2000000);s.close()")
    sent = a.run("python3", "-c", client)
    assert sent.returncode == 0, sent.stderr
    lab.wait_for(lambda: got.exists() and got.read_text() == "2000000", timeout=10, message="TCP bytes lost")
    capture.wait()
    outer = [p for p in capture.packets() if p.haslayer("IPv6")]
    assert not any(p.haslayer("IPv6ExtHdrFragment") for p in outer)
    syns = [p["TCP"] for p in outer if p.haslayer("TCP") and p["TCP"].flags & 0x02]
    assert syns and all(dict(t.options).get("MSS") == mtu - 60 for t in syns), syns
    # One byte more from a pod whose interface allows it: the node answers Packet Too Big with the tunnel MTU.
    a.run("ip", "link", "set", "eth0", "mtu", "1500", check=True)
    nodes[0].run("ip", "link", "set", a.host_ifname, "mtu", "1500", check=True)
    big = a.run("ping", "-6", "-c", "1", "-W", "3", "-M", "do", "-s", str(payload + 1), str(b.interface6.ip))
    assert big.returncode != 0 and f"mtu={mtu}" in (big.stdout + big.stderr).lower().replace(" ", ""), big.stdout


def v6_entries(node) -> tuple[dict, dict, dict]:
    """(IPv6 routes, IPv6 neighbours, FDB) of the node's IPv6-underlay VTEP, as `ip -j` and `bridge -j` show."""
    neigh = {ip: mac for ip, mac in neighbours(node, "vxnet6.1").items() if ":" in ip}
    return overlay_routes6(node), neigh, fdb(node, "vxnet6.1")


def test_ipv6_entries_heal_follow_restarts_new_macs_and_leaves_and_garbage_is_skipped(lab):
    lab = lab(nodes=2, underlay="dual")
    nodes = cluster(lab, DUAL_CONFIG)
    node, peer = nodes
    subnet6 = node_subnets(peer)[1]
    gateway6, peer_ip6 = str(subnet6.network_address), peer.public_ipv6
    mac6 = peer.ip_json("link", "show", "dev", "vxnet6.1")[0]["address"]
    assert v6_entries(node) == ({str(subnet6): gateway6}, {gateway6: mac6}, {mac6: [peer_ip6]})
    # Garbage IPv6 records: skipped with a warning, nothing programmed, nobody dies.
    for key, value in [("198.19.240.0-24&fd19:0:0:f0::-64", '{"PublicIP": "198.18.9.2", "BackendData": '
                        '{"VNI": 1, "VtepMAC": "0a:00:00:00:00:09"}, "PublicIPv6": "fe80::1", '
                        '"BackendV6Data": {"VNI": 1, "VtepMAC": "0a:00:00:00:00:0a"}}'),
                       ("198.19.241.0-24&" + subnet6.compressed.replace("/", "-"),
                        '{"PublicIP": "198.18.9.3", "BackendData": {"VNI": 1, "VtepMAC": "0a:00:00:00:00:0b"}}'),
                       ("fd19:0:0:f2::-64", '{"PublicIPv6": "fd18:0:0:9::2", "BackendV6Data": {"VNI": 1, '
                        '"VtepMAC": "0a:00:00:00:00:0c"}}'),
                       ("198.19.243.0-24&FD19:0:0:F3::-64", '{"PublicIP": "198.18.9.4"}')]:
        lab.etcdctl("put", f"/vxlan-net/subnets/{key}", value)
    lab.wait_for(lambda: node.agent.log_text().count("skipping lease record") >= 4, timeout=10,
                 message="garbage IPv6 records not reported")
    assert node.agent.alive() and peer.agent.alive()
    assert v6_entries(node) == ({str(subnet6): gateway6}, {gateway6: mac6}, {mac6: [peer_ip6]})
    # Drift: hand-deleted IPv6 entries come back within a couple of resyncs.
    node.run("ip", "-6", "route", "del", str(subnet6), "dev", "vxnet6.1", check=True)
    node.run("ip", "-6", "neigh", "del", gateway6, "dev", "vxnet6.1", check=True)
    node.run("bridge", "fdb", "del", mac6, "dev", "vxnet6.1", "dst", peer_ip6, check=True)
    lab.wait_for(lambda: v6_entries(node) == ({str(subnet6): gateway6}, {gateway6: mac6}, {mac6: [peer_ip6]}),
                 timeout=2 * 2 + 2, message="IPv6 drift not healed")
    pod_a, pod_b = pods_on(lab, nodes)
    # Restart: same IPv6 subnet and MAC, the pods keep reaching each other.
    peer.agent.stop()
    lab.start_agent(peer, *FAST)
    lab.wait_for(lambda: "node subnet" in peer.agent.log_text(), timeout=15)
    assert node_subnets(peer)[1] == subnet6 and peer.ip_json("link", "show", "dev", "vxnet6.1")[0]["address"] == mac6
    assert pod_a.ping6(str(pod_b.interface6.ip), count=1, timeout=3)
    # A rebuilt node (state dir lost): new IPv6 VTEP MAC, its entries replaced, nothing stale left.
    peer.agent.stop()
    (peer.state_dir / "node.json").unlink()
    lab.start_agent(peer, *FAST)
    lab.wait_for(lambda: "node subnet" in peer.agent.log_text(), timeout=15)
    new6 = peer.ip_json("link", "show", "dev", "vxnet6.1")[0]["address"]
    assert new6 != mac6
    lab.wait_for(lambda: v6_entries(node)[1:] == ({gateway6: new6}, {new6: [peer_ip6]}), timeout=10,
                 message=f"IPv6 entries not replaced: {v6_entries(node)}")
    assert pod_a.ping6(str(pod_b.interface6.ip), count=1, timeout=3)
    # The node leaves: its lease goes, and so do its IPv6 entries (the record that claimed its IPv6 subnet
    # second, and would now take it over, goes first).
    lab.etcdctl("del", "--prefix", "/vxlan-net/subnets/198.19.241.0-24")
    peer.agent.stop()
    key = next(k for k in lab.etcdctl("get", "--prefix", "--keys-only", "/vxlan-net/subnets/").stdout.split()
               if k.endswith(subnet6.compressed.replace("/", "-")))
    lab.etcdctl("del", key)
    lab.wait_for(lambda: v6_entries(node) == ({}, {}, {}), timeout=10, message=f"left: {v6_entries(node)}")


def test_ipv6_direct_routing_on_a_shared_segment_and_the_tunnel_across_the_router(lab):
    lab = lab(nodes=3, underlay="dual", shared_segments=[(1, 2)])
    nodes = cluster(lab, {**DUAL_CONFIG, "Backend": {"Type": "vxlan", "VNI": 1, "DirectRouting": True}})
    n1, n2, n3 = nodes
    s2 = node_subnets(n2)
    lab.wait_for(lambda: direct_routes(n1) == {str(s2[0]): n2.public_ip, str(s2[1]): n2.public_ipv6},
                 timeout=10, message=f"direct routes: {direct_routes(n1)}")
    assert direct_routes(n3) == {}
    assert str(node_subnets(n3)[1]) in overlay_routes6(n1)  # across the router: the IPv6 tunnel
    pods = pods_on(lab, nodes)
    assert unreachable_pairs(pods, 6) == [] and unreachable_pairs(pods, 4) == []
    # Direct IPv6 pod packets cross the segment unencapsulated, addresses unchanged.
    a, b = pods[0], pods[1]
    capture = lab.capture(n2, iface=n2.underlay_ifname, bpf="ip6 and icmp6", count=2, timeout=10)
    assert a.ping6(str(b.interface6.ip), count=2, timeout=3)
    capture.wait()
    assert any(p["IPv6"].src == str(a.interface6.ip) and p["IPv6"].dst == str(b.interface6.ip)
               for p in capture.packets() if p.haslayer("IPv6")), capture.lines()
