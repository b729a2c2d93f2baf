"""The plugin's kernel steps: bridge, veth pair, pod addresses and routes; and their inverse and inspection.

Per address family the pod gets: the family's gateway on the bridge, the pod's address on its
interface, its routes via that gateway. IPv6 addresses go on with IFA_F_NODAD on both sides, as the
reference bridge plugin turns DAD off for pod addresses (IPAM made them unique), on devices with IPv6
enabled (`enable_ipv6_on`: a namespace's `all`/`default` may say disabled). IPv6 forwarding in the
node's namespace is the agent's to turn on; the plugin works without it (pods on one bridge reach each
other and the gateway).

`Wiring` is the real kernel (raw netlink, `cni.netlink`); tests pass a fake with
the same four methods to the dispatcher. `attach` is all-or-nothing: once the
veth pair exists, any later failure deletes it (which removes both ends).
`detach` first asks the node agent to delete the host veth (`cni.agent_socket`).
"""

import posix

from . import errors as E
from . import netlink as nl
from .agent_socket import LOCK_SUFFIX, NameLock, ask_agent_to_delete
from .config import Record, addr_text, is_ipv6, random_mac
from .errors import CniError
from .sysctl import ensure_sysctl


def _kernel_error(what: str, exc: OSError) -> CniError:
    return CniError(E.KERNEL, f"{what}: {exc.strerror or exc}", f"errno {exc.errno}")


def _raise_if(err: int, what: str, ok=()) -> None:
    if err and err not in ok:
        raise CniError(E.KERNEL, f"{what}: {posix.strerror(err)}", f"errno {err}")


def enable_ip_forward() -> None:
    """The bridge routes pod traffic, as the reference bridge plugin ensures (per network namespace)."""
    path = "/proc/sys/net/ipv4/ip_forward"
    try:
        ensure_sysctl(path, "1")
    except OSError as exc:
        raise _kernel_error(f"cannot enable {path}", exc) from None


def enable_ipv6_on(ifname: str) -> None:
    """IPv6 on one device of ours (the bridge, the pod's interface) in the current namespace, as the
    reference plugins' ConfigureIface does: a namespace made with `disable_ipv6=1` for all and default
    devices refuses IPv6 addresses (EACCES) until the device's own switch is 0."""
    path = f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6"
    try:
        ensure_sysctl(path, "0")
    except FileNotFoundError:
        raise CniError(E.KERNEL, f"cannot enable IPv6 on {ifname}: {path} does not exist (is IPv6 disabled in "
                       "the kernel, ipv6.disable=1?); the node subnet has IPv6") from None
    except OSError as exc:
        raise _kernel_error(f"cannot enable IPv6 on {ifname} ({path})", exc) from None


def _netlink_in(netns_fd: int, enable_ipv6=None) -> nl.Netlink:
    """A netlink socket bound to the netns of netns_fd (it stays there; we return to ours at once);
    IPv6 enabled on the device named `enable_ipv6` there first."""
    from .netns import Entered  # here, not at the top: DEL never enters a netns (_ctypes)

    with Entered(netns_fd):
        if enable_ipv6 is not None:
            enable_ipv6_on(enable_ipv6)
        return nl.Netlink()


class Attachment(Record):
    """What `attach` made, for the result: the MACs of the bridge, the host end and the pod's interface."""

    __slots__ = ("bridge_mac", "host_mac", "container_mac")


