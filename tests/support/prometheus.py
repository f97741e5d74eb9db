"""A real Prometheus in the tests: the binary (Debian's package), PromQL queries, scrapes awaited
as events, and the Grafana dashboard's queries with its variables filled in."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections import Counter

import pytest
import requests

from handlers.serving.metrics import COMPLETENESS, CONVERGED, NODES, REQUESTS
from handlers.tools.sources import ROOT

MONITORING = ROOT / "scripts" / "deploy" / "monitoring"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "explainable-similarity.json"
MODEL = "minilm"
SCRAPE_INTERVAL_S = 1
RATE_WINDOW = "1m"  # what Grafana puts for $__rate_interval; covers the whole test's traffic

def prometheus_binary() -> str:
    binary = shutil.which("prometheus")
    if binary is None:
        if os.geteuid() != 0:
            pytest.skip("prometheus is not installed; run scripts/deploy/monitoring/install_prometheus.sh as root")
        subprocess.run([str(MONITORING / "install_prometheus.sh")], check=True)
        binary = shutil.which("prometheus")
    assert binary, "installing Debian's prometheus package did not put prometheus on PATH"
    return binary


def query(url: str, expr: str) -> list[dict]:
    reply = requests.get(f"{url}/api/v1/query", params={"query": expr}, timeout=30).json()
    assert reply["status"] == "success", (expr, reply)
    return reply["data"]["result"]


def wait_for_scrape_after(url: str, moment: float, timeout: float = 30, job: str = "torchserve") -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = query(url, f'timestamp(up{{job="{job}"}} == 1)')
        if result and float(result[0]["value"][1]) > moment:
            return
        assert time.monotonic() < deadline, f"Prometheus did not scrape {job}"
        time.sleep(0.2)


def request_counts(url: str) -> Counter:
    expr = f'sum by (kind, method, status) ({REQUESTS.name}{{model_name="{MODEL}"}})'
    return Counter({
        (r["metric"]["kind"], r["metric"]["method"], r["metric"]["status"]): float(r["value"][1])
        for r in query(url, expr)
    })


def wait_for_counts(url: str, expected_total: float, timeout: float = 60) -> Counter:
    deadline = time.monotonic() + timeout
    while True:
        counts = request_counts(url)
        if sum(counts.values()) >= expected_total or time.monotonic() > deadline:
            return counts
        time.sleep(0.5)


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of the dashboard, with Grafana's variables filled in."""
    def panels(items):
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    dashboard = json.loads(DASHBOARD.read_text())
    out = []
    for panel in panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$__rate_interval", RATE_WINDOW)
            out.append((panel["title"], re.sub(r"\$\{model\}|\$model\b", MODEL, expr)))
    return out


#: per-explanation metrics, and the answer fields whose presence says an explanation fed them
ANSWER_METRICS = (
    (COMPLETENESS, ("attribution_error", "conservation_error")), (NODES, ("steps",)), (CONVERGED, ("converged",)),
)


def expected_empty(expr: str, explanations: list[dict]) -> bool:
    """A query on a per-answer-field metric has no data when no answer carried that field."""
    return any(
        spec.name in expr and not any(f in e for e in explanations for f in fields) for spec, fields in ANSWER_METRICS
    )
