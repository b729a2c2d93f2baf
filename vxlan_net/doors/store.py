"""The etcd door: the only importer of etcd3; every gRPC failure leaves here as a domain error.

Retries live here only for single requests (a few quick tries across endpoints); long back-off
is the caller's business.
"""

from __future__ import annotations

import ast
import ipaddress
import collections
import dataclasses
import importlib.util
import io
import logging
import os
import queue
import re
import socket
import ssl
import sys
import threading
import time
import tokenize
import types
import urllib.parse
from typing import Any, Callable, Iterable, Iterator, Literal, Optional, Sequence, TypeVar

from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from vxlan_net.core.errors import LeaseGone, StoreConfigError, StoreUnavailable, SubnetTaken, WatchCompacted, WatchLost
from vxlan_net.core.families import IPAddress, IPNetwork
from vxlan_net.core.lease import SubnetKey, subnet_key_name
from vxlan_net.core.lease_book import RecordEvent

log = logging.getLogger(__name__)

_PB2_MODULES = ("kv", "auth", "rpc")  # dependency order: rpc.proto imports kv.proto and auth.proto


def _serialized_descriptor(path: str) -> bytes:
    """The FileDescriptorProto bytes that an old protoc wrote as `serialized_pb=_b('...')`."""
    with open(path, encoding="utf-8") as f:
        source = f.read()
    start = source.index("serialized_pb=")
    for token in tokenize.generate_tokens(io.StringIO(source[start:]).readline):
        if token.type == tokenize.STRING:
            literal = ast.literal_eval(token.string)
            return literal.encode("latin-1") if isinstance(literal, str) else literal
    raise ValueError(f"no serialized descriptor in {path}")


def _install_etcd3_protos() -> None:
    """Build etcd3's message classes from its descriptors with today's protobuf runtime.

    etcd3 0.12 ships protoc-3.x modules that protobuf >= 4 refuses to import. The usual fix,
    PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python, only works if nothing imported protobuf
    earlier, and parses messages in pure Python (about 4x slower to list 5,000 leases). Instead we
    register the same serialized descriptors in a private pool and let protobuf's builder make the
    classes, keeping the fast upb backend; the modules are placed in sys.modules before etcd3 is
    imported, so etcd3 and its gRPC stubs use them unchanged.
    """
    if "etcd3.etcdrpc.rpc_pb2" in sys.modules:
        return
    from google.protobuf import descriptor_pool
    from google.protobuf.internal import builder

    spec = importlib.util.find_spec("etcd3")
    if spec is None or not spec.submodule_search_locations:
        return  # let `import etcd3` below raise its own ImportError
    directory = os.path.join(list(spec.submodule_search_locations)[0], "etcdrpc")
    pool = descriptor_pool.DescriptorPool()
    for name in _PB2_MODULES:
        path = os.path.join(directory, f"{name}_pb2.py")
        module_name = f"etcd3.etcdrpc.{name}_pb2"
        module = types.ModuleType(module_name)
        module.__file__ = path
        namespace = module.__dict__
        namespace["DESCRIPTOR"] = pool.AddSerializedFile(_serialized_descriptor(path))
        builder.BuildMessageAndEnumDescriptors(namespace["DESCRIPTOR"], namespace)
        builder.BuildTopDescriptorsAndMessages(namespace["DESCRIPTOR"], module_name, namespace)
        sys.modules[module_name] = module


