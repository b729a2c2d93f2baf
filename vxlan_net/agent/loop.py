"""The node agent: hold a subnet lease, follow everyone else's, keep the kernel in step."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from concurrent import futures
from concurrent.futures import Future
from ipaddress import IPv4Address, IPv4Interface, IPv6Address, IPv6Interface
from pathlib import Path
from typing import Any, Optional

from cni.agent_socket import socket_path
from cni.config import DEFAULT_BRIDGE, DEFAULT_SUBNET_FILE
from cni.subnet_file import write as write_subnet_file

from vxlan_net.agent.cni_service import CniService
from vxlan_net.agent.decisions import (KEEP, REFUSE, SettledAddress, address_to_follow, next_resync_delay,
                                       own_record_action, respond_to)
from vxlan_net.agent.faults import Faults, RetriedStep, in_background, retry_in_background
from vxlan_net.agent.health import AgentMetrics, HealthServer, Readiness
from vxlan_net.agent.lease_keeper import SubnetLeaseKeeper
from vxlan_net.agent.memory import release_free_memory, use_one_malloc_arena
from vxlan_net.agent.reconciler import Reconciler
from vxlan_net.core.backoff import Backoff
from vxlan_net.core.config import NetworkConfig, parse_config
from vxlan_net.core.direct import DirectReach
from vxlan_net.core.families import VXLAN_OVERHEAD_BY_UNDERLAY, IPAddress
from vxlan_net.core.errors import (InvalidConfig, KernelError, LeaseGone, LinkNotFound, StoreConfigError,
                                   StoreUnavailable, SubnetsExhausted, SubnetTaken, VxlanNetError, WatchCompacted)
from vxlan_net.core.lease import Lease
from vxlan_net.core.lease_book import LeaseBook, ParsedListing, RecordEvent
from vxlan_net.core.names import ENDPOINT_LABEL, vtep_name
from vxlan_net.core.underlay import families_read, node_underlay
from vxlan_net.core.untrusted import shown
from vxlan_net.doors import firewall
from vxlan_net.doors import kernel
from vxlan_net.doors.state import NodeState, remembered_subnet
from vxlan_net.doors.store import EtcdStore

log = logging.getLogger(__name__)

LOOP_TICK = 0.5  # longest wait between checks of the stop flag
UNDERLAY_SETTLE = 0.2
"""Seconds a full pass waits after the node's routes or addresses change: a link coming up adds its
address and routes in a burst, and one pass after the burst sees them all."""
_EXPLICIT_FLAG = {4: "--public-ip", 6: "--public-ipv6"}  # the option that pins each family's endpoint


@dataclasses.dataclass(frozen=True)
class AgentOptions:
    """Everything `vxlan-net agent` is told on its command line."""

    etcd_endpoints: tuple[str, ...]
    """etcd client URLs; the agent fails over between them."""
    etcd_prefix: str = "/vxlan-net"
    """Key prefix holding `config` and `subnets/`."""
    etcd_cafile: Optional[str] = None
    etcd_certfile: Optional[str] = None
    etcd_keyfile: Optional[str] = None
    etcd_username: Optional[str] = None
    """etcd user (with etcd auth on); its role needs readwrite on `<etcd_prefix>/` only."""
    etcd_password: Optional[str] = dataclasses.field(default=None, repr=False)
    iface: Optional[str] = None
    """Underlay interface; default: the one carrying --public-ip, else the default route's."""
    public_ip: Optional[IPv4Address] = None
    """Address other nodes send tunnel traffic to; default: the underlay interface's."""
    public_ipv6: Optional[IPv6Address] = None
    """IPv6 address other nodes send tunnel traffic to over an IPv6 underlay; default: the underlay
    interface's global IPv6 address, looked for when the network has IPv6 (or the node no IPv4 underlay)."""
    subnet_file: Path = Path(DEFAULT_SUBNET_FILE)
    state_dir: Path = Path("/var/lib/vxlan-net")
    ip_masq: bool = False
    """Masquerade traffic leaving the pod network to the node's address."""
    subnet_lease_ttl: int = 24 * 3600
    resync_interval: float = 30.0
    """Seconds between full reconciles against a fresh read of the kernel."""
    vxlan_ingress_filter: bool = True
    """Accept VXLAN frames only from the public IPs of current leases (nftables)."""
    healthz_addr: Optional[tuple[str, int]] = None
    """Where to serve /healthz, /readyz and /metrics; None: not served."""
    cni_socket: Optional[Path] = None
    """Root-only socket where the CNI plugin hands over host veth deletions; None: `cni.sock` next to
    subnet_file, where the plugin looks for it."""
    cni_bridge: str = DEFAULT_BRIDGE
    """The bridge the CNI plugin attaches pods to (its conflist's `bridge`); forwarding rules match it."""

    def __post_init__(self):
        if self.cni_socket is None:
            object.__setattr__(self, "cni_socket", Path(socket_path(str(self.subnet_file))))


