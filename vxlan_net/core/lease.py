"""Subnet leases: the record each node keeps in etcd, and its untrusted parsing."""

from __future__ import annotations

import dataclasses
import json
import re
from socket import AF_INET, AF_INET6, inet_pton
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any, Iterable, Mapping, NamedTuple, Optional

from vxlan_net.core.config import NetworkConfig, SubnetSpace, unusable_block
from vxlan_net.core.errors import InvalidLease
from vxlan_net.core.families import IPAddress, IPNetwork
from vxlan_net.core.untrusted import load_json_object, shown

_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
_V4_PART = r"([0-9]{1,3}(?:\.[0-9]{1,3}){3})-([0-9]{1,2})"
_V6_PART = r"([0-9a-f:]{2,39})-([0-9]{1,3})"
_KEY = re.compile(rf"{_V4_PART}(?:&{_V6_PART})?|{_V6_PART}")


class SubnetKey(NamedTuple):
    """What a record's key names: its IPv4 subnet, its IPv6 subnet, or both (dual-stack)."""

    ipv4: Optional[IPv4Network]
    ipv6: Optional[IPv6Network]

    @property
    def primary(self) -> IPNetwork:
        """The subnet a lease is known by: the IPv4 one when there is one (flannel's key form)."""
        return self.ipv4 or self.ipv6  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True, order=True, slots=True)
class Lease:
    """One node's claim on a subnet (one per family), and where its VXLAN endpoints are.

    `subnet` is the subnet the lease is known by: the IPv4 one, or on an IPv6-only network the
    IPv6 one. A node has a VXLAN endpoint per underlay family it has: PublicIP + BackendData.VtepMAC
    (IPv4 underlay), PublicIPv6 + BackendV6Data.VtepMAC (IPv6 underlay), flannel's fields.
    """

    subnet: IPNetwork
    public_ip: Optional[IPv4Address]
    vtep_mac: Optional[str]
    """Lower-case colon-separated MAC of the node's VXLAN device over IPv4."""
    vni: int = 1
    ipv6_subnet: Optional[IPv6Network] = None
    """A dual-stack lease's IPv6 subnet (an IPv6-only lease has it in `subnet`)."""
    public_ipv6: Optional[IPv6Address] = None
    vtep_mac_v6: Optional[str] = None
    """The MAC of the node's VXLAN device over IPv6."""

    @property
    def gateway(self) -> IPAddress:
        """The subnet's network address: the remote VTEP's address on the overlay."""
        return self.subnet.network_address

    @property
    def key(self) -> SubnetKey:
        if self.subnet.version == 6:
            return SubnetKey(None, self.subnet)  # type: ignore[arg-type]
        return SubnetKey(self.subnet, self.ipv6_subnet)  # type: ignore[arg-type]

    @property
    def key_name(self) -> str:
        return subnet_key_name(self.key)

    @property
    def subnets(self) -> tuple[IPNetwork, ...]:
        """Its pod subnets, IPv4 first."""
        return tuple(s for s in self.key if s is not None)

    @property
    def label(self) -> str:
        """How logs name it: `198.19.5.0/24`, or `198.19.5.0/24 and fd19:0:0:5::/64`."""
        return key_label(self.key)

    def subnet_of(self, version: int) -> Optional[IPNetwork]:
        return self.key.ipv4 if version == 4 else self.key.ipv6

    def endpoint(self, underlay_family: int) -> Optional[tuple[IPAddress, str]]:
        """(public address, VTEP MAC) of its VXLAN device over that underlay family, if it has one."""
        if underlay_family == 4:
            return (self.public_ip, self.vtep_mac) if self.public_ip and self.vtep_mac else None
        return (self.public_ipv6, self.vtep_mac_v6) if self.public_ipv6 and self.vtep_mac_v6 else None

    @property
    def underlays(self) -> frozenset[int]:
        """The underlay families it has a VXLAN endpoint on."""
        return frozenset(f for f in (4, 6) if self.endpoint(f) is not None)

    def to_json(self) -> str:
        doc: dict[str, Any] = {"BackendType": "vxlan"}
        if self.public_ip is not None:
            doc.update(PublicIP=str(self.public_ip), BackendData={"VNI": self.vni, "VtepMAC": self.vtep_mac})
        if self.public_ipv6 is not None:
            doc.update(PublicIPv6=str(self.public_ipv6),
                       BackendV6Data={"VNI": self.vni, "VtepMAC": self.vtep_mac_v6})
        return json.dumps(doc, sort_keys=True)


