"""Embeddings: ``{"texts": [...]}`` on the prediction routes, and OpenAI's embeddings API on KServe's
model server. The embedding served is the one the score compares (e(x) − e(r) in shift mode),
normalised where the similarity is a cosine: two of them give the served score back."""
from __future__ import annotations

import base64
import struct

import numpy as np
import pytest
import requests

from handlers import load_encoder
from handlers.serving.predictions import predict_items
from handlers.serving.protocol import (RequestError, item_context, openai_embeddings, parse_openai_body,
                                       parse_request)
from handlers.serving.settings import HandlerSettings
from tests.support.http import post

TEXTS = ["A man is playing a guitar.", "Someone plays music.", "The stock market fell sharply today."]
SETTINGS = HandlerSettings(max_texts=4, max_text_chars=200)


def answers(encoder, body: dict, settings: HandlerSettings = SETTINGS) -> list:
    envelope = parse_request(body, "predict", settings, encoder.num_layers)
    return predict_items(encoder, envelope.items)


# -- in process ---------------------------------------------------------------------------------
def test_embeddings_give_the_served_scores_back(minilm_shift):
    (answer,) = answers(minilm_shift, {"texts": TEXTS + [TEXTS[0]]})
    embeddings = np.array(answer["embeddings"])
    assert embeddings.shape == (4, 384) and np.allclose(np.linalg.norm(embeddings, axis=1), 1, atol=1e-6)
    assert np.array_equal(embeddings[0], embeddings[3])  # a repeated text, its same row
    scores = minilm_shift.score_pairs([(TEXTS[0], TEXTS[1]), (TEXTS[0], TEXTS[2]), (TEXTS[1], TEXTS[2])])
    assert [embeddings[0] @ embeddings[1], embeddings[0] @ embeddings[2], embeddings[1] @ embeddings[2]] == \
        pytest.approx(scores, abs=1e-6)
    assert answer["tokens"] == minilm_shift.tokenize(TEXTS + [TEXTS[0]]).lengths
    assert (answer["similarity"], answer["reference"], answer["truncated"]) == ("cos", "shift", [])


@pytest.mark.parametrize("reference", ["shift", "none"])
def test_dot_embeddings_are_the_compared_ones_unnormalised(tiny_family, reference):
    _, path = tiny_family
    encoder = load_encoder(path, reference=reference, similarity="dot")
    (answer,) = answers(encoder, {"texts": TEXTS[:2]})
    a, b = np.array(answer["embeddings"])
    assert a @ b == pytest.approx(encoder.score(*TEXTS[:2]), rel=1e-5, abs=1e-6)
    assert answer["similarity"] == "dot"


def test_a_truncated_text_is_named(minilm_shift):
    (answer,) = answers(minilm_shift, {"texts": [TEXTS[0], "guitar " * 300]}, HandlerSettings())
    assert answer["truncated"] == ["texts.1"] and answer["tokens"][1] == minilm_shift.max_length


@pytest.mark.parametrize("body, field", [
    ({"texts": []}, "texts"),
    ({"texts": "one text"}, "texts"),
    ({"texts": [TEXTS[0], 7]}, "texts.1"),
    ({"texts": [TEXTS[0], " "]}, "texts.1"),
    ({"texts": ["x"] * 5}, "texts"),  # over max_texts
    ({"texts": ["x" * 201]}, "texts.0"),  # over max_text_chars
    ({"texts": ["x"], "query": "y"}, "candidates"),
    ({"instances": [{"texts": ["x"]}, {"texts": [None]}]}, "instances.1.texts.0"),
])
def test_bad_embeddings_requests_name_the_field(minilm_shift, body, field):
    with pytest.raises(RequestError) as refused:
        parse_request(body, "predict", SETTINGS, minilm_shift.num_layers)
    assert refused.value.status == 400 and refused.value.field == field, refused.value.message


