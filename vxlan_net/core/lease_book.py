"""Pure lease bookkeeping: snapshot + watch events -> the peers to program.

Every node computes the same answer from the same records. A valid record is programmed only if
it is the first created (lowest create revision) of the records that share its VtepMAC, and of
those that share its PublicIP: an impostor cannot take over a node's tunnel endpoint. Then each
node drops, for itself alone, its own record, records that claim its own MAC or PublicIP, and
records whose subnet would capture an address it must reach through the underlay.
"""

from __future__ import annotations

import dataclasses
from ipaddress import IPv4Address, IPv4Network
from typing import Iterable, Mapping, Optional

from vxlan_net.core.config import NetworkConfig
from vxlan_net.core.errors import InvalidLease
from vxlan_net.core.lease import Lease, parse_lease_value, parse_subnet_key_name, subnet_key_name


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


@dataclasses.dataclass(frozen=True)
class _Record:
    """A valid record and when it was created."""

    lease: Lease
    create_revision: int

    @property
    def rank(self) -> tuple[int, IPv4Network]:
        return self.create_revision, self.lease.subnet


class LeaseBook:
    """The valid leases of the network, keyed by subnet; which are peers; which one is ours."""

    def __init__(self, config: NetworkConfig, own_subnet: Optional[IPv4Network] = None):
        self.config = config
        self.own_subnet = own_subnet
        self._own_mac: Optional[str] = None
        self._own_ip: Optional[IPv4Address] = None
        self._protected: dict[IPv4Network, str] = {}
        self._records: dict[IPv4Network, _Record] = {}
        self._by_mac: dict[str, set[IPv4Network]] = {}
        self._by_ip: dict[IPv4Address, set[IPv4Network]] = {}
        self._peers: dict[IPv4Network, Lease] = {}
        self._invalid: dict[str, str] = {}
        """key name -> why the record is not a valid lease."""
        self._excluded: dict[IPv4Network, str] = {}
        """subnet -> why its valid record is not programmed here (a conflict, ours to avoid)."""

    # -- what the agent reads -------------------------------------------------------------

    def peers(self) -> list[Lease]:
        return list(self._peers.values())

    def valid_leases(self) -> list[Lease]:
        """Every valid record, programmed or not (ours included)."""
        return [record.lease for record in self._records.values()]

    def lease_for(self, subnet: IPv4Network) -> Optional[Lease]:
        """The valid record for `subnet`, programmed or not."""
        record = self._records.get(subnet)
        return record.lease if record else None

    def skipped(self) -> dict[str, str]:
        """Every record not programmed, by key name, with the reason (status and doctor show these)."""
        skipped = dict(self._invalid)
        skipped.update((subnet_key_name(subnet), reason) for subnet, reason in self._excluded.items())
        return skipped

    def __len__(self) -> int:
        return len(self._records)

    # -- what changes it ------------------------------------------------------------------

    def set_own(self, lease: Lease) -> LeaseChange:
        """This node's lease: never a peer, and nobody else may claim its MAC or PublicIP."""
        self.own_subnet, self._own_mac, self._own_ip = lease.subnet, lease.vtep_mac, lease.public_ip
        return self._recompute(set(self._records), own_removed=False, own_written=False, rejected={})

    def set_protected(self, addresses: Mapping[IPv4Address, str]) -> LeaseChange:
        """Addresses this node reaches through the underlay (what each is, for the warning):
        a peer subnet that contains one is never routed into the tunnel."""
        protected: dict[IPv4Network, str] = {}
        for address, what in sorted(addresses.items()):
            if address in self.config.network:
                subnet = IPv4Network((address, self.config.subnet_len), strict=False)
                protected.setdefault(subnet, f"{what} {address}")
        if protected == self._protected:
            return LeaseChange()
        self._protected = protected
        return self._recompute(set(self._records), own_removed=False, own_written=False, rejected={})

    def replace(self, events: Iterable[RecordEvent]) -> LeaseChange:
        """Take a full listing: everything not in it is gone (diff includes attribute changes)."""
        events = list(events)
        listed = {event.key_name for event in events}
        known = {subnet_key_name(subnet) for subnet in self._records} | set(self._invalid)
        return self.apply(events + [RecordEvent(name, None) for name in sorted(known - listed)])

    def apply(self, events: Iterable[RecordEvent]) -> LeaseChange:
        """Apply a batch of events in order and summarise the net effect (cost ~ the batch, not the book)."""
        touched: set[IPv4Network] = set()
        rejected: dict[str, str] = {}
        own_removed = own_written = False
        for event in events:
            previous_reason = self._invalid.pop(event.key_name, None)
            try:
                subnet: Optional[IPv4Network] = parse_subnet_key_name(event.key_name)
            except InvalidLease as exc:
                subnet, lease, reason = None, None, str(exc)
            if subnet is not None:
                if subnet == self.own_subnet:
                    own_written, own_removed = True, event.value is None
                touched |= self._drop(subnet)
                try:
                    lease = None if event.value is None else parse_lease_value(subnet, event.value, self.config)
                    reason = None
                except InvalidLease as exc:
                    lease, reason = None, str(exc)
            if lease is not None:
                touched |= self._add(_Record(lease, event.create_revision))
            elif reason is not None and event.value is not None:
                self._invalid[event.key_name] = reason
                if previous_reason != reason:
                    rejected[event.key_name] = reason
        return self._recompute(touched, own_removed, own_written, rejected)

    # -- internals ------------------------------------------------------------------------

    def _add(self, record: _Record) -> set[IPv4Network]:
        lease = record.lease
        self._records[lease.subnet] = record
        self._by_mac.setdefault(lease.vtep_mac, set()).add(lease.subnet)
        self._by_ip.setdefault(lease.public_ip, set()).add(lease.subnet)
        return self._by_mac[lease.vtep_mac] | self._by_ip[lease.public_ip]

    def _drop(self, subnet: IPv4Network) -> set[IPv4Network]:
        """Forget the subnet's record; returns the subnets whose standing may change with it."""
        record = self._records.pop(subnet, None)
        if record is None:
            return {subnet}
        affected = {subnet}
        for index, key in ((self._by_mac, record.lease.vtep_mac), (self._by_ip, record.lease.public_ip)):
            group = index[key]
            group.discard(subnet)
            affected |= group
            if not group:
                del index[key]
        return affected

    def _standing(self, subnet: IPv4Network) -> tuple[Optional[Lease], Optional[str]]:
        """(the lease if it is a peer to program, else None; the reason it is skipped, if any)."""
        record = self._records.get(subnet)
        if record is None:
            return None, None
        if subnet == self.own_subnet:
            return None, None  # our own record: never a peer, nothing to warn about
        lease = record.lease
        for what, index, key in (("VtepMAC", self._by_mac, lease.vtep_mac),
                                 ("PublicIP", self._by_ip, lease.public_ip)):
            winner = min((self._records[s] for s in index[key]), key=lambda r: r.rank)
            if winner is not record:
                return None, (f"its {what} {key} is also claimed by {winner.lease.subnet}, created first "
                              f"(revision {winner.create_revision} < {record.create_revision})")
        if lease.vtep_mac == self._own_mac:
            return None, f"it claims this node's VtepMAC {lease.vtep_mac}"
        if lease.public_ip == self._own_ip:
            return None, f"it claims this node's PublicIP {lease.public_ip}"
        captured = self._protected.get(subnet)
        if captured is not None:
            return None, f"routing {subnet} into the tunnel would capture {captured}"
        return lease, None

    def _recompute(self, touched: set[IPv4Network], own_removed: bool, own_written: bool,
                   rejected: dict[str, str]) -> LeaseChange:
        added, removed, updated = [], [], []
        for subnet in touched:
            lease, reason = self._standing(subnet)
            if reason is None:
                self._excluded.pop(subnet, None)
            elif self._excluded.get(subnet) != reason:
                self._excluded[subnet] = rejected[subnet_key_name(subnet)] = reason
            old = self._peers.get(subnet)
            if lease is None:
                if old is not None:
                    removed.append(self._peers.pop(subnet))
            else:
                self._peers[subnet] = lease
                if old is None:
                    added.append(lease)
                elif old != lease:
                    updated.append(lease)
        return LeaseChange(tuple(sorted(added)), tuple(sorted(removed)), tuple(sorted(updated)),
                           own_removed, own_written, tuple(sorted(rejected.items())))
