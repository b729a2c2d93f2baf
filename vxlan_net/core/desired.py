"""The overlay's kernel entries: their types, and the desired set computed from leases."""

from __future__ import annotations

import dataclasses
import sys
from operator import itemgetter
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import TYPE_CHECKING, Callable, Collection, Iterable, Iterator, Optional, Union

from vxlan_net.core.families import IPAddress, IPNetwork

if TYPE_CHECKING:
    from vxlan_net.core.lease import Lease


def _ints(value: object) -> object:
    """An address or network as its class and ints (equal exactly when the objects are), anything else as
    it is. Read from the ipaddress objects' own slots (`_ip`, `_prefixlen`): int() and .prefixlen run
    Python methods, and a full sync of 5,000 peers builds 15,000 entries (two fields each)."""
    cls = value.__class__
    if cls is IPv4Address or cls is IPv6Address:
        return cls, value._ip  # type: ignore[attr-defined]
    if cls is IPv4Network or cls is IPv6Network:
        return cls, value.network_address._ip, value._prefixlen  # type: ignore[attr-defined]
    return value


class _Entry:
    """An entry's hash by its fields as ints and strings, computed once: a resync diffs ~15,000 entries,
    and the ipaddress objects' own hash runs in Python (with their equality, 3/4 of the diff's time).
    Equality stays the dataclass one (the fields), tried only when the hashes match; between interned
    entries a set finds its own object and never asks. The hash lives in a slot, so vars() shows the
    fields alone. The entry types have slots (no per-object dict: 50 bytes of each of 15,000 entries),
    and __dict__ is the fields, as vars() and status showed them before."""

    __slots__ = ("_plain_hash",)

    @property
    def __dict__(self) -> dict:  # type: ignore[override]
        return {name: getattr(self, name) for name in self.__dataclass_fields__}  # type: ignore[attr-defined]

    def _fields(self) -> tuple:
        raise NotImplementedError

    def __post_init__(self) -> None:
        first, second = self._fields()
        object.__setattr__(self, "_plain_hash", hash((self.__class__.__name__, _ints(first), _ints(second))))

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self is other or (self._plain_hash == other._plain_hash  # type: ignore[attr-defined]
                                 and self._fields() == other._fields())  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return self._plain_hash

    def __getstate__(self) -> dict:
        return dict(self.__dict__)  # the fields: a copy computes its own hash (str hashes differ by process)

    def __setstate__(self, state: dict) -> None:
        for name, value in state.items():
            object.__setattr__(self, name, value)
        self.__post_init__()


_ENTRY_METHODS = (_Entry.__eq__, _Entry.__hash__, _Entry.__getstate__, _Entry.__setstate__)
"""Defined in each entry class's own body, so dataclass (which writes its own where a class has none) keeps them."""


@dataclasses.dataclass(frozen=True, order=True, slots=True)
class Neighbour(_Entry):
    """`ip neigh`: the remote VTEP's overlay address (IPv4 or IPv6: the pod family) resolves to its MAC."""

    ip: IPAddress
    mac: str

    __eq__, __hash__, __getstate__, __setstate__ = _ENTRY_METHODS

    def _fields(self) -> tuple:
        return self.ip, self.mac


@dataclasses.dataclass(frozen=True, order=True, slots=True)
class FdbEntry(_Entry):
    """`bridge fdb`: frames for the remote VTEP's MAC go to its public IP (the family of the VTEP's underlay)."""

    mac: str
    dst: IPAddress

    __eq__, __hash__, __getstate__, __setstate__ = _ENTRY_METHODS

    def _fields(self) -> tuple:
        return self.mac, self.dst


@dataclasses.dataclass(frozen=True, order=True, slots=True)
class Route(_Entry):
    """`ip route`: the remote pod subnet is reached via its VTEP, onlink (a tunnel route on the VTEP), or
    via its PublicIP on the underlay device (a direct route)."""

    subnet: IPNetwork
    gateway: IPAddress

    __eq__, __hash__, __getstate__, __setstate__ = _ENTRY_METHODS

    def _fields(self) -> tuple:
        return self.subnet, self.gateway


Entry = Union[Neighbour, FdbEntry, Route]
"""Any one overlay entry."""


_INTERNED: dict[int, Entry] = {}
"""Entry hash -> the entry interned under it (two entries whose hashes collide: the later one is not
interned, which only costs it an __eq__ in diffs). Held strongly, and swept of the entries nobody else
holds whenever it has doubled since the last sweep: a weak reference per entry (with its callback)
cost 88 bytes of every entry, 1.3 MiB at 5,000 peers; the sweep costs an amortised constant per entry."""
_SWEEP_MIN = 4096
_sweep_at = _SWEEP_MIN


