"""Admission in-process: time budgets against the response timeout, a batch's share of it, and
the time rate learnt from what the worker measures."""
from __future__ import annotations

import time

import pytest
from pydantic import ValidationError

from handlers.attribution import method_of, options_for
from handlers.errors import OverBudget
from handlers.serving.admission import OBSERVED_WEIGHT, Admission
from handlers.serving.protocol import ExplainItem, PairItem
from handlers.serving.settings import ExplanationSettings, HandlerSettings, ModelConfig
from handlers.tools.sources import text_of_length
from tests.support.archives import build_test_archive


def test_time_budgets_must_be_below_the_response_timeout(tmp_path):
    """Reaching responseTimeout kills the worker: an archive whose budget reaches it is not built."""
    handler = HandlerSettings(explanation=ExplanationSettings(time_budget_s={"ij": 300.0}))
    with pytest.raises(ValidationError, match="responseTimeout"):
        ModelConfig(responseTimeout=120, handler=handler)
    with pytest.raises(SystemExit, match="responseTimeout"):  # ij's default budget is 60 s
        build_test_archive(tmp_path, "minilm", "too-short", "--response-timeout", "30")
    assert not list(tmp_path.glob("*.mar"))


def with_time_budget(method: str, seconds: float) -> HandlerSettings:
    return HandlerSettings(explanation=ExplanationSettings(time_budget_s={method: seconds}))


def test_a_batch_of_explanations_gets_half_the_response_timeout(minilm_shift):
    """At a fixed rate each explanation costs 40 s of a 100 s timeout: the first fits in half of
    it, the second is told to retry (503); predictions are never held back."""
    admission = Admission(minilm_shift, with_time_budget("ij", 45.0), response_timeout_s=100)
    item = ExplainItem(text_a="A man plays a guitar.", text_b="Music.", method="ij", layer=4, steps=10)
    ij = method_of(minilm_shift, "ij")
    lengths = tuple(minilm_shift.tokenize(item.all_texts()).lengths)
    work = ij.work(lengths, item.options(admission.settings))
    admission.seconds_per_unit["ij"] = 40.0 / work
    pair = PairItem(text_a="a", text_b="b")
    refusals = admission.check_batch([item, pair, item, pair])
    assert refusals[0].lengths == tuple(lengths) and refusals[1] is None and refusals[3] is None  # a plan, a prediction
    assert refusals[2].status == 503 and "retry" in refusals[2].message
    doubled = item.model_copy(update={"steps": 20})
    assert ij.work(lengths, doubled.options(admission.settings)) == 2 * work
    admission.seconds_per_unit["ij"] = 50.0 / work
    (refused,) = admission.check_batch([item])
    assert refused.status == 413 and refused.field == "steps" and "45 s" in refused.message


def test_the_time_rate_follows_what_the_worker_measures(minilm_shift):
    """A rate calibrated 1000x too slow (as under a start-up stampede) comes back towards the
    measured one with every observed batch, by the moving average's weight."""
    admission = Admission(minilm_shift, with_time_budget("gae", 20.0), response_timeout_s=100)
    pairs = [("A man plays a guitar.", "Music."), ("Cats sleep.", "A dog runs in the park.")]
    gae, options = method_of(minilm_shift, "gae"), options_for("gae", {})
    results = gae.attribute(pairs, options)
    lengths = [tuple(minilm_shift.tokenize(list(pair)).lengths) for pair in pairs]
    measured = results[0].elapsed_ms / 1000 / sum(gae.work(n, options) for n in lengths)
    admission.seconds_per_unit["gae"] = start = 1000 * measured
    admission.observe("gae", options, results)
    assert admission.seconds_per_unit["gae"] == pytest.approx(start + OBSERVED_WEIGHT * (measured - start))
    for _ in range(40):
        admission.observe("gae", options, results)
    assert admission.seconds_per_unit["gae"] == pytest.approx(measured, rel=0.05)
    admission.observe("gae", options, [])  # nothing answered, nothing learnt
    assert admission.seconds_per_unit["gae"] == pytest.approx(measured, rel=0.05)


def test_adaptive_ij_is_estimated_by_the_nodes_its_requests_take(minilm_shift):
    """Until a request is served at a layer and tolerance, adaptive ij is estimated at the typical
    node count; then at the nodes the requests took on each side (a moving average, per layer
    and tolerance), and the time rate is measured against the work they did, not the work expected."""
    admission = Admission(minilm_shift, with_time_budget("ij", 60.0), response_timeout_s=200)
    ij = method_of(minilm_shift, "ij")
    options, other = options_for("ij", {"tolerance": 0.0123}), options_for("ij", {"tolerance": 0.0124})
    typical = (ij.TYPICAL_ADAPTIVE_NODES, ij.TYPICAL_ADAPTIVE_NODES)
    assert ij.nodes_per_side(options) == ij.nodes_per_side(other) == typical
    results = ij.attribute([("A man plays a guitar in the park.", "Music.")], options)
    nodes_a, nodes_b = results[0].extras["nodes"]
    assert (nodes_b, nodes_a) != typical
    rate = results[0].elapsed_ms / 1000 / ij.work_done(results[0], options)
    admission.seconds_per_unit["ij"], admission.overhead_s["ij"] = rate, 0.0
    admission.observe("ij", options, results)
    assert ij.nodes_per_side(options) == (nodes_b, nodes_a)  # text_b is the shorter side
    assert ij.nodes_per_side(other) == typical
    assert admission.seconds_per_unit["ij"] == pytest.approx(rate)


