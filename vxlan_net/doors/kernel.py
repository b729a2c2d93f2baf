"""The netlink door: the only importer of pyroute2, where errno becomes a domain
exception and the only place that retries kernel calls.

Every call works in the network namespace of the calling thread (the agent runs
under `ip netns exec NODE`); `netns=NAME` opens the sockets in another one instead.

Bulk work (reading and writing overlay entries) goes over one raw NETLINK_ROUTE
socket: kernel-filtered dumps parsed by hand, and pre-encoded messages whose
per-entry bytes are patched in, sent in chunks of CHUNK; every refusal comes back
as an error message mapped to its entry by sequence number. The bytes on that
socket are built and walked with cni/netlink.py, the wire format the plugin uses too.
Device work (VTEP, bridge, addresses) uses pyroute2's IPRoute, where speed does
not matter; IPRoute is synchronous over its own asyncio loop, so call these from
plain threads, not from inside a running event loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import importlib.machinery
import importlib.util
import itertools
import operator
import os
import socket
import struct
import sys
import threading
import time
from ipaddress import (IPv4Address, IPv4Interface, IPv4Network, IPv6Address, IPv6Interface, IPv6Network, ip_address,
                       ip_interface)
from typing import Callable, Iterator, Optional, Sequence, Union

import tenacity


def _import_pyroute2_lean() -> bool:
    """Import the pyroute2 modules this door uses without running pyroute2/__init__.py, which imports the
    whole library (NDB, IPDB, conntrack, ethtool, ...): 6 MiB of the agent's resident memory.

    The package is registered empty; the first name asked of it that is not a submodule (`pyroute2.NDB`,
    `from pyroute2 import IPRoute` anywhere else) runs its __init__ there and then, so every other user
    still finds the whole library. False, with nothing left behind, when pyroute2 was imported already or
    lays its modules out otherwise: then the package is imported as usual."""
    spec = None if "pyroute2" in sys.modules else importlib.util.find_spec("pyroute2")
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        return False
    package = importlib.util.module_from_spec(spec)

    def whole_package(name: str):
        if importlib.machinery.PathFinder.find_spec(f"pyroute2.{name}", package.__path__) is not None:
            raise AttributeError(name)  # a submodule not imported yet: the import system loads it
        del package.__getattr__
        spec.loader.exec_module(package)  # type: ignore[union-attr]
        return getattr(package, name)

    package.__getattr__ = whole_package  # type: ignore[attr-defined]
    sys.modules["pyroute2"] = package
    try:
        import pyroute2.config.log  # noqa: F401  (the package's logger setup, as its __init__ does first)
        import pyroute2.iproute  # noqa: F401
        import pyroute2.netlink.exceptions  # noqa: F401
        import pyroute2.netns  # noqa: F401
    except Exception:  # noqa: BLE001  (a layout this does not know: start over with the plain import)
        for name in [n for n in sys.modules if n == "pyroute2" or n.startswith("pyroute2.")]:
            del sys.modules[name]
        return False
    return True


if _import_pyroute2_lean():
    from pyroute2.iproute import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError
    from pyroute2 import netns as _netns  # noqa: I100  (a submodule: imported above, the package stays lean)
else:
    from pyroute2 import IPRoute
    from pyroute2 import netns as _netns
    from pyroute2.netlink.exceptions import NetlinkError

from cni import netlink as wire
from cni.netlink import (IFF_UP, IFLA_IFNAME, NDA_DST, NDA_IFINDEX, NDA_LLADDR, NETLINK_CAP_ACK, NETLINK_EXT_ACK,
                         NETLINK_GET_STRICT_CHK, NETLINK_ROUTE, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_DUMP_INTR,
                         NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, NTF_SELF, NUD_PERMANENT,
                         RT_TABLE_MAIN, RTA_DST, RTA_GATEWAY, RTA_MULTIPATH, RTA_OIF, RTA_PRIORITY, RTA_TABLE,
                         RTM_DELNEIGH, RTM_DELROUTE, RTM_GETLINK, RTM_GETNEIGH, RTM_GETROUTE, RTM_NEWADDR,
                         RTM_NEWNEIGH, RTM_NEWROUTE, RTN_UNICAST, RTNH_F_ONLINK, SOL_NETLINK)
from cni.sysctl import ensure_sysctl

from vxlan_net.core.desired import Entry, FdbEntry, MainRoute, Neighbour, OverlayEntries, Route, interned
from vxlan_net.core.errors import KernelBusy, KernelError, LinkNotFound
from vxlan_net.core.families import IPAddress, IPNetwork
from vxlan_net.core.names import ROUTE_PROTO
from vxlan_net.core.plan import ApplyFailure, ApplyResult, Plan
from vxlan_net.core.underlay import NodeAddress

# ROUTE_PROTO: read_overlay_entries returns only routes with this protocol, so routes someone
# else put on the device are never removed; apply_plan creates a route exclusively
# and replaces an existing one only when it has this protocol, so a route someone
# else installed for a peer's subnet is never overwritten either (a conflict).

CHUNK = 200
"""Messages per send; their acks must fit the receive buffer."""

_SO_RCVBUFFORCE = 33
_RCVBUF = 4 << 20
_RECV_SIZE = 1 << 16
_TIMEOUT = 10.0
_RTNEXTHOP = struct.Struct("=HBBi")  # len, flags, hops, ifindex
_IFA_F_SECONDARY = 0x01
_ZERO_MAC = bytes(6)

_NDMSG = struct.Struct("=BxxxiHBB")  # family, ifindex, state, flags, type
_RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, proto, scope, type, flags
_NLA = struct.Struct("=HH")
_U16 = struct.Struct("=H")
_U32 = struct.Struct("=I")
_ERR = struct.Struct("=i")

_TRANSIENT = frozenset({errno.EBUSY, errno.EAGAIN, errno.ENOBUFS, errno.EINTR})
_GONE = frozenset({errno.ENOENT, errno.ESRCH})
_BUSY_RETRY_DELAYS = (0.02, 0.04)
"""Seconds before the second and third attempt to write entries the kernel refused as busy (_TRANSIENT)."""

_retry_busy = tenacity.retry(
    retry=tenacity.retry_if_exception_type(KernelBusy),
    stop=tenacity.stop_after_attempt(4) | tenacity.stop_after_delay(5),
    wait=tenacity.wait_exponential(multiplier=0.02, max=0.5),
    reraise=True,
)


# --- errors ------------------------------------------------------------------


def _kernel_error(code: int, what: str) -> KernelError:
    text = f"{what}: {os.strerror(code)} ({errno.errorcode.get(code, code)})"
    if code == errno.ENODEV:
        return LinkNotFound(text)
    if code in _TRANSIENT:
        return KernelBusy(text)
    return KernelError(text)


@contextlib.contextmanager
def _translated(what: str) -> Iterator[None]:
    try:
        yield
    except NetlinkError as exc:
        raise _kernel_error(exc.code, what) from None
    except OSError as exc:
        raise _kernel_error(exc.errno or errno.EIO, what) from None


# --- the raw socket: bulk requests and filtered dumps ------------------------


class _Template:
    """One encoded message; per-entry fields are patched into copies of its bytes."""

    def __init__(self, data: bytes, header_len: int, fields: Sequence[Union[str, int]]):
        self.data = data
        attrs = {kind: (at, size) for kind, at, size in wire.attributes(data, 16 + header_len, len(data))}
        # "dst_len" is rtmsg's second byte; integers are attribute types.
        self.fields = tuple((17, 1) if f == "dst_len" else attrs[f] for f in fields)
        self.sizes = tuple(size for _off, size in self.fields)
        # The constant bytes before, between and after the variable parts: the sequence number (at 8),
        # then the fields, in this order.
        variable = [(8, 12), *((off, off + size) for off, size in self.fields)]
        ends, starts = [0] + [end for _, end in variable], [start for start, _ in variable] + [len(data)]
        if any(end > start for end, start in zip(ends, starts)):
            raise ValueError("a template's fields must follow the sequence number and each other")
        self._constant = [data[end:start] for end, start in zip(ends, starts)]

    def check(self, values: Sequence[bytes]) -> Sequence[bytes]:
        """The values, if each fits its field; a misfit would shift every later message."""
        for size, value in zip(self.sizes, values):
            if len(value) != size:
                raise ValueError(f"{len(value)} bytes where {size} are expected")
        return values

    def fit(self, rows: Sequence[Sequence[bytes]]) -> bool:
        """Whether every row's values fit (check() names a misfit); a pass per field, each in C."""
        return all(set(map(len, map(operator.itemgetter(i), rows))) <= {size} for i, size in enumerate(self.sizes))

    def render(self, first_seq: int, rows: Sequence[Sequence[bytes]]) -> bytes:
        """One copy per row of (fitting) values, patched in, with sequence numbers from `first_seq`.

        Joined in one go from the constant pieces and the columns of values: at a full sync's 15,000
        entries, patching copies message by message was a third of apply_plan's Python time."""
        count = len(rows)
        columns = [map(_U32.pack, range(first_seq, first_seq + count)), *zip(*rows)]
        pieces = [itertools.repeat(self._constant[0], count)]
        for constant, column in zip(self._constant[1:], columns):
            pieces += [column, itertools.repeat(constant, count)]
        return b"".join(itertools.chain.from_iterable(zip(*pieces)))


