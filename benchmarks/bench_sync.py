"""Full overlay sync against `ip -batch` + `bridge -batch`, and reading the entries back against `ip -j`;
then a full sync of dual-stack peers (issue 11) on each VTEP kind against the same batches.

Runs in a throw-away namespace it enters itself (the agent's `ip netns exec` mode).
Prints times only; exits non-zero only if something fails functionally.
"""

from __future__ import annotations

import json
import os
import secrets
import statistics
import subprocess
import sys
import time
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Address, IPv6Interface, IPv6Network

from vxlan_net.core.desired import FdbEntry, Neighbour, OverlayEntries, Route, desired_entries
from vxlan_net.core.errors import KernelError
from vxlan_net.core.lease import Lease
from vxlan_net.core.names import vtep_name
from vxlan_net.core.plan import plan_changes
from vxlan_net.doors import kernel

PEER_COUNTS = (1000, 5000)
RUNS = 3
READS = 5
DEVICE = "vxb0"
SPEC = kernel.VtepSpec(
    name=DEVICE,
    vni=1,
    port=4789,
    local_ip=IPv4Address("198.18.0.1"),
    underlay_ifname="und0",
    mac="02:42:c6:12:00:01",
    mtu=1450,
    address=IPv4Interface("198.19.0.0/32"),
)


DUAL_STACK_PEERS = 5000
DUAL_STACK_SPECS = {  # dual-stack pods over the IPv4 underlay (one device, both families) and over the IPv6 one
    # VNI 2: the kernel refuses a second VXLAN device with DEVICE's VNI, port and local address.
    4: kernel.VtepSpec(name=vtep_name(2, 4), vni=2, port=4789, local_ip=IPv4Address("198.18.0.1"),
                       underlay_ifname="und0", mac="02:42:c6:12:00:04", mtu=1450,
                       address=IPv4Interface("198.19.0.0/32"), ipv6_address=IPv6Interface("fd19::/128")),
    6: kernel.VtepSpec(name=vtep_name(2, 6), vni=2, port=4789, local_ip=IPv6Address("fd18::1"),
                       underlay_ifname="und0", mac="02:42:c6:12:00:06", mtu=1430,
                       address=IPv4Interface("198.19.0.0/32"), ipv6_address=IPv6Interface("fd19::/128")),
}


class BenchFailure(Exception):
    pass


def sh(*argv: str, stdin: str | None = None) -> str:
    done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=120)
    if done.returncode:
        raise BenchFailure(f"{' '.join(argv)}: {done.stderr.strip()[:500]}")
    return done.stdout


def make_leases(count: int) -> list[Lease]:
    """Peers with /30 subnets of 198.19.0.0/16 (the first is ours) and public IPs from 198.18.16.0."""
    subnets = IPv4Network("198.19.0.0/16").subnets(new_prefix=30)
    next(subnets)
    first_public = int(IPv4Address("198.18.16.0"))
    return [
        Lease(next(subnets), IPv4Address(first_public + i), f"0a:58:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}:01")
        for i in range(count)
    ]


def fresh_device() -> None:
    kernel.delete_link(DEVICE)
    kernel.ensure_vtep(SPEC)


def iproute2_sync(leases: list[Lease]) -> float:
    """(a) the reference: one `ip -batch` (neighbours, then routes) and one `bridge -batch` (FDB)."""
    ip_lines = [f"neigh replace {l.gateway} lladdr {l.vtep_mac} dev {DEVICE} nud permanent\n" for l in leases]
    ip_lines += [
        f"route replace {l.subnet} via {l.gateway} dev {DEVICE} onlink proto {kernel.ROUTE_PROTO}\n" for l in leases
    ]
    fdb_lines = [f"fdb replace {l.vtep_mac} dev {DEVICE} dst {l.public_ip} self permanent\n" for l in leases]
    ip_batch, fdb_batch = "".join(ip_lines), "".join(fdb_lines)
    started = time.perf_counter()
    sh("ip", "-batch", "-", stdin=ip_batch)
    sh("bridge", "-batch", "-", stdin=fdb_batch)
    return time.perf_counter() - started


