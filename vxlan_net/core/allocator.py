"""Choosing this node's subnet: pure, given the leases that exist."""

from __future__ import annotations

import random
from ipaddress import IPv4Address, IPv4Network
from typing import Iterable, Mapping, Optional

from vxlan_net.core.config import NetworkConfig
from vxlan_net.core.errors import SubnetsExhausted
from vxlan_net.core.lease import Lease


def candidate_subnets(config: NetworkConfig) -> Iterable[IPv4Network]:
    """Every subnet between SubnetMin and SubnetMax, in order."""
    step = 1 << (32 - config.subnet_len)
    for start in range(int(config.subnet_min), int(config.subnet_max) + 1, step):
        yield IPv4Network((IPv4Address(start), config.subnet_len))


Avoid = Mapping[IPv4Network, str]
"""Networks a subnet of ours must not overlap, each with what it is ("address 198.19.5.1/24 on eth0"):
the node's underlay (underlay.underlay_networks)."""


def overlap(subnet: IPv4Network, avoid: Optional[Avoid]) -> Optional[str]:
    """What in `avoid` the subnet overlaps, if anything."""
    return next((what for net, what in (avoid or {}).items() if subnet.overlaps(net)), None)


def reusable_subnet(
    config: NetworkConfig,
    leases: Mapping[IPv4Network, Lease],
    public_ip: IPv4Address,
    remembered: Optional[IPv4Network],
    vtep_mac: Optional[str] = None,
    avoid: Optional[Avoid] = None,
) -> Optional[IPv4Network]:
    """The subnet this node held before, if it may keep it; never one overlapping `avoid`.

    First the subnet remembered in the state dir or subnet file when its record carries our
    PublicIP, or our VTEP MAC (we were renumbered while the agent was down, issue 13): a record
    elsewhere that merely claims our PublicIP (anyone can write one) must not move us. Then a lease carrying our PublicIP and VTEP MAC, then one carrying our PublicIP
    (flannel's rule, for a node that lost its state dir); last the remembered subnet if it is free.
    """
    def usable(subnet: IPv4Network) -> bool:
        return _in_range(config, subnet) and not overlap(subnet, avoid)

    holder = leases.get(remembered) if remembered is not None else None
    if holder is not None and (holder.public_ip == public_ip or holder.vtep_mac == vtep_mac) and usable(remembered):
        return remembered
    ours = [s for s, lease in sorted(leases.items()) if lease.public_ip == public_ip and usable(s)]
    same_mac = [s for s in ours if leases[s].vtep_mac == vtep_mac]
    if same_mac or ours:
        return (same_mac or ours)[0]
    if remembered is not None and holder is None and usable(remembered):
        return remembered
    return None


def choose_free_subnet(
    config: NetworkConfig,
    taken: Iterable[IPv4Network],
    rng: Optional[random.Random] = None,
    avoid: Optional[Avoid] = None,
) -> IPv4Network:
    """A random free subnet that overlaps nothing in `avoid` (random, like flannel, so racing nodes
    rarely collide)."""
    taken = set(taken)
    relevant = {net: what for net, what in (avoid or {}).items() if net.overlaps(config.network)}
    free = [s for s in candidate_subnets(config) if s not in taken]
    usable = [s for s in free if not overlap(s, relevant)] if relevant else free
    if not usable:
        span = f"/{config.subnet_len} between {config.subnet_min} and {config.subnet_max}"
        if free:
            blocking = [what for net, what in relevant.items() if any(s.overlaps(net) for s in free)]
            raise SubnetsExhausted(f"every free {span} overlaps this node's underlay: {'; '.join(blocking)}")
        raise SubnetsExhausted(f"no free {span} in {config.network}")
    return (rng or random).choice(usable)


def _in_range(config: NetworkConfig, subnet: IPv4Network) -> bool:
    return (
        subnet.prefixlen == config.subnet_len
        and config.subnet_min <= subnet.network_address <= config.subnet_max
    )
