"""The dispatcher: env + stdin in, (exit code, stdout text) out, for every CNI command.

Takes the kernel as an argument (the real `Wiring` by default) so that tests
can run every command in-process with a fake one. Errors are the spec's JSON
on stdout with exit 1; nothing here writes to stdout itself.
"""

import posix  # not os: its import costs ~1 ms of every command (cni.main)

from . import errors as E
from .agent_socket import HOST_VETH_DIGEST_CHARS, HOST_VETH_PREFIX, socket_path
from .config import (addr_text, decode_config, format_mac, is_ipv6, parse_env, parse_mac, parse_netconf,
                     plan_addresses, random_mac)
from .errors import CniError
from .ipam import DiskStore, allocate_all, held_by, release_owner
from .subnet_file import read_subnet_file
from .jsonfast import dumps
from .versions import stated_version, version_reply

try:
    from _blake2 import blake2s
except ImportError:  # pragma: no cover
    from hashlib import blake2s


def host_veth_name(container_id: str, ifname: str) -> str:
    """Deterministic, so DEL and GC find the host end without the container's netns."""
    digest = blake2s(f"{container_id}\0{ifname}".encode(), digest_size=HOST_VETH_DIGEST_CHARS // 2).hexdigest()
    return HOST_VETH_PREFIX + digest


def run(environ, stdin: bytes, kernel=None, store=DiskStore):
    """Run one plugin invocation; returns (exit code, text for stdout).

    `kernel` (default `Wiring`) and `store` (a `DiskStore`-like factory) are
    swapped for fakes in tests.
    """
    raw, bad_config = None, None
    try:
        raw = decode_config(stdin)
    except CniError as exc:  # reported after the env's errors, and never for VERSION
        bad_config = exc
    version = stated_version(raw)  # what an error reply says
    try:
        env = parse_env(environ)
        if env.command == "VERSION":
            return version_reply(stdin)
        if bad_config is not None:
            raise bad_config
        conf = parse_netconf(raw, env)
        if kernel is None:
            from .wiring import Wiring

            kernel = Wiring(agent_socket=socket_path(conf.subnet_file))
        return COMMANDS[env.command](env, conf, kernel, store)
    except CniError as exc:
        return 1, dumps(exc.to_dict(version))
    except Exception as exc:  # a bug: still answer in the spec's shape, and log the traceback
        import traceback

        traceback.print_exc()
        # Only the type: an exception's arguments may hold what it was parsing (a
        # UnicodeDecodeError holds the whole input), and this message reaches pod events.
        return 1, dumps(CniError(E.INTERNAL, f"internal error: {type(exc).__name__} (traceback on stderr)")
                        .to_dict(version))


def _open_netns(path: str) -> int:
    from .netns import is_netns, open_netns

    try:
        fd = open_netns(path)
    except FileNotFoundError:
        raise CniError(E.INVALID_ENV, f"CNI_NETNS {path} does not exist") from None
    except OSError as exc:
        raise CniError(E.INVALID_ENV, f"cannot open CNI_NETNS {path}: {exc.strerror}") from None
    if not is_netns(fd):
        posix.close(fd)
        raise CniError(E.INVALID_ENV, f"CNI_NETNS {path} is not a network namespace")
    return fd


def cmd_add(env, conf, kernel, store):
    node = read_subnet_file(conf.subnet_file)
    plan = plan_addresses(conf, node)
    netns_fd = _open_netns(env.netns)
    try:
        with store(conf.data_dir, conf.name) as locked:
            ips = allocate_all(locked, plan.families, env.container_id, env.ifname, conf.requested_ips)
        addresses = [(ip, family.prefix, family.gateway) for ip, family in zip(ips, plan.families)]
        host_veth = host_veth_name(env.container_id, env.ifname)
        try:
            made = kernel.attach(bridge=conf.bridge, addresses=addresses, mtu=plan.mtu, hairpin=conf.hairpin,
                                 host_veth=host_veth, netns_fd=netns_fd, ifname=env.ifname,
                                 mac=conf.requested_mac or random_mac(), routes=plan.routes)
        except BaseException:
            with store(conf.data_dir, conf.name) as locked:
                for ip in ips:
                    locked.release(ip)
            raise
    finally:
        posix.close(netns_fd)
    interfaces = [
        {"name": conf.bridge, "mac": format_mac(made.bridge_mac)},
        {"name": host_veth, "mac": format_mac(made.host_mac)},
        {"name": env.ifname, "mac": format_mac(made.container_mac), "sandbox": env.netns},
    ]
    if conf.cni_version == "1.1.0":
        interfaces[2]["mtu"] = plan.mtu
    listed = []
    for ip, prefix, gateway in addresses:
        address = {"address": f"{addr_text(ip)}/{prefix}", "gateway": addr_text(gateway), "interface": 2}
        if conf.cni_version < "1.0.0":
            address["version"] = "6" if is_ipv6(ip) else "4"
        listed.append(address)
    result = {"cniVersion": conf.cni_version, "interfaces": interfaces, "ips": listed,
              "routes": [r.to_dict() for r in plan.routes], "dns": {}}
    return 0, dumps(_merge_prev(conf.prev_result, result))


def _merge_prev(prev, result):
    """A chained ADD: keep what earlier plugins reported, ours after it."""
    if not prev:
        return result
    interfaces = _listed(prev, "interfaces")
    offset = len(interfaces)
    for ip in result["ips"]:
        ip["interface"] += offset
    merged = dict(result)
    merged["interfaces"] = interfaces + result["interfaces"]
    for key in ("ips", "routes"):
        merged[key] = _listed(prev, key) + result[key]
    if isinstance(prev.get("dns"), dict):
        merged["dns"] = prev["dns"]
    return merged


def cmd_del(env, conf, kernel, store):
    """Release the address, then remove the host veth (its peer goes with it).

    The release is synchronous; the veth's removal may be handed to the agent
    (`Wiring.detach`), the same order as the reference bridge plugin's DEL.
    """
    with store(conf.data_dir, conf.name, create=False) as locked:
        if locked is not None:
            release_owner(locked, env.container_id, env.ifname)
    kernel.detach(host_veth_name(env.container_id, env.ifname))
    return 0, ""


def _listed(prev: dict, key: str) -> list:
    """prevResult's list under key, or []: prevResult is the runtime's, any shape may come."""
    value = prev.get(key)
    return value if isinstance(value, list) else []


def _result_mac(prev: dict, ifname: str):
    """The MAC prevResult reports for the pod's ifname: bytes; None when absent or not a string; b"" when
    a string that is not a MAC (reported, never quoted)."""
    for iface in _listed(prev, "interfaces"):
        if isinstance(iface, dict) and iface.get("name") == ifname and iface.get("sandbox"):
            mac = iface.get("mac")
            if not isinstance(mac, str):
                return None
            try:
                return parse_mac(mac)
            except ValueError:
                return b""
    return None


def cmd_check(env, conf, kernel, store):
    from .netlink import IFF_UP

    prev = conf.prev_result
    if not prev:
        raise CniError(E.INVALID_CONFIG, "CHECK needs prevResult (the ADD result) in the config")
    node = read_subnet_file(conf.subnet_file)
    plan = plan_addresses(conf, node)
    with store(conf.data_dir, conf.name, create=False) as locked:
        owners = locked.reservations() if locked is not None else {}
    mine = held_by(owners, env.container_id, env.ifname)
    if not mine:
        raise CniError(E.UNKNOWN_CONTAINER, f"no address is reserved for container {env.container_id} "
                       f"interface {env.ifname}")
    # Each family the pod holds an address of is checked; a family the network gained after the pod's
    # ADD (IPv6 added to a running IPv4 cluster) is not the pod's, and its routes are not expected.
    held = [(family, next((ip for ip in mine if is_ipv6(ip) == is_ipv6(family.gateway)), None))
            for family in plan.families]
    held = [(family, ip) for family, ip in held if ip is not None]
    if not held:
        raise CniError(E.CHECK_MISMATCH, f"the addresses reserved for container {env.container_id} interface "
                       f"{env.ifname} are of no family the network assigns now")
    held_ipv6 = {is_ipv6(ip) for _, ip in held}
    problems = []
    # prevResult's values are compared, never quoted (see `errors.shown`); its addresses would add nothing.
    reported = [a.get("address") for a in _listed(prev, "ips") if isinstance(a, dict)]
    for family, ip in held:
        if f"{addr_text(ip)}/{family.prefix}" not in reported:
            problems.append(f"reserved address {addr_text(ip)}/{family.prefix} is not in prevResult")
    for family in plan.families:
        ipv6 = is_ipv6(family.gateway)
        if ipv6 not in held_ipv6 and any(isinstance(a, str) and (":" in a) == ipv6 for a in reported):
            problems.append(f"prevResult lists an {'IPv6' if ipv6 else 'IPv4'} address, and none is reserved")
    host_veth = host_veth_name(env.container_id, env.ifname)
    netns_fd = _open_netns(env.netns)
    try:
        facts = kernel.inspect(netns_fd, env.ifname, host_veth, conf.bridge)
    finally:
        posix.close(netns_fd)
    link = facts["link"]
    if link is None:
        problems.append(f"interface {env.ifname} is missing in {env.netns}")
    else:
        if link.mtu != plan.mtu:
            problems.append(f"{env.ifname} has MTU {link.mtu}, want {plan.mtu}")
        if not link.flags & IFF_UP:
            problems.append(f"{env.ifname} is down")
        want_mac = _result_mac(prev, env.ifname)
        if want_mac == b"":
            problems.append(f"prevResult's MAC for {env.ifname} is not a MAC address")
        elif want_mac and link.mac != want_mac:
            problems.append(f"{env.ifname} has MAC {format_mac(link.mac)}, prevResult says {format_mac(want_mac)}")
        for family, ip in held:
            if (ip, family.prefix) not in facts["addresses"]:
                problems.append(f"{env.ifname} lacks address {addr_text(ip)}/{family.prefix}")
        for route in plan.routes:
            if is_ipv6(route.dst) not in held_ipv6:
                continue
            if (route.dst, route.prefix, route.gw) not in facts["routes"]:  # parse_netconf refused host bits
                problems.append(f"route {addr_text(route.dst)}/{route.prefix} via {addr_text(route.gw)} "
                                f"is missing on {env.ifname}")
    host, bridge = facts["host"], facts["bridge"]
    if host is None:
        problems.append(f"host end {host_veth} is missing")
    else:
        if bridge is None or host.master != bridge.index:
            problems.append(f"host end {host_veth} is not attached to bridge {conf.bridge}")
        if host.mtu != plan.mtu:
            problems.append(f"host end {host_veth} has MTU {host.mtu}, want {plan.mtu}")
        if conf.hairpin and not host.hairpin:
            problems.append(f"host end {host_veth} has hairpin mode off, the config wants it on")
        if link is not None and host.peer_index != link.index:
            problems.append(f"host end {host_veth} is not the peer of {env.ifname}")
    if bridge is None:
        problems.append(f"bridge {conf.bridge} is missing")
    else:
        for family, _ in held:
            if (family.gateway, family.prefix) not in facts["bridge_addresses"]:
                problems.append(f"bridge {conf.bridge} lacks the gateway address "
                                f"{addr_text(family.gateway)}/{family.prefix}")
    if problems:
        raise CniError(E.CHECK_MISMATCH, "; ".join(problems))
    return 0, ""


def cmd_gc(env, conf, kernel, store):
    """Release this network's reservations that are not valid attachments, and remove their host veths.

    Only veths named for such a reservation (`host_veth_name`) and enslaved to
    this network's bridge go: another network's attachments, a veth someone
    else made, and a veth whose reservation is already gone stay. Each veth goes
    before its reservation, under the lock: a failure keeps the reservation,
    so the next GC retries it.
    """
    valid = conf.valid_attachments
    if valid is None:
        raise CniError(E.INVALID_CONFIG, "GC needs cni.dev/valid-attachments in the config")
    valid_containers = {cid for cid, _ in valid}
    with store(conf.data_dir, conf.name, create=False) as locked:
        if locked is None:
            return 0, ""
        stale = {}
        for ip, owner in locked.reservations().items():
            # None: an entry the plugin did not write (a link, a FIFO): not ours to release.
            # A file in host-local's old format names only the container: it is valid if the container is.
            if owner is not None and owner not in valid and not (owner[1] == "" and owner[0] in valid_containers):
                stale[ip] = host_veth_name(*owner)
        ours = set(kernel.ports(conf.bridge, HOST_VETH_PREFIX)) if stale else set()
        for ip, host_veth in sorted(stale.items()):
            if host_veth in ours:
                kernel.detach(host_veth)
                ours.discard(host_veth)
            locked.release(ip)
    return 0, ""


def cmd_status(env, conf, kernel, store):
    try:
        plan = plan_addresses(conf, read_subnet_file(conf.subnet_file))
    except CniError as exc:
        raise CniError(E.NOT_AVAILABLE, f"not ready for ADD: {exc.msg}") from None
    try:
        with store(conf.data_dir, conf.name, create=False) as locked:
            reserved = list(locked.reservations()) if locked is not None else []
    except CniError as exc:  # e.g. a link planted in the store: ADD would fail the same way
        raise CniError(E.NOT_AVAILABLE, f"not ready for ADD: {exc.msg}") from None
    for family in plan.families:  # an ADD needs an address of each family
        used = sum(1 for ip in reserved if family.start <= ip <= family.end and ip != family.gateway)
        if used >= family.size:
            raise CniError(E.NOT_AVAILABLE_LIMITED, f"all {family.size} addresses of the node's "
                           f"{'IPv6' if is_ipv6(family.gateway) else 'IPv4'} range are allocated")
    return 0, ""


COMMANDS = {"ADD": cmd_add, "DEL": cmd_del, "CHECK": cmd_check, "GC": cmd_gc, "STATUS": cmd_status}
