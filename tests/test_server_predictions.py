"""Predictions through a real TorchServe started from the project's config and archive."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from handlers.tools.sources import sts_pairs
from tests.support.http import post, post_all_together

pytestmark = pytest.mark.server


def test_pair_prediction_equals_in_process(server, minilm_shift):
    a, b, _ = sts_pairs()[0]
    reply = post(server, {"text_a": a, "text_b": b})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["score"] == pytest.approx(minilm_shift.score(a, b), abs=1e-5)
    assert body["similarity"] == "cos" and body["reference"] == "shift" and body["truncated"] == []


def test_ranking_request(server, minilm_shift):
    query = "A man is playing a guitar."
    candidates = ["The cat sleeps on the sofa.", "Someone plays an acoustic guitar.", "Stock prices fell."]
    body = post(server, {"query": query, "candidates": candidates}).json()
    expected = minilm_shift.score_pairs([(query, c) for c in candidates])
    assert body["scores"] == pytest.approx(expected, abs=1e-5)
    assert body["ranking"] == sorted(range(3), key=lambda i: -expected[i])


def test_long_text_is_truncated_and_said_so(server):
    body = post(server, {"text_a": "guitar " * 2000, "text_b": "music"}).json()
    assert body["truncated"] == ["text_a"]


@pytest.mark.parametrize(
    "body, field",
    [
        (b"{not json", "body"),
        ({"text_a": "x"}, "text_b"),
        ({"text_a": "", "text_b": "x"}, "text_a"),
        ({"text_a": 3, "text_b": "x"}, "text_a"),
        ({"query": "q", "candidates": ["c"] * 65}, "candidates"),
    ],
)
def test_invalid_request_gets_4xx_naming_the_field(server, body, field):
    reply = post(server, body)
    assert 400 <= reply.status_code < 500
    assert reply.json()["field"] == field and reply.json()["error"]


def test_bad_request_in_a_batch_does_not_cost_the_others(server, minilm_shift):
    """Eight requests sent at once (one batch: batchSize 8, maxBatchDelay 50 ms), one invalid."""
    pairs = [(a, b) for a, b, _ in sts_pairs()[:7]]
    bodies = [{"text_a": a, "text_b": b} for a, b in pairs]
    bodies.insert(3, {"text_a": "", "text_b": "nothing"})
    replies = post_all_together(server, bodies)
    assert replies[3].status_code == 400 and replies[3].json()["field"] == "text_a"
    good = [r for i, r in enumerate(replies) if i != 3]
    assert all(r.status_code == 200 for r in good)
    expected = minilm_shift.score_pairs(pairs)
    assert [r.json()["score"] for r in good] == pytest.approx(expected, abs=1e-5)


def test_concurrent_clients_get_their_own_answers(server, minilm_shift):
    pairs = [(a, b) for a, b, _ in sts_pairs()[:40]]
    expected = dict(zip(pairs, minilm_shift.score_pairs(pairs)))
    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda p: (p, post(server, {"text_a": p[0], "text_b": p[1]})), pairs))
    for pair, reply in replies:
        assert reply.status_code == 200
        assert reply.json()["score"] == pytest.approx(expected[pair], abs=1e-5)


def test_kserve_v1_instances_are_answered_in_order(server, minilm_shift):
    pairs = [(a, b) for a, b, _ in sts_pairs()[:3]]
    reply = post(server, {"instances": [{"text_a": a, "text_b": b} for a, b in pairs]}, "v1/models/minilm:predict")
    assert reply.status_code == 200, reply.text
    scores = [p["score"] for p in reply.json()["predictions"]]
    assert scores == pytest.approx(minilm_shift.score_pairs(pairs), abs=1e-5)


def test_logs_keep_requests_out_of_the_frontend_log(server):
    """log4j2.xml (named by config.properties): requests reach the access log, and the frontend's
    own log has no per-request lines and no line twice."""
    for _ in range(3):
        assert post(server, {"text_a": "A man plays.", "text_b": "Music."}).status_code == 200
    access = (server.log_dir / "access_log.log").read_text()
    assert access.count('"POST /predictions/minilm HTTP/1.1" 200') >= 3
    frontend = (server.log_dir / "ts_log.log").read_text().splitlines()
    assert frontend and not any("[DEBUG]" in line for line in frontend)
    assert not any("Backend response time" in line or "Sending response for jobId" in line for line in frontend)
    assert all(line != after for line, after in zip(frontend, frontend[1:]))  # the built-in config writes each twice