def our_sync(leases: list[Lease]) -> tuple[float, dict[str, float]]:
    """(b) the reconciler's pass: desired -> fresh read -> plan -> apply."""
    marks = [time.perf_counter()]
    desired = desired_entries(leases)
    marks.append(time.perf_counter())
    actual = kernel.read_overlay_entries(DEVICE)
    marks.append(time.perf_counter())
    plan = plan_changes(desired, actual)
    marks.append(time.perf_counter())
    result = kernel.apply_plan(DEVICE, plan)
    marks.append(time.perf_counter())
    if not result.ok or result.applied != 3 * len(leases):
        raise BenchFailure(f"apply_plan: {result.applied} applied, {len(result.failures)} failed, first: "
                           f"{result.failures[0] if result.failures else '-'}")
    phases = dict(zip(("desired", "read", "plan", "apply"), (b - a for a, b in zip(marks, marks[1:]))))
    return marks[-1] - marks[0], phases


def tool_counts() -> tuple[int, int, int]:
    neigh = json.loads(sh("ip", "-j", "neigh", "show", "dev", DEVICE, "nud", "permanent") or "[]")
    fdb = json.loads(sh("bridge", "-j", "fdb", "show", "dev", DEVICE) or "[]")
    routes = json.loads(sh("ip", "-j", "route", "show", "table", "main", "dev", DEVICE,
                           "proto", str(kernel.ROUTE_PROTO)) or "[]")
    return len(neigh), len([f for f in fdb if f.get("dst")]), len(routes)


def ip_json_dumps() -> tuple[list, list, list]:
    return (
        json.loads(sh("ip", "-j", "neigh", "show", "dev", DEVICE)),
        json.loads(sh("bridge", "-j", "fdb", "show", "dev", DEVICE)),
        json.loads(sh("ip", "-j", "route", "show", "table", "main", "dev", DEVICE, "proto", str(kernel.ROUTE_PROTO))),
    )


def entries_from_ip_json() -> OverlayEntries:
    """What shelling out would cost in full: the three dumps turned into entries."""
    neigh, fdb, routes = ip_json_dumps()
    return OverlayEntries(
        frozenset(Neighbour(IPv4Address(n["dst"]), n["lladdr"]) for n in neigh
                  if "PERMANENT" in n.get("state", ()) and "lladdr" in n),
        frozenset(FdbEntry(f["mac"], IPv4Address(f["dst"])) for f in fdb
                  if f.get("state") == "permanent" and "dst" in f and f["mac"] != "00:00:00:00:00:00"),
        frozenset(Route(IPv4Network(r["dst"]), IPv4Address(r["gateway"])) for r in routes if "gateway" in r),
    )


