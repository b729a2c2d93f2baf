"""Pure parsing and validation of what the runtime hands the plugin: env and network config, and the
address plan of an ADD from the node's subnet (the subnet file itself: subnet_file.py).

Addresses are kept as ints (IPv6 ones tagged with the `IPV6` bit, see below) and validated with `inet_pton` instead of
`ipaddress`/`dataclasses`: both import `re` and cost more start-up time than
the whole Go reference spends on an ADD (benchmarks/bench_cni.py measures it). Every failure is a
`CniError` with the spec's code; nothing here touches the kernel or the disk (`random_mac` reads
posix.urandom).
"""

import posix
from _socket import AF_INET, AF_INET6, inet_ntop, inet_pton

from . import errors as E
from .errors import CniError, shown
from .versions import SUPPORTED_VERSIONS
COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "GC", "STATUS")
DEFAULT_SUBNET_FILE = "/run/vxlan-net/subnet.env"
DEFAULT_DATA_DIR = "/var/lib/cni/vxlan-net"
DEFAULT_BRIDGE = "cni0"
IFNAMSIZ = 16
# CNI_ARGS keys the plugin understands; others need IgnoreUnknown=1, as in the reference plugins.
KNOWN_ARGS = ("IP", "MAC", "IgnoreUnknown", "K8S_POD_NAME", "K8S_POD_NAMESPACE",
              "K8S_POD_INFRA_CONTAINER_ID", "K8S_POD_UID")

_ALNUM = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
_ID_CHARS = _ALNUM | frozenset("_.-")
_HEX = frozenset("0123456789abcdefABCDEF")


# -- addresses ---------------------------------------------------------------

def ip_to_int(text) -> int:
    """Strict dotted quad to int; ValueError otherwise."""
    if not isinstance(text, str) or not 7 <= len(text) <= 15:
        raise ValueError(f"not an IPv4 address: {shown(text)}")
    try:
        return int.from_bytes(inet_pton(AF_INET, text), "big")
    except (OSError, UnicodeError):
        raise ValueError(f"not an IPv4 address: {shown(text)}") from None


def int_to_ip(value: int) -> str:
    return inet_ntop(AF_INET, value.to_bytes(4, "big"))


def parse_cidr(text):
    """`a.b.c.d/n` to (address int, prefix length); ValueError otherwise."""
    if not isinstance(text, str) or text.count("/") != 1:
        raise ValueError(f"not an IPv4 CIDR: {shown(text)}")
    addr, _, plen = text.partition("/")
    if not (plen.isdigit() and plen.isascii() and len(plen) <= 2 and int(plen) <= 32):
        raise ValueError(f"bad prefix length in {shown(text)}")
    return ip_to_int(addr), int(plen)


