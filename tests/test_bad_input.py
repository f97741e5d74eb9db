"""Hostile input through a real TorchServe, and a property-based fuzz test of the request parser.

Every bad request is sent in the same TorchServe batch as seven good predictions (eight
clients released together by a barrier; the test archive has batchSize 8 and maxBatchDelay
50 ms). The bad one gets a 4xx naming the field; the good ones get the in-process scores; the
worker is the same process before and after.
"""
from __future__ import annotations

import json
import pickle
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from handlers import load_encoder
from handlers.serving.settings import HandlerSettings
from handlers.serving.protocol import Envelope, ExplainItem, RankItem, RequestError, parse_request
from handlers.tools import archive as build_archive
from handlers.tools.sources import sts_pairs
from tests.support import http

PREDICT, EXPLAIN = "predictions/minilm", "explanations/minilm"
V1, V2, V2_EXPLAIN = "v1/models/minilm:predict", "v2/models/minilm/infer", "v2/models/minilm/explain"
GOOD = [(a, b) for a, b, _ in sts_pairs()[:7]]
MIXED = "Kitaristi 😀🎸 Гитара ギター guitar عود 吉他 ñandú e\u0301"


def v2_body(text_a: Any = ("a man plays",), text_b: Any = ("music",), **changes) -> dict:
    inputs = [
        {"name": "text_a", "datatype": "BYTES", "shape": [len(text_a)], "data": list(text_a)},
        {"name": "text_b", "datatype": "BYTES", "shape": [len(text_b)], "data": list(text_b)},
    ]
    return {"inputs": inputs, **changes}


def v2_with(index: int, **fields) -> dict:
    body = v2_body()
    body["inputs"][index].update(fields)
    return body


def nested(depth: int) -> bytes:
    return b'{"text_a": ' + b"[" * depth + b'"x"' + b"]" * depth + b', "text_b": "y"}'


