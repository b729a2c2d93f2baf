"""Choosing this node's subnet: pure, given the leases that exist."""

from __future__ import annotations

import random
from typing import Iterable, Mapping, Optional

from vxlan_net.core.config import SubnetSpace
from vxlan_net.core.errors import SubnetsExhausted
from vxlan_net.core.families import IPAddress, IPNetwork
from vxlan_net.core.lease import Lease

ENUMERABLE = 1 << 16
"""Spaces of at most this many subnets are listed whole; larger ones (an IPv6 /32 cut into /64s has
2^32) are sampled."""
SAMPLES = 4096
"""Random tries in a space too large to list: with a tenth of it taken, all miss with chance 10^-4096."""

def candidate_subnets(space: SubnetSpace) -> Iterable[IPNetwork]:
    """Every subnet between SubnetMin and SubnetMax, in order."""
    return space.subnets()


Avoid = Mapping[IPNetwork, str]
"""Networks a subnet of ours must not overlap, each with what it is ("address 198.19.5.1/24 on eth0"):
the node's underlay (underlay.Underlay.networks)."""


def overlap(subnet: IPNetwork, avoid: Optional[Avoid]) -> Optional[str]:
    """What in `avoid` the subnet overlaps, if anything."""
    return next((what for net, what in (avoid or {}).items()
                 if net.version == subnet.version and subnet.overlaps(net)), None)  # type: ignore[arg-type]


def _ours(lease: Lease, public_ip: IPAddress) -> bool:
    return public_ip in (lease.public_ip, lease.public_ipv6)


def _our_mac(lease: Lease, vtep_mac: Optional[str]) -> bool:
    return vtep_mac is not None and vtep_mac in (lease.vtep_mac, lease.vtep_mac_v6)


def reusable_subnet(
    space: SubnetSpace,
    leases: Mapping[IPNetwork, Lease],
    public_ip: IPAddress,
    remembered: Optional[IPNetwork],
    vtep_mac: Optional[str] = None,
    avoid: Optional[Avoid] = None,
) -> Optional[IPNetwork]:
    """The subnet this node held before, if it may keep it; never one overlapping `avoid`.

    First the subnet remembered in the state dir or subnet file when its record carries our
    PublicIP, or our VTEP MAC (we were renumbered while the agent was down, issue 13): a record
    elsewhere that merely claims our PublicIP (anyone can write one) must not move us. Then a lease carrying our PublicIP and VTEP MAC, then one carrying our PublicIP
    (flannel's rule, for a node that lost its state dir); last the remembered subnet if it is free.
    `public_ip` and `vtep_mac` are this node's on either underlay family.
    """

    def usable(subnet: IPNetwork) -> bool:
        return space.holds(subnet) and not overlap(subnet, avoid)

    holder = leases.get(remembered) if remembered is not None else None
    if holder is not None and (_ours(holder, public_ip) or _our_mac(holder, vtep_mac)) and usable(remembered):
        return remembered
    ours = sorted(s for s, lease in leases.items() if _ours(lease, public_ip) and usable(s))  # few: sort after
    same_mac = [s for s in ours if _our_mac(leases[s], vtep_mac)]
    if same_mac or ours:
        return (same_mac or ours)[0]
    if remembered is not None and holder is None and usable(remembered):
        return remembered
    return None


def choose_free_subnet(
    space: SubnetSpace,
    taken: Iterable[IPNetwork],
    rng: Optional[random.Random] = None,
    avoid: Optional[Avoid] = None,
) -> IPNetwork:
    """A random free subnet that overlaps nothing in `avoid` (random, like flannel, so racing nodes
    rarely collide)."""
    rng = rng or random  # type: ignore[assignment]
    taken = set(taken)
    relevant = {net: what for net, what in (avoid or {}).items()
                if net.version == space.version and net.overlaps(space.network)}  # type: ignore[arg-type]
    span = f"/{space.subnet_len} between {space.subnet_min} and {space.subnet_max}"
    if space.size > ENUMERABLE:
        for _ in range(SAMPLES):
            subnet = space.nth(rng.randrange(space.size))  # type: ignore[union-attr]
            if subnet not in taken and not overlap(subnet, relevant):
                return subnet
        raise SubnetsExhausted(f"no free {span} in {space.network} found in {SAMPLES} random tries")
    # By index from SubnetMin, in ints: building all 8,191 subnets of a /16 in /29s to drop the taken
    # ones cost 40 ms of an agent's start; only the chosen one (and, to check the underlay, the free
    # ones when it overlaps the space) becomes a network.
    first, step = int(space.subnet_min), space.step
    taken_at = {int(s.network_address) for s in taken
                if s.version == space.version and s.prefixlen == space.subnet_len}
    free = [i for i in range(space.size) if first + i * step not in taken_at]
    usable = [i for i in free if not overlap(space.nth(i), relevant)] if relevant else free
    if not usable:
        if free:
            blocking = [what for net, what in relevant.items() if any(space.nth(i).overlaps(net) for i in free)]
            raise SubnetsExhausted(f"every free {span} overlaps this node's underlay: {'; '.join(blocking)}")
        raise SubnetsExhausted(f"no free {span} in {space.network}")
    return space.nth(rng.choice(usable))  # type: ignore[union-attr]
