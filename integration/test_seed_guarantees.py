"""The seed's promises, seen on the wire: pods wired by vxlan-net-cni, packets decoded by scapy.

Pod to pod across nodes is VXLAN with our port and VNI and the pods' own addresses; pods on one
node never use the tunnel; only egress is masqueraded (with --ip-masq); the tunnel MTU is exact.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from integration.cluster import running_cluster
from integration.cni_pods import add_pod_via_cni

pytestmark = pytest.mark.lab

PORT, VNI, TUNNEL_MTU, UNDERLAY_MTU = 8472, 1, 1450, 1500
WRITES, TCP_PORT = 10_000, 5201
# A TCP receiver that counts every byte until the sender closes, and a sender of 1400-byte writes.
RECEIVER = f"""
import socket, sys
srv = socket.create_server((sys.argv[1], {TCP_PORT}))
srv.settimeout(20)
conn, _ = srv.accept()
conn.settimeout(20)
total = 0
while chunk := conn.recv(1 << 16):
    total += len(chunk)
print(total)
"""
SENDER = f"""
import socket, sys
s = socket.create_connection((sys.argv[1], {TCP_PORT}), timeout=20)
data = bytes(range(256)) * 5 + bytes(120)
for _ in range({WRITES}):
    s.sendall(data[:1400])
