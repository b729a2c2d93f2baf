"""The cluster network config (`<prefix>/config`): parsing, defaults and validation."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any, Iterator, Mapping, Optional

from vxlan_net.core.errors import InvalidConfig
from vxlan_net.core.families import IPAddress, IPNetwork
from vxlan_net.core.untrusted import load_json_object

DEFAULT_VNI = 1
DEFAULT_PORT = 8472
MAX_VNI = 16_777_215
MAX_SUBNET_LEN = 30
MAX_IPV6_SUBNET_LEN = 120
"""A node's IPv6 subnet holds at least 256 addresses (flannel's default is a /64)."""
VXLAN_OVERHEAD = 50
"""Bytes the tunnel adds: outer IPv4 (20) + UDP (8) + VXLAN (8) + inner Ethernet (14); the default
tunnel MTU is the underlay's minus this."""
UNUSABLE_NETWORKS = (
    (IPv4Network("0.0.0.0/8"), "0.0.0.0/8 (\"this network\")"),
    (IPv4Network("127.0.0.0/8"), "loopback 127.0.0.0/8"),
    (IPv4Network("169.254.0.0/16"), "link-local 169.254.0.0/16"),
    (IPv4Network("224.0.0.0/4"), "multicast 224.0.0.0/4"),
    (IPv4Network("240.0.0.0/4"), "reserved 240.0.0.0/4 (with the broadcast address)"),
)
"""Ranges that can hold neither pods nor a unicast underlay address, each with how to name it."""
UNUSABLE_IPV6_NETWORKS = (
    (IPv6Network("::/8"), "reserved ::/8 (unspecified, loopback, IPv4-mapped)"),
    (IPv6Network("fe80::/10"), "link-local fe80::/10"),
    (IPv6Network("ff00::/8"), "multicast ff00::/8"),
)
"""The same for IPv6."""


def unusable_block(address: IPAddress) -> Optional[str]:
    """The name of the unusable range holding `address` (either family), if any."""
    blocks = UNUSABLE_NETWORKS if address.version == 4 else UNUSABLE_IPV6_NETWORKS
    return next((name for block, name in blocks if address in block), None)


@dataclasses.dataclass(frozen=True)
class SubnetSpace:
    """One family's pod network and how it is cut into per-node subnets."""

    network: IPNetwork
    subnet_len: int
    subnet_min: IPAddress
    """Network address of the lowest subnet handed out."""
    subnet_max: IPAddress
    """Network address of the highest subnet handed out."""

    @property
    def version(self) -> int:
        return self.network.version

    @property
    def step(self) -> int:
        """Addresses per node subnet."""
        return 1 << (self.network.max_prefixlen - self.subnet_len)

    @property
    def size(self) -> int:
        """How many subnets lie between SubnetMin and SubnetMax."""
        return (int(self.subnet_max) - int(self.subnet_min)) // self.step + 1

    def subnet_at(self, address: IPAddress) -> IPNetwork:
        """The node subnet whose network address is `address`."""
        return ipaddress.ip_network((address, self.subnet_len))

    def nth(self, index: int) -> IPNetwork:
        """The index-th subnet from SubnetMin (0 <= index < size)."""
        return self.subnet_at(ipaddress.ip_address(int(self.subnet_min) + index * self.step))

    def holds(self, subnet: IPNetwork) -> bool:
        """A node subnet of this space, between SubnetMin and SubnetMax."""
        return (subnet.version == self.version and subnet.prefixlen == self.subnet_len
                and self.subnet_min <= subnet.network_address <= self.subnet_max)

    def subnets(self) -> Iterator[IPNetwork]:
        """Every subnet between SubnetMin and SubnetMax, in order (callers bound it by `size`)."""
        return (self.nth(i) for i in range(self.size))


