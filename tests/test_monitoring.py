"""The monitoring files, checked with the real tools: the alerting rules with promtool (their
syntax, and their unit tests in alerts_test.yml), and every query of the Grafana dashboard naming
only metrics that one of the engines exports."""
from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import yaml

from handlers.serving.metrics import METRICS
from handlers.serving.kserve.metrics import QUEUE
from handlers.tools.sources import ROOT

MONITORING = ROOT / "scripts" / "deploy" / "monitoring"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "explainable-similarity.json"
PROMQL_WORDS = {"sum", "rate", "increase", "histogram_quantile", "max", "min", "count", "avg", "or", "and", "unless",
                "offset", "bool", "by", "without"}


def promtool(*args: str) -> subprocess.CompletedProcess:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.skip("promtool is not installed (Debian's prometheus package: scripts/deploy/monitoring/install_prometheus.sh)")
    return subprocess.run([binary, *args], cwd=MONITORING, capture_output=True, text=True, timeout=120)


def test_alerting_rules_are_valid():
    checked = promtool("check", "rules", "alerts.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    rules = [rule["alert"] for group in yaml.safe_load((MONITORING / "alerts.yml").read_text())["groups"]
             for rule in group["rules"]]
    assert {"PredictionLatencyP99High", "ExplanationLatencyP99High", "ExplanationsIncomplete", "IjNotConvergedShareHigh",
            "RequestsRefused", "WorkerRestarted"} <= set(rules)


def test_alerting_rules_pass_their_unit_tests():
    tested = promtool("test", "rules", "alerts_test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr
    tests = yaml.safe_load((MONITORING / "alerts_test.yml").read_text())["tests"]
    rules = {rule["alert"] for group in yaml.safe_load((MONITORING / "alerts.yml").read_text())["groups"]
             for rule in group["rules"]}
    tested_rules = {case["alertname"] for test in tests for case in test["alert_rule_test"] if case["exp_alerts"]}
    assert tested_rules == rules  # every rule is seen firing in a test


def exported_metrics() -> set[str]:
    """What /metrics of either engine can hold: the handlers' metrics (both engines), KServe's
    model server's queue, and TorchServe's own (metrics.yaml)."""
    names = set()
    for spec in (*METRICS, QUEUE):
        names |= {spec.name, f"{spec.name}_bucket", f"{spec.name}_sum", f"{spec.name}_count"}
    config = yaml.safe_load((ROOT / "metrics.yaml").read_text())
    for section in ("ts_metrics", "model_metrics"):
        for metrics in (config.get(section) or {}).values():
            names |= {metric["name"] for metric in metrics}
    return names


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (label matchers, ranges and groupings dropped)."""
    bare = re.sub(r'"[^"]*"', '""', expr)  # label values first: they may hold braces (${model})
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", bare)
    bare = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", " ", bare)
    names = set()
    for match in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", bare):
        following = bare[match.end():].lstrip()[:1]
        if following != "(" and match.group() not in PROMQL_WORDS:
            names.add(match.group())
    return names


def test_every_dashboard_query_names_exported_metrics():
    def panels(items):
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    exported = exported_metrics()
    queries = [target["expr"] for panel in panels(json.loads(DASHBOARD.read_text())["panels"])
               for target in panel.get("targets", [])]
    assert queries
    for expr in queries:
        names = metric_names(expr)
        assert names and names <= exported, (expr, names - exported)
    assert metric_names('sum by (le) (rate(x_bucket{a="b"}[5m])) / max(QueueTime) / 1e6') == {"x_bucket", "QueueTime"}
