"""ij explanations through a real TorchServe (the session's ``server``): plain JSON on
/explanations, KServe v1 on /v1/models/{m}:explain, bounds, and a mixed TorchServe batch."""
from __future__ import annotations

import pytest

from handlers import explain
from handlers.tools.sources import sts_pairs
from tests.support.http import post, post_all_together

pytestmark = pytest.mark.server

EXPLAIN = "explanations/minilm"
CONTRACT = {"method", "score", "tokens_a", "tokens_b", "elapsed_ms", "attributions", "attribution_sum",
            "attribution_error", "reference_terms", "layer", "steps"}


def assert_same_ij(answer: dict, expected: dict) -> None:
    assert CONTRACT <= set(answer)
    assert answer["tokens_a"] == expected["tokens_a"] and answer["tokens_b"] == expected["tokens_b"]
    assert (answer["layer"], answer["steps"]) == (expected["layer"], expected["steps"])
    assert answer["score"] == pytest.approx(expected["score"], abs=1e-5)
    bound = max(abs(v) for row in expected["attributions"] for v in row)
    for served, local in zip(answer["attributions"], expected["attributions"]):
        assert served == pytest.approx(local, abs=1e-5 * bound)
    assert answer["reference_terms"] == {"ra": 0.0, "rb": 0.0, "rr": 0.0}
    assert answer["elapsed_ms"] > 0


def test_ij_equals_in_process(server, minilm_shift):
    a, b, _ = sts_pairs()[0]
    reply = post(server, {"text_a": a, "text_b": b, "method": "ij", "layer": 3, "steps": 10}, EXPLAIN)
    assert reply.status_code == 200, reply.text
    assert_same_ij(reply.json(), explain(minilm_shift, a, b, method="ij", layer=3, steps=10))


def test_kserve_v1_explain(server, minilm_shift):
    pairs = [(a, b) for a, b, _ in sts_pairs()[1:4]]
    options = [{"layer": 4, "steps": 6}, {"layer": 2, "steps": 6}, {"layer": 4, "steps": 6}]
    instances = [{"text_a": a, "text_b": b, "method": "ij", **o} for (a, b), o in zip(pairs, options)]
    reply = post(server, {"instances": instances}, "v1/models/minilm:explain")
    assert reply.status_code == 200, reply.text
    answers = reply.json()["explanations"]
    assert len(answers) == 3
    for answer, (a, b), o in zip(answers, pairs, options):
        assert_same_ij(answer, explain(minilm_shift, a, b, method="ij", **o))


@pytest.mark.parametrize(
    "options, field",
    [({"layer": 6}, "layer"), ({"layer": -1}, "layer"), ({"steps": 1001}, "steps"), ({"steps": 0}, "steps"),
     ({"steps": 2.5}, "steps")],
)
def test_layer_and_steps_out_of_bounds_get_4xx(server, options, field):
    reply = post(server, {"text_a": "a guitar", "text_b": "music", "method": "ij", **options}, EXPLAIN)
    assert 400 <= reply.status_code < 500, reply.text
    assert reply.json()["field"] == field and reply.json()["error"]


def test_a_mixed_batch_is_answered_as_each_alone(server, minilm_shift):
    """Eight requests at once (one TorchServe batch): ij at two (layer, steps), gae, and an
    invalid request."""
    pairs = [(a, b) for a, b, _ in sts_pairs()[4:11]]
    options = [{"method": "ij", "layer": 4, "steps": 5}, {"method": "ij", "layer": 3, "steps": 4}, {"method": "gae"}]
    bodies = [{"text_a": a, "text_b": b, **options[i % 3]} for i, (a, b) in enumerate(pairs)]
    bodies.insert(2, {"text_a": "guitar", "text_b": "music", "method": "ij", "layer": 99})
    replies = post_all_together(server, bodies, EXPLAIN)
    assert replies[2].status_code == 400 and replies[2].json()["field"] == "layer"
    for reply, body in zip(replies[:2] + replies[3:], bodies[:2] + bodies[3:]):
        assert reply.status_code == 200, reply.text
        options = {k: v for k, v in body.items() if k not in ("text_a", "text_b")}
        expected = explain(minilm_shift, body["text_a"], body["text_b"], **options)
        if body["method"] == "ij":
            assert_same_ij(reply.json(), expected)
        else:
            assert reply.json()["method"] == expected["method"]
            assert reply.json()["score"] == pytest.approx(expected["score"], abs=1e-5)