s.shutdown(socket.SHUT_WR)
s.recv(1)
"""
OUTSIDE_IP = "198.18.200.2"
# Any IPv4 fragment: MF set or a non-zero offset, on the outer header or on the one inside VXLAN
# (UDP 8 + VXLAN 8 + Ethernet 14 bytes in: the inner IP header's flags/offset at udp[36:2]).
FRAGMENTS = f"(ip[6:2] & 0x3fff != 0) or (udp dst port {PORT} and udp[36:2] & 0x3fff != 0)"


def _between(a, b) -> str:
    return f"host {a.public_ip} and host {b.public_ip}"


def _inner(frame):
    return frame["VXLAN"]["IP"]


def test_pod_to_pod_across_nodes_is_vxlan_with_our_vni_and_the_pods_own_addresses(lab):
    lab = lab(nodes=2)
    n1, n2 = running_cluster(lab)
    pod_a, pod_b = add_pod_via_cni(lab, n1, "a"), add_pod_via_cni(lab, n2, "b")
    # everything the two nodes send each other, seen on the router's link to node 2
    capture = lab.capture(lab.router, iface=n2.router_ifname, bpf=_between(n1, n2), count=50, timeout=8)
    assert pod_a.ping(pod_b.ip, count=3, timeout=3, interval=0.1)
    frames = capture.wait().packets()

    requests = [f for f in frames if f.haslayer("VXLAN") and f["VXLAN"].haslayer("ICMP")
                and f["VXLAN"]["ICMP"].type == 8]
    assert len(requests) == 3, [f.summary() for f in frames]
    for frame in frames:  # every frame: UDP to our port, our VNI, carrying IPv4 of the two pods
        assert frame.haslayer("UDP") and frame["UDP"].dport == PORT, frame.summary()
        assert frame.haslayer("VXLAN") and frame["VXLAN"].vni == VNI, frame.summary()
        assert {_inner(frame).src, _inner(frame).dst} == {pod_a.ip, pod_b.ip}, frame.summary()
    for frame in requests:  # no NAT: pod A's address to pod B's, between the nodes' addresses
        assert (_inner(frame).src, _inner(frame).dst) == (pod_a.ip, pod_b.ip)
        assert (frame["IP"].src, frame["IP"].dst) == (n1.public_ip, n2.public_ip)


def test_pods_on_the_same_node_never_use_the_tunnel(lab):
    lab = lab(nodes=2)
    n1, n2 = running_cluster(lab)
    pod_a, pod_a2 = add_pod_via_cni(lab, n1, "a"), add_pod_via_cni(lab, n1, "a2")
    pod_b = add_pod_via_cni(lab, n2, "b")
    # all of node 1's underlay traffic except its etcd connection and ARP for the router
    capture = lab.capture(n1, iface=n1.underlay_ifname, bpf=f"not arp and not host {lab.etcd_host.public_ip}",
                          count=100, timeout=8)
    assert pod_a.ping(pod_a2.ip, count=3, timeout=3, interval=0.1)
    assert pod_a2.ping(pod_a.ip, count=3, timeout=3, interval=0.1)
    # control: the same capture does see the tunnel when the peer is on another node
    assert pod_a.ping(pod_b.ip, count=1, timeout=3)
    frames = capture.wait().packets()

    tunnelled = [f for f in frames if f.haslayer("VXLAN")]
    assert tunnelled, "the capture saw no VXLAN frame at all, so it proves nothing"
    local = {pod_a.ip, pod_a2.ip}
    for frame in frames:
        assert frame.haslayer("VXLAN"), f"non-VXLAN traffic left the node: {frame.summary()}"
        assert _inner(frame).src in local | {pod_b.ip} and _inner(frame).dst in local | {pod_b.ip}
        assert {_inner(frame).src, _inner(frame).dst} != local, f"same-node traffic in the tunnel: {frame.summary()}"
    assert {(_inner(f).src, _inner(f).dst) for f in tunnelled} == {(pod_a.ip, pod_b.ip), (pod_b.ip, pod_a.ip)}


@pytest.mark.parametrize("masq", [True, False], ids=["ip-masq", "no-ip-masq"])
def test_egress_is_seen_outside_as_the_node_with_ip_masq_and_as_the_pod_without(lab, masq):
    lab = lab(nodes=1)
    (node,) = running_cluster(lab, *(["--ip-masq"] if masq else []))
    pod = add_pod_via_cni(lab, node, "a")
    capture = lab.capture(lab.outside, iface="ul0", bpf="icmp[icmptype] == icmp-echo", count=2, timeout=6)
    reply = pod.ping(OUTSIDE_IP, count=2, timeout=2, interval=0.1)
    packets = [p for p in capture.wait().packets() if p.haslayer("ICMP")]
    assert len(packets) == 2
    assert {p["IP"].src for p in packets} == ({node.public_ip} if masq else {pod.ip})
    assert {p["IP"].dst for p in packets} == {OUTSIDE_IP}
    # only the masqueraded pod gets an answer: the outside has no route to the pod network
    assert bool(reply) is masq


def test_full_size_tcp_and_icmp_at_the_tunnel_mtu_cross_unfragmented_and_one_byte_more_is_refused(lab):
    lab = lab(nodes=2)
    n1, n2 = running_cluster(lab)
    pod_a, pod_b = add_pod_via_cni(lab, n1, "a"), add_pod_via_cni(lab, n2, "b")
    assert pod_a.run("cat", "/sys/class/net/eth0/mtu").stdout.strip() == str(TUNNEL_MTU)
    fragments = lab.capture(lab.router, iface="any", bpf=f"({_between(n1, n2)}) and ({FRAGMENTS})", count=10,
                            timeout=30)

    # TCP, 1400-byte writes. Through veths the kernel passes whole 64 KB GSO packets, whose headers say nothing about the
    # size on a real wire; one segment per packet makes every TCP segment the size a NIC would send.
    for pod in (pod_a, pod_b):
        pod.run("ip", "link", "set", "dev", "eth0", "gso_max_segs", "1", check=True)
    sample = lab.capture(lab.router, iface=n2.router_ifname, bpf=f"udp dst port {PORT} and greater 1400",
                         count=30, timeout=10)
    receiver = pod_b.popen(sys.executable, "-c", RECEIVER, pod_b.ip, stdout=subprocess.PIPE, text=True)
    lab.wait_for(lambda: "LISTEN" in pod_b.run("ss", "-Hltn", "sport", "=", f":{TCP_PORT}").stdout, timeout=5,
                 interval=0.05, message="the receiver did not listen")
    sender = pod_a.run(sys.executable, "-c", SENDER, pod_b.ip, timeout=30)
    assert sender.returncode == 0, sender.stderr
    received, _ = receiver.communicate(timeout=15)
    assert int(received) == WRITES * 1400, "bytes lost on the way"
    full = [f for f in sample.wait().packets() if f.haslayer("VXLAN") and f["VXLAN"].haslayer("TCP")]
    assert full, "no full-size TCP segment crossed the router"
    for frame in full:
        inner = _inner(frame)
        assert (inner.src, inner.dst) == (pod_a.ip, pod_b.ip)
        assert inner.len <= TUNNEL_MTU and frame["IP"].len == inner.len + 50 <= UNDERLAY_MTU, frame.summary()
        assert not frame["IP"].flags.MF and frame["IP"].frag == 0
    assert max(_inner(f).len for f in full) == TUNNEL_MTU, "segments do not fill the tunnel MTU"
    assert max(len(_inner(f)["TCP"].payload) for f in full) >= 1398  # the MSS: 1450 - 40 - 12 (timestamps)

    # ICMP filling the tunnel MTU exactly, with DF: every reply comes back
    at_mtu = pod_a.ping(pod_b.ip, count=5, timeout=3, size=TUNNEL_MTU - 28, dont_fragment=True, interval=0.1)
    assert at_mtu and " 0% packet loss" in at_mtu.output, at_mtu.output
    assert f"{TUNNEL_MTU - 28 + 8} bytes from {pod_b.ip}" in at_mtu.output

    # one byte more with DF never leaves the pod: the pod's own stack refuses it at MTU 1450
    refused = pod_a.run("ping", "-n", "-c", "1", "-W", "2", "-M", "do", "-s", str(TUNNEL_MTU - 27), pod_b.ip)
    assert refused.returncode != 0
    assert f"message too long, mtu={TUNNEL_MTU}" in refused.stdout + refused.stderr, refused.stdout + refused.stderr

    assert fragments.stop().packets() == [], "IP fragments crossed the router"
