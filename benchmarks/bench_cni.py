"""vxlan-net-cni against Debian's reference bridge + host-local (Go), in the same run: medians and ratios.

Plugins are started the way runtimes start them: exec of the file in the CNI
bin dir (vfork, no Python in the child: the spawning thread has entered the
side's host namespace), env + stdin. Ours runs through the launcher
`vxlan-net install-cni --copy-plugin` writes (the DaemonSet's: the host's
python3, a copy of the plugin) and through `python -m cni.install`'s (this
checkout, the venv's interpreter). Each side gets its own host namespace and
fresh container namespaces; the sides' calls are interleaved so machine noise
hits all alike. Ours is measured as deployed, with the agent's CNI socket
served in its host namespace (`python -m vxlan_net.agent.cni_service`, so DEL
hands the veth to it), and with no agent (DEL deletes in-process: the
fallback). Reports ADD, CHECK, DEL, VERSION medians (n >= 20), VERSION against
a bare `python3 -I -S -c pass` of the launcher's own interpreter measured in
the same loop, and the wall time of 50 concurrent ADDs and DELs. Targets
(issues 3, 12): ADD <= 2.0x, DEL <= 1.0x (the deployed case), VERSION <= 2.0x
the bare interpreter. Ratios are reported, not asserted; the run fails only
when a plugin fails. Run as root: `.venv/bin/python benchmarks/bench_cni.py [--runs N]`.
"""

import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT_DIR, "tests"))

from cni_netns import REFERENCE_DIR, ROOT, AgentService, CniLab  # noqa: E402

from cni.install import install as install_launcher  # noqa: E402
from cni.plugin import host_veth_name  # noqa: E402
from vxlan_net.tools.install_cni import install_plugin  # noqa: E402

TARGETS = {"ADD": 2.0, "DEL": 1.0}
VERSION_TARGET = 2.0  # x a bare interpreter start (issue 12)
FALLBACK = " (no agent)"
LOCAL = " (local launcher)"
HOST_PYTHON = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable


class Side:
    """One plugin in one lab; calls run from a thread that has entered the lab's host namespace."""

    def __init__(self, label, lab, conf, plugin, async_del=False, tag="s"):
        self.label, self.lab, self.conf, self.plugin = label, lab, conf, plugin
        self.async_del, self.tag = async_del, tag
        self.times = {}
        self.host = concurrent.futures.ThreadPoolExecutor(1, initializer=lab.in_host)
        with open(plugin, "rb") as fh:
            first = fh.readline()
        # The launcher's interpreter (its #! line), or None for a binary.
        self.interpreter = first[2:].split()[0].decode() if first.startswith(b"#!") else None

    def settle(self, cid, timeout=5.0):
        """Untimed: wait until a DEL handed to the agent has deleted the veth, so that its deletion
        (which holds the kernel's rtnl lock for ~20 ms) is not charged to the next side's call."""
        if self.async_del:
            self.lab.wait_link_gone(host_veth_name(cid, "eth0"), timeout)

    def spawn(self, argv, command, cid, netns, conf=None):
        """Exec argv in the calling thread's netns; (seconds, parsed stdout). Call from a host-namespace thread."""
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "CNI_COMMAND": command, "CNI_CONTAINERID": cid,
               "CNI_IFNAME": "eth0", "CNI_PATH": f"{self.lab.bin_dir}:{REFERENCE_DIR}",
               "CNI_NETNS": netns.path if netns else ""}
        data = json.dumps(conf or self.conf).encode()
        start = time.perf_counter()
        proc = subprocess.run(argv, env=env, input=data, capture_output=True, timeout=120)
        elapsed = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"{self.label} {command} {cid} failed: {proc.stdout!r} {proc.stderr!r}")
        return elapsed, (json.loads(proc.stdout) if proc.stdout.strip() else None)

    def call(self, command, cid, netns, conf=None, argv=None):
        return self.host.submit(self.spawn, argv or [self.plugin], command, cid, netns, conf).result()

    def timed(self, command, cid, netns, label=None, **kw):
        elapsed, out = self.call(command, cid, netns, **kw)
        self.times.setdefault(label or command, []).append(elapsed)
        return out

    def close(self):
        self.host.shutdown()


def make_sides(labs):
    ours_lab, ref_lab, fallback_lab = labs
    plugins = [str(install_plugin(Path(lab.bin_dir), copy=True, host_python=HOST_PYTHON))
               for lab in (ours_lab, fallback_lab)]
    ours = Side("vxlan-net-cni", ours_lab, ours_lab.conf(), plugins[0], async_del=True)
    local_dir = os.path.join(ours_lab.tmp, "local-bin")
    local = Side("vxlan-net-cni" + LOCAL, ours_lab, ours_lab.conf(), install_launcher(local_dir), async_del=True,
                 tag="l")
    fallback = Side("vxlan-net-cni" + FALLBACK, fallback_lab, fallback_lab.conf(), plugins[1])
    ref_conf = {"cniVersion": "1.0.0", "name": "podnet", "type": "bridge", "bridge": "cni0", "isGateway": True,
                "isDefaultGateway": True, "hairpinMode": True, "mtu": 1450,
                "ipam": {"type": "host-local", "dataDir": ref_lab.data_dir,
                         "ranges": [[{"subnet": "198.19.3.0/24", "gateway": "198.19.3.1"}]]}}
    ref = Side("bridge+host-local", ref_lab, ref_conf, os.path.join(REFERENCE_DIR, "bridge"))
    return ours, ref, fallback, local


