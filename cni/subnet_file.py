"""The node -> CNI contract: the subnet file the agent writes and the plugin and `vxlan-net doctor` read.

KEY=VALUE lines: the cluster network and this node's subnet per family, the subnet written as its
gateway (first host) address with the subnet's prefix, as flannel does (`VXLAN_NET_NETWORK` and
`VXLAN_NET_SUBNET` for IPv4, `VXLAN_NET_IPV6_NETWORK` and `VXLAN_NET_IPV6_SUBNET` for IPv6, e.g.
`fd19::/56` and `fd19:0:0:5::1/64`), the pod MTU and whether the agent masquerades. A family's two keys
go together; at least one family is there (an IPv6-only network writes no IPv4 keys). Blank lines and
comments are allowed, values may be quoted, unknown keys are ignored (a newer agent). Standard library
only, so the plugin imports it within its start-up budget and the agent and doctor import the same rules
from here.
"""

import posix  # not os or stat: the plugin's start-up budget
from _stat import S_ISREG

from . import errors as E
from .config import (IPV6, IPV6_MIN_MTU, Record, addr_text, host_mask, ip6_to_int, netmask, network_of, parse_any_cidr,
                     parse_cidr)
from .errors import CniError

KEYS = ("VXLAN_NET_NETWORK", "VXLAN_NET_SUBNET", "VXLAN_NET_MTU", "VXLAN_NET_IPMASQ")
IPV6_KEYS = ("VXLAN_NET_IPV6_NETWORK", "VXLAN_NET_IPV6_SUBNET")
MAX_SIZE = 65536  # bytes; the agent writes ~120 (~190 dual-stack)
MAX_IPV6_SUBNET_PREFIX = 126  # a gateway and at least one pod, as /30 is for IPv4
# Never a pod network: multicast, link-local, IPv4-mapped (value, prefix), tagged.
_NOT_POD_IPV6 = ((ip6_to_int("ff00::"), 8), (ip6_to_int("fe80::"), 10), (ip6_to_int("::ffff:0:0"), 96))


class NotASubnetFile(ValueError):
    """Not a file of ours: a line that is not KEY=VALUE, or no family's network or subnet key."""


class BadSubnetFile(ValueError):
    """Ours, but a key is missing or has a bad value; the message names the key, never the value."""


class NodeSubnet(Record):
    """What the agent leased for this node: the pod subnet per family, the cluster network, the pod MTU.

    The IPv4 fields are None on an IPv6-only network, the IPv6 ones (tagged ints, `config.IPV6`) on an
    IPv4-only network.
    """

    __slots__ = ("network", "network_prefix", "gateway", "prefix", "mtu", "ipmasq",
                 "ipv6_network", "ipv6_network_prefix", "ipv6_gateway", "ipv6_prefix")

    @property
    def subnet(self):
        return None if self.gateway is None else self.gateway & netmask(self.prefix)

    @property
    def ipv6_subnet(self):
        return None if self.ipv6_gateway is None else network_of(self.ipv6_gateway, self.ipv6_prefix)


def _gateway_cidr(subnet: str, ipv6: bool) -> str:
    """`subnet` (a CIDR of the family) as its gateway, the first host address, with the prefix."""
    address, prefix = parse_any_cidr(subnet)
    if (address >= IPV6) != ipv6:
        raise ValueError(f"not an {'IPv6' if ipv6 else 'IPv4'} subnet: {subnet}")
    return f"{addr_text(network_of(address, prefix) + 1)}/{prefix}"