def _import_etcd3() -> None:
    try:
        _install_etcd3_protos()
    except (OSError, ValueError, TypeError, ImportError) as exc:  # an etcd3 release with other generated code
        if "google.protobuf" not in sys.modules:
            log.warning("cannot rebuild etcd3's protobuf modules (%s); using pure-Python protobuf", exc)
            os.environ.setdefault("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "python")


_import_etcd3()
os.environ.setdefault("GRPC_VERBOSITY", "NONE")  # gRPC's own lines repeat what our errors already say, on every retry

import etcd3  # noqa: E402  (after the protobuf modules are in place)
import etcd3.etcdrpc as rpc  # noqa: E402
import grpc  # noqa: E402

DEFAULT_PREFIX = "/vxlan-net"
DEFAULT_PORT = 2379
DEFAULT_TIMEOUT = 5.0
LIST_PAGE_SIZE = 10_000
TTL_WINDOW = 256
"""LeaseTimeToLive requests in flight at once (lease_ttls)."""

# Reconnect quickly after an etcd restart (gRPC's default back-off grows to 2 minutes), and let
# keepalive pings kill a stream whose peer vanished silently (etcd accepts pings every 5 s).
_GRPC_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 0),  # etcd answers pings on an idle connection with GOAWAY
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", 64 << 20),
    # gRPC shares connections between channels to the same target by default: a client made after close()
    # (the node renumbered, issue 13) could pick up the old connection, bound to a source address gone now,
    # while its teardown is still under way. A channel of its own always connects afresh.
    ("grpc.use_local_subchannel_pool", 1),
]
_RETRYABLE_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
_CREDENTIAL_CODES = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
# etcd drops simple tokens after --auth-token-ttl of idleness, on restart and when auth settings change.
_STALE_TOKEN_MARKERS = ("invalid auth token", "revision of auth store is old")
# A certificate that does not verify is a setting to fix; a handshake cut short (etcd restarting) is not.
_TLS_CONFIG_MARKERS = ("certificate", "ssl_error_ssl")
_VERIFY_FAILED = re.compile(r"CERTIFICATE_VERIFY_FAILED:([^:]+)")
# What gRPC says when the server's TLS alert (bad or missing client certificate) ends the connection.
_PEER_REJECTED_MARKERS = ("TSI_DATA_CORRUPTED", "ALERT_BAD_CERTIFICATE", "ALERT_CERTIFICATE_REQUIRED",
                          "ALERT_CERTIFICATE_EXPIRED", "ALERT_UNKNOWN_CA")

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """One etcd client URL, split the way gRPC wants it."""

    url: str
    target: str
    """`host:port` (IPv6 hosts in brackets) for the gRPC channel."""
    tls: bool


@dataclasses.dataclass(frozen=True)
class StoreStatus:
    """What the answering etcd member says about itself."""

    endpoint: str
    version: str
    revision: int
    leader: int
    member_id: int
    db_size: int


@dataclasses.dataclass(frozen=True)
class LeaseRecord:
    """One raw `<prefix>/subnets/<key_name>` entry; the value is untrusted (see lease.parse_lease)."""

    key_name: str
    value: bytes
    lease_id: Optional[int]
    """The etcd lease holding the key; None for a key without lease."""
    ttl_remaining: Optional[int]
    """Seconds left on the lease; None unless listed with `with_ttl=True` (or no lease)."""
    mod_revision: int
    create_revision: int = 0
    """When the key was created: the older record wins an identity conflict (see lease_book)."""


@dataclasses.dataclass(frozen=True)
class LeaseSnapshot:
    """Every subnet record as of one revision; watch from `revision + 1` to follow it."""

    revision: int
    records: dict[str, LeaseRecord]

    def events(self) -> list[RecordEvent]:
        """The listing as the lease book takes it (LeaseBook.replace)."""
        return [RecordEvent(name, r.value, r.create_revision) for name, r in self.records.items()]


@dataclasses.dataclass(frozen=True)
class LeaseEvent:
    """One change of a subnet record, as the watch saw it."""

    kind: Literal["put", "delete"]
    key_name: str
    value: Optional[bytes]
    """The new value for a put; None for a delete."""
    mod_revision: int
    create_revision: int = 0
    """The key's create revision (a put); 0 for a delete."""


