"""The rtnetlink wire format, with the standard library's C modules: message header, attributes, request
building, ack and dump parsing. One module for both users:

- the plugin, whose start-up budget rules out pyroute2 (importing it alone costs ~10x a whole Go ADD,
  see benchmarks/bench_cni.py): it needs a dozen fixed request shapes (link/addr/route new, del, get,
  dump), sent in batches over `Netlink` (each ADD sends two); errors come back as `NetlinkError`;
- the agent's bulk path in `vxlan_net.doors.kernel` (reading and writing thousands of overlay entries):
  it builds its requests and walks the kernel's answers with `request`, `attr`, `messages`,
  `attributes`, `error_code` and `ack_reason` over its own socket.
"""

import posix  # not os: the plugin's start-up budget
from _socket import socket
from _struct import pack, unpack_from

from .config import IPV6  # IPv6 addresses are tagged ints (config.py), so one int carries its family

AF_NETLINK = 16
AF_UNSPEC, AF_INET, AF_BRIDGE, AF_INET6 = 0, 2, 7, 10
SOCK_RAW, SOCK_CLOEXEC = 3, 0o2000000
NETLINK_ROUTE = 0
SOL_NETLINK = 270
NETLINK_CAP_ACK, NETLINK_EXT_ACK, NETLINK_GET_STRICT_CHK = 10, 11, 12

NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP_INTR, NLM_F_DUMP = 0x1, 0x4, 0x10, 0x300
NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE = 0x100, 0x200, 0x400  # in a new-request
# In an error answer: only the failed request's header is echoed; extended-ack attributes follow.
NLM_F_CAPPED, NLM_F_ACK_TLVS = 0x100, 0x200
NLMSGERR_ATTR_MSG = 1

RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_GETADDR = 20, 22
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWNEIGH, RTM_DELNEIGH, RTM_GETNEIGH = 28, 29, 30

IFF_UP = 0x1
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_LINK, IFLA_MASTER = 1, 3, 4, 5, 10
IFLA_LINKINFO, IFLA_NET_NS_FD = 18, 28
IFLA_INFO_KIND, IFLA_INFO_DATA, IFLA_INFO_SLAVE_KIND, IFLA_INFO_SLAVE_DATA = 1, 2, 4, 5
VETH_INFO_PEER = 1
IFLA_BRPORT_MODE = 4  # hairpin
IFA_ADDRESS, IFA_LOCAL, IFA_FLAGS = 1, 2, 8
IFA_F_NODAD = 0x02  # an IPv6 address usable at once: no duplicate address detection
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PRIORITY, RTA_MULTIPATH, RTA_TABLE = 1, 4, 5, 6, 9, 15
RT_TABLE_MAIN, RTPROT_BOOT, RT_SCOPE_UNIVERSE, RTN_UNICAST = 254, 3, 0, 1  # table, protocol, scope, type
RTNH_F_ONLINK = 4
NDA_DST, NDA_LLADDR, NDA_IFINDEX = 1, 2, 8
NUD_PERMANENT = 0x80
NTF_SELF = 0x02

ENODEV, EEXIST = 19, 17


def netns_id() -> int:
    """The calling thread's network namespace, by its inode number: the one a netlink socket it opens
    belongs to, and the one the plugin names when it asks the agent for something."""
    return posix.stat("/proc/thread-self/ns/net").st_ino


def socket_owner() -> tuple[int, int]:
    """(process, network namespace) of the caller: what a netlink socket kept open belongs to. A forked
    child, or a thread that entered another namespace, must open its own."""
    return posix.getpid(), netns_id()


class NetlinkError(OSError):
    """The kernel refused a request; `errno` says why."""


# -- the wire format ------------------------------------------------------------------------------


def request(kind: int, flags: int, seq: int, body: bytes) -> bytes:
    """One message: the 16-byte header (length, type, flags, seq, port 0) and `body`."""
    return pack("=LHHLL", 16 + len(body), kind, flags, seq, 0) + body


def messages(data: bytes):
    """(offset, length, type, flags, seq) of each netlink message in one datagram."""
    offset, end = 0, len(data)
    while offset + 16 <= end:
        length, kind, flags, seq, _pid = unpack_from("=LHHLL", data, offset)
        if length < 16:
            return
        yield offset, length, kind, flags, seq
        offset += (length + 3) & ~3