def render(network, subnet, mtu: int, ip_masq: bool, *, ipv6_network=None, ipv6_subnet=None) -> str:
    """The file's text for the networks and subnets (CIDR strings; a family's pair both None when the
    network has no such family); each subnet is written as its gateway. ValueError for no family, half
    a pair, a subnet of the wrong family, or an MTU below 1280 with IPv6: what parse() would refuse."""
    if (network is None) != (subnet is None) or (ipv6_network is None) != (ipv6_subnet is None):
        raise ValueError("a family needs both its network and its subnet")
    if network is None and ipv6_network is None:
        raise ValueError("a subnet file needs an IPv4 or an IPv6 network")
    if ipv6_network is not None and mtu < IPV6_MIN_MTU:  # parse() would refuse the file
        raise ValueError(f"pod MTU {mtu} is below {IPV6_MIN_MTU}, the least IPv6 needs")
    lines = []
    if network is not None:
        lines += [f"VXLAN_NET_NETWORK={network}\n", f"VXLAN_NET_SUBNET={_gateway_cidr(str(subnet), False)}\n"]
    if ipv6_network is not None:
        lines += [f"VXLAN_NET_IPV6_NETWORK={ipv6_network}\n",
                  f"VXLAN_NET_IPV6_SUBNET={_gateway_cidr(str(ipv6_subnet), True)}\n"]
    return "".join(lines) + f"VXLAN_NET_MTU={mtu}\nVXLAN_NET_IPMASQ={'true' if ip_masq else 'false'}\n"


def write(path, network, subnet, mtu: int, ip_masq: bool, *, ipv6_network=None, ipv6_subnet=None) -> None:
    """Replace the file atomically (the plugin may read it at any moment); OSError naming `path`."""
    from .atomic_file import write_atomically  # here: the plugin only reads, and tempfile costs start-up

    write_atomically(path, render(network, subnet, mtu, ip_masq, ipv6_network=ipv6_network,
                                  ipv6_subnet=ipv6_subnet))


def parse(text: str) -> NodeSubnet:
    """The file's values, validated: NotASubnetFile or BadSubnetFile (messages never quote the text)."""
    values = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip() or "\0" in line:
            raise NotASubnetFile("a line is not KEY=VALUE")
        values[key.strip()] = value.strip().strip('"')
    has_ipv6 = any(key in values for key in IPV6_KEYS)
    if not has_ipv6 and ("VXLAN_NET_NETWORK" not in values or "VXLAN_NET_SUBNET" not in values):
        raise NotASubnetFile("VXLAN_NET_NETWORK or VXLAN_NET_SUBNET is missing")
    has_ipv4 = not has_ipv6 or any(key in values for key in KEYS[:2])
    wanted = (KEYS[:2] if has_ipv4 else ()) + (IPV6_KEYS if has_ipv6 else ()) + KEYS[2:]
    missing = [key for key in wanted if key not in values]
    if missing:
        raise BadSubnetFile(f"{', '.join(missing)} missing")
    mtu = values["VXLAN_NET_MTU"]
    if not (mtu.isdigit() and mtu.isascii() and len(mtu) <= 5 and 68 <= int(mtu) <= 65535):
        raise BadSubnetFile("VXLAN_NET_MTU is not an MTU (68..65535)")
    ipmasq = values["VXLAN_NET_IPMASQ"].lower()
    if ipmasq not in ("true", "false"):
        raise BadSubnetFile("VXLAN_NET_IPMASQ is not true or false")
    node = NodeSubnet(mtu=int(mtu), ipmasq=ipmasq == "true")
    if has_ipv4:
        node.network, node.network_prefix, node.gateway, node.prefix = _ipv4_pair(values)
    if has_ipv6:
        node.ipv6_network, node.ipv6_network_prefix, node.ipv6_gateway, node.ipv6_prefix = _ipv6_pair(values)
        if node.mtu < IPV6_MIN_MTU:
            raise BadSubnetFile(f"VXLAN_NET_MTU is below {IPV6_MIN_MTU}, the least IPv6 needs, and the file has IPv6")
    return node


def _ipv4_pair(values: dict):
    try:
        network, network_prefix = parse_cidr(values["VXLAN_NET_NETWORK"])
    except ValueError:
        raise BadSubnetFile("VXLAN_NET_NETWORK is not an IPv4 CIDR") from None
    try:
        gateway, prefix = parse_cidr(values["VXLAN_NET_SUBNET"])
    except ValueError:
        raise BadSubnetFile("VXLAN_NET_SUBNET is not an IPv4 CIDR") from None
    if prefix > 30 or prefix < network_prefix or (gateway & netmask(network_prefix)) != (network & netmask(network_prefix)):
        raise BadSubnetFile("VXLAN_NET_SUBNET is not a /30-or-larger part of VXLAN_NET_NETWORK")
    host = gateway & ~netmask(prefix) & 0xFFFFFFFF
    if host == 0 or host == ~netmask(prefix) & 0xFFFFFFFF:
        raise BadSubnetFile("VXLAN_NET_SUBNET must name the gateway address, not the network or broadcast address")
    return network & netmask(network_prefix), network_prefix, gateway, prefix