PAIR = {"text_a": "A man plays a guitar.", "text_b": "Someone plays music."}
# (route, body, status, field); bytes are sent as they are, anything else as JSON
BAD_INPUTS = [
    # malformed JSON
    (PREDICT, b"{not json", 400, "body"),
    (PREDICT, b'{"text_a": "x", "text_b": ', 400, "body"),
    (PREDICT, b"", 400, "body"),
    (PREDICT, nested(5000), 400, "body"),
    (PREDICT, nested(950), 400, ("text_a", "body")),  # within TorchServe's json.loads: parsed, then refused
    # wrong types
    (PREDICT, {"text_a": 3, "text_b": "x"}, 400, "text_a"),
    (PREDICT, {"text_a": ["x"], "text_b": "x"}, 400, "text_a"),
    (PREDICT, {"text_a": None, "text_b": "x"}, 400, "text_a"),
    (PREDICT, {"query": "q", "candidates": "abc"}, 400, "candidates"),
    (PREDICT, {"query": "q", "candidates": ["a", 1]}, 400, "candidates.1"),
    (PREDICT, [PAIR], 400, "body"),
    (PREDICT, "a string", 400, "body"),
    (PREDICT, 42, 400, "body"),
    # empty or whitespace texts, and texts that tokenize to nothing
    (PREDICT, {"text_a": "", "text_b": "x"}, 400, "text_a"),
    (PREDICT, {"text_a": "x", "text_b": " \n\t\u3000"}, 400, "text_b"),
    (PREDICT, {"query": "q", "candidates": ["ok", "  "]}, 400, "candidates.1"),
    (PREDICT, {"query": "q", "candidates": []}, 400, "candidates"),
    (PREDICT, {"text_a": "\u200b\u200b", "text_b": "x"}, 400, "text_a"),
    (EXPLAIN, {"text_a": "x", "text_b": "\x00\x01\x7f", "method": "ij"}, 400, "text_b"),
    (PREDICT, {"query": "q", "candidates": ["ok", "\ufeff\u0301"]}, 400, "candidates.1"),
    # missing and unknown fields
    (PREDICT, {"text_a": "x"}, 400, "text_b"),
    (PREDICT, {}, 400, "text_a"),
    (PREDICT, {"candidates": ["a"]}, 400, "query"),
    (PREDICT, {**PAIR, "extra": 1}, 400, "extra"),
    (PREDICT, {**PAIR, "method": "ij"}, 400, "method"),
    # unknown method and options out of range or not integers
    (EXPLAIN, {**PAIR, "method": "shap"}, 400, "method"),
    (EXPLAIN, {**PAIR, "method": 3}, 400, "method"),
    (EXPLAIN, {**PAIR, "layer": -1}, 400, "layer"),
    (EXPLAIN, {**PAIR, "layer": 6}, 400, "layer"),
    (EXPLAIN, {**PAIR, "layer": 2.0}, 400, "layer"),
    (EXPLAIN, {**PAIR, "layer": "2"}, 400, "layer"),
    (EXPLAIN, {**PAIR, "layer": True}, 400, "layer"),
    (EXPLAIN, {**PAIR, "steps": 0}, 400, "steps"),
    (EXPLAIN, {**PAIR, "steps": 1001}, 400, "steps"),
    (EXPLAIN, {**PAIR, "tolerance": 0.9}, 400, "tolerance"),
    (EXPLAIN, {**PAIR, "quadrature": "simpson"}, 400, "quadrature"),
    (EXPLAIN, {**PAIR, "steps": 10**30}, 400, "steps"),
    (EXPLAIN, {**PAIR, "normalization": "max"}, 400, "normalization"),
    (EXPLAIN, {**PAIR, "method": "lrp", "pairwise": "yes"}, 400, "pairwise"),
    # NaN, inf and huge numbers (TorchServe's own json.loads accepts NaN and Infinity)
    (EXPLAIN, b'{"text_a": "x", "text_b": "y", "layer": NaN}', 400, "layer"),
    (EXPLAIN, b'{"text_a": "x", "text_b": "y", "steps": Infinity}', 400, "steps"),
    (EXPLAIN, b'{"text_a": "x", "text_b": "y", "steps": -Infinity}', 400, "steps"),
    (EXPLAIN, b'{"text_a": "x", "text_b": "y", "steps": 1e308}', 400, "steps"),
    (EXPLAIN, b'{"text_a": "x", "text_b": "y", "steps": 1' + b"0" * 5000 + b"}", 400, "body"),
    # sizes: a 2 MB body (the handler's limit), 100k-character texts, thousands of candidates
    (PREDICT, {"text_a": "a" * 2_000_000, "text_b": "b"}, 400, "text_a"),  # parsed by TorchServe: max_text_chars
    (PREDICT, {"text_a": "guitar " * 14_286, "text_b": "music"}, 400, "text_a"),
    (PREDICT, {"query": "q", "candidates": ["a candidate"] * 5000}, 400, "candidates"),
    # invalid UTF-8 and lone surrogates
    (PREDICT, b'{"text_a": "\xff\xfe abc", "text_b": "y"}', 400, "body"),
    (PREDICT, b'{"text_a": "ok \xc3", "text_b": "y"}', 400, "body"),
    (PREDICT, b'{"text_a": "\\ud800 abc", "text_b": "y"}', 400, "text_a"),
    # malformed KServe v1 envelopes
    (V1, {"instances": {}}, 400, "instances"),
    (V1, {"instances": []}, 400, "instances"),
    (V1, {"instances": [1]}, 400, "instances.0"),
    (V1, {"instances": [PAIR, {"text_a": "x"}]}, 400, "instances.1.text_b"),
    (V1, {"instances": [PAIR, {**PAIR, "text_b": ""}]}, 400, "instances.1.text_b"),
    (V1, {"instances": [PAIR], "parameters": {}}, 400, "parameters"),
    (V1, {"instances": [{"text_a": "\u200b", "text_b": "y"}]}, 400, "instances.0.text_a"),
    # malformed KServe v2 envelopes
    (V2, {"inputs": []}, 400, "inputs"),
    (V2, {"inputs": "text_a"}, 400, "inputs"),
    (V2, {"inputs": [1, 2]}, 400, "inputs.0"),
    (V2, v2_with(0, datatype="FP32"), 400, "inputs.text_a.datatype"),
    (V2, v2_with(1, shape=[2]), 400, "inputs.text_b"),
    (V2, v2_with(0, shape=[1, 1]), 400, "inputs.text_a"),
    (V2, v2_with(0, name="text_c"), 400, "inputs.text_c"),
    (V2, v2_with(1, name="text_a"), 400, "inputs.text_a"),
    (V2, v2_body(text_a=[3]), 400, "inputs.text_a.0"),
    (V2, v2_body(text_a=["a", "b"], text_b=["c", " "]), 400, "inputs.text_b.1"),
    (V2, v2_body(text_a=["a", "b"], text_b=["c"]), 400, "inputs.text_b"),
    (V2, v2_body(id=5), 400, "id"),
    (V2, {"inputs": v2_body()["inputs"][:1]}, 400, "inputs.text_b"),
    (V2_EXPLAIN, v2_body(parameters={"layer": "x"}), 400, "parameters.layer"),
    (V2_EXPLAIN, v2_body(parameters={"text_a": "x"}), 400, "parameters.text_a"),
    (V2_EXPLAIN, v2_body(text_b=["\u200b"], parameters={"method": "gae"}), 400, "inputs.text_b.0"),
]


