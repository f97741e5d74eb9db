"""GAE and conservative LRP on tiny models of every family and on the real minilm.

References are written here independently of the method modules: GAE from the attention
probabilities transformers itself returns (``output_attentions``), conservation from models whose
biases are zero. Conservation with biases and BiLRP: tests/test_lrp_conservation.py.
"""
from __future__ import annotations

import pytest
import torch

from handlers import explain, load_encoder
from handlers.attribution import prepare_methods, relevance
from handlers.encoder import Encoder, pool
from tests.support import tiny_models
from tests.support.explaining import PAIRS, as_tensor, explain_all

def hook_count(encoder: Encoder) -> int:
    modules = list(encoder.adapter.model.modules()) + (list(encoder.dense.modules()) if encoder.dense else [])
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in modules)


def query_key_weights(encoder: Encoder) -> list[torch.Tensor]:
    """The query and key projections: they reach the output only through the softmax."""
    weights = []
    for attention in encoder.adapter.attention_modules():
        for name in ("query", "key", "q", "k"):
            if hasattr(attention, name):
                weights.append(getattr(attention, name).weight)
    return weights


@pytest.fixture(scope="module")
def prepared(tiny_family) -> Encoder:
    _, path = tiny_family
    encoder = load_encoder(path, reference="shift", similarity="cos")
    prepare_methods(encoder)
    return encoder


# -- attention capture ------------------------------------------------------------------------
def test_gae_capture_fired_in_every_block(prepared):
    items = PAIRS
    with relevance.gradients():
        run = relevance.explained_pass(prepared, items, "gae")
        assert run.capture.fired == [1] * prepared.num_layers
        probabilities = run.capture.probabilities
        gradients = torch.autograd.grad(run.scores.sum(), probabilities)
    heads = probabilities[0].shape[1]
    width = run.batch.input_ids.shape[1]
    rows = 2 * len(items)
    for attention, gradient in zip(probabilities, gradients):
        assert attention.shape == (rows, heads, width, width)
        assert torch.allclose(attention.sum(-1), torch.ones(rows, heads, width), atol=1e-5)
        assert gradient.abs().sum((1, 2, 3)).min() > 0


def test_lrp_capture_fired_and_detaches_the_softmax(prepared):
    """With the softmax detached, the score has no gradient on the query and key projections."""
    items = PAIRS[:1]
    weights = query_key_weights(prepared)
    assert len(weights) == 2 * prepared.num_layers
    with relevance.gradients():
        run = relevance.explained_pass(prepared, items, "lrp")
        assert run.capture.fired == [1] * prepared.num_layers
        detached = torch.autograd.grad(run.scores.sum(), weights, allow_unused=True)
        plain = relevance.explained_pass(prepared, items, "off")
        assert plain.capture.fired == [0] * prepared.num_layers
        live = torch.autograd.grad(plain.scores.sum(), weights, allow_unused=True)
    assert all(g is None or g.abs().max() == 0 for g in detached)
    assert all(g is not None and g.abs().max() > 0 for g in live)


def test_predictions_unchanged_by_prepare(tiny_family, prepared):
    _, path = tiny_family
    fresh = load_encoder(path, reference="shift", similarity="cos")
    texts = [t for pair in PAIRS for t in pair]
    assert torch.allclose(prepared.encode(texts), fresh.encode(texts), atol=1e-6, rtol=0)


def test_hooks_are_installed_once(prepared):
    before = hook_count(prepared)
    rules = relevance.rules_of(prepared)
    for _ in range(10):
        prepare_methods(prepared)
        explain(prepared, *PAIRS[0], method="gae")
        explain(prepared, *PAIRS[1], method="lrp", pairwise=True)
        prepared.score(*PAIRS[2])
    assert hook_count(prepared) == before > 0
    assert relevance.rules_of(prepared) is rules and rules.mode == "off"