def subnet_key_name(key: "SubnetKey | IPNetwork") -> str:
    """flannel's key forms: `198.19.3.0-24`, dual-stack `198.19.3.0-24&fd19:0:0:3::-64`; and ours for an
    IPv6-only lease, `fd19:0:0:3::-64` (a `:` where flannel's form needs an IPv4 dotted quad, and no `&`,
    so it can be taken for neither; flannel's etcd parser skips it)."""
    if not isinstance(key, SubnetKey):
        key = SubnetKey(key, None) if key.version == 4 else SubnetKey(None, key)  # type: ignore[arg-type]
    parts = [f"{s.network_address}-{s.prefixlen}" for s in key if s is not None]
    return "&".join(parts)


def key_label(key: SubnetKey) -> str:
    """A key's subnets as logs and messages name them, `198.19.5.0/24 and fd19:0:0:5::/64`."""
    return " and ".join(str(s) for s in key if s is not None)


def parse_subnet_key_name(name: str) -> SubnetKey:
    """Inverse of subnet_key_name, and only of it: a key in any other spelling (leading zeros,
    a trailing newline, an uncompressed IPv6 address, other digits) names no subnet, so it cannot
    alias another node's."""
    match = _KEY.fullmatch(name)
    if not match:
        raise InvalidLease(f"key {shown(name)} is not of the form <address>-<prefixlen>[&<IPv6 address>-<prefixlen>]")
    v4, v4len, v6, v6len, only6, only6len = match.groups()
    key = _ipv4_only_key(v4, v4len) if v4 and not v6 else None
    if key is None:
        try:
            key = SubnetKey(IPv4Network(f"{v4}/{v4len}", strict=True) if v4 else None,
                            IPv6Network(f"{v6 or only6}/{v6len or only6len}", strict=True) if (v6 or only6) else None)
        except ValueError as exc:
            raise InvalidLease(f"key {shown(name)} is not a subnet: {exc}") from None
    if subnet_key_name(key) != name:
        raise InvalidLease(f"key {shown(name)} is not in canonical form ({subnet_key_name(key)})")
    return key


def _ipv4_only_key(address: str, prefixlen: str) -> Optional[SubnetKey]:
    """The key `<address>-<prefixlen>` names, built from ints (a third of what ipaddress's own string
    parsing costs, paid for every record at every start); None where that way fails, so the string
    parsing gives the refusal its message. inet_pton takes only a plain dotted quad."""
    try:
        return SubnetKey(IPv4Network((int.from_bytes(inet_pton(AF_INET, address), "big"), int(prefixlen))), None)
    except (OSError, ValueError):
        return None


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


def parse_lease_value(key: SubnetKey, raw: bytes | str, config: NetworkConfig) -> Lease:
    """parse_lease for a key already parsed.

    A key must name a subnet of every family the network has, except that a dual-stack network
    accepts an IPv4-only record (a node not yet restarted after IPv6 was added); an IPv6 part the
    network does not have is ignored."""
    name = _Label(key)
    if config.ipv4 is not None:
        _check_subnet(name, key.ipv4, config.ipv4)
        ipv6_subnet = key.ipv6 if config.ipv6 is not None else None
        if ipv6_subnet is not None:
            _check_subnet(name, ipv6_subnet, config.ipv6)  # type: ignore[arg-type]
        subnet: IPNetwork = key.ipv4  # type: ignore[assignment]
    else:
        if key.ipv4 is not None:
            raise InvalidLease(f"lease {name} has an IPv4 subnet; the network is IPv6-only")
        _check_subnet(name, key.ipv6, config.ipv6)  # type: ignore[arg-type]
        subnet, ipv6_subnet = key.ipv6, None  # type: ignore[assignment]
    doc = load_json_object(raw, _Label(key, "lease "), InvalidLease)  # type: ignore[arg-type]
    backend = doc.get("BackendType", "vxlan")
    if backend != "vxlan":
        raise InvalidLease(f"lease {name} has backend {shown(backend)}, not vxlan")
    public_ip, mac = _endpoint(name, doc, "PublicIP", "BackendData", 4, config)
    public_ipv6, mac6 = _endpoint(name, doc, "PublicIPv6", "BackendV6Data", 6, config)
    return Lease(subnet, public_ip, mac, config.vni, ipv6_subnet, public_ipv6, mac6)  # type: ignore[arg-type]