def post(server, route: str, body: Any, content_type: str = "application/json") -> requests.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http.post(server, data, route, timeout=120, headers={"Content-Type": content_type})


def worker_pids(server) -> list[int]:
    return sorted(int(w["pid"]) for w in http.workers(server, "minilm") if w["status"] == "READY")


def in_one_batch(
    server, route: str, body: Any, content_type: str = "application/json"
) -> tuple[requests.Response, list[requests.Response]]:
    """The bad request and seven good pair predictions, released together."""
    barrier = threading.Barrier(1 + len(GOOD))

    def send(job: tuple) -> requests.Response:
        barrier.wait()
        return post(server, *job)

    jobs = [(route, body, content_type)] + [(PREDICT, {"text_a": a, "text_b": b}) for a, b in GOOD]
    with ThreadPoolExecutor(len(jobs)) as pool:
        replies = list(pool.map(send, jobs))
    return replies[0], replies[1:]


@pytest.fixture(scope="module")
def good_scores(minilm_shift) -> list[float]:
    return minilm_shift.score_pairs(GOOD)


@pytest.fixture(scope="module")
def first_pids(server) -> list[int]:
    return worker_pids(server)


def assert_good_answered(replies: list[requests.Response], expected: list[float]) -> None:
    assert [r.status_code for r in replies] == [200] * len(replies), [r.text[:200] for r in replies]
    assert [r.json()["score"] for r in replies] == pytest.approx(expected, abs=1e-5)


@pytest.mark.server
@pytest.mark.parametrize("route, body, status, field", BAD_INPUTS,
                         ids=[f"{i}-{r.split('/')[0]}" for i, (r, *_) in enumerate(BAD_INPUTS)])
def test_bad_input_is_refused_alone(server, first_pids, good_scores, route, body, status, field):
    bad, good = in_one_batch(server, route, body)
    assert bad.status_code == status, bad.text[:300]
    answer = bad.json()
    fields = field if isinstance(field, tuple) else (field,)
    assert answer["field"] in fields and answer["field"] in answer["error"], answer
    assert_good_answered(good, good_scores)
    assert worker_pids(server) == first_pids


