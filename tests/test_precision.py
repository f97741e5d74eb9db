"""bf16 predictions: scores within the measured drift of fp32, the fp32 fallback, explanations untouched."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from handlers import explain, load_encoder
from handlers.precision import native_bf16
from handlers.serving.settings import HandlerSettings
from handlers.tools.evaluation import spearman
from handlers.tools.sources import sts_pairs
from tests.support.http import described, post

#: minilm, shift/cos, all STS pairs in one batch, avx512_bf16 CPU: max |Δscore| 6.4e-4, mean
#: 1.8e-4 against fp32 (scripts/bench/precision.py); the bounds leave room for other batchings.
BF16_MAX_DRIFT = 1.5e-3
BF16_MEAN_DRIFT = 5e-4
NATIVE = native_bf16(torch.device("cpu"))
EXPLAINED = ("A man is playing a guitar.", "Someone plays music on a guitar.")
METHOD_OPTIONS = {"ij": {"layer": 3, "quadrature": "gauss", "steps": 20}, "gae": {}, "lrp": {"pairwise": True}}


@pytest.fixture(scope="module")
def minilm_bf16(minilm_dir):
    """bf16 predictions even where this CPU would emulate bf16, so that the drift is checked everywhere."""
    return load_encoder(minilm_dir, reference="shift", similarity="cos", precision="bf16", native_bf16=True)


def pair_scores(encoder, pairs) -> np.ndarray:
    return np.array(encoder.score_pairs([(a, b) for a, b, _ in pairs]))


@pytest.mark.slow
def test_bf16_scores_stay_within_the_measured_drift_of_fp32(minilm_shift, minilm_bf16):
    pairs = sts_pairs()[:60]  # the pairs the drift was measured on
    fp32, bf16 = pair_scores(minilm_shift, pairs), pair_scores(minilm_bf16, pairs)
    drift = np.abs(bf16 - fp32)
    assert minilm_bf16.precision.used == "bf16"
    assert 0 < drift.max() <= BF16_MAX_DRIFT  # computed in bf16 (not fp32), and close to it
    assert drift.mean() <= BF16_MEAN_DRIFT
    gold = np.array([s for _, _, s in pairs])
    assert round(spearman(bf16, gold), 2) == round(spearman(fp32, gold), 2)


@pytest.mark.slow
def test_bf16_reference_rows_stay_exactly_zero(minilm_bf16):
    batch = minilm_bf16.references([3, 7])
    assert torch.equal(minilm_bf16.encode_batch(batch), torch.zeros(2, 384))


@pytest.mark.slow
def test_fallback_forced_by_the_setting_runs_fp32_and_says_why(minilm_dir, minilm_shift):
    fallback = load_encoder(minilm_dir, precision="bf16", native_bf16=False)
    assert (fallback.precision.requested, fallback.precision.used) == ("bf16", "fp32")
    assert "native bf16" in fallback.precision.reason
    pairs = sts_pairs()[:10]
    np.testing.assert_allclose(pair_scores(fallback, pairs), pair_scores(minilm_shift, pairs), rtol=0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHOD_OPTIONS))
def test_explanations_do_not_depend_on_the_prediction_precision(minilm_shift, minilm_bf16, method):
    minilm_bf16.score(*EXPLAINED)  # predictions first: their bf16 references must not leak into explanations
    fp32 = explain(minilm_shift, *EXPLAINED, method=method, **METHOD_OPTIONS[method])
    bf16 = explain(minilm_bf16, *EXPLAINED, method=method, **METHOD_OPTIONS[method])
    assert bf16["score"] == pytest.approx(fp32["score"], abs=1e-6)
    for key in ("attributions", "relevance_a", "relevance_b"):
        if key in fp32:
            np.testing.assert_allclose(bf16[key], fp32[key], rtol=0, atol=1e-6)
    assert abs(minilm_bf16.score(*EXPLAINED) - bf16["score"]) > 0  # predictions did run in bf16


@pytest.mark.slow
def test_the_bf16_copy_follows_the_fp32_weights(minilm_dir):
    encoder = load_encoder(minilm_dir, precision="bf16", native_bf16=True)
    before = encoder.score(*EXPLAINED)
    with torch.no_grad():  # as an optimizer step would
        for block in encoder.adapter.blocks[:2]:
            block.output.dense.weight.mul_(3.0)
        emb = encoder.embeddings(encoder.tokenize(list(EXPLAINED)))  # the fp32 weights
    fp32 = float(encoder.similarity_of(emb[:1], emb[1:]))
    after = encoder.score(*EXPLAINED)
    assert abs(after - before) > 10 * BF16_MAX_DRIFT
    assert after == pytest.approx(fp32, abs=BF16_MAX_DRIFT)


def test_archive_settings_default_to_bf16_for_torch_and_refuse_it_for_onnx():
    assert HandlerSettings().precision == "bf16"
    assert HandlerSettings(runtime="onnx").precision == "fp32"
    with pytest.raises(ValueError, match="needs runtime torch"):
        HandlerSettings(runtime="onnx", precision="bf16")


def served_scores(server, model: str, pairs) -> np.ndarray:
    return np.array([post(server, {"text_a": a, "text_b": b}, f"predictions/{model}").json()["score"]
                     for a, b, _ in pairs])


def test_served_bf16_and_its_forced_fallback(server, minilm_shift):
    pairs = sts_pairs()[:12]
    fp32 = pair_scores(minilm_shift, pairs)

    bf16 = described(server, "bf16")
    assert (bf16["precision"]["requested"], bf16["precision"]["used"]) == ("bf16", "bf16" if NATIVE else "fp32")
    assert bf16["explanations"] == {"precision": "fp32"}
    assert np.abs(served_scores(server, "bf16", pairs) - fp32).max() <= BF16_MAX_DRIFT

    fallback = described(server, "fallback")
    assert (fallback["precision"]["used"], fallback["runtime"]) == ("fp32", "torch")
    assert "native bf16" in fallback["precision"]["reason"]
    np.testing.assert_allclose(served_scores(server, "fallback", pairs), fp32, rtol=0, atol=1e-5)
    log = (server.log_dir / "model_log.log").read_text(errors="replace")
    assert "predictions in fp32, not bf16" in log


def test_served_explanations_are_the_fp32_ones(server, minilm_shift):
    body = {"text_a": EXPLAINED[0], "text_b": EXPLAINED[1], "method": "lrp", "pairwise": True}
    served = post(server, body, "explanations/bf16").json()
    expected = explain(minilm_shift, *EXPLAINED, method="lrp", pairwise=True)
    assert served["score"] == pytest.approx(expected["score"], abs=1e-5)
    np.testing.assert_allclose(served["attributions"], expected["attributions"], rtol=0, atol=1e-5)


@pytest.mark.server
def test_a_predictions_only_archive_refuses_explanations_naming_the_model_that_answers(server):
    """``siamese-archive --explained-by minilm`` (the fallback test archive): its worker set up
    and checked no explanation method, and an explanation gets a 404 naming the model that does."""
    reply = post(server, {"text_a": "A dog runs.", "text_b": "A cat sleeps.", "method": "ij"}, "explanations/fallback")
    assert reply.status_code == 404, reply.text
    assert reply.json()["field"] == "model" and "'minilm'" in reply.json()["error"]
    assert described(server, "minilm")["readiness"]["errors"]["ij"] is not None  # an archive that explains checked them
    assert described(server, "fallback").get("readiness") is None  # null: the frontend leaves it out
