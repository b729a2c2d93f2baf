"""Acquiring, renewing and re-acquiring this node's subnet lease in etcd."""

from __future__ import annotations

import dataclasses
import logging
import random
from ipaddress import IPv4Address, IPv4Network
from typing import Optional

from vxlan_net.core.allocator import Avoid, choose_free_subnet, overlap, reusable_subnet
from vxlan_net.core.config import NetworkConfig
from vxlan_net.core.errors import InvalidLease, LeaseGone, SubnetTaken, VxlanNetError
from vxlan_net.core.lease import Lease, parse_subnet_key_name, subnet_key_name
from vxlan_net.core.lease_book import LeaseBook

log = logging.getLogger(__name__)

MAX_RACE_RETRIES = 16


class SubnetLeaseKeeper:
    """Holds one subnet lease for this node: transactional create, reuse, renewal."""

    def __init__(self, store, config: NetworkConfig, public_ip: IPv4Address, vtep_mac: str, ttl: int,
                 rng: Optional[random.Random] = None):
        self.store = store
        self.config = config
        self.public_ip = public_ip
        self.vtep_mac = vtep_mac
        self.ttl = ttl
        self.rng = rng or random.SystemRandom()
        self.lease: Optional[Lease] = None
        self.lease_id: Optional[int] = None

    @property
    def renew_interval(self) -> float:
        """Renew at a third of the TTL (at most hourly), well before expiry."""
        return max(1.0, min(self.ttl / 3.0, 3600.0))

    def _value_for(self, subnet: IPv4Network) -> Lease:
        return Lease(subnet, self.public_ip, self.vtep_mac, self.config.vni)

    def acquire(self, remembered: Optional[IPv4Network], avoid: Optional[Avoid] = None) -> Lease:
        """Reuse our previous subnet when we may, else take a random free one; never one that
        overlaps `avoid` (the node's underlay).

        A previous subnet that now overlaps `avoid` is given up with a warning, and its
        record, if it carries our PublicIP, is revoked once we hold another (else peers
        would see two records of ours). A lost creation race means another node took that
        subnet in the meantime: pick another and try again (flannel exits here; we do not).
        """
        snapshot = self.store.list_leases()
        book = LeaseBook(self.config)  # the listing as every reader takes it: parsed, the invalid skipped
        book.replace(snapshot.events())
        leases = {lease.subnet: lease for lease in book.valid_leases()}
        valid = {subnet: (lease, snapshot.records[subnet_key_name(subnet)]) for subnet, lease in leases.items()}
        # A key naming a subnet is taken even when its value is garbage: creating it would fail.
        taken = {subnet for subnet in map(_subnet_of, snapshot.records) if subnet is not None}
        previous = reusable_subnet(self.config, leases, self.public_ip, remembered, self.vtep_mac)
        given_up = overlap(previous, avoid) if previous is not None else None
        if given_up:
            log.warning("giving up subnet %s: it overlaps this node's %s", previous, given_up)
        subnet = reusable_subnet(self.config, leases, self.public_ip, remembered, self.vtep_mac, avoid)
        if subnet is not None:
            held = valid.get(subnet)
            # Ours by PublicIP, or by VTEP MAC if the node was renumbered while we were down: keep its lease.
            ours = held is not None and (held[0].public_ip == self.public_ip or held[0].vtep_mac == self.vtep_mac)
            if ours and held[1].lease_id:
                if self._readopt(subnet, held[1].lease_id):
                    return self._drop_given_up(previous if given_up else None, valid)
            elif subnet not in taken and self._try_create(subnet):
                return self._drop_given_up(previous if given_up else None, valid)
        lost: set[IPv4Network] = set()
        for _ in range(MAX_RACE_RETRIES):
            subnet = choose_free_subnet(self.config, taken | lost, self.rng, avoid)
            if self._try_create(subnet):
                return self._drop_given_up(previous if given_up else None, valid)
            lost.add(subnet)
        raise SubnetTaken(f"lost the race for {len(lost)} subnets in a row; will retry")

    def _drop_given_up(self, subnet: Optional[IPv4Network], valid) -> Lease:
        """Revoke the record of a subnet we gave up, if it is ours and not the lease we now hold."""
        held = valid.get(subnet) if subnet is not None else None
        if held and held[0].public_ip == self.public_ip and held[1].lease_id not in (None, 0, self.lease_id):
            try:
                self.store.revoke(held[1].lease_id)
            except VxlanNetError as exc:
                log.warning("could not revoke the lease on %s we gave up (it expires with its TTL): %s", subnet, exc)
        return self.lease

    def _readopt(self, subnet: IPv4Network, lease_id: int) -> bool:
        """Keep our existing etcd lease (a restart): rewrite the value if it changed, refresh it."""
        lease = self._value_for(subnet)
        try:
            self.store.refresh(lease_id)
            self.store.update_lease(subnet, lease.to_json(), lease_id)
        except LeaseGone as exc:
            log.info("previous lease on %s is gone (%s); creating a new one", subnet, exc)
            return self._try_create(subnet)
        self.lease, self.lease_id = lease, lease_id
        log.info("reusing subnet %s (lease %x)", subnet, lease_id)
        return True

    def _try_create(self, subnet: IPv4Network) -> bool:
        lease = self._value_for(subnet)
        try:
            lease_id = self.store.create_lease(subnet, lease.to_json(), self.ttl)
        except SubnetTaken:
            log.info("subnet %s was taken by another node first; trying another", subnet)
            return False
        self._forget_previous(lease_id)
        self.lease, self.lease_id = lease, lease_id
        log.info("acquired subnet %s (lease %x, ttl %ss)", subnet, lease_id, self.ttl)
        return True

    def _forget_previous(self, new_lease_id: int) -> None:
        """Revoke the etcd lease we held before, so it does not linger keyless until its TTL."""
        if self.lease_id is not None and self.lease_id != new_lease_id:
            try:
                self.store.revoke(self.lease_id)
            except VxlanNetError as exc:
                log.debug("could not revoke old lease %x: %s", self.lease_id, exc)

    def move_to(self, public_ip: IPv4Address) -> Lease:
        """Hold our lease with a new PublicIP (the node was renumbered), then rewrite our record in place:
        same subnet, same etcd lease, so peers see an attribute change.

        The held value changes first: if etcd cannot be written now, the next listing finds the old
        record and restores ours. LeaseGone when the key is no longer ours (then: acquire again)."""
        self.public_ip = public_ip
        self.lease = dataclasses.replace(self.lease, public_ip=public_ip)
        self.store.update_lease(self.lease.subnet, self.lease.to_json(), self.lease_id)
        return self.lease

    def restore(self) -> None:
        """Write our record back under our lease after someone else changed or deleted it.

        LeaseGone only when our etcd lease is gone (expired or revoked)."""
        if self.lease is None or self.lease_id is None:
            raise LeaseGone("no lease held")
        self.store.restore_lease(self.lease.subnet, self.lease.to_json(), self.lease_id)

    def renew(self) -> int:
        """Refresh the etcd lease and return its TTL; raises LeaseGone when it expired or was revoked."""
        if self.lease_id is None:
            raise SubnetTaken("no lease held")
        return self.store.refresh(self.lease_id)


def _subnet_of(key_name: str) -> Optional[IPv4Network]:
    try:
        return parse_subnet_key_name(key_name)
    except InvalidLease:
        return None
