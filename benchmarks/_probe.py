"""Benchmark probe run INSIDE a lab node namespace (`python -m benchmarks._probe ...`).

fill: write N valid remote leases to etcd in a few transactions.
joins: Put/revoke leases one by one and time each until the node's kernel announces the
route (RTM_NEWROUTE / RTM_DELROUTE on an RTNLGRP_IPV4_ROUTE netlink socket); the probe's own
etcd watch marks when etcd delivered the event, splitting etcd from agent time.
breakdown: time the agent's reconcile steps against this node's live VXLAN device.
routes-up: say "ready", then wait until the kernel has announced --count of the agent's routes
(RTM_NEWROUTE, protocol 157) and give the monotonic time of the last one (start-up timing).
Prints one JSON document on stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import socket
import statistics
import struct
import sys
import threading
import time
from ipaddress import IPv4Address, IPv4Network

from cni import netlink as wire
from cni.netlink import RT_TABLE_MAIN, RTA_DST, RTA_TABLE, RTM_DELROUTE, RTM_NEWROUTE
from vxlan_net.core.lease import subnet_key_name
from vxlan_net.doors import kernel
from vxlan_net.doors.store import EtcdStore, rpc

RTMGRP_IPV4_ROUTE = 0x40
FIRST_PUBLIC_IP = int(IPv4Address("198.18.201.0"))  # above the lab's segments 198.18.0-200.x
TXN_OPS = 100  # etcd's --max-txn-ops defaults to 128
WAIT_EACH = 5.0  # seconds a single join may take before it counts as lost


def lease_value(i: int, vni: int = 1) -> str:
    mac = f"0a:58:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}:01"
    return json.dumps({"PublicIP": str(IPv4Address(FIRST_PUBLIC_IP + i)), "BackendType": "vxlan",
                       "BackendData": {"VNI": vni, "VtepMAC": mac}})


def candidate_subnets(network: str, subnet_len: int) -> list[IPv4Network]:
    """Every subnet except the first (SubnetMin defaults to the second one)."""
    return list(IPv4Network(network).subnets(new_prefix=subnet_len))[1:]


def taken_subnets(store: EtcdStore) -> set[str]:
    return set(store.list_leases().records)


def fill(store: EtcdStore, subnets: list[IPv4Network], first_index: int) -> float:
    """Put every subnet's lease under one shared etcd lease, TXN_OPS per transaction."""
    started = time.monotonic()
    grant = store._call("grant", lambda c: c.leasestub.LeaseGrant(rpc.LeaseGrantRequest(TTL=24 * 3600),
                                                                     store.timeout))
    for start in range(0, len(subnets), TXN_OPS):
        ops = [rpc.RequestOp(request_put=rpc.PutRequest(
                   key=store.subnet_key(s), value=lease_value(first_index + start + k).encode(), lease=grant.ID))
               for k, s in enumerate(subnets[start:start + TXN_OPS])]
        request = rpc.TxnRequest(success=ops)
        store._call("fill", lambda c: c.kvstub.Txn(request, store.timeout))
    return time.monotonic() - started