def netmask(prefix: int) -> int:
    return (0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF


# An IPv6 address is its 128-bit value with bit 128 set: one int says its family, the two families never
# collide as keys of one dict (the IPAM store holds both), and IPv4 code keeps its plain ints.
IPV6 = 1 << 128
_ALL6 = IPV6 - 1
IPV6_MIN_MTU = 1280  # RFC 8200; the kernel drops IPv6 from a device with a smaller MTU


def is_ipv6(value: int) -> bool:
    return value >= IPV6


def ip6_to_int(text) -> int:
    """Strict IPv6 text (no zone, no prefix) to its tagged int; ValueError otherwise."""
    if not isinstance(text, str) or not 2 <= len(text) <= 45 or ":" not in text:
        raise ValueError(f"not an IPv6 address: {shown(text)}")
    try:
        return IPV6 | int.from_bytes(inet_pton(AF_INET6, text), "big")
    except (OSError, UnicodeError):
        raise ValueError(f"not an IPv6 address: {shown(text)}") from None


def int_to_ip6(value: int) -> str:
    return inet_ntop(AF_INET6, (value & _ALL6).to_bytes(16, "big"))


def any_ip_to_int(text) -> int:
    """An address of either family: ip_to_int or ip6_to_int (the tagged int)."""
    return ip6_to_int(text) if isinstance(text, str) and ":" in text else ip_to_int(text)


def addr_text(value: int) -> str:
    """int_to_ip or int_to_ip6, by the tag."""
    return int_to_ip6(value) if value >= IPV6 else int_to_ip(value)


def parse_any_cidr(text):
    """`a.b.c.d/n` or `x::y/n` to (address int, tagged for IPv6, prefix length); ValueError otherwise."""
    if not isinstance(text, str) or ":" not in text:
        return parse_cidr(text)
    if text.count("/") != 1:
        raise ValueError(f"not an IPv6 CIDR: {shown(text)}")
    addr, _, plen = text.partition("/")
    if not (plen.isdigit() and plen.isascii() and len(plen) <= 3 and int(plen) <= 128):
        raise ValueError(f"bad prefix length in {shown(text)}")
    return ip6_to_int(addr), int(plen)


def host_mask(value: int, prefix: int) -> int:
    """The host bits of a /prefix in the family of `value` (a tagged int for IPv6)."""
    return (_ALL6 >> prefix) if value >= IPV6 else (0xFFFFFFFF >> prefix)


def network_of(value: int, prefix: int) -> int:
    """The network address of value/prefix, in value's family (the tag kept)."""
    return value & ~host_mask(value, prefix)


def last_of(value: int, prefix: int) -> int:
    """The last address of value/prefix (IPv4's broadcast), in value's family."""
    return value | host_mask(value, prefix)


def family_name(value: int) -> str:
    return "IPv6" if value >= IPV6 else "IPv4"


def parse_mac(text) -> bytes:
    parts = text.split(":") if isinstance(text, str) else []
    if len(parts) != 6 or any(len(p) != 2 or not set(p) <= _HEX for p in parts):
        raise ValueError(f"not a MAC address: {shown(text)}")
    return bytes(int(p, 16) for p in parts)


def format_mac(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


def random_mac() -> bytes:
    """A random unicast, locally administered MAC (pods' bridge and veths, the agent's VTEP)."""
    raw = bytearray(posix.urandom(6))
    raw[0] = (raw[0] & 0xFE) | 0x02
    return bytes(raw)


# -- paths, without os (its import costs ~1 ms of every plugin command) --------

def join_path(directory: str, name: str) -> str:
    """os.path.join for a relative `name`."""
    return directory + name if not directory or directory.endswith("/") else f"{directory}/{name}"


def parent_dir(path: str) -> str:
    """os.path.dirname."""
    head = path[:path.rfind("/") + 1]
    return head.rstrip("/") or head


# -- small validators ----------------------------------------------------------

def valid_ifname(name) -> bool:
    """Linux's dev_valid_name: 1..15 bytes, not . or .., no '/', ':' or whitespace."""
    if not isinstance(name, str) or name in (".", ".."):
        return False
    try:
        raw = name.encode()
    except UnicodeError:
        return False
    return 0 < len(raw) < IFNAMSIZ and not any(c in "/:" or c.isspace() for c in name)


def valid_identifier(value) -> bool:
    """The spec's rule for container IDs and network names: [a-zA-Z0-9][a-zA-Z0-9_.-]*."""
    return (isinstance(value, str) and 0 < len(value) <= 1024 and value[0] in _ALNUM
            and set(value) <= _ID_CHARS)


def _bool(conf: dict, key: str, default: bool) -> bool:
    value = conf.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise CniError(E.INVALID_CONFIG, f"{key} must be true or false, not {shown(value)}")
    return value


def _str(conf: dict, key: str, default: str) -> str:
    value = conf.get(key, default)
    if value is None or value == "":
        return default
    if not isinstance(value, str) or "\0" in value:
        raise CniError(E.INVALID_CONFIG, f"{key} must be a string, not {shown(value)}")
    return value


def _get_ci(obj, *names):
    """Value of the first key matching one of names, ignoring case (containerd capitalises keys)."""
    if not isinstance(obj, dict):
        return None
    wanted = {n.lower() for n in names}
    for key, value in obj.items():
        if isinstance(key, str) and key.lower() in wanted:
            return value
    return None


class Record:
    """A plain record with __slots__: `dataclasses` would import `re` and `inspect` (start-up cost)."""

    __slots__ = ()

    def __init__(self, *values, **named):
        for key, value in zip(self.__slots__, values):
            setattr(self, key, value)
        for key in self.__slots__[len(values):]:
            setattr(self, key, named.get(key))


# -- environment ---------------------------------------------------------------

class Env(Record):
    """The CNI_* variables of one invocation, validated for its command."""

    __slots__ = ("command", "container_id", "netns", "ifname", "args", "path")


def parse_cni_args(text: str) -> dict:
    """`K=V;K=V` to a dict; unknown keys are an error unless IgnoreUnknown is set."""
    args = {}
    for pair in text.split(";"):
        if not pair:
            continue
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CniError(E.INVALID_ENV, f"CNI_ARGS: invalid pair {shown(pair)}, want KEY=VALUE")
        args[key] = value
    ignore = args.get("IgnoreUnknown", "").lower() in ("1", "true")
    unknown = sorted(k for k in args if k not in KNOWN_ARGS)
    if unknown and not ignore:
        raise CniError(E.INVALID_ENV, f"CNI_ARGS: unknown keys {', '.join(unknown)} (set IgnoreUnknown=1 to allow)")
    return args


def parse_env(environ) -> Env:
    command = environ.get("CNI_COMMAND", "")
    if command not in COMMANDS:
        raise CniError(E.INVALID_ENV, f"CNI_COMMAND {shown(command)} is not one of {', '.join(COMMANDS)}")
    container_id = environ.get("CNI_CONTAINERID", "")
    netns = environ.get("CNI_NETNS", "")
    ifname = environ.get("CNI_IFNAME", "")
    if command in ("ADD", "DEL", "CHECK"):
        if not container_id:
            raise CniError(E.INVALID_ENV, "CNI_CONTAINERID is required")
        if not valid_identifier(container_id):
            raise CniError(E.INVALID_ENV, f"CNI_CONTAINERID {shown(container_id)} is invalid: "
                                          "want [a-zA-Z0-9][a-zA-Z0-9_.-]*")
        if not ifname:
            raise CniError(E.INVALID_ENV, "CNI_IFNAME is required")
        if not valid_ifname(ifname):
            raise CniError(E.INVALID_ENV, f"CNI_IFNAME {shown(ifname)} is invalid: want 1-15 bytes, "
                                          "no '/', ':' or whitespace")
        if command != "DEL" and not netns:
            raise CniError(E.INVALID_ENV, "CNI_NETNS is required")
        if "\0" in netns:
            raise CniError(E.INVALID_ENV, "CNI_NETNS contains a NUL byte")
    args = parse_cni_args(environ.get("CNI_ARGS", "")) if command in ("ADD", "CHECK", "DEL") else {}
    return Env(command, container_id, netns, ifname, args, environ.get("CNI_PATH", ""))


# -- network config --------------------------------------------------------------

class Route(Record):
    """A pod route of either family (dst and gw tagged ints for IPv6)."""

    __slots__ = ("dst", "prefix", "gw")

    def to_dict(self) -> dict:
        out = {"dst": f"{addr_text(self.dst)}/{self.prefix}"}
        if self.gw is not None:
            out["gw"] = addr_text(self.gw)
        return out


class RangeConf(Record):
    """One range set of ipam.ranges (one range in it), as configured: each field None when not given.

    `subnet` is (address, prefix); `family` 4 or 6 from the fields given, None when none is.
    """

    __slots__ = ("subnet", "start", "end", "gateway", "family")


class NetConf(Record):
    """One network configuration as our plugin reads it (see `parse_netconf`)."""

    __slots__ = ("cni_version", "name", "subnet_file", "data_dir", "bridge", "mtu",
                 "is_default_gateway", "hairpin", "ranges", "routes", "requested_ips", "requested_mac", "prev_result",
                 "valid_attachments")


def decode_config(stdin: bytes) -> dict:
    from .jsonfast import loads

    try:
        conf = loads(stdin.decode())
    except UnicodeError as exc:
        raise CniError(E.DECODE, f"network config is not UTF-8: {exc}") from None
    except ValueError as exc:
        raise CniError(E.DECODE, f"network config is not valid JSON: {exc}") from None
    if not isinstance(conf, dict):
        raise CniError(E.DECODE, f"network config must be a JSON object, not {type(conf).__name__}")
    return conf


def check_version(conf: dict, command: str) -> str:
    version = conf.get("cniVersion")
    if version is None:
        raise CniError(E.INCOMPATIBLE_VERSION, "config has no cniVersion (that means 0.1.0); "
                       f"supported: {', '.join(SUPPORTED_VERSIONS)}")
    if version not in SUPPORTED_VERSIONS:
        raise CniError(E.INCOMPATIBLE_VERSION, f"cniVersion {shown(version)} is not supported; "
                       f"supported: {', '.join(SUPPORTED_VERSIONS)}")
    minimum = {"CHECK": "0.4.0", "GC": "1.1.0", "STATUS": "1.1.0"}.get(command)
    if minimum and _version_tuple(version) < _version_tuple(minimum):
        raise CniError(E.INCOMPATIBLE_VERSION, f"{command} needs cniVersion >= {minimum}, config has {version}")
    return version


def _version_tuple(version: str):
    return tuple(int(p) for p in version.split("."))


def _ip_field(obj: dict, key: str, where: str):
    value = obj.get(key)
    if value is None or value == "":
        return None
    try:
        return any_ip_to_int(value)
    except ValueError:
        raise CniError(E.INVALID_CONFIG, f"{where}{key} {shown(value)} is not an IP address") from None


def _routes(ipam: dict) -> list:
    raw = ipam.get("routes")
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise CniError(E.INVALID_CONFIG, "ipam.routes must be a list")
    routes = []
    for entry in raw:
        if not isinstance(entry, dict):
            raise CniError(E.INVALID_CONFIG, f"ipam.routes entry {shown(entry)} must be an object")
        try:
            dst, prefix = parse_any_cidr(entry.get("dst"))
        except ValueError as exc:
            raise CniError(E.INVALID_CONFIG, f"ipam.routes dst: {exc}") from None
        if dst & host_mask(dst, prefix):
            raise CniError(E.INVALID_CONFIG, f"ipam.routes dst {shown(entry.get('dst'))} has host bits set")
        gw = _ip_field(entry, "gw", "ipam.routes ")
        if gw is not None and is_ipv6(gw) != is_ipv6(dst):
            raise CniError(E.INVALID_CONFIG, f"ipam.routes dst {shown(entry.get('dst'))} and its gw are "
                           "of different families")
        routes.append(Route(dst, prefix, gw))
    return routes


def _ranges(ipam: dict):
    """The configured range sets: host-local's `ranges` (one range per set, at most one set per family),
    or its legacy top-level subnet/rangeStart/rangeEnd/gateway as one set; None when neither is given
    (the node's families, from the subnet file)."""
    raw = ipam.get("ranges")
    if raw is None:
        if not any(ipam.get(key) not in (None, "") for key in ("subnet", "rangeStart", "rangeEnd", "gateway")):
            return None
        return [_range(ipam, "ipam.")]
    if (not isinstance(raw, list) or not 1 <= len(raw) <= 2
            or not all(isinstance(rs, list) and len(rs) == 1 and isinstance(rs[0], dict) for rs in raw)):
        raise CniError(E.UNSUPPORTED_FIELD, "ipam.ranges: one or two range sets (one per address family) "
                       "with one range each (inside the node subnet) are supported")
    ranges = [_range(rs[0], f"ipam.ranges[{i}][0].") for i, rs in enumerate(raw)]
    families = [r.family for r in ranges if r.family is not None]
    if len(set(families)) != len(families):
        raise CniError(E.INVALID_CONFIG, f"ipam.ranges: two range sets for IPv{families[0]}; "
                       "one address per family is assigned")
    return ranges


def _range(source: dict, where: str) -> RangeConf:
    subnet = source.get("subnet")
    if subnet is not None and subnet != "":
        try:
            subnet = parse_any_cidr(subnet)
        except ValueError as exc:
            raise CniError(E.INVALID_CONFIG, f"{where}subnet: {exc}") from None
    else:
        subnet = None
    fields = {key: _ip_field(source, key, where) for key in ("rangeStart", "rangeEnd", "gateway")}
    given = ([subnet[0]] if subnet else []) + [v for v in fields.values() if v is not None]
    families = {6 if is_ipv6(v) else 4 for v in given}
    if len(families) > 1:
        raise CniError(E.INVALID_CONFIG, f"{where[:-1]} mixes IPv4 and IPv6 addresses")
    return RangeConf(subnet, fields["rangeStart"], fields["rangeEnd"], fields["gateway"],
                     families.pop() if families else None)


def _requested_ips(conf: dict, args: dict) -> list:
    """Requested addresses from CNI_ARGS IP=, args.cni.ips and runtimeConfig.ips, in that order."""
    raw = []
    if args.get("IP"):
        raw.extend(args["IP"].split(","))
    cni_args = _get_ci(conf.get("args"), "cni")
    for source, where in ((_get_ci(cni_args, "ips"), "args.cni.ips"),
                          (_get_ci(conf.get("runtimeConfig"), "ips"), "runtimeConfig.ips")):
        if source is None:
            continue
        if not isinstance(source, list):
            raise CniError(E.INVALID_CONFIG, f"{where} must be a list of addresses")
        raw.extend(source)
    ips = []
    for item in raw:
        text = item.partition("/")[0] if isinstance(item, str) else item
        try:
            value = any_ip_to_int(text)
        except ValueError:
            raise CniError(E.INVALID_CONFIG, f"requested IP {shown(item)} is not an IP address") from None
        if value not in ips:
            ips.append(value)
    for family in ("IPv4", "IPv6"):
        if sum(family_name(v) == family for v in ips) > 1:
            raise CniError(E.INVALID_CONFIG, f"more than one {family} address requested; "
                           "vxlan-net-cni assigns one per family and interface")
    return ips


def _requested_mac(conf: dict, args: dict):
    value = args.get("MAC") or _get_ci(conf.get("runtimeConfig"), "mac") or None
    if value is None:
        return None
    try:
        mac = parse_mac(value)
    except ValueError:
        raise CniError(E.INVALID_CONFIG, f"requested MAC {shown(value)} is not a MAC address") from None
    if mac[0] & 1:
        raise CniError(E.INVALID_CONFIG, f"requested MAC {shown(value)} is a multicast address")
    return mac


def _attachments(conf: dict):
    raw = conf.get("cni.dev/valid-attachments")
    if raw is None:
        raw = conf.get("cni.dev/attachments")
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise CniError(E.INVALID_CONFIG, "cni.dev/valid-attachments must be a list")
    out = set()
    for item in raw:
        cid = _get_ci(item, "containerID")
        ifname = _get_ci(item, "ifname")
        if not isinstance(cid, str) or not isinstance(ifname, str):
            raise CniError(E.INVALID_CONFIG, f"attachment {shown(item)} needs containerID and ifname strings")
        out.add((cid, ifname))
    return out


def parse_netconf(conf: dict, env: Env) -> NetConf:
    """Validate a decoded network config for env.command; unknown keys are ignored."""
    version = check_version(conf, env.command)
    name = conf.get("name")
    if not valid_identifier(name):
        raise CniError(E.INVALID_CONFIG, f"name {shown(name)} is missing or invalid: want [a-zA-Z0-9][a-zA-Z0-9_.-]*")
    if not isinstance(conf.get("type"), str) or not conf.get("type"):
        raise CniError(E.INVALID_CONFIG, "type is missing")
    bridge = _str(conf, "bridge", DEFAULT_BRIDGE)
    if not valid_ifname(bridge):
        raise CniError(E.INVALID_CONFIG, f"bridge {shown(bridge)} is not a valid interface name")
    mtu = conf.get("mtu")
    if mtu is not None and (isinstance(mtu, bool) or not isinstance(mtu, int) or not 68 <= mtu <= 65535):
        raise CniError(E.INVALID_CONFIG, f"mtu must be an integer in 68..65535, not {shown(mtu)}")
    ipam = conf.get("ipam")
    if ipam is None:
        ipam = {}
    if not isinstance(ipam, dict):
        raise CniError(E.INVALID_CONFIG, "ipam must be an object")
    if ipam.get("type") not in (None, "", "host-local", "vxlan-net", "vxlan-net-cni"):
        raise CniError(E.UNSUPPORTED_FIELD, f"ipam.type {shown(ipam.get('type'))} is not supported: "
                       "vxlan-net-cni allocates from the node subnet itself")
    ranges = _ranges(ipam)
    prev = conf.get("prevResult")
    if prev is not None and not isinstance(prev, dict):
        raise CniError(E.INVALID_CONFIG, "prevResult must be an object")
    return NetConf(
        cni_version=version, name=name,
        subnet_file=_str(conf, "subnetFile", DEFAULT_SUBNET_FILE),
        data_dir=_str(conf, "dataDir", DEFAULT_DATA_DIR),
        bridge=bridge, mtu=mtu,
        is_default_gateway=_bool(conf, "isDefaultGateway", True),
        hairpin=_bool(conf, "hairpinMode", True),
        ranges=ranges,
        routes=_routes(ipam),
        requested_ips=_requested_ips(conf, env.args) if env.command == "ADD" else [],
        requested_mac=_requested_mac(conf, env.args) if env.command == "ADD" else None,
        prev_result=prev,
        valid_attachments=_attachments(conf) if env.command == "GC" else None,
    )


# -- the address plan for one ADD ------------------------------------------------------

class FamilyPlan(Record):
    """One address to assign: range set `index` (host-local's last_reserved_ip.<index>), its range
    start..end, the gateway and the prefix. Tagged ints for IPv6."""

    __slots__ = ("index", "start", "end", "gateway", "prefix")

    @property
    def size(self) -> int:
        """Addresses the range can give (the gateway is never given)."""
        return self.end - self.start + 1 - (self.start <= self.gateway <= self.end)


class AddressPlan(Record):
    """One FamilyPlan per address family the pod gets (IPv4 first), the MTU and the routes of both."""

    __slots__ = ("families", "mtu", "routes")


def _node_families(node) -> list:
    """(gateway, prefix, network, network prefix) of each family the node subnet has, IPv4 first."""
    out = []
    if node.gateway is not None:
        out.append((node.gateway, node.prefix, node.network, node.network_prefix))
    if node.ipv6_gateway is not None:
        out.append((node.ipv6_gateway, node.ipv6_prefix, node.ipv6_network, node.ipv6_network_prefix))
    return out


def _family_plan(index: int, conf_range, gateway: int, prefix: int) -> FamilyPlan:
    subnet, last = network_of(gateway, prefix), last_of(gateway, prefix)
    node_text = f"{addr_text(subnet)}/{prefix}"
    if conf_range.subnet is not None and conf_range.subnet != (subnet, prefix):
        raise CniError(E.INVALID_CONFIG, f"ipam subnet {addr_text(conf_range.subnet[0])}/{conf_range.subnet[1]} "
                       f"is not the node subnet {node_text}")
    if conf_range.gateway is not None and conf_range.gateway != gateway:
        raise CniError(E.INVALID_CONFIG, f"ipam gateway {addr_text(conf_range.gateway)} is not the node "
                       f"gateway {addr_text(gateway)}")
    # host-local's defaults: IPv4 ends before the broadcast address, IPv6 at the subnet's last address.
    highest = last if is_ipv6(gateway) else last - 1
    start = conf_range.start if conf_range.start is not None else subnet + 1
    end = conf_range.end if conf_range.end is not None else highest
    for value, key in ((start, "rangeStart"), (end, "rangeEnd")):
        if not subnet < value <= highest:
            raise CniError(E.INVALID_CONFIG, f"ipam {key} {addr_text(value)} is outside the node subnet {node_text}")
    if start > end:
        raise CniError(E.INVALID_CONFIG, f"ipam rangeStart {addr_text(start)} is after rangeEnd {addr_text(end)}")
    return FamilyPlan(index, start, end, gateway, prefix)


def plan_addresses(conf: NetConf, node) -> AddressPlan:  # node: a subnet_file.NodeSubnet
    """The node's families, or the configured range sets matched to them by family (a set that names
    no address takes the node's first family no other set names)."""
    by_family = {("IPv6" if is_ipv6(f[0]) else "IPv4"): f for f in _node_families(node)}
    ranges = conf.ranges if conf.ranges is not None else [RangeConf() for _ in by_family]
    named = {f"IPv{r.family}" for r in ranges if r.family is not None}
    unnamed = [family for family in by_family if family not in named]
    families, plans = [], []
    for index, conf_range in enumerate(ranges):
        if conf_range.family is not None:
            family = f"IPv{conf_range.family}"
        elif unnamed:
            family = unnamed.pop(0)
        else:
            raise CniError(E.INVALID_CONFIG, f"ipam range set {index} names no address and the node subnet "
                           "has no family left for it")
        if family not in by_family:
            raise CniError(E.INVALID_CONFIG, f"ipam range set {index} is {family}, and the node subnet has no "
                           f"{family} subnet")
        families.append(by_family[family])
        plans.append(_family_plan(index, conf_range, *by_family[family][:2]))
    gateways = {is_ipv6(gw): gw for gw, *_ in families}
    routes = list(conf.routes)
    for route in routes:
        if is_ipv6(route.dst) not in gateways:
            raise CniError(E.INVALID_CONFIG, f"ipam.routes dst {addr_text(route.dst)}/{route.prefix}: the pod "
                           f"gets no {family_name(route.dst)} address")
    default_routes = []
    for gateway, _prefix, network, network_prefix in families:
        same = [r for r in routes if is_ipv6(r.dst) == is_ipv6(gateway)]
        if conf.is_default_gateway:
            if not any(r.prefix == 0 for r in same):
                default_routes.append(Route(network_of(gateway, 0), 0, gateway))
        elif not any((r.dst, r.prefix) == (network, network_prefix) for r in same):
            default_routes.append(Route(network, network_prefix, gateway))
    routes = default_routes + [r if r.gw is not None else Route(r.dst, r.prefix, gateways[is_ipv6(r.dst)])
                               for r in routes]
    mtu = conf.mtu or node.mtu
    if mtu < IPV6_MIN_MTU and any(is_ipv6(f.gateway) for f in plans):
        raise CniError(E.INVALID_CONFIG, f"mtu {mtu} is below {IPV6_MIN_MTU}, the least IPv6 needs, and the pod "
                       "gets an IPv6 address")
    return AddressPlan(plans, mtu, routes)
