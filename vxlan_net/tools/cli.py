"""The `vxlan-net` command line: config set/get, agent, status."""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_interface
from pathlib import Path
from typing import Optional, Sequence

from vxlan_net.core.errors import InvalidConfig, StoreConfigError, StoreUnavailable, VxlanNetError
from vxlan_net.tools.logs import configure_logging
from vxlan_net.tools.usage import EXIT_USAGE, UsageError

ENV_PREFIX = "VXLAN_NET_"
EXIT_UNAVAILABLE = 1


def env_default(flag: str, fallback=None):
    """Every flag can come from VXLAN_NET_<FLAG> (dashes become underscores)."""
    return os.environ.get(ENV_PREFIX + flag.upper().replace("-", "_"), fallback)


def env_bool(flag: str, default: bool = False) -> bool:
    value = env_default(flag, "")
    if value == "":
        return default
    if value.lower() in ("0", "false", "no", "off"):
        return False
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    raise UsageError(f"{ENV_PREFIX}{flag.upper().replace('-', '_')}={value!r} is not a boolean")


def _add_etcd_flags(parser: argparse.ArgumentParser, tls: bool = True) -> None:
    parser.add_argument("--etcd-endpoints", default=env_default("etcd-endpoints", "http://127.0.0.1:2379"),
                        help="comma-separated etcd client URLs (env VXLAN_NET_ETCD_ENDPOINTS)")
    parser.add_argument("--etcd-prefix", default=env_default("etcd-prefix", "/vxlan-net"))
    if tls:
        for name in ("cafile", "certfile", "keyfile"):
            parser.add_argument(f"--etcd-{name}", default=env_default(f"etcd-{name}"))
        parser.add_argument("--etcd-username", default=env_default("etcd-username"),
                            help="etcd user, with etcd auth enabled (env VXLAN_NET_ETCD_USERNAME)")
        parser.add_argument("--etcd-password", default=env_default("etcd-password"),
                            help="its password; prefer env VXLAN_NET_ETCD_PASSWORD (argv is visible to all)")


