"""vxlan-net-cni against Debian's reference bridge + host-local (Go), in the same run: medians and ratios.

Each side gets its own host namespace and fresh container namespaces; the
sides' calls are interleaved so machine noise hits all alike. Ours runs twice:
as deployed, with the agent's CNI socket served in its host namespace
(`python -m vxlan_net.agent.cni_service`, the agent's own service, so DEL hands the
veth to it), and with no agent (DEL deletes in-process: the fallback). Reports
ADD, CHECK, DEL, VERSION medians (n >= 20) and the wall time of 50
concurrent ADDs and DELs. Targets (issue 3): ADD <= 2.0x, DEL <= 1.0x (the
deployed case). Ratios are reported, not asserted; the run fails only when a
plugin fails. Run as root: `.venv/bin/python benchmarks/bench_cni.py [--runs N]`.
"""

import argparse
import concurrent.futures
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from cni_netns import REFERENCE_DIR, ROOT, AgentService, CniLab  # noqa: E402

from cni.plugin import host_veth_name  # noqa: E402

TARGETS = {"ADD": 2.0, "DEL": 1.0}
FALLBACK = " (no agent)"


class Side:
    def __init__(self, label, lab, conf, plugin, async_del=False):
        self.label, self.lab, self.conf, self.plugin = label, lab, conf, plugin
        self.async_del = async_del
        self.times = {}

    def settle(self, cid, timeout=5.0):
        """Untimed: wait until a DEL handed to the agent has deleted the veth, so that its deletion
        (which holds the kernel's rtnl lock for ~20 ms) is not charged to the next side's call."""
        if self.async_del:
            self.lab.wait_link_gone(host_veth_name(cid, "eth0"), timeout)

    def call(self, command, cid, netns, conf=None, plugin=None):
        start = time.perf_counter()
        rc, out, err = self.lab.run(command, conf or self.conf, cid=cid, netns=netns, plugin=plugin or self.plugin,
                                    timeout=120)
        elapsed = time.perf_counter() - start
        if rc != 0:
            raise SystemExit(f"{self.label} {command} {cid} failed: {out} {err}")
        return elapsed, out

    def timed(self, command, cid, netns, label=None, **kw):
        elapsed, out = self.call(command, cid, netns, **kw)
        self.times.setdefault(label or command, []).append(elapsed)
        return out


def make_sides(labs):
    ours_lab, ref_lab, fallback_lab = labs
    ours = Side("vxlan-net-cni", ours_lab, ours_lab.conf(), ours_lab.plugin, async_del=True)
    fallback = Side("vxlan-net-cni" + FALLBACK, fallback_lab, fallback_lab.conf(), fallback_lab.plugin)
    ref_conf = {"cniVersion": "1.0.0", "name": "podnet", "type": "bridge", "bridge": "cni0", "isGateway": True,
                "isDefaultGateway": True, "hairpinMode": True, "mtu": 1450,
                "ipam": {"type": "host-local", "dataDir": ref_lab.data_dir,
                         "ranges": [[{"subnet": "198.19.3.0/24", "gateway": "198.19.3.1"}]]}}
    ref = Side("bridge+host-local", ref_lab, ref_conf, os.path.join(REFERENCE_DIR, "bridge"))
    return ours, ref, fallback


def sequential(sides, runs):
    namespaces = {side.label: [side.lab.netns() for _ in range(runs + 1)] for side in sides}
    results = {}
    for side in sides:  # warm-up: creates the bridge, fills page caches
        ns = namespaces[side.label][runs]
        side.call("ADD", "warm", ns)
        side.call("DEL", "warm", ns)
        side.settle("warm")
    for i in range(runs):
        for side in sides:
            results[(side.label, i)] = side.timed("ADD", f"s{i}", namespaces[side.label][i])
    for i in range(runs):
        for side in sides:
            conf = dict(side.conf, cniVersion="1.0.0", prevResult=results[(side.label, i)])
            side.timed("CHECK", f"s{i}", namespaces[side.label][i], conf=conf)
    for i in range(runs):
        for side in sides:
            side.timed("DEL", f"s{i}", namespaces[side.label][i])
            side.settle(f"s{i}")
    for i in range(runs):
        for side in sides:
            side.timed("VERSION", "", "")


def concurrent_wall(side, count):
    namespaces = [side.lab.netns() for _ in range(count)]
    walls = {}
    for command in ("ADD", "DEL"):
        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(max_workers=count) as pool:
            list(pool.map(lambda i: side.call(command, f"p{i}", namespaces[i]), range(count)))
        walls[command] = time.perf_counter() - start
    for ns in namespaces:
        ns.delete()
        side.lab.namespaces.remove(ns)
    return walls


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=25, help="sequential calls per command and side (>= 20)")
    parser.add_argument("--concurrent", type=int, default=50)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench_cni needs root (network namespaces)")
    runs = max(20, args.runs)
    labs, service = [], None
    try:
        labs = [CniLab(), CniLab(), CniLab()]
        service = AgentService(labs[0])
        ours, ref, fallback = make_sides(labs)
        sequential((ours, ref, fallback), runs)
        script = os.path.join(ROOT, ".venv", "bin", "vxlan-net-cni")
        if os.access(script, os.X_OK):
            for _ in range(runs):
                ours.timed("VERSION", "", "", label="VERSION (console script)", plugin=script)
        walls = {side.label: concurrent_wall(side, args.concurrent) for side in (ours, ref)}
    finally:
        if service is not None:
            sys.stderr.write(service.stop())
        for lab in labs:
            lab.close()

    print(f"{'command':26} {'vxlan-net-cni':>14} {'bridge+host-local':>18} {'ratio':>7}  target  (median ms, n={runs})")
    report = {}
    rows = [(command, ours, command) for command in ("ADD", "CHECK", "DEL", "VERSION", "VERSION (console script)")]
    rows[3:3] = [("ADD" + FALLBACK, fallback, "ADD"), ("DEL" + FALLBACK, fallback, "DEL")]
    for command, side, key in rows:
        mine = statistics.median(side.times[key]) * 1000 if key in side.times else None
        theirs = statistics.median(ref.times.get(command.split(" ")[0], [0])) * 1000
        if mine is None:
            continue
        ratio = mine / theirs if theirs else float("nan")
        target = None if side is fallback else TARGETS.get(command)
        verdict = "" if target is None else (f"<= {target:.1f}x " + ("met" if ratio <= target else "MISSED"))
        print(f"{command:26} {mine:14.2f} {theirs:18.2f} {ratio:6.2f}x  {verdict}")
        report[command] = {"ours_ms": round(mine, 2), "reference_ms": round(theirs, 2), "ratio": round(ratio, 3)}
    for command in ("ADD", "DEL"):
        mine, theirs = walls[ours.label][command], walls[ref.label][command]
        print(f"{args.concurrent} concurrent {command:14} {mine * 1000:14.0f} {theirs * 1000:18.0f} "
              f"{mine / theirs:6.2f}x  (wall ms)")
        report[f"{args.concurrent} concurrent {command}"] = {"ours_ms": round(mine * 1000), "reference_ms":
                                                             round(theirs * 1000), "ratio": round(mine / theirs, 3)}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
