"""The ij method: equality with the original per-dimension algorithm, completeness, reference
terms, batching and chunking independence, memory bound and refusal, quadrature rules."""
from __future__ import annotations

import json
import math
import weakref

import pytest
import torch
import torch.nn.functional as F

from handlers import explain, load_encoder
from handlers.attribution import IntegratedJacobians, prepare_methods
from handlers.attribution.quadrature import RULES, nodes
from handlers.errors import OverBudget
from handlers.tools import client as explain_client
from handlers.tools.sources import sts_pairs
from tests.support.depth import repeats
from tests.support.explaining import ij_explain
from handlers.attribution.per_dimension import per_dimension_attributions, relative_difference

SHORT = "A man is playing a guitar."
LONG = "Someone plays an acoustic guitar on a small stage while the audience sings along loudly."


def hook_count(module: torch.nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in module.modules()
    )


@pytest.mark.parametrize("similarity", ["cos", "dot"])
def test_equals_per_dimension_algorithm_on_every_family(tiny_family, similarity):
    _, path = tiny_family
    encoder = load_encoder(path, reference="shift", similarity=similarity)
    # both orientations: a shorter than b, and b shorter than a (the sides swap roles)
    for a, b in [(SHORT, LONG), (LONG, SHORT)]:
        for layer in (0, encoder.num_layers - 1):
            ours = ij_explain(encoder, [(a, b)], layer, 8, "right")[0]
            reference = per_dimension_attributions(encoder, a, b, layer, 8)
            assert ours.attributions.shape == reference.shape == (len(ours.tokens_a), len(ours.tokens_b))
            assert relative_difference(ours.attributions, reference) < 1e-4


@pytest.mark.slow
def test_equals_per_dimension_algorithm_on_minilm(minilm_shift):
    a, b, _ = sts_pairs()[1]
    ours = ij_explain(minilm_shift, [(a, b)], 4, 4, "right")[0]
    reference = per_dimension_attributions(minilm_shift, a, b, 4, 4)
    assert relative_difference(ours.attributions, reference) < 1e-4
    assert ours.score == pytest.approx(minilm_shift.score(a, b), abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["right", "gauss"])
def test_attribution_error_shrinks_as_steps_grow(minilm_shift, rule):
    pairs = [(a, b) for a, b, _ in sts_pairs()[:2]]
    errors = [
        sum(r.delta for r in ij_explain(minilm_shift, pairs, 0, steps, rule))
        for steps in (2, 8, 32)
    ]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.02 * len(pairs)


def test_reference_terms_vanish_in_shift_mode(tiny_family):
    _, path = tiny_family
    encoder = load_encoder(path, reference="shift", similarity="cos")
    result = ij_explain(encoder, [(SHORT, LONG)], 1, 4)[0]
    assert result.extras["reference_terms"] == {"ra": 0.0, "rb": 0.0, "rr": 0.0}


def test_reference_terms_of_the_off_the_shelf_model(tiny_dirs):
    encoder = load_encoder(tiny_dirs["bert"], reference="none", similarity="cos")
    result = ij_explain(encoder, [(SHORT, LONG)], 0, 64)[0]
    lengths = encoder.tokenize([SHORT, LONG]).lengths
    with torch.no_grad():
        ids = encoder.tokenize([SHORT, LONG])
        refs = encoder.references(lengths)
        e_a, e_b = encoder.embed_ids(ids.input_ids, ids.attention_mask)
        r_a, r_b = encoder.embed_ids(refs.input_ids, refs.attention_mask)
    cos = lambda x, y: float(F.cosine_similarity(x[None], y[None])[0])  # noqa: E731
    terms = result.extras["reference_terms"]
    assert terms["ra"] == pytest.approx(cos(e_a, r_b), abs=1e-5)
    assert terms["rb"] == pytest.approx(cos(r_a, e_b), abs=1e-5)
    assert terms["rr"] == pytest.approx(cos(r_a, r_b), abs=1e-5)
    assert result.score == pytest.approx(encoder.score(SHORT, LONG), abs=1e-5)
    assert abs(terms["ra"]) + abs(terms["rb"]) + abs(terms["rr"]) > 0.1
    # the attributions account for the score less the reference terms
    assert result.extras["attribution_sum"] == pytest.approx(result.score - terms["ra"] - terms["rb"] + terms["rr"], abs=1e-3)


@pytest.mark.slow
def test_batch_and_chunking_do_not_change_attributions(minilm_shift):
    pairs = [(a, b) for a, b, _ in sts_pairs()[:3]] + [(LONG, SHORT), sts_pairs()[0][:2]]
    method = IntegratedJacobians(minilm_shift)
    options = IntegratedJacobians.Options(layer=3, steps=6, quadrature="gauss")
    alone = [method.attribute([pair], options)[0] for pair in pairs]
    together = method.attribute(pairs, options)
    chunked = method.attribute(pairs, options.model_copy(update={"memory_budget_mb": 16}))
    for one, many, small in zip(alone, together, chunked):
        assert relative_difference(many.attributions, one.attributions) < 1e-5
        assert relative_difference(small.attributions, one.attributions) < 1e-5
        assert many.score == pytest.approx(one.score, abs=1e-6)
        assert many.delta == pytest.approx(one.delta, abs=1e-6)
    assert (together[1].extras["layer"], together[3].extras["steps"]) == (3, 6)


