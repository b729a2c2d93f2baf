"""Direct routing (issue 10) on a lab where nodes 1 and 2 share an L2 segment and node 3 is behind the router.

Every check reads what independent tools see: `ip -j route`, `ip -j neigh`, `bridge -j fdb`, tcpdump
on the shared segment (the router's port towards a node), and ping between pods.
"""

from __future__ import annotations

import time

import pytest

from integration.cluster import VTEP, add_pod, fdb, neighbours, node_subnet, overlay_routes, start_agents, \
    write_config
from integration.lab import Lab, Node

pytestmark = pytest.mark.lab

PROTO = "157"
# Long enough that nothing below can be the periodic resync's doing: what changes does so on an event.
SLOW_RESYNC = ("--resync-interval", "120")


def direct_routes(node: Node) -> dict[str, str]:
    """{subnet: gateway} of our routes on the node's underlay device, from `ip -j route`."""
    routes = node.ip_json("route", "show", "dev", node.underlay_ifname, "proto", PROTO)
    return {r["dst"]: r.get("gateway") for r in routes}


def mode_seen(node: Node, peer: Node) -> str:
    """How `node` reaches `peer`'s pods, judged only by the kernel's entries, with any leftover named."""
    subnet = node_subnet(peer)
    direct = direct_routes(node).get(str(subnet)) == peer.public_ip
    tunnel = (overlay_routes(node).get(str(subnet)) == str(subnet.network_address)
              and str(subnet.network_address) in neighbours(node))
    peer_mac = peer.ip_json("link", "show", "dev", VTEP)[0]["address"]
    in_fdb = peer_mac in fdb(node)
    if direct and not tunnel and not in_fdb:
        return "direct"
    if tunnel and not direct and fdb(node).get(peer_mac) == [peer.public_ip]:
        return "tunnelled"
    return f"mixed (direct route {direct}, tunnel route+neigh {tunnel}, fdb {in_fdb})"


def wait_modes(lab: Lab, expected: dict[tuple[int, int], str], timeout: float = 15.0) -> None:
    """Wait until node i sees node j in mode expected[(i, j)] (1-based)."""
    def seen():
        return {(i, j): mode_seen(lab.nodes[i - 1], lab.nodes[j - 1]) for i, j in expected}
    try:
        lab.wait_for(lambda: seen() == expected, timeout=timeout, interval=0.2)
    except TimeoutError:
        raise AssertionError(f"modes {seen()} != {expected}") from None


MIXED = {(1, 2): "direct", (2, 1): "direct", (1, 3): "tunnelled", (3, 1): "tunnelled",
         (2, 3): "tunnelled", (3, 2): "tunnelled"}
ALL_TUNNELLED = {pair: "tunnelled" for pair in MIXED}


def mixed_cluster(lab, *agent_args: str, direct: bool = True) -> list[Node]:
    lab = lab(nodes=3, shared_segments=[(1, 2)])
    write_config(lab, *(["--direct-routing"] if direct else []))
    start_agents(lab, lab.nodes, *agent_args)
    return lab


def all_pods_ping(pods) -> None:
    for a in pods:
        for b in pods:
            if a is not b:
                assert a.ping(b.ip, count=1, timeout=3), f"{a.pod_name} -> {b.pod_name} ({b.ip})"


def test_mixed_cluster_routes_the_shared_segment_directly_and_tunnels_across_the_router(lab):
    lab = mixed_cluster(lab, *SLOW_RESYNC)
    wait_modes(lab, MIXED)
    n1, n2, n3 = lab.nodes
    assert direct_routes(n1) == {str(node_subnet(n2)): n2.public_ip}
    assert direct_routes(n3) == {}
    assert int(n1.subnet_env()["VXLAN_NET_MTU"]) == 1450, "the pod MTU stays the tunnel's"
    pods = [add_pod(lab, n, 1) for n in lab.nodes]
    all_pods_ping(pods)
    p1, p2, p3 = pods
    # On the shared segment (the router's port to node 2): the direct pair's packets are plain IP with
    # the pods' addresses, and there is no VXLAN at all between nodes 1 and 2.
    # (waited for by count: tcpdump stopped at once would drop what the kernel has not handed it yet)
    cap = lab.capture(lab.router, n2.router_ifname, "icmp or udp port 8472", count=6, timeout=8)
    assert p1.ping(p2.ip, count=3, timeout=2, interval=0.2)
    lines = cap.wait().lines()
    assert len(lines) == 6, lines
    assert any(f"{p1.ip} > {p2.ip}: ICMP echo request" in line for line in lines), lines
    assert any(f"{p2.ip} > {p1.ip}: ICMP echo reply" in line for line in lines), lines
    assert not any(".8472" in line for line in lines), lines
    # Across the router: VXLAN between the nodes' public IPs, the pods only inside.
    cap = lab.capture(lab.router, n3.router_ifname, "udp port 8472", count=6, timeout=8)
    assert p1.ping(p3.ip, count=3, timeout=2, interval=0.2)
    packets = cap.wait().packets()
    from scapy.layers.inet import IP
    from scapy.layers.vxlan import VXLAN
    tunnelled = [p for p in packets if p.haslayer(VXLAN)]
    assert tunnelled and {(p[IP].src, p[IP].dst) for p in tunnelled} <= {
        (n1.public_ip, n3.public_ip), (n3.public_ip, n1.public_ip)}
    assert {p[VXLAN].payload[IP].src for p in tunnelled} == {p1.ip, p3.ip}


def test_a_lost_and_restored_connected_route_moves_the_peer_to_the_tunnel_and_back_without_a_lease_event(lab):
    lab = mixed_cluster(lab, *SLOW_RESYNC)
    wait_modes(lab, MIXED)
    n1, n2, _ = lab.nodes
    pod1, pod2 = add_pod(lab, n1, 1), add_pod(lab, n2, 1)
    connected = f"{n1.subnet} dev {n1.underlay_ifname} proto kernel scope link src {n1.public_ip}"
    started = time.monotonic()
    n1.run(f"ip route del {connected}", check=True)  # what a link flap does to the segment's route
    wait_modes(lab, {(1, 2): "tunnelled"}, timeout=10)
    assert pod1.ping(pod2.ip, count=1, timeout=3), "through the router, tunnelled"
    n1.run(f"ip route add {connected}", check=True)
    wait_modes(lab, {(1, 2): "direct"}, timeout=10)
    assert time.monotonic() - started < 60, "must follow the route change, not the 120 s resync"
    assert pod1.ping(pod2.ip, count=1, timeout=3)


def test_with_direct_routing_off_every_peer_is_tunnelled_and_turning_it_off_leaves_no_direct_route(lab):
    lab = mixed_cluster(lab)
    wait_modes(lab, MIXED)
    write_config(lab)  # DirectRouting back to false; agents read the config when they start
    for node in lab.nodes:
        node.agent.stop()
        lab.start_agent(node)
    wait_modes(lab, ALL_TUNNELLED)
    assert all(direct_routes(n) == {} for n in lab.nodes)
    n1, n2, _ = lab.nodes
    p1, p2 = add_pod(lab, n1, 1), add_pod(lab, n2, 1)
    cap = lab.capture(lab.router, n2.router_ifname, "udp port 8472", count=4, timeout=8)
    assert p1.ping(p2.ip, count=2, timeout=2, interval=0.2)
    lines = cap.wait().lines()
    assert any(f"{n1.public_ip}." in line and f"> {n2.public_ip}.8472:" in line for line in lines), lines
