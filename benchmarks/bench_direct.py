"""Direct routing (issue 10): pod-to-pod TCP between two nodes of one L2 segment, in one run, through
the direct routes vxlan-net programs, through direct routes made by hand, and through the tunnel.

Three 2-node labs whose nodes share a segment: agents with DirectRouting on; agents with it off (the
tunnel); no agent, with `ip route add <peer subnet> via <peer PublicIP> dev ul0` typed by hand. Pods on
all three are wired by vxlan-net-cni. iperf3 runs alternate between the paths; medians are reported.
Targets (reported, not asserted; the run fails only when something does not work): vxlan-net direct /
hand-made direct >= 0.97, vxlan-net direct / tunnel >= 1.15. Tunnelled pairs against a hand-programmed
overlay are bench_dataplane's. Run as root: `.venv/bin/python benchmarks/bench_direct.py`.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._labbench import BenchFailure, result as bench_result, run_main  # noqa: E402
from benchmarks.bench_dataplane import ROUNDS, SECONDS, iperf, start_server  # noqa: E402
from integration.cluster import direct_routes, node_subnet, start_agents, write_config  # noqa: E402
from integration.cni_pods import add_pod_via_cni  # noqa: E402
from integration.lab import Lab, Node  # noqa: E402

MTU = 1450  # the pod MTU stays the tunnel's with direct routing, so the hand-made pods get it too
HAND_SUBNETS = {1: "198.19.1.0/24", 2: "198.19.2.0/24"}
PATHS = ("vxlan-net direct", "direct by hand", "vxlan-net tunnel")
TARGETS = {"direct by hand": 0.97, "vxlan-net tunnel": 1.15}


def direct_by_hand(nodes: list[Node]) -> None:
    """The direct route per peer typed as iproute2 commands, plus the subnet file the CNI reads."""
    for node in nodes:
        network = HAND_SUBNETS[node.index].split("/")[0]
        node.subnet_file.write_text(f"VXLAN_NET_NETWORK=198.19.0.0/16\nVXLAN_NET_SUBNET={network[:-1]}1/24\n"
                                    f"VXLAN_NET_MTU={MTU}\nVXLAN_NET_IPMASQ=false\n")
        node.sysctl("net.ipv4.ip_forward", 1)
        for peer in nodes:
            if peer is not node:
                node.run("ip", "route", "add", HAND_SUBNETS[peer.index], "via", peer.public_ip, "dev",
                         node.underlay_ifname, check=True)


def agents(lab: Lab, direct: bool) -> None:
    write_config(lab, *(["--direct-routing"] if direct else []))
    start_agents(lab, lab.nodes)
    n1, n2 = lab.nodes
    lab.wait_for(lambda: (str(node_subnet(n2)) in direct_routes(n1)) == direct, timeout=15,
                 message=f"node 1 did not route node 2 {'directly' if direct else 'through the tunnel'}")


def main() -> int:
    if os.geteuid() != 0:
        print("bench_direct needs root (it builds labs of network namespaces)", file=sys.stderr)
        return 1
    started = time.monotonic()
    shared = [(1, 2)]
    with Lab(nodes=2, shared_segments=shared) as direct, Lab(nodes=2, shared_segments=shared) as tunnel, \
            Lab(nodes=2, etcd=False, shared_segments=shared) as hand:
        agents(direct, True)
        agents(tunnel, False)
        direct_by_hand(hand.nodes)
        paths = {}
        for name, lab in zip(PATHS, (direct, hand, tunnel)):
            a, b = add_pod_via_cni(lab, lab.nodes[0], "a"), add_pod_via_cni(lab, lab.nodes[1], "b")
            if not a.ping(b.ip, count=1, timeout=3):
                raise BenchFailure(f"{name}: {a.name} cannot reach {b.ip}")
            start_server(b, b.ip, lab)
            paths[name] = (a, b.ip)
        gbits: dict[str, list[float]] = {name: [] for name in PATHS}
        for round_no in range(ROUNDS):
            order = list(PATHS) if round_no % 2 == 0 else list(reversed(PATHS))
            for name in order:
                gbits[name].append(iperf(*paths[name]))
                print(f"  round {round_no + 1}: {name:17} {gbits[name][-1]:6.2f} Gbit/s", flush=True)
    medians = {name: statistics.median(runs) for name, runs in gbits.items()}
    print(f"\npod-to-pod TCP between two nodes of one segment (iperf3 -t {SECONDS}, alternating runs, median)")
    for name in PATHS:
        print(f"{name:17} {medians[name]:7.2f} Gbit/s  ({', '.join(f'{g:.2f}' for g in gbits[name])})")
        bench_result("direct", f"{name} TCP Gbit/s (median)", f"{medians[name]:.2f}")
    for other, target in TARGETS.items():
        ratio = medians["vxlan-net direct"] / medians[other]
        print(f"vxlan-net direct / {other}: {ratio:.3f} ({'meets' if ratio >= target else 'below'} the target "
              f">= {target})")
        bench_result("direct", f"TCP throughput vxlan-net direct / {other}", f"{ratio:.3f}", f">= {target}")
    print(f"whole run {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    run_main(main)