class _Rtnl:
    """A raw NETLINK_ROUTE socket in the caller's (or the named) network namespace."""

    def __init__(self, netns: Optional[str] = None):
        with _translated("opening a netlink socket"):
            if netns is None:
                sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
            else:
                sock = _netns.create_socket(
                    netns, socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE, flags=0
                )
            try:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, _RCVBUF)
                except PermissionError:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RCVBUF)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
                # Error acks carry only the failed header plus the kernel's text.
                sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
                sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
                # Lets the kernel filter dumps by device, table and protocol.
                sock.setsockopt(SOL_NETLINK, NETLINK_GET_STRICT_CHK, 1)
                sock.settimeout(_TIMEOUT)
                sock.bind((0, 0))
            except BaseException:
                sock.close()
                raise
        self._sock = sock
        self._seq = 0
        self._netns = netns

    def __enter__(self) -> "_Rtnl":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    def _next_seqs(self, count: int) -> int:
        if self._seq + count >= 1 << 32:  # a socket kept open (_kept_rtnl) outlives 32 bits of them
            self._seq = 0
        first = self._seq + 1
        self._seq += count
        return first

    def _send(self, data: bytes, what: str) -> None:
        with _translated(what):
            self._sock.sendto(data, (0, 0))

    def _recv(self, what: str) -> bytes:
        with _translated(what):
            try:
                return self._sock.recv(_RECV_SIZE)
            except socket.timeout:
                raise KernelError(f"{what}: no answer from the kernel in {_TIMEOUT:g} s") from None

    def _answers(self, seq: int, what: str) -> Iterator[tuple[bytes, int, int, int]]:
        """(buffer, offset, length, flags) of the messages answering `seq`, up to NLMSG_DONE;
        an error answer is raised."""
        while True:
            data = self._recv(what)
            for off, length, kind, flags, msg_seq in wire.messages(data):
                if msg_seq != seq:
                    continue
                if kind == NLMSG_DONE:
                    return
                if kind == NLMSG_ERROR:
                    raise _kernel_error(wire.error_code(data, off), what)
                yield data, off, length, flags

    def ifindex(self, ifname: str) -> int:
        """LinkNotFound if there is no such device."""
        what = f"looking up device {ifname}"
        if self._netns is None:  # the caller's namespace, the socket's too: an ioctl, not a netlink round trip
            try:
                return socket.if_nametoindex(ifname)
            except (OSError, ValueError):  # its one failure: no such device (no errno given)
                raise _kernel_error(errno.ENODEV, what) from None
        seq = self._next_seqs(1)
        self._send(wire.request(RTM_GETLINK, NLM_F_REQUEST, seq, wire.by_name(ifname)), what)
        for data, off, _length, _flags in self._answers(seq, what):
            return _ERR.unpack_from(data, off + 20)[0]  # ifinfomsg.ifi_index
        raise KernelError(f"{what}: the kernel sent no answer")

    def dump(self, request: bytes, what: str) -> Iterator[tuple[bytes, int, int]]:
        """Yield (buffer, offset, length) of every message; KernelBusy if the dump was interrupted."""
        seq = self._next_seqs(1)
        self._send(request[:8] + _U32.pack(seq) + request[12:], what)
        interrupted = False
        for data, off, length, flags in self._answers(seq, what):
            interrupted |= bool(flags & NLM_F_DUMP_INTR)
            yield data, off, length
        if interrupted:
            raise KernelBusy(f"{what}: the dump was interrupted by a change")

    def transact(
        self, template: _Template, values: Sequence[Sequence[bytes]], what: str
    ) -> dict[int, tuple[int, str]]:
        """Send one message per values row, in chunks; return {row: (errno, reason)} for refusals.

        Only a chunk's last message asks for an ack: the kernel handles a send
        in order and answers every failed message, so once that ack is in, every
        refusal of the chunk is too. One recv per chunk instead of one per entry.
        (A message the kernel drops with EINTR gets no answer and counts as done;
        the next resync's fresh read would show it missing.)"""
        refused: dict[int, tuple[int, str]] = {}
        for start in range(0, len(values), CHUNK):
            first = self._next_seqs(CHUNK)
            rows = values[start:start + CHUNK]
            buf = bytearray(template.render(first, rows))
            last = len(buf) - len(template.data)
            _U16.pack_into(buf, last + 6, _U16.unpack_from(buf, last + 6)[0] | NLM_F_ACK)
            last_seq = first + len(rows) - 1
            self._send(buf, what)
            done = False
            while not done:
                data = self._recv(what)
                for off, length, kind, flags, seq in wire.messages(data):
                    if kind != NLMSG_ERROR or not first <= seq <= last_seq:
                        continue
                    done |= seq == last_seq
                    code = wire.error_code(data, off)
                    if code:
                        refused[start + seq - first] = (code, wire.ack_reason(data, off, length, flags, code))
        return refused


_thread_rtnl = threading.local()  # apply_plan's socket of each thread (_kept_rtnl)


@contextlib.contextmanager
def _kept_rtnl(netns: Optional[str]) -> Iterator[_Rtnl]:
    """apply_plan's socket: in the caller's namespace, one kept open per thread, so that a watch event's
    plan costs no socket set-up (~0.07 ms of the agent's ~2 ms of CPU per event); with netns=NAME, a
    fresh one. Closed and forgotten after any error, so that nothing a failed call left unread is taken
    for a later answer (answers are matched by sequence number as well). Kept per process and network
    namespace: a forked child, or a thread that entered another namespace, opens its own."""
    if netns is not None:
        with _Rtnl(netns) as fresh:
            yield fresh
        return
    owner = wire.socket_owner()
    nl = getattr(_thread_rtnl, "rtnl", None)
    if nl is None or _thread_rtnl.owner != owner:
        if nl is not None:
            nl.close()
        nl = _thread_rtnl.rtnl = _Rtnl()
        _thread_rtnl.owner = owner
    try:
        yield nl
    except BaseException:
        _thread_rtnl.rtnl = None
        nl.close()
        raise


# --- reading the overlay entries ----------------------------------------------


def _dump_request(kind: int, body: bytes) -> bytes:
    return wire.request(kind, NLM_F_REQUEST | NLM_F_DUMP, 0, body)


def _neigh_dump_request(family: int, ifindex: int) -> bytes:
    if family == socket.AF_BRIDGE:  # FDB dumps filter on the header's ifindex (the port)
        return _dump_request(RTM_GETNEIGH, _NDMSG.pack(family, ifindex, 0, 0, 0))
    return _dump_request(RTM_GETNEIGH, _NDMSG.pack(family, 0, 0, 0, 0) + wire.attr_u32(NDA_IFINDEX, ifindex))


def _route_dump_request(family: int, ifindex: int) -> bytes:
    header = _RTMSG.pack(family, 0, 0, 0, RT_TABLE_MAIN, ROUTE_PROTO, 0, RTN_UNICAST, 0)
    return _dump_request(RTM_GETROUTE, header + wire.attr_u32(RTA_TABLE, RT_TABLE_MAIN) + wire.attr_u32(RTA_OIF, ifindex))