class RouteEvents:
    """Netlink route notifications of the main table: (type, 'a.b.c.d/len') -> monotonic time."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.sock.bind((0, RTMGRP_IPV4_ROUTE))
        self.sock.settimeout(0.5)
        self.seen: dict[tuple[int, str], float] = {}
        self.overruns = 0
        self.cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(1 << 16)
            except socket.timeout:
                continue
            except OSError:  # ENOBUFS: notifications were dropped; the join then times out
                self.overruns += 1
                continue
            now = time.monotonic()
            found = []
            for off, length, kind, _flags, _seq in wire.messages(data):
                if kind not in (RTM_NEWROUTE, RTM_DELROUTE) or length < 28:
                    continue
                family, dst_len, _src, _tos, table = struct.unpack_from("=BBBBB", data, off + 16)
                dst = None
                for atype, at, size in wire.attributes(data, off + 28, off + length):
                    if atype == RTA_DST and size == 4:
                        dst = socket.inet_ntoa(data[at:at + 4])
                    elif atype == RTA_TABLE and size == 4:
                        table = struct.unpack_from("=I", data, at)[0]
                if family == socket.AF_INET and table == RT_TABLE_MAIN and dst is not None:
                    found.append(((kind, f"{dst}/{dst_len}"), now))
            if found:
                with self.cond:
                    for key, t in found:
                        self.seen.setdefault(key, t)
                    self.cond.notify_all()

    def wait(self, key: tuple[int, str], timeout: float) -> float | None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while key not in self.seen:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(left)
            return self.seen[key]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


_SO_RCVBUFFORCE = 33
RTM_PROTOCOL_AT = 16 + 5  # rtmsg.rtm_protocol


def routes_up(count: int, timeout: float, device: str) -> dict:
    """When the kernel announced the count-th distinct route of ours (protocol ROUTE_PROTO, main table),
    as CLOCK_MONOTONIC, which every namespace shares: the caller times its own start against it. Prints
    one line, ready, once subscribed. If notifications are lost (ENOBUFS), counts `device`'s routes by
    dumps instead."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
    sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, 64 << 20)
    sock.bind((0, RTMGRP_IPV4_ROUTE))
    sock.settimeout(0.2)
    print(json.dumps({"ready": time.monotonic()}), flush=True)
    seen: set[bytes] = set()
    last, overrun, deadline = None, False, time.monotonic() + timeout
    try:
        while len(seen) < count and time.monotonic() < deadline:
            try:
                data = sock.recv(1 << 20)
            except socket.timeout:
                continue
            except OSError:  # ENOBUFS: some announcements were dropped; the dumps below count instead
                overrun = True
                break
            received = time.monotonic()
            for off, length, kind, _flags, _seq in wire.messages(data):
                if kind == RTM_NEWROUTE and length >= 28 and data[off + RTM_PROTOCOL_AT] == kernel.ROUTE_PROTO:
                    seen.add(data[off + 17:off + length])  # dst_len and the attributes: the route itself
            if len(seen) >= count:
                last = received
        while overrun and last is None and time.monotonic() < deadline:
            if len(kernel.read_overlay_entries(device).routes) >= count:
                last = time.monotonic()
            else:
                time.sleep(0.005)
    finally:
        sock.close()
    if last is None:
        raise SystemExit(f"only {len(seen)} of {count} routes announced within {timeout:.0f}s")
    return {"last_route": last, "overruns": int(overrun)}


class WatchTimes:
    """The probe's own etcd watch: key name -> (put/delete, monotonic arrival)."""

    def __init__(self, store: EtcdStore, start_revision: int) -> None:
        self.seen: dict[tuple[str, str], float] = {}
        self._watch = store.watch_leases(start_revision)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for batch in self._watch:
                now = time.monotonic()
                for event in batch:
                    self.seen.setdefault((event.kind, event.key_name), now)
        except Exception:  # the watch ends on cancel(); the numbers are then simply absent
            return

    def close(self) -> None:
        self._watch.cancel()


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    ordered = sorted(values)

    def pct(p: float) -> float:  # nearest rank
        return ordered[max(0, min(len(ordered), math.ceil(p / 100 * len(ordered))) - 1)]

    return {"n": len(ordered), "p50": pct(50), "p90": pct(90), "p99": pct(99), "max": ordered[-1],
            "mean": statistics.fmean(ordered)}


class _Timings:
    """One kind of change (join or leave): request -> kernel notification, RPC time, etcd watch."""

    def __init__(self, events: RouteEvents, watch: WatchTimes, message: int, watch_kind: str) -> None:
        self.events, self.watch, self.message, self.watch_kind = events, watch, message, watch_kind
        self.latency: list[float] = []
        self.rpc: list[float] = []
        self.etcd: list[float] = []
        self.lost = 0

    def time(self, subnet: IPv4Network, request) -> object:
        """Run `request()` (the etcd call) and wait for the kernel's notification about `subnet`."""
        t0 = time.monotonic()
        answer = request()
        self.rpc.append(time.monotonic() - t0)
        seen = self.events.wait((self.message, str(subnet)), WAIT_EACH)
        if seen is None:
            self.lost += 1
            return answer
        self.latency.append(seen - t0)
        watched = self.watch.seen.get((self.watch_kind, subnet_key_name(subnet)))
        if watched is not None:
            self.etcd.append(watched - t0)
        return answer

    def report(self, name: str) -> dict:
        return {name: percentiles(self.latency), f"{name}_lost": self.lost, f"{name}_rpc": percentiles(self.rpc),
                f"{name}_etcd_watch": percentiles(self.etcd)}


def joins(store: EtcdStore, subnets: list[IPv4Network], first_index: int, gap: float) -> dict:
    """Join every subnet one at a time, then let each leave again (its etcd lease revoked)."""
    events = RouteEvents()
    watch = WatchTimes(store, store.list_leases().revision + 1)
    join = _Timings(events, watch, RTM_NEWROUTE, "put")
    leave = _Timings(events, watch, RTM_DELROUTE, "delete")
    rng = random.Random(7)
    lease_ids = []
    budget_end = time.monotonic() + 2 * len(subnets) * (WAIT_EACH + gap) + 10
    try:
        for i, subnet in enumerate(subnets):
            if time.monotonic() > budget_end:
                break
            value = lease_value(first_index + i)
            lease_ids.append(join.time(subnet, lambda: store.create_lease(subnet, value, ttl=3600)))
            time.sleep(gap * (0.5 + rng.random()))  # separate events, never batched together
        for subnet, lease_id in zip(subnets, lease_ids):
            if time.monotonic() > budget_end:
                break
            leave.time(subnet, lambda: store.revoke(lease_id))  # a node leaving: its key goes with its lease
            time.sleep(gap * (0.5 + rng.random()))
    finally:
        watch.close()
        events.close()
    return {**join.report("join"), **leave.report("leave"), "netlink_overruns": events.overruns}