def _refcounts(table: dict) -> list[int]:
    return [sys.getrefcount(entry) for entry in table.values()]


_ONLY_IN_TABLE = _refcounts({0: object()})[0]
"""What _refcounts says of an object nothing but the table holds (measured, not assumed: the count
a loop variable and a call add differs between interpreter versions)."""


def _sweep() -> None:
    """Forget the interned entries that nothing outside the table holds any more."""
    global _sweep_at
    unused = [key for key, refs in zip(list(_INTERNED), _refcounts(_INTERNED)) if refs <= _ONLY_IN_TABLE]
    for key in unused:
        del _INTERNED[key]
    _sweep_at = max(_SWEEP_MIN, 2 * len(_INTERNED))


def interned(entry: Entry) -> Entry:
    """The one live entry equal to `entry` (it, if there is none): the desired entries and those read from
    the kernel are then the same objects, and a resync's diff of 15,000 equal entries compares none (a
    set lookup finds its own object before it calls __eq__). An entry nobody uses goes at the next sweep."""
    key = entry._plain_hash  # type: ignore[union-attr]
    found = _INTERNED.get(key)
    if found is not None:
        return found if found == entry else entry
    if len(_INTERNED) >= _sweep_at:
        _sweep()
    _INTERNED[key] = entry
    return entry


ROUTE_PROTOCOL_NAMES = {2: "kernel", 3: "boot", 4: "static", 11: "zebra", 12: "bird", 16: "dhcp",
                        18: "keepalived", 42: "babel", 186: "bgp", 187: "isis", 188: "ospf", 189: "rip"}
"""iproute2's names (/etc/iproute2/rt_protos) of the routing protocols a node commonly carries."""
RT_SCOPE_LINK = 253


@dataclasses.dataclass(frozen=True, order=True)
class MainRoute:
    """Any route of the main table (either family), whoever installed it: what conflict and underlay checks read."""

    dst: IPNetwork
    gateway: Optional[IPAddress]
    device: Optional[str]
    protocol: int
    scope: int = 0
    metric: int = 0

    def __str__(self) -> str:
        """In `ip route` syntax, so `ip route del <this>` deletes exactly this route."""
        words = [str(self.dst)]
        if self.gateway is not None:
            words += ["via", str(self.gateway)]
        if self.device:
            words += ["dev", self.device]
        words += ["proto", ROUTE_PROTOCOL_NAMES.get(self.protocol, str(self.protocol))]
        if self.scope == RT_SCOPE_LINK:
            words += ["scope", "link"]
        if self.metric:
            words += ["metric", str(self.metric)]
        return " ".join(words)


@dataclasses.dataclass(frozen=True)
class OverlayEntries:
    """A full set of overlay entries: desired or actual. The tunnel entries live on the VXLAN device;
    direct routes on the underlay device, a class of their own (as felix keeps them) so that a peer
    changing mode is diffed in both and leaves nothing behind."""

    neighbours: frozenset[Neighbour] = frozenset()
    fdb: frozenset[FdbEntry] = frozenset()
    routes: frozenset[Route] = frozenset()
    direct_routes: frozenset[Route] = frozenset()

    def __len__(self) -> int:
        return len(self.neighbours) + len(self.fdb) + len(self.routes) + len(self.direct_routes)


def desired_entries(peers: Iterable[Lease],
                    is_direct: Optional[Callable[[IPAddress], bool]] = None) -> OverlayEntries:
    """An IPv4 node over an IPv4 underlay: the entries of its one VTEP (see desired_by_vtep)."""
    return desired_by_vtep(peers, own_underlays=(4,), own_families=(4,), is_direct=is_direct).get(4, OverlayEntries())


def tunnel_underlay(peer: Lease, pod_family: int, own_underlays: Collection[int]) -> Optional[int]:
    """The underlay family whose VTEP carries pod traffic of `pod_family` to `peer`: the same family
    when both ends have that underlay, else the other one both have (a VXLAN tunnel carries Ethernet,
    so either family rides either underlay); None when they share no underlay family."""
    return _tunnel_underlay(pod_family, [u for u in sorted(own_underlays) if u in peer.underlays])


def _tunnel_underlay(pod_family: int, shared: Collection[int]) -> Optional[int]:
    """tunnel_underlay, given the underlay families both ends have (IPv4 first)."""
    if pod_family in shared:
        return pod_family
    return next(iter(shared), None)


PeerEntries = tuple
"""One peer's entries: a layout, then the entries, `(layout, entry, ...)`. The layout is a tuple of
(underlay family of the VTEP the entry goes with, OverlayEntries field), one per entry, shared by every peer
of the same shape (a handful exist): a (family, field, entry) tuple per entry cost 0.9 MiB at 5,000 peers.
Read it with share_items."""

