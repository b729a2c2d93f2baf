"""The etcd door against a real etcd 3.4 on loopback (plus a few checks that need no etcd)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from ipaddress import IPv4Network
from pathlib import Path
from typing import Callable, Iterator

import grpc
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `integration` lives at the repo root

from integration.etcd_server import ETCDCTL_EXE, EtcdServer, free_port  # noqa: E402
from vxlan_net.core.errors import (LeaseGone, StoreConfigError, StoreUnavailable, SubnetTaken, WatchCompacted,
                                   WatchLost)
from vxlan_net.core.lease import Lease  # noqa: E402
from vxlan_net.doors.store import (TTL_WINDOW, EtcdStore, LeaseEvent, LeaseWatch, parse_endpoint, prefix_range_end,
                                   _TokenRejected, rpc, translate_rpc_error)

SUBNET_A = IPv4Network("198.19.3.0/24")
SUBNET_B = IPv4Network("198.19.4.0/24")


def lease_value(subnet: IPv4Network, public_ip: str = "198.18.1.2", mac: str = "0a:58:c6:13:03:00") -> str:
    return Lease(subnet, public_ip, mac).to_json()  # type: ignore[arg-type]


def wait_until(condition: Callable[[], bool], timeout: float, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / step) + 1):
        if condition():
            return True
        if time.monotonic() > deadline:
            break
        time.sleep(step)
    return condition()


def etcdctl(server: EtcdServer, *args: str, stdin: str | None = None) -> str:
    """The independent view: etcd's own CLI."""
    cmd = [ETCDCTL_EXE, "--endpoints", server.client_url, "--command-timeout", "3s", *args]
    proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=10,
                          env=dict(os.environ, ETCDCTL_API="3"), check=True)
    return proc.stdout


def etcd_lease_ids(server: EtcdServer) -> set[str]:
    lines = etcdctl(server, "lease", "list").splitlines()
    return {line.strip() for line in lines[1:] if line.strip()}  # first line: "found N leases"


def collect(watch: LeaseWatch, count: int, timeout: float = 5.0) -> list[list[LeaseEvent]]:
    """Batches until `count` events arrived (or the time is up)."""
    batches: list[list[LeaseEvent]] = []
    deadline = time.monotonic() + timeout
    for _ in range(count + 50):
        if sum(map(len, batches)) >= count or time.monotonic() > deadline:
            break
        batch = watch.next_batch(timeout=max(0.0, deadline - time.monotonic()))
        if batch:
            batches.append(batch)
    return batches


@pytest.fixture(scope="module")
def etcd() -> Iterator[EtcdServer]:
    with EtcdServer() as server:  # stopped by PID and its temp dir removed on exit
        yield server


@pytest.fixture
def private_etcd() -> Iterator[EtcdServer]:
    """A server of the test's own, for tests that stop or restart it."""
    with EtcdServer() as server:
        yield server


@pytest.fixture
def make_store() -> Iterator[Callable[..., EtcdStore]]:
    stores: list[EtcdStore] = []

    def make(endpoints: list[str], **kwargs: object) -> EtcdStore:
        kwargs.setdefault("prefix", f"/test-{uuid.uuid4().hex[:8]}")
        kwargs.setdefault("timeout", 2.0)
        store = EtcdStore(endpoints, **kwargs)  # type: ignore[arg-type]
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.close()


@pytest.fixture
def store(etcd: EtcdServer, make_store: Callable[..., EtcdStore]) -> EtcdStore:
    return make_store([etcd.client_url])