def test_a_node_on_the_float64_copy_counts_at_its_cost(minilm_shift):
    """Adaptive ij's work done, and the nodes admission learns from it, count each node computed
    on the float64 copy (``float64_nodes``) as ``FLOAT64_NODE_COST`` of the model's own."""
    ij = method_of(minilm_shift, "ij")
    options = options_for("ij", {"tolerance": 0.0125})
    result = ij.attribute([("A man plays a guitar in the park.", "Music.")], options)[0]
    assert result.extras["float64_nodes"] == [0, 0]
    plain = ij.work_done(result, options)
    result.extras["float64_nodes"] = list(result.extras["nodes"])  # as if every node had run in float64
    assert ij.work_done(result, options) == pytest.approx(ij.FLOAT64_NODE_COST * plain)
    ij.observe(options, [result])
    nodes_a, nodes_b = result.extras["nodes"]
    assert ij.nodes_per_side(options) == (round(ij.FLOAT64_NODE_COST * nodes_b), round(ij.FLOAT64_NODE_COST * nodes_a))


def test_an_inflated_overhead_refuses_nothing_and_comes_down(minilm_shift):
    """A calibration taken while the workers start together can put the overhead of a call past a
    budget: small requests are still admitted (a refusal is about the request's work), and each
    observed call scales the whole line back towards the measured time."""
    admission = Admission(minilm_shift, with_time_budget("gae", 2.0), response_timeout_s=100)
    gae, options = method_of(minilm_shift, "gae"), options_for("gae", {})
    pair = ("A man plays a guitar.", "Music.")
    results = gae.attribute([pair], options)
    lengths = tuple(minilm_shift.tokenize(list(pair)).lengths)
    measured = results[0].elapsed_ms / 1000
    admission.seconds_per_unit["gae"] = measured / 2 / gae.work(lengths, options)
    admission.overhead_s["gae"] = 3.0
    assert admission.estimate("gae", options, lengths) > 2.0  # over the budget, and admitted
    for _ in range(40):
        admission.observe("gae", options, results)
    assert admission.estimate("gae", options, lengths) == pytest.approx(measured, rel=0.05)
    with pytest.raises(OverBudget):  # the work of a long pair at a rate 1000x too slow still is refused
        admission.seconds_per_unit["gae"] *= 1000 * 3.0 / measured
        admission.estimate("gae", options, (200, 200))


@pytest.mark.slow
def test_calibrated_estimates_hold_for_short_and_long_texts(minilm_shift):
    """The calibrated line (a call's overhead plus rate × work) against the measured time of gae
    and lrp at 8 and 96 tokens a side, in one run: within 2× each way. A rate alone, through the
    origin, estimated 8 tokens at 0.4× of their time on a quiet machine. Calibration and
    measurement are wall-clock times on a shared machine, so a burst of other load can skew one
    attempt: it must hold in one of three."""
    attempts = [_estimate_over_measured(minilm_shift) for _ in range(3)]
    assert any(all(0.5 <= r <= 2.0 for r in ratios.values()) and all(overheads.values())
               for overheads, ratios in attempts), attempts


def _estimate_over_measured(encoder) -> tuple[dict[str, bool], dict[tuple[str, int], float]]:
    """Whether calibration found a call overhead (it falls back to a rate alone when a burst
    of load makes the short pair look slower per unit than the long one), and the ratios."""
    admission = Admission(encoder, HandlerSettings())
    admission.calibrate()
    overheads = {method: admission.overhead_s[method] > 0 for method in ("gae", "lrp")}
    ratios = {}
    for method in ("gae", "lrp"):
        instance, options = method_of(encoder, method), options_for(method, {})
        for tokens in (8, 96):
            pair = (text_of_length(encoder.tokenizer, tokens), text_of_length(encoder.tokenizer, tokens, 50))
            lengths = tuple(encoder.tokenize(list(pair)).lengths)
            assert lengths == (tokens, tokens)
            measured = min(_seconds(lambda: instance.attribute([pair], options)) for _ in range(2))
            ratios[method, tokens] = admission.estimate(method, options, lengths) / measured
    return overheads, ratios


def _seconds(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start