_FAMILIES = (socket.AF_INET, socket.AF_INET6)
"""The pod families whose entries a VTEP carries (an L2 tunnel carries both, whatever its underlay)."""
_ADDRESS_SIZE = {socket.AF_INET: 4, socket.AF_INET6: 16}
_ADDRESS_TYPE = {4: IPv4Address, 16: IPv6Address}  # by the packed length
_ZERO_ADDRESSES = (bytes(4), bytes(16))
# NDA_DST's attribute length (4-byte header + address) that a dump of each family may carry; an FDB
# remote is either family (the VTEP's underlay).
_NEIGH_DST_SIZES = {socket.AF_INET: (8,), socket.AF_INET6: (20,), socket.AF_BRIDGE: (8, 20)}

# The readers walk attributes inline: this is the periodic resync's hot loop.


def _permanent_neighbours(nl: _Rtnl, family: int, ifindex: int, what: str) -> Iterator[tuple[bytes, bytes]]:
    """(packed NDA_DST, NDA_LLADDR) of the device's permanent neighbour (AF_INET, AF_INET6) or
    FDB (AF_BRIDGE: remote of either family) entries."""
    unpack_nla, dst_sizes = _NLA.unpack_from, _NEIGH_DST_SIZES[family]
    for data, off, length in nl.dump(_neigh_dump_request(family, ifindex), what):
        msg_family, index, state, _flags, _type = _NDMSG.unpack_from(data, off + 16)
        if msg_family != family or index != ifindex or not state & NUD_PERMANENT:
            continue
        dst = mac = None
        at, end = off + 28, off + length
        while at + 4 <= end:
            size, kind = unpack_nla(data, at)
            if size < 4:
                break
            if kind == NDA_DST and size in dst_sizes:
                dst = data[at + 4 : at + size]
            elif kind == NDA_LLADDR and size == 10:
                mac = data[at + 4 : at + 10]
            at += (size + 3) & ~3
        if dst is not None and mac is not None:
            yield dst, mac


def _address(packed: bytes) -> IPAddress:
    # Not cached: only an entry the caches below miss needs it, and interning then keeps the reconciler's
    # own address object, so a cache here held 10,000 addresses nobody used (2.4 MiB at 5,000 peers).
    return _ADDRESS_TYPE[len(packed)](packed)


# Entries by their packed fields (one bytes key each: a tuple key took twice the memory): a resync reads
# the same entries again, and a cached entry is neither built nor hashed anew (building 15,000 cost more
# than the three dumps); interned, it is the very object the reconciler wants, which makes the diff cheap.
_NEIGHBOURS: dict[bytes, Neighbour] = {}
_FDB: dict[bytes, FdbEntry] = {}
_ROUTES: dict[bytes, Route] = {}
_ENTRY_CACHE_MAX = 1 << 17
"""A bound, not an LRU: past it a cache starts over (it holds what a few resyncs read)."""


def _keep_entry(cache: dict, key: bytes, entry: Entry) -> Entry:
    """A cache miss: keep the entry (interned) under its packed fields."""
    if len(cache) >= _ENTRY_CACHE_MAX:
        cache.clear()
    entry = cache[key] = interned(entry)
    return entry


# The readers look each entry up inline (a helper call per entry cost as much as the lookup).
def _read_neighbours(nl: _Rtnl, ifindex: int) -> frozenset[Neighbour]:
    cache, found = _NEIGHBOURS, []
    for family in _FAMILIES:
        for ip, mac in _permanent_neighbours(nl, family, ifindex, "reading neighbours"):
            entry = cache.get(ip + mac)
            found.append(entry if entry is not None
                         else _keep_entry(cache, ip + mac, Neighbour(_address(ip), mac.hex(":"))))
    return frozenset(found)


def _read_fdb(nl: _Rtnl, ifindex: int) -> frozenset[FdbEntry]:
    cache, found = _FDB, []
    for dst, mac in _permanent_neighbours(nl, socket.AF_BRIDGE, ifindex, "reading FDB"):
        if dst in _ZERO_ADDRESSES or mac == _ZERO_MAC:  # the all-zero default entry, or a remote of 0.0.0.0/::
            continue
        entry = cache.get(mac + dst)
        found.append(entry if entry is not None
                     else _keep_entry(cache, mac + dst, FdbEntry(mac.hex(":"), _address(dst))))
    return frozenset(found)


def _network(address: bytes, prefixlen: int) -> IPNetwork:
    # Not cached, as _address: a route the entry cache knows keeps the reconciler's subnet (the main-table
    # reader looks there first), and a cache here held a second IPv4Network per peer (1.7 MiB at 5,000).
    # The kernel keeps no host bits in a route's dst, but a reader must not crash on one: strict=False.
    if len(address) == 4:
        return IPv4Network((address, prefixlen))
    return IPv6Network((address, prefixlen), strict=False)


def forget_cached_subnets() -> None:
    """Empty the readers' entry caches, as at start-up (benchmarks time a cold read)."""
    for cache in (_NEIGHBOURS, _FDB, _ROUTES):
        cache.clear()


def _read_routes(nl: _Rtnl, ifindex: int) -> frozenset[Route]:
    """Our (protocol ROUTE_PROTO) main-table gateway routes of both families through the device."""
    cache, found = _ROUTES, []
    unpack_nla, unpack_u32 = _NLA.unpack_from, _U32.unpack_from
    for wanted_family in _FAMILIES:
        size_wanted = 4 + _ADDRESS_SIZE[wanted_family]
        zero = bytes(_ADDRESS_SIZE[wanted_family])
        for data, off, length in nl.dump(_route_dump_request(wanted_family, ifindex), "reading routes"):
            family, dst_len, _src, _tos, table, proto, _scope, rtype, _flags = _RTMSG.unpack_from(data, off + 16)
            if family != wanted_family or proto != ROUTE_PROTO or rtype != RTN_UNICAST:
                continue
            dst, gateway, oif = zero, None, None
            at, end = off + 28, off + length
            while at + 4 <= end:
                size, kind = unpack_nla(data, at)
                if size < 4:
                    break
                if kind == RTA_DST and size == size_wanted:
                    dst = data[at + 4 : at + size]
                elif kind == RTA_GATEWAY and size == size_wanted:
                    gateway = data[at + 4 : at + size]
                elif kind == RTA_OIF:
                    oif = unpack_u32(data, at + 4)[0]
                elif kind == RTA_TABLE:
                    table = unpack_u32(data, at + 4)[0]
                at += (size + 3) & ~3
            if table == RT_TABLE_MAIN and oif == ifindex and gateway is not None:
                key = dst + bytes((dst_len,)) + gateway
                entry = cache.get(key)
                found.append(entry if entry is not None
                             else _keep_entry(cache, key, Route(_network(dst, dst_len), _address(gateway))))
    return frozenset(found)


def _main_table_dump_request(family: int) -> bytes:
    header = _RTMSG.pack(family, 0, 0, 0, RT_TABLE_MAIN, 0, 0, 0, 0)
    return _dump_request(RTM_GETROUTE, header + wire.attr_u32(RTA_TABLE, RT_TABLE_MAIN))


def _link_names(nl: _Rtnl) -> dict[int, str]:
    names = {}
    for data, off, length in nl.dump(_dump_request(RTM_GETLINK, wire.ifinfo()), "listing devices"):
        index = _ERR.unpack_from(data, off + 20)[0]  # ifinfomsg.ifi_index
        for kind, at, size in wire.attributes(data, off + 32, off + length):
            if kind == IFLA_IFNAME:
                names[index] = data[at : at + size].rstrip(b"\0").decode(errors="replace")
    return names


