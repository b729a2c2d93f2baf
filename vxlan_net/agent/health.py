"""`--healthz-addr`: /healthz, /readyz and Prometheus /metrics, served from a thread."""

from __future__ import annotations

import dataclasses
import json
import logging
import selectors
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler
from typing import Any, Callable, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

log = logging.getLogger(__name__)


class AgentMetrics:
    """The agent's Prometheus metrics, in a registry of their own (no process-global state)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        gauge, counter = self._registered(Gauge), self._registered(Counter)
        self.leases_known = gauge("vxlan_net_leases_known", "Valid subnet leases in etcd, ours included")
        self.peers_programmed = gauge("vxlan_net_peers_programmed",
                                      "Remote nodes whose entries the last successful reconcile programmed")
        self.reconcile_duration = Histogram("vxlan_net_reconcile_duration_seconds",
                                            "Time of one reconcile pass (kernel read, diff, apply)",
                                            buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5),
                                            registry=self.registry)
        self.reconcile_errors = counter("vxlan_net_reconcile_errors", "Reconcile passes that failed")
        self.watch_restarts = counter("vxlan_net_etcd_watch_restarts", "Times the etcd lease watch was re-created")
        self.invalid_leases = counter("vxlan_net_invalid_leases_skipped",
                                      "Lease records skipped as invalid (counted once per bad value)")
        self.lease_expiry = gauge("vxlan_net_lease_expiry_seconds", "Seconds until our subnet lease expires")
        self.ready = gauge("vxlan_net_ready", "1 while /readyz answers 200 (same checks), else 0")
        self.etcd_reachable = gauge("vxlan_net_etcd_reachable",
                                    "1 if the last etcd request of the watch loop (listing, lease renewal) got "
                                    "an answer, 0 if etcd could not be reached")
        self.fault_active = gauge("vxlan_net_fault_active",
                                  "1 while a transient fault of this kind lasts (the agent keeps running and retries)",
                                  ["kind"])
        self.fault_failures = counter("vxlan_net_fault_failures", "Failed attempts, by fault kind", ["kind"])

    def _registered(self, kind: type) -> Callable[..., Any]:
        """`kind(name, documentation, labels)` in this registry."""
        return lambda name, documentation, labels=(): kind(name, documentation, labels, registry=self.registry)


@dataclasses.dataclass
class Readiness:
    """What /readyz needs to know; the agent updates it as it goes."""

    resync_interval: float
    lease_held: bool = False
    subnet_file_written: bool = False
    last_reconcile_ok: bool = False
    last_reconcile_at: Optional[float] = None  # time.monotonic()
    faults: dict[str, str] = dataclasses.field(default_factory=dict)
    """Transient faults lasting now: kind -> the last error (vxlan_net.agent.faults keeps it)."""

    def problems(self, now: Optional[float] = None) -> list[str]:
        now = time.monotonic() if now is None else now
        problems = []
        if not self.lease_held:
            problems.append("no subnet lease held")
        if not self.subnet_file_written:
            problems.append("subnet file not written")
        if not self.last_reconcile_ok:
            problems.append("last reconcile failed" if self.last_reconcile_at else "no reconcile yet")
        elif now - self.last_reconcile_at > 2 * self.resync_interval:
            problems.append(f"last successful reconcile {now - self.last_reconcile_at:.0f}s ago")
        problems.extend(f"{kind}: {error}" for kind, error in sorted(dict(self.faults).items()))
        return problems


class HealthServer:
    """HTTP on a selector: idle connections cost a file descriptor, never a thread.

    One thread accepts and watches the connections; a request is handed to one
    of `workers` threads only once its first bytes have arrived. At most
    `max_connections` are held (for a new one the oldest idle one is closed),
    and a connection that sends nothing, or not a whole request, for
    `idle_timeout` seconds is closed: probes keep answering whatever a client does.
    `close()` stops every thread it started.
    """

    def __init__(self, address: tuple[str, int], metrics: AgentMetrics, readiness: Readiness, *,
                 workers: int = 4, max_connections: int = 64, idle_timeout: float = 5.0):
        host, port = address
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.create_server((host, port), family=family, backlog=128)
        self.listener.setblocking(False)
        self.handler = _handler(metrics, readiness, idle_timeout)
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="healthz-worker")
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ)
        self.idle: dict[socket.socket, float] = {}  # connection -> when accepted, oldest first
        self.busy: dict[socket.socket, float] = {}  # handed to a worker -> when; the worker removes it
        self.busy_lock = threading.Lock()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, name="healthz", daemon=True)

    @property
    def port(self) -> int:
        return self.listener.getsockname()[1]

    def start(self) -> "HealthServer":
        self.thread.start()
        log.info("serving /healthz, /readyz and /metrics on %s:%d", *self.listener.getsockname()[:2])
        return self

    def close(self) -> None:
        self.stopping.set()
        if self.thread.is_alive():
            self.thread.join()
        with self.busy_lock:  # a worker waiting for a slow client's bytes returns at once
            for conn in self.busy:
                _shutdown(conn)
        self.pool.shutdown(wait=True)
        for conn in list(self.idle):
            self._drop(conn)
        self.selector.close()
        self.listener.close()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            for key, _ in self.selector.select(timeout=min(0.5, self.idle_timeout / 2)):
                if key.fileobj is self.listener:
                    self._accept()
                elif key.fileobj in self.idle:
                    self._hand_over(key.fileobj)
            self._expire(time.monotonic() - self.idle_timeout)

    def _accept(self) -> None:
        for _ in range(self.max_connections):  # bounded: the loop also has to serve and expire
            try:
                conn, peer = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. EMFILE: the connection waits in the backlog
                log.debug("health server cannot accept: %s", exc)
                return
            with self.busy_lock:
                busy = len(self.busy)
            if busy >= self.max_connections:
                conn.close()  # every slot is working on a request: refuse rather than queue
                continue
            while self.idle and len(self.idle) + busy >= self.max_connections:
                self._drop(next(iter(self.idle)))
            self.idle[conn] = time.monotonic()
            self.selector.register(conn, selectors.EVENT_READ, peer)

    def _hand_over(self, conn: socket.socket) -> None:
        peer = self.selector.unregister(conn).data
        del self.idle[conn]
        with self.busy_lock:
            self.busy[conn] = time.monotonic()
        self.pool.submit(self._respond, conn, peer)

    def _respond(self, conn: socket.socket, peer) -> None:
        try:
            conn.setblocking(True)
            self.handler(conn, peer, self)  # one request (HTTP/1.0), bounded by the socket timeout
        except OSError as exc:
            log.debug("health client %s: %s", peer, exc)
        finally:
            with self.busy_lock:
                del self.busy[conn]
            _close(conn)

    def _expire(self, since_before: float) -> None:
        for conn, accepted in list(self.idle.items()):
            if accepted >= since_before:
                break
            self._drop(conn)
        with self.busy_lock:  # a request trickling in byte by byte: its worker's read fails
            for conn, handed_over in self.busy.items():
                if handed_over < since_before:
                    _shutdown(conn)

    def _drop(self, conn: socket.socket) -> None:
        self.selector.unregister(conn)
        del self.idle[conn]
        _close(conn)


def _shutdown(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _close(conn: socket.socket) -> None:
    _shutdown(conn)
    conn.close()


def _handler(metrics: AgentMetrics, readiness: Readiness, socket_timeout: float) -> type:
    routes: dict[str, Callable[[], tuple[int, str, bytes]]] = {
        "/healthz": lambda: (200, "text/plain", b"ok\n"),
        "/readyz": lambda: _ready(readiness),
        "/metrics": lambda: (200, CONTENT_TYPE_LATEST, generate_latest(metrics.registry)),
    }

    class Handler(BaseHTTPRequestHandler):
        # Bounds each read and write: a client that stalls mid-request frees its worker.
        timeout = socket_timeout

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            route = routes.get(self.path.split("?", 1)[0])
            status, kind, body = route() if route else (404, "text/plain", b"not found\n")
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:  # probes every few seconds must not fill the log
            pass

    return Handler


def _ready(readiness: Readiness) -> tuple[int, str, bytes]:
    problems = readiness.problems()
    body = json.dumps({"ready": not problems, "problems": problems}).encode() + b"\n"
    return (200 if not problems else 503), "application/json", body