def _int_env(flag: str, fallback, kind=int):
    """A numeric flag's default from the environment; a bad value is a usage error."""
    value = env_default(flag)
    if value is None:
        return fallback
    try:
        return kind(value)
    except ValueError:
        noun = "an integer" if kind is int else "a number"
        raise UsageError(f"{ENV_PREFIX}{flag.upper().replace('-', '_')}={value!r} is not {noun}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vxlan-net", description="VXLAN overlay network for container clusters")
    parser.add_argument("--log-level", default=env_default("log-level", "info"),
                        choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-format", default=env_default("log-format", "text"), choices=["text", "json"],
                        help="json: one JSON object per line with stable keys (time, level, logger, message)")
    commands = parser.add_subparsers(dest="command", required=True)

    config = commands.add_parser("config", help="read or write the network config in etcd")
    config_cmds = config.add_subparsers(dest="config_command", required=True)
    config_set = config_cmds.add_parser("set", help="validate and write <prefix>/config")
    _add_etcd_flags(config_set)
    config_set.add_argument("--network", default=env_default("network"), help="pod network CIDR")
    config_set.add_argument("--subnet-len", type=int, default=_int_env("subnet-len", None))
    config_set.add_argument("--subnet-min", default=env_default("subnet-min"))
    config_set.add_argument("--subnet-max", default=env_default("subnet-max"))
    config_set.add_argument("--vni", type=int, default=_int_env("vni", 1))
    config_set.add_argument("--port", type=int, default=_int_env("port", 8472))
    config_set.add_argument("--mtu", type=int, default=_int_env("mtu", None))
    config_set.add_argument("--direct-routing", action="store_true", default=False,
                            help="route to nodes on this node's L2 segment without the tunnel (Backend.DirectRouting)")
    config_set.add_argument("--ipv6-network", default=env_default("ipv6-network"),
                            help="IPv6 pod network CIDR (EnableIPv6, IPv6Network), e.g. fd19::/56")
    config_set.add_argument("--ipv6-subnet-len", type=int, default=_int_env("ipv6-subnet-len", None))
    config_set.add_argument("--ipv6-subnet-min", default=env_default("ipv6-subnet-min"))
    config_set.add_argument("--ipv6-subnet-max", default=env_default("ipv6-subnet-max"))
    config_set.add_argument("--no-ipv4", action="store_true", default=None,
                            help="an IPv6-only network (EnableIPv4 false): needs --ipv6-network, refuses --network "
                                 "(env VXLAN_NET_NO_IPV4=true)")
    config_get = config_cmds.add_parser("get", help="print <prefix>/config")
    _add_etcd_flags(config_get)

    agent = commands.add_parser("agent", help="run the node agent in the foreground")
    _add_etcd_flags(agent)
    agent.add_argument("--iface", default=env_default("iface"), help="underlay interface")
    agent.add_argument("--public-ip", default=env_default("public-ip"), help="this node's tunnel endpoint address")
    agent.add_argument("--public-ipv6", default=env_default("public-ipv6"),
                       help="this node's tunnel endpoint over an IPv6 underlay (default: the underlay "
                            "interface's global IPv6 address, when the network has IPv6)")
    agent.add_argument("--subnet-file", default=env_default("subnet-file", "/run/vxlan-net/subnet.env"))
    agent.add_argument("--state-dir", default=env_default("state-dir", "/var/lib/vxlan-net"))
    agent.add_argument("--ip-masq", action="store_true", default=None,
                       help="masquerade traffic leaving the pod network (env VXLAN_NET_IP_MASQ=true)")
    agent.add_argument("--subnet-lease-ttl", type=int, default=_int_env("subnet-lease-ttl", 24 * 3600))
    agent.add_argument("--resync-interval", type=float, default=_int_env("resync-interval", 30.0, float))
    agent.add_argument("--vxlan-ingress-filter", action=argparse.BooleanOptionalAction, default=None,
                       help="accept VXLAN only from current nodes' public IPs (default on)")
    agent.add_argument("--healthz-addr", default=env_default("healthz-addr"),
                       help="HOST:PORT serving /healthz, /readyz and /metrics (default: off)")
    agent.add_argument("--cni-socket", default=env_default("cni-socket"),
                       help="socket where the CNI plugin hands over veth deletions (default: cni.sock next to "
                            "--subnet-file, where the plugin looks)")
    agent.add_argument("--cni-bridge", default=env_default("cni-bridge"),
                       help="the bridge the CNI plugin puts pods on: its conflist's `bridge` (default: the "
                            "plugin's default)")

    status = commands.add_parser("status", help="show the leases and whether this node's kernel matches them")
    _add_etcd_flags(status)
    for name in PLUGGED_COMMANDS:
        importlib.import_module(f".{name}", __package__).register(commands, add_etcd_flags=_add_etcd_flags)
    return parser


