"""Acquiring, renewing and re-acquiring this node's subnet lease in etcd."""

from __future__ import annotations

import dataclasses
import logging
import random
from ipaddress import IPv4Address, IPv6Address, IPv6Network
from typing import Optional

from vxlan_net.core.allocator import Avoid, choose_free_subnet, overlap, reusable_subnet
from vxlan_net.core.config import NetworkConfig
from vxlan_net.core.errors import InvalidLease, LeaseGone, SubnetTaken, VxlanNetError
from vxlan_net.core.families import IPAddress, IPNetwork
from vxlan_net.core.lease import Lease, SubnetKey, parse_subnet_key_name
from vxlan_net.core.lease_book import LeaseBook, ParsedListing

log = logging.getLogger(__name__)

MAX_RACE_RETRIES = 16


class SubnetLeaseKeeper:
    """Holds one subnet lease for this node: transactional create, reuse, renewal."""

    def __init__(self, store, config: NetworkConfig, public_ip: Optional[IPv4Address], vtep_mac: Optional[str],
                 ttl: int, rng: Optional[random.Random] = None, *, public_ipv6: Optional[IPv6Address] = None,
                 vtep_mac_v6: Optional[str] = None):
        self.store = store
        self.config = config
        self.public_ip = public_ip
        self.vtep_mac = vtep_mac
        self.public_ipv6 = public_ipv6
        self.vtep_mac_v6 = vtep_mac_v6
        self.ttl = ttl
        self.rng = rng or random.SystemRandom()
        self.lease: Optional[Lease] = None
        self.lease_id: Optional[int] = None
        self._ipv6_subnet: Optional[IPv6Network] = None
        """A dual-stack lease's IPv6 subnet, chosen before its IPv4 one is created."""
        self._parsed: Optional[ParsedListing] = None
        """The records the last acquire parsed, until the agent's book takes them (take_parsed_listing)."""

    @property
    def renew_interval(self) -> float:
        """Renew at a third of the TTL (at most hourly), well before expiry."""
        return max(1.0, min(self.ttl / 3.0, 3600.0))

    @property
    def _identity(self) -> tuple:
        """(public address, VTEP MAC) that make a record ours: the IPv4 endpoint's, else the IPv6 one's."""
        if self.public_ip is not None:
            return self.public_ip, self.vtep_mac
        return self.public_ipv6, self.vtep_mac_v6

    def _value_for(self, subnet: IPNetwork) -> Lease:
        v4 = self.public_ip is not None
        v6 = self.public_ipv6 is not None
        return Lease(subnet, self.public_ip, self.vtep_mac if v4 else None, self.config.vni,
                     self._ipv6_subnet if self.config.ipv4 is not None else None,
                     self.public_ipv6, self.vtep_mac_v6 if v6 else None)

    def _choose_ipv6_subnet(self, held: Optional[Lease], book: LeaseBook, keys: list[SubnetKey],
                            remembered: Optional[IPNetwork], avoid: Optional[Avoid]) -> Optional[IPv6Network]:
        """A dual-stack node's IPv6 subnet: the one its record holds, else the remembered one if free,
        else a random free one; None on a network without IPv6 (or an IPv6-only one: it is the primary)."""
        space = self.config.ipv6
        if space is None or self.config.ipv4 is None:
            return None
        taken = {key.ipv6 for key in keys if key.ipv6 is not None}

        def ours_to_keep(subnet: Optional[IPNetwork]) -> bool:
            if subnet is None or not space.holds(subnet) or overlap(subnet, avoid):
                return False
            holder = book.lease_for(subnet)
            return holder is None or holder is held

        for subnet in ((held.ipv6_subnet if held else None), self._ipv6_subnet, remembered):
            if ours_to_keep(subnet) and (subnet not in taken or (held and subnet == held.ipv6_subnet)):
                return subnet  # type: ignore[return-value]
        return choose_free_subnet(space, taken, self.rng, avoid)  # type: ignore[return-value]

    def acquire(self, remembered: Optional[IPNetwork], avoid: Optional[Avoid] = None,
                remembered_ipv6: Optional[IPNetwork] = None) -> Lease:
        """Reuse our previous subnet when we may, else take a random free one; never one that
        overlaps `avoid` (the node's underlay).

        A previous subnet that now overlaps `avoid` is given up with a warning, and its
        record, if it carries our PublicIP, is revoked once we hold another (else peers
        would see two records of ours). A lost creation race means another node took that
        subnet in the meantime: pick another and try again (flannel exits here; we do not).
        """
        snapshot = self.store.list_leases()
        book = LeaseBook(self.config)  # the listing as every reader takes it: parsed, the invalid skipped
        self._parsed = ParsedListing(self.config)
        book.replace(snapshot.events(), self._parsed)
        named = book.valid_records()
        # Each subnet's holder by its record's own key (which may name more than its lease keeps: an IPv6
        # part on a network without IPv6), so its etcd lease is found whatever the key's form.
        holders = {lease.subnet: book.holder_of(lease.subnet) for lease in named.values()}
        leases = {subnet: named[name] for subnet, name in holders.items()}
        valid = {subnet: (named[name], snapshot.records[name]) for subnet, name in holders.items()}
        # A key naming a subnet is taken even when its value is garbage: creating it would fail. A valid
        # record's key was parsed with it (its lease's key holds every part a subnet is chosen by).
        keys = [named[name].key if name in named else _key_of(name) for name in snapshot.records]
        keys = [key for key in keys if key is not None]
        taken = {key.primary for key in keys}
        public_ip, mac = self._identity
        previous = reusable_subnet(self.config.primary, leases, public_ip, remembered, mac)
        given_up = overlap(previous, avoid) if previous is not None else None
        if given_up:
            log.warning("giving up subnet %s: it overlaps this node's %s", previous, given_up)
        subnet = reusable_subnet(self.config.primary, leases, public_ip, remembered, mac, avoid)
        held = valid.get(subnet) if subnet is not None else None
        # Ours by PublicIP, or by VTEP MAC if the node was renumbered while we were down: keep its lease.
        ours = held is not None and (public_ip in (held[0].public_ip, held[0].public_ipv6)
                                     or mac in (held[0].vtep_mac, held[0].vtep_mac_v6))
        self._ipv6_subnet = self._choose_ipv6_subnet(held[0] if ours else None, book, keys, remembered_ipv6, avoid)
        if subnet is not None:
            if ours and held[1].lease_id:
                if self._readopt(held[0], held[1].lease_id, held[1].key_name):
                    return self._drop_given_up(previous if given_up else None, valid)
            elif subnet not in taken and self._try_create(subnet):
                return self._drop_given_up(previous if given_up else None, valid)
        lost: set[IPNetwork] = set()
        for _ in range(MAX_RACE_RETRIES):
            subnet = choose_free_subnet(self.config.primary, taken | lost, self.rng, avoid)
            if self._try_create(subnet):
                return self._drop_given_up(previous if given_up else None, valid)
            lost.add(subnet)
        raise SubnetTaken(f"lost the race for {len(lost)} subnets in a row; will retry")

    def take_parsed_listing(self) -> Optional[ParsedListing]:
        """The records the last acquire parsed, for the book that lists next (the agent's, at start): once,
        so that they are not kept beyond it."""
        parsed, self._parsed = self._parsed, None
        return parsed

    def _drop_given_up(self, subnet: Optional[IPNetwork], valid) -> Lease:
        """Revoke the record of a subnet we gave up, if it is ours and not the lease we now hold."""
        held = valid.get(subnet) if subnet is not None else None
        if held and self._identity[0] in (held[0].public_ip, held[0].public_ipv6) \
                and held[1].lease_id not in (None, 0, self.lease_id):
            try:
                self.store.revoke(held[1].lease_id)
            except VxlanNetError as exc:
                log.warning("could not revoke the lease on %s we gave up (it expires with its TTL): %s", subnet, exc)
        return self.lease

    def _readopt(self, held: Lease, lease_id: int, key_name: str) -> bool:
        """Keep our existing etcd lease (a restart): rewrite the value if it changed, refresh it.

        When the key itself changes (IPv6 was added to the network: `198.19.5.0-24` becomes
        `198.19.5.0-24&fd19:0:0:5::-64`, or removed from it), the new key is created and the old record
        (`key_name`, its key in etcd) revoked."""
        subnet = held.subnet
        lease = self._value_for(subnet)
        if lease.key_name != key_name:
            self.lease_id = lease_id  # _try_create revokes it once the new key is ours
            if not self._try_create(subnet):
                self.lease_id = None
                return False
            log.info("lease key %s replaced by %s", key_name, lease.key_name)  # keys: what etcdctl shows
            return True
        try:
            self.store.refresh(lease_id)
            self.store.update_lease(lease.key, lease.to_json(), lease_id)
        except LeaseGone as exc:
            log.info("previous lease on %s is gone (%s); creating a new one", subnet, exc)
            return self._try_create(subnet)
        self.lease, self.lease_id = lease, lease_id
        log.info("reusing subnet %s (lease %x)", lease.label, lease_id)
        return True

    def _try_create(self, subnet: IPNetwork) -> bool:
        lease = self._value_for(subnet)
        try:
            lease_id = self.store.create_lease(lease.key, lease.to_json(), self.ttl)
        except SubnetTaken:
            log.info("subnet %s was taken by another node first; trying another", lease.label)
            return False
        self._forget_previous(lease_id)
        self.lease, self.lease_id = lease, lease_id
        log.info("acquired subnet %s (lease %x, ttl %ss)", lease.label, lease_id, self.ttl)
        return True

    def _forget_previous(self, new_lease_id: int) -> None:
        """Revoke the etcd lease we held before, so it does not linger keyless until its TTL."""
        if self.lease_id is not None and self.lease_id != new_lease_id:
            try:
                self.store.revoke(self.lease_id)
            except VxlanNetError as exc:
                log.debug("could not revoke old lease %x: %s", self.lease_id, exc)

    def move_to(self, public_ip: IPAddress) -> Lease:
        """Hold our lease with a new PublicIP, or PublicIPv6 for an IPv6 address (the node was renumbered),
        then rewrite our record in place: same subnet, same etcd lease, so peers see an attribute change.

        The held value changes first: if etcd cannot be written now, the next listing finds the old
        record and restores ours. LeaseGone when the key is no longer ours (then: acquire again)."""
        if public_ip.version == 4:
            self.public_ip = public_ip
            self.lease = dataclasses.replace(self.lease, public_ip=public_ip)
        else:
            self.public_ipv6 = public_ip
            self.lease = dataclasses.replace(self.lease, public_ipv6=public_ip)
        self.store.update_lease(self.lease.key, self.lease.to_json(), self.lease_id)
        return self.lease

    def restore(self) -> None:
        """Write our record back under our lease after someone else changed or deleted it.

        LeaseGone only when our etcd lease is gone (expired or revoked)."""
        if self.lease is None or self.lease_id is None:
            raise LeaseGone("no lease held")
        self.store.restore_lease(self.lease.key, self.lease.to_json(), self.lease_id)

    def renew(self) -> int:
        """Refresh the etcd lease and return its TTL; raises LeaseGone when it expired or was revoked."""
        if self.lease_id is None:
            raise SubnetTaken("no lease held")
        return self.store.refresh(self.lease_id)


def _key_of(key_name: str) -> Optional[SubnetKey]:
    try:
        return parse_subnet_key_name(key_name)
    except InvalidLease:
        return None