def parse_endpoint(url: str) -> Endpoint:
    """`http://198.18.0.2:2379` -> Endpoint; a bare `host:port` means http."""
    text = url.strip()
    if "://" not in text:
        text = "http://" + text
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port or DEFAULT_PORT
    except ValueError as exc:
        raise StoreConfigError(f"etcd endpoint {url!r} is not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise StoreConfigError(f"etcd endpoint {url!r}: scheme must be http or https")
    if not parts.hostname or parts.path not in ("", "/") or parts.query or parts.username:
        raise StoreConfigError(f"etcd endpoint {url!r} must be <scheme>://<host>[:<port>]")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return Endpoint(url=f"{parts.scheme}://{host}:{port}", target=f"{host}:{port}", tls=parts.scheme == "https")


def prefix_range_end(prefix: bytes) -> bytes:
    """The smallest key above every key starting with `prefix` (etcd's range_end for a prefix)."""
    trimmed = prefix.rstrip(b"\xff")
    if not trimmed:
        return b"\x00"  # etcd: every key
    return trimmed[:-1] + bytes([trimmed[-1] + 1])


def _check_tls_file(role: str, path: Optional[str]) -> Optional[str]:
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError as exc:
        raise StoreConfigError(f"etcd TLS {role} {path!r} cannot be read: {exc.strerror}") from None
    if b"-----BEGIN " not in head:
        raise StoreConfigError(f"etcd TLS {role} {path!r} is not a PEM file")
    return path


class _Retryable(Exception):
    """Internal: this endpoint failed in a way the next try (maybe on another endpoint) may fix."""

    def __init__(self, error: StoreUnavailable) -> None:
        super().__init__(str(error))
        self.error = error


class EtcdStore:
    """vxlan-net's records in etcd: the network config and the subnet leases.

    Thread-safe: one store may serve a watching thread and a renewing thread at once.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        prefix: str = DEFAULT_PREFIX,
        ca_cert: Optional[str] = None,
        cert_key: Optional[str] = None,
        cert_cert: Optional[str] = None,
        timeout: float = DEFAULT_TIMEOUT,
        username: Optional[str] = None,
        password: Optional[str] = None,
    ) -> None:
        if isinstance(endpoints, str):
            endpoints = [endpoints]
        if not endpoints:
            raise StoreConfigError("no etcd endpoint given")
        self.endpoints = [parse_endpoint(url) for url in endpoints]
        if not prefix.startswith("/") or prefix.rstrip("/") == "":
            raise StoreConfigError(f"etcd prefix {prefix!r} must start with / and name a directory")
        self.prefix = prefix.rstrip("/")
        if timeout <= 0:
            raise StoreConfigError(f"etcd request timeout must be positive, not {timeout}")
        self.timeout = float(timeout)
        if (cert_key is None) != (cert_cert is None):
            raise StoreConfigError("etcd client TLS needs both cert_cert and cert_key, or neither")
        self._ca_cert = _check_tls_file("CA certificate", ca_cert)
        self._cert_key = _check_tls_file("client key", cert_key)
        self._cert_cert = _check_tls_file("client certificate", cert_cert)
        if bool(username) != (password is not None):
            raise StoreConfigError("etcd authentication needs both a user name and a password, or neither")
        self._username, self._password = username or None, password
        tls = [e.url for e in self.endpoints if e.tls]
        if tls and self._ca_cert is None:
            raise StoreConfigError(f"etcd endpoint {tls[0]} uses https but no CA certificate was given")
        if self._ca_cert is not None and len(tls) != len(self.endpoints):
            plain = next(e.url for e in self.endpoints if not e.tls)
            raise StoreConfigError(f"TLS files were given but etcd endpoint {plain} is plain http")
        self._lock = threading.Lock()
        self._clients: list[Optional[etcd3.Etcd3Client]] = [None] * len(self.endpoints)
        self._tokens: list[Optional[_AuthToken]] = [None] * len(self.endpoints)
        self._current = 0
        self._subnets_prefix = f"{self.prefix}/subnets/".encode()

    # -- keys ----------------------------------------------------------------------------

    @property
    def config_key(self) -> bytes:
        return f"{self.prefix}/config".encode()

    def subnet_key(self, subnet: "SubnetKey | IPNetwork") -> bytes:
        return self._subnets_prefix + subnet_key_name(subnet).encode()

    def _key_name(self, key: bytes) -> str:
        return key[len(self._subnets_prefix):].decode("utf-8", errors="replace")

    # -- config --------------------------------------------------------------------------

    def get_config(self) -> Optional[bytes]:
        """The raw `<prefix>/config` value, or None when nobody wrote one yet."""
        response = self._call("get config", lambda c: c.kvstub.Range(rpc.RangeRequest(key=self.config_key), self.timeout))
        return response.kvs[0].value if response.kvs else None

    def put_config(self, raw: str) -> None:
        self._call("put config", lambda c: c.kvstub.Put(rpc.PutRequest(key=self.config_key, value=raw.encode()), self.timeout))

    # -- leases --------------------------------------------------------------------------

    def list_leases(self, with_ttl: bool = False) -> LeaseSnapshot:
        """Every subnet record at one revision (paged, all pages pinned to the first page's revision).

        with_ttl asks etcd for each lease's remaining TTL (lease_ttls: one request per distinct lease).
        """
        end = prefix_range_end(self._subnets_prefix)
        start, revision = self._subnets_prefix, 0
        records: dict[str, LeaseRecord] = {}
        for _ in range(1_000_000 // LIST_PAGE_SIZE + 1):  # bounded: a million subnets is far beyond any cluster
            request = rpc.RangeRequest(key=start, range_end=end, limit=LIST_PAGE_SIZE, revision=revision)
            response = self._call("list leases", lambda c: c.kvstub.Range(request, self.timeout))
            revision = revision or response.header.revision
            for kv in response.kvs:
                name = self._key_name(kv.key)
                records[name] = LeaseRecord(name, kv.value, kv.lease or None, None, kv.mod_revision,
                                            kv.create_revision)
            if not response.more or not response.kvs:
                break
            start = response.kvs[-1].key + b"\x00"
        if with_ttl:
            ttls = self.lease_ttls(r.lease_id for r in records.values() if r.lease_id)
            records = {
                name: dataclasses.replace(r, ttl_remaining=ttls[r.lease_id]) if r.lease_id else r
                for name, r in records.items()
            }
        return LeaseSnapshot(revision, records)

    def create_lease(self, subnet: "SubnetKey | IPNetwork", value: str, ttl: int) -> int:
        """Claim `subnet`: grant an etcd lease of `ttl` seconds and create the key under it.

        Raises SubnetTaken when the key already exists (the granted lease is revoked again).
        """
        key = self.subnet_key(subnet)
        grant = self._call("grant lease", lambda c: c.leasestub.LeaseGrant(rpc.LeaseGrantRequest(TTL=ttl), self.timeout))
        if grant.error:
            raise StoreUnavailable(f"etcd refused a lease of {ttl}s: {grant.error}")
        lease_id = grant.ID
        request = rpc.TxnRequest(
            compare=[rpc.Compare(key=key, target=rpc.Compare.VERSION, result=rpc.Compare.EQUAL, version=0)],
            success=[rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value.encode(), lease=lease_id))],
            failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=key))],
        )
        try:
            response = self._call(f"create lease {subnet}", lambda c: c.kvstub.Txn(request, self.timeout))
        except BaseException:
            self._revoke_quietly(lease_id)
            raise
        if response.succeeded:
            return lease_id
        holders = [kv.lease for op in response.responses for kv in op.response_range.kvs]
        if holders == [lease_id]:
            return lease_id  # our own put, committed by a try whose answer was lost
        self._revoke_quietly(lease_id)
        raise SubnetTaken(f"subnet {subnet} is already leased in etcd")

    def restore_lease(self, subnet: "SubnetKey | IPNetwork", value: str, lease_id: int) -> None:
        """Write our record again under our lease, whoever overwrote or detached it.

        LeaseGone when our etcd lease itself expired or was revoked: only then is the subnet lost.
        """
        request = rpc.PutRequest(key=self.subnet_key(subnet), value=value.encode(), lease=lease_id)
        try:
            self._call(f"restore lease {subnet}", lambda c: c.kvstub.Put(request, self.timeout))
        except _LeaseNotFound:
            raise LeaseGone(f"lease {lease_id:x} for subnet {subnet} no longer exists") from None

    def update_lease(self, subnet: "SubnetKey | IPNetwork", value: str, lease_id: int) -> None:
        """Rewrite our own record (e.g. a new VTEP MAC); LeaseGone if the key is no longer ours."""
        key = self.subnet_key(subnet)
        request = rpc.TxnRequest(
            compare=[rpc.Compare(key=key, target=rpc.Compare.LEASE, result=rpc.Compare.EQUAL, lease=lease_id)],
            success=[rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value.encode(), lease=lease_id))],
        )
        try:
            response = self._call(f"update lease {subnet}", lambda c: c.kvstub.Txn(request, self.timeout))
        except _LeaseNotFound:
            raise LeaseGone(f"lease {lease_id:x} for subnet {subnet} no longer exists") from None
        if not response.succeeded:
            raise LeaseGone(f"subnet {subnet} is no longer held by lease {lease_id:x}")

    def refresh(self, lease_id: int) -> int:
        """Renew the lease once; returns its TTL in seconds. LeaseGone when etcd no longer knows it."""

        def keep_alive(client: etcd3.Etcd3Client) -> Any:
            requests = iter([rpc.LeaseKeepAliveRequest(ID=lease_id)])
            for response in client.leasestub.LeaseKeepAlive(requests, self.timeout):
                return response
            raise grpc.RpcError("no keepalive response")  # pragma: no cover - etcd always answers

        response = self._call(f"refresh lease {lease_id:x}", keep_alive)
        if response.TTL <= 0:
            raise LeaseGone(f"lease {lease_id:x} has expired or was revoked")
        return int(response.TTL)

    def revoke(self, lease_id: int) -> None:
        """Revoke the lease (its keys go with it); a lease already gone is fine."""
        try:
            self._call(f"revoke lease {lease_id:x}", lambda c: c.leasestub.LeaseRevoke(rpc.LeaseRevokeRequest(ID=lease_id), self.timeout))
        except _LeaseNotFound:
            pass

    def _revoke_quietly(self, lease_id: int) -> None:
        """Give back a lease we granted but could not use; if etcd is away, its TTL ends it."""
        try:
            self.revoke(lease_id)
        except (StoreUnavailable, StoreConfigError) as exc:
            log.warning("could not revoke unused lease %x (it expires on its own): %s", lease_id, exc)

    def delete_lease(self, subnet: "SubnetKey | IPNetwork") -> bool:
        """Delete the subnet's record whatever lease holds it; True if there was one."""
        request = rpc.DeleteRangeRequest(key=self.subnet_key(subnet))
        return self._call(f"delete lease {subnet}", lambda c: c.kvstub.DeleteRange(request, self.timeout)).deleted > 0

    def lease_ttl(self, lease_id: int) -> Optional[int]:
        """Seconds left on the lease, or None when it no longer exists."""
        return self.lease_ttls([lease_id])[lease_id]

    def lease_ttls(self, lease_ids: Iterable[int]) -> dict[int, Optional[int]]:
        """lease_ttl of each distinct lease, TTL_WINDOW requests in flight at a time on one connection: one
        after the other, `status` spent 3.5 s of its 3.8 s on them at 5,000 leases."""
        wanted = list(dict.fromkeys(lease_ids))

        def ask(client: etcd3.Etcd3Client) -> dict[int, Optional[int]]:
            found: dict[int, Optional[int]] = {}
            for start in range(0, len(wanted), TTL_WINDOW):
                window = wanted[start:start + TTL_WINDOW]
                pending = [client.leasestub.LeaseTimeToLive.future(rpc.LeaseTimeToLiveRequest(ID=lease_id),
                                                                    self.timeout) for lease_id in window]
                try:
                    for lease_id, future in zip(window, pending):
                        ttl = future.result().TTL
                        found[lease_id] = int(ttl) if ttl >= 0 else None
                finally:  # a failure: the rest of the window is not waited for (the retry asks again)
                    for future in pending:
                        future.cancel()
            return found

        if not wanted:
            return {}
        what = f"lease ttl {wanted[0]:x}" if len(wanted) == 1 else f"lease ttls of {len(wanted)} leases"
        return self._call(what, ask)

    # -- watch ---------------------------------------------------------------------------

    def watch_leases(self, start_revision: int) -> "LeaseWatch":
        """Follow the subnet records from `start_revision` (the snapshot's revision + 1).

        Returns once etcd confirmed the watch (StoreUnavailable if no endpoint could); iterate the
        result for batches of LeaseEvent, in a thread of its own if the caller has other work:

            snapshot = store.list_leases()
            watch = store.watch_leases(snapshot.revision + 1)
            try:
                for batch in watch:          # or watch.next_batch(timeout) -> batch or None
                    apply(batch)
            except WatchLost as lost:        # back off, then watch_leases(lost.last_revision + 1)
                ...
            except WatchCompacted:           # list_leases() again, diff, watch from its revision + 1
                ...
            finally:
                watch.cancel()
        """
        if start_revision < 1:
            raise ValueError(f"start_revision must be >= 1, not {start_revision}")

        def open_watch(client: etcd3.Etcd3Client) -> LeaseWatch:
            return LeaseWatch(self, client, start_revision)

        return self._call("watch leases", open_watch)

    # -- maintenance ---------------------------------------------------------------------

    def compact(self, revision: int, physical: bool = True) -> None:
        """Drop history before `revision` (tests; real clusters compact on their own)."""
        request = rpc.CompactionRequest(revision=revision, physical=physical)
        self._call(f"compact to {revision}", lambda c: c.kvstub.Compact(request, self.timeout))

    def endpoint_addresses(self) -> dict[IPAddress, str]:
        """The IPv4 and IPv6 addresses of each endpoint (host names resolved now, best effort) -> its URL."""
        addresses: dict[IPAddress, str] = {}
        for endpoint in self.endpoints:
            host = endpoint.target.rpartition(":")[0].strip("[]")
            try:
                infos = socket.getaddrinfo(host, None, socket.AF_UNSPEC, socket.SOCK_STREAM)
            except (OSError, UnicodeError) as exc:
                log.warning("cannot resolve etcd endpoint %s (%s)", endpoint.url, exc)
                continue
            for info in infos:
                if info[0] in (socket.AF_INET, socket.AF_INET6):
                    addresses.setdefault(ipaddress.ip_address(info[4][0].partition("%")[0]), endpoint.url)
        return addresses

    def status(self) -> StoreStatus:
        def status(client: etcd3.Etcd3Client) -> StoreStatus:
            response = client.maintenancestub.Status(rpc.StatusRequest(), self.timeout)
            return StoreStatus(
                endpoint=self._endpoint_of(client).url,
                version=response.version,
                revision=response.header.revision,
                leader=response.leader,
                member_id=response.header.member_id,
                db_size=response.dbSize,
            )

        return self._call("status", status)

    def is_reachable(self) -> bool:
        try:
            self.status()
        except (StoreUnavailable, StoreConfigError):
            return False
        return True

    def close(self) -> None:
        with self._lock:
            clients, self._clients = self._clients, [None] * len(self.endpoints)
            self._tokens = [None] * len(self.endpoints)
        for client in clients:
            if client is not None:
                client.close()

    def __enter__(self) -> "EtcdStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the door ------------------------------------------------------------------------

    def _client(self) -> tuple[int, etcd3.Etcd3Client]:
        with self._lock:
            index = self._current
            client = self._clients[index]
            if client is None:
                endpoint = self.endpoints[index]
                host, _, port = endpoint.target.rpartition(":")
                try:
                    client = etcd3.Etcd3Client(
                        host=host,
                        port=int(port),
                        ca_cert=self._ca_cert,
                        cert_key=self._cert_key,
                        cert_cert=self._cert_cert,
                        timeout=self.timeout,
                        grpc_options=_GRPC_OPTIONS,
                    )
                except (OSError, ValueError) as exc:  # TLS files read again here: moved, bad PEM
                    raise StoreConfigError(f"etcd {endpoint.url}: cannot set up the client: {exc}") from None
                if self._username is not None:
                    self._tokens[index] = _AuthToken.install(client)
                self._clients[index] = client
            return index, client

    def _authenticate(self, index: int) -> None:
        """Get an auth token from the endpoint if this client has none (user name and password set)."""
        token = self._tokens[index]
        if token is None or token.value is not None:
            return
        request = rpc.AuthenticateRequest(name=self._username, password=self._password)
        token.value = rpc.AuthStub(token.channel).Authenticate(request, self.timeout).token

    def _drop_token(self, index: int) -> None:
        token = self._tokens[index]
        if token is not None:
            token.value = None

    def _endpoint_of(self, client: etcd3.Etcd3Client) -> Endpoint:
        with self._lock:
            for endpoint, known in zip(self.endpoints, self._clients):
                if known is client:
                    return endpoint
        return self.endpoints[0]

    def _fail_over(self, index: int) -> None:
        with self._lock:
            if self._current == index:  # another thread may have moved on already
                self._current = (index + 1) % len(self.endpoints)

    def _call(self, what: str, request: Callable[[etcd3.Etcd3Client], T]) -> T:
        """Run one request, retrying briefly (next endpoint first) when the failure is transient."""
        retrying = Retrying(
            retry=retry_if_exception_type(_Retryable),
            stop=stop_after_attempt(len(self.endpoints) + 1),
            wait=wait_exponential(multiplier=0.1, max=1.0),
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    index, client = self._client()
                    try:
                        try:
                            self._authenticate(index)
                            return request(client)
                        except grpc.RpcError as exc:
                            raise translate_rpc_error(what, self.endpoints[index].url, exc, ca_cert=self._ca_cert,
                                                      client_cert=self._cert_cert, user=self._username) from None
                    except _TokenRejected:
                        self._drop_token(index)  # expired, or etcd restarted: log in again on the next try
                        raise
                    except _Retryable:
                        self._fail_over(index)
                        raise
        except _Retryable as exc:
            raise exc.error from None
        raise AssertionError("unreachable")  # pragma: no cover


class _LeaseNotFound(LeaseGone):
    """Internal: etcd answered NOT_FOUND for a lease id."""


class _TokenRejected(_Retryable):
    """Internal: etcd no longer accepts our auth token (it expired, etcd restarted, auth changed)."""


class _CallDetails(
    collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready",
                                            "compression")),
    grpc.ClientCallDetails,
):
    pass


class _AuthToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                 grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Sends etcd's auth token with every call of one client, watches and keepalives included.

    etcd3's own `user=`/`password=` log in once, in the constructor, and only its high-level methods
    send the token; the store calls the stubs directly and must log in again when a token expires.
    """

    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel
        """The plain channel: logging in must not send a stale token."""
        self.value: Optional[str] = None

    @classmethod
    def install(cls, client: etcd3.Etcd3Client) -> "_AuthToken":
        """Route the client's stubs through a token-adding channel; returns the token holder."""
        token = cls(client.channel)
        client.channel = grpc.intercept_channel(client.channel, token)
        client.kvstub = rpc.KVStub(client.channel)
        client.leasestub = rpc.LeaseStub(client.channel)
        client.maintenancestub = rpc.MaintenanceStub(client.channel)
        client.clusterstub = rpc.ClusterStub(client.channel)
        return token

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        if self.value is None:
            return details
        metadata = [*(details.metadata or ()), ("token", self.value)]
        return _CallDetails(details.method, details.timeout, metadata, details.credentials,
                            getattr(details, "wait_for_ready", None), getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


def translate_rpc_error(
    what: str, url: str, exc: grpc.RpcError, *, ca_cert: Optional[str] = None, client_cert: Optional[str] = None,
    user: Optional[str] = None,
) -> Exception:
    """A gRPC failure as the domain error the caller can act on (a _Retryable for transient ones).

    `ca_cert`/`client_cert` are the store's TLS files and `user` its etcd user: they let a refused
    handshake or request name its cause.
    """
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = (exc.details() if hasattr(exc, "details") else None) or str(exc)
    message = f"etcd {url}: {what}: {code.name if code else 'UNKNOWN'}: {details}"
    if user is not None and any(m in details for m in _STALE_TOKEN_MARKERS):
        return _TokenRejected(StoreUnavailable(message))
    auth_problem = _auth_problem(details, user)
    if auth_problem:
        return StoreConfigError(f"etcd {url}: {what}: {auth_problem} [{code.name if code else 'UNKNOWN'}: {details}]")
    if code in _CREDENTIAL_CODES:
        return StoreConfigError(f"{message} (check the etcd credentials and client certificate)")
    if code == grpc.StatusCode.UNAVAILABLE and url.startswith("https:"):
        problem = _tls_problem(details, ca_cert, client_cert)
        if problem:
            return StoreConfigError(f"etcd {url}: {what}: TLS: {problem} [{code.name}: {details}]")
    if code == grpc.StatusCode.UNAVAILABLE and any(m in details.lower() for m in _TLS_CONFIG_MARKERS):
        return StoreConfigError(f"{message} (TLS failed: check the endpoint's scheme, the CA and client certificates)")
    if code == grpc.StatusCode.NOT_FOUND and "lease not found" in details:
        return _LeaseNotFound(message)
    if code in _RETRYABLE_CODES:
        return _Retryable(StoreUnavailable(message))
    return StoreUnavailable(message)


def _auth_problem(details: str, user: Optional[str]) -> Optional[str]:
    """What etcd's auth refusal means for our settings, in words; None if it is not one."""
    who = f"etcd user {user!r}" if user else "this client (no etcd user given)"
    if "permission denied" in details:
        return f"permission denied: {who} may not do this (its role needs readwrite on the key prefix)"
    if "authentication failed" in details:
        return f"authentication failed: wrong password for {who}, or no such user"
    if "user name is empty" in details or ("invalid auth token" in details and user is None):
        return "etcd has authentication enabled: give an etcd user name and password"
    if "authentication is not enabled" in details:
        return f"etcd has authentication disabled but {who} was given: drop the user name and password"
    return None


def _tls_problem(details: str, ca_cert: Optional[str], client_cert: Optional[str]) -> Optional[str]:
    """What a failed TLS connection to etcd says about our settings, in words; None if nothing.

    gRPC reports a server that rejects our client certificate only as a record it cannot decrypt
    (TLS 1.3 sends the alert after the handshake) and logs the alert itself elsewhere, so the cause is
    read from our own certificate: none given, outside its validity dates, or else not trusted.
    """
    verify = _VERIFY_FAILED.search(details)
    if verify:
        return (f"etcd's server certificate does not verify against the CA certificate {ca_cert or '(none)'}: "
                f"{verify.group(1).strip()} (is it the CA that signed etcd's certificate?)")
    if not any(marker in details for marker in _PEER_REJECTED_MARKERS):
        return None
    if client_cert is None:
        return "etcd refused the connection: it requires a client certificate and none was given"
    dates = _certificate_dates(client_cert)
    if dates is not None:
        not_before, not_after = dates
        now = time.time()
        if now > ssl.cert_time_to_seconds(not_after):
            return f"etcd refused the client certificate {client_cert}: it expired on {not_after}"
        if now < ssl.cert_time_to_seconds(not_before):
            return f"etcd refused the client certificate {client_cert}: it is not valid before {not_before}"
    return (f"etcd refused the client certificate {client_cert}: "
            "it is not signed by a CA that etcd trusts (its --trusted-ca-file)")


def _certificate_dates(path: str) -> Optional[tuple[str, str]]:
    """(notBefore, notAfter) of the first certificate in a PEM file, as OpenSSL prints them; None if unreadable."""
    try:
        decoded = ssl._ssl._test_decode_cert(path)  # type: ignore[attr-defined]  # the stdlib's only X.509 reader
        return decoded["notBefore"], decoded["notAfter"]
    except (AttributeError, KeyError, OSError, ssl.SSLError, ValueError):
        return None


_END = object()


class LeaseWatch:
    """A live watch on the subnet records: iterate for batches of LeaseEvent.

    Iteration blocks until events arrive; it raises WatchLost when the stream dies (watch again
    from `exc.last_revision + 1`) and WatchCompacted when the start revision is gone (list again).
    `cancel()` (from any thread) ends the iteration. Events that arrive together come as one batch.
    """

    def __init__(self, store: EtcdStore, client: etcd3.Etcd3Client, start_revision: int) -> None:
        self._store = store
        self._url = store._endpoint_of(client).url
        self.revision = start_revision - 1
        """Every event up to this revision has been handed to the caller."""
        self._queue: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        self._closing = threading.Event()
        self._cancelled = False
        self._failed: Optional[Exception] = None
        self._pending: list[Any] = []
        create = rpc.WatchCreateRequest(
            key=store._subnets_prefix,
            range_end=prefix_range_end(store._subnets_prefix),
            start_revision=start_revision,
        )
        self._call = rpc.WatchStub(client.channel).Watch(self._requests(rpc.WatchRequest(create_request=create)))
        self._pump = threading.Thread(target=self._run, name=f"etcd-watch-{start_revision}", daemon=True)
        self._pump.start()
        first = self._get(store.timeout)
        if first is None or first is _END or isinstance(first, grpc.RpcError):
            self.cancel()
            if isinstance(first, grpc.RpcError):
                raise first  # the store translates it
            reason = f"no answer within {store.timeout}s" if first is None else "the stream ended"
            raise _Retryable(StoreUnavailable(f"etcd {self._url}: watch leases: {reason}"))
        if first.events or first.canceled or first.compact_revision or not first.created:
            self._pending.append(first)

    def _requests(self, create: Any) -> Iterator[Any]:
        yield create
        self._closing.wait()  # keep the stream half-open until cancel; gRPC runs this in its own thread

    def _run(self) -> None:
        try:
            for response in self._call:
                self._queue.put(response)
        except grpc.RpcError as exc:
            self._queue.put(exc)
        finally:
            self._queue.put(_END)
            self._closing.set()

    def _get(self, timeout: Optional[float]) -> Any:
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def next_batch(self, timeout: Optional[float] = None) -> Optional[list[LeaseEvent]]:
        """The next batch of events; None when `timeout` seconds pass without one.

        Raises StopIteration after cancel(), WatchLost or WatchCompacted as the class says.
        One consumer at a time; only cancel() may come from another thread.
        """
        if self._failed is not None:
            raise self._failed
        batch: list[LeaseEvent] = []
        item = self._pending.pop(0) if self._pending else self._get(timeout)
        while item is not None:
            if item is _END or isinstance(item, grpc.RpcError) or item.canceled or item.compact_revision:
                if batch:  # hand over what arrived before the failure first
                    self._pending.insert(0, item)
                    break
                self._fail(item)
            if item.events:  # etcd never splits one revision's events across responses
                batch.extend(self._event(e) for e in item.events)
                self.revision = max(self.revision, batch[-1].mod_revision)
            item = self._pending.pop(0) if self._pending else self._get(0)
        return batch or None

    def _fail(self, item: Any) -> None:
        """Turn the end of the stream into the exception the caller acts on (and keep raising it)."""
        if self._cancelled:
            self._failed = StopIteration()
            raise StopIteration
        if item is not _END and not isinstance(item, grpc.RpcError) and item.compact_revision:
            error: Exception = WatchCompacted(
                f"etcd {self._url}: watch from revision {self.revision + 1} is compacted (up to {item.compact_revision})",
                item.compact_revision,
            )
        elif isinstance(item, grpc.RpcError):
            error = WatchLost(f"etcd {self._url}: watch leases: {item.code().name}: {item.details()}", self.revision)
        else:
            reason = getattr(item, "cancel_reason", "") or "the stream ended"
            error = WatchLost(f"etcd {self._url}: watch leases cancelled by etcd: {reason}", self.revision)
        self._failed = error
        self.cancel()
        raise error

    def _event(self, event: Any) -> LeaseEvent:
        name = self._store._key_name(event.kv.key)
        if event.type == event.PUT:
            return LeaseEvent("put", name, event.kv.value, event.kv.mod_revision, event.kv.create_revision)
        return LeaseEvent("delete", name, None, event.kv.mod_revision)

    def __iter__(self) -> "LeaseWatch":
        return self

    def __next__(self) -> list[LeaseEvent]:
        while True:  # blocks by design: cancel() or a failure of the stream ends it
            batch = self.next_batch(timeout=None)
            if batch:
                return batch

    def cancel(self) -> None:
        """Stop the watch; a blocked iteration ends with StopIteration. Safe to call twice."""
        if self._failed is None:
            self._cancelled = True
        self._closing.set()
        self._call.cancel()
        self._pump.join(timeout=self._store.timeout)

    def __enter__(self) -> "LeaseWatch":
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()