@pytest.fixture
def watches() -> Iterator[list[LeaseWatch]]:
    opened: list[LeaseWatch] = []
    yield opened
    for watch in opened:
        watch.cancel()


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two unrelated self-signed certificates for 127.0.0.1 (each its own CA)."""
    directory = tmp_path_factory.mktemp("tls")
    files = {}
    for name in ("right", "wrong"):
        key, cert = directory / f"{name}.key", directory / f"{name}.pem"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={name}",
             "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
            capture_output=True, check=True, timeout=30,
        )
        files[name], files[f"{name}_key"] = cert, key
    return files


# -- without etcd ---------------------------------------------------------------------------


def test_protobuf_is_4_or_later_and_etcd3_uses_the_fast_backend() -> None:
    import google.protobuf
    from google.protobuf.internal import api_implementation

    assert int(google.protobuf.__version__.split(".")[0]) >= 4
    assert api_implementation.Type() == "upb"


def test_endpoint_urls_are_parsed_for_grpc() -> None:
    assert parse_endpoint("http://198.18.0.2:2379").target == "198.18.0.2:2379"
    assert parse_endpoint("198.18.0.2").url == "http://198.18.0.2:2379"
    assert parse_endpoint("https://[fd00::1]:2379").target == "[fd00::1]:2379"
    assert parse_endpoint("https://etcd.example:2379").tls
    for bad in ("unix:///run/etcd.sock", "http://198.18.0.2:2379/v3", "http://:2379", "http://h:99999"):
        with pytest.raises(StoreConfigError):
            parse_endpoint(bad)


def test_prefix_range_end_covers_exactly_the_prefix() -> None:
    assert prefix_range_end(b"/vxlan-net/subnets/") == b"/vxlan-net/subnets0"
    assert prefix_range_end(b"a\xff") == b"b"


def test_bad_client_settings_are_permanent_errors_naming_the_problem(tmp_path: Path) -> None:
    with pytest.raises(StoreConfigError, match="no CA certificate"):
        EtcdStore(["https://198.18.0.2:2379"])
    with pytest.raises(StoreConfigError, match="missing.pem"):
        EtcdStore(["https://198.18.0.2:2379"], ca_cert=str(tmp_path / "missing.pem"))
    not_pem = tmp_path / "ca.txt"
    not_pem.write_text("hello")
    with pytest.raises(StoreConfigError, match="not a PEM"):
        EtcdStore(["https://198.18.0.2:2379"], ca_cert=str(not_pem))
    with pytest.raises(StoreConfigError, match="cert_key"):
        EtcdStore(["https://198.18.0.2:2379"], cert_cert=str(not_pem))
    with pytest.raises(StoreConfigError, match="prefix"):
        EtcdStore(["http://198.18.0.2:2379"], prefix="vxlan-net")


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize(
    "code, details, expected",
    [
        (grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses", StoreUnavailable),
        (grpc.StatusCode.UNAVAILABLE, "Handshake read failed (Socket closed)", StoreUnavailable),
        (grpc.StatusCode.UNAVAILABLE, "SSL_ERROR_SSL: CERTIFICATE_VERIFY_FAILED", StoreConfigError),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", StoreUnavailable),
        (grpc.StatusCode.UNAUTHENTICATED, "etcdserver: invalid auth token", StoreConfigError),
        (grpc.StatusCode.PERMISSION_DENIED, "etcdserver: permission denied", StoreConfigError),
        (grpc.StatusCode.NOT_FOUND, "etcdserver: requested lease not found", LeaseGone),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "etcdserver: mvcc: database space exceeded", StoreUnavailable),
    ],
)
def test_grpc_failures_become_domain_errors(code: grpc.StatusCode, details: str, expected: type) -> None:
    error = translate_rpc_error("get config", "http://198.18.0.2:2379", FakeRpcError(code, details))
    error = getattr(error, "error", error)  # transient ones come wrapped for the door's retry
    assert type(error) is expected or isinstance(error, expected) and expected is LeaseGone
    assert "http://198.18.0.2:2379" in str(error) and details in str(error)


_REJECTED = "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:198.18.0.2:2379: Unwrap failed (TSI_DATA_CORRUPTED)"


def test_a_refused_tls_connection_names_its_cause(certificates: dict[str, Path], tmp_path: Path) -> None:
    expired, key, request = tmp_path / "expired.pem", tmp_path / "expired.key", tmp_path / "expired.csr"
    for argv in (
        ["openssl", "req", "-new", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=old", "-keyout", key, "-out", request],
        ["openssl", "x509", "-req", "-in", request, "-signkey", key, "-days", "-1", "-out", expired],  # ended yesterday
    ):
        subprocess.run([str(a) for a in argv], capture_output=True, check=True, timeout=30)
    url = "https://198.18.0.2:2379"

    def message(details: str, **files: str) -> str:
        error = translate_rpc_error("get config", url, FakeRpcError(grpc.StatusCode.UNAVAILABLE, details), **files)
        assert isinstance(error, StoreConfigError) and "\n" not in str(error)
        return str(error)

    assert "requires a client certificate and none was given" in message(_REJECTED, ca_cert="ca.pem")
    assert f"client certificate {expired}: it expired on" in message(_REJECTED, client_cert=str(expired))
    right = str(certificates["right"])
    assert f"client certificate {right}: it is not signed by a CA that etcd trusts" in message(
        _REJECTED, client_cert=right)
    verify = "Tls handshake failed: SSL_ERROR_SSL: CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate: OK"
    assert "does not verify against the CA certificate ca.pem: unable to get local issuer certificate" in message(
        verify, ca_cert="ca.pem")
    plain = translate_rpc_error("get config", "http://198.18.0.2:2379",
                                FakeRpcError(grpc.StatusCode.UNAVAILABLE, _REJECTED))
    assert isinstance(getattr(plain, "error", plain), StoreUnavailable)  # no TLS: nothing to blame on certificates


@pytest.mark.parametrize(
    "details, user, expected",
    [
        ("etcdserver: permission denied", "node", "permission denied: etcd user 'node' may not do this"),
        ("etcdserver: authentication failed, invalid user ID or password", "node",
         "authentication failed: wrong password for etcd user 'node'"),
        ("etcdserver: user name is empty", None, "etcd has authentication enabled: give an etcd user name"),
        ("etcdserver: authentication is not enabled", "node", "etcd has authentication disabled"),
    ],
)
def test_auth_refusals_name_the_user_and_the_fix(details: str, user: str | None, expected: str) -> None:
    error = translate_rpc_error("get config", "http://198.18.0.2:2379",
                                FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, details), user=user)
    assert isinstance(error, StoreConfigError) and expected in str(error) and details in str(error)


def test_a_stale_auth_token_is_retried_after_logging_in_again_and_half_credentials_are_refused() -> None:
    stale = FakeRpcError(grpc.StatusCode.UNAUTHENTICATED, "etcdserver: invalid auth token")
    assert isinstance(translate_rpc_error("get config", "http://198.18.0.2:2379", stale, user="node"), _TokenRejected)
    with pytest.raises(StoreConfigError, match="both a user name and a password"):
        EtcdStore(["http://198.18.0.2:2379"], username="node")


# -- against etcd ---------------------------------------------------------------------------


def test_config_round_trip(store: EtcdStore, etcd: EtcdServer) -> None:
    assert store.get_config() is None
    raw = json.dumps({"Network": "198.19.0.0/16", "Backend": {"Type": "vxlan"}})
    store.put_config(raw)
    assert store.get_config() == raw.encode()
    assert etcdctl(etcd, "get", "--print-value-only", f"{store.prefix}/config").strip() == raw


def test_create_lease_lost_race_raises_subnet_taken_and_leaves_no_orphan_lease(
    store: EtcdStore, etcd: EtcdServer
) -> None:
    first = store.create_lease(SUBNET_A, lease_value(SUBNET_A), ttl=60)
    leases_before = etcd_lease_ids(etcd)
    with pytest.raises(SubnetTaken):
        store.create_lease(SUBNET_A, lease_value(SUBNET_A, public_ip="198.18.9.9"), ttl=60)
    assert etcd_lease_ids(etcd) == leases_before
    record = store.list_leases().records["198.19.3.0-24"]
    assert record.lease_id == first and json.loads(record.value)["PublicIP"] == "198.18.1.2"
    store.revoke(first)


def test_ttl_expiry_removes_the_key(store: EtcdStore, etcd: EtcdServer) -> None:
    lease_id = store.create_lease(SUBNET_A, lease_value(SUBNET_A), ttl=2)
    key = f"{store.prefix}/subnets/198.19.3.0-24"
    assert etcdctl(etcd, "get", "--print-value-only", key).strip()
    assert wait_until(lambda: not etcdctl(etcd, "get", "--print-value-only", key).strip(), timeout=8)
    assert store.lease_ttl(lease_id) is None
    with pytest.raises(LeaseGone):
        store.refresh(lease_id)


def test_refresh_keeps_the_lease_alive_past_its_ttl(store: EtcdStore, etcd: EtcdServer) -> None:
    lease_id = store.create_lease(SUBNET_B, lease_value(SUBNET_B), ttl=2)
    key = f"{store.prefix}/subnets/198.19.4.0-24"
    for _ in range(6):  # 3 s, well past the 2 s TTL
        assert store.refresh(lease_id) == 2
        time.sleep(0.5)
    assert etcdctl(etcd, "get", "--print-value-only", key).strip()
    store.revoke(lease_id)
    assert not etcdctl(etcd, "get", "--print-value-only", key).strip()
    store.revoke(lease_id)  # twice is fine


def test_update_lease_rewrites_only_our_own_record(store: EtcdStore) -> None:
    lease_id = store.create_lease(SUBNET_A, lease_value(SUBNET_A), ttl=60)
    store.update_lease(SUBNET_A, lease_value(SUBNET_A, mac="0a:58:c6:13:03:01"), lease_id)
    record = store.list_leases().records["198.19.3.0-24"]
    assert json.loads(record.value)["BackendData"]["VtepMAC"] == "0a:58:c6:13:03:01"
    assert record.lease_id == lease_id
    with pytest.raises(LeaseGone):
        store.update_lease(SUBNET_B, lease_value(SUBNET_B), lease_id)  # not ours: no key at all
    store.revoke(lease_id)
    with pytest.raises(LeaseGone):
        store.update_lease(SUBNET_A, lease_value(SUBNET_A), lease_id)



def test_lease_ttls_answers_every_distinct_lease_across_windows_and_none_for_a_gone_one(store: EtcdStore) -> None:
    """More leases than one window of requests in flight, one asked twice, one revoked: each distinct lease
    is answered once, the revoked one with None; a record listed with_ttl gets its own lease's TTL."""
    grants = [store._call("grant", lambda c: c.leasestub.LeaseGrant(rpc.LeaseGrantRequest(TTL=60 + i % 7),
                                                                     store.timeout)).ID
              for i in range(TTL_WINDOW + 44)]
    gone = grants.pop()
    store.revoke(gone)
    try:
        ttls = store.lease_ttls([gone, *grants, grants[0]])
        assert set(ttls) == {gone, *grants} and ttls[gone] is None
        assert all(0 < ttls[g] <= 66 for g in grants), sorted(set(ttls.values()), key=str)[:5]
        assert store.lease_ttls([]) == {}
        record_lease = store.create_lease(SUBNET_A, lease_value(SUBNET_A), ttl=30)
        record = store.list_leases(with_ttl=True).records["198.19.3.0-24"]
        assert record.lease_id == record_lease and 0 < (record.ttl_remaining or 0) <= 30
        store.revoke(record_lease)
    finally:
        for grant in grants:
            store.revoke(grant)