@dataclasses.dataclass(frozen=True)
class NetworkConfig:
    """The pod network and how it is cut into per-node subnets.

    Field names mirror flannel's JSON so existing configs carry over.
    """

    ipv4: Optional[SubnetSpace]
    """`Network`, `SubnetLen`, `SubnetMin`, `SubnetMax`; None when `EnableIPv4` is false."""
    ipv6: Optional[SubnetSpace] = None
    """`IPv6Network`, `IPv6SubnetLen`, `IPv6SubnetMin`, `IPv6SubnetMax` when `EnableIPv6` is true."""
    vni: int = DEFAULT_VNI
    """VXLAN network identifier (`Backend.VNI`)."""
    port: int = DEFAULT_PORT
    """UDP destination port of the tunnel (`Backend.Port`)."""
    mtu: Optional[int] = None
    """Tunnel MTU override (`Backend.MTU`); None means underlay MTU - VXLAN_OVERHEAD."""
    direct_routing: bool = False
    """Route to peers on a shared L2 segment without the tunnel (`Backend.DirectRouting`, as flannel)."""

    @property
    def primary(self) -> SubnetSpace:
        """The space that names a lease: IPv4 when the network has it (flannel's key form), else IPv6."""
        space = self.ipv4 or self.ipv6
        assert space is not None, "build_config refuses a network with neither family"
        return space

    @property
    def spaces(self) -> tuple[SubnetSpace, ...]:
        return tuple(space for space in (self.ipv4, self.ipv6) if space is not None)

    def space(self, version: int) -> Optional[SubnetSpace]:
        return self.ipv4 if version == 4 else self.ipv6

    # The primary space's values, under flannel's names (an IPv4 or dual-stack network: its IPv4 ones).
    network = property(lambda self: self.primary.network)
    subnet_len = property(lambda self: self.primary.subnet_len)
    subnet_min = property(lambda self: self.primary.subnet_min)
    subnet_max = property(lambda self: self.primary.subnet_max)

    @property
    def ipv4_network(self) -> Optional[IPv4Network]:
        return self.ipv4.network if self.ipv4 else None  # type: ignore[return-value]

    @property
    def ipv6_network(self) -> Optional[IPv6Network]:
        return self.ipv6.network if self.ipv6 else None  # type: ignore[return-value]

    def in_pod_network(self, address: IPAddress) -> Optional[IPNetwork]:
        """The pod network (either family) that holds `address`, if any."""
        return next((s.network for s in self.spaces if address in s.network), None)

    def pod_mtu(self, underlay_mtu: int) -> int:
        """The MTU of the VTEP and the pods: the config's override, else the underlay's minus VXLAN's overhead."""
        return self.mtu or underlay_mtu - VXLAN_OVERHEAD

    def subnet_at(self, address: IPAddress) -> IPNetwork:
        """The node subnet (of the address's family) whose network address is `address`."""
        space = self.space(address.version)
        if space is None:
            raise ValueError(f"the network has no IPv{address.version} part")
        return space.subnet_at(address)

    def to_json(self) -> str:
        backend: dict[str, Any] = {"Type": "vxlan", "VNI": self.vni, "Port": self.port}
        if self.mtu is not None:
            backend["MTU"] = self.mtu
        if self.direct_routing:
            backend["DirectRouting"] = True
        doc: dict[str, Any] = {"Backend": backend}
        if self.ipv4 is not None:
            doc.update(Network=str(self.ipv4.network), SubnetLen=self.ipv4.subnet_len,
                       SubnetMin=str(self.ipv4.subnet_min), SubnetMax=str(self.ipv4.subnet_max))
        else:
            doc["EnableIPv4"] = False
        if self.ipv6 is not None:
            doc.update(EnableIPv6=True, IPv6Network=str(self.ipv6.network), IPv6SubnetLen=self.ipv6.subnet_len,
                       IPv6SubnetMin=str(self.ipv6.subnet_min), IPv6SubnetMax=str(self.ipv6.subnet_max))
        return json.dumps(doc, sort_keys=True)