def _ipv6_pair(values: dict):
    """The same rules as IPv4's, in 128 bits; no broadcast address, and never a multicast, link-local or
    IPv4-mapped network."""
    def cidr(key):
        text = values[key]
        try:
            if ":" not in text:
                raise ValueError
            return parse_any_cidr(text)
        except ValueError:
            raise BadSubnetFile(f"{key} is not an IPv6 CIDR") from None

    network, network_prefix = cidr("VXLAN_NET_IPV6_NETWORK")
    gateway, prefix = cidr("VXLAN_NET_IPV6_SUBNET")
    for special, length in _NOT_POD_IPV6:
        if network_prefix >= length and network_of(network, length) == special:
            raise BadSubnetFile("VXLAN_NET_IPV6_NETWORK is a multicast, link-local or IPv4-mapped range")
    network = network_of(network, network_prefix)
    if (prefix > MAX_IPV6_SUBNET_PREFIX or prefix < network_prefix
            or network_of(gateway, network_prefix) != network):
        raise BadSubnetFile(f"VXLAN_NET_IPV6_SUBNET is not a /{MAX_IPV6_SUBNET_PREFIX}-or-larger part of "
                            "VXLAN_NET_IPV6_NETWORK")
    if gateway & host_mask(gateway, prefix) == 0:
        raise BadSubnetFile("VXLAN_NET_IPV6_SUBNET must name the gateway address, not the network address")
    return network, network_prefix, gateway, prefix


def not_a_subnet_file(path: str) -> CniError:
    # Names the file, never quotes it: subnetFile may point anywhere, and the
    # runtime shows our message to whoever may read pod events.
    return CniError(E.INVALID_CONFIG, f"not a vxlan-net subnet file: {path}")


def parse_subnet_file(text: str, path: str = "(text)") -> NodeSubnet:
    """parse() for the plugin: CniError code 7 naming the file and the key, never a value or a line."""
    try:
        return parse(text)
    except NotASubnetFile:
        raise not_a_subnet_file(path) from None
    except BadSubnetFile as exc:
        raise CniError(E.INVALID_CONFIG, f"subnet file {path}: {exc}") from None


def read_subnet_file(path: str) -> NodeSubnet:
    """Read and parse the agent's subnet file; anything but a small regular UTF-8 file is not ours.

    Checked before opening (a device may act on open) and after (the name may
    have been swapped); O_NONBLOCK so that a FIFO swapped in cannot hang us.
    """
    try:
        if not S_ISREG(posix.stat(path).st_mode):
            raise not_a_subnet_file(path)
        fd = posix.open(path, posix.O_RDONLY | posix.O_NONBLOCK | posix.O_CLOEXEC)
    except FileNotFoundError:
        raise CniError(E.TRY_AGAIN_LATER, f"subnet file {path} does not exist: is the vxlan-net agent running?") from None
    except OSError as exc:
        raise CniError(E.IO_FAILURE, f"cannot read subnet file {path}: {exc.strerror}") from None
    try:
        if not S_ISREG(posix.fstat(fd).st_mode):
            raise not_a_subnet_file(path)
        raw = posix.read(fd, MAX_SIZE + 1)
    except OSError as exc:
        raise CniError(E.IO_FAILURE, f"cannot read subnet file {path}: {exc.strerror}") from None
    finally:
        posix.close(fd)
    if len(raw) > MAX_SIZE:
        raise not_a_subnet_file(path)
    try:
        text = raw.decode()
    except UnicodeError:
        raise not_a_subnet_file(path) from None
    return parse_subnet_file(text, path)
