"""Data plane: pod-to-pod TCP throughput and RTT through the overlay vxlan-net programmed, in one run
against the same overlay programmed by hand with iproute2 and against the bare underlay; for IPv4 and
then for IPv6.

IPv4: two 2-node labs: in one the agents program `vxnet.1`; in the other nodes carry a `vxnet.1` made by
`ip link add ... type vxlan ... nolearning` with its neighbour, FDB and route entries added by hand
(same VNI, port, MTU). Pods on both are wired by vxlan-net-cni, so only the overlay's programming
differs. iperf3 runs (5 s each) alternate between the paths; medians are reported. The ratio
ours / hand-programmed has a target of >= 0.97 (issue 4).

IPv6 (issue 11, target >= 0.95): the same over a dual-stack underlay (fd18::) with a dual-stack pod
network (fd19::/56): the agents' `vxnet6.1` (over the IPv6 underlay, MTU 1430) against a `vxnet6.1`
made and filled by hand (plus the IPv4 `vxnet.1`, so both clusters have the same dual-stack pods and
MTU), `iperf3 -6` between the pods' IPv6 addresses; the underlay row is node to node over fd18::.

Ratios are reported, not asserted: the run fails only when something does not work. Run as root:
`.venv/bin/python benchmarks/bench_dataplane.py [--family 4|6|both]` (default both).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dataclasses import dataclass  # noqa: E402

from benchmarks._labbench import VTEP, BenchFailure, result as bench_result, run_main  # noqa: E402
from integration.cluster import DUAL_STACK_CONFIG, running_cluster  # noqa: E402
from integration.cni_pods import add_pod_via_cni  # noqa: E402
from integration.lab import Lab, Netns, Node  # noqa: E402

ROUNDS = int(os.environ.get("BENCH_ROUNDS", 4))  # ours and hand every round, the underlay every other
SECONDS = int(os.environ.get("BENCH_SECONDS", 5))
PINGS = 100
VNI, PORT, MTU = 1, 8472, 1450
VTEP6, MTU6 = "vxnet6.1", 1430  # the IPv6 underlay's 70 bytes of overhead
HAND_SUBNETS = {1: "198.19.1.0/24", 2: "198.19.2.0/24"}
HAND_SUBNETS6 = {1: "fd19:0:0:1::/64", 2: "fd19:0:0:2::/64"}
PATHS = ("vxlan-net", "by hand", "underlay")


@dataclass(frozen=True)
class Family:
    """One comparison: which pod/underlay address family, over which lab underlay and VTEP."""

    version: int
    underlay: str  # the Lab's underlay
    vtep: str  # the device the pods' traffic of this family crosses
    target: float

    @property
    def label(self) -> str:
        return f"IPv{self.version}"


FAMILIES = {4: Family(4, "v4", VTEP, 0.97), 6: Family(6, "dual", VTEP6, 0.95)}


def result(metric: str, value: str, target: str = "") -> None:
    bench_result("dataplane", metric, value, target)


def hand_mac(node: Node, version: int = 4) -> str:
    return f"0e:00:00:00:{version:02x}:{node.index:02x}"


def program_by_hand(nodes: list[Node], ipv6: bool = False) -> None:
    """What the agent programs (core/desired.py: VTEP, neighbour, FDB entry and route per peer) typed as
    iproute2 commands, plus the subnet file the CNI reads. `ipv6`: a dual-stack pod network, the IPv6 half
    over `vxnet6.1` on the IPv6 underlay (the IPv4 half stays on `vxnet.1`); pods get the smaller MTU."""
    for node in nodes:
        subnet = HAND_SUBNETS[node.index]
        network = subnet.split("/")[0]
        lines = [f"VXLAN_NET_NETWORK=198.19.0.0/16\nVXLAN_NET_SUBNET={network[:-1]}1/24\n"]
        if ipv6:
            gateway6 = ipaddress.ip_network(HAND_SUBNETS6[node.index]).network_address + 1
            lines.append(f"VXLAN_NET_IPV6_NETWORK=fd19::/56\nVXLAN_NET_IPV6_SUBNET={gateway6}/64\n")
        lines.append(f"VXLAN_NET_MTU={MTU6 if ipv6 else MTU}\nVXLAN_NET_IPMASQ=false\n")
        node.subnet_file.write_text("".join(lines))
        node.sysctl("net.ipv4.ip_forward", 1)
        _hand_vtep(node, nodes, VTEP, MTU, node.public_ip, HAND_SUBNETS, lambda peer: peer.public_ip, 4)
        if ipv6:
            node.sysctl("net.ipv6.conf.all.forwarding", 1)
            _hand_vtep(node, nodes, VTEP6, MTU6, node.public_ipv6, HAND_SUBNETS6, lambda peer: peer.public_ipv6, 6)


def _hand_vtep(node: Node, nodes: list[Node], vtep: str, mtu: int, local: str, subnets: dict, public_of,
               version: int) -> None:
    """One VTEP over the underlay of `local`'s family and, per peer, the entries for its subnet in `subnets`:
    neighbour <subnet address> -> peer MAC, FDB peer MAC -> peer's public address, route via that address."""
    own = ipaddress.ip_network(subnets[node.index]).network_address
    node.ip_batch([f"link add {vtep} address {hand_mac(node, version)} mtu {mtu} type vxlan id {VNI} dstport {PORT} "
                   f"local {local} dev {node.underlay_ifname} nolearning",
                   f"addr add {own}/{own.max_prefixlen} dev {vtep}", f"link set {vtep} up"])
    for peer in nodes:
        if peer is node:
            continue
        gateway = str(ipaddress.ip_network(subnets[peer.index]).network_address)
        node.run("ip", "neigh", "add", gateway, "lladdr", hand_mac(peer, version), "dev", vtep, "nud", "permanent",
                 check=True)
        node.run("bridge", "fdb", "append", hand_mac(peer, version), "dev", vtep, "dst", public_of(peer), "self",
                 "permanent", check=True)
        node.run("ip", "route", "add", subnets[peer.index], "via", gateway, "dev", vtep, "onlink", check=True)