class _Label:
    """How messages name a record's key (`198.19.5.0/24 and fd19:0:0:5::/64`), spelled out only when a
    message is made: formatting it for every record cost a tenth of parsing a listing."""

    __slots__ = ("key", "prefix")

    def __init__(self, key: SubnetKey, prefix: str = ""):
        self.key, self.prefix = key, prefix

    def __str__(self) -> str:
        return self.prefix + key_label(self.key)


def _check_subnet(name: str, subnet: Optional[IPNetwork], space: SubnetSpace) -> None:
    if subnet is None:
        raise InvalidLease(f"lease {name} has no IPv{space.version} subnet; the network has {space.network}")
    if subnet.prefixlen != space.subnet_len or not _inside(subnet, space.network):
        raise InvalidLease(f"subnet {subnet} is not a /{space.subnet_len} inside {space.network}")


def _inside(subnet: IPNetwork, network: IPNetwork) -> bool:
    """subnet.subnet_of(network), in ints: subnet_of caches a broadcast address in a dict on each of the
    network's 5,000 subnets, a megabyte the book would keep."""
    return (subnet.version == network.version and subnet.prefixlen >= network.prefixlen
            and int(subnet.network_address) & int(network.netmask) == int(network.network_address))


def _endpoint(name: str, doc: Mapping[str, Any], ip_field: str, data_field: str, version: int,
              config: NetworkConfig) -> tuple[Optional[IPAddress], Optional[str]]:
    """(PublicIP, VtepMAC) of one underlay family, both None when the record has no such endpoint."""
    if ip_field not in doc:
        if version == 6 or "PublicIPv6" in doc:
            return None, None  # no endpoint of this family: the node has no such underlay
        raise InvalidLease(f"lease {name} has PublicIP None, and no PublicIPv6")
    address = _public_ip(name, ip_field, doc.get(ip_field), version, config)
    data = doc.get(data_field)
    if not isinstance(data, Mapping):
        raise InvalidLease(f"lease {name} has no {data_field} object")
    vni = data.get("VNI", config.vni)
    if isinstance(vni, bool) or not isinstance(vni, int) or vni != config.vni:
        raise InvalidLease(f"lease {name} has {data_field}.VNI {shown(vni)}, the network uses {config.vni}")
    try:
        mac = normalize_mac(data.get("VtepMAC"))
    except InvalidLease as exc:
        raise InvalidLease(f"lease {name}: {data_field}.{exc}") from None
    return address, mac


def _canonical_address(text: str, version: int) -> Optional[IPAddress]:
    """The address `text` spells when it is that family's canonical spelling, else None; through inet_pton
    and an int, a third of ipaddress's own string parsing."""
    try:
        address = (IPv4Address if version == 4 else IPv6Address)(
            int.from_bytes(inet_pton(AF_INET if version == 4 else AF_INET6, text), "big"))
    except (OSError, ValueError):  # ValueError: an embedded NUL
        return None
    return address if str(address) == text else None


def _public_ip(name: str, field: str, value: Any, version: int, config: NetworkConfig) -> IPAddress:
    kind = f"an IPv{version} address"
    if not isinstance(value, str):
        raise InvalidLease(f"lease {name} has {field} {shown(value)}, not {kind} string")
    address = _canonical_address(value, version)
    if address is None:  # not in canonical form, or no address: ipaddress says which
        try:
            address = (IPv4Address if version == 4 else IPv6Address)(value)
        except ValueError:
            raise InvalidLease(f"lease {name} has {field} {shown(value)}, not {kind}") from None
        if str(address) != value:
            raise InvalidLease(f"lease {name} has {field} {shown(value)}, not in canonical form ({address})")
    unusable = unusable_block(address)
    if unusable:
        raise InvalidLease(f"lease {name} has {field} {address} in {unusable}, which cannot be a tunnel endpoint")
    network = config.in_pod_network(address)
    if network is not None:
        raise InvalidLease(f"lease {name} has {field} {address} inside the pod network {network}: "
                           "tunnel traffic to it would be routed into the tunnel")
    return address


def trusted_peers(leases: Iterable[Lease], own_subnet: Optional[IPNetwork]) -> list[Lease]:
    """The leases of other nodes, safe to program: never ours, never overlapping ours."""
    if own_subnet is None:
        return list(leases)
    return [lease for lease in leases if not lease.subnet.overlaps(own_subnet)]  # type: ignore[arg-type]
