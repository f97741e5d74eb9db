"""The capacity planner (``siamese-capacity``): its model on known figures, the measured figures it
ships, its manifests against KServe's API models, and its refusals (exit status 2)."""
from __future__ import annotations

import json
import math

import pytest
import yaml

from handlers.tools import capacity
from handlers.tools.deploy import schema

FIGURES = {
    "devices": {"cpu": {
        "measured": "2026-01-01", "machine": "test", "load": "none",
        "predictor": {"cpu": 1, "rss_mib": 800, "levels": [
            {"concurrency": 1, "pairs_per_s": 50.0, "p99_ms": 30.0},
            {"concurrency": 4, "pairs_per_s": 120.0, "p99_ms": 60.0},
            {"concurrency": 16, "pairs_per_s": 150.0, "p99_ms": 200.0},
        ]},
        "explainer": {"cpu": 1, "rss_mib": 900, "memory_budget_mib": 1024,
                      "seconds": {"ij": 2.0, "gae": 0.1, "lrp": 0.2}, "p99_seconds": {"ij": 3.0, "gae": 0.2, "lrp": 0.3}},
    }},
}


@pytest.fixture
def run_cli(capsys):
    """``siamese-capacity`` in this process: (exit status, stdout, stderr)."""
    def run(*argv: str) -> tuple[int, str, str]:
        try:
            status = capacity.main(list(argv))
        except SystemExit as exit_:
            status = exit_.code
        out, err = capsys.readouterr()
        return status, out, err
    return run


def test_the_predictor_takes_the_most_throughput_within_the_p99():
    plan = capacity.plan(1000, {}, p99_ms=100, figures=FIGURES).predictor
    assert plan.container_concurrency == 4 and plan.autoscaling["scaleTarget"] == 4  # 16 in flight misses 100 ms
    assert plan.replicas == math.ceil(1000 / (capacity.UTILIZATION * 120))
    assert plan.autoscaling["minReplicas"] == plan.replicas and plan.autoscaling["maxReplicas"] == 2 * plan.replicas
    assert plan.expected["capacity_pairs_per_s"] * capacity.UTILIZATION >= 1000  # the rate fits at the target utilization
    unbounded = capacity.plan(1000, {}, figures=FIGURES).predictor
    assert unbounded.container_concurrency == 16 and unbounded.replicas < plan.replicas
    assert capacity.plan(0, {}, figures=FIGURES).predictor.replicas == 1


def test_replicas_grow_with_the_rate_and_never_leave_it_uncovered():
    previous = 0
    for rate in range(0, 5001, 250):
        plan = capacity.plan(rate, {}, p99_ms=100, figures=FIGURES).predictor
        assert plan.replicas >= previous
        assert plan.replicas * capacity.UTILIZATION * 120 >= rate
        assert plan.replicas == 1 or (plan.replicas - 1) * capacity.UTILIZATION * 120 < rate  # no more than needed
        previous = plan.replicas


def test_the_explainer_covers_the_busy_seconds_of_every_method():
    plan = capacity.plan(0, {"ij": 2, "lrp": 5}, figures=FIGURES).explainer
    busy = 2 * 2.0 + 5 * 0.2
    assert plan.expected["busy_processes"] == pytest.approx(busy)
    assert plan.replicas == math.ceil(busy / capacity.UTILIZATION)
    assert plan.expected["utilization"] <= capacity.UTILIZATION
    assert plan.memory == f"{math.ceil((900 + 1024) * capacity.HEADROOM / 256) * 256}Mi"
    assert capacity.plan(0, {}, figures=FIGURES).explainer.replicas == 1


def test_the_shipped_figures_are_measured_and_dated():
    figures = capacity.load_figures()
    cpu = figures["devices"]["cpu"]
    assert "command" in figures and {"measured", "machine", "load"} <= set(cpu)
    levels = cpu["predictor"]["levels"]
    assert [level["concurrency"] for level in levels] == sorted(level["concurrency"] for level in levels)
    assert all(level["pairs_per_s"] > 0 and level["p99_ms"] > 0 for level in levels)
    assert set(cpu["explainer"]["seconds"]) == set(capacity.METHODS) and all(s > 0 for s in cpu["explainer"]["seconds"].values())
    plan = capacity.plan(100, {"ij": 1}, p99_ms=max(level["p99_ms"] for level in levels))
    assert plan.predictor.replicas >= 1 and plan.explainer.replicas >= 1