def breakdown(store: EtcdStore, device: str, underlay: str, repeat: int) -> dict:
    """Median seconds of the agent's steps with today's peers: one watch event through the book, and the
    reconciler's full pass (desired + kernel read + plan; the agent's peers, so nothing to write) split.

    The event alternates between adding and removing one spare lease; an odd `repeat` ends
    with it removed. The full pass runs with the peers etcd holds, which the agent programmed: its plan is
    empty, and this process writes nothing the agent would not."""
    from vxlan_net.agent.reconciler import Reconciler
    from vxlan_net.core.config import parse_config
    from vxlan_net.core.desired import desired_entries
    from vxlan_net.core.lease_book import LeaseBook, RecordEvent
    from vxlan_net.core.plan import plan_changes

    config = parse_config(store.get_config())
    snapshot = store.list_leases()
    records = snapshot.records
    own = IPv4Network(kernel.interface_address(device)).supernet(new_prefix=config.subnet_len)
    book = LeaseBook(config)
    book.replace(snapshot.events())
    book.set_own(book.lease_for(own))  # as the agent's book: never a peer, its identities reserved
    candidates = map(subnet_key_name, candidate_subnets(str(config.network), config.subnet_len))
    spare_name = next(name for name in candidates if name not in records and name != subnet_key_name(own))
    steps: dict[str, list[float]] = {k: [] for k in ("etcd_list", "book_apply_1_event", "book_peers", "full_pass",
                                                     "desired_entries", "read_overlay_entries", "plan_changes")}
    clock = time.perf_counter
    peers = book.peers()
    reconciler = Reconciler(device, kernel, underlay=underlay)
    reconciler.set_peers(peers)
    t = clock(); first = reconciler.reconcile(); first_pass = clock() - t  # builds every peer's entries
    if not first.ok or first.changes:
        raise RuntimeError(f"the probe's full pass found {first.changes} changes ({first.error}): not the agent's peers")
    t = clock(); desired_entries(peers); cold_desired = clock() - t
    for n in range(repeat):
        t = clock(); store.list_leases(); steps["etcd_list"].append(clock() - t)
        event = [RecordEvent(spare_name, lease_value(900_000 + n).encode() if n % 2 else None)]
        t = clock(); book.apply(event); steps["book_apply_1_event"].append(clock() - t)
        t = clock(); book.peers(); steps["book_peers"].append(clock() - t)
        reconciler.request_full_pass()
        t = clock(); reconciler.reconcile(); steps["full_pass"].append(clock() - t)
        # The same pass in its three steps.
        t = clock(); desired = reconciler.desired; steps["desired_entries"].append(clock() - t)
        t = clock(); actual = kernel.read_overlay_entries(device, underlay=underlay)
        steps["read_overlay_entries"].append(clock() - t)
        t = clock(); plan_changes(desired, actual); steps["plan_changes"].append(clock() - t)
    # Writing one peer's three entries, as an event-sized plan would (same values: no change).
    from vxlan_net.core.plan import Plan
    neighbour = min(actual.neighbours)
    route = next(r for r in actual.routes if r.gateway == neighbour.ip)
    fdb = next(f for f in actual.fdb if f.mac == neighbour.mac)
    one_peer = Plan(upsert_neighbours=(neighbour,), upsert_fdb=(fdb,), upsert_routes=(route,))
    for _ in range(repeat):
        t = clock(); applied = kernel.apply_plan(device, one_peer)
        steps.setdefault("apply_plan_1_peer", []).append(clock() - t)
        if not applied.ok:
            raise RuntimeError(f"apply_plan of one peer failed: {applied.failures[0]}")
    # What a cheaper representation would cost: the same three dumps walked without building
    # ipaddress/dataclass objects, and the diff done on tuples of ints.
    ifindex_read = _raw_dumps(kernel, device)
    desired_t, actual_t = _as_tuples(desired), _as_tuples(actual)
    for _ in range(repeat):
        t = clock(); ifindex_read(); steps.setdefault("dumps_only_no_objects", []).append(clock() - t)
        t = clock(); [(d - a, a - d) for d, a in zip(desired_t, actual_t)]
        steps.setdefault("diff_on_int_tuples", []).append(clock() - t)
    result = {k: statistics.median(v) for k, v in steps.items()}
    result.update(peers=len(peers), first_full_pass=first_pass, desired_entries_cold=cold_desired)
    return result