class SavedForBackward:
    """Bytes of the tensors that autograd graphs hold for a backward pass: at most at once, and now.

    A tensor counts from when a graph saves it until the graph lets it go; views of one storage
    count once. Tensors wrapped by a torch.func transform have no storage of their own and
    count by their (per-example) size, so the sum errs low there.
    """

    def __init__(self) -> None:
        self.holders: dict[object, list[int]] = {}  # storage -> [graphs holding it, bytes]
        self.bytes = self.peak = self.wrapped = 0

    def pack(self, tensor: torch.Tensor) -> "_Box":
        try:
            storage = tensor.untyped_storage()
            key, size = (storage.data_ptr(), storage.nbytes()), storage.nbytes()
        except RuntimeError:
            self.wrapped += 1
            key, size = ("wrapped", self.wrapped), tensor.numel() * tensor.element_size()
        entry = self.holders.setdefault(key, [0, size])
        if entry[0] == 0:
            self.bytes += size
            self.peak = max(self.peak, self.bytes)
        entry[0] += 1
        box = _Box(tensor)
        weakref.finalize(box, self._release, key)
        return box

    @staticmethod
    def unpack(box: "_Box") -> torch.Tensor:
        return box.tensor

    def _release(self, key) -> None:
        entry = self.holders[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.bytes -= entry[1]
            del self.holders[key]


class _Box:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


@pytest.mark.slow
def test_memory_held_stays_within_the_budget_whatever_the_number_of_pairs(minilm_shift):
    # Grad mode is on, as in TorchServe's handle, and the model's parameters require grad: a
    # graph recorded by a chunk and kept past it would add up over the chunks of the call.
    assert torch.is_grad_enabled() and all(p.requires_grad for p in minilm_shift.adapter.model.parameters())
    budget_mb = 64
    pairs = [(a, b) for a, b, _ in sts_pairs()[:8]]
    peaks = []
    for n in (2, 8):
        saved = SavedForBackward()
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
            results = ij_explain(minilm_shift, pairs[:n], 3, 8, memory_budget_mb=budget_mb)
        assert len(results) == n and not any(r.attributions.requires_grad for r in results)
        assert 0 < saved.peak <= budget_mb * 2**20, f"{n} pairs: {saved.peak / 2**20:.0f} MB held at once"
        assert saved.bytes == 0  # nothing saved outlives the call
        peaks.append(saved.peak)
    assert peaks[1] <= 1.25 * peaks[0]  # bounded per chunk, not growing with the pairs × steps


def test_request_over_the_memory_budget_is_refused(minilm_shift):
    with pytest.raises(OverBudget) as refused:
        explain(minilm_shift, SHORT, "guitar " * 400, method="ij", layer=0, steps=4, memory_budget_mb=16)
    assert refused.value.field == "text_b" and "memory budget" in refused.value.message
    answered = explain(minilm_shift, SHORT, LONG, method="ij", layer=0, steps=4, memory_budget_mb=16)
    assert len(answered["attributions"]) == len(answered["tokens_a"])


def test_options_of_another_method_are_refused_in_process(minilm_shift):
    from handlers.errors import InvalidOption

    with pytest.raises(InvalidOption) as refused:
        explain(minilm_shift, SHORT, LONG, method="ij", pairwise=True)
    assert refused.value.field == "pairwise"


def test_explain_answer_carries_the_contract(minilm_shift):
    answer = explain(minilm_shift, SHORT, LONG, method="ij", layer=2, steps=5)
    assert answer["method"] == "ij" and answer["elapsed_ms"] > 0
    assert (answer["layer"], answer["steps"]) == (2, 5)
    matrix = answer["attributions"]
    assert len(matrix) == len(answer["tokens_a"]) and all(len(r) == len(answer["tokens_b"]) for r in matrix)
    assert answer["attribution_sum"] == pytest.approx(sum(map(sum, matrix)), abs=1e-9)
    assert answer["attribution_error"] == pytest.approx(abs(answer["attribution_sum"] - answer["score"]), abs=1e-12)
    assert answer["tokens_a"][0] == "[CLS]" and answer["tokens_b"][-1] == "[SEP]"


def test_repeated_requests_leave_the_hook_count_unchanged(tiny_dirs):
    """Every layer and both step counts, many times over (1,000 requests under SIAMESE_DEEP=1)."""
    encoder = load_encoder(tiny_dirs["bert"])
    prepare_methods(encoder)  # what the handler's initialize does
    before = hook_count(encoder.adapter.model)
    for i in range(repeats(24, 1000)):
        explain(encoder, SHORT, LONG, method="ij", layer=i % encoder.num_layers, steps=1 + i % 2)
    assert hook_count(encoder.adapter.model) == before


def test_heatmap_and_client_render_an_answer(minilm_shift, tmp_path):
    answer = explain(minilm_shift, SHORT, LONG, method="ij", layer=4, steps=3)
    saved = tmp_path / "answer.json"
    saved.write_text(json.dumps(answer))
    png = explain_client.run(["--answer", str(saved), "-o", str(tmp_path / "ij.png")])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


@pytest.mark.parametrize("rule", RULES)
def test_quadrature_rules_integrate_polynomials(rule):
    exact_degree = {"right": 0, "left": 0, "midpoint": 1, "trapezoid": 1, "gauss": 9}[rule]
    alphas, weights = nodes(rule, 5)
    assert len(alphas) == len(weights) == 5 and float(weights.sum()) == pytest.approx(1.0)
    for degree in range(exact_degree + 1):
        assert float((weights * alphas**degree).sum()) == pytest.approx(1 / (degree + 1), abs=1e-12)
    if rule == "right":
        assert alphas.tolist() == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])
    # a smooth integrand: more nodes, smaller error
    errors = [abs(float((w * torch.exp(a)).sum()) - (math.e - 1)) for a, w in (nodes(rule, n) for n in (4, 16))]
    assert errors[1] < errors[0]