def test_the_command_prints_json_and_writes_manifests_kserve_accepts(run_cli, tmp_path):
    out = tmp_path / "manifests"
    figures = tmp_path / "figures.json"
    figures.write_text(json.dumps(FIGURES))
    status, stdout, stderr = run_cli("--pairs-per-s", "1000", "--explanations-per-s", "ij=2", "lrp=5", "--p99-ms", "100",
                                     "--figures", str(figures), "--json", "--write", str(out))
    assert status == 0, stderr
    answer = json.loads(stdout)
    assert answer["predictor"]["replicas"] == 12 and answer["explainer"]["replicas"] == 8
    paths = sorted(out.glob("*.yaml"))
    assert paths and all(schema.check_file(path) == [] for path in paths)
    service = yaml.safe_load(next(p for p in paths if p.name.endswith("-v1.yaml")).read_text())
    predictor, explainer = service["spec"]["predictor"], service["spec"]["explainer"]
    assert (predictor["minReplicas"], predictor["maxReplicas"], predictor["scaleTarget"], predictor["containerConcurrency"]) == (12, 24, 4, 4)
    assert predictor["model"]["resources"]["limits"] == {"cpu": "1", "memory": answer["predictor"]["memory"]}
    assert (explainer["minReplicas"], explainer["scaleTarget"], explainer["containerConcurrency"]) == (8, 1, 2)


@pytest.mark.parametrize("argv, named", [
    (["--pairs-per-s", "-5"], "--pairs-per-s"),
    (["--pairs-per-s", "nan"], "--pairs-per-s"),
    (["--pairs-per-s", "10", "--explanations-per-s", "shap=1"], "unknown method"),
    (["--pairs-per-s", "10", "--explanations-per-s", "ij"], "METHOD=RATE"),
    (["--pairs-per-s", "10", "--explanations-per-s", "ij=-1"], "--explanations-per-s"),
    (["--pairs-per-s", "10", "--explanations-per-s", "ij=1", "ij=2"], "given twice"),
    (["--pairs-per-s", "10", "--p99-ms", "0"], "--p99-ms"),
    (["--pairs-per-s", "10", "--p99-ms", "1"], "below the fastest measured p99"),
    (["--pairs-per-s", "10", "--device", "tpu"], "--device"),
])
def test_bad_input_is_an_error_naming_it_with_exit_status_2(run_cli, argv, named, tmp_path):
    figures = tmp_path / "figures.json"
    figures.write_text(json.dumps(FIGURES))
    status, _, stderr = run_cli(*argv, "--figures", str(figures))
    assert status == 2 and named in stderr, stderr


def test_a_device_without_measured_figures_is_refused(run_cli, tmp_path):
    figures = tmp_path / "figures.json"
    figures.write_text(json.dumps(FIGURES))
    status, _, stderr = run_cli("--pairs-per-s", "10", "--device", "gpu", "--figures", str(figures))
    assert status == 2 and "--device gpu: no measured figures" in stderr


def test_the_table_covers_100_to_10000_pairs_and_1_to_100_explanations(run_cli, tmp_path):
    figures = tmp_path / "figures.json"
    figures.write_text(json.dumps(FIGURES))
    status, stdout, _ = run_cli("--table", "--p99-ms", "100", "--figures", str(figures))
    assert status == 0
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in stdout.splitlines()
            if line.startswith("| ") and "---" not in line}
    assert rows["pairs/s"] == ["100", "300", "1,000", "3,000", "10,000"]
    assert [int(c) for c in rows["replicas"]] == [capacity.plan(r, {}, 100, figures=FIGURES).predictor.replicas
                                                  for r in capacity.PAIR_RATES]
    assert rows["explanations/s"] == ["1", "3", "10", "30", "100"]
    ij = [int(c) for c in rows["ij (2 s each)"]]
    assert ij == [math.ceil(r * 2.0 / capacity.UTILIZATION) for r in capacity.EXPLANATION_RATES]