def _read_main_routes(nl: _Rtnl, family: int = socket.AF_INET) -> list[MainRoute]:
    """Every unicast route of the family in the main table, parsed by hand (thousands of peer routes:
    pyroute2's parser took ~1 s for 5,000); a multipath route is shown by its first hop."""
    names = _link_names(nl)
    size_wanted = _ADDRESS_SIZE[family]
    found = []
    for data, off, length in nl.dump(_main_table_dump_request(family), "reading the main routing table"):
        msg_family, dst_len, _src, _tos, table, proto, scope, rtype, _flags = _RTMSG.unpack_from(data, off + 16)
        if msg_family != family or rtype != RTN_UNICAST:
            continue
        dst, gateway, oif, metric = bytes(size_wanted), None, None, 0
        for kind, at, size in wire.attributes(data, off + 28, off + length):
            if kind == RTA_DST and size == size_wanted:
                dst = data[at : at + size]
            elif kind == RTA_GATEWAY and size == size_wanted:
                gateway = data[at : at + size]
            elif kind == RTA_OIF:
                oif = _U32.unpack_from(data, at)[0]
            elif kind == RTA_PRIORITY:
                metric = _U32.unpack_from(data, at)[0]
            elif kind == RTA_TABLE:
                table = _U32.unpack_from(data, at)[0]
            elif kind == RTA_MULTIPATH and size >= _RTNEXTHOP.size:
                hop_len, _hop_flags, _hops, oif = _RTNEXTHOP.unpack_from(data, at)
                for hop_kind, hop_at, hop_size in wire.attributes(data, at + _RTNEXTHOP.size,
                                                                  at + min(hop_len, size)):
                    if hop_kind == RTA_GATEWAY and hop_size == size_wanted:
                        gateway = data[hop_at : hop_at + hop_size]
        if table == RT_TABLE_MAIN:
            ours = _ROUTES.get(dst + bytes((dst_len,)) + gateway) if gateway is not None else None
            found.append(MainRoute(ours.subnet if ours is not None else _network(dst, dst_len),
                                   _ADDRESS_TYPE[len(gateway)](gateway) if gateway is not None else None,
                                   names.get(oif) if oif is not None else None, proto, scope, metric))
    return found


def _address_family(family: int) -> int:
    """AF_INET or AF_INET6 for an IP version (4 or 6); ValueError for anything else."""
    if family not in (4, 6):
        raise ValueError(f"IP family must be 4 or 6, not {family!r}")
    return socket.AF_INET if family == 4 else socket.AF_INET6


def main_table_routes(*, family: int = 4, netns: Optional[str] = None) -> list[MainRoute]:
    """Every unicast route of the main table of that IP family (4 or 6), whoever installed it (for route
    conflicts, doctor and the underlay's connected networks); a multipath route is shown by its first hop."""
    af = _address_family(family)
    with _Rtnl(netns) as nl:
        return _retry_busy(_read_main_routes)(nl, af)


def walk_overlay_dumps(ifname: str, *, netns: Optional[str] = None) -> int:
    """The dumps read_overlay_entries makes, walked and filtered but built into nothing: how many
    neighbours (both families), FDB entries and route messages (both families) there are
    (benchmarks split parsing from building)."""
    with _Rtnl(netns) as nl:
        ifindex = nl.ifindex(ifname)
        count = sum(1 for family in (*_FAMILIES, socket.AF_BRIDGE)
                    for _entry in _permanent_neighbours(nl, family, ifindex, "dump"))
        return count + sum(1 for family in _FAMILIES
                           for _msg in nl.dump(_route_dump_request(family, ifindex), "dump"))


def read_overlay_entries(ifname: str, *, underlay: Optional[str] = None,
                         netns: Optional[str] = None) -> OverlayEntries:
    """A fresh read of what is ours on the device, of both pod families: permanent IPv4 and IPv6
    neighbours with a MAC, permanent FDB entries with a remote dst (IPv4 or IPv6), and main-table
    gateway routes (IPv4 and IPv6) with protocol ROUTE_PROTO; with `underlay`, also our gateway routes
    on that device (the direct routes). LinkNotFound if a device is missing."""
    with _Rtnl(netns) as nl:
        ifindex = nl.ifindex(ifname)
        direct = frozenset()
        if underlay is not None:
            direct = _retry_busy(_read_routes)(nl, nl.ifindex(underlay))
        return OverlayEntries(
            neighbours=_retry_busy(_read_neighbours)(nl, ifindex),
            fdb=_retry_busy(_read_fdb)(nl, ifindex),
            routes=_retry_busy(_read_routes)(nl, ifindex),
            direct_routes=direct,
        )


# --- applying a plan ------------------------------------------------------------


# No NLM_F_ACK here: the kernel answers every refusal anyway, and transact() asks
# for an ack on the last message of a chunk only, which marks the chunk done.
_UPSERT = NLM_F_REQUEST | NLM_F_CREATE | NLM_F_REPLACE
# Routes: EEXIST when the main table holds a route for the prefix (same tos and metric).
_CREATE_ONLY = NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL
_DELETE = NLM_F_REQUEST


def _mac_bytes(mac: str) -> bytes:
    try:
        raw = bytes.fromhex(mac.replace(":", ""))
    except ValueError:
        raw = b""
    if len(raw) != 6:
        raise ValueError(f"{mac!r} is not a MAC address")
    return raw


def _neigh_template(msg_type: int, flags: int, family: int, ifindex: int, attrs: Sequence[int],
                    ip_size: int) -> _Template:
    """A permanent neighbour (AF_INET, AF_INET6) or FDB entry (AF_BRIDGE, `self`) whose NDA_DST holds
    `ip_size` bytes; `attrs` are patched per entry."""
    header = _NDMSG.pack(family, ifindex, NUD_PERMANENT, NTF_SELF if family == socket.AF_BRIDGE else 0, 0)
    placeholders = {NDA_DST: bytes(ip_size), NDA_LLADDR: bytes(6)}
    body = header + b"".join(wire.attr(kind, placeholders[kind]) for kind in attrs)
    return _Template(wire.request(msg_type, flags, 0, body), _NDMSG.size, attrs)


def _route_template(msg_type: int, flags: int, family: int, ifindex: int, onlink: bool = True) -> _Template:
    """A tunnel route is onlink (its gateway, the peer's VTEP address, is on no connected network);
    a direct route is not, so the kernel checks that its gateway is on the underlay's segment."""
    header = _RTMSG.pack(family, 0, 0, 0, RT_TABLE_MAIN, ROUTE_PROTO, 0, RTN_UNICAST,
                         RTNH_F_ONLINK if onlink else 0)
    size = _ADDRESS_SIZE[family]
    body = (header + wire.attr(RTA_DST, bytes(size)) + wire.attr(RTA_GATEWAY, bytes(size))
            + wire.attr_u32(RTA_OIF, ifindex))
    return _Template(wire.request(msg_type, flags, 0, body), _RTMSG.size, ["dst_len", RTA_DST, RTA_GATEWAY])


_BYTES = tuple(bytes((n,)) for n in range(256))  # one-byte values (prefix lengths) without building each


def _route_values(route: Route) -> tuple[bytes, ...]:
    subnet = route.subnet
    return _BYTES[subnet.prefixlen], subnet.network_address.packed, route.gateway.packed


@dataclasses.dataclass(frozen=True)
class _Step:
    template: _Template
    values: Callable[[Entry], Sequence[bytes]]
    removal: bool


def _neighbour_values(n: Neighbour) -> tuple[bytes, ...]:
    return n.ip.packed, _mac_bytes(n.mac)


def _fdb_values(f: FdbEntry) -> tuple[bytes, ...]:
    return _mac_bytes(f.mac), f.dst.packed


_VERSION_FAMILY = {4: socket.AF_INET, 6: socket.AF_INET6}

# The field whose IP version picks an entry's template: a Plan field may mix both families.
_VERSION_FIELD = {
    Neighbour: "ip",
    FdbEntry: "dst",  # the remote's family, the VTEP's underlay
    Route: "subnet",  # a gateway of the other family does not fit the template: refused
}
_CLASS_VERSION = {IPv4Address: 4, IPv6Address: 6, IPv4Network: 4, IPv6Network: 6}

# The metric the kernel gives a route sent without RTA_PRIORITY (IPv6: IP6_RT_PRIO_USER); a create
# meets EEXIST only from a route of the same prefix and metric.
_OUR_METRIC = {socket.AF_INET: 0, socket.AF_INET6: 1024}


# A create refused because a route holds the prefix: EEXIST (same metric). IPv6 checks an onlink
# gateway first, so a foreign route for the peer's prefix on another device (any metric) makes it
# EINVAL ("Nexthop has invalid gateway or device mismatch") instead.
_IN_THE_WAY = {4: frozenset({errno.EEXIST}), 6: frozenset({errno.EEXIST, errno.EINVAL})}


