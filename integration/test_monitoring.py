"""examples/monitoring/ against the real thing: Debian's Prometheus scraping live agents in the lab.

Prometheus runs in the lab's outside namespace with the alert rules as shipped (only the scrape and
evaluation intervals are short); every expression of the dashboard and of the rules returns data
through the query API, and cutting one agent off from etcd makes its alerts go pending.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from urllib.parse import quote

import pytest
import yaml

from integration.cluster import VTEP, http_get, running_cluster
from integration.lab import Lab, _stop_process
from integration.test_agent_outages import etcd_blackholed
from tests.test_monitoring import RULES, SCRAPE, dashboard_expressions, rule_expressions

pytestmark = pytest.mark.lab

HEALTH_PORT = 9473
PROMETHEUS_PORT = 9090
COMPARISON = re.compile(r"\s(==|!=|<=|>=|<|>)\s")


def sides(expr: str) -> list[str]:
    """`signal <op> threshold` -> [signal, threshold]: split at the comparison outside brackets and quotes."""
    for match in COMPARISON.finditer(expr):
        before = expr[:match.start()]
        if before.count('"') % 2 == 0 and all(before.count(o) == before.count(c) for o, c in ("()", "[]", "{}")):
            return [before.strip(), expr[match.end():].strip()]
    raise AssertionError(f"no top-level comparison in {expr!r}")


def test_sides_split_only_the_outer_comparison():
    assert sides('up{job="a"} == 0') == ['up{job="a"}', "0"]
    assert sides("a < 0.5 * max_over_time(a[1d])") == ["a", "0.5 * max_over_time(a[1d])"]
    assert sides('x{l=~"a > b"} > (y > 1)') == ['x{l=~"a > b"}', "(y > 1)"]
    with pytest.raises(AssertionError):
        sides("rate(x[5m])")


class Prometheus:
    """Debian's prometheus server in one lab namespace: examples/monitoring/'s config, scraping `targets`."""

    def __init__(self, lab: Lab, host, targets: list[str], interval: str = "1s"):
        binary = shutil.which("prometheus")
        assert binary, "prometheus missing: apt-get install prometheus (make setup does)"
        self.host = host
        self.dir = lab.workdir / "prometheus"
        self.dir.mkdir()
        shutil.copy(RULES, self.dir / RULES.name)
        config = yaml.safe_load(SCRAPE.read_text())  # the example, with the lab's agents and short intervals
        config["global"] = {"scrape_interval": interval, "evaluation_interval": interval, "scrape_timeout": interval}
        (job,) = config["scrape_configs"]
        job.pop("scrape_interval", None)
        job["static_configs"] = [{"targets": targets}]
        (self.dir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.url = f"http://{host.public_ip}:{PROMETHEUS_PORT}"
        self.log = open(self.dir / "prometheus.log", "wb")
        self.proc = host.popen(binary, f"--config.file={self.dir / 'prometheus.yml'}",
                               f"--storage.tsdb.path={self.dir / 'data'}",
                               f"--web.listen-address={host.public_ip}:{PROMETHEUS_PORT}",
                               stdout=self.log, stderr=self.log)
        lab.wait_for(lambda: self._ready(), timeout=30, message=f"prometheus not ready: {self.log_tail()}")

    def _ready(self) -> bool:
        assert self.proc.poll() is None, f"prometheus exited: {self.log_tail()}"
        try:
            return http_get(self.host, self.url + "/-/ready")[0] == 200
        except Exception:  # noqa: BLE001 - not listening yet
            return False

    def api(self, path: str) -> dict:
        status, body = http_get(self.host, self.url + path)
        answer = json.loads(body)
        assert status == 200 and answer["status"] == "success", (path, status, body[:500])
        return answer["data"]

    def query(self, expr: str) -> list:
        """The instant vector (or [scalar]) `expr` evaluates to now."""
        data = self.api("/api/v1/query?query=" + quote(expr))
        return data["result"] if data["resultType"] == "vector" else [data["result"]]

    def alerts(self, state: str) -> set[tuple[str, str]]:
        """(alertname, instance) of the alerts in `state` (pending or firing)."""
        alerts = self.api("/api/v1/alerts")["alerts"]
        return {(a["labels"]["alertname"], a["labels"].get("instance", "")) for a in alerts if a["state"] == state}

    def log_tail(self) -> str:
        return (self.dir / "prometheus.log").read_text(errors="replace")[-2000:]

    def close(self) -> None:
        _stop_process(self.proc)
        self.log.close()


def test_dashboard_and_alert_expressions_return_data_and_an_agent_cut_off_from_etcd_alerts(lab):
    lab = lab(nodes=2)
    cut, other = lab.nodes
    # A 15 s lease renews every 5 s: the cut-off agent misses a renewal within seconds.
    running_cluster(lab, "--resync-interval", "1", "--subnet-lease-ttl", "15",
                    "--healthz-addr", f"0.0.0.0:{HEALTH_PORT}")
    instances = {node: f"{node.public_ip}:{HEALTH_PORT}" for node in lab.nodes}
    prometheus = Prometheus(lab, lab.outside, sorted(instances.values()))
    try:
        def up_everywhere() -> bool:
            return {r["metric"]["instance"] for r in prometheus.query('up{job="vxlan-net"} == 1')} == set(
                instances.values())

        lab.wait_for(up_everywhere, timeout=20, message="prometheus does not scrape both agents")
        # What makes the event-driven series exist, once scraped: a skipped record, a failed reconcile.
        lab.etcdctl("put", "/vxlan-net/subnets/198.19.250.0-24", "not a lease record")
        cut.run("ip", "link", "del", VTEP, check=True)
        lab.wait_for(lambda: cut.has_link(VTEP), timeout=10, message="the agent did not recreate its VTEP")
        expressions = [e.replace("$instance", ".+") for e in dashboard_expressions()]
        for expr in rule_expressions().values():
            expressions += [side for side in sides(expr) if not re.fullmatch(r"[\d.]+", side)]
        assert len(expressions) >= 20
        empty: list[str] = []

        def all_answer() -> bool:
            empty[:] = [expr for expr in expressions if not prometheus.query(expr)]
            return not empty

        try:
            lab.wait_for(all_answer, timeout=30, interval=1)
        except TimeoutError:
            raise AssertionError(f"no data through the query API for {empty}") from None
        assert prometheus.alerts("firing") >= {("VxlanNetSkippedRecords", i) for i in instances.values()}
        assert ("VxlanNetReconcileFailing", instances[cut]) in prometheus.alerts("pending")  # the deleted VTEP
        assert not {a for a in prometheus.alerts("pending") | prometheus.alerts("firing")
                    if a[0] in ("VxlanNetEtcdUnreachable", "VxlanNetLeaseExpiring", "VxlanNetAgentDown",
                                "VxlanNetAgentNotReady")}
        for metric in ("vxlan_net_etcd_reachable", "vxlan_net_ready"):  # /readyz answers 200 on both
            values = {r["metric"]["instance"]: r["value"][1] for r in prometheus.query(metric)}
            assert values == {i: "1" for i in instances.values()}, metric

        with etcd_blackholed(lab, cut.public_ip):
            expected = {("VxlanNetEtcdUnreachable", instances[cut]), ("VxlanNetLeaseExpiring", instances[cut])}
            lab.wait_for(lambda: prometheus.alerts("pending") >= expected, timeout=30, interval=1,
                         message=f"{sorted(expected)} did not go pending")
            quiet = {a for a in prometheus.alerts("pending") | prometheus.alerts("firing")
                     if a[1] == instances[other] and a[0] != "VxlanNetSkippedRecords"}
            assert not quiet, f"the agent that still reaches etcd alerts too: {quiet}"
        assert cut.agent.alive() and other.agent.alive()
    finally:
        prometheus.close()


def test_no_prometheus_listens_in_the_root_namespace():
    """Debian starts the packaged server (and its node exporter) as services; make setup stops them."""
    listening = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, timeout=10, check=True).stdout
    assert not [line for line in listening.splitlines() if "prometheus" in line], listening