def vtep_details(node: Node, vtep: str = VTEP) -> dict:
    """The VXLAN attributes that shape the data path, as `ip -d -j link` shows them."""
    link = node.ip_json("-d", "link", "show", "dev", vtep)[0]
    data = link["linkinfo"]["info_data"]
    keep = ("id", "port", "learning", "ttl", "df", "udp_csum", "udp_zero_csum6_tx", "udp_zero_csum6_rx", "tos")
    return {"mtu": link["mtu"], **{k: data.get(k) for k in keep}}


def iperf(client: Netns, server_ip: str) -> float:
    """Gbit/s the receiver saw in one `iperf3 -t SECONDS -J` run."""
    try:
        family = ["-6"] if ipaddress.ip_address(server_ip).version == 6 else []
        proc = client.run("iperf3", *family, "-c", server_ip, "-t", str(SECONDS), "-J", timeout=SECONDS + 20)
    except subprocess.TimeoutExpired:
        raise BenchFailure(f"iperf3 from {client.name} to {server_ip} did not finish") from None
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise BenchFailure(f"iperf3 from {client.name} to {server_ip}: {proc.stdout[-400:]} {proc.stderr}") from None
    if proc.returncode != 0 or "error" in report:
        raise BenchFailure(f"iperf3 from {client.name} to {server_ip}: {report.get('error', proc.stderr)}")
    return report["end"]["sum_received"]["bits_per_second"] / 1e9