def test_list_leases_gives_records_at_one_revision(store: EtcdStore, etcd: EtcdServer) -> None:
    a = store.create_lease(SUBNET_A, lease_value(SUBNET_A), ttl=60)
    b = store.create_lease(SUBNET_B, lease_value(SUBNET_B, public_ip="198.18.2.2"), ttl=60)
    snapshot = store.list_leases(with_ttl=True)
    status = json.loads(etcdctl(etcd, "endpoint", "status", "-w", "json"))
    assert snapshot.revision == status[0]["Status"]["header"]["revision"]
    assert set(snapshot.records) == {"198.19.3.0-24", "198.19.4.0-24"}
    record = snapshot.records["198.19.4.0-24"]
    assert (record.lease_id, record.value) == (b, lease_value(SUBNET_B, public_ip="198.18.2.2").encode())
    assert 0 < (record.ttl_remaining or 0) <= 60 and record.mod_revision == snapshot.revision
    assert store.delete_lease(SUBNET_A) and not store.delete_lease(SUBNET_A)
    assert set(store.list_leases().records) == {"198.19.4.0-24"}
    store.revoke(a)
    store.revoke(b)


def test_watch_delivers_puts_and_deletes_in_order_from_the_start_revision(
    store: EtcdStore, watches: list[LeaseWatch]
) -> None:
    start = store.list_leases().revision + 1
    a = store.create_lease(SUBNET_A, lease_value(SUBNET_A), ttl=60)
    store.create_lease(SUBNET_B, lease_value(SUBNET_B), ttl=60)
    watches.append(watch := store.watch_leases(start))
    replayed = collect(watch, 2)
    assert len(replayed) == 1, "events that arrive together come as one batch"
    store.update_lease(SUBNET_A, lease_value(SUBNET_A, mac="0a:58:c6:13:03:02"), a)
    store.delete_lease(SUBNET_B)
    store.revoke(a)  # the lease's key goes with it
    events = [e for batch in replayed + collect(watch, 3) for e in batch]
    assert [(e.kind, e.key_name) for e in events] == [
        ("put", "198.19.3.0-24"),
        ("put", "198.19.4.0-24"),
        ("put", "198.19.3.0-24"),
        ("delete", "198.19.4.0-24"),
        ("delete", "198.19.3.0-24"),
    ]
    assert [e.mod_revision for e in events] == sorted(e.mod_revision for e in events)
    assert json.loads(events[2].value or b"")["BackendData"]["VtepMAC"] == "0a:58:c6:13:03:02"
    assert events[3].value is None and watch.revision == events[-1].mod_revision