@pytest.mark.server
def test_body_over_torchserve_max_request_size(server, first_pids, good_scores):
    """10 MB is over config.properties' max_request_size (8 MiB): TorchServe's HTTP layer answers
    413 with an empty body (not the handler's JSON) and the request never reaches the worker."""
    bad, good = in_one_batch(server, PREDICT, json.dumps({"text_a": "a" * 10_000_000, "text_b": "b"}).encode())
    assert bad.status_code == 413 and bad.content == b""
    assert_good_answered(good, good_scores)
    assert worker_pids(server) == first_pids


@pytest.mark.server
def test_text_body_over_the_handler_limit(server, first_pids, good_scores):
    """A body TorchServe does not parse (text/plain) meets the handler's own max_body_bytes (1 MB)."""
    body = json.dumps({"text_a": "a" * 2_000_000, "text_b": "b"}).encode()
    bad, good = in_one_batch(server, PREDICT, body, "text/plain")
    assert bad.status_code == 413 and bad.json()["field"] == "body", bad.text[:300]
    assert_good_answered(good, good_scores)
    assert worker_pids(server) == first_pids


@pytest.mark.server
@pytest.mark.parametrize(
    "pair",
    [
        (MIXED, "a guitar and a lute"),
        ("tab\tnew line\nbell\x07 nul\x00 end", "control characters around words"),
        ("🎸" * 50, "😀 " * 30),
        ("guitar " * 2800, "music"),  # 19,600 characters: under max_text_chars, truncated to max_length
    ],
    ids=["mixed-scripts", "control-characters", "emoji-only", "long-text-truncated"],
)
def test_unusual_but_valid_texts_are_answered_exactly(server, first_pids, good_scores, minilm_shift, pair):
    reply, good = in_one_batch(server, PREDICT, {"text_a": pair[0], "text_b": pair[1]})
    assert reply.status_code == 200, reply.text
    assert reply.json()["score"] == pytest.approx(minilm_shift.score(*pair), abs=1e-5)
    assert reply.json()["truncated"] == (["text_a"] if len(pair[0]) > 10_000 else [])
    assert_good_answered(good, good_scores)
    assert worker_pids(server) == first_pids


@pytest.mark.server
def test_the_most_candidates_allowed_are_ranked(server, minilm_shift):
    candidates = [f"{MIXED} {i}" for i in range(64)]
    reply = post(server, PREDICT, {"query": "guitar", "candidates": candidates})
    assert reply.status_code == 200, reply.text
    expected = minilm_shift.score_pairs([("guitar", c) for c in candidates])
    assert reply.json()["scores"] == pytest.approx(expected, abs=1e-5)