def attributes(data: bytes, offset: int, end: int):
    """(type, payload offset, payload length) of each attribute in data[offset:end]."""
    while offset + 4 <= end:
        length, kind = unpack_from("=HH", data, offset)
        if length < 4:
            return
        yield kind & 0x3FFF, offset + 4, length - 4
        offset += (length + 3) & ~3


def error_code(data: bytes, offset: int) -> int:
    """The errno an NLMSG_ERROR message at `offset` carries; 0 for an ack."""
    return -unpack_from("=i", data, offset + 16)[0]


def ack_reason(data: bytes, offset: int, length: int, flags: int, code: int) -> str:
    """strerror(code), and the kernel's own words when it sent extended-ack attributes."""
    reason = posix.strerror(code)
    if flags & NLM_F_ACK_TLVS:
        inner = offset + 20
        inner_len = 16 if flags & NLM_F_CAPPED else unpack_from("=I", data, inner)[0]
        for kind, at, size in attributes(data, inner + ((inner_len + 3) & ~3), offset + length):
            if kind == NLMSGERR_ATTR_MSG:
                reason += ": " + data[at:at + size].rstrip(b"\0").decode(errors="replace")
    return reason


def attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def attr_str(kind: int, text: str) -> bytes:
    return attr(kind, text.encode() + b"\0")


def attr_u32(kind: int, value: int) -> bytes:
    return attr(kind, pack("=I", value))


def ifinfo(index: int = 0, up: bool = False, family: int = AF_UNSPEC) -> bytes:
    flags = IFF_UP if up else 0
    return pack("=BxHiII", family, 0, index, flags, flags)


def by_name(name: str) -> bytes:
    """An ifinfomsg body naming the link by IFLA_IFNAME (no index)."""
    return ifinfo() + attr_str(IFLA_IFNAME, name)


def parse_attrs(data: bytes, offset: int, end: int) -> dict:
    """{type: payload} of the attributes in data[offset:end]."""
    return {kind: data[at:at + size] for kind, at, size in attributes(data, offset, end)}


def _u32(attrs: dict, kind: int, default=0) -> int:
    return unpack_from("=I", attrs[kind])[0] if kind in attrs else default


class Link:
    """What a link dump/get tells about one interface."""

    __slots__ = ("index", "name", "flags", "mac", "mtu", "master", "peer_index", "kind", "port_data")

    def __init__(self, data: bytes, offset: int, end: int):
        _, _, self.index, self.flags, _ = unpack_from("=BxHiII", data, offset + 16)
        attrs = parse_attrs(data, offset + 32, end)
        self.name = attrs.get(IFLA_IFNAME, b"\0").split(b"\0", 1)[0].decode(errors="replace")
        self.mac = attrs.get(IFLA_ADDRESS, b"")
        self.mtu = _u32(attrs, IFLA_MTU)
        self.master = _u32(attrs, IFLA_MASTER)
        self.peer_index = _u32(attrs, IFLA_LINK)
        info = attrs.get(IFLA_LINKINFO, b"")
        info = parse_attrs(info, 0, len(info))
        self.kind = info.get(IFLA_INFO_KIND, b"").split(b"\0", 1)[0].decode(errors="replace")
        self.port_data = info.get(IFLA_INFO_SLAVE_DATA, b"")  # bridge port attributes, parsed on demand

    @property
    def hairpin(self) -> bool:
        mode = parse_attrs(self.port_data, 0, len(self.port_data)).get(IFLA_BRPORT_MODE)
        return bool(mode and mode[0])


def _ip(raw: bytes, family: int) -> int:
    """An address attribute's payload as an int, tagged for IPv6 (config.IPV6)."""
    return IPV6 | int.from_bytes(raw[:16], "big") if family == AF_INET6 else int.from_bytes(raw[:4], "big")


def _raw(ip: int) -> bytes:
    """The wire bytes of an int address, 16 for a tagged IPv6 one, else 4."""
    return (ip - IPV6).to_bytes(16, "big") if ip >= IPV6 else ip.to_bytes(4, "big")


