"""Pure lease bookkeeping: snapshot + watch events -> the peers to program."""

from __future__ import annotations

import dataclasses
from ipaddress import IPv4Network
from typing import Iterable, Mapping, Optional

from .config import NetworkConfig
from .errors import InvalidLease
from .lease import Lease, parse_lease, trusted_peers


@dataclasses.dataclass(frozen=True)
class LeaseChange:
    """What one snapshot or batch of events changed."""

    added: tuple[Lease, ...] = ()
    removed: tuple[Lease, ...] = ()
    updated: tuple[Lease, ...] = ()
    """Same subnet, new attributes (PublicIP or VtepMAC)."""
    own_lease_removed: bool = False
    rejected: tuple[tuple[str, str], ...] = ()
    """(key name, reason) for records newly found invalid: log each once."""

    @property
    def peers_changed(self) -> bool:
        return bool(self.added or self.removed or self.updated)


@dataclasses.dataclass(frozen=True)
class RecordEvent:
    """A put (value set) or delete (value None) of `<prefix>/subnets/<key_name>`."""

    key_name: str
    value: Optional[bytes]


class LeaseBook:
    """The valid leases of the network, keyed by subnet, and which one is ours."""

    def __init__(self, config: NetworkConfig, own_subnet: Optional[IPv4Network] = None):
        self.config = config
        self.own_subnet = own_subnet
        self._leases: dict[IPv4Network, Lease] = {}
        self._by_key: dict[str, IPv4Network] = {}
        self._rejected: dict[str, str] = {}

    def peers(self) -> list[Lease]:
        return trusted_peers(self._leases.values(), self.own_subnet)

    def replace(self, records: Mapping[str, bytes]) -> LeaseChange:
        """Take a full listing: everything not in it is gone (diff includes attribute changes)."""
        events = [RecordEvent(k, v) for k, v in records.items()]
        events += [RecordEvent(k, None) for k in set(self._by_key) | set(self._rejected) if k not in records]
        return self.apply(events)

    def apply(self, events: Iterable[RecordEvent]) -> LeaseChange:
        """Apply a batch of events in order and summarise the net effect (cost ~ the batch, not the book)."""
        before: dict[IPv4Network, Optional[Lease]] = {}
        rejected = []
        for event in events:
            previous_reason = self._rejected.get(event.key_name)
            old_subnet = self._by_key.get(event.key_name)
            if old_subnet is not None:
                before.setdefault(old_subnet, self._leases.get(old_subnet))
            self._forget(event.key_name)
            if event.value is None:
                continue
            try:
                lease = parse_lease(event.key_name, event.value, self.config)
            except InvalidLease as exc:
                if previous_reason != str(exc):
                    rejected.append((event.key_name, str(exc)))
                self._rejected[event.key_name] = str(exc)
                continue
            before.setdefault(lease.subnet, self._leases.get(lease.subnet))
            self._leases[lease.subnet] = lease
            self._by_key[event.key_name] = lease.subnet
        own = self.own_subnet
        own_removed = own is not None and before.get(own) is not None and own not in self._leases
        return self._summarise(before, own_removed, tuple(rejected))

    def lease_for(self, subnet: IPv4Network) -> Optional[Lease]:
        return self._leases.get(subnet)

    def __len__(self) -> int:
        return len(self._leases)

    def _forget(self, key_name: str) -> None:
        self._rejected.pop(key_name, None)
        subnet = self._by_key.pop(key_name, None)
        if subnet is not None:
            self._leases.pop(subnet, None)

    def _summarise(self, before: dict, own_removed: bool, rejected: tuple) -> LeaseChange:
        added, removed, updated = [], [], []
        for subnet, old in before.items():
            new = self._leases.get(subnet)
            if old is None and new is not None:
                added.append(new)
            elif old is not None and new is None:
                removed.append(old)
            elif old != new:
                updated.append(new)
        return LeaseChange(tuple(sorted(added)), tuple(sorted(removed)), tuple(sorted(updated)),
                           own_removed, rejected)