def test_cancel_ends_a_blocked_iteration(store: EtcdStore) -> None:
    watch = store.watch_leases(store.list_leases().revision + 1)
    timer = threading.Timer(0.3, watch.cancel)
    timer.start()
    started = time.monotonic()
    try:
        assert list(watch) == []
    finally:
        timer.cancel()
        watch.cancel()
    assert time.monotonic() - started < 3


def test_watch_lost_on_etcd_restart_and_a_new_watch_catches_up(
    private_etcd: EtcdServer, make_store: Callable[..., EtcdStore], watches: list[LeaseWatch]
) -> None:
    store = make_store([private_etcd.client_url])
    a = store.create_lease(SUBNET_A, lease_value(SUBNET_A), ttl=60)
    watches.append(watch := store.watch_leases(store.list_leases().revision + 1))
    store.update_lease(SUBNET_A, lease_value(SUBNET_A, mac="0a:58:c6:13:03:03"), a)
    [seen] = collect(watch, 1)
    private_etcd.stop()
    with pytest.raises(WatchLost) as lost:
        watch.next_batch(timeout=5)
    assert lost.value.last_revision == seen[-1].mod_revision
    with pytest.raises(WatchLost):  # it stays dead: the caller cannot miss it
        watch.next_batch(timeout=0)

    private_etcd.start()
    assert wait_until(store.is_reachable, timeout=10)
    store.create_lease(SUBNET_B, lease_value(SUBNET_B), ttl=60)
    store.delete_lease(SUBNET_A)
    watches.append(again := store.watch_leases(lost.value.last_revision + 1))
    events = [e for batch in collect(again, 2) for e in batch]
    assert [(e.kind, e.key_name) for e in events] == [("put", "198.19.4.0-24"), ("delete", "198.19.3.0-24")]


