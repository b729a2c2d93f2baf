"""Subnet leases: the record each node keeps in etcd, and its untrusted parsing."""

from __future__ import annotations

import dataclasses
import json
import re
from ipaddress import IPv4Address, IPv4Network
from typing import Any, Iterable, Mapping, Optional

from vxlan_net.core.config import UNUSABLE_NETWORKS, NetworkConfig
from vxlan_net.core.errors import InvalidLease
from vxlan_net.core.untrusted import load_json_object, shown

_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
_KEY = re.compile(r"([0-9]{1,3}(?:\.[0-9]{1,3}){3})-([0-9]{1,2})")

@dataclasses.dataclass(frozen=True, order=True)
class Lease:
    """One node's claim on a subnet, and where its VXLAN endpoint is."""

    subnet: IPv4Network
    public_ip: IPv4Address
    vtep_mac: str
    """Lower-case colon-separated MAC of the node's VXLAN device."""
    vni: int = 1

    @property
    def gateway(self) -> IPv4Address:
        """The subnet's network address: the remote VTEP's address on the overlay."""
        return self.subnet.network_address

    def to_json(self) -> str:
        return json.dumps(
            {
                "PublicIP": str(self.public_ip),
                "BackendType": "vxlan",
                "BackendData": {"VNI": self.vni, "VtepMAC": self.vtep_mac},
            },
            sort_keys=True,
        )


def subnet_key_name(subnet: IPv4Network) -> str:
    """`198.19.3.0/24` -> `198.19.3.0-24` (flannel's key form)."""
    return f"{subnet.network_address}-{subnet.prefixlen}"


def parse_subnet_key_name(name: str) -> IPv4Network:
    """Inverse of subnet_key_name, and only of it: a key in any other spelling (leading zeros,
    a trailing newline, other digits) names no subnet, so it cannot alias another node's."""
    match = _KEY.fullmatch(name)
    if not match:
        raise InvalidLease(f"key {shown(name)} is not of the form <address>-<prefixlen>")
    try:
        subnet = IPv4Network(f"{match.group(1)}/{match.group(2)}", strict=True)
    except ValueError as exc:
        raise InvalidLease(f"key {shown(name)} is not a subnet: {exc}") from None
    if subnet_key_name(subnet) != name:
        raise InvalidLease(f"key {shown(name)} is not in canonical form ({subnet_key_name(subnet)})")
    return subnet


def normalize_mac(value: Any) -> str:
    """Lower-case, colon-separated unicast MAC, or InvalidLease."""
    if not isinstance(value, str):
        raise InvalidLease(f"VtepMAC {shown(value)} is not a string")
    mac = value.strip().lower().replace("-", ":")
    if not _MAC.fullmatch(mac):
        raise InvalidLease(f"VtepMAC {shown(value)} is not a MAC address")
    first = int(mac[:2], 16)
    if first & 1:
        raise InvalidLease(f"VtepMAC {shown(value)} is a multicast address")
    if mac == "00:00:00:00:00:00":
        raise InvalidLease("VtepMAC is all zeros")
    return mac


def parse_lease(key_name: str, raw: bytes | str, config: NetworkConfig) -> Lease:
    """Turn one untrusted etcd record into a Lease, or raise InvalidLease saying why.

    Whatever the bytes, nothing but InvalidLease leaves here.
    """
    return parse_lease_value(parse_subnet_key_name(key_name), raw, config)


def parse_lease_value(subnet: IPv4Network, raw: bytes | str, config: NetworkConfig) -> Lease:
    """parse_lease for a key already parsed."""
    if subnet.prefixlen != config.subnet_len or not subnet.subnet_of(config.network):
        raise InvalidLease(f"subnet {subnet} is not a /{config.subnet_len} inside {config.network}")
    doc = load_json_object(raw, f"lease {subnet}", InvalidLease)
    backend = doc.get("BackendType", "vxlan")
    if backend != "vxlan":
        raise InvalidLease(f"lease {subnet} has backend {shown(backend)}, not vxlan")
    public_ip = _public_ip(subnet, doc.get("PublicIP"), config.network)
    data = doc.get("BackendData")
    if not isinstance(data, Mapping):
        raise InvalidLease(f"lease {subnet} has no BackendData object")
    vni = data.get("VNI", config.vni)
    if isinstance(vni, bool) or not isinstance(vni, int) or vni != config.vni:
        raise InvalidLease(f"lease {subnet} has VNI {shown(vni)}, the network uses {config.vni}")
    try:
        mac = normalize_mac(data.get("VtepMAC"))
    except InvalidLease as exc:
        raise InvalidLease(f"lease {subnet}: {exc}") from None
    return Lease(subnet, public_ip, mac, config.vni)


def _public_ip(subnet: IPv4Network, value: Any, network: IPv4Network) -> IPv4Address:
    if not isinstance(value, str):
        raise InvalidLease(f"lease {subnet} has PublicIP {shown(value)}, not an IPv4 address string")
    try:
        address = IPv4Address(value)
    except ValueError:
        raise InvalidLease(f"lease {subnet} has PublicIP {shown(value)}, not an IPv4 address") from None
    unusable = next((name for block, name in UNUSABLE_NETWORKS if address in block), None)
    if unusable:
        raise InvalidLease(f"lease {subnet} has PublicIP {address} in {unusable}, which cannot be a tunnel endpoint")
    if address in network:
        raise InvalidLease(f"lease {subnet} has PublicIP {address} inside the pod network {network}: "
                           "tunnel traffic to it would be routed into the tunnel")
    return address


def trusted_peers(leases: Iterable[Lease], own_subnet: Optional[IPv4Network]) -> list[Lease]:
    """The leases of other nodes, safe to program: never ours, never overlapping ours."""
    if own_subnet is None:
        return list(leases)
    return [lease for lease in leases if not lease.subnet.overlaps(own_subnet)]
