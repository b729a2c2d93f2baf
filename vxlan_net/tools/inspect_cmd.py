"""`vxlan-net inspect`: capture (or read) underlay traffic and print one line per VXLAN frame."""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from typing import Any, Callable, Optional

from vxlan_net.tools.usage import EXIT_USAGE, UsageError

EXIT_FAILED = 1
ETCD_TIMEOUT = 2.0
"""Seconds per etcd request: resolution is a bonus, the capture must not wait for it."""


def register(subparsers: Any, add_etcd_flags: Callable[..., None]) -> None:
    parser = subparsers.add_parser(
        "inspect", help="decode the VXLAN frames crossing the underlay, live or from a pcap file",
        description="Capture (or read) underlay traffic and print one line per VXLAN frame, with the nodes "
                    "and leases it belongs to (from etcd, when reachable) and its anomalies.")
    add_etcd_flags(parser)
    parser.add_argument("--iface", help="underlay interface to capture on (or `any`)")
    parser.add_argument("--read", metavar="FILE.pcap", help="decode a capture file instead of capturing")
    parser.add_argument("--write", metavar="FILE.pcap", help="also write the shown frames to a pcap file")
    parser.add_argument("--port", type=int, help="tunnel UDP port (default: the config's, else 8472)")
    parser.add_argument("--vni", type=int, help="our VNI; others are flagged (default: the config's)")
    parser.add_argument("--count", type=int, default=0, help="stop after this many frames (0: no limit)")
    parser.add_argument("--timeout", type=float, help="stop capturing after this many seconds")
    parser.add_argument("--filter", help='"pod IP" (inner source or destination), "node IP" (outer), '
                                         "or a BPF expression")
    parser.add_argument("--path-mtu", type=int, help="largest outer packet the path carries "
                                                     "(default: the interface MTU when capturing)")
    parser.add_argument("--json", action="store_true", help="one JSON object per frame and line")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    try:
        return _inspect(args)
    except UsageError as exc:
        print(f"vxlan-net inspect: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _inspect(args: argparse.Namespace) -> int:
    _check_flags(args)
    logging.getLogger("scapy").setLevel(logging.ERROR)  # scapy warns about routes and interfaces at import
    from vxlan_net.tools import inspect_frames as frames

    try:
        frame_filter = frames.parse_filter(args.filter)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.iface:
        _check_iface(args.iface)
    if args.read:
        _check_pcap(args.read)
    _check_bpf(frames.capture_bpf(frame_filter, args.port or frames.DEFAULT_PORT), args.iface)
    config, leases = _cluster(args)
    port = args.port or (config.port if config else frames.DEFAULT_PORT)
    context = frames.InspectContext.from_leases(
        leases, port=port, vni=args.vni if args.vni is not None else (config.vni if config else None),
        pod_network=config.ipv4_network if config else None,
        pod_network6=config.ipv6_network if config else None,
        path_mtu=args.path_mtu or (_iface_mtu(args.iface) if args.iface and not args.read else None))
    # With direct routing, pod packets between nodes of one segment cross the underlay unencapsulated.
    direct = config is not None and config.direct_routing
    bpf = frames.capture_bpf(frame_filter, port, config.ipv4_network if direct else None,
                             config.ipv6_network if direct else None)
    printer = _Printer(args, context, frame_filter)
    try:
        _sniff(args, bpf if (not args.read or frame_filter.kind == "bpf") else None, printer)
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        print(f"vxlan-net inspect: capture failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        printer.close()
    print(f"vxlan-net inspect: {printer.shown} frames, {printer.anomalous} with anomalies", file=sys.stderr)
    return 0


def _check_flags(args: argparse.Namespace) -> None:
    if bool(args.iface) == bool(args.read):
        raise UsageError("give either --iface (capture) or --read FILE.pcap")
    if args.count < 0:
        raise UsageError(f"--count {args.count} must be 0 (no limit) or more")
    if args.timeout is not None and args.timeout <= 0:
        raise UsageError(f"--timeout {args.timeout} must be positive")
    if args.port is not None and not 1 <= args.port <= 65535:
        raise UsageError(f"--port {args.port} is not a UDP port")
    if args.vni is not None and not 0 <= args.vni <= 16_777_215:
        raise UsageError(f"--vni {args.vni} is not a VNI (0..16777215)")
    if args.path_mtu is not None and args.path_mtu < 68:
        raise UsageError(f"--path-mtu {args.path_mtu} is below the IPv4 minimum of 68")


def _check_iface(name: str) -> None:
    if name == "any":
        return
    try:
        socket.if_nametoindex(name)
    except OSError:
        raise UsageError(f"no interface {name!r} in this network namespace") from None


def _iface_mtu(name: str) -> Optional[int]:
    if name == "any":
        return None
    import fcntl
    import struct

    siocgifmtu = 0x8921
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16si12x", name.encode()[:15], 0)
        return struct.unpack("16si12x", fcntl.ioctl(sock, siocgifmtu, request))[1]


def _check_pcap(path: str) -> None:
    from scapy.error import Scapy_Exception
    from scapy.utils import PcapReader

    try:
        PcapReader(path).close()
    except (OSError, Scapy_Exception, EOFError) as exc:
        raise UsageError(f"--read {path}: {exc}") from None


def _check_bpf(bpf: str, iface: Optional[str]) -> None:
    from scapy.arch.common import compile_filter
    from scapy.data import DLT_EN10MB, DLT_LINUX_SLL
    from scapy.error import Scapy_Exception

    try:
        compile_filter(bpf, linktype=DLT_LINUX_SLL if iface == "any" else DLT_EN10MB)
    except (Scapy_Exception, ImportError) as exc:
        raise UsageError(f"--filter: {exc}") from None


def _cluster(args: argparse.Namespace) -> tuple[Any, list]:
    """The config and the valid leases from etcd, or (None, []) with one line on stderr."""
    from vxlan_net.core.config import parse_config
    from vxlan_net.tools.cli import _store
    from vxlan_net.core.errors import VxlanNetError
    from vxlan_net.core.lease_book import LeaseBook
    from vxlan_net.tools.status import skipped_lines

    try:
        with _store(args, timeout=ETCD_TIMEOUT) as store:
            raw = store.get_config()
            if raw is None:
                raise VxlanNetError(f"no config at {args.etcd_prefix}/config")
            config = parse_config(raw)
            snapshot = store.list_leases()
    except (VxlanNetError, UsageError) as exc:
        print(f"vxlan-net inspect: etcd not usable ({exc}); decoding without node names or pod network checks",
              file=sys.stderr)
        return None, []
    book = LeaseBook(config)
    book.replace(snapshot.events())
    leases = book.peers()
    networks = " and ".join(str(space.network) for space in config.spaces)
    print(f"vxlan-net inspect: VNI {config.vni}, port {config.port}, pod network {networks}, "
          f"{len(leases)} nodes known from etcd", file=sys.stderr)
    for line in skipped_lines(book.skipped()):
        print(f"vxlan-net inspect: {line}", file=sys.stderr)
    return config, leases


class _Printer:
    """Decodes each captured packet, prints the VXLAN frames that match, writes them to --write."""

    def __init__(self, args: argparse.Namespace, context: Any, frame_filter: Any) -> None:
        self.context = context
        self.frame_filter = frame_filter
        self.json = args.json
        self.limit = args.count
        self.shown = 0
        self.anomalous = 0
        self.writer = None
        if args.write:
            from scapy.utils import PcapWriter

            try:
                self.writer = PcapWriter(args.write, sync=True)
            except OSError as exc:
                raise UsageError(f"--write {args.write}: {exc}") from None

    def done(self, _packet: Any = None) -> bool:
        return bool(self.limit) and self.shown >= self.limit

    def __call__(self, packet: Any) -> None:
        from vxlan_net.tools import inspect_frames as frames

        if self.done():
            return
        frame = frames.decode_frame(packet, self.context) or frames.decode_direct(packet, self.context)
        if frame is None or not self.frame_filter.matches(frame):
            return
        self.shown += 1
        self.anomalous += bool(frame.anomalies)
        print(frames.to_json(frame) if self.json else frames.format_line(frame), flush=True)
        if self.writer is not None:
            self.writer.write(packet)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _sniff(args: argparse.Namespace, bpf: Optional[str], printer: _Printer) -> None:
    from scapy.sendrecv import sniff

    if args.read:
        sniff(offline=args.read, filter=bpf, prn=printer, store=False, stop_filter=printer.done)
        return

    def started() -> None:
        limits = [f"{args.count} frames" if args.count else "", f"{args.timeout:g} s" if args.timeout else ""]
        bound = " or ".join(part for part in limits if part) or "Ctrl-C"
        print(f"vxlan-net inspect: listening on {args.iface} ({bpf}) until {bound}", file=sys.stderr, flush=True)

    sniff(iface=args.iface, filter=bpf, prn=printer, store=False, stop_filter=printer.done,
          timeout=args.timeout, started_callback=started)
