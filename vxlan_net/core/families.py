"""The two IP families: the types that hold either, and what each costs the tunnel."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Address, IPv6Interface, IPv6Network
from typing import Union

IPAddress = Union[IPv4Address, IPv6Address]
IPNetwork = Union[IPv4Network, IPv6Network]
IPInterface = Union[IPv4Interface, IPv6Interface]

VXLAN_OVERHEAD_BY_UNDERLAY = {4: 50, 6: 70}
"""Bytes the tunnel adds over an IPv4 underlay (outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14) and
over an IPv6 one (outer IPv6 40 instead of 20)."""