def _route_steps(family: int, ifindex: int, onlink: bool) -> tuple[_Step, _Step, _Step]:
    """(create, replace, delete) of one route class's routes of one family on one device."""
    return tuple(_Step(_route_template(kind, flags, family, ifindex, onlink), _route_values, kind == RTM_DELROUTE)
                 for kind, flags in ((RTM_NEWROUTE, _CREATE_ONLY), (RTM_NEWROUTE, _UPSERT), (RTM_DELROUTE, _DELETE)))


@functools.lru_cache(maxsize=64)
def _steps(ifindex: int, underlay_index: Optional[int], version: int) -> tuple[dict[str, _Step], dict[str, _Step]]:
    """How to send each Plan field's entries of one IP version (apply_plan walks the fields in the
    Plan's order), and how to replace the routes of an upsert field that the kernel refused with EEXIST.
    Cached (read only): encoding the templates again cost a watch event a tenth of its time."""
    family = _VERSION_FAMILY[version]
    size = _ADDRESS_SIZE[family]
    neigh, fdb = [NDA_DST, NDA_LLADDR], [NDA_LLADDR, NDA_DST]
    bridge = socket.AF_BRIDGE
    # Deleting with protocol, device and gateway set never touches a route that is not ours,
    # nor the other class's route that replaced ours for the same prefix.
    create, replace, delete = _route_steps(family, ifindex, onlink=True)
    steps, replacing = {"upsert_routes": create, "remove_routes": delete}, {"upsert_routes": replace}
    if underlay_index is not None:
        create, replace, delete = _route_steps(family, underlay_index, onlink=False)
        steps.update({"upsert_direct_routes": create, "remove_direct_routes": delete})
        replacing["upsert_direct_routes"] = replace
    return {
        **steps,
        "upsert_neighbours": _Step(_neigh_template(RTM_NEWNEIGH, _UPSERT, family, ifindex, neigh, size),
                                   _neighbour_values, False),
        "upsert_fdb": _Step(_neigh_template(RTM_NEWNEIGH, _UPSERT, bridge, ifindex, fdb, size), _fdb_values, False),
        # With a dst, only that remote of the MAC goes.
        "remove_fdb": _Step(_neigh_template(RTM_DELNEIGH, _DELETE, bridge, ifindex, fdb, size), _fdb_values, True),
        "remove_neighbours": _Step(
            _neigh_template(RTM_DELNEIGH, _DELETE, family, ifindex, [NDA_DST], size), lambda n: (n.ip.packed,), True
        ),
    }, replacing


def _by_version(entries: Sequence[Entry]) -> dict[int, list[Entry]]:
    """The entries split by the IP version that picks their template, in their order."""
    field = operator.attrgetter(_VERSION_FIELD[type(entries[0])])
    classes = set(map(type, map(field, entries)))  # in C: one family (the common case) costs no loop here
    if len(classes) == 1 and next(iter(classes)) in _CLASS_VERSION:
        return {_CLASS_VERSION[classes.pop()]: list(entries)}
    groups: dict[int, list[Entry]] = {}
    for entry in entries:
        groups.setdefault(field(entry).version, []).append(entry)
    return groups


def _encoded(step: _Step, entries: Sequence[Entry], action: str,
             failures: list[ApplyFailure]) -> tuple[Sequence[Entry], list[Sequence[bytes]]]:
    """(the entries that encode, their values); those that do not are added to `failures`, as the kernel
    would refuse them as well. All at once when all fit (the common case), else entry by entry."""
    try:
        values = list(map(step.values, entries))
    except ValueError:
        values = None
    if values is not None and step.template.fit(values):
        return entries, values
    sent, values = [], []
    for entry in entries:
        try:
            values.append(step.template.check(step.values(entry)))
        except ValueError as exc:
            failures.append(ApplyFailure(action, entry, errno.EINVAL, f"cannot encode: {exc}"))
            continue
        sent.append(entry)
    return sent, values


def _apply_step(nl: _Rtnl, action: str, step: _Step, entries: Sequence[Entry]) -> tuple[int, list[ApplyFailure]]:
    failures: list[ApplyFailure] = []
    pending = list(entries)

    def send_pending() -> list[Entry]:
        nonlocal pending
        sent, values = _encoded(step, pending, action, failures)
        refused = nl.transact(step.template, values, f"{action} on the VXLAN device")
        retry = []
        for row, (code, reason) in sorted(refused.items()):
            if step.removal and code in _GONE:
                continue
            if code in _TRANSIENT:
                retry.append(sent[row])
            else:
                failures.append(ApplyFailure(action, sent[row], code, reason))
        pending = retry
        return retry

    # Three attempts, 20 and 40 ms apart, for what the kernel refused as busy. A plain loop: a watch
    # event's three steps spent more in a tenacity.Retrying's machinery than in the kernel.
    leftover = send_pending()
    for delay in _BUSY_RETRY_DELAYS:
        if not leftover:
            break
        time.sleep(delay)
        leftover = send_pending()
    failures.extend(ApplyFailure(action, e, errno.EBUSY, "the kernel stayed busy") for e in leftover)
    return len(entries) - len(failures), failures


def _settle_existing_routes(
    nl: _Rtnl, family: int, replace: _Step, refused: Sequence[ApplyFailure]
) -> tuple[int, list[ApplyFailure], list[ApplyFailure]]:
    """Routes of one family refused for a route in their way (_IN_THE_WAY): replace those whose
    existing route is ours (protocol ROUTE_PROTO), report those a foreign route holds as conflicts,
    the rest as the failures they are. Returns (replaced, failures, conflicts).

    The rare path, so it may read the whole main table. (A route someone installs
    between this read and the replace is overwritten: the window is one round trip.)"""
    same_metric, any_metric = {}, {}
    for route in sorted(_retry_busy(_read_main_routes)(nl, family), key=lambda r: -r.metric):
        any_metric[route.dst] = route  # the lowest metric last: the one in use
        if route.metric == _OUR_METRIC[family]:
            same_metric[route.dst] = route
    ours, failures, conflicts = [], [], []
    for failure in refused:
        subnet = failure.entry.subnet
        holder = same_metric.get(subnet) if failure.errno == errno.EEXIST else any_metric.get(subnet)
        if holder is not None and holder.protocol != ROUTE_PROTO:
            conflicts.append(dataclasses.replace(
                failure, reason=f"route {holder} is not vxlan-net's; delete it: ip route del {holder}"))
        elif failure.errno == errno.EEXIST:  # ours, or gone meanwhile
            ours.append(failure.entry)
        else:
            failures.append(failure)
    if not ours:
        return 0, failures, conflicts
    replaced, refused_again = _apply_step(nl, refused[0].action, replace, ours)
    return replaced, failures + refused_again, conflicts


def apply_plan(ifname: str, plan: Plan, *, underlay: Optional[str] = None,
               netns: Optional[str] = None) -> ApplyResult:
    """Write a Plan to the device in its field order; refusals are reported, not raised.

    A field may hold entries of both IP families: each family's go in one batch with its own
    template. Neighbours and FDB entries are upserted (NLM_F_CREATE|NLM_F_REPLACE). Routes
    are created exclusively, one message each; only when a route is in the way (EEXIST; for
    IPv6 also EINVAL, see _IN_THE_WAY) is the existing route read, and replaced if it is ours,
    else left alone and reported in `conflicts`. Removals
    of entries already gone count as applied. Direct routes go on `underlay`, which
    the plan needs when it has any. Raises LinkNotFound if a device is missing and
    KernelError if the netlink socket itself fails."""
    if plan.empty:
        return ApplyResult()
    if underlay is None and (plan.upsert_direct_routes or plan.remove_direct_routes):
        raise ValueError("a plan with direct routes needs the underlay device")
    applied, failures, conflicts = 0, [], []
    with _kept_rtnl(netns) as nl:
        ifindex = nl.ifindex(ifname)
        # Looked up only for a plan that goes there: one round trip less for a watch event's plan.
        has_direct = bool(plan.upsert_direct_routes or plan.remove_direct_routes)
        underlay_index = nl.ifindex(underlay) if underlay is not None and has_direct else None
        for field in dataclasses.fields(plan):
            entries = getattr(plan, field.name)
            if not entries:
                continue
            for version, group in _by_version(entries).items():
                steps, replacing = _steps(ifindex, underlay_index, version)
                done, refused = _apply_step(nl, field.name, steps[field.name], group)
                existing = [f for f in refused if field.name in replacing and f.errno in _IN_THE_WAY[version]]
                if existing:
                    refused = [f for f in refused if f not in existing]
                    replaced, refused_again, foreign = _settle_existing_routes(
                        nl, _VERSION_FAMILY[version], replacing[field.name], existing)
                    done += replaced
                    refused += refused_again
                    conflicts += foreign
                applied += done
                failures.extend(refused)
    return ApplyResult(applied, tuple(failures), tuple(conflicts))


