"""Agent resident memory with 0, 1,000 and 5,000 peers (leases in etcd before the agent starts).

Each count gets its own lab node, etcd prefix and fresh agent (--resync-interval 2), measured once
all routes are in the kernel and again after two periodic resyncs. The same run measures bare
interpreters importing the agent's modules, the baseline any agent pays. Prints sizes only;
exits non-zero only when something does not work.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _labbench import REPO, BenchFailure, Lab, against, probe, proc_status, result, run_main, wait_routes  # noqa: E402

from integration.cluster import node_subnet, write_config  # noqa: E402

PEER_COUNTS = tuple(int(n) for n in os.environ.get("BENCH_PEERS", "0,1000,5000").split(","))
SUBNET_LEN = 29  # 8,191 subnets of 198.19.0.0/16
RESYNC = 2.0
TARGET_MIB = 64  # issue 14: agent RSS with 5,000 peers
IMPORTS = [
    ("python, no import", ""),
    ("import grpc", "import grpc"),
    ("import pyroute2", "import pyroute2"),
    ("import vxlan_net.doors.store (etcd3+grpc)", "import vxlan_net.doors.store"),
    ("import vxlan_net.doors.kernel (pyroute2)", "import vxlan_net.doors.kernel"),
    ("import vxlan_net.agent.loop", "import vxlan_net.agent.loop"),
]
_SHOW = ("import re; s = open('/proc/self/status').read(); "
         "print(*(re.search(k + r':\\s+(\\d+)', s)[1] for k in ('VmRSS', 'VmHWM')))")


def mib(kib: int) -> str:
    return f"{kib / 1024:.1f}"


def import_baselines() -> list[tuple[str, int, int]]:
    """(label, VmRSS KiB, VmHWM KiB) of a fresh interpreter after each import; pure imports, no I/O."""
    rows = []
    for label, statement in IMPORTS:
        done = subprocess.run([sys.executable, "-c", f"{statement}\n{_SHOW}"], capture_output=True, text=True,
                              timeout=60, cwd=str(REPO))
        if done.returncode != 0:
            raise BenchFailure(f"{statement!r}: {done.stderr.strip()[-500:]}")
        rss, hwm = map(int, done.stdout.split())
        rows.append((label, rss, hwm))
    return rows


def data_breakdown(peers: int) -> dict:
    """tracemalloc sizes of the agent's per-peer structures, from a fresh interpreter."""
    done = subprocess.run([sys.executable, "-m", "benchmarks._memory_breakdown", str(peers)], capture_output=True,
                          text=True, timeout=120, cwd=str(REPO))
    if done.returncode != 0:
        raise BenchFailure(f"_memory_breakdown: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_agent(lab: Lab, index: int, peers: int) -> dict:
    node = lab.nodes[index]
    prefix = f"/vxn-mem-{peers}"
    write_config(lab, "--etcd-prefix", prefix, "--subnet-len", str(SUBNET_LEN))
    if peers:
        probe(node, "fill", lab.etcd_url, "--prefix", prefix, "--count", peers, "--subnet-len", SUBNET_LEN)
    started = time.monotonic()
    agent = lab.start_agent(node, "--etcd-prefix", prefix, "--resync-interval", str(RESYNC))
    lab.wait_for(lambda: node_subnet(node) or not agent.alive(), timeout=60, message="no subnet file")
    wait_routes(node, peers, timeout=120, agent=agent)
    converge = time.monotonic() - started
    cmdline = Path(f"/proc/{agent.pid}/cmdline").read_bytes()
    if b"vxlan-net" not in cmdline:  # `ip netns exec` execs the agent in place: same PID
        raise BenchFailure(f"PID {agent.pid} is not the agent: {cmdline!r}")
    at_convergence = proc_status(agent.pid)
    time.sleep(2 * RESYNC + 0.5)
    after_resyncs = proc_status(agent.pid)
    if not agent.alive():
        raise BenchFailure(f"agent exited: {agent.log_text()[-1500:]}")
    agent.stop()
    return {"peers": peers, "converge": converge, "conv": at_convergence, "after": after_resyncs}


def main() -> int:
    if os.geteuid() != 0:
        print("bench_memory needs root (it builds a lab of network namespaces)", file=sys.stderr)
        return 1
    imports = import_baselines()
    data = data_breakdown(max(PEER_COUNTS)) if max(PEER_COUNTS) else None
    runs = []
    with Lab(nodes=len(PEER_COUNTS)) as lab:
        for index, peers in enumerate(PEER_COUNTS):
            runs.append(measure_agent(lab, index, peers))
    bare = dict((label, rss) for label, rss, _ in imports)["import vxlan_net.agent.loop"]

    print("fresh interpreters (same run), MiB")
    print(f"  {'':40} {'VmRSS':>7} {'VmHWM':>7}")
    for label, rss, hwm in imports:
        print(f"  {label:40} {mib(rss):>7} {mib(hwm):>7}")
    print(f"\nagent (leases in etcd before start, --resync-interval {RESYNC:g}), MiB; "
          f"'over import' = VmRSS after resyncs minus a bare `import vxlan_net.agent.loop`")
    print(f"  {'peers':>6} {'start->routes':>13} {'RSS@conv':>9} {'RSS+2 resyncs':>13} {'VmHWM':>7} "
          f"{'over import':>11} {'threads':>7}")
    for run in runs:
        after = run["after"]
        print(f"  {run['peers']:>6} {run['converge']:>12.2f}s {mib(run['conv']['VmRSS']):>9} "
              f"{mib(after['VmRSS']):>13} {mib(after['VmHWM']):>7} {mib(after['VmRSS'] - bare):>11} "
              f"{thread_count(run):>7}")
    top = runs[-1]
    rss = top["after"]["VmRSS"]  # the target is the running agent's RSS; the start-up peak is shown beside it
    verdict = "meets" if rss <= TARGET_MIB * 1024 else "misses"
    print(f"\n{top['peers']} peers: VmRSS {mib(rss)} MiB: {verdict} the {TARGET_MIB} MiB target "
          f"(ratio {rss / 1024 / TARGET_MIB:.2f}); peak during start-up (VmHWM) {mib(top['after']['VmHWM'])} MiB; "
          f"bare import {mib(bare)} MiB")
    if data:
        print(f"\nwhat {data['peers']} peers' data costs (tracemalloc over the agent's functions, fresh "
              f"interpreter), MiB")
        for label, size in data["bytes"].items():
            print(f"  {label:50} {size / 2**20:6.2f}")
    for run in runs:
        if run is top:
            against("memory", f"agent RSS, {run['peers']} peers (HWM {mib(run['after']['VmHWM'])} MiB)",
                    run["after"]["VmRSS"] / 1024, TARGET_MIB, unit="MiB",
                    baseline=f"bare import {mib(bare)} MiB, 0 peers {mib(runs[0]['after']['VmRSS'])} MiB")
        else:
            result("memory", f"agent RSS / HWM, {run['peers']} peers",
                   f"{mib(run['after']['VmRSS'])} / {mib(run['after']['VmHWM'])} MiB")
    result("memory", "bare `import vxlan_net.agent.loop` RSS", f"{mib(bare)} MiB")
    return 0


def thread_count(run: dict) -> str:
    return str(run["after"].get("Threads", "-"))


if __name__ == "__main__":
    run_main(main)
