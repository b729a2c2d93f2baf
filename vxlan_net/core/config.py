"""The cluster network config (`<prefix>/config`): parsing, defaults and validation."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
from ipaddress import IPv4Address, IPv4Network
from typing import Any, Mapping, Optional

from vxlan_net.core.errors import InvalidConfig
from vxlan_net.core.untrusted import load_json_object

DEFAULT_VNI = 1
DEFAULT_PORT = 8472
MAX_VNI = 16_777_215
MAX_SUBNET_LEN = 30
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


@dataclasses.dataclass(frozen=True)
class NetworkConfig:
    """The pod network and how it is cut into per-node subnets.

    Field names mirror flannel's JSON so existing configs carry over.
    """

    network: IPv4Network
    """The whole pod network (flannel `Network`)."""
    subnet_len: int
    """Prefix length of each node's subnet (`SubnetLen`)."""
    subnet_min: IPv4Address
    """Network address of the lowest subnet handed out (`SubnetMin`)."""
    subnet_max: IPv4Address
    """Network address of the highest subnet handed out (`SubnetMax`)."""
    vni: int = DEFAULT_VNI
    """VXLAN network identifier (`Backend.VNI`)."""
    port: int = DEFAULT_PORT
    """UDP destination port of the tunnel (`Backend.Port`)."""
    mtu: Optional[int] = None
    """Tunnel MTU override (`Backend.MTU`); None means underlay MTU - VXLAN_OVERHEAD."""
    direct_routing: bool = False
    """Route to peers on a shared L2 segment without the tunnel (`Backend.DirectRouting`, as flannel)."""

    def pod_mtu(self, underlay_mtu: int) -> int:
        """The MTU of the VTEP and the pods: the config's override, else the underlay's minus VXLAN's overhead."""
        return self.mtu or underlay_mtu - VXLAN_OVERHEAD

    def subnet_at(self, address: IPv4Address) -> IPv4Network:
        """The node subnet whose network address is `address`."""
        return IPv4Network((address, self.subnet_len))

    def to_json(self) -> str:
        backend: dict[str, Any] = {"Type": "vxlan", "VNI": self.vni, "Port": self.port}
        if self.mtu is not None:
            backend["MTU"] = self.mtu
        if self.direct_routing:
            backend["DirectRouting"] = True
        return json.dumps(
            {
                "Network": str(self.network),
                "SubnetLen": self.subnet_len,
                "SubnetMin": str(self.subnet_min),
                "SubnetMax": str(self.subnet_max),
                "Backend": backend,
            },
            sort_keys=True,
        )


def default_subnet_len(network: IPv4Network) -> int:
    """flannel's rule: /24 when the network is /22 or larger, else two bits more."""
    return 24 if network.prefixlen <= 22 else network.prefixlen + 2


def build_config(
    network: str,
    subnet_len: Optional[int] = None,
    subnet_min: Optional[str] = None,
    subnet_max: Optional[str] = None,
    vni: int = DEFAULT_VNI,
    port: int = DEFAULT_PORT,
    mtu: Optional[int] = None,
    direct_routing: bool = False,
) -> NetworkConfig:
    """Validate raw values and fill in defaults; raise InvalidConfig naming the problem."""
    net = _parse_network(network)
    if subnet_len is None and default_subnet_len(net) > MAX_SUBNET_LEN:
        raise InvalidConfig(f"Network {net} is too small: it must hold at least two /{MAX_SUBNET_LEN} subnets")
    length = default_subnet_len(net) if subnet_len is None else _int("SubnetLen", subnet_len)
    if not net.prefixlen < length <= MAX_SUBNET_LEN:
        raise InvalidConfig(
            f"SubnetLen {length} must be longer than the network's /{net.prefixlen} and at most /{MAX_SUBNET_LEN}"
        )
    step = 1 << (32 - length)
    first = IPv4Address(int(net.network_address) + step)  # the second subnet, as flannel
    last = IPv4Address(int(net.broadcast_address) - step + 1)
    low = first if subnet_min is None else _bound("SubnetMin", subnet_min, net, length)
    high = last if subnet_max is None else _bound("SubnetMax", subnet_max, net, length)
    if low > high:
        raise InvalidConfig(f"SubnetMin {low} is above SubnetMax {high}")
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
    return NetworkConfig(net, length, low, high, vni, port, mtu, direct_routing)


def parse_config(raw: str | bytes) -> NetworkConfig:
    """Parse the JSON stored at `<prefix>/config`."""
    doc = load_json_object(raw, "config", InvalidConfig)
    if "Network" not in doc:
        raise InvalidConfig("config has no Network")
    backend = doc.get("Backend") or {}
    if not isinstance(backend, Mapping):
        raise InvalidConfig("Backend must be a JSON object")
    backend_type = backend.get("Type", "vxlan")
    if backend_type != "vxlan":
        raise InvalidConfig(f"Backend.Type {backend_type!r} is not supported (only vxlan)")
    return build_config(
        network=doc["Network"],
        subnet_len=doc.get("SubnetLen"),
        subnet_min=doc.get("SubnetMin"),
        subnet_max=doc.get("SubnetMax"),
        vni=backend.get("VNI", DEFAULT_VNI),
        port=backend.get("Port", DEFAULT_PORT),
        mtu=backend.get("MTU"),
        direct_routing=backend.get("DirectRouting", False),
    )


def _parse_network(value: Any) -> IPv4Network:
    if not isinstance(value, str):
        raise InvalidConfig(f"Network must be a CIDR string, not {value!r}")
    try:
        net = IPv4Network(value, strict=True)
    except ValueError as exc:
        raise InvalidConfig(f"Network {value!r} is not a valid IPv4 CIDR without host bits: {exc}") from None
    for unusable, name in UNUSABLE_NETWORKS:
        if net.overlaps(unusable):
            raise InvalidConfig(f"Network {net} cannot be a pod network: it overlaps {name}")
    return net


def _int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidConfig(f"{name} must be an integer, not {value!r}")
    return value


def _bound(name: str, value: Any, net: IPv4Network, length: int) -> IPv4Address:
    try:
        address = ipaddress.IPv4Address(value)
    except ValueError:
        raise InvalidConfig(f"{name} {value!r} is not an IPv4 address") from None
    if address not in net:
        raise InvalidConfig(f"{name} {address} is outside the network {net}")
    if int(address) % (1 << (32 - length)):
        raise InvalidConfig(f"{name} {address} is not aligned to a /{length} subnet")
    return address