def ping_rtts(client: Netns, dst: str) -> list[float]:
    """RTTs (ms) of PINGS echo requests sent 10 ms apart; fails if any is lost."""
    family = ["-6"] if ipaddress.ip_address(dst).version == 6 else []
    proc = client.run("ping", *family, "-n", "-c", str(PINGS), "-i", "0.01", "-W", "1", dst,
                      timeout=PINGS * 0.01 + 15)
    rtts = [float(t) for t in re.findall(r"time=([\d.]+) ms", proc.stdout)]
    if len(rtts) != PINGS:
        raise BenchFailure(f"ping {client.name} -> {dst}: {len(rtts)}/{PINGS} replies")
    return rtts


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, -(-len(ordered) * 99 // 100) - 1)]  # nearest rank


def start_server(ns: Netns, ip: str, lab: Lab) -> None:
    ns.popen("iperf3", "-s", "-B", ip, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lab.wait_for(lambda: "LISTEN" in ns.run("ss", "-Hltn", "sport", "=", ":5201").stdout, timeout=5,
                 interval=0.05, message=f"iperf3 server in {ns.name} did not listen")


def measure(family: Family) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Both labs up, the paths checked, then the alternated iperf3 rounds and the ping series."""
    v6 = family.version == 6
    with Lab(nodes=2, underlay=family.underlay) as ours, Lab(nodes=2, etcd=False, underlay=family.underlay) as hand:
        running_cluster(ours, config=DUAL_STACK_CONFIG if v6 else None)
        program_by_hand(hand.nodes, ipv6=v6)
        pod_a, pod_b = add_pod_via_cni(ours, ours.nodes[0], "a"), add_pod_via_cni(ours, ours.nodes[1], "b")
        hand_a, hand_b = add_pod_via_cni(hand, hand.nodes[0], "a"), add_pod_via_cni(hand, hand.nodes[1], "b")
        n1, n2 = ours.nodes
        if v6:
            paths = {"vxlan-net": (pod_a, pod_b.ip6), "by hand": (hand_a, hand_b.ip6), "underlay": (n1, n2.public_ipv6)}
        else:
            paths = {"vxlan-net": (pod_a, pod_b.ip), "by hand": (hand_a, hand_b.ip), "underlay": (n1, n2.public_ip)}
        for name, (client, dst) in paths.items():
            if dst is None:
                raise BenchFailure(f"{name}: the server side has no {family.label} address")
            if not client.ping(dst, count=1, timeout=3):
                raise BenchFailure(f"{name}: {client.name} cannot reach {dst}")
        for name, node in (("vxlan-net", n1), ("by hand", hand.nodes[0])):  # the same device on both sides
            dev = node.ip_json(f"-{family.version}", "route", "get", paths[name][1])[0].get("dev")
            if dev != family.vtep:
                raise BenchFailure(f"{name}: {node.name} routes {paths[name][1]} over {dev}, not {family.vtep}")
        ours_vtep, hand_vtep = vtep_details(n1, family.vtep), vtep_details(hand.nodes[0], family.vtep)
        if ours_vtep != hand_vtep:
            print(f"note: the devices differ: vxlan-net {ours_vtep}, by hand {hand_vtep}")
        for lab, name in ((ours, "vxlan-net"), (hand, "by hand"), (ours, "underlay")):
            server = {"vxlan-net": pod_b, "by hand": hand_b, "underlay": n2}[name]
            start_server(server, paths[name][1], lab)

        gbits: dict[str, list[float]] = {name: [] for name in PATHS}
        for round_no in range(ROUNDS):
            # ours and hand take turns going first, so neither always follows the underlay run
            order = ["vxlan-net", "by hand"] if round_no % 2 == 0 else ["by hand", "vxlan-net"]
            for name in order + (["underlay"] if round_no % 2 == 0 else []):
                gbits[name].append(iperf(*paths[name]))
                print(f"  {family.label} round {round_no + 1}: {name:10} {gbits[name][-1]:6.2f} Gbit/s", flush=True)
        rtts = {name: ping_rtts(*paths[name]) for name in PATHS}
    return gbits, rtts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=("4", "6", "both"), default="both",
                        help="IPv4 (vxnet.1), IPv6 (vxnet6.1 over an IPv6 underlay) or both, in that order")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_dataplane needs root (it builds labs of network namespaces)", file=sys.stderr)
        return 1
    for version in (4, 6) if args.family == "both" else (int(args.family),):
        started = time.monotonic()
        print(f"== {FAMILIES[version].label}", flush=True)
        gbits, rtts = measure(FAMILIES[version])
        report(FAMILIES[version], gbits, rtts, time.monotonic() - started)
    return 0


def report(family: Family, gbits: dict[str, list[float]], rtts: dict[str, list[float]], elapsed: float) -> None:
    labels = {"vxlan-net": "pod to pod, overlay vxlan-net programmed", "by hand": "pod to pod, overlay programmed "
              "by hand", "underlay": "node to node, underlay"}
    # IPv4's metric names are kept as they were (earlier runs' tables stay comparable); IPv6's say so
    tag = "" if family.version == 4 else f"{family.label} "
    print(f"\n{family.label}: TCP (iperf3 -t {SECONDS}, alternating runs, median) and ping RTT ({PINGS} x 10 ms apart)")
    runs_of = {name: ", ".join(f"{g:.2f}" for g in gbits[name]) for name in PATHS}
    width = max(26, *map(len, runs_of.values()))  # BENCH_ROUNDS=8 still lines up
    print(f"{'path':43} {'Gbit/s':>7}  {'runs':{width}} {'RTT min':>8} {'avg':>6} {'p99 ms':>7}")
    medians = {name: statistics.median(runs) for name, runs in gbits.items()}
    for name in PATHS:
        runs = runs_of[name]
        rtt = rtts[name]
        print(f"{labels[name]:43} {medians[name]:7.2f}  {runs:{width}} {min(rtt):8.3f} {statistics.mean(rtt):6.3f} "
              f"{p99(rtt):7.3f}")
        result(f"{tag}{name} TCP Gbit/s (median) | RTT min/avg/p99 ms", f"{medians[name]:.2f} | {min(rtt):.3f}/"
               f"{statistics.mean(rtt):.3f}/{p99(rtt):.3f}")
    ratio = medians["vxlan-net"] / medians["by hand"]
    # each round's pair ran back to back, so its ratio is less exposed to the machine's slow swings
    paired = [o / h for o, h in zip(gbits["vxlan-net"], gbits["by hand"])]
    verdict = "meets" if ratio >= family.target else "below"
    print(f"\n{family.label} vxlan-net / hand-programmed: {ratio:.3f} ({verdict} the target >= {family.target}); "
          f"per round {', '.join(f'{r:.2f}' for r in paired)} (median {statistics.median(paired):.3f}); "
          f"overlay / underlay: {medians['vxlan-net'] / medians['underlay']:.3f}; whole run {elapsed:.0f} s")
    result(f"{tag}TCP throughput vxlan-net / hand-programmed overlay", f"{ratio:.3f}", f">= {family.target}")


if __name__ == "__main__":
    run_main(main)