class Wiring:
    """Kernel state for one pod interface, over raw netlink.

    `agent_socket`: the node agent's CNI socket; None: do everything in-process.
    """

    def __init__(self, agent_socket=None):
        self.agent_socket = agent_socket

    def _ensure_bridge(self, sock: nl.Netlink, name: str, mtu: int) -> nl.Link:
        link = sock.get_link(name)
        if link is None:
            err, _ = sock.batch([nl.new_bridge(name, mtu, random_mac())])[0]
            _raise_if(err, f"cannot create bridge {name}", ok=(nl.EEXIST,))  # a parallel ADD made it
            link = sock.get_link(name)
            if link is None:
                raise CniError(E.KERNEL, f"bridge {name} vanished right after creation")
        if link.kind != "bridge":
            raise CniError(E.KERNEL, f"{name} exists and is a {link.kind or 'non-bridge'} device, not a bridge")
        return link

    def attach(self, *, bridge: str, addresses, mtu: int, hairpin: bool, host_veth: str, netns_fd: int,
               ifname: str, mac: bytes, routes) -> Attachment:
        """`addresses`: (pod address, prefix, gateway) per family, ints tagged for IPv6 (config.IPV6)."""
        enable_ip_forward()
        try:
            with self._name_lock(host_veth), nl.Netlink() as sock:
                return self._attach(sock, bridge, addresses, mtu, hairpin, host_veth, netns_fd, ifname, mac, routes)
        except OSError as exc:
            raise _kernel_error("netlink", exc) from None

    def _attach(self, sock, bridge, addresses, mtu, hairpin, host_veth, netns_fd, ifname, mac, routes):
        br = self._ensure_bridge(sock, bridge, mtu)
        ipv6 = any(is_ipv6(gateway) for _, _, gateway in addresses)
        if ipv6:
            enable_ipv6_on(bridge)
        head = [nl.new_address(br.index, gateway, prefix) for _, prefix, gateway in addresses]
        if not br.flags & nl.IFF_UP:
            head.append(nl.set_up(br.index))
        pair = [nl.new_veth(host_veth, ifname, mtu, br.index, mac, netns_fd)]
        if hairpin:
            pair.append(nl.set_hairpin(host_veth))
        pair.append(nl.get_link(host_veth))
        results = sock.batch(head + pair)
        for (_, prefix, gateway), (err, _) in zip(addresses, results):
            _raise_if(err, f"cannot add {addr_text(gateway)}/{prefix} to bridge {bridge}", ok=(nl.EEXIST,))
        if len(head) > len(addresses):
            _raise_if(results[len(addresses)][0], f"cannot set bridge {bridge} up")
        results = results[len(head):]
        if results[0][0] == nl.EEXIST:
            stale = sock.get_link(host_veth)
            if stale is not None and stale.kind != "veth":
                raise CniError(E.KERNEL, f"cannot create veth {host_veth}: a {stale.kind or 'non-veth'} device "
                               "holds that name", "errno 17")
            if stale is not None:
                # The host end of an earlier attachment of this container/ifname: one whose DEL
                # handed it to the agent (not deleted yet), or an ADD killed before it could
                # reserve/record. Its reservation is gone (or `allocate` would have refused), the
                # name is ours: replace it once.
                sock.delete_link(host_veth)
                results = sock.batch(pair)
        if results[0][0] == nl.EEXIST:
            raise CniError(E.KERNEL, f"cannot create veth pair: interface {ifname} already exists "
                           "in the container's network namespace", "errno 17")
        _raise_if(results[0][0], f"cannot create veth pair {host_veth}/{ifname}")
        try:
            if hairpin:
                _raise_if(results[1][0], f"cannot set hairpin mode on {host_veth}")
            err, links = results[-1]
            _raise_if(err, f"cannot read back {host_veth}")
            host = links[0]
            with _netlink_in(netns_fd, ifname if ipv6 else None) as inside:
                requests = [nl.set_up(host.peer_index)]
                requests += [nl.new_address(host.peer_index, ip, prefix) for ip, prefix, _ in addresses]
                requests += [nl.new_route(r.dst, r.prefix, r.gw, host.peer_index) for r in routes]
                replies = inside.batch(requests)
            _raise_if(replies[0][0], f"cannot set {ifname} up")
            for (ip, prefix, _), (err, _) in zip(addresses, replies[1:]):
                _raise_if(err, f"cannot add {addr_text(ip)}/{prefix} to {ifname}")
            for route, (err, _) in zip(routes, replies[1 + len(addresses):]):
                _raise_if(err, f"cannot add route {addr_text(route.dst)}/{route.prefix} via {addr_text(route.gw)} "
                               f"in the container")
            return Attachment(br.mac, host.mac, mac)
        except BaseException:
            sock.delete_link(host_veth)  # both ends go
            raise

    def _name_lock(self, host_veth: str):
        """Keeps a deletion the agent queued for this name off the veth being created under it."""
        if self.agent_socket is None:
            from contextlib import nullcontext

            return nullcontext()
        return NameLock(self.agent_socket + LOCK_SUFFIX, host_veth)

    def detach(self, host_veth: str) -> bool:
        """Delete the host veth (both ends go); True if deleted or handed to the agent."""
        if self.agent_socket is not None and ask_agent_to_delete(self.agent_socket, host_veth):
            return True
        try:
            with nl.Netlink() as sock:
                return sock.delete_link(host_veth)
        except OSError as exc:
            raise _kernel_error(f"cannot delete {host_veth}", exc) from None

    def ports(self, bridge: str, prefix: str) -> list:
        """Names of veths starting with prefix enslaved to bridge."""
        try:
            with nl.Netlink() as sock:
                links = sock.links()
        except OSError as exc:
            raise _kernel_error("cannot list links", exc) from None
        index = next((link.index for link in links if link.name == bridge), None)
        return [link.name for link in links
                if index and link.master == index and link.kind == "veth" and link.name.startswith(prefix)]

    def inspect(self, netns_fd: int, ifname: str, host_veth: str, bridge: str) -> dict:
        """Facts for CHECK: the pod link, its addresses and routes (both families), the host end, the bridge
        and its addresses."""
        try:
            # Three round trips, not six: the gets and one dump (last) per batch.
            with nl.Netlink() as sock:
                host, br, bridge_addresses = sock.batch([nl.get_link(host_veth), nl.get_link(bridge),
                                                         nl.dump_addresses(nl.AF_UNSPEC)])
                host, br = nl.found_link(host), nl.found_link(br)
                bridge_addresses = nl.dumped(bridge_addresses) if br else []
            with _netlink_in(netns_fd) as inside:
                link, addresses = inside.batch([nl.get_link(ifname), nl.dump_addresses(nl.AF_UNSPEC)])
                link = nl.found_link(link)
                addresses = nl.dumped(addresses) if link else []
                routes = inside.routes(nl.AF_UNSPEC) if link else []
        except OSError as exc:
            raise _kernel_error("cannot inspect the pod's interfaces", exc) from None
        return {
            "link": link, "host": host, "bridge": br,
            "bridge_addresses": [(a.ip, a.prefix) for a in bridge_addresses if a.index == br.index],
            "addresses": [(a.ip, a.prefix) for a in addresses if link and a.index == link.index],
            "routes": [(r.dst, r.prefix, r.gw) for r in routes
                       if link and r.oif == link.index and r.table == nl.RT_TABLE_MAIN],
        }
