"""`make demo`: a 3-node dual-stack vxlan-net cluster in network namespaces, shown working, then removed.

The underlay has IPv4 (198.18.<i>.0/24) and IPv6 (fd18:0:0:<i>::/64); the pod network both
198.19.0.0/16 and fd19::/56, so every pod gets one address of each family and the ping matrix is
shown (and must be complete) for IPv4 and for IPv6.

Usage: python -m integration.demo [--nodes N] [--pods-per-node K] [--keep]
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time

from integration.cluster import (DUAL_STACK_CONFIG, direct_routes, node_subnet, node_subnets, put_config, start_agents,
                                 wait_converged)
from integration.cni_pods import add_pod_via_cni
from integration.lab import Lab

OK, FAIL = "\u2713", "\u2717"


class Step:
    """Prints `[n] what ...` and the outcome; remembers the step for the failure message."""

    current = "start-up"

    def __init__(self, title: str):
        Step.current = title
        self.title = title

    def __enter__(self):
        print(f"==> {self.title} ...", flush=True)
        self.started = time.monotonic()
        return self

    def __exit__(self, kind, exc, tb):
        if kind is None:
            print(f"    done in {time.monotonic() - self.started:.1f}s", flush=True)


def connectivity_matrix(pods, family: int = 4) -> tuple[str, int]:
    """Every pod pings every other pod once over IPv`family` (ping / ping -6): a table of RTTs (ms) or failures."""
    names = [p.pod_name for p in pods]
    width = max(max(len(n) for n in names), 8) + 2
    lines = [" " * width + "".join(n.rjust(width) for n in names)]
    failures = 0
    for src in pods:
        cells = []
        for dst in pods:
            if src is dst:
                cells.append("-".rjust(width))
                continue
            address = dst.ip6 if family == 6 else dst.ip
            result = src.ping(address, count=1, timeout=2) if address else None  # a pod without it: a failure
            failures += not result
            cells.append((f"{OK} {result.rtt_ms:.2f}" if result else f"{FAIL}").rjust(width))
        lines.append(src.pod_name.ljust(width) + "".join(cells))
    return "\n".join(lines), failures


def inspect_one_frame(lab: Lab, src, dst, family: int = 4) -> str:
    """Start `vxlan-net inspect --count 1` on the source's node, ping once (over IPv`family`), return its line."""
    node, address = src.node, dst.ip6 if family == 6 else dst.ip
    capture = node.popen(lab.agent_exe, "inspect", "--iface", "ul0", "--count", "1", "--timeout", "20",
                         "--filter", f"pod {address}", "--etcd-endpoints", lab.etcd_url,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = ""
    for _ in range(30):  # bounded: the capture needs a moment to start (scapy import); ping until it reports
        src.ping(address, count=1, timeout=1)
        if capture.poll() is not None:
            break
        time.sleep(0.5)
    try:
        out, err = capture.communicate(timeout=25)
    except subprocess.TimeoutExpired:
        capture.kill()
        out, err = capture.communicate()
    return out.strip() or f"(no frame decoded: {err.strip()[-200:]})"


def routing_modes(lab: Lab) -> str:
    """Which node pairs go direct and which through the tunnel, from each node's `ip route` (both families:
    one word when they agree, each family's otherwise)."""
    lines = []
    for node in lab.nodes:
        direct = direct_routes(node)
        for other in lab.nodes:
            if other is not node:
                modes = {subnet.version: "direct" if direct.get(str(subnet)) in (other.public_ip, other.public_ipv6)
                         else "VXLAN tunnel" for subnet in node_subnets(other)}
                mode = modes.popitem()[1] if len(set(modes.values())) == 1 else \
                    ", ".join(f"IPv{version} {m}" for version, m in sorted(modes.items()))
                lines.append(f"    {node.name} -> {other.name} ({other.public_ip}, {other.public_ipv6}): {mode}")
    return "\n".join(lines)


def run(args) -> int:
    # Nodes 1 and 2 share an L2 segment when there is a third node behind the router to contrast them with.
    shared = [(1, 2)] if args.nodes >= 3 else []
    with Lab(nodes=args.nodes, shared_segments=shared, underlay="dual") as lab:
        layout = ("nodes 1 and 2 on one L2 segment (198.18.1.0/24, fd18:0:0:1::/64), the others on their own "
                  "segment behind the router" if shared else
                  "on separate underlay segments (198.18.<i>.0/24, fd18:0:0:<i>::/64), L3 only")
        print(f"lab {lab.tag}: router {lab.router.name}, etcd {lab.etcd_url}, {args.nodes} nodes with a dual-stack "
              f"underlay, {layout}")
        with Step("writing the dual-stack network config to etcd" + (" (direct routing on)" if shared else "")):
            backend = {**DUAL_STACK_CONFIG["Backend"], **({"DirectRouting": True} if shared else {})}
            put_config(lab, {**DUAL_STACK_CONFIG, "Backend": backend})
            print("    " + lab.nodes[0].run(lab.agent_exe, "config", "get", "--etcd-endpoints", lab.etcd_url,
                                          check=True).stdout.strip())
        with Step(f"starting vxlan-net agent on {args.nodes} nodes (--ip-masq)"):
            start_agents(lab, lab.nodes, "--ip-masq")
            wait_converged(lab, lab.nodes)
            for node in lab.nodes:
                env = node.subnet_env()
                print(f"    {node.name}: " + " ".join(f"{key}={env.get(key)}" for key in
                                                   ("VXLAN_NET_SUBNET", "VXLAN_NET_IPV6_SUBNET", "VXLAN_NET_MTU")))
        if shared:
            with Step("which node pairs route directly (no encapsulation) and which tunnel"):
                print(routing_modes(lab))
        with Step(f"starting {args.pods_per_node} pods per node through the CNI plugin (vxlan-net-cni ADD)"):
            pods = [add_pod_via_cni(lab, node, f"n{node.index}p{i}") for node in lab.nodes
                    for i in range(1, args.pods_per_node + 1)]
            for pod in pods:
                print(f"    {pod.pod_name:8} {pod.ip!s:15} {pod.ip6!s:22} on {pod.node.name}")
        failures = {}
        for family, tool in ((4, "ping"), (6, "ping -6")):
            with Step(f"IPv{family}: pinging every pod from every pod ({tool}, RTT in ms)"):
                matrix, failures[family] = connectivity_matrix(pods, family)
                print(matrix)
        with Step("lease table and this node's kernel (vxlan-net status on node 1)"):
            status = lab.nodes[0].run(lab.agent_exe, "status", "--etcd-endpoints", lab.etcd_url)
            print("\n".join("    " + line for line in status.stdout.splitlines()))
        # The inspect and probe steps show the tunnel: a pod on a node node 1 tunnels to.
        tunnelled = {str(node_subnet(n)) for n in lab.nodes} - set(direct_routes(lab.nodes[0]))
        remote = next((p for p in pods if p.node is not pods[0].node and str(node_subnet(p.node)) in tunnelled),
                      None)
        if remote is not None:
            with Step(f"one VXLAN frame per family on node 1's underlay, decoded by `vxlan-net inspect` "
                      f"({pods[0].pod_name} -> {remote.pod_name}: ping over vxnet.1, ping -6 over vxnet6.1)"):
                for family in (4, 6):
                    print("    " + inspect_one_frame(lab, pods[0], remote, family))
        with Step("vxlan-net doctor on node 1" + (f" (with --probe {remote.ip})" if remote else "")):
            doctor = lab.nodes[0].run(lab.agent_exe, "doctor", "--etcd-endpoints", lab.etcd_url,
                                      "--subnet-file", str(lab.nodes[0].subnet_file),
                                      "--state-dir", str(lab.nodes[0].state_dir),
                                      *(["--probe", remote.ip] if remote else []), timeout=60)
            print("\n".join("    " + line for line in (doctor.stdout + doctor.stderr[-2000:]).splitlines()))
        pairs = len(pods) * (len(pods) - 1)
        for family, failed in failures.items():
            print(f"{OK} all {pairs} pod pairs reach each other over IPv{family}" if not failed else
                  f"{FAIL} {failed} of {pairs} pod pairs cannot reach each other over IPv{family}")
        print(f"{OK} doctor: every check holds" if doctor.returncode == 0 else f"{FAIL} doctor found problems")
        if args.keep:
            _hold(lab)
        return 0 if not any(failures.values()) and status.returncode == 0 and doctor.returncode == 0 else 1


def _hold(lab: Lab) -> None:
    print(f"""
The lab stays up until you press Ctrl-C (or send SIGTERM to PID {__import__('os').getpid()}).
Explore it, for example:
  ip netns list | grep {lab.prefix}
  ip netns exec {lab.nodes[0].name} ip -d link show vxnet.1      # the VTEP over the IPv4 underlay
  ip netns exec {lab.nodes[0].name} ip -d link show vxnet6.1     # and over the IPv6 one
  ip netns exec {lab.nodes[0].name} bridge fdb show dev vxnet.1
  ip netns exec {lab.nodes[0].name} {lab.agent_exe} status --etcd-endpoints {lab.etcd_url}
  ls {lab.nodes[0].workdir / "cni" / "podnet"}    # the CNI plugin's address reservations on node 1
Ctrl-C tears everything down.""", flush=True)
    try:
        signal.pause()
    except KeyboardInterrupt:
        print("tearing down ...")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="make demo", description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--pods-per-node", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the lab up until Ctrl-C")
    args = parser.parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:
        print(f"\ninterrupted during: {Step.current}; everything was cleaned up", file=sys.stderr)
        return 130
    except Exception as exc:  # the lab is already torn down by its context manager here
        print(f"\n{FAIL} demo failed while {Step.current}: {exc}", file=sys.stderr)
        print("everything the demo created was removed", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