def timed(fn, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times


def bench_sync() -> None:
    print(f"full sync of N peers (3·N entries) onto an empty VXLAN device, median of {RUNS} runs")
    print(f"{'peers':>6} {'entries':>7} {'ip+bridge -batch':>17} {'our sync':>9} {'ratio':>6}   "
          f"our phases: desired / read / plan / apply")
    for count in PEER_COUNTS:
        leases = make_leases(count)
        reference, ours, phase_runs = [], [], []
        for run in range(RUNS * 2):
            fresh_device()
            if (run + count) % 2:  # alternate which goes first, so neither gets the warmer machine
                reference.append(iproute2_sync(leases))
                who = "ip -batch"
            else:
                total, phases = our_sync(leases)
                ours.append(total)
                phase_runs.append(phases)
                who = "our sync"
            if tool_counts() != (count, count, count):
                raise BenchFailure(f"{who} left {tool_counts()} entries, not {count} of each")
        a, b = statistics.median(reference), statistics.median(ours)
        phases = " / ".join(f"{statistics.median(p[k] for p in phase_runs):.3f}"
                            for k in ("desired", "read", "plan", "apply"))
        print(f"{count:>6} {3 * count:>7} {a:>16.3f}s {b:>8.3f}s {b / a:>6.2f}   {phases}")


def bench_read() -> None:
    count = PEER_COUNTS[-1]
    leases = make_leases(count)
    fresh_device()
    our_sync(leases)
    want = desired_entries(leases)
    if kernel.read_overlay_entries(DEVICE) != want or entries_from_ip_json() != want:
        raise BenchFailure("reading the entries back does not give what was written")
    kernel.forget_cached_subnets()  # the first read of a resync loop finds no subnet cached
    cold = timed(lambda: kernel.read_overlay_entries(DEVICE), 1)[0]
    ours = statistics.median(timed(lambda: kernel.read_overlay_entries(DEVICE), READS))
    dumps = statistics.median(timed(ip_json_dumps, READS))
    via_json = statistics.median(timed(entries_from_ip_json, READS))
    print(f"\nreading {count} peers' entries back ({3 * count} entries), median of {READS}")
    print(f"  read_overlay_entries          {ours:.3f}s  (first read, subnet cache cold: {cold:.3f}s)")
    print(f"  three ip/bridge -j dumps      {dumps:.3f}s  (text only, no entries built)")
    print(f"  the same dumps + json -> entries {via_json:.3f}s")


def dual_stack_entries(count: int, underlay_family: int) -> OverlayEntries:
    """Five entries a peer, as flannel: an IPv4 and an IPv6 neighbour and route, and one FDB entry to the
    peer's public address of the VTEP's underlay family. Subnets /30 of 198.19.0.0/16 and /64s of
    fd19::/48 (the first of each is ours); public IPs from 198.18.16.0 and fd18::1:0."""
    subnets4 = IPv4Network("198.19.0.0/16").subnets(new_prefix=30)
    next(subnets4)
    first6, first_public4, first_public6 = int(IPv6Address("fd19::")), int(IPv4Address("198.18.16.0")), int(
        IPv6Address("fd18::1:0"))
    neighbours, fdb, routes = set(), set(), set()
    for i in range(count):
        subnet4, subnet6 = next(subnets4), IPv6Network((first6 + ((i + 1) << 64), 64))
        mac = f"0a:58:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}:0{underlay_family}"
        public = IPv4Address(first_public4 + i) if underlay_family == 4 else IPv6Address(first_public6 + i)
        neighbours |= {Neighbour(subnet4.network_address, mac), Neighbour(subnet6.network_address, mac)}
        fdb.add(FdbEntry(mac, public))
        routes |= {Route(subnet4, subnet4.network_address), Route(subnet6, subnet6.network_address)}
    return OverlayEntries(frozenset(neighbours), frozenset(fdb), frozenset(routes))


def iproute2_entries_sync(entries: OverlayEntries, device: str) -> float:
    """The reference for any entries: `ip -batch` (neighbours, then routes; iproute2 tells each line's
    family from its address) and `bridge -batch` (FDB)."""
    ip_batch = "".join(f"neigh replace {n.ip} lladdr {n.mac} dev {device} nud permanent\n"
                       for n in entries.neighbours)
    ip_batch += "".join(f"route replace {r.subnet} via {r.gateway} dev {device} onlink proto {kernel.ROUTE_PROTO}\n"
                        for r in entries.routes)
    fdb_batch = "".join(f"fdb replace {f.mac} dev {device} dst {f.dst} self permanent\n" for f in entries.fdb)
    started = time.perf_counter()
    sh("ip", "-batch", "-", stdin=ip_batch)
    sh("bridge", "-batch", "-", stdin=fdb_batch)
    return time.perf_counter() - started


def our_entries_sync(entries: OverlayEntries, device: str) -> float:
    """The reconciler's pass for given desired entries: fresh read -> plan -> apply."""
    started = time.perf_counter()
    result = kernel.apply_plan(device, plan_changes(entries, kernel.read_overlay_entries(device)))
    took = time.perf_counter() - started
    if not result.ok or result.applied != len(entries):
        raise BenchFailure(f"apply_plan: {result.applied} applied, {len(result.failures)} failed, first: "
                           f"{result.failures[0] if result.failures else '-'}")
    return took


def dual_stack_counts(device: str) -> tuple[int, ...]:
    """(IPv4 neighbours, IPv6 neighbours, FDB remotes, IPv4 routes, IPv6 routes) as `ip`/`bridge` show them."""
    def shown(*argv: str) -> list:
        return json.loads(sh(*argv) or "[]")
    routes = ("route", "show", "table", "main", "dev", device, "proto", str(kernel.ROUTE_PROTO))
    return (len(shown("ip", "-j", "-4", "neigh", "show", "dev", device, "nud", "permanent")),
            len(shown("ip", "-j", "-6", "neigh", "show", "dev", device, "nud", "permanent")),
            len([f for f in shown("bridge", "-j", "fdb", "show", "dev", device) if f.get("dst")]),
            len(shown("ip", "-j", "-4", *routes)), len(shown("ip", "-j", "-6", *routes)))


def bench_dual_stack() -> list[float]:
    """Full sync of DUAL_STACK_PEERS dual-stack peers on each VTEP kind; returns the ratios."""
    count, ratios = DUAL_STACK_PEERS, []
    print(f"\nfull sync of {count} dual-stack peers (5 entries each: IPv4+IPv6 neighbour and route, FDB) "
          f"onto an empty VTEP, median of {RUNS} runs")
    print(f"{'VTEP':>10} {'entries':>7} {'ip+bridge -batch':>17} {'our sync':>9} {'ratio':>6}")
    for underlay_family, spec in DUAL_STACK_SPECS.items():
        entries = dual_stack_entries(count, underlay_family)
        reference, ours = [], []
        for run in range(RUNS * 2):
            kernel.delete_link(spec.name)
            kernel.ensure_vtep(spec)
            if run % 2:  # alternate which goes first, so neither gets the warmer machine
                reference.append(iproute2_entries_sync(entries, spec.name))
                who = "ip -batch"
            else:
                ours.append(our_entries_sync(entries, spec.name))
                who = "our sync"
            if dual_stack_counts(spec.name) != (count,) * 5:
                raise BenchFailure(f"{who} left {dual_stack_counts(spec.name)} entries, not {count} of each")
        if kernel.read_overlay_entries(spec.name) != entries:
            raise BenchFailure(f"reading {spec.name} back does not give what was written")
        a, b = statistics.median(reference), statistics.median(ours)
        ratios.append(b / a)
        print(f"{spec.name:>10} {len(entries):>7} {a:>16.3f}s {b:>8.3f}s {b / a:>6.2f}")
        kernel.delete_link(spec.name)
    return ratios


def main() -> int:
    if os.geteuid() != 0:
        print("bench_sync needs root (it works in a throw-away network namespace)", file=sys.stderr)
        return 1
    name = f"vnk-bench-{secrets.token_hex(3)}"
    sh("ip", "netns", "add", name)
    try:
        kernel.enter_netns(name)  # from here on, everything happens inside the namespace
        sh("ip", "link", "set", "lo", "up")
        sh("ip", "link", "add", SPEC.underlay_ifname, "type", "veth", "peer", "name", "und1")
        sh("ip", "addr", "add", f"{SPEC.local_ip}/24", "dev", SPEC.underlay_ifname)
        sh("ip", "-6", "addr", "add", f"{DUAL_STACK_SPECS[6].local_ip}/64", "dev", SPEC.underlay_ifname, "nodad")
        sh("ip", "link", "set", SPEC.underlay_ifname, "up")
        sh("ip", "link", "set", "und1", "up")
        if "--dual-stack-only" not in sys.argv[1:]:
            bench_sync()
            bench_read()
        bench_dual_stack()
    except (BenchFailure, KernelError) as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        subprocess.run(["ip", "netns", "del", name], timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
