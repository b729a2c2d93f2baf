"""What the agent's per-peer data costs: tracemalloc over the agent's own pure functions.

Run in a fresh interpreter (`python -m benchmarks._memory_breakdown 5000`); no I/O, no root.
Builds what the agent holds at N peers -- the etcd listing's records, the LeaseBook, the desired
entries, a kernel read's entries (new objects, as kernel.read_overlay_entries makes them) and
a full-sync Plan -- and prints the bytes each adds, as JSON.
"""

from __future__ import annotations

import gc
import json
import sys
import tracemalloc
from ipaddress import IPv4Address, IPv4Network

from benchmarks._probe import candidate_subnets, lease_value
from vxlan_net.core.config import parse_config
from vxlan_net.core.desired import FdbEntry, Neighbour, OverlayEntries, Route, desired_entries
from vxlan_net.core.lease import subnet_key_name
from vxlan_net.core.lease_book import LeaseBook, RecordEvent
from vxlan_net.core.plan import plan_changes
from vxlan_net.doors.store import LeaseRecord


def measure(peers: int) -> dict:
    config = parse_config(json.dumps({"Network": "198.19.0.0/16", "SubnetLen": 29}))
    _own, *others = candidate_subnets("198.19.0.0/16", 29)  # the node's own subnet: not in the listing
    subnets = others[:peers]
    sizes: dict[str, int] = {}
    keep = []
    gc.collect()
    tracemalloc.start()

    def step(name: str, build):
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        value = build()
        gc.collect()
        sizes[name] = tracemalloc.get_traced_memory()[0] - before
        keep.append(value)
        return value

    records = step("etcd listing (LeaseRecord per key)", lambda: {
        name: LeaseRecord(name, lease_value(i).encode(), 1, None, i, i)
        for i, name in enumerate(map(subnet_key_name, subnets))})
    book = step("LeaseBook (parsed Lease objects)", lambda: _book(config, records))
    desired = step("desired OverlayEntries", lambda: desired_entries(book.peers()))
    actual = step("kernel read OverlayEntries (fresh objects)", lambda: _fresh_copy(desired))
    step("Plan of a full sync (desired vs empty)", lambda: plan_changes(desired, OverlayEntries()))
    step("same entries as int tuples (for comparison)", lambda: (
        frozenset((int(n.ip), bytes.fromhex(n.mac.replace(":", ""))) for n in actual.neighbours),
        frozenset((bytes.fromhex(f.mac.replace(":", "")), int(f.dst)) for f in actual.fdb),
        frozenset((int(r.subnet.network_address), r.subnet.prefixlen, int(r.gateway)) for r in actual.routes)))
    tracemalloc.stop()
    return {"peers": peers, "bytes": sizes}


def _book(config, records) -> LeaseBook:
    book = LeaseBook(config)
    book.replace(RecordEvent(name, r.value, r.create_revision) for name, r in records.items())
    return book


def _fresh_copy(entries: OverlayEntries) -> OverlayEntries:
    nets: dict = {}
    return OverlayEntries(
        frozenset(Neighbour(IPv4Address(int(n.ip)), n.mac[:]) for n in entries.neighbours),
        frozenset(FdbEntry(f.mac[:], IPv4Address(int(f.dst))) for f in entries.fdb),
        frozenset(Route(nets.setdefault(r.subnet, IPv4Network(str(r.subnet))), IPv4Address(int(r.gateway)))
                  for r in entries.routes))


if __name__ == "__main__":
    print(json.dumps(measure(int(sys.argv[1]) if len(sys.argv) > 1 else 5000)))