def sequential(sides, runs):
    namespaces = {side.label: [side.lab.netns() for _ in range(runs + 1)] for side in sides}
    results = {}
    for side in sides:  # warm-up: creates the bridge, fills page caches, writes the copy's bytecode
        ns = namespaces[side.label][runs]
        side.call("ADD", side.tag + "warm", ns)
        side.call("DEL", side.tag + "warm", ns)
        side.settle(side.tag + "warm")
    for i in range(runs):
        for side in sides:
            results[(side.label, i)] = side.timed("ADD", f"{side.tag}{i}", namespaces[side.label][i])
    for i in range(runs):
        for side in sides:
            conf = dict(side.conf, cniVersion="1.0.0", prevResult=results[(side.label, i)])
            side.timed("CHECK", f"{side.tag}{i}", namespaces[side.label][i], conf=conf)
    for i in range(runs):
        for side in sides:
            side.timed("DEL", f"{side.tag}{i}", namespaces[side.label][i])
            side.settle(f"{side.tag}{i}")
    for i in range(runs):
        for side in sides:
            side.timed("VERSION", "", "")
            python = side.interpreter
            if python:  # the same interpreter doing nothing, in the same loop
                side.timed("VERSION", "", "", label="bare", argv=[python, "-I", "-S", "-c", "pass"])


def concurrent_wall(side, count):
    namespaces = [side.lab.netns() for _ in range(count)]
    walls = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=count, initializer=side.lab.in_host) as pool:
        for command in ("ADD", "DEL"):
            start = time.perf_counter()
            list(pool.map(lambda i: side.spawn([side.plugin], command, f"p{i}", namespaces[i]), range(count)))
            walls[command] = time.perf_counter() - start
    for ns in namespaces:
        ns.delete()
        side.lab.namespaces.remove(ns)
    return walls


def report_rows(ours, ref, fallback, local, console_script):
    """(metric, our side, our key, reference side, its key, target) for each line of the table."""
    rows = [(command, ours, command, ref, command, TARGETS.get(command)) for command in ("ADD", "CHECK", "DEL")]
    rows += [(command + FALLBACK, fallback, command, ref, command, None) for command in ("ADD", "DEL")]
    rows += [(command + LOCAL, local, command, ref, command, None) for command in ("ADD", "CHECK", "DEL")]
    rows += [("VERSION", ours, "VERSION", ref, "VERSION", None),
             ("VERSION" + LOCAL, local, "VERSION", ref, "VERSION", None)]
    if console_script:
        rows.append(("VERSION (console script)", ours, "VERSION (console script)", ref, "VERSION", None))
    rows += [("VERSION / bare `python3 -I -S -c pass`" + suffix, side, "VERSION", side, "bare", VERSION_TARGET)
             for side, suffix in ((ours, ""), (local, LOCAL))]
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=25, help="sequential calls per command and side (>= 20)")
    parser.add_argument("--concurrent", type=int, default=50)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench_cni needs root (network namespaces)")
    runs = max(20, args.runs)
    labs, sides, service = [], [], None
    try:
        labs = [CniLab(), CniLab(), CniLab()]
        service = AgentService(labs[0])
        sides = make_sides(labs)
        ours, ref, fallback, local = sides
        sequential(sides, runs)
        script = os.path.join(ROOT, ".venv", "bin", "vxlan-net-cni")
        console_script = os.access(script, os.X_OK)
        if console_script:
            for _ in range(runs):
                ours.timed("VERSION", "", "", label="VERSION (console script)", argv=[script])
        walls = {side.label: concurrent_wall(side, args.concurrent) for side in (ours, ref)}
    finally:
        for side in sides:
            side.close()
        if service is not None:
            sys.stderr.write(service.stop())
        for lab in labs:
            lab.close()

    print(f"ours: {ours.plugin} (#!{ours.interpreter}); local launcher: {local.plugin} (#!{local.interpreter})")
    print(f"{'command':56} {'ours':>8} {'reference':>10} {'ratio':>7}  target  (median ms, n={runs}; reference: "
          "bridge+host-local, or the bare interpreter)")
    report = {}
    for metric, side, key, other, other_key, target in report_rows(ours, ref, fallback, local, console_script):
        mine = statistics.median(side.times[key]) * 1000
        theirs = statistics.median(other.times[other_key]) * 1000
        ratio = mine / theirs
        verdict = "" if target is None else (f"<= {target:.1f}x " + ("met" if ratio <= target else "MISSED"))
        print(f"{metric:56} {mine:8.2f} {theirs:10.2f} {ratio:6.2f}x  {verdict}")
        report[metric] = {"ours_ms": round(mine, 2), "reference_ms": round(theirs, 2), "ratio": round(ratio, 3)}
    for command in ("ADD", "DEL"):
        mine, theirs = walls[ours.label][command], walls[ref.label][command]
        print(f"{args.concurrent} concurrent {command:44} {mine * 1000:8.0f} {theirs * 1000:10.0f} "
              f"{mine / theirs:6.2f}x  (wall ms)")
        report[f"{args.concurrent} concurrent {command}"] = {"ours_ms": round(mine * 1000), "reference_ms":
                                                             round(theirs * 1000), "ratio": round(mine / theirs, 3)}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