class Address:
    """An address of either family; `ip` tagged for IPv6."""

    __slots__ = ("index", "prefix", "ip")

    def __init__(self, data: bytes, offset: int, end: int):
        family, self.prefix, _, _, self.index = unpack_from("=BBBBi", data, offset + 16)
        attrs = parse_attrs(data, offset + 24, end)
        raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS) or bytes(16)
        self.ip = _ip(raw, family)


class RouteEntry:
    """A route of either family; `dst` and `gw` tagged for IPv6 (a default IPv6 route's dst is IPV6)."""

    __slots__ = ("dst", "prefix", "gw", "oif", "table")

    def __init__(self, data: bytes, offset: int, end: int):
        family, self.prefix, _, _, table, _, _, _, _ = unpack_from("=BBBBBBBBI", data, offset + 16)
        attrs = parse_attrs(data, offset + 28, end)
        self.table = _u32(attrs, RTA_TABLE, table)
        self.dst = _ip(attrs[RTA_DST], family) if RTA_DST in attrs else (IPV6 if family == AF_INET6 else 0)
        self.gw = _ip(attrs[RTA_GATEWAY], family) if RTA_GATEWAY in attrs else None
        self.oif = _u32(attrs, RTA_OIF)


_PARSERS = {RTM_NEWLINK: Link, RTM_NEWADDR: Address, RTM_NEWROUTE: RouteEntry}


class Netlink:
    """One NETLINK_ROUTE socket, bound to the network namespace it was created in."""

    def __init__(self):
        self.sock = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE)
        self.sock.bind((0, 0))
        self.seq = 0

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def batch(self, requests):
        """Send [(type, flags, body)] in one write; return [(errno, [parsed replies])] in order.

        The kernel handles the messages in order, so a batch is one round trip.
        """
        seqs, chunks = [], []
        for kind, flags, body in requests:
            self.seq += 1
            seqs.append(self.seq)
            chunks.append(request(kind, flags | NLM_F_REQUEST | NLM_F_ACK, self.seq, body))
        self.sock.send(b"".join(chunks))
        results = {seq: [None, []] for seq in seqs}
        pending = len(seqs)
        for _ in range(1_000_000):  # bounded: a dump of a huge table still ends
            if not pending:
                break
            data = self.sock.recv(65536)
            for offset, length, kind, _flags, seq in messages(data):
                slot = results.get(seq)
                if slot is not None and slot[0] is None:
                    if kind == NLMSG_ERROR:
                        slot[0] = error_code(data, offset)
                        pending -= 1
                    elif kind == NLMSG_DONE:
                        slot[0] = 0
                        pending -= 1
                    else:
                        parser = _PARSERS.get(kind)
                        if parser is not None:
                            slot[1].append(parser(data, offset, offset + length))
        return [tuple(results[seq]) for seq in seqs]

    def call(self, kind, flags, body, ok=()):
        """One request; raise NetlinkError unless it succeeded or failed with an errno in `ok`."""
        err, replies = self.batch([(kind, flags, body)])[0]
        if err and err not in ok:
            raise NetlinkError(err, posix.strerror(err))
        return err, replies

    # -- the few request shapes the plugin needs -------------------------------------

    def get_link(self, name: str):
        return found_link(self.batch([get_link(name)])[0])

    def links(self):
        return self.call(RTM_GETLINK, NLM_F_DUMP, ifinfo())[1]

    def addresses(self, family: int = AF_INET):
        return dumped(self.batch([dump_addresses(family)])[0])

    def routes(self, family: int = AF_INET):
        return dumped(self.batch([dump_routes(family)])[0])

    def delete_link(self, name: str) -> bool:
        """True when deleted, False when it did not exist."""
        err, _ = self.call(RTM_DELLINK, 0, by_name(name), ok=(ENODEV,))
        return not err


def new_bridge(name: str, mtu: int, mac: bytes):
    body = (ifinfo(up=True) + attr_str(IFLA_IFNAME, name) + attr_u32(IFLA_MTU, mtu) + attr(IFLA_ADDRESS, mac)
            + attr(IFLA_LINKINFO, attr_str(IFLA_INFO_KIND, "bridge")))
    return RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, body