# --- watching the node's routes and addresses ---------------------------------------

_RTMGRP_IPV4_IFADDR = 0x10
_RTMGRP_IPV4_ROUTE = 0x40
_RTMGRP_IPV6_IFADDR = 0x100
_RTMGRP_IPV6_ROUTE = 0x400
_RTM_DELADDR = 21


_SO_ATTACH_FILTER = 26
_BPF_LD_H_ABS, _BPF_LD_B_ABS, _BPF_JEQ_K, _BPF_RET_K = 0x28, 0x30, 0x15, 0x06
_BPF_INSN = struct.Struct("=HBBI")  # code, jump if true, jump if false, k


def _not_our_routes_filter() -> bytes:
    """A classic BPF program for a notification socket: drop route messages with protocol ROUTE_PROTO,
    keep everything else. Its loads read big-endian; netlink's header is the host's order, so the
    message types are compared as the bytes the host writes."""
    as_loaded = {kind: int.from_bytes(_U16.pack(kind), "big") for kind in (RTM_NEWROUTE, RTM_DELROUTE)}
    return b"".join(_BPF_INSN.pack(*insn) for insn in (
        (_BPF_LD_H_ABS, 0, 0, 4),                           # nlmsg_type
        (_BPF_JEQ_K, 1, 0, as_loaded[RTM_NEWROUTE]),        # a route -> 3
        (_BPF_JEQ_K, 0, 2, as_loaded[RTM_DELROUTE]),        # a route -> 3, else -> 5
        (_BPF_LD_B_ABS, 0, 0, 16 + 5),                      # rtmsg.rtm_protocol
        (_BPF_JEQ_K, 1, 0, ROUTE_PROTO),                    # ours -> 6
        (_BPF_RET_K, 0, 0, 0xFFFFFFFF),                     # 5: keep
        (_BPF_RET_K, 0, 0, 0),                              # 6: drop
    ))


_NOT_OUR_ROUTES = _not_our_routes_filter()


def _attach_filter(sock: socket.socket, program: bytes) -> None:
    """SO_ATTACH_FILTER: a struct sock_fprog (length, pointer to the instructions), kept alive meanwhile."""
    import ctypes  # already loaded by pyroute2; only this needs an address

    instructions = ctypes.create_string_buffer(program, len(program))
    fprog = struct.pack("@HP", len(program) // _BPF_INSN.size, ctypes.addressof(instructions))
    sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)


