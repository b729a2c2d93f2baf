"""Choosing this node's subnet: pure, given the leases that exist."""

from __future__ import annotations

import random
from ipaddress import IPv4Address, IPv4Network
from typing import Iterable, Mapping, Optional

from .config import NetworkConfig
from .errors import SubnetsExhausted
from .lease import Lease


def candidate_subnets(config: NetworkConfig) -> Iterable[IPv4Network]:
    """Every subnet between SubnetMin and SubnetMax, in order."""
    step = 1 << (32 - config.subnet_len)
    for start in range(int(config.subnet_min), int(config.subnet_max) + 1, step):
        yield IPv4Network((IPv4Address(start), config.subnet_len))


def reusable_subnet(
    config: NetworkConfig,
    leases: Mapping[IPv4Network, Lease],
    public_ip: IPv4Address,
    remembered: Optional[IPv4Network],
    vtep_mac: Optional[str] = None,
) -> Optional[IPv4Network]:
    """The subnet this node held before, if it may keep it.

    First the subnet remembered in the state dir or subnet file when its record carries our
    PublicIP: a record elsewhere that merely claims our PublicIP (anyone can write one) must not
    move us. Then a lease carrying our PublicIP and VTEP MAC, then one carrying our PublicIP
    (flannel's rule, for a node that lost its state dir); last the remembered subnet if it is free.
    """
    holder = leases.get(remembered) if remembered is not None else None
    if holder is not None and holder.public_ip == public_ip and _in_range(config, remembered):
        return remembered
    ours = [s for s, lease in sorted(leases.items()) if lease.public_ip == public_ip and _in_range(config, s)]
    same_mac = [s for s in ours if leases[s].vtep_mac == vtep_mac]
    if same_mac or ours:
        return (same_mac or ours)[0]
    if remembered is not None and holder is None and _in_range(config, remembered):
        return remembered
    return None


def choose_free_subnet(
    config: NetworkConfig,
    taken: Iterable[IPv4Network],
    rng: Optional[random.Random] = None,
    avoid: Iterable[IPv4Network] = (),
) -> IPv4Network:
    """A random free subnet (random, like flannel, so racing nodes rarely collide)."""
    blocked = set(taken) | set(avoid)
    free = [s for s in candidate_subnets(config) if s not in blocked]
    if not free:
        raise SubnetsExhausted(
            f"no free /{config.subnet_len} between {config.subnet_min} and {config.subnet_max} in {config.network}"
        )
    return (rng or random).choice(free)


def _in_range(config: NetworkConfig, subnet: IPv4Network) -> bool:
    return (
        subnet.prefixlen == config.subnet_len
        and config.subnet_min <= subnet.network_address <= config.subnet_max
    )
