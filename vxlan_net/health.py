"""`--healthz-addr`: /healthz, /readyz and Prometheus /metrics, served from a thread."""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

log = logging.getLogger(__name__)


class AgentMetrics:
    """The agent's Prometheus metrics, in a registry of their own (no process-global state)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.leases_known = Gauge("vxlan_net_leases_known", "Valid subnet leases in etcd, ours included",
                                  registry=self.registry)
        self.peers_programmed = Gauge("vxlan_net_peers_programmed",
                                      "Remote nodes whose entries the last successful reconcile programmed",
                                      registry=self.registry)
        self.reconcile_duration = Histogram("vxlan_net_reconcile_duration_seconds",
                                            "Time of one reconcile pass (kernel read, diff, apply)",
                                            buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5),
                                            registry=self.registry)
        self.reconcile_errors = Counter("vxlan_net_reconcile_errors", "Reconcile passes that failed",
                                        registry=self.registry)
        self.watch_restarts = Counter("vxlan_net_etcd_watch_restarts", "Times the etcd lease watch was re-created",
                                      registry=self.registry)
        self.invalid_leases = Counter("vxlan_net_invalid_leases_skipped",
                                      "Lease records skipped as invalid (counted once per bad value)",
                                      registry=self.registry)
        self.lease_expiry = Gauge("vxlan_net_lease_expiry_seconds", "Seconds until our subnet lease expires",
                                  registry=self.registry)
        self.fault_active = Gauge("vxlan_net_fault_active",
                                  "1 while a transient fault of this kind lasts (the agent keeps running and retries)",
                                  ["kind"], registry=self.registry)
        self.fault_failures = Counter("vxlan_net_fault_failures", "Failed attempts, by fault kind",
                                      ["kind"], registry=self.registry)


@dataclasses.dataclass
class Readiness:
    """What /readyz needs to know; the agent updates it as it goes."""

    resync_interval: float
    lease_held: bool = False
    subnet_file_written: bool = False
    last_reconcile_ok: bool = False
    last_reconcile_at: Optional[float] = None  # time.monotonic()
    faults: dict[str, str] = dataclasses.field(default_factory=dict)
    """Transient faults lasting now: kind -> the last error (vxlan_net.faults keeps it)."""

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


def parse_listen_address(value: str) -> tuple[str, int]:
    """`HOST:PORT` (or `:PORT` for all addresses); ValueError with a reason otherwise."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r} is not HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


class HealthServer:
    """A small threaded HTTP server; `close()` stops it."""

    def __init__(self, address: tuple[str, int], metrics: AgentMetrics, readiness: Readiness):
        handler = _handler(metrics, readiness)
        self.httpd = ThreadingHTTPServer(address, handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="healthz", daemon=True)

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def start(self) -> "HealthServer":
        self.thread.start()
        log.info("serving /healthz, /readyz and /metrics on %s:%d", *self.httpd.server_address[:2])
        return self

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _handler(metrics: AgentMetrics, readiness: Readiness) -> type:
    routes: dict[str, Callable[[], tuple[int, str, bytes]]] = {
        "/healthz": lambda: (200, "text/plain", b"ok\n"),
        "/readyz": lambda: _ready(readiness),
        "/metrics": lambda: (200, CONTENT_TYPE_LATEST, generate_latest(metrics.registry)),
    }

    class Handler(BaseHTTPRequestHandler):
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
