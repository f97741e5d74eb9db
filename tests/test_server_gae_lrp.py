"""GAE and LRP explanations through a real TorchServe (the session's ``server``), in both of its
protocols: plain JSON on /explanations and KServe v1 on /v1/models/{m}:explain."""
from __future__ import annotations

import pytest
import torch

from handlers import explain
from handlers.tools.sources import sts_pairs
from tests.support.http import post, post_all_together

pytestmark = pytest.mark.server

PAIR = ("A man is playing a guitar.", "Someone plays an acoustic guitar on stage.")
EXPLAIN = "explanations/minilm"


def assert_same_explanation(answer: dict, expected: dict) -> None:
    assert answer["method"] == expected["method"]
    assert answer["tokens_a"] == expected["tokens_a"] and answer["tokens_b"] == expected["tokens_b"]
    assert answer["score"] == pytest.approx(expected["score"], abs=1e-5)
    for field in ("relevance_a", "relevance_b", "attributions"):
        assert (field in answer) == (field in expected)
        if field in expected:
            served = torch.tensor(answer[field], dtype=torch.float64)
            local = torch.tensor(expected[field], dtype=torch.float64)
            assert torch.allclose(served, local, atol=1e-5 * max(1.0, local.abs().max().item()))
    if "conservation_error" in expected:
        assert answer["conservation_error"] == pytest.approx(expected["conservation_error"], abs=1e-5)
    assert answer["elapsed_ms"] > 0


@pytest.mark.parametrize(
    "options",
    [
        {"method": "gae"},
        {"method": "gae", "normalization": "min-max"},
        {"method": "lrp"},
        {"method": "lrp", "normalization": "l2", "pairwise": True},
    ],
)
def test_explanation_equals_in_process(server, minilm_shift, options):
    reply = post(server, {"text_a": PAIR[0], "text_b": PAIR[1], **options}, EXPLAIN)
    assert reply.status_code == 200, reply.text
    assert_same_explanation(reply.json(), explain(minilm_shift, *PAIR, **options))


def test_kserve_v1_explain(server, minilm_shift):
    pairs = [(a, b) for a, b, _ in sts_pairs()[:3]]
    methods = ["gae", "lrp", "gae"]
    instances = [{"text_a": a, "text_b": b, "method": m} for (a, b), m in zip(pairs, methods)]
    reply = post(server, {"instances": instances}, "v1/models/minilm:explain")
    assert reply.status_code == 200, reply.text
    answers = reply.json()["explanations"]
    assert len(answers) == 3
    for answer, (a, b), method in zip(answers, pairs, methods):
        assert_same_explanation(answer, explain(minilm_shift, a, b, method=method))


@pytest.mark.parametrize(
    "body, field",
    [
        ({"method": "gae", "normalization": "max"}, "normalization"),
        ({"method": "lrp", "pairwise": "yes"}, "pairwise"),
        ({"method": "lrp", "text_b": ""}, "text_b"),
    ],
)
def test_invalid_options_get_4xx_naming_the_field(server, body, field):
    reply = post(server, {"text_a": PAIR[0], "text_b": PAIR[1], **body}, EXPLAIN)
    assert 400 <= reply.status_code < 500, reply.text
    assert reply.json()["field"] == field and reply.json()["error"]


def test_a_batch_of_explanations_is_answered_as_each_alone(server, minilm_shift):
    """Eight requests at once (one TorchServe batch: batchSize 8), gae and lrp mixed, one invalid."""
    pairs = [(a, b) for a, b, _ in sts_pairs()[:7]]
    bodies = [{"text_a": a, "text_b": b, "method": ("gae", "lrp")[i % 2]} for i, (a, b) in enumerate(pairs)]
    bodies.insert(2, {"text_a": "x", "text_b": "y", "method": "lrp", "normalization": "max"})
    replies = post_all_together(server, bodies, EXPLAIN)
    assert replies[2].status_code == 400 and replies[2].json()["field"] == "normalization"
    for body, reply in zip(bodies[:2] + bodies[3:], replies[:2] + replies[3:]):
        assert reply.status_code == 200, reply.text
        assert_same_explanation(reply.json(), explain(minilm_shift, body["text_a"], body["text_b"], method=body["method"]))