def test_watch_from_a_compacted_revision_raises_watch_compacted(
    store: EtcdStore, watches: list[LeaseWatch]
) -> None:
    old = store.list_leases().revision
    lease_id = store.create_lease(SUBNET_A, lease_value(SUBNET_A), ttl=60)
    store.update_lease(SUBNET_A, lease_value(SUBNET_A, mac="0a:58:c6:13:03:04"), lease_id)
    now = store.list_leases().revision
    store.compact(now)
    watches.append(watch := store.watch_leases(old))
    with pytest.raises(WatchCompacted) as compacted:
        watch.next_batch(timeout=5)
    assert compacted.value.compact_revision == now
    store.revoke(lease_id)


def test_a_dead_first_endpoint_fails_over_to_the_next(
    etcd: EtcdServer, make_store: Callable[..., EtcdStore], watches: list[LeaseWatch]
) -> None:
    store = make_store([f"http://127.0.0.1:{free_port()}", etcd.client_url])
    store.put_config('{"Network": "198.19.0.0/16"}')
    assert store.get_config() == b'{"Network": "198.19.0.0/16"}'
    assert store.status().endpoint == etcd.client_url
    watches.append(store.watch_leases(store.list_leases().revision + 1))


def test_store_unavailable_when_etcd_is_down_is_fast(make_store: Callable[..., EtcdStore]) -> None:
    store = make_store([f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"], timeout=1.0)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="127.0.0.1"):
        store.get_config()
    with pytest.raises(StoreUnavailable):
        store.watch_leases(1)
    assert not store.is_reachable()
    assert time.monotonic() - started < 5


def test_tls_with_the_right_ca_works_and_a_wrong_ca_is_a_config_error(
    certificates: dict[str, Path], make_store: Callable[..., EtcdStore]
) -> None:
    with EtcdServer(cert_file=certificates["right"], key_file=certificates["right_key"]) as server:
        good = make_store([server.client_url], ca_cert=str(certificates["right"]))
        good.put_config("{}")
        assert good.get_config() == b"{}"
        bad = make_store([server.client_url], ca_cert=str(certificates["wrong"]))
        with pytest.raises(StoreConfigError, match="CERTIFICATE_VERIFY_FAILED"):
            bad.get_config()


def test_listing_5000_leases_is_fast(store: EtcdStore, etcd: EtcdServer) -> None:
    value = "x" * 150  # about the size of a real lease record
    for chunk in range(50):  # etcd allows 128 operations per transaction
        puts = "".join(
            f"put {store.prefix}/subnets/198.{19 + i // 65536}.{i // 256 % 256}.{i % 256}-32 {value}\n"
            for i in range(chunk * 100, chunk * 100 + 100)
        )
        etcdctl(etcd, "txn", stdin=f"\n{puts}\n\n")
    started = time.perf_counter()
    snapshot = store.list_leases()
    elapsed = time.perf_counter() - started
    assert len(snapshot.records) == 5000
    print(f"listing 5,000 leases took {elapsed * 1000:.0f} ms")
    assert elapsed < 1.0


def _connections_to(port: int) -> list[str]:
    """This process's established TCP connections to ``port``, as `ss` sees them (local address:port)."""
    out = subprocess.run(["ss", "-Htnp", "state", "established", f"( dport = :{port} )"],
                         capture_output=True, text=True, check=True).stdout
    return [line.split()[2] for line in out.splitlines() if f"pid={os.getpid()}," in line]


def test_a_new_client_never_rides_an_older_clients_connection(etcd: EtcdServer, make_store, watches) -> None:
    """After a renumbering the agent closes its store and connects afresh (issue 13). gRPC would otherwise
    hand a new channel the connection of an old one still being torn down: bound to a source address
    that is gone, its requests only time out. So each client holds its own connection."""
    before = set(_connections_to(etcd.client_port))
    old = make_store([etcd.client_url])
    watches.append(old.watch_leases(old.list_leases().revision + 1))  # keeps the old connection busy
    new = make_store([etcd.client_url], prefix=old.prefix)
    new.list_leases()
    assert wait_until(lambda: len(set(_connections_to(etcd.client_port)) - before) == 2, timeout=5), \
        f"one connection shared by two clients: {_connections_to(etcd.client_port)}"