_LAYOUTS: dict[tuple, tuple] = {}


def _share(layout: Iterable[tuple[int, str]], entries: Iterable[Entry]) -> PeerEntries:
    """A share of entries, each listed with its (underlay family, field) in `layout`."""
    layout = tuple(layout)
    return (_LAYOUTS.setdefault(layout, layout), *entries)


def share_items(share: PeerEntries) -> Iterator[tuple[tuple[int, str], Entry]]:
    """((underlay family, OverlayEntries field), entry) of each of the peer's entries."""
    items = iter(share)
    return zip(next(items), items)


def without_field(share: PeerEntries, field: str) -> PeerEntries:
    """The share without its entries of one OverlayEntries field."""
    kept = [(place, entry) for place, entry in share_items(share) if place[1] != field]
    return _share((place for place, _ in kept), (entry for _, entry in kept))


def peer_entries(lease: Lease, own_underlays: Collection[int], own_families: Collection[int],
                 is_direct: Optional[Callable[[IPAddress], bool]] = None) -> PeerEntries:
    """One peer's share of desired_by_vtep (which says what the entries are); `own_underlays` sorted.

    Each of the lease's subnets and endpoints is looked up once (its properties build tuples and sets:
    at a full sync of 5,000 peers they were a third of the time)."""
    endpoints = {4: lease.endpoint(4), 6: lease.endpoint(6)}
    shared = [u for u in own_underlays if endpoints[u] is not None]
    subnet, other = lease.subnet, lease.ipv6_subnet
    subnets = {4: subnet, 6: other} if subnet.__class__ is IPv4Network else {4: None, 6: subnet}
    layout, entries = [], []
    for family in own_families:
        subnet = subnets[family]
        if subnet is None:
            continue
        endpoint = endpoints[family]
        if is_direct is not None and endpoint is not None and is_direct(endpoint[0]):
            layout.append((own_underlays[0], "direct_routes"))  # type: ignore[index]
            entries.append(interned(Route(subnet, endpoint[0])))
            continue
        underlay = _tunnel_underlay(family, shared)
        if underlay is None:
            continue
        address, mac = endpoints[underlay]  # type: ignore[misc]
        gateway = subnet.network_address
        layout += [(underlay, "neighbours"), (underlay, "fdb"), (underlay, "routes")]
        entries += [interned(Neighbour(gateway, mac)), interned(FdbEntry(mac, address)),
                    interned(Route(subnet, gateway))]
    return _share(layout, entries)


def entries_by_vtep(shares: Iterable[PeerEntries], underlays: Collection[int]) -> dict[int, OverlayEntries]:
    """{underlay family: OverlayEntries} of the peers' shares (peer_entries), every underlay present."""
    sets: dict[int, dict[str, set]] = {u: {"neighbours": set(), "fdb": set(), "routes": set(), "direct_routes": set()}
                                       for u in underlays}
    by_layout: dict[tuple, list[PeerEntries]] = {}
    for share in shares:
        group = by_layout.get(share[0])
        if group is None:
            group = by_layout[share[0]] = []
        group.append(share)
    for layout, group in by_layout.items():  # each entry column into its set in C: 15,000 entries a full pass
        for index, (underlay, field) in enumerate(layout, 1):
            sets[underlay][field].update(map(itemgetter(index), group))
    return {u: OverlayEntries(**{field: frozenset(entries) for field, entries in fields.items()})
            for u, fields in sets.items()}


def desired_by_vtep(peers: Iterable[Lease], own_underlays: Collection[int], own_families: Collection[int],
                    is_direct: Optional[Callable[[IPAddress], bool]] = None) -> dict[int, OverlayEntries]:
    """{underlay family: the entries of the VTEP over it}, for a node with VTEPs over `own_underlays` and
    pod subnets of `own_families`.

    Per peer and pod family both ends have, three entries on the VTEP tunnel_underlay chooses: a
    permanent neighbour (the peer subnet's network address -> the peer VTEP's MAC), an FDB entry
    (that MAC -> the peer's public address of the VTEP's family) and an onlink route (the subnet via
    that network address). A peer whose public address of the pod family is direct
    (`is_direct`) gets instead one route, the subnet via that address; direct routes are listed with
    the first VTEP's entries (they live on the underlay device, read and written beside that VTEP's).
    """
    underlays = tuple(sorted(set(own_underlays)))
    return entries_by_vtep((peer_entries(lease, underlays, own_families, is_direct) for lease in peers), underlays)
