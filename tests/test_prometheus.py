"""A real Prometheus (Debian's package) scrapes a real TorchServe: every query of the Grafana
dashboard returns data, and the request counts Prometheus holds match the requests sent."""
from __future__ import annotations

import math
import time
from urllib.parse import urlparse

import pytest
import requests
import yaml

from handlers.serving.metrics import METRICS, TOKENS
from handlers.tools import traffic
from handlers.tools.local.prometheus import LocalPrometheus
from handlers.tools.sources import ROOT
from tests.support.http import headers_of
from tests.support.prometheus import (
    MODEL, SCRAPE_INTERVAL_S, dashboard_queries, expected_empty, prometheus_binary, query, request_counts,
    wait_for_counts, wait_for_scrape_after,
)

MONITORING = ROOT / "scripts" / "deploy" / "monitoring"

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory):
    """Prometheus on a free port, with the project's scrape config aimed at ``server``."""
    target = urlparse(server.metrics).netloc
    with LocalPrometheus(prometheus_binary(), target, tmp_path_factory.mktemp("prometheus"),
                         interval_s=SCRAPE_INTERVAL_S) as running:
        yield running.url



def test_dashboard_queries_return_data_and_counts_match(server, prometheus):
    wait_for_scrape_after(prometheus, time.time())
    baseline = request_counts(prometheus)

    sent = traffic.run(server.inference, MODEL, headers=headers_of(server))  # creates every series the mix touches
    wait_for_counts(prometheus, sum(baseline.values()) + sum(sent.requests.values()))
    sent.add(traffic.run(server.inference, MODEL, headers=headers_of(server)))  # increases inside the rate window
    total = sum(baseline.values()) + sum(sent.requests.values())
    counts = wait_for_counts(prometheus, total)

    assert counts - baseline == sent.requests
    assert sent.explanations, "no explanation method answered"
    tokens = query(prometheus, f'sum({TOKENS.name}_count{{model_name="{MODEL}"}})')
    assert float(tokens[0]["value"][1]) >= len(sent.explanations)

    queries = dashboard_queries()
    referenced = {spec.name for spec in METRICS if any(spec.name in expr for _, expr in queries)}
    assert referenced == {spec.name for spec in METRICS}, "a metric is missing from the dashboard"
    for title, expr in queries:
        values = [float(r["value"][1]) for r in query(prometheus, expr)]
        if expected_empty(expr, sent.explanations):
            assert values == [], (title, expr)
        else:
            assert any(math.isfinite(v) for v in values), (title, expr, values)


def test_prometheus_loads_the_alerting_rules(prometheus):
    """The project's prometheus.yml loads alerts.yml: the real Prometheus holds every rule."""
    groups = requests.get(f"{prometheus}/api/v1/rules", timeout=30).json()["data"]["groups"]
    loaded = {rule["name"] for group in groups for rule in group["rules"]}
    declared = {rule["alert"] for group in yaml.safe_load((MONITORING / "alerts.yml").read_text())["groups"]
                for rule in group["rules"]}
    assert loaded == declared
