"""Pure parsing and validation of what the runtime hands the plugin: env and network config, and the
address plan of an ADD from the node's subnet (the subnet file itself: subnet_file.py).

Addresses are kept as ints and validated with `inet_pton` instead of
`ipaddress`/`dataclasses`: both import `re` and cost more start-up time than
the whole Go reference spends on an ADD (benchmarks/bench_cni.py measures it). Every failure is a
`CniError` with the spec's code; nothing here touches the kernel or the disk (`random_mac` reads
posix.urandom).
"""

import posix
from _socket import AF_INET, inet_ntop, inet_pton

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
    __slots__ = ("dst", "prefix", "gw")

    def to_dict(self) -> dict:
        out = {"dst": f"{int_to_ip(self.dst)}/{self.prefix}"}
        if self.gw is not None:
            out["gw"] = int_to_ip(self.gw)
        return out


class NetConf(Record):
    """One network configuration as our plugin reads it (see `parse_netconf`)."""

    __slots__ = ("cni_version", "name", "subnet_file", "data_dir", "bridge", "mtu",
                 "is_default_gateway", "hairpin", "range_start", "range_end", "range_subnet",
                 "range_gateway", "routes", "requested_ips", "requested_mac", "prev_result",
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
        return ip_to_int(value)
    except ValueError:
        raise CniError(E.INVALID_CONFIG, f"{where}{key} {shown(value)} is not an IPv4 address") from None


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
            dst, prefix = parse_cidr(entry.get("dst"))
        except ValueError as exc:
            raise CniError(E.INVALID_CONFIG, f"ipam.routes dst: {exc}") from None
        if dst & ~netmask(prefix) & 0xFFFFFFFF:
            raise CniError(E.INVALID_CONFIG, f"ipam.routes dst {shown(entry.get('dst'))} has host bits set")
        routes.append(Route(dst, prefix, _ip_field(entry, "gw", "ipam.routes ")))
    return routes


def _range(ipam: dict):
    """(subnet, rangeStart, rangeEnd, gateway) from ipam or its single `ranges` entry."""
    ranges = ipam.get("ranges")
    source, where = ipam, "ipam."
    if ranges is not None:
        if (not isinstance(ranges, list) or len(ranges) != 1 or not isinstance(ranges[0], list)
                or len(ranges[0]) != 1 or not isinstance(ranges[0][0], dict)):
            raise CniError(E.UNSUPPORTED_FIELD, "ipam.ranges: exactly one range set with one range "
                           "(inside the node subnet) is supported")
        source, where = ranges[0][0], "ipam.ranges[0][0]."
    subnet = source.get("subnet")
    if subnet is not None and subnet != "":
        try:
            subnet = parse_cidr(subnet)
        except ValueError as exc:
            raise CniError(E.INVALID_CONFIG, f"{where}subnet: {exc}") from None
    else:
        subnet = None
    return (subnet, _ip_field(source, "rangeStart", where), _ip_field(source, "rangeEnd", where),
            _ip_field(source, "gateway", where))


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
            value = ip_to_int(text)
        except ValueError:
            raise CniError(E.INVALID_CONFIG, f"requested IP {shown(item)} is not an IPv4 address") from None
        if value not in ips:
            ips.append(value)
    if len(ips) > 1:
        raise CniError(E.INVALID_CONFIG, "more than one IPv4 address requested; "
                       "vxlan-net-cni assigns one per interface")
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
    subnet, start, end, gateway = _range(ipam)
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
        range_subnet=subnet, range_start=start, range_end=end, range_gateway=gateway,
        routes=_routes(ipam),
        requested_ips=_requested_ips(conf, env.args) if env.command == "ADD" else [],
        requested_mac=_requested_mac(conf, env.args) if env.command == "ADD" else None,
        prev_result=prev,
        valid_attachments=_attachments(conf) if env.command == "GC" else None,
    )


# -- the address plan for one ADD ------------------------------------------------------

class AddressPlan(Record):
    """Range, gateway, prefix, MTU and routes for the pod, from the node subnet plus overrides."""

    __slots__ = ("start", "end", "gateway", "prefix", "mtu", "routes")


def plan_addresses(conf: NetConf, node) -> AddressPlan:  # node: a subnet_file.NodeSubnet
    mask = netmask(node.prefix)
    subnet = node.subnet
    broadcast = subnet | (~mask & 0xFFFFFFFF)
    if conf.range_subnet is not None and conf.range_subnet != (subnet, node.prefix):
        raise CniError(E.INVALID_CONFIG, f"ipam subnet {int_to_ip(conf.range_subnet[0])}/{conf.range_subnet[1]} "
                       f"is not the node subnet {int_to_ip(subnet)}/{node.prefix}")
    if conf.range_gateway is not None and conf.range_gateway != node.gateway:
        raise CniError(E.INVALID_CONFIG, f"ipam gateway {int_to_ip(conf.range_gateway)} is not the node "
                       f"gateway {int_to_ip(node.gateway)}")
    start = conf.range_start if conf.range_start is not None else subnet + 1
    end = conf.range_end if conf.range_end is not None else broadcast - 1
    for value, key in ((start, "rangeStart"), (end, "rangeEnd")):
        if not subnet < value < broadcast:
            raise CniError(E.INVALID_CONFIG, f"ipam {key} {int_to_ip(value)} is outside the node subnet "
                           f"{int_to_ip(subnet)}/{node.prefix}")
    if start > end:
        raise CniError(E.INVALID_CONFIG, f"ipam rangeStart {int_to_ip(start)} is after rangeEnd {int_to_ip(end)}")
    routes = list(conf.routes)
    if conf.is_default_gateway:
        if not any(r.prefix == 0 for r in routes):
            routes.insert(0, Route(0, 0, node.gateway))
    elif not any((r.dst, r.prefix) == (node.network, node.network_prefix) for r in routes):
        routes.insert(0, Route(node.network, node.network_prefix, node.gateway))
    routes = [r if r.gw is not None else Route(r.dst, r.prefix, node.gateway) for r in routes]
    return AddressPlan(start, end, node.gateway, node.prefix, conf.mtu or node.mtu, routes)
