"""Readiness rules, the metrics endpoint and JSON log lines (no root, loopback only)."""

import json
import logging
import urllib.request

import pytest

from vxlan_net.health import AgentMetrics, HealthServer, Readiness, parse_listen_address
from vxlan_net.logs import JsonFormatter


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
    record = logging.LogRecord("vxlan_net.agent", logging.WARNING, __file__, 1, "peer %s gone", ("x",), None)
    record.subnet = "198.19.3.0/24"
    doc = json.loads(JsonFormatter().format(record))
    assert doc["level"] == "warning" and doc["logger"] == "vxlan_net.agent" and doc["message"] == "peer x gone"
    assert doc["subnet"] == "198.19.3.0/24" and doc["time"].endswith("Z")