@dataclasses.dataclass
class Doors:
    """Everything the agent does to the world goes through these; unit tests pass fakes."""

    store: Any
    """etcd: doors.store.EtcdStore."""
    kernel: Any = kernel
    """netlink and /proc/sys: the doors.kernel module."""
    firewall: Any = firewall
    """nftables: the doors.firewall module."""

    @classmethod
    def real(cls, options: AgentOptions) -> "Doors":
        return cls(EtcdStore(list(options.etcd_endpoints), options.etcd_prefix, ca_cert=options.etcd_cafile,
                             cert_key=options.etcd_keyfile, cert_cert=options.etcd_certfile,
                             username=options.etcd_username, password=options.etcd_password))


class Agent:
    """Runs until `stop` is set; leaves kernel state and the lease in place on exit."""

    def __init__(self, options: AgentOptions, stop: threading.Event, doors: Optional[Doors] = None):
        use_one_malloc_arena()  # before the etcd client's threads start
        self.options = options
        self.stop = stop
        doors = doors or Doors.real(options)
        self.store, self.kernel, self.firewall = doors.store, doors.kernel, doors.firewall
        self.node_state = NodeState(options.state_dir)
        self.config: Optional[NetworkConfig] = None
        self.keeper: Optional[SubnetLeaseKeeper] = None
        self.book: Optional[LeaseBook] = None
        self.reconciler: Optional[Reconciler] = None
        self.underlay: Optional[tuple[str, Optional[IPv4Address], int]] = None
        """(interface, IPv4 public address or None on an IPv6-only underlay, MTU)."""
        self.public_ipv6: Optional[IPv6Address] = None
        """The IPv6 tunnel endpoint, when this node has a VTEP over an IPv6 underlay."""
        self.metrics = AgentMetrics()
        self.readiness = Readiness(options.resync_interval)
        self._filtered_peers: Optional[set[IPAddress]] = None  # the ingress sets' elements; None: unknown
        self._lease_expires_at = time.monotonic()
        self._etcd_addresses = self.store.endpoint_addresses()
        self._routes: list = []
        self._addresses: list = []
        # Per underlay family (4, 6): the address change being settled, and an explicit one gone missing.
        self._address_settle = {4: SettledAddress(), 6: SettledAddress()}
        self._explicit_ip_missing = {4: False, 6: False}
        self.metrics.lease_expiry.set_function(lambda: max(0.0, self._lease_expires_at - time.monotonic()))
        self.metrics.ready.set_function(lambda: 0.0 if self.readiness.problems() else 1.0)
        self.faults = Faults(self.readiness, self.metrics)
        self.health_server: Optional[HealthServer] = None
        self._health_step = RetriedStep("health-server", self._bind_health_port, self.faults,
                                        Backoff(base=1.0, cap=10.0))
        # What _adopt's steps apply: the lease, its VTEPs (one per underlay family) and the pod MTU.
        self._adoption: Optional[tuple[Lease, tuple[kernel.VtepSpec, ...], int]] = None
        self._vtep_step = RetriedStep("vtep", self._ensure_vtep, self.faults)
        self._firewall_step = RetriedStep("firewall", self._apply_firewall, self.faults)
        # Data plane first; nft last, as it may hang up to its timeout.
        self._adoption_steps = (
            self._vtep_step,
            RetriedStep("subnet-file", self._write_subnet_file, self.faults),
            RetriedStep("state-dir", lambda: self.node_state.remember_subnet(*self._adoption[0].subnets), self.faults),
            self._firewall_step,
        )

    # -- start-up ------------------------------------------------------------------

    def run(self) -> int:
        service = binder = None
        done = threading.Event()
        if self.options.healthz_addr is not None:  # a port in use is retried while the agent runs
            binder = retry_in_background(self._health_step, done, "healthz-bind")
        try:
            service = CniService(self.options.cni_socket).start()
            return self._run()
        finally:
            if service is not None:
                service.close()
            done.set()
            if binder is not None:
                binder.join(timeout=5.0)
            if self.health_server is not None:
                self.health_server.close()

    def _bind_health_port(self) -> None:
        host, port = self.options.healthz_addr
        try:
            server = HealthServer(self.options.healthz_addr, self.metrics, self.readiness)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None
        self.health_server = server.start()

    def _run(self) -> int:
        self.config = self._wait(self._load_config, "network config")
        if self.config is None:
            return 0
        ifname, public_ip, underlay_mtu = self._resolve_underlay()
        self.underlay = (ifname, public_ip, underlay_mtu)
        v6 = self.public_ipv6
        self.keeper = SubnetLeaseKeeper(self.store, self.config, public_ip,
                                        self.node_state.vtep_mac(4) if public_ip else None,
                                        self.options.subnet_lease_ttl, public_ipv6=v6,
                                        vtep_mac_v6=self.node_state.vtep_mac(6) if v6 else None)
        vteps = self._vtep_names()
        self.reconciler = Reconciler(next(iter(vteps.values())), self.kernel, underlay=ifname, vteps=vteps,
                                     pod_families=[space.version for space in self.config.spaces])
        lease = self._wait(self._acquire, "subnet lease")
        if lease is None:
            return 0
        self._adopt(lease)
        self._enable_ip_forwarding()
        self._follow_leases()
        log.info("stopping; kernel entries and the lease stay in place")
        self.store.close()
        return 0

    def _wait(self, attempt, what: str):
        """Call `attempt` until it returns a value, backing off on errors; None if stopped."""
        backoff, last_message = Backoff(base=0.5, cap=10.0), None
        while not self.stop.is_set():
            try:
                return attempt()
            except (StoreUnavailable, StoreConfigError, InvalidConfig, SubnetsExhausted, SubnetTaken,
                    LeaseGone, KernelError) as exc:
                if str(exc) != last_message:
                    log.warning("waiting for %s: %s", what, exc)
                    last_message = str(exc)
            self.stop.wait(backoff.next_delay())
        return None

    def _load_config(self) -> NetworkConfig:
        raw = self.store.get_config()
        if raw is None:
            raise InvalidConfig(f"no config at {self.options.etcd_prefix}/config yet (write it with `vxlan-net config set`)")
        return parse_config(raw)

    def _vtep_names(self) -> dict[int, str]:
        """{underlay family: VTEP name} of the VTEPs this node has (IPv4 first)."""
        families = [f for f, address in ((4, self.underlay[1]), (6, self.public_ipv6)) if address is not None]
        return {f: vtep_name(self.config.vni, f) for f in families}

    def _resolve_underlay(self) -> tuple[str, Optional[IPv4Address], int]:
        """The underlay interface, its IPv4 public address (None: no IPv4 underlay) and MTU; sets
        self.public_ipv6 when the node gets a VTEP over IPv6. KernelError when neither family has one.

        An IPv6 endpoint is looked for only when the network has IPv6 or the node has no IPv4 underlay:
        a dual-stack underlay under an IPv4 network needs one VTEP, as before."""
        opts = self.options
        wants_v6 = self.config.ipv6 is not None or opts.public_ipv6 is not None
        public_ip: Optional[IPv4Address] = opts.public_ip
        if opts.iface:
            ifname = opts.iface
        elif opts.public_ip or opts.public_ipv6:
            ifname, _ = self.kernel.underlay_for(opts.public_ip or opts.public_ipv6)
        else:
            try:
                ifname, public_ip = self.kernel.default_route_source(family=4)
            except KernelError as exc:
                log.info("no IPv4 default route (%s); looking for an IPv6 underlay", exc)
                try:
                    ifname, _ = self.kernel.default_route_source(family=6)
                except KernelError as exc6:
                    raise KernelError(f"{exc}; {exc6}") from None
        if public_ip is None:
            public_ip = self._address_of(ifname, 4)
        public_ipv6 = opts.public_ipv6
        if public_ipv6 is None and (wants_v6 or public_ip is None):
            public_ipv6 = self._address_of(ifname, 6)
        if public_ip is None and public_ipv6 is None:
            raise KernelError(f"{ifname} has neither an IPv4 nor a global IPv6 address to tunnel from")
        self.public_ipv6 = public_ipv6
        mtu = int(self.kernel.link_info(ifname)["mtu"])
        log.info("underlay %s, public IP %s, public IPv6 %s, MTU %d", ifname, public_ip or "none",
                 public_ipv6 or "none", mtu)
        return ifname, public_ip, mtu

    def _address_of(self, ifname: str, family: int) -> Optional[IPAddress]:
        try:
            return self.kernel.interface_address(ifname, family=family)
        except KernelError as exc:
            log.info("no IPv%d underlay on %s: %s", family, ifname, exc)
            return None

    def _acquire(self) -> Lease:
        primary = self.config.primary.version
        held = self.keeper.lease
        remembered = (held.subnet if held else None) or self.node_state.last_subnet(primary) \
            or remembered_subnet(self.options.subnet_file, primary)
        remembered_v6 = (held.ipv6_subnet if held else None) or self.node_state.last_subnet(6) \
            or remembered_subnet(self.options.subnet_file, 6)
        # Read at every acquire: our subnet must not cover an address or connected route of the node,
        # nor an etcd endpoint (every other node would skip it, as it would capture their etcd).
        addresses, routes = self._node_addresses(), self._main_table_routes()
        underlay = node_underlay(self.config, addresses, routes, self._etcd_addresses).networks()
        return self.keeper.acquire(remembered, underlay, remembered_v6)

    def _families_read(self) -> tuple[int, ...]:
        return families_read(self.config, self.public_ipv6 is not None)

    def _node_addresses(self) -> list:
        return [a for f in self._families_read() for a in self.kernel.node_addresses(family=f)]

    def _main_table_routes(self) -> list:
        return [r for f in self._families_read() for r in self.kernel.main_table_routes(family=f)]

    def _adopt(self, lease: Lease) -> None:
        """Make the node match its lease: VTEP, subnet file, state dir, firewall.

        Each is a step of its own, retried with back-off until it succeeds (_retry_steps), so a
        failing `nft` or a read-only subnet directory never keeps the overlay from being programmed.
        """
        config, (ifname, _, underlay_mtu) = self.config, self.underlay
        v4, v6 = lease.subnet_of(4), lease.subnet_of(6)
        specs = []
        for family in sorted(lease.underlays):
            local_ip, mac = lease.endpoint(family)
            specs.append(kernel.VtepSpec(
                name=vtep_name(config.vni, family), vni=config.vni, port=config.port, local_ip=local_ip,
                underlay_ifname=ifname, mac=mac, mtu=config.mtu or underlay_mtu - VXLAN_OVERHEAD_BY_UNDERLAY[family],
                address=IPv4Interface((v4.network_address, 32)) if v4 else None,
                ipv6_address=IPv6Interface((v6.network_address, 128)) if v6 else None,
            ))
        mtu = min(spec.mtu for spec in specs)  # a pod's packets may take either VTEP
        self._adoption = (lease, tuple(specs), mtu)
        self.readiness.lease_held = True
        self._lease_expires_at = time.monotonic() + self.keeper.ttl
        if self.book is not None:
            self._note_skipped(self.book.set_own(lease))
        log.info("node subnet %s on %s (MTU %d, VTEP MAC %s)", lease.label,
                 " and ".join(spec.name for spec in specs), mtu, " and ".join(spec.mac for spec in specs))
        for step in self._adoption_steps:
            step.request()
            step.run_if_due()

    def _ensure_vtep(self) -> None:
        for spec in self._adoption[1]:
            self.kernel.ensure_vtep(spec)
            try:
                self.kernel.drop_unicast_in_l2_multicast(spec.name)
            except KernelError as exc:
                log.warning("%s accepts unicast packets in L2 multicast frames: %s", spec.name, exc)

    def _write_subnet_file(self) -> None:
        lease, _, mtu = self._adoption
        v4, v6 = lease.subnet_of(4), lease.subnet_of(6)
        write_subnet_file(self.options.subnet_file, _text(self.config.ipv4_network), _text(v4), mtu,
                          self.options.ip_masq, ipv6_network=_text(self.config.ipv6_network), ipv6_subnet=_text(v6))
        self.readiness.subnet_file_written = True

    def _apply_firewall(self) -> None:
        """Our nft tables, with the peers known now allowed (the next reconcile trims the sets)."""
        filtered = self.options.vxlan_ingress_filter
        self.firewall.apply_rules(self.config.ipv4_network, self.options.ip_masq, self.config.port,
                                  self._forward_devices(), self.reconciler.peer_public_ips() if filtered else (),
                                  ingress_filter=filtered, ipv6_network=self.config.ipv6_network,
                                  ipv6_underlay=self.public_ipv6 is not None)
        self._filtered_peers = None

    def _retry_steps(self) -> None:
        """Retry the adoption steps that failed, when their back-off allows."""
        vtep_was_missing = self._vtep_step.pending
        for step in self._adoption_steps:
            step.run_if_due()
        if vtep_was_missing and not self._vtep_step.pending:
            self._reconcile()  # the routes need the device: do not wait for the next resync

    # -- steady state --------------------------------------------------------------

    def _follow_leases(self) -> None:
        """The data-plane loop: watch batches, periodic resync, failed steps retried; never a hot loop.

        Its etcd requests (listing, opening the watch, renewing the lease) run in background threads
        and are picked up here once finished: a request hanging until its deadline (5 s per endpoint
        while etcd drops packets) must not delay the resync that restores hand-deleted entries.
        """
        self.book = LeaseBook(self.config)
        self.book.set_own(self.keeper.lease)
        self.book.set_protected(self._protected_addresses(read_routes=True))
        watch, watches_opened = None, 0
        listing: Optional[Future] = None  # the (snapshot, watch) being fetched
        renewal: Optional[tuple[int, Future]] = None  # (lease id, its TTL) being renewed
        relist_backoff = Backoff(base=0.5, cap=10.0)
        renew_backoff = Backoff(base=1.0, cap=10.0)
        now = time.monotonic()
        next_relist = now
        next_resync = now + self.options.resync_interval
        next_renew = now + self.keeper.renew_interval
        route_events = self._watch_underlay()
        while not self.stop.is_set():
            now = time.monotonic()
            underlay_news = route_events is not None and self._underlay_changed(route_events)
            if underlay_news and self.config.direct_routing:
                next_resync = min(next_resync, now + UNDERLAY_SETTLE)
            if underlay_news or now >= next_resync or now >= self._address_check_at(float("inf")):
                self._follow_own_addresses(now)
            if watch is None and listing is None and now >= next_relist:
                listing = in_background(self._open_lease_feed, "etcd-list")
            if listing is not None and listing.done():
                try:
                    snapshot, watch = listing.result()
                except (StoreUnavailable, StoreConfigError, WatchCompacted) as exc:
                    self.metrics.etcd_reachable.set(0 if isinstance(exc, StoreUnavailable) else 1)
                    delay = relist_backoff.next_delay()
                    self._log_store_trouble(relist_backoff, f"cannot follow leases ({exc}); retrying in {delay:.1f}s")
                    next_relist = now + delay
                else:
                    self.metrics.etcd_reachable.set(1)
                    self._relist(snapshot)
                    del snapshot  # not kept until the next listing: every record's raw value
                    if watches_opened:
                        self.metrics.watch_restarts.inc()
                    watches_opened += 1
                    relist_backoff.reset()
                listing = None
            if now >= next_resync:
                self._reconcile()
                failures = self.reconciler.failures_in_a_row
                next_resync = now + next_resync_delay(self.options.resync_interval, failures)
            self._retry_steps()
            if renewal is None and now >= next_renew:
                renewal = (self.keeper.lease_id, in_background(self.keeper.renew, "etcd-renew"))
            if renewal is not None and renewal[1].done():
                lease_id, outcome = renewal
                renewal = None
                # A renewal of a lease replaced meanwhile (re-acquired) says nothing about the new one.
                next_renew = now + (self._renewed(outcome, renew_backoff) if lease_id == self.keeper.lease_id
                                    else self.keeper.renew_interval)
            waits = [LOOP_TICK, next_resync - now, self._address_check_at(now + LOOP_TICK) - now]
            if renewal is None:
                waits.append(next_renew - now)
            if watch is None and listing is None:
                waits.append(next_relist - now)
            timeout = max(0.0, min(waits))
            if watch is None:
                in_flight = [f for f in (listing, renewal[1] if renewal else None) if f is not None]
                if in_flight:  # pick a listing up the moment it is there: a join must not wait a tick
                    futures.wait(in_flight, timeout=timeout, return_when=futures.FIRST_COMPLETED)
                else:
                    self.stop.wait(timeout)
                del in_flight  # else, once watching, it would keep the listing's future (every record) for good
                continue
            try:
                batch = watch.next_batch(timeout)
            except (StoreUnavailable, WatchCompacted) as exc:  # WatchLost is a StoreUnavailable
                self.metrics.etcd_reachable.set(0 if isinstance(exc, StoreUnavailable) else 1)
                log.warning("lease watch ended (%s); listing again", exc)
                watch = None
                next_relist = time.monotonic() + relist_backoff.next_delay()
                continue
            except StopIteration:
                watch = None
                continue
            if batch:
                self._take([RecordEvent(e.key_name, e.value, e.create_revision) for e in batch])
        if route_events is not None:
            route_events.close()
        if watch is not None:
            watch.cancel()
        if listing is not None and listing.done() and listing.exception() is None:
            listing.result()[1].cancel()

    def _watch_underlay(self):
        """A subscription to the node's route and address changes: our own address may change (issue 13),
        and with direct routing a peer's mode depends on them (a link flap must not wait for the next
        resync); None when the subscription fails (then the periodic resync still checks both)."""
        try:
            return self.kernel.RouteEvents(ipv6=self.config.ipv6 is not None or self.public_ipv6 is not None)
        except KernelError as exc:
            log.warning("cannot watch this node's addresses and routes (%s); following them at each resync only",
                        exc)
            return None

    def _public_address(self, family: int) -> Optional[IPAddress]:
        """Our tunnel endpoint over that underlay family; None: no VTEP over it."""
        return self.underlay[1] if family == 4 else self.public_ipv6

    def _address_check_at(self, default: float) -> float:
        """When a settling address change is due to be looked at again (`default`: none is settling)."""
        return min((t for t in (a.check_at() for a in self._address_settle.values()) if t is not None),
                   default=default)

    def _follow_own_addresses(self, now: float) -> None:
        for family in (4, 6):
            held = self._public_address(family)
            if held is not None:
                self._follow_own_address(family, held, now)

    def _follow_own_address(self, family: int, held: IPAddress, now: float) -> None:
        """Move to a new underlay address of `family` once it has settled (decisions.SettledAddress)."""
        ifname = self.underlay[0]
        explicit = (self.options.public_ip if family == 4 else self.options.public_ipv6) is not None
        try:
            present = {a.interface.ip for a in self.kernel.node_addresses(family=family)
                       if explicit or a.device == ifname}
            primary = None if explicit or not present else self.kernel.interface_address(ifname, family=family)
        except VxlanNetError as exc:
            log.debug("cannot read the IPv%d addresses of %s: %s", family, ifname, exc)
            return
        if explicit:
            label, flag = ENDPOINT_LABEL[family], _EXPLICIT_FLAG[family]
            missing = held not in present
            if missing and not self._explicit_ip_missing[family]:
                log.warning("%s %s (%s) is no longer on this node; keeping it as it is", label, held, flag)
            elif self._explicit_ip_missing[family] and not missing:
                log.info("%s %s (%s) is on this node again", label, held, flag)
            self._explicit_ip_missing[family] = missing
        new = self._address_settle[family].observe(held, address_to_follow(held, explicit, present, primary), now)
        if new is not None:
            self._renumber(new)

    def _renumber(self, new: IPAddress) -> None:
        """Our underlay address of new's family changed: VTEP `local`, firewall, our lease record (in place)
        follow it."""
        ifname, _, mtu = self.underlay
        old = self._public_address(new.version)
        log.warning("underlay address of %s changed: %s %s -> %s; moving the VTEP and our lease record",
                    ifname, ENDPOINT_LABEL[new.version], old, new)
        if new.version == 4:
            self.underlay = (ifname, new, mtu)
        else:
            self.public_ipv6 = new
        # Our etcd connections (and the watch) over this family are bound to the old source address, gone
        # now: they would only time out. Closed, the next request connects afresh and the watch is listed
        # again. Connections over the other family are kept (unless the endpoints' addresses are unknown).
        etcd_families = {address.version for address in self._etcd_addresses}
        if not etcd_families or new.version in etcd_families:
            self.store.close()
        try:
            lease = self.keeper.move_to(new)
        except LeaseGone as exc:
            log.warning("our lease is gone (%s); acquiring again", exc)
            self._reacquire()
        except (StoreUnavailable, StoreConfigError) as exc:
            log.warning("cannot rewrite our lease record yet (%s); restoring it at the next listing", exc)
            self._adopt(self.keeper.lease)
        else:
            self._adopt(lease)  # the book's identity, the VTEP (same MAC) and the firewall follow
        self._reconcile(full=True)

    @staticmethod
    def _underlay_changed(route_events) -> bool:
        try:
            return route_events.changed()
        except KernelError as exc:
            log.warning("reading this node's route changes failed (%s); re-deciding every peer", exc)
            return True

    def _open_lease_feed(self):
        """List the leases, then watch from just after the listing (runs in a background thread)."""
        snapshot = self.store.list_leases()
        return snapshot, self.store.watch_leases(snapshot.revision + 1)

    def _relist(self, snapshot) -> None:
        # The records the keeper parsed to choose our subnet (at start, at a re-acquire): not parsed again.
        self._take(snapshot.events(), replace=True, parsed=self.keeper.take_parsed_listing())

    def _take(self, events, replace: bool = False, parsed: Optional[ParsedListing] = None) -> None:
        """Fold a listing (with the records `parsed` already) or a batch of events into the book, then
        reconcile if peers moved."""
        change = self.book.replace(events, parsed) if replace else self.book.apply(events)
        # Dropped before the full pass below, whose malloc_trim must find them freed: kept through it, the
        # parsed listing's 5,000 entries held on to 1.5 MiB of heap for good.
        del events, parsed
        self._note_skipped(change)
        self.metrics.leases_known.set(len(self.book))
        response = respond_to(change, listing=replace)
        if response.reacquire:
            log.warning("our lease record for %s was deleted; acquiring again (same subnet if possible)",
                        self.keeper.lease.subnet)
            self._reacquire()
        elif response.check_own_record:
            self._restore_own_record()
        if response.full_pass:
            self._reconcile(full=True)
        elif response.targeted_pass:
            self.reconciler.update_peers(change.added + change.updated, [l.subnet for l in change.removed])
            self._reconcile(full=False)

    def _protected_addresses(self, read_routes: bool = False) -> dict[IPv4Address, str]:
        """What a peer subnet must never capture: our addresses, our gateways, the etcd endpoints.

        Addresses are read on every full pass; gateways (a main-table dump) only when asked."""
        try:
            if read_routes:
                self._routes = self._main_table_routes()
            self._addresses = self._node_addresses()
        except VxlanNetError as exc:
            log.warning("cannot read this node's addresses (%s); keeping the previous ones", exc)
        return node_underlay(self.config, self._addresses, self._routes, self._etcd_addresses).protected()

    def _note_skipped(self, change) -> None:
        for key_name, reason in change.rejected:
            log.warning("skipping lease record %s: %s", shown(key_name), reason)
        self.metrics.invalid_leases.inc(len(change.rejected))

    def _restore_own_record(self) -> None:
        """Someone else rewrote our record (other MAC, PublicIP or garbage): write ours back.

        Only our etcd lease expiring or being revoked gives up the subnet (then: acquire again).
        """
        held = self.keeper.lease
        action, reason = own_record_action(held, self.book.lease_for(held.subnet), self.config)
        if action == KEEP:
            return
        if action == REFUSE:
            log.error("our own lease record is invalid for this network (%s); not rewriting it", reason)
            return
        log.warning("our lease record for %s was overwritten by someone else; restoring it", held.subnet)
        try:
            self.keeper.restore()
        except LeaseGone as exc:
            log.warning("our lease is gone (%s); acquiring again", exc)
            self._reacquire()
        except (StoreUnavailable, StoreConfigError) as exc:
            log.warning("cannot restore our lease record yet (%s); will retry at the next listing", exc)

    def _reconcile(self, full: bool = True) -> None:
        """A full pass re-declares every peer and re-reads the kernel; else only what changed."""
        if full:
            direct = self.config is not None and self.config.direct_routing
            self._note_skipped(self.book.set_protected(self._protected_addresses(read_routes=direct)))
            # Every full pass re-decides each peer's mode from the routes just read.
            self.reconciler.set_reach(DirectReach.from_routes(self._routes, self.reconciler.underlay)
                                      if direct else None)
            self.reconciler.set_peers(self.book.peers())
            self.reconciler.request_full_pass()
        result = self._timed_reconcile()
        if isinstance(result.error, LinkNotFound):
            if not self._vtep_step.pending:  # else: already known, and retried with back-off
                log.warning("%s is gone; recreating it with the same MAC", self.reconciler.ifname)
                self._vtep_step.request()
            if not self._vtep_step.run_if_due():
                return
            self._timed_reconcile()
        # After the routes: the filter update forks `nft`, which must not delay convergence.
        self._filter_vxlan_sources(full)
        if full:
            self._recheck_forward_rules()
            release_free_memory()  # a full pass follows every listing, whose peak the C heap would keep

    def _timed_reconcile(self):
        result = self.reconciler.reconcile()
        self.metrics.reconcile_duration.observe(result.duration)
        self.readiness.last_reconcile_ok = result.ok
        self.readiness.last_reconcile_at = time.monotonic()
        if result.ok:
            self.metrics.peers_programmed.set(self.reconciler.peers_programmed)
            self.faults.cleared("netlink")
        else:
            self.metrics.reconcile_errors.inc()
            self.faults.failed("netlink", result.error, logged=True)  # the reconciler warned once
        return result

    def _filter_vxlan_sources(self, full: bool) -> None:
        """Keep the nftables set of allowed VXLAN sources equal to the peers' public IPs.

        After a targeted pass only the public IPs it touched are added or deleted (one small `nft`
        run, whatever the number of peers); after a full pass, or when the set's content is unknown,
        the whole set is rewritten in one transaction if it differs."""
        touched = self.reconciler.take_touched_public_ips()
        if not self.options.vxlan_ingress_filter:
            return
        if self._firewall_step.pending:  # its retry installs the current peers with the table
            return
        filtered = self._filtered_peers
        try:
            if full or filtered is None:
                sources = self.reconciler.peer_public_ips()
                if sources != filtered:
                    self.firewall.update_peers(sources, ipv6=self.config.ipv6 is not None or self.public_ipv6 is not None)
                    self._filtered_peers = set(sources)
                return
            allowed = {ip for ip in touched if self.reconciler.has_public_ip(ip)}
            added, removed = allowed - filtered, (touched - allowed) & filtered
            if added or removed:
                self._filtered_peers = None  # until nft confirms: a failed run leaves it unknown
                self.firewall.change_peers(added, removed)
                filtered -= removed
                filtered |= added
                self._filtered_peers = filtered
        except VxlanNetError as exc:
            self._firewall_step.failed(exc)

    def _forward_devices(self) -> firewall.ForwardDevices:
        vteps = self._vtep_names()
        first, vtep6 = next(iter(vteps.values())), vteps.get(6) if len(vteps) > 1 else None
        direct = self.config.direct_routing
        return firewall.ForwardDevices(self.options.cni_bridge, first, self.underlay[0] if direct else None,
                                       self.config.ipv4_network if direct else None, vtep6=vtep6,
                                       pod_network6=self.config.ipv6_network)

    def _recheck_forward_rules(self) -> None:
        """Someone (a firewall reload, an operator) may have removed or edited our FORWARD rules."""
        try:
            if self.firewall.ensure_forward_rules(self._forward_devices()):
                log.warning("restored the vxlan-net rules in iptables-nft's FORWARD chain (missing or changed)")
        except VxlanNetError as exc:
            log.warning("cannot check the vxlan-net rules in iptables-nft's FORWARD chain, will retry: %s", exc)

    def _renewed(self, outcome: Future, backoff: Backoff) -> float:
        """Take a finished renewal (keeper.renew()); returns seconds until the next renewal attempt."""
        try:
            ttl = outcome.result()
            self.metrics.etcd_reachable.set(1)
            self._lease_expires_at = time.monotonic() + (ttl if ttl else self.keeper.ttl)
            backoff.reset()
            return self.keeper.renew_interval
        except LeaseGone as exc:
            self.metrics.etcd_reachable.set(1)
            log.warning("lease expired or revoked (%s); acquiring again", exc)
            self._reacquire()
            self._reconcile(full=True)
            return self.keeper.renew_interval
        except (StoreUnavailable, StoreConfigError) as exc:
            self.metrics.etcd_reachable.set(0 if isinstance(exc, StoreUnavailable) else 1)
            delay = min(backoff.next_delay(), self.keeper.renew_interval)
            self._log_store_trouble(backoff, f"cannot renew lease ({exc}); retrying in {delay:.1f}s")
            return delay

    def _reacquire(self) -> None:
        previous = self.keeper.lease
        lease = self._wait(self._acquire, "subnet lease")
        self.keeper.take_parsed_listing()  # the book holds every record already; no listing follows to take it
        if lease is None:
            return
        if lease.subnet != previous.subnet:
            log.warning("node subnet changed from %s to %s: pods on the old subnet need new addresses",
                        previous.subnet, lease.subnet)
        self._adopt(lease)

    def _enable_ip_forwarding(self) -> None:
        # IPv6 forwarding only with IPv6 pods: it makes the node ignore router advertisements.
        ipv6 = self.config.ipv6 is not None
        try:
            self.kernel.enable_ip_forwarding(ipv6=ipv6)
        except KernelError as exc:
            log.warning("cannot enable IP forwarding: %s", exc)

    @staticmethod
    def _log_store_trouble(backoff: Backoff, message: str) -> None:
        """Warn on the first failure in a row only, so an outage does not flood the log."""
        (log.warning if backoff.failures <= 1 else log.debug)(message)


def _text(value: Any) -> Optional[str]:
    """str(value), None kept: the subnet file's writer takes CIDR strings, None for an absent family."""
    return None if value is None else str(value)
