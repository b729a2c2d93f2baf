"""Pure lease bookkeeping: snapshot + watch events -> the peers to program.

Every node computes the same answer from the same records. A valid record is programmed only if
it is the first created (lowest create revision) of the records that share its VtepMAC, and of
those that share its PublicIP: an impostor cannot take over a node's tunnel endpoint. Then each
node drops, for itself alone, its own record, records that claim its own MAC or PublicIP, and
records whose subnet would capture an address it must reach through the underlay.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Iterable, Mapping, Optional, Union

from vxlan_net.core.config import NetworkConfig
from vxlan_net.core.errors import InvalidLease
from vxlan_net.core.families import IPAddress, IPNetwork
from vxlan_net.core.lease import Lease, parse_lease


@dataclasses.dataclass(frozen=True)
class LeaseChange:
    """What one snapshot or batch of events changed."""

    added: tuple[Lease, ...] = ()
    """Peers to program that were not programmed before."""
    removed: tuple[Lease, ...] = ()
    """Peers no longer to program (record gone, invalid or now losing a conflict)."""
    updated: tuple[Lease, ...] = ()
    """Same subnet, new attributes (PublicIP or VtepMAC)."""
    own_lease_removed: bool = False
    """Our own record was deleted."""
    own_record_changed: bool = False
    """Our own record was written (by anyone): compare it with what we hold."""
    rejected: tuple[tuple[str, str], ...] = ()
    """(key name, reason) for records newly skipped or skipped for a new reason: log each once."""

    @property
    def peers_changed(self) -> bool:
        return bool(self.added or self.removed or self.updated)


@dataclasses.dataclass(frozen=True)
class RecordEvent:
    """A put (value set) or delete (value None) of `<prefix>/subnets/<key_name>`."""

    key_name: str
    value: Optional[bytes]
    create_revision: int = 0
    """etcd's create revision of the key: the older record wins an identity conflict."""


Identity = Union[str, IPAddress, IPNetwork]
"""What only one node may hold: a VTEP MAC (str), a PublicIP (address) or a subnet (network), each itself:
values of different types never compare equal, so they share one dict without a (kind, value) tuple each."""

_KIND = {str: "VtepMAC", IPv4Address: "PublicIP", IPv6Address: "PublicIP", IPv4Network: "subnet", IPv6Network: "subnet"}
"""How messages name an identity, by its type."""


def _identities(lease: Lease) -> tuple[Identity, ...]:
    found: list[Identity] = list(lease.subnets)
    for family in sorted(lease.underlays):
        address, mac = lease.endpoint(family)  # type: ignore[misc]
        found += [mac, address]
    return tuple(dict.fromkeys(found))  # once each: a record may give both its VTEPs one MAC


def _subnet_order(subnet: IPNetwork) -> tuple[int, int, int]:
    """The order of ipaddress networks (version, address, length), in ints: a sort of 5,000 leases
    spent a second in IPv4Network.__lt__."""
    return subnet.version, int(subnet.network_address), subnet.prefixlen


def _lease_order(lease: Lease) -> tuple[int, int, int]:
    """Peers' order (dataclass order, which their distinct subnets decide)."""
    return _subnet_order(lease.subnet)


@dataclasses.dataclass(frozen=True, slots=True)
class _Record:
    """A valid record, when it was created, and what it claims (computed once: a listing of 5,000
    records looks identities up tens of thousands of times). Slots: the book holds one per lease."""

    lease: Lease
    create_revision: int
    key_name: str
    identities: tuple[Identity, ...] = dataclasses.field(init=False, compare=False, repr=False)
    _rank: Optional[tuple] = dataclasses.field(init=False, compare=False, repr=False, default=None)

    def __post_init__(self) -> None:
        object.__setattr__(self, "identities", _identities(self.lease))

    @property
    def rank(self) -> tuple:
        """Who wins an identity conflict: the first created, then the lower subnet, then the key name.
        Computed when a conflict first asks (an identity with one holder never does), then kept."""
        if self._rank is None:
            object.__setattr__(self, "_rank", (self.create_revision, _subnet_order(self.lease.subnet), self.key_name))
        return self._rank  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True, eq=False)
