"""The node -> CNI contract: the subnet file the agent writes and the plugin and `vxlan-net doctor` read.

KEY=VALUE lines, the four KEYS, each required: the cluster network, this node's subnet written as its
gateway (first host) address with the subnet's prefix, as flannel does, the pod MTU and whether the
agent masquerades. Blank lines and comments are allowed, values may be quoted, unknown keys are ignored
(a newer agent). Standard library only, so the plugin imports it within its start-up budget and the
agent and doctor import the same rules from here.
"""

import posix  # not os or stat: the plugin's start-up budget
from _stat import S_ISREG

from . import errors as E
from .config import Record, int_to_ip, netmask, parse_cidr
from .errors import CniError

KEYS = ("VXLAN_NET_NETWORK", "VXLAN_NET_SUBNET", "VXLAN_NET_MTU", "VXLAN_NET_IPMASQ")
MAX_SIZE = 65536  # bytes; the agent writes ~120


class NotASubnetFile(ValueError):
    """Not a file of ours: a line that is not KEY=VALUE, or the network or subnet key missing."""


class BadSubnetFile(ValueError):
    """Ours, but a key is missing or has a bad value; the message names the key, never the value."""


class NodeSubnet(Record):
    """What the agent leased for this node: the pod subnet, the cluster network, the pod MTU."""

    __slots__ = ("network", "network_prefix", "gateway", "prefix", "mtu", "ipmasq")

    @property
    def subnet(self) -> int:
        return self.gateway & netmask(self.prefix)


def render(network: str, subnet: str, mtu: int, ip_masq: bool) -> str:
    """The file's text for `network` and `subnet` (CIDR strings); the subnet is written as its gateway."""
    address, prefix = parse_cidr(subnet)
    gateway = (address & netmask(prefix)) + 1
    return (f"VXLAN_NET_NETWORK={network}\n"
            f"VXLAN_NET_SUBNET={int_to_ip(gateway)}/{prefix}\n"
            f"VXLAN_NET_MTU={mtu}\n"
            f"VXLAN_NET_IPMASQ={'true' if ip_masq else 'false'}\n")


def write(path, network: str, subnet: str, mtu: int, ip_masq: bool) -> None:
    """Replace the file atomically (the plugin may read it at any moment); OSError naming `path`."""
    from .atomic_file import write_atomically  # here: the plugin only reads, and tempfile costs start-up

    write_atomically(path, render(network, subnet, mtu, ip_masq))


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
    if "VXLAN_NET_NETWORK" not in values or "VXLAN_NET_SUBNET" not in values:
        raise NotASubnetFile("VXLAN_NET_NETWORK or VXLAN_NET_SUBNET is missing")
    missing = [key for key in KEYS if key not in values]
    if missing:
        raise BadSubnetFile(f"{', '.join(missing)} missing")
    try:
        network, network_prefix = parse_cidr(values["VXLAN_NET_NETWORK"])
    except ValueError:
        raise BadSubnetFile("VXLAN_NET_NETWORK is not an IPv4 CIDR") from None
    try:
        gateway, prefix = parse_cidr(values["VXLAN_NET_SUBNET"])
    except ValueError:
        raise BadSubnetFile("VXLAN_NET_SUBNET is not an IPv4 CIDR") from None
    mtu = values["VXLAN_NET_MTU"]
    if not (mtu.isdigit() and mtu.isascii() and len(mtu) <= 5 and 68 <= int(mtu) <= 65535):
        raise BadSubnetFile("VXLAN_NET_MTU is not an MTU (68..65535)")
    ipmasq = values["VXLAN_NET_IPMASQ"].lower()
    if ipmasq not in ("true", "false"):
        raise BadSubnetFile("VXLAN_NET_IPMASQ is not true or false")
    if prefix > 30 or prefix < network_prefix or (gateway & netmask(network_prefix)) != (network & netmask(network_prefix)):
        raise BadSubnetFile("VXLAN_NET_SUBNET is not a /30-or-larger part of VXLAN_NET_NETWORK")
    host = gateway & ~netmask(prefix) & 0xFFFFFFFF
    if host == 0 or host == ~netmask(prefix) & 0xFFFFFFFF:
        raise BadSubnetFile("VXLAN_NET_SUBNET must name the gateway address, not the network or broadcast address")
    return NodeSubnet(network & netmask(network_prefix), network_prefix, gateway, prefix, int(mtu), ipmasq == "true")


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
