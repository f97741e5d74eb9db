"""The explanation cache: a request identical to an earlier one (model, version, weights, method,
options, texts) is answered with the same explanation from memory; within its byte bound, by
least recent use; identical items of one batch computed once; its counts in the metrics."""
from __future__ import annotations

import pytest
import torch

from handlers.serving.explanation_cache import ExplanationCache, explanation_bytes
from handlers.serving.metrics import CACHE, explanation_observations
from handlers.serving.protocol import ExplainItem
from handlers.serving.service import Service
from handlers.serving.settings import ExplanationSettings, HandlerSettings

PAIR = ("A man plays a guitar on the stage.", "Someone performs music.")
OTHER = ("A dog runs in the park.", "An animal is outside.")


@pytest.fixture(scope="module")
def service(tiny_dirs) -> Service:
    return Service.load("/", HandlerSettings(model_dir=str(tiny_dirs["bert"])), 300, "cpu", "tiny", model_version="1")


def options(service: Service, method: str, **given):
    return ExplainItem(text_a="a", text_b="b", method=method, **given).options(service.settings)


def comparable(answer: dict) -> dict:
    return {k: v for k, v in answer.items() if k not in ("elapsed_ms", "cached")}


@pytest.mark.parametrize("method,given", [("ij", {}), ("lrp", {"pairwise": True}), ("gae", {})])
def test_a_repeat_is_the_same_answer_from_the_cache(service, method, given):
    """Cached or computed, the answer is the same; the repeat says it is cached and takes a
    lookup's time: under a tenth of the computation, and 10 ms, here (one run's ratio)."""
    opts = options(service, method, **given)
    (first,) = service.explain(method, opts, [PAIR])
    (again,) = service.explain(method, opts, [PAIR])
    fresh = service.explain(method, opts.model_copy(update={}), [PAIR])[0]  # an equal key: cached too
    assert first.cached is False and again.cached is True and fresh.cached is True
    assert comparable(again.to_answer()) == comparable(first.to_answer())
    uncached = Service(service.encoder, service.settings, service.admission, model_name="tiny")  # cache 0
    (computed,) = uncached.explain(method, opts, [PAIR])
    assert computed.cached is False and comparable(computed.to_answer()) == comparable(first.to_answer())
    assert again.elapsed_ms < first.elapsed_ms / 10 and again.elapsed_ms < 10.0


def test_no_hit_across_models_versions_weights_or_options(service):
    opts = options(service, "lrp")
    service.explain("lrp", opts, [OTHER])
    assert service.explain("lrp", opts, [OTHER])[0].cached is True
    assert service.explain("lrp", options(service, "lrp", normalization="l2"), [OTHER])[0].cached is False
    assert service.explain("gae", options(service, "gae"), [OTHER])[0].cached is False
    assert service.explain("lrp", opts, [OTHER[::-1]])[0].cached is False
    for other in (Service(service.encoder, service.settings, service.admission, model_name="other", cache=service.cache),
                  Service(service.encoder, service.settings, service.admission, model_name="tiny",
                          model_version="2", cache=service.cache)):
        assert other.explain("lrp", opts, [OTHER])[0].cached is False  # one shared cache, other keys
    bias = service.encoder.adapter.blocks[0].output.dense.bias
    with torch.no_grad():
        bias.add_(0.0)  # an in-place update: the weights' version moves, as after an optimizer step
    assert service.explain("lrp", opts, [OTHER])[0].cached is False


def test_identical_items_of_one_batch_are_computed_once(service):
    """Three identical items and one other in one batch: two computations, the repeats answered
    with the first's explanation; the metrics count two misses and two hits."""
    opts = options(service, "ij", steps=8, quadrature="gauss")
    pairs = [("Cats sleep all day.", "A cat is asleep."), OTHER, ("Cats sleep all day.", "A cat is asleep."),
             ("Cats sleep all day.", "A cat is asleep.")]
    answers = service.explain("ij", opts, pairs)
    assert [a.cached for a in answers] == [False, False, True, True]
    assert len({a.elapsed_ms for a in answers[:2]}) == 1  # computed together, in one call
    assert comparable(answers[2].to_answer()) == comparable(answers[0].to_answer())
    outcomes = [o.labels[-1] for a in answers for o in explanation_observations("tiny", a) if o.spec is CACHE]
    assert sorted(outcomes) == ["hit", "hit", "miss", "miss"]


def test_eviction_keeps_the_recently_used_within_the_bound(service):
    """A bound of three explanations: the least recently used goes, each eviction is counted on
    the explanation that caused it, and the bytes held never pass the bound."""
    opts = options(service, "gae")
    pairs = [(f"A text number {k}.", "Another text.") for k in range(5)]
    computed = Service(service.encoder, service.settings, service.admission, model_name="tiny").explain("gae", opts, pairs)
    size = max(explanation_bytes(e) for e in computed)
    bounded = Service(service.encoder, service.settings, service.admission, model_name="tiny",
                      cache=ExplanationCache(3 * size + size // 2))
    for pair in pairs[:3]:
        assert bounded.explain("gae", opts, [pair])[0].evictions == 0
    assert bounded.explain("gae", opts, [pairs[0]])[0].cached is True  # pairs[0] now the most recent
    (fourth,) = bounded.explain("gae", opts, [pairs[3]])
    assert fourth.evictions == 1 and len(bounded.cache) == 3
    assert bounded.explain("gae", opts, [pairs[1]])[0].cached is False  # the least recently used went
    assert bounded.explain("gae", opts, [pairs[0]])[0].cached is True
    assert bounded.cache.held_bytes <= bounded.cache.max_bytes
    assert ExplanationCache(size - 1).put("key", computed[0]) == 0  # larger than the bound: not kept


def test_the_cache_is_a_setting_on_by_default(service):
    assert ExplanationSettings().cache_mb > 0
    assert service.cache.max_bytes == int(ExplanationSettings().cache_mb * 2**20)
    off = HandlerSettings(model_dir=service.settings.model_dir, explanation=ExplanationSettings(cache_mb=0))
    assert Service.load("/", off, 300, "cpu", "tiny").cache.max_bytes == 0
    assert Service.load("/", service.settings, 300, "cpu", "tiny", explanations=False).cache.max_bytes == 0