def default_subnet_len(network: IPNetwork) -> int:
    """flannel's rules: IPv4 /24 when the network is /22 or larger, IPv6 /64 when it is /62 or larger;
    else two bits more."""
    usual, roomy = (24, 22) if network.version == 4 else (64, 62)
    return usual if network.prefixlen <= roomy else network.prefixlen + 2


def build_space(version: int, network: Any, subnet_len: Any = None, subnet_min: Any = None,
                subnet_max: Any = None) -> SubnetSpace:
    """One family's SubnetSpace from raw values (flannel's names in the messages), or InvalidConfig."""
    tag = "" if version == 4 else "IPv6"
    net = _parse_network(f"{tag}Network", network, version)
    longest = MAX_SUBNET_LEN if version == 4 else MAX_IPV6_SUBNET_LEN
    if subnet_len is None and default_subnet_len(net) > longest:
        raise InvalidConfig(f"{tag}Network {net} is too small: it must hold at least two /{longest} subnets")
    length = default_subnet_len(net) if subnet_len is None else _int(f"{tag}SubnetLen", subnet_len)
    if not net.prefixlen < length <= longest:
        raise InvalidConfig(
            f"{tag}SubnetLen {length} must be longer than the network's /{net.prefixlen} and at most /{longest}"
        )
    step = 1 << (net.max_prefixlen - length)
    first = ipaddress.ip_address(int(net.network_address) + step)  # the second subnet, as flannel
    last = ipaddress.ip_address(int(net.broadcast_address) - step + 1)
    low = first if subnet_min is None else _bound(f"{tag}SubnetMin", subnet_min, net, length)
    high = last if subnet_max is None else _bound(f"{tag}SubnetMax", subnet_max, net, length)
    if low > high:
        raise InvalidConfig(f"{tag}SubnetMin {low} is above {tag}SubnetMax {high}")
    return SubnetSpace(net, length, low, high)


def build_config(
    network: Optional[str],
    subnet_len: Optional[int] = None,
    subnet_min: Optional[str] = None,
    subnet_max: Optional[str] = None,
    vni: int = DEFAULT_VNI,
    port: int = DEFAULT_PORT,
    mtu: Optional[int] = None,
    direct_routing: bool = False,
    *,
    ipv6_network: Optional[str] = None,
    ipv6_subnet_len: Optional[int] = None,
    ipv6_subnet_min: Optional[str] = None,
    ipv6_subnet_max: Optional[str] = None,
) -> NetworkConfig:
    """Validate raw values and fill in defaults; raise InvalidConfig naming the problem.

    `network` None makes an IPv6-only network (flannel's EnableIPv4 false); `ipv6_network` adds IPv6."""
    if network is None and ipv6_network is None:
        raise InvalidConfig("the network needs an IPv4 Network, an IPv6Network, or both")
    ipv4 = None if network is None else build_space(4, network, subnet_len, subnet_min, subnet_max)
    if network is None and any(v is not None for v in (subnet_len, subnet_min, subnet_max)):
        raise InvalidConfig("SubnetLen, SubnetMin and SubnetMax need an IPv4 Network")
    ipv6 = None if ipv6_network is None else build_space(6, ipv6_network, ipv6_subnet_len, ipv6_subnet_min,
                                                         ipv6_subnet_max)
    if ipv6_network is None and any(v is not None for v in (ipv6_subnet_len, ipv6_subnet_min, ipv6_subnet_max)):
        raise InvalidConfig("IPv6SubnetLen, IPv6SubnetMin and IPv6SubnetMax need an IPv6Network")
    vni = _int("VNI", vni)
    if not 1 <= vni <= MAX_VNI:
        raise InvalidConfig(f"VNI {vni} is outside 1..{MAX_VNI}")
    port = _int("Port", port)
    if not 1 <= port <= 65535:
        raise InvalidConfig(f"Port {port} is outside 1..65535")
    if mtu is not None:
        mtu = _int("MTU", mtu)
        if not 576 <= mtu <= 65535:
            raise InvalidConfig(f"MTU {mtu} is outside 576..65535")
    if not isinstance(direct_routing, bool):  # JSON "true" or 1 is a mistake, not a yes
        raise InvalidConfig(f"DirectRouting must be true or false, not {direct_routing!r}")
    return NetworkConfig(ipv4, ipv6, vni, port, mtu, direct_routing)


