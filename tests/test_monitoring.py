"""examples/monitoring/: the alert rules pass promtool (check and unit tests) and every metric the
dashboard and the rules name is one the agent exports. The live proof is integration/test_monitoring.py."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from vxlan_net.agent.health import AgentMetrics

MONITORING = Path(__file__).resolve().parents[1] / "examples" / "monitoring"
RULES = MONITORING / "vxlan-net-alerts.yaml"
RULE_TESTS = MONITORING / "vxlan-net-alerts.test.yaml"
DASHBOARD = MONITORING / "vxlan-net-dashboard.json"
SCRAPE = MONITORING / "prometheus-scrape.yaml"
SUFFIXES = ("_total", "_bucket", "_count", "_sum", "_created")
ALERTS = {"VxlanNetAgentDown", "VxlanNetAgentNotReady", "VxlanNetEtcdUnreachable", "VxlanNetLeaseExpiring",
          "VxlanNetReconcileFailing", "VxlanNetSkippedRecords", "VxlanNetFaultLasting"}


def promtool(*args: str, cwd: Path = MONITORING) -> subprocess.CompletedProcess:
    tool = shutil.which("promtool")
    assert tool, "promtool missing: apt-get install prometheus (make setup does)"
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def rule_expressions() -> dict[str, str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["alert"]: rule["expr"] for group in groups for rule in group["rules"]}


def dashboard_expressions() -> list[str]:
    """Every PromQL expression of the dashboard: panel targets, annotations, template queries."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [a["expr"] for a in dashboard["annotations"]["list"] if "expr" in a]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"]
            exprs.append(re.fullmatch(r"label_values\((.+), \w+\)", query).group(1))
    return exprs


def exported_metric_names() -> set[str]:
    return {metric.name for metric in AgentMetrics().registry.collect()}


def test_promtool_rejects_a_broken_rule(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("groups:\n  - name: x\n    rules:\n      - alert: Broken\n        expr: rate(vxlan_net_ready[5m]\n")
    proc = promtool("check", "rules", str(bad))
    assert proc.returncode != 0 and "Broken" in proc.stdout + proc.stderr


def test_promtool_checks_the_example_config_and_it_loads_the_rules_for_job_vxlan_net():
    proc = promtool("check", "config", str(SCRAPE))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    config = yaml.safe_load(SCRAPE.read_text())
    assert config["rule_files"] == [RULES.name]
    assert [job["job_name"] for job in config["scrape_configs"]] == ["vxlan-net"]


def test_promtool_checks_the_rules():
    proc = promtool("check", "rules", str(RULES))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in proc.stdout


def test_promtool_unit_tests_of_the_rules_pass_and_cover_every_alert():
    proc = promtool("test", "rules", str(RULE_TESTS))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert set(rule_expressions()) == ALERTS
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fired = {case["alertname"] for t in tests for case in t["alert_rule_test"] if case.get("exp_alerts")}
    quiet = {case["alertname"] for t in tests for case in t["alert_rule_test"] if not case.get("exp_alerts")}
    assert fired == ALERTS and quiet == ALERTS, "each alert must be shown to fire and to stay quiet"


def test_a_rule_test_that_expects_the_wrong_alert_fails(tmp_path):
    shutil.copy(RULES, tmp_path / RULES.name)
    text = RULE_TESTS.read_text().replace("{eval_time: 3m, alertname: VxlanNetAgentDown, exp_alerts: []}",
                                          "{eval_time: 5m, alertname: VxlanNetAgentDown, exp_alerts: []}")
    (tmp_path / RULE_TESTS.name).write_text(text)
    assert promtool("test", "rules", RULE_TESTS.name, cwd=tmp_path).returncode != 0


@pytest.mark.parametrize("source", ["rules", "dashboard"])
def test_every_metric_named_is_one_the_agent_exports(source):
    exprs = list(rule_expressions().values()) if source == "rules" else dashboard_expressions()
    exported = exported_metric_names()
    named = {re.sub("(" + "|".join(SUFFIXES) + ")$", "", name)
             for expr in exprs for name in re.findall(r"\bvxlan_net_\w+", expr)}
    assert named and named <= exported, named - exported


def test_the_dashboard_shows_what_the_issue_lists():
    text = " ".join(dashboard_expressions())
    for metric in ("vxlan_net_peers_programmed", "vxlan_net_reconcile_duration_seconds_count",
                   "vxlan_net_reconcile_errors_total", "vxlan_net_reconcile_duration_seconds_bucket",
                   "vxlan_net_lease_expiry_seconds", "vxlan_net_etcd_reachable",
                   "vxlan_net_invalid_leases_skipped_total", "vxlan_net_etcd_watch_restarts_total",
                   "vxlan_net_fault_active", "vxlan_net_ready"):
        assert metric in text, metric
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