# -- weights from safetensors only ------------------------------------------------------------
class _Planted:
    """Unpickling this writes a file: proof that a pickle was executed."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "unpickled"))


def test_model_with_only_pickled_weights_is_refused(minilm_dir, tmp_path):
    from safetensors.torch import load_file

    model = tmp_path / "pickled-model"
    shutil.copytree(minilm_dir, model, ignore=shutil.ignore_patterns("*.safetensors"))
    marker = tmp_path / "executed"
    weights = {**load_file(minilm_dir / "model.safetensors"), "planted": _Planted(marker)}
    with open(model / "pytorch_model.bin", "wb") as handle:
        pickle.dump(weights, handle)
    with pytest.raises(SystemExit, match="no model.safetensors"):
        build_archive.stage_model(model, tmp_path / "stage")
    with pytest.raises(OSError, match="safetensors"):
        load_encoder(model)
    assert not marker.exists()
    assert not (tmp_path / "stage" / "pytorch_model.bin").exists()


# -- property-based fuzzing of the parser -----------------------------------------------------
SETTINGS = HandlerSettings()
LAYERS = 6
FIELDS = ["text_a", "text_b", "query", "candidates", "method", "layer", "steps", "normalization", "pairwise",
          "instances", "inputs", "parameters", "id", "name", "datatype", "shape", "data"]
texts = st.text(st.characters(codec="utf-8") | st.sampled_from(["\ud800", "\udfff", "\u200b", "\x00"]), max_size=12)
scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=-(10**40), max_value=10**40)
           | st.floats(allow_nan=True, allow_infinity=True) | texts | st.sampled_from(["ij", "gae", "lrp", "BYTES", "l2"]))
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(FIELDS) | texts, inner, max_size=5),
    max_leaves=20,
)
kinds = st.sampled_from(["predict", "explain"])


def parse(raw: Any, kind: str) -> Envelope | RequestError:
    try:
        return parse_request(raw, kind, SETTINGS, LAYERS, "minilm")  # type: ignore[arg-type]
    except RequestError as error:
        return error


def assert_well_formed(result: Envelope | RequestError) -> None:
    """A refusal is a 4xx naming a field; an accepted request holds only servable items."""
    if isinstance(result, RequestError):
        assert 400 <= result.status < 500 and result.field
        assert result.field.split(".")[0] in result.message, (result.field, result.message)
        return
    assert result.items
    for item in result.items:
        for text in item.all_texts():
            assert text.strip() and len(text) <= SETTINGS.max_text_chars
            text.encode("utf-8")
        if isinstance(item, RankItem):
            assert 1 <= len(item.candidates) <= SETTINGS.max_candidates
        if isinstance(item, ExplainItem):  # its options are the method's to check: refused naming one, or within range
            try:
                options = item.options(SETTINGS)
            except RequestError as refusal:
                assert 400 <= refusal.status < 500 and refusal.field in type(item).model_fields, refusal.message
            else:
                assert 1 <= getattr(options, "steps", 1) <= SETTINGS.explanation.max_steps


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200), kinds)
def test_fuzz_bytes(raw, kind):
    assert_well_formed(parse(raw, kind))


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(json_values, kinds, st.booleans())
def test_fuzz_json_values(value, kind, as_text):
    """As TorchServe hands bodies over: already parsed (application/json) or as text."""
    raw = json.dumps(value) if as_text else value
    assert_well_formed(parse(raw, kind))


VALID = {
    "pair": (PREDICT, {"text_a": "a man plays", "text_b": "music"}),
    "rank": (PREDICT, {"query": "guitar", "candidates": ["a", "b", "c"]}),
    "explain": (EXPLAIN, {**PAIR, "method": "ij", "layer": 2, "steps": 5, "normalization": "l2", "pairwise": False}),
}


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    paths = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, item in value.items():
            paths += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            paths += _paths(item, (*prefix, i))
    return paths


def _replaced(value: Any, path: tuple, new: Any) -> Any:
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = _replaced(value[path[0]], path[1:], new)
    return copy


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(VALID)), st.booleans(), st.data())
def test_fuzz_one_field_is_named_when_it_breaks(shape, as_v1, data):
    """Replace one field of a valid body (plain or inside a KServe v1 instance) with any JSON
    value: the request is either still valid or refused naming exactly that field (or an
    element inside it)."""
    route, body = VALID[shape]
    kind = "explain" if route == EXPLAIN else "predict"
    path = data.draw(st.sampled_from(_paths(body)))
    broken = _replaced(body, path, data.draw(json_values))
    prefix = ("instances", 0) if as_v1 else ()
    result = parse({"instances": [broken]} if as_v1 else broken, kind)
    assert_well_formed(result)
    if isinstance(result, RequestError):
        where = ".".join(map(str, (*prefix, *path)))
        assert result.field == where or result.field.startswith(where + "."), (result.field, where)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2), st.sampled_from([0, 1]), json_values)
def test_fuzz_v2_element_is_named(index, tensor, value):
    """Replace one text of a v2 pair request with any JSON value: refused as ``inputs.<name>.<i>``."""
    body = v2_body(text_a=["a", "b", "c"], text_b=["d", "e", "f"])
    body["inputs"][tensor]["data"][index] = value
    result = parse(body, "predict")
    assert_well_formed(result)
    if isinstance(result, RequestError):
        where = f"inputs.{('text_a', 'text_b')[tensor]}.{index}"
        assert result.field == where or result.field.startswith(where + "."), result.field
    else:
        assert isinstance(value, str)