# -- LRP rules ------------------------------------------------------------------------------
def test_lrp_forward_value_is_the_models(prepared):
    items = PAIRS
    with relevance.gradients():
        run = relevance.explained_pass(prepared, items, "lrp")
    texts = [a for a, _ in items] + [b for _, b in items]
    assert torch.allclose(run.embeddings.detach(), prepared.encode(texts), atol=1e-5, rtol=0)
    expected = torch.tensor(prepared.score_pairs(items))
    assert torch.allclose(run.scores.detach(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("similarity", ["cos", "dot"])
def test_lrp_is_conservative_without_biases(tiny_family, similarity):
    """Without biases the rule-switched model is linear in its input, so Σ R = score exactly.

    It is not if any rule is missing: a live softmax, a live LayerNorm/RMSNorm scale, a
    detached LayerNorm centring, a plain GELU or a gated product counted twice; the plain
    gradient×input of the same model shows the difference.
    """
    _, path = tiny_family
    encoder = load_encoder(path, reference="none", similarity=similarity)
    with torch.no_grad():
        for name, parameter in encoder.adapter.model.named_parameters():
            if name.endswith("bias"):
                parameter.zero_()
    items = PAIRS
    answers = explain_all(encoder, items, "lrp")
    for answer in answers:
        assert answer["conservation_error"] < 1e-5 * max(1.0, abs(answer["score"]))
        assert sum(answer["relevance_a"]) == pytest.approx(answer["score"], abs=1e-5)
    with relevance.gradients():
        plain = relevance.explained_pass(encoder, items, "off")
        (gradient,) = torch.autograd.grad(plain.scores.sum(), plain.inputs)
    sums = (gradient * plain.inputs).sum((1, 2))[: len(items)]
    assert (sums - plain.scores).abs().max() > 1e-3


def test_conservation_error_is_what_the_answer_says(prepared):
    for answer in explain_all(prepared, PAIRS, "lrp"):
        sides = [abs(sum(answer[f"relevance_{s}"]) - answer["score"]) for s in "ab"]
        assert answer["conservation_error"] == pytest.approx(max(sides), abs=1e-9)


# BiLRP against one backward pass per embedding dimension: tests/test_lrp_conservation.py


# -- GAE against transformers' own attention probabilities -------------------------------------
def gae_reference(encoder: Encoder, text: str, other: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE relevance of ``text``'s tokens with ``other`` (the other side's embedding) fixed, and
    the share of it that the identity R = I gives (the readout weights)."""
    batch = encoder.tokenize([text])
    with relevance.gradients(), encoder.adapter.attention("eager"):  # probabilities need eager attention
        out = encoder.adapter.model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_attentions=True
        )
        attentions = out.attentions
        e = encoder.head(out.last_hidden_state, batch.attention_mask)[0]
        if encoder.reference == "shift":
            refs = encoder.references(batch.lengths)
            e = e - encoder.embed_ids(refs.input_ids, refs.attention_mask)[0].detach()
        score = (e @ other) / (e.norm() * other.norm()).detach()
        gradients = torch.autograd.grad(score, attentions)
    length = batch.lengths[0]
    result = torch.eye(length)
    for attention, gradient in zip(attentions, gradients):
        result = result + (attention[0] * gradient[0]).clamp(min=0).mean(0) @ result
    if encoder.pooling_mode == "cls":
        return result[0].double(), torch.eye(length)[0].double()
    assert encoder.pooling_mode == "mean"
    return result.mean(0).double(), torch.full((length,), 1.0 / length, dtype=torch.float64)


@pytest.fixture(scope="module")
def cls_pooled(tmp_path_factory) -> Encoder:
    return load_encoder(tiny_models.build("bert", tmp_path_factory.mktemp("cls") / "bert", pooling="cls"))


def check_gae(encoder: Encoder, text_a: str, text_b: str) -> None:
    """Compared beyond the identity's share: the rolled-out attention part is small in tiny models."""
    answer = explain(encoder, text_a, text_b, method="gae")
    unprepared = load_encoder(encoder.path, reference=encoder.reference, similarity=encoder.similarity)
    ea, eb = unprepared.encode([text_a, text_b]).clone()
    for side, text, other in (("relevance_a", text_a, eb), ("relevance_b", text_b, ea)):
        expected, identity = gae_reference(unprepared, text, other)
        attention_part = expected - identity
        assert attention_part.abs().max() > 1e-6
        tolerance = 1e-2 * attention_part.abs().max().item()
        assert torch.allclose(as_tensor(answer[side]) - identity, attention_part, rtol=0, atol=tolerance)


def test_gae_equals_reference(prepared):
    check_gae(prepared, *PAIRS[0])


def test_gae_reads_out_the_cls_row_for_cls_pooling(cls_pooled):
    check_gae(cls_pooled, *PAIRS[2])


def test_readout_follows_the_pooling():
    torch.manual_seed(0)
    tokens = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    encoder = Encoder.__new__(Encoder)
    expected = {
        "mean": mask / mask.sum(1, keepdim=True),
        "cls": torch.tensor([[1.0, 0, 0, 0, 0], [1.0, 0, 0, 0, 0]]),
        "lasttoken": torch.tensor([[0, 0, 0, 0, 1.0], [0, 0, 1.0, 0, 0]]),
    }
    for mode, weights in expected.items():
        encoder.pooling_mode = mode
        assert torch.allclose(relevance.readout_weights(encoder, tokens, mask), weights.float())
    encoder.pooling_mode = "max"
    winners = tokens.masked_fill(mask[..., None] == 0, float("-inf")).argmax(1)  # [2, 8]
    shares = torch.stack([torch.bincount(w, minlength=5) for w in winners]).float() / tokens.shape[-1]
    assert torch.allclose(relevance.readout_weights(encoder, tokens, mask), shares)
    assert torch.equal(pool(tokens, mask, "max"), tokens.gather(1, winners[:, None]).squeeze(1))



def test_max_pooling_shares_a_tie_in_every_pass():
    """Tokens tied for a dimension's maximum (exactly, or within MAX_TIE as rounding leaves them)
    share its gradient evenly, backward and forward-mode alike; the value is the maximum."""
    torch.manual_seed(0)
    tokens = torch.randn(1, 4, 6)
    tokens[0, 2] = tokens[0, 1]  # an exact tie in every dimension
    tokens[0, 3] = tokens[0, 1] * (1 + 2e-7)  # and one that rounding broke
    mask = torch.ones(1, 4, dtype=torch.long)
    assert torch.equal(pool(tokens, mask, "max"), tokens.amax(1))
    gradient = torch.func.grad(lambda t: pool(t, mask, "max").sum())(tokens)[0]
    tangents = torch.func.vmap(lambda v: torch.func.jvp(lambda t: pool(t, mask, "max"), (tokens,), (v,))[1])(
        torch.eye(4)[:, None, :, None].expand(4, 1, 4, 6).contiguous())[:, 0]  # token i's tangent: ∂max/∂x_i
    assert torch.allclose(tangents, gradient, atol=1e-7)
    for d in range(6):
        winners = [i for i in range(4) if tokens[0, i, d] >= tokens[0, :, d].max() * (1 - 1e-5 * tokens[0, :, d].max().sign())]
        assert len(winners) in (1, 3)
        shares = (gradient[:, d] * tokens[0, :, d])  # each winner carries max / k of the value
        assert torch.allclose(shares[winners], tokens[0, :, d].max() / len(winners), rtol=1e-6)
        assert float(shares.sum()) == pytest.approx(float(tokens[0, :, d].max()), rel=1e-6)


# -- batching and normalisation ------------------------------------------------------------------
@pytest.mark.parametrize("method", ["gae", "lrp"])
def test_same_relevance_alone_or_in_a_batch(prepared, method):
    options = {"pairwise": True} if method == "lrp" else {}
    together = explain_all(prepared, PAIRS, method, **options)
    for pair, batched in zip(PAIRS, together):
        alone = explain_all(prepared, [pair], method, **options)[0]
        for field in ("relevance_a", "relevance_b", "attributions"):
            if field in alone:
                assert torch.allclose(as_tensor(batched[field]), as_tensor(alone[field]), atol=1e-5)
        assert batched["score"] == pytest.approx(alone["score"], abs=1e-6)


@pytest.mark.parametrize("method", ["gae", "lrp"])
def test_normalisation_is_per_sample(prepared, method):
    raw = explain_all(prepared, PAIRS, method, normalization="none")
    for how in ("min-max", "l2"):
        scaled = explain_all(prepared, PAIRS, method, normalization=how)
        for plain, answer in zip(raw, scaled):
            for side in ("relevance_a", "relevance_b"):
                values, expected = as_tensor(answer[side]), as_tensor(plain[side])
                if how == "min-max":
                    expected = (expected - expected.min()) / (expected.max() - expected.min())
                    assert values.min() == 0 and values.max() == pytest.approx(1.0)
                else:
                    expected = expected / expected.norm()
                    assert values.norm() == pytest.approx(1.0)
                assert torch.allclose(values, expected, atol=1e-9)


# -- the real minilm ----------------------------------------------------------------------------
MINILM_PAIR = ("A man is playing a guitar.", "Someone plays an acoustic guitar on stage.")


def test_minilm_lrp_forward_and_answer(minilm_shift):
    prepare_methods(minilm_shift)
    answer = explain(minilm_shift, *MINILM_PAIR, method="lrp", pairwise=True)
    assert answer["score"] == pytest.approx(minilm_shift.score(*MINILM_PAIR), abs=1e-5)
    assert answer["tokens_a"][0] == "[CLS]" and len(answer["relevance_a"]) == len(answer["tokens_a"])
    matrix = as_tensor(answer["attributions"])
    assert matrix.shape == (len(answer["tokens_a"]), len(answer["tokens_b"]))
    tokens_a = answer["tokens_a"]
    assert tokens_a[max(range(len(tokens_a)), key=lambda i: answer["relevance_a"][i])] == "guitar"


def test_minilm_gae_equals_reference(minilm_shift):
    prepare_methods(minilm_shift)
    check_gae(minilm_shift, *MINILM_PAIR)
