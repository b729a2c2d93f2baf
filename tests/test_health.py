"""Readiness rules, the metrics endpoint and JSON log lines (no root, loopback only)."""

import json
import logging
import os
import resource
import socket
import threading
import time
import urllib.request

import pytest

from vxlan_net.agent.health import AgentMetrics, HealthServer, Readiness
from vxlan_net.tools.cli import parse_listen_address
from vxlan_net.tools.logs import JsonFormatter


def test_ready_only_with_lease_file_and_a_recent_successful_reconcile():
    ready = Readiness(resync_interval=30)
    assert set(ready.problems(now=100)) == {"no subnet lease held", "subnet file not written", "no reconcile yet"}
    ready.lease_held = ready.subnet_file_written = True
    ready.last_reconcile_ok, ready.last_reconcile_at = True, 90
    assert ready.problems(now=100) == []
    assert ready.problems(now=151) == ["last successful reconcile 61s ago"]
    ready.last_reconcile_ok = False
    assert ready.problems(now=100) == ["last reconcile failed"]


@pytest.mark.parametrize("value, expected", [("127.0.0.1:9180", ("127.0.0.1", 9180)), (":80", ("0.0.0.0", 80)),
                                             ("[::1]:9", ("::1", 9))])
def test_listen_address_parsing(value, expected):
    assert parse_listen_address(value) == expected


@pytest.mark.parametrize("value", ["9180", "host:", "host:70000", "host:x"])
def test_bad_listen_address_is_refused(value):
    with pytest.raises(ValueError):
        parse_listen_address(value)


def test_server_answers_probes_and_exposes_metrics():
    metrics, ready = AgentMetrics(), Readiness(resync_interval=30)
    metrics.peers_programmed.set(7)
    server = HealthServer(("127.0.0.1", 0), metrics, ready).start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        assert urllib.request.urlopen(base + "/healthz", timeout=3).status == 200
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(base + "/readyz", timeout=3)
        assert refused.value.code == 503 and not json.loads(refused.value.read())["ready"]
        body = urllib.request.urlopen(base + "/metrics", timeout=3).read().decode()
        assert "vxlan_net_peers_programmed 7.0" in body
    finally:
        server.close()


def test_json_log_line_has_stable_keys_and_extras():
    record = logging.LogRecord("vxlan_net.agent.loop", logging.WARNING, __file__, 1, "peer %s gone", ("x",), None)
    record.subnet = "198.19.3.0/24"
    doc = json.loads(JsonFormatter().format(record))
    assert doc["level"] == "warning" and doc["logger"] == "vxlan_net.agent.loop" and doc["message"] == "peer x gone"
    assert doc["subnet"] == "198.19.3.0/24" and doc["time"].endswith("Z")


# --- hostile clients ------------------------------------------------------------------


IDLE_CLIENTS = 1000
MAX_EXTRA_THREADS = 8  # the accept loop and its small worker pool; never one thread per connection


@pytest.fixture
def enough_file_descriptors():
    """Client and server ends of 1,000 sockets live in this process: raise the soft limit (bounded)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 2 * IDLE_CLIENTS + 256
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.fail(f"RLIMIT_NOFILE hard limit {hard} < {wanted}: cannot open {IDLE_CLIENTS} connections")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _get_healthz(port: int) -> tuple[int, float]:
    started = time.monotonic()
    status = urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5).status
    return status, time.monotonic() - started


def test_a_thousand_idle_connections_neither_block_healthz_nor_cost_threads(enough_file_descriptors):
    threads_before = threading.active_count()
    server = HealthServer(("127.0.0.1", 0), AgentMetrics(), Readiness(resync_interval=30)).start()
    idle = []
    try:
        for _ in range(IDLE_CLIENTS):
            idle.append(socket.create_connection(("127.0.0.1", server.port), timeout=5))
        time.sleep(0.5)  # let the server accept what it will
        status, took = _get_healthz(server.port)
        assert status == 200 and took <= 1.0, f"/healthz took {took:.2f}s behind {IDLE_CLIENTS} idle connections"
        threads = threading.active_count() - threads_before
        assert threads <= MAX_EXTRA_THREADS, f"{threads} threads for {IDLE_CLIENTS} idle connections"
        tasks = len(os.listdir("/proc/self/task"))
        assert tasks <= threads_before + MAX_EXTRA_THREADS + 1, f"{tasks} kernel tasks"
    finally:
        for sock in idle:
            sock.close()
        server.close()


def test_an_idle_connection_is_closed_after_the_timeout_and_a_slow_request_too():
    server = HealthServer(("127.0.0.1", 0), AgentMetrics(), Readiness(resync_interval=30), idle_timeout=0.5).start()
    try:
        silent = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        slow = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        slow.sendall(b"GET /healthz HTTP/1.1\r\n")  # and never the end of the headers
        started = time.monotonic()
        assert silent.recv(1) == b"" and slow.recv(1) == b"", "the server kept a connection that sends nothing"
        assert time.monotonic() - started < 4, "idle connections were not closed within a few timeouts"
        assert _get_healthz(server.port)[0] == 200
    finally:
        silent.close()
        slow.close()
        server.close()


def test_a_request_trickling_in_byte_by_byte_is_cut_off():
    server = HealthServer(("127.0.0.1", 0), AgentMetrics(), Readiness(resync_interval=30), idle_timeout=0.5).start()
    trickle = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    try:
        started = time.monotonic()
        with pytest.raises(OSError):
            for byte in b"GET /healthz HTTP/1.0\r\nX-Slow: " + b"a" * 100:  # 100 bytes at 0.1 s: 10 s if unbounded
                trickle.sendall(bytes([byte]))
                time.sleep(0.1)
        assert time.monotonic() - started < 5
    finally:
        trickle.close()
        server.close()


def test_close_stops_every_thread_it_started_without_waiting_for_a_stalled_client():
    threads_before = threading.active_count()
    server = HealthServer(("127.0.0.1", 0), AgentMetrics(), Readiness(resync_interval=30)).start()
    assert _get_healthz(server.port)[0] == 200
    stalled = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    try:
        stalled.sendall(b"GET /healthz HTTP/1.0\r\n")  # a worker now waits for the rest (up to 5 s)
        time.sleep(0.3)
        started = time.monotonic()
        server.close()
        assert time.monotonic() - started < 2, "close() waited for a stalled client"
    finally:
        stalled.close()
    assert threading.active_count() == threads_before