def test_a_text_without_content_is_refused_alone(minilm_shift):
    envelope = parse_request({"instances": [{"texts": ["\u200b\u200b"]}, {"texts": TEXTS[:1]}]}, "predict",
                             SETTINGS, minilm_shift.num_layers)
    refused, answered = predict_items(minilm_shift, envelope.items)
    assert isinstance(refused, RequestError) and refused.field == "texts.0"
    assert np.array(answered["embeddings"]).shape == (1, 384)


def test_openai_bodies_and_their_errors():
    body = parse_openai_body(b'{"model": "m", "input": "one text", "encoding_format": "base64"}', 10_000)
    request = openai_embeddings(body, SETTINGS)
    assert request.envelope.items[0].texts == ["one text"] and request.encoding_format == "base64"
    vector = [0.25, -1.5, 3.0]
    (row,) = request.answer({"embeddings": [vector], "tokens": [4]})["data"]
    assert list(struct.unpack("<3f", base64.b64decode(row["embedding"]))) == vector
    for raw, field in [(b'{"input": "x"}', "model"), (b'{"model": "m", "input": ["a", 3]}', "input.1"),
                       (b'{"model": "m", "input": "x", "encoding_format": "int8"}', "encoding_format"),
                       (b'{"model": "m", "input": "x", "dimensions": 8}', "dimensions"), (b"[1]", "body")]:
        with pytest.raises(RequestError) as refused:
            parse_openai_body(raw, 10_000)
        assert refused.value.field == field, refused.value.message
    for given, field in [("", "input"), (["a", ""], "input.1"), ([], "input"), (["a"] * 5, "input")]:
        with pytest.raises(RequestError) as refused:
            openai_embeddings(parse_openai_body({"model": "m", "input": given}, 10_000), SETTINGS)
        assert refused.value.field == field, refused.value.message


def test_the_limit_is_a_setting():
    assert item_context(HandlerSettings(max_texts=9), 6)["max_texts"] == 9
    assert HandlerSettings().max_texts == 64


# -- served --------------------------------------------------------------------------------------
@pytest.mark.server
def test_torchserve_answers_embeddings_that_give_its_scores_back(server):
    reply = post(server, {"texts": TEXTS[:2]})
    assert reply.status_code == 200, reply.text
    a, b = np.array(reply.json()["embeddings"])
    score = post(server, {"text_a": TEXTS[0], "text_b": TEXTS[1]}).json()["score"]
    assert a @ b == pytest.approx(score, abs=1e-5)
    refused = post(server, {"texts": [TEXTS[0], ""]})
    assert refused.status_code == 400 and refused.json()["field"] == "texts.1"


@pytest.mark.server
def test_kserves_openai_route_answers_as_openai_does(kserve_engine, minilm_shift):
    url = f"{kserve_engine.inference}/openai/v1/embeddings"
    reply = requests.post(url, json={"model": "minilm", "input": TEXTS[:2]}, timeout=60)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["object"] == "list" and body["model"] == "minilm"
    assert [row["index"] for row in body["data"]] == [0, 1] and all(row["object"] == "embedding" for row in body["data"])
    a, b = (np.array(row["embedding"]) for row in body["data"])
    assert a @ b == pytest.approx(minilm_shift.score(*TEXTS[:2]), abs=1e-5)
    tokens = sum(minilm_shift.tokenize(TEXTS[:2]).lengths)
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    packed = requests.post(url, json={"model": "minilm", "input": TEXTS[0], "encoding_format": "base64"}, timeout=60).json()
    decoded = np.frombuffer(base64.b64decode(packed["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(decoded, a, atol=1e-7)
    refused = requests.post(url, json={"model": "minilm", "input": [TEXTS[0], ""]}, timeout=60)
    assert refused.status_code == 400 and refused.json()["field"] == "input.1", refused.text
    assert requests.post(url, json={"model": "other", "input": "x"}, timeout=60).status_code == 404