class RouteEvents:
    """A netlink subscription to this namespace's address and route changes (RTNLGRP_IPV4_IFADDR,
    RTNLGRP_IPV4_ROUTE, and with `ipv6` RTNLGRP_IPV6_IFADDR, RTNLGRP_IPV6_ROUTE), polled without
    blocking: changed() says whether any came since the last call.

    Our own routes (protocol ROUTE_PROTO) are not news: every pass writes some, and
    counting them would make each pass trigger the next. A socket filter drops them in the
    kernel (reading and skipping them cost the agent per watch event, and a full sync's
    thousands overran the buffer, which reads as news); changed() skips any that still come.
    When the kernel drops notifications (ENOBUFS: the socket's buffer overran), changed()
    says yes: something was lost. Close it when done (or use it as a context manager).
    """

    def __init__(self, *, ipv6: bool = True, netns: Optional[str] = None):
        groups = _RTMGRP_IPV4_IFADDR | _RTMGRP_IPV4_ROUTE
        if ipv6:
            groups |= _RTMGRP_IPV6_IFADDR | _RTMGRP_IPV6_ROUTE
        with _translated("subscribing to route and address changes"):
            if netns is None:
                sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, NETLINK_ROUTE)
            else:
                sock = _netns.create_socket(netns, socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK,
                                            NETLINK_ROUTE, flags=0)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
                _attach_filter(sock, _NOT_OUR_ROUTES)  # before bind: nothing unfiltered is queued
                sock.bind((0, groups))
            except BaseException:
                sock.close()
                raise
        self._sock = sock

    def fileno(self) -> int:
        return self._sock.fileno()

    def changed(self) -> bool:
        """Drain what arrived; True if any address, or any route not ours, was added or removed."""
        changed = False
        for _ in range(10_000):  # bounded: a flood is "changed" anyway, the next call drains the rest
            try:
                data = self._sock.recv(_RECV_SIZE)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    changed = True
                    continue
                raise _kernel_error(exc.errno or errno.EIO, "reading route and address changes") from None
            for off, _length, kind, _flags, _seq in wire.messages(data):
                if kind in (RTM_NEWADDR, _RTM_DELADDR):
                    changed = True
                elif kind in (RTM_NEWROUTE, RTM_DELROUTE) and _RTMSG.unpack_from(data, off + 16)[5] != ROUTE_PROTO:
                    changed = True
        return changed

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "RouteEvents":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- devices and addresses (pyroute2's IPRoute) ----------------------------------


@dataclasses.dataclass(frozen=True)
class VtepSpec:
    """The node's VXLAN device over one underlay family: `vxnet.<VNI>` (IPv4 local address) or
    `vxnet6.<VNI>` (IPv6), learning off, its MAC the lease's VtepMAC (of that family's backend data),
    and the own subnets' network addresses on it, /32 and /128 (the neighbours' gateways point at the
    peers' ones). Either address may be absent (a single-stack pod network)."""

    name: str
    vni: int
    port: int
    local_ip: IPAddress
    """The node's public address on the underlay; its family is the tunnel's."""
    underlay_ifname: str
    mac: str
    """Lower-case colon-separated; persisted by the caller, set at creation."""
    mtu: int
    address: Optional[IPv4Interface]
    """The own IPv4 subnet's network address, /32; None without an IPv4 pod network."""
    ipv6_address: Optional[IPv6Interface] = None
    """The own IPv6 subnet's network address, /128; None without an IPv6 pod network."""

    def __post_init__(self) -> None:
        if not isinstance(self.local_ip, (IPv4Address, IPv6Address)):
            raise ValueError(f"VTEP local address {self.local_ip!r} is not an IP address")
        if self.address is not None and not isinstance(self.address, IPv4Interface):
            raise ValueError(f"VTEP address {self.address} is not an IPv4 interface address")
        if self.ipv6_address is not None and not isinstance(self.ipv6_address, IPv6Interface):
            raise ValueError(f"VTEP ipv6_address {self.ipv6_address} is not an IPv6 interface address")


@contextlib.contextmanager
def _iproute(netns: Optional[str]) -> Iterator[IPRoute]:
    with _translated("opening a netlink socket"):
        ipr = IPRoute(netns=netns, flags=0) if netns else IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def _find_link(ipr: IPRoute, name: str):
    try:
        links = ipr.get_links(ifname=name)
    except NetlinkError as exc:
        if exc.code == errno.ENODEV:
            return None
        raise
    return links[0] if links else None


def _need_link(ipr: IPRoute, name: str):
    link = _find_link(ipr, name)
    if link is None:
        raise LinkNotFound(f"no device named {name}")
    return link


def _kind(link) -> Optional[str]:
    info = link.get_attr("IFLA_LINKINFO")
    return info.get_attr("IFLA_INFO_KIND") if info else None


def _vxlan_attrs(link) -> Optional[dict]:
    info = link.get_attr("IFLA_LINKINFO")
    if not info or info.get_attr("IFLA_INFO_KIND") != "vxlan":
        return None
    data = info.get_attr("IFLA_INFO_DATA")
    return {
        "vni": data.get_attr("IFLA_VXLAN_ID"),
        "port": data.get_attr("IFLA_VXLAN_PORT"),
        "local": _canonical_ip(data.get_attr("IFLA_VXLAN_LOCAL") or data.get_attr("IFLA_VXLAN_LOCAL6")),
        "link": data.get_attr("IFLA_VXLAN_LINK"),
        "learning": bool(data.get_attr("IFLA_VXLAN_LEARNING")),
    }


def _canonical_ip(text: Optional[str]) -> Optional[str]:
    """One spelling per address, so an IPv6 local address compares equal however it was written."""
    return str(ip_address(text)) if text else None


def _addresses(ipr: IPRoute, index: int, family: int = socket.AF_INET) -> list:
    """The device's addresses of the family; IPv6 without link-local ones (fe80::/10, the kernel's own)."""
    found = [a for a in ipr.get_addr(family=family) if a["index"] == index]
    if family == socket.AF_INET6:
        found = [a for a in found if not _interface(a).ip.is_link_local]
    return found


def _interface(addr) -> Union[IPv4Interface, IPv6Interface]:
    local = addr.get_attr("IFA_LOCAL") or addr.get_attr("IFA_ADDRESS")
    return ip_interface(f"{local}/{addr['prefixlen']}")


_IFA_F_NODAD = 0x02
_IFA_F_DADFAILED = 0x08
_IFA_F_DEPRECATED = 0x20
_IFA_F_TENTATIVE = 0x40
_IFA_F_TEMPORARY = _IFA_F_SECONDARY  # the same bit, named for IPv6 privacy addresses
_UNUSABLE_IPV6 = _IFA_F_DADFAILED | _IFA_F_DEPRECATED | _IFA_F_TENTATIVE | _IFA_F_TEMPORARY


def _address_flags(addr) -> int:
    """All the address's flags: IFA_FLAGS when present (32 bits), else the header's 8."""
    flags = addr.get_attr("IFA_FLAGS")
    return addr["flags"] if flags is None else flags


def _ensure_only_address(ipr: IPRoute, index: int, family: int, address) -> None:
    """Make `address` (None: no address) the device's only address of the family; IPv6 link-local
    addresses are never touched. An IPv6 address is added without DAD: it is the lease's, unique by
    construction, and a tentative address could not be a source for a second."""
    present = False
    for addr in _addresses(ipr, index, family):
        current = _interface(addr)
        if current == address:
            present = True
        else:
            ipr.addr("del", index=index, address=str(current.ip), prefixlen=current.network.prefixlen)
    if address is not None and not present:
        flags = {"flags": _IFA_F_NODAD} if family == socket.AF_INET6 else {}
        ipr.addr("add", index=index, address=str(address.ip), prefixlen=address.network.prefixlen, **flags)


def _ensure_mac_mtu_up(ipr: IPRoute, link, mac: Optional[str], mtu: int) -> None:
    changes = {}
    if mac is not None and (link.get_attr("IFLA_ADDRESS") or "").lower() != mac.lower():
        changes["address"] = mac
    if link.get_attr("IFLA_MTU") != mtu:
        changes["mtu"] = mtu
    if changes:
        ipr.link("set", index=link["index"], **changes)
    if not link["flags"] & IFF_UP:
        ipr.link("set", index=link["index"], state="up")


def _add_link(ipr: IPRoute, **kwargs) -> None:
    try:
        ipr.link("add", **kwargs)
    except NetlinkError as exc:
        if exc.code != errno.EEXIST:
            raise
        name = kwargs["ifname"]
        if _find_link(ipr, name) is not None:  # someone created it since we looked: look again
            raise KernelBusy(f"device {name} appeared while being created") from None
        if kwargs.get("kind") != "vxlan":
            raise
        # No device of that name: the kernel refuses a VXLAN device whose VNI, port and local
        # address another one already uses (e.g. a flannel.<VNI> left behind). Retrying cannot help.
        local = kwargs.get("vxlan_local") or kwargs.get("vxlan_local6")
        raise KernelError(
            f"cannot create VXLAN device {name}: another VXLAN device already uses VNI {kwargs['vxlan_id']}, "
            f"port {kwargs['vxlan_port']} and local address {local} (ip -d link show type vxlan); "
            "delete it or choose another VNI") from None


def _local_attr(local_ip: IPAddress) -> dict:
    """pyroute2's attribute for a VXLAN local address: IFLA_VXLAN_LOCAL or IFLA_VXLAN_LOCAL6."""
    return {"vxlan_local" if local_ip.version == 4 else "vxlan_local6": str(local_ip)}


def _moved_local(ipr: IPRoute, link, local_ip: IPAddress):
    """The link with its VXLAN local address set to `local_ip` in place (RTM_NEWLINK changelink,
    Linux >= 4.13); the unchanged link when the kernel refuses (as it does for a change of family,
    EOPNOTSUPP), so the caller recreates it."""
    try:
        ipr.link("set", index=link["index"], kind="vxlan", **_local_attr(local_ip))
    except NetlinkError as exc:
        if exc.code not in (errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM):
            raise
        return link
    return _need_link(ipr, link.get_attr("IFLA_IFNAME"))


@_retry_busy
def ensure_vtep(spec: VtepSpec, *, netns: Optional[str] = None) -> int:
    """Create or reuse the VXLAN device; return its ifindex.

    A device whose local address alone differs (the node was renumbered) has it
    changed in place, keeping its FDB, neighbours and routes; a kernel refusing
    that, or a device with another VNI, port or underlay, or with learning on (or
    of another kind), is deleted and recreated. MAC, MTU and address are fixed in
    place; every other IPv4 and global IPv6 address is removed (IPv6 link-local ones stay)."""
    with _iproute(netns) as ipr, _translated(f"ensuring VXLAN device {spec.name}"):
        underlay = _need_link(ipr, spec.underlay_ifname)["index"]
        link = _find_link(ipr, spec.name)
        wanted = {"vni": spec.vni, "port": spec.port, "local": str(spec.local_ip), "link": underlay, "learning": False}
        current = _vxlan_attrs(link) if link is not None else None
        if current is not None and current != wanted and current == {**wanted, "local": current["local"]}:
            link = _moved_local(ipr, link, spec.local_ip)
        if link is not None and _vxlan_attrs(link) != wanted:
            ipr.link("del", index=link["index"])
            link = None
        if link is None:
            _add_link(
                ipr,
                ifname=spec.name,
                kind="vxlan",
                vxlan_id=spec.vni,
                vxlan_port=spec.port,
                **_local_attr(spec.local_ip),
                vxlan_link=underlay,
                vxlan_learning=0,
                address=spec.mac,
                mtu=spec.mtu,
            )
            link = _need_link(ipr, spec.name)
        _ensure_mac_mtu_up(ipr, link, spec.mac, spec.mtu)
        _ensure_only_address(ipr, link["index"], socket.AF_INET, spec.address)
        if spec.ipv6_address is not None and netns is None:
            # A node may have IPv6 off for new devices (disable_ipv6 in conf/default): ours needs it.
            _write_sysctl(f"/proc/sys/net/ipv6/conf/{spec.name}/disable_ipv6", "0")
        _ensure_only_address(ipr, link["index"], socket.AF_INET6, spec.ipv6_address)
        return link["index"]


def drop_unicast_in_l2_multicast(ifname: str) -> None:
    """Make `ifname` drop IP unicast packets that arrive in L2 broadcast/multicast frames.

    A VTEP must: a crafted VXLAN frame with a broadcast inner MAC would otherwise
    be delivered to whichever pod its inner IP names, past every MAC-based check.
    Writes this namespace's /proc/sys (the IPv6 key only where IPv6 is present)."""
    keys = [f"/proc/sys/net/ipv4/conf/{ifname}/drop_unicast_in_l2_multicast"]
    ipv6 = f"/proc/sys/net/ipv6/conf/{ifname}/drop_unicast_in_l2_multicast"
    if os.path.exists(ipv6):
        keys.append(ipv6)
    for key in keys:
        _write_sysctl(key, "1")


def enable_ip_forwarding(*, ipv6: bool = True) -> None:
    """Pods' traffic is routed by the node: IPv4 forwarding on in this network namespace, and with
    `ipv6` (where the kernel has IPv6) net.ipv6.conf.all.forwarding too. Note that the latter makes
    interfaces with accept_ra=1 ignore router advertisements: an underlay configured by RA needs
    accept_ra=2 (as on any IPv6 router), so an IPv4-only network should pass ipv6=False."""
    _write_sysctl("/proc/sys/net/ipv4/ip_forward", "1")
    if ipv6 and os.path.exists("/proc/sys/net/ipv6/conf/all/forwarding"):
        _write_sysctl("/proc/sys/net/ipv6/conf/all/forwarding", "1")


def _write_sysctl(key: str, value: str) -> None:
    """Write a /proc/sys key of this namespace; KernelError naming the key."""
    try:
        ensure_sysctl(key, value)
    except OSError as exc:
        raise KernelError(f"cannot set {key}: {exc.strerror or exc}") from None


@_retry_busy
def ensure_bridge(name: str, address: IPv4Interface, mtu: int, *, netns: Optional[str] = None) -> int:
    """Create or reuse a Linux bridge holding `address` (its only IPv4 address), up; return its ifindex.

    KernelError if a device of that name exists and is not a bridge."""
    with _iproute(netns) as ipr, _translated(f"ensuring bridge {name}"):
        link = _find_link(ipr, name)
        if link is not None and _kind(link) != "bridge":
            raise KernelError(f"device {name} exists and is a {_kind(link) or 'device'}, not a bridge")
        if link is None:
            _add_link(ipr, ifname=name, kind="bridge", mtu=mtu)
            link = _need_link(ipr, name)
        _ensure_mac_mtu_up(ipr, link, None, mtu)
        _ensure_only_address(ipr, link["index"], socket.AF_INET, address)
        return link["index"]


@_retry_busy
def delete_link(name: str, *, netns: Optional[str] = None) -> bool:
    """Delete a device; False if there was none."""
    with _iproute(netns) as ipr, _translated(f"deleting device {name}"):
        link = _find_link(ipr, name)
        if link is None:
            return False
        try:
            ipr.link("del", index=link["index"])
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                return False
            raise
        return True


@_retry_busy
def link_exists(name: str, *, netns: Optional[str] = None) -> bool:
    with _iproute(netns) as ipr, _translated(f"looking up device {name}"):
        return _find_link(ipr, name) is not None


@_retry_busy
def vxlan_link_names(*, netns: Optional[str] = None) -> list[str]:
    """Names of the VXLAN devices here, sorted (for doctor, when etcd cannot say the VNI)."""
    with _iproute(netns) as ipr, _translated("listing devices"):
        return sorted(link.get_attr("IFLA_IFNAME") for link in ipr.get_links() if _kind(link) == "vxlan")


@_retry_busy
def link_info(name: str, *, netns: Optional[str] = None) -> dict:
    """For status/doctor: name, index, kind, mtu, mac, up, IPv4 addresses, IPv6 addresses (link-local
    ones left out), and `vxlan` (vni, port, local (either family), link, underlay, learning) or None.
    LinkNotFound if missing."""
    with _iproute(netns) as ipr, _translated(f"looking up device {name}"):
        link = _need_link(ipr, name)
        vxlan = _vxlan_attrs(link)
        if vxlan is not None:
            underlay = ipr.get_links(vxlan["link"])[0] if vxlan["link"] else None
            vxlan["underlay"] = underlay.get_attr("IFLA_IFNAME") if underlay else None
        return {
            "name": name,
            "index": link["index"],
            "kind": _kind(link),
            "mtu": link.get_attr("IFLA_MTU"),
            "mac": link.get_attr("IFLA_ADDRESS"),
            "up": bool(link["flags"] & IFF_UP),
            "addresses": [str(_interface(a)) for a in _addresses(ipr, link["index"])],
            "ipv6_addresses": [str(_interface(a)) for a in _addresses(ipr, link["index"], socket.AF_INET6)],
            "vxlan": vxlan,
        }


@_retry_busy
def underlay_for(public_ip: IPAddress, *, netns: Optional[str] = None) -> tuple[str, int]:
    """(ifname, mtu) of the interface carrying `public_ip` (IPv4 or IPv6); LinkNotFound if none does."""
    family = _address_family(public_ip.version)
    with _iproute(netns) as ipr, _translated(f"looking for the interface of {public_ip}"):
        for addr in ipr.get_addr(family=family):
            if _interface(addr).ip == public_ip:
                link = ipr.get_links(addr["index"])[0]
                return link.get_attr("IFLA_IFNAME"), link.get_attr("IFLA_MTU")
    raise LinkNotFound(f"no interface carries {public_ip}")


def _primary_address(ipr: IPRoute, index: int, ifname: str, family: int = socket.AF_INET) -> IPAddress:
    """IPv4: the first primary address. IPv6: the first global one that is settled and stable (not
    tentative, failed, deprecated or a rotating temporary address): what the peers can send to."""
    if family == socket.AF_INET:
        addrs = [a for a in _addresses(ipr, index) if not a["flags"] & _IFA_F_SECONDARY]
        if not addrs:
            raise KernelError(f"interface {ifname} has no IPv4 address")
        return _interface(addrs[0]).ip
    addrs = [a for a in _addresses(ipr, index, family) if a["scope"] == 0]
    usable = [a for a in addrs if not _address_flags(a) & _UNUSABLE_IPV6]
    if not usable:
        why = f" (only {', '.join(str(_interface(a).ip) for a in addrs)}: tentative, failed, deprecated or temporary)"
        raise KernelError(f"interface {ifname} has no usable global IPv6 address{why if addrs else ''}")
    return _interface(usable[0]).ip


@_retry_busy
def interface_address(ifname: str, *, family: int = 4, netns: Optional[str] = None) -> IPAddress:
    """The interface's address of that IP family (4 or 6): IPv4 its primary address, IPv6 its first
    settled global one (never link-local, tentative, deprecated or temporary); KernelError if none."""
    af = _address_family(family)
    with _iproute(netns) as ipr, _translated(f"reading the address of {ifname}"):
        return _primary_address(ipr, _need_link(ipr, ifname)["index"], ifname, af)


@_retry_busy
def node_addresses(*, family: int = 4, netns: Optional[str] = None) -> list[NodeAddress]:
    """Every address of that IP family (4 or 6) on the node's devices, with the device's name and link
    kind; IPv6 link-local addresses left out (one per device, never an underlay's nor a pod's)."""
    af = _address_family(family)
    with _iproute(netns) as ipr, _translated("reading the node's addresses"):
        links = {link["index"]: (link.get_attr("IFLA_IFNAME"), _kind(link)) for link in ipr.get_links()}
        found = [NodeAddress(*links.get(a["index"], (f"if{a['index']}", None)), _interface(a))
                 for a in ipr.get_addr(family=af)]
        return [a for a in found if not a.interface.ip.is_link_local] if family == 6 else found


@_retry_busy
def default_route_source(*, family: int = 4, netns: Optional[str] = None) -> tuple[str, IPAddress]:
    """(ifname, source address) of the main table's preferred default route of that IP family (4 or 6)."""
    af = _address_family(family)
    with _iproute(netns) as ipr, _translated("reading the default route"):
        defaults = [
            r
            for r in ipr.get_routes(family=af, table=RT_TABLE_MAIN)
            if r["dst_len"] == 0 and r["type"] == RTN_UNICAST
        ]
        for route in sorted(defaults, key=lambda r: r.get_attr("RTA_PRIORITY") or 0):
            oif = route.get_attr("RTA_OIF")
            if oif is None:
                hops = route.get_attr("RTA_MULTIPATH") or []
                oif = hops[0]["oif"] if hops else None
            if oif is None:
                continue
            ifname = ipr.get_links(oif)[0].get_attr("IFLA_IFNAME")
            source = route.get_attr("RTA_PREFSRC")
            return ifname, ip_address(source) if source else _primary_address(ipr, oif, ifname, af)
    if family == 6:
        raise KernelError("no IPv6 default route: give --public-ipv6 or --iface")
    raise KernelError("no IPv4 default route: give --public-ip or --iface")


def enter_netns(name: str) -> None:
    """Move the calling thread into a named network namespace (for single-threaded
    helper processes, e.g. tests standing in for `ip netns exec`)."""
    with _translated(f"entering network namespace {name}"):
        _netns.setns(name, flags=0)