def set_up(index: int):
    return RTM_NEWLINK, 0, ifinfo(index, up=True)


def new_veth(host: str, peer: str, mtu: int, master: int, peer_mac: bytes, peer_netns_fd: int):
    """A veth pair, host end up and enslaved to `master`, peer created (down) inside the target netns.

    The peer cannot be created up: the kernel opens it before the pair is
    joined and veth_open() fails with ENOTCONN.
    """
    peer_body = (ifinfo() + attr_str(IFLA_IFNAME, peer) + attr_u32(IFLA_MTU, mtu)
                 + attr(IFLA_ADDRESS, peer_mac) + attr_u32(IFLA_NET_NS_FD, peer_netns_fd))
    info = attr_str(IFLA_INFO_KIND, "veth") + attr(IFLA_INFO_DATA, attr(VETH_INFO_PEER, peer_body))
    body = (ifinfo(up=True) + attr_str(IFLA_IFNAME, host) + attr_u32(IFLA_MTU, mtu)
            + attr_u32(IFLA_MASTER, master) + attr(IFLA_LINKINFO, info))
    return RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, body


def set_hairpin(name: str):
    data = attr(IFLA_INFO_SLAVE_DATA, attr(IFLA_BRPORT_MODE, b"\x01"))
    body = by_name(name) + attr(IFLA_LINKINFO, attr_str(IFLA_INFO_SLAVE_KIND, "bridge") + data)
    return RTM_NEWLINK, 0, body


def get_link(name: str):
    return RTM_GETLINK, 0, by_name(name)


def dump_addresses(family: int = AF_INET):
    """All addresses of `family` (AF_UNSPEC: both). In a batch, a dump goes last: the kernel refuses a
    second dump (EBUSY) while one is still running on the socket."""
    return RTM_GETADDR, NLM_F_DUMP, pack("=BBBBi", family, 0, 0, 0, 0)


def dump_routes(family: int = AF_INET):
    """All routes of `family` (AF_UNSPEC: every family); last in a batch, as `dump_addresses`."""
    return RTM_GETROUTE, NLM_F_DUMP, pack("=BBBBBBBBI", family, 0, 0, 0, 0, 0, 0, 0, 0)


def found_link(result):
    """A `get_link` answer from `Netlink.batch`: the Link, None when there is no such device."""
    err, replies = result
    if err == ENODEV:
        return None
    if err:
        raise NetlinkError(err, posix.strerror(err))
    return replies[0]


def dumped(result) -> list:
    """A dump's answer from `Netlink.batch`: the parsed entries; NetlinkError when it failed."""
    err, replies = result
    if err:
        raise NetlinkError(err, posix.strerror(err))
    return replies


def new_address(index: int, ip: int, prefix: int):
    """ip/prefix on the link; a tagged IPv6 `ip` goes on with IFA_F_NODAD, usable at once (the pod's
    addresses come from our IPAM: no one else holds them, and DAD would hold it back ~1 s)."""
    raw = _raw(ip)
    if ip >= IPV6:
        body = (pack("=BBBBi", AF_INET6, prefix, IFA_F_NODAD, RT_SCOPE_UNIVERSE, index) + attr(IFA_LOCAL, raw)
                + attr(IFA_ADDRESS, raw) + attr_u32(IFA_FLAGS, IFA_F_NODAD))
    else:
        body = (pack("=BBBBi", AF_INET, prefix, 0, RT_SCOPE_UNIVERSE, index) + attr(IFA_LOCAL, raw)
                + attr(IFA_ADDRESS, raw))
    return RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, body


def new_route(dst: int, prefix: int, gw: int, oif: int):
    """dst/prefix via gw out of oif, in the family of `gw` (tagged ints for IPv6)."""
    family = AF_INET6 if gw >= IPV6 else AF_INET
    body = (pack("=BBBBBBBBI", family, prefix, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT, RT_SCOPE_UNIVERSE, RTN_UNICAST, 0)
            + (attr(RTA_DST, _raw(dst)) if prefix else b"")
            + attr(RTA_GATEWAY, _raw(gw)) + attr_u32(RTA_OIF, oif))
    return RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, body