def iproute2_reference(store: EtcdStore, underlay: str, local_ip: str) -> dict:
    """The same-run baseline: seconds `ip -batch` (neighbours, routes) + `bridge -batch` (FDB) take to write
    every lease's entries onto a fresh VXLAN device of this node (run where no agent is, so that the routes
    take no one's place); the device is deleted after."""
    import subprocess

    from vxlan_net.core.config import parse_config
    from vxlan_net.core.desired import desired_entries
    from vxlan_net.core.lease_book import LeaseBook

    book = LeaseBook(parse_config(store.get_config()))
    book.replace(store.list_leases().events())
    entries = desired_entries(book.peers())
    name = "vxref0"
    spec = kernel.VtepSpec(name=name, vni=4001, port=4790, local_ip=IPv4Address(local_ip), underlay_ifname=underlay,
                           mac="02:42:c6:12:ff:01", mtu=1450, address=None)
    ip_batch = "".join(f"neigh replace {n.ip} lladdr {n.mac} dev {name} nud permanent\n" for n in entries.neighbours)
    ip_batch += "".join(f"route replace {r.subnet} via {r.gateway} dev {name} onlink proto {kernel.ROUTE_PROTO}\n"
                        for r in entries.routes)
    fdb_batch = "".join(f"fdb replace {f.mac} dev {name} dst {f.dst} self permanent\n" for f in entries.fdb)
    kernel.delete_link(name)
    kernel.ensure_vtep(spec)
    try:
        started = time.perf_counter()
        for argv, text in ((["ip", "-batch", "-"], ip_batch), (["bridge", "-batch", "-"], fdb_batch)):
            done = subprocess.run(argv, input=text, capture_output=True, text=True, timeout=120)
            if done.returncode:
                raise RuntimeError(f"{argv[0]} -batch: {done.stderr.strip()[:300]}")
        took = time.perf_counter() - started
    finally:
        kernel.delete_link(name)
    return {"seconds": took, "entries": len(entries)}


def _raw_dumps(kernel, device: str):
    """The kernel door's own three dumps, walked message by message, nothing built (a measurement of
    where read_overlay_entries' time goes)."""
    return lambda: kernel.walk_overlay_dumps(device)


def _as_tuples(entries) -> tuple[set, set, set]:
    return ({(int(n.ip), n.mac) for n in entries.neighbours}, {(n.mac, int(n.dst)) for n in entries.fdb},
            {(int(r.subnet.network_address), r.subnet.prefixlen, int(r.gateway)) for r in entries.routes})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["fill", "joins", "breakdown", "iproute2", "routes-up"])
    parser.add_argument("--etcd", required=True)
    parser.add_argument("--prefix", default="/vxlan-net")
    parser.add_argument("--network", default="198.19.0.0/16")
    parser.add_argument("--subnet-len", type=int, default=28)
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--first-index", type=int, default=0, help="numbers the leases' public IPs and MACs")
    parser.add_argument("--gap", type=float, default=0.03, help="mean pause between joins, seconds")
    parser.add_argument("--device", default="vxnet.1")
    parser.add_argument("--underlay", default="eth0", help="the agent's underlay device (direct routes are read there)")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--local-ip", help="iproute2: the node's public IP (the reference VTEP's local address)")
    parser.add_argument("--timeout", type=float, default=90.0)
    args = parser.parse_args(argv)
    if args.command == "routes-up":
        print(json.dumps(routes_up(args.count, args.timeout, args.device)))
        return 0
    with EtcdStore([args.etcd], args.prefix) as store:
        if args.command == "breakdown":
            print(json.dumps(breakdown(store, args.device, args.underlay, args.repeat)))
            return 0
        if args.command == "iproute2":
            print(json.dumps(iproute2_reference(store, args.underlay, args.local_ip)))
            return 0
        taken = taken_subnets(store)
        free = [s for s in candidate_subnets(args.network, args.subnet_len)
                if subnet_key_name(s) not in taken]
        # Leave a margin of free subnets so the agent that starts later still finds one.
        if len(free) < args.count + 16:
            print(f"only {len(free)} free subnets for {args.count} leases", file=sys.stderr)
            return 1
        chosen = free[:args.count]
        if args.command == "fill":
            print(json.dumps({"count": len(chosen), "seconds": fill(store, chosen, args.first_index)}))
        else:
            print(json.dumps(joins(store, chosen, args.first_index, args.gap)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