class ParsedListing:
    """The valid records a listing parsed, by key name and value, under `config`: handed by the book that
    took the listing to the next book taking the same records. An agent starting lists every lease twice
    (to choose its subnet, then to follow them), and parsing 5,000 records cost more than everything else
    the book does: the hand-over makes it parse each record once."""

    config: NetworkConfig
    leases: dict[tuple[str, bytes], Lease] = dataclasses.field(default_factory=dict)

    def lease(self, name: str, value: bytes) -> Lease:
        """The record's lease, parsed before or now (then kept); InvalidLease if invalid (never kept)."""
        lease = self.leases.get((name, value))
        if lease is None:
            lease = self.leases[name, value] = parse_lease(name, value, self.config)
        return lease


class LeaseBook:
    """The valid leases of the network, by key name; which are peers; which one is ours."""

    def __init__(self, config: NetworkConfig):
        self.config = config
        self._own_key_name: Optional[str] = None
        self._own_identities: frozenset[Identity] = frozenset()
        self._protected: dict[IPNetwork, str] = {}
        self._records: dict[str, _Record] = {}
        self._holders: dict[Identity, str | set[str]] = {}
        """Identity -> the key names claiming it: the one name while it is alone (nearly always; a set per
        identity cost three sets of 216 bytes a lease), a set of names while several claim it."""
        self._peers: dict[str, Lease] = {}
        self._invalid: dict[str, str] = {}
        """key name -> why the record is not a valid lease."""
        self._excluded: dict[str, str] = {}
        """key name -> why its valid record is not programmed here (a conflict, ours to avoid)."""

    # -- what the agent reads -------------------------------------------------------------

    def peers(self) -> list[Lease]:
        return list(self._peers.values())

    def valid_leases(self) -> list[Lease]:
        """Every valid record, programmed or not (ours included)."""
        return [record.lease for record in self._records.values()]

    def lease_for(self, subnet: IPNetwork) -> Optional[Lease]:
        """The valid record holding `subnet` (the first created, if several claim it), programmed or not."""
        holder = self.holder_of(subnet)
        return self._records[holder].lease if holder is not None else None

    def holder_of(self, subnet: IPNetwork) -> Optional[str]:
        """The key name of the valid record holding `subnet` (as lease_for): the record's own key, which
        may name more than the lease keeps (an IPv6 part on a network without IPv6)."""
        holders = self._holders.get(subnet)
        return self._winner(holders).key_name if holders is not None else None

    def valid_records(self) -> dict[str, Lease]:
        """Every valid record's lease by its key name, programmed or not (ours included)."""
        return {name: record.lease for name, record in self._records.items()}

    def _winner(self, holders: str | set[str]) -> _Record:
        if holders.__class__ is str:
            return self._records[holders]  # type: ignore[index]
        return min((self._records[k] for k in holders), key=lambda r: r.rank)

    def skipped(self) -> dict[str, str]:
        """Every record not programmed, by key name, with the reason (status and doctor show these)."""
        return {**self._invalid, **self._excluded}

    def __len__(self) -> int:
        return len(self._records)

    # -- what changes it ------------------------------------------------------------------

    def set_own(self, lease: Lease) -> LeaseChange:
        """This node's lease: never a peer, and nobody else may claim its subnets, MACs or public IPs."""
        self._own_key_name, self._own_identities = lease.key_name, frozenset(_identities(lease))
        return self._recompute(set(self._records), own_removed=False, own_written=False, rejected={})

    def set_protected(self, addresses: Mapping[IPAddress, str]) -> LeaseChange:
        """Addresses this node reaches through the underlay (what each is, for the warning):
        a peer subnet that contains one is never routed into the tunnel."""
        protected: dict[IPNetwork, str] = {}
        for address, what in sorted(addresses.items(), key=lambda item: (item[0].version, item[0])):
            space = self.config.space(address.version)
            if space is not None and address in space.network:
                subnet = ipaddress.ip_network((address, space.subnet_len), strict=False)
                protected.setdefault(subnet, f"{what} {address}")
        if protected == self._protected:
            return LeaseChange()
        self._protected = protected
        return self._recompute(set(self._records), own_removed=False, own_written=False, rejected={})

    def replace(self, events: Iterable[RecordEvent], parsed: Optional[ParsedListing] = None) -> LeaseChange:
        """Take a full listing: everything not in it is gone (diff includes attribute changes).

        With `parsed` (this book's config), records it holds are not parsed again, and the ones parsed
        now are added to it: the caller hands it to the next book taking the same listing."""
        events = list(events)
        listed = {event.key_name for event in events}
        known = set(self._records) | set(self._invalid)
        if parsed is not None and parsed.config is not self.config and parsed.config != self.config:
            raise ValueError("a listing parsed under another network config cannot be reused")
        return self._apply(events + [RecordEvent(name, None) for name in sorted(known - listed)], parsed)

    def apply(self, events: Iterable[RecordEvent]) -> LeaseChange:
        """Apply a batch of events in order and summarise the net effect (cost ~ the batch, not the book)."""
        return self._apply(events, None)

    # -- internals ------------------------------------------------------------------------

    def _apply(self, events: Iterable[RecordEvent], parsed: Optional[ParsedListing]) -> LeaseChange:
        touched: set[str] = set()
        rejected: dict[str, str] = {}
        own_removed = own_written = False
        for event in events:
            name = event.key_name
            previous_reason = self._invalid.pop(name, None)
            touched |= self._drop(name)
            lease: Optional[Lease] = None
            reason: Optional[str] = None
            try:
                if self._is_own(name):
                    own_written, own_removed = True, event.value is None
                if event.value is not None:
                    lease = (parse_lease(name, event.value, self.config) if parsed is None
                             else parsed.lease(name, event.value))
            except InvalidLease as exc:
                reason = str(exc)
            if lease is not None:
                touched |= self._add(name, _Record(lease, event.create_revision, name))
            elif reason is not None and event.value is not None:
                self._invalid[name] = reason
                if previous_reason != reason:
                    rejected[name] = reason
        return self._recompute(touched, own_removed, own_written, rejected)

    def _is_own(self, name: str) -> bool:
        """Our own record: by its key, once set_own named it."""
        return name == self._own_key_name

    def _add(self, name: str, record: _Record) -> set[str]:
        self._records[name] = record
        affected = {name}
        for identity in record.identities:
            holders = self._holders.get(identity)
            if holders is None or holders == name:
                self._holders[identity] = name
            elif holders.__class__ is str:
                self._holders[identity] = {holders, name}  # type: ignore[assignment]
                affected.add(holders)  # type: ignore[arg-type]
            else:
                holders.add(name)  # type: ignore[union-attr]
                affected |= holders  # type: ignore[arg-type]
        return affected

    def _drop(self, name: str) -> set[str]:
        """Forget the key's record; returns the keys whose standing may change with it."""
        record = self._records.pop(name, None)
        affected = {name}
        if record is None:
            return affected
        for identity in record.identities:
            holders = self._holders[identity]
            if holders.__class__ is str:
                del self._holders[identity]  # it was the name's alone
                continue
            holders.discard(name)  # type: ignore[union-attr]
            affected |= holders  # type: ignore[arg-type]
            if len(holders) == 1:
                self._holders[identity] = next(iter(holders))
        return affected

    def _standing(self, name: str) -> tuple[Optional[Lease], Optional[str]]:
        """(the lease if it is a peer to program, else None; the reason it is skipped, if any)."""
        record = self._records.get(name)
        if record is None:
            return None, None
        lease = record.lease
        if self._is_own(name):
            return None, None  # our own record: never a peer, nothing to warn about
        for value in record.identities:
            winner = self._winner(self._holders[value])
            if winner is not record:
                return None, (f"its {_KIND[value.__class__]} {value} is also claimed by {winner.lease.key_name}, created first "
                              f"(revision {winner.create_revision} < {record.create_revision})")
        for value in record.identities:
            if value in self._own_identities:
                return None, f"it claims this node's {_KIND[value.__class__]} {value}"
        for subnet in lease.subnets:
            captured = self._protected.get(subnet)
            if captured is not None:
                return None, f"routing {subnet} into the tunnel would capture {captured}"
        return lease, None

    def _recompute(self, touched: set[str], own_removed: bool, own_written: bool,
                   rejected: dict[str, str]) -> LeaseChange:
        added, removed, updated = [], [], []
        for name in touched:
            lease, reason = self._standing(name)
            if reason is None:
                self._excluded.pop(name, None)
            elif self._excluded.get(name) != reason:
                self._excluded[name] = rejected[name] = reason
            old = self._peers.get(name)
            if lease is None:
                if old is not None:
                    removed.append(self._peers.pop(name))
            else:
                self._peers[name] = lease
                if old is None:
                    added.append(lease)
                elif old != lease:
                    updated.append(lease)
        return LeaseChange(tuple(sorted(added, key=_lease_order)), tuple(sorted(removed, key=_lease_order)),
                           tuple(sorted(updated, key=_lease_order)),
                           own_removed, own_written, tuple(sorted(rejected.items())))