# Subcommands that live in modules of their own; each module has
# `register(subparsers, add_etcd_flags)` which sets `handler=<callable(args) -> int>`.
PLUGGED_COMMANDS: tuple[str, ...] = ("inspect_cmd", "doctor_cmd", "install_cni")


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        configure_logging(args.log_level, args.log_format)
        if getattr(args, "handler", None) is not None:
            return args.handler(args)
        if args.command == "config":
            return _config_set(args) if args.config_command == "set" else _config_get(args)
        if args.command == "agent":
            return _agent(args)
        return _status(args)
    except (UsageError, InvalidConfig, StoreConfigError) as exc:
        print(f"vxlan-net: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except StoreUnavailable as exc:
        print(f"vxlan-net: etcd unavailable: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except VxlanNetError as exc:
        print(f"vxlan-net: error: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE


def _endpoints(args) -> list[str]:
    endpoints = [e.strip() for e in (args.etcd_endpoints or "").split(",") if e.strip()]
    if not endpoints:
        raise UsageError("--etcd-endpoints is empty")
    return endpoints


def _store(args, **options):
    """The etcd door as the etcd flags describe it (`options`: e.g. timeout)."""
    from vxlan_net.doors.store import EtcdStore  # imported late: `--help` and usage errors stay fast

    return EtcdStore(_endpoints(args), args.etcd_prefix, **options, ca_cert=getattr(args, "etcd_cafile", None),
                     cert_key=getattr(args, "etcd_keyfile", None), cert_cert=getattr(args, "etcd_certfile", None),
                     username=getattr(args, "etcd_username", None), password=getattr(args, "etcd_password", None))


def _config_set(args) -> int:
    from vxlan_net.core.config import build_config

    no_ipv4 = args.no_ipv4 if args.no_ipv4 is not None else env_bool("no-ipv4")
    if no_ipv4:
        if not args.ipv6_network:
            raise UsageError("--no-ipv4 needs --ipv6-network: a network without IPv4 is IPv6-only")
        if args.network:  # two flags that contradict each other: refuse rather than pick one
            raise UsageError("--no-ipv4 and --network contradict each other: drop one")
    elif not args.network:
        raise UsageError("--network is required (or --no-ipv4 with --ipv6-network for an IPv6-only network)")
    config = build_config(None if no_ipv4 else args.network, args.subnet_len, args.subnet_min, args.subnet_max,
                          args.vni, args.port, args.mtu, args.direct_routing,
                          ipv6_network=args.ipv6_network or None, ipv6_subnet_len=args.ipv6_subnet_len,
                          ipv6_subnet_min=args.ipv6_subnet_min or None, ipv6_subnet_max=args.ipv6_subnet_max or None)
    with _store(args) as store:
        store.put_config(config.to_json())
    print(config.to_json())
    return 0


class NoConfig(VxlanNetError):
    """No network config has been written to etcd yet."""


def _read_config(store, args) -> bytes:
    raw = store.get_config()
    if raw is None:
        raise NoConfig(f"no config at {args.etcd_prefix}/config (write it with `vxlan-net config set`)")
    return raw


def _config_get(args) -> int:
    with _store(args) as store:
        print(_read_config(store, args).decode(errors="replace"))
    return 0


def parse_listen_address(value: str) -> tuple[str, int]:
    """`HOST:PORT` (or `:PORT` for all addresses); ValueError with a reason otherwise."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r} is not HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def _unicast_address(flag: str, value: Optional[str], kind):
    """The flag's address of that family, or UsageError; None when not given."""
    from vxlan_net.core.config import unusable_block

    if not value:
        return None
    version = 4 if kind is IPv4Address else 6
    try:
        address = kind(value)
    except ValueError:
        raise UsageError(f"{flag} {value!r} is not an IPv{version} address") from None
    unusable = unusable_block(address)
    if unusable:
        raise UsageError(f"{flag} {address} is in {unusable}: it cannot be a tunnel endpoint")
    return address


def _agent(args) -> int:
    from cni.config import DEFAULT_BRIDGE, valid_ifname

    from vxlan_net.agent.loop import Agent, AgentOptions

    public_ip = _unicast_address("--public-ip", args.public_ip, IPv4Address)
    public_ipv6 = _unicast_address("--public-ipv6", args.public_ipv6, IPv6Address)
    if args.subnet_lease_ttl < 5:
        raise UsageError(f"--subnet-lease-ttl {args.subnet_lease_ttl} must be at least 5 seconds")
    if args.resync_interval <= 0:
        raise UsageError(f"--resync-interval {args.resync_interval} must be positive")
    bridge = args.cni_bridge or DEFAULT_BRIDGE
    if not valid_ifname(bridge):
        raise UsageError(f"--cni-bridge {bridge!r} is not a valid interface name")
    healthz = None
    if args.healthz_addr:
        try:
            healthz = parse_listen_address(args.healthz_addr)
        except ValueError as exc:
            raise UsageError(f"--healthz-addr: {exc}") from None
    ingress_filter = args.vxlan_ingress_filter
    if ingress_filter is None:
        ingress_filter = env_bool("vxlan-ingress-filter", default=True)
    options = AgentOptions(
        etcd_endpoints=tuple(_endpoints(args)), etcd_prefix=args.etcd_prefix, etcd_cafile=args.etcd_cafile,
        etcd_certfile=args.etcd_certfile, etcd_keyfile=args.etcd_keyfile, etcd_username=args.etcd_username,
        etcd_password=args.etcd_password, iface=args.iface, public_ip=public_ip, public_ipv6=public_ipv6,
        subnet_file=Path(args.subnet_file), state_dir=Path(args.state_dir),
        ip_masq=args.ip_masq if args.ip_masq is not None else env_bool("ip-masq"),
        subnet_lease_ttl=args.subnet_lease_ttl, resync_interval=args.resync_interval,
        vxlan_ingress_filter=ingress_filter, healthz_addr=healthz,
        cni_socket=Path(args.cni_socket) if args.cni_socket else None, cni_bridge=bridge,
    )
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    return Agent(options, stop).run()


def _status(args) -> int:
    from vxlan_net.core.config import parse_config
    from vxlan_net.core.desired import OverlayEntries, desired_by_vtep
    from vxlan_net.core.direct import DirectReach
    from vxlan_net.core.lease_book import LeaseBook
    from vxlan_net.core.names import ENDPOINT_LABEL, vtep_name, vtep_names
    from vxlan_net.core.underlay import families_read, node_underlay
    from vxlan_net.doors import kernel
    from vxlan_net.tools.status import (describe_drift, lease_mode, own_address_line, own_lease_of,
                                        render_lease_table, skipped_lines)

    with _store(args) as store:
        config = parse_config(_read_config(store, args))
        snapshot = store.list_leases(with_ttl=True)
        etcd_addresses = store.endpoint_addresses()
    book = LeaseBook(config)
    book.replace(snapshot.events())
    ttls = {name: record.ttl_remaining for name, record in snapshot.records.items()}
    rows = [(lease, ttls.get(lease.key_name)) for lease in book.valid_leases()]
    pod_families = [space.version for space in config.spaces]
    # This node's VTEPs, one per underlay family it has: {family: link_info}.
    vteps = {family: kernel.link_info(vtep_name(config.vni, family)) for family in (4, 6)
             if kernel.link_exists(vtep_name(config.vni, family))}
    held = [ip_interface(a).ip for info in vteps.values() for a in (*info["addresses"], *info["ipv6_addresses"])]
    own = own_lease_of(book.valid_leases(), held)
    underlay = next(((info["vxlan"] or {}).get("underlay") for info in vteps.values()), None)
    reach = None
    if own is not None:  # skip what this node's agent skips
        book.set_own(own)
        families = families_read(config, 6 in vteps)
        routes = [r for family in families for r in kernel.main_table_routes(family=family)]
        addresses = [a for family in families for a in kernel.node_addresses(family=family)]
        book.set_protected(node_underlay(config, addresses, routes, etcd_addresses).protected())
        if config.direct_routing and underlay:  # decided as the agent decides
            reach = DirectReach.from_routes(routes, underlay)
    modes = None
    if own is not None:
        modes = {lease.subnet: lease_mode(reach, lease, pod_families) for lease in book.peers()}
    ipv6 = config.ipv6 is not None or any(lease.public_ipv6 for lease, _ in rows)
    print(render_lease_table(rows, own.subnet if own else None, modes, ipv6=ipv6))
    for line in skipped_lines(book.skipped()):
        print(line)
    print(f"direct routing: {'on' if config.direct_routing else 'off'}")
    if own is None:
        names = " or ".join(vtep_names(config.vni))
        why = "holds no lease's subnet address" if vteps else "here"
        print(f"this node: no {names} device {why} (not a node, or the agent has not started)")
        return 0
    for family, info in vteps.items():
        node_ips = {a.interface.ip for a in kernel.node_addresses(family=family)}
        local = (info["vxlan"] or {}).get("local")
        print(own_address_line(own.endpoint(family)[0] if own.endpoint(family) else None,
                               ip_address(local) if local else None, (info["vxlan"] or {}).get("underlay"),
                               node_ips, ENDPOINT_LABEL[family]))
    peers = book.peers()
    desired = desired_by_vtep(peers, own_underlays=tuple(vteps), own_families=pod_families,
                              is_direct=reach.is_direct if reach else None)
    drift = []
    for i, family in enumerate(vteps):  # direct routes are read beside the first VTEP's entries, as written
        name = vtep_name(config.vni, family)
        lines = describe_drift(desired.get(family, OverlayEntries()),
                               kernel.read_overlay_entries(name, underlay=underlay if i == 0 else None))
        drift += [f"{name}: {line}" for line in lines] if len(vteps) > 1 else lines
    subnets = " + ".join(map(str, own.subnets))
    if not drift:
        print(f"this node ({subnets}): kernel entries match {len(peers)} peer{'' if len(peers) == 1 else 's'}")
        return 0
    print(f"this node ({subnets}): kernel entries differ from the leases:")
    print("\n".join(f"  {line}" for line in drift))
    return 1