def parse_config(raw: str | bytes) -> NetworkConfig:
    """Parse the JSON stored at `<prefix>/config`."""
    doc = load_json_object(raw, "config", InvalidConfig)
    enable_ipv4, enable_ipv6 = _flag(doc, "EnableIPv4", True), _flag(doc, "EnableIPv6", False)
    if enable_ipv4 and "Network" not in doc:
        raise InvalidConfig("config has no Network (an IPv6-only network says \"EnableIPv4\": false)")
    if enable_ipv6 and "IPv6Network" not in doc:
        raise InvalidConfig("config has EnableIPv6 but no IPv6Network")
    if not (enable_ipv4 or enable_ipv6):
        raise InvalidConfig("config enables neither IPv4 nor IPv6")
    backend = doc.get("Backend") or {}
    if not isinstance(backend, Mapping):
        raise InvalidConfig("Backend must be a JSON object")
    backend_type = backend.get("Type", "vxlan")
    if backend_type != "vxlan":
        raise InvalidConfig(f"Backend.Type {backend_type!r} is not supported (only vxlan)")
    v4 = {k: doc.get(k) for k in ("Network", "SubnetLen", "SubnetMin", "SubnetMax")} if enable_ipv4 else {}
    v6 = {k: doc.get(k) for k in ("IPv6Network", "IPv6SubnetLen", "IPv6SubnetMin", "IPv6SubnetMax")} \
        if enable_ipv6 else {}
    return build_config(
        network=v4.get("Network"),
        subnet_len=v4.get("SubnetLen"),
        subnet_min=v4.get("SubnetMin"),
        subnet_max=v4.get("SubnetMax"),
        vni=backend.get("VNI", DEFAULT_VNI),
        port=backend.get("Port", DEFAULT_PORT),
        mtu=backend.get("MTU"),
        direct_routing=backend.get("DirectRouting", False),
        ipv6_network=v6.get("IPv6Network"),
        ipv6_subnet_len=v6.get("IPv6SubnetLen"),
        ipv6_subnet_min=v6.get("IPv6SubnetMin"),
        ipv6_subnet_max=v6.get("IPv6SubnetMax"),
    )


def _flag(doc: Mapping[str, Any], name: str, default: bool) -> bool:
    value = doc.get(name, default)
    if not isinstance(value, bool):  # JSON "true" or 1 is a mistake, not a yes
        raise InvalidConfig(f"{name} must be true or false, not {value!r}")
    return value


def _parse_network(name: str, value: Any, version: int) -> IPNetwork:
    if not isinstance(value, str):
        raise InvalidConfig(f"{name} must be a CIDR string, not {value!r}")
    try:
        net = (IPv4Network if version == 4 else IPv6Network)(value, strict=True)
    except ValueError as exc:
        raise InvalidConfig(f"{name} {value!r} is not a valid IPv{version} CIDR without host bits: {exc}") from None
    for unusable, what in (UNUSABLE_NETWORKS if version == 4 else UNUSABLE_IPV6_NETWORKS):
        if net.overlaps(unusable):
            raise InvalidConfig(f"{name} {net} cannot be a pod network: it overlaps {what}")
    return net


def _int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidConfig(f"{name} must be an integer, not {value!r}")
    return value


def _bound(name: str, value: Any, net: IPNetwork, length: int) -> IPAddress:
    try:
        address = (IPv4Address if net.version == 4 else IPv6Address)(value)
    except ValueError:
        raise InvalidConfig(f"{name} {value!r} is not an IPv{net.version} address") from None
    if address not in net:
        raise InvalidConfig(f"{name} {address} is outside the network {net}")
    if int(address) % (1 << (net.max_prefixlen - length)):
        raise InvalidConfig(f"{name} {address} is not aligned to a /{length} subnet")
    return address
