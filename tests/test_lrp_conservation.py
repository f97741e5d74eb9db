"""Conservative LRP adds up to the served score: Σ relevance = score per side, Σ_ij A_ij = score
pairwise, in both reference modes, for cos and dot, on tiny models of every family and on minilm.

Independent references: the bias terms of each row from the test's own forward hooks on every
biased module (b·∂f/∂y_i by autograd), and models whose biases are zero (relevance is then the
plain gradient×input through the rules, and the bias share is 0).
"""
from __future__ import annotations

import json
import shutil
import time

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from handlers import load_encoder
from handlers.attribution import LRP, lrp, method_of, prepare_methods, relevance
from handlers.encoder import Encoder
from handlers.tools.sources import text_of_length
from tests.support import tiny_models
from tests.support.explaining import PAIRS, as_tensor, explain_all
MINILM_PAIRS = [
    ("A man is playing a guitar.", "Someone plays music."),
    ("The cat sleeps on the sofa.", "A kitten is napping on the couch."),
    ("Stock markets fell sharply.", "She bought fresh bread."),
]
MODES = [(r, s) for r in ("shift", "none") for s in ("cos", "dot")]
TOLERANCE = 1e-5


def answers_of(encoder: Encoder, pairs, **options) -> list[dict]:
    return explain_all(encoder, pairs, "lrp", **options)


def lrp_of(encoder: Encoder) -> LRP:
    return method_of(encoder, "lrp")  # type: ignore[return-value]


def check_conservation(encoder: Encoder, pairs, pairwise: bool = True, relative: float = TOLERANCE) -> list[dict]:
    """Every answer: Σ R = score per side, the answer's own error says so, the forward value is the
    model's score; pairwise, Σ A = score and the row / column sums are the two sides' relevance.
    All within ``relative`` × max(1, |score|)."""
    answers = answers_of(encoder, pairs, pairwise=pairwise)
    for (a, b), answer in zip(pairs, answers):
        score = answer["score"]
        tolerance = relative * max(1.0, abs(score))
        assert score == pytest.approx(encoder.score(a, b), abs=tolerance)
        for side in "ab":
            assert sum(answer[f"relevance_{side}"]) == pytest.approx(score, abs=tolerance)
            assert 0.0 <= answer[f"bias_share_{side}"] <= 1.0
        assert answer["conservation_error"] < tolerance
        if pairwise:
            matrix = as_tensor(answer["attributions"])
            assert float(matrix.sum()) == pytest.approx(score, abs=tolerance)
            assert torch.allclose(matrix.sum(1), as_tensor(answer["relevance_a"]), atol=tolerance, rtol=0)
            assert torch.allclose(matrix.sum(0), as_tensor(answer["relevance_b"]), atol=tolerance, rtol=0)
    return answers


def with_dense(source, target, activation: str = "Tanh", pooling: str | None = None):
    """A copy of a tiny model directory with a Dense head (bias on) and, optionally, another pooling."""
    shutil.copytree(source, target)
    hidden = tiny_models.SIZES["hidden"]
    torch.manual_seed(1)
    (target / "2_Dense").mkdir()
    (target / "2_Dense" / "config.json").write_text(json.dumps({
        "in_features": hidden, "out_features": 16, "bias": True,
        "activation_function": f"torch.nn.modules.activation.{activation}",
    }))
    save_file({"linear.weight": torch.randn(16, hidden) * 0.3, "linear.bias": torch.randn(16)},
              str(target / "2_Dense" / "model.safetensors"))
    modules = json.loads((target / "modules.json").read_text())
    modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    (target / "modules.json").write_text(json.dumps(modules))
    if pooling:
        config = target / "1_Pooling" / "config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), "pooling_mode": pooling}))
    return target


def biased_encoder(path, reference: str = "shift", similarity: str = "cos", seed: int = 0) -> Encoder:
    """A tiny model with random biases (transformers initialises them to zero)."""
    encoder = load_encoder(path, reference=reference, similarity=similarity)
    generator = torch.Generator().manual_seed(seed)
    modules = [encoder.adapter.model] + ([encoder.dense] if encoder.dense is not None else [])
    with torch.no_grad():
        for module in modules:
            for name, parameter in module.named_parameters():
                if name.endswith("bias"):
                    parameter.copy_(0.5 * torch.randn(parameter.shape, generator=generator))
    return encoder


def zero_biases(encoder: Encoder) -> None:
    modules = [encoder.adapter.model] + ([encoder.dense] if encoder.dense is not None else [])
    with torch.no_grad():
        for module in modules:
            for name, parameter in module.named_parameters():
                if name.endswith("bias"):
                    parameter.zero_()


# -- every family, both reference modes, cos and dot ----------------------------------------------
@pytest.mark.parametrize("reference,similarity", MODES)
def test_conservation_every_family(tiny_family, reference, similarity):
    family, path = tiny_family
    encoder = biased_encoder(path, reference, similarity)
    answers = check_conservation(encoder, PAIRS)
    if family != "t5":  # T5 has no biases at all
        assert max(a["bias_share_a"] for a in answers) > 0.01


@pytest.mark.slow
@pytest.mark.parametrize("reference,similarity", MODES)
def test_conservation_with_a_dense_head(tmp_path, tiny_dirs, reference, similarity):
    """The Dense head's bias is added after pooling: shared among the tokens by the readout."""
    path = with_dense(tiny_dirs["bert"], tmp_path / "dense")
    check_conservation(biased_encoder(path, reference, similarity), PAIRS)


@pytest.mark.slow
@pytest.mark.parametrize("pooling", ["cls", "max", "lasttoken"])
def test_conservation_with_other_poolings(tmp_path, tiny_dirs, pooling):
    """Within 1e-4: a first or last token differs little from the reference's (the same special
    token), so the shifted embedding is a few percent of e(x) and a cosine of it carries e(x)'s
    rounding (the forward value, eager against fused attention, as much as the relevance)."""
    path = with_dense(tiny_dirs["xlm-roberta"], tmp_path / pooling, activation="ReLU", pooling=pooling)
    for reference in ("shift", "none"):
        check_conservation(biased_encoder(path, reference, "cos"), PAIRS[:2], relative=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("reference,similarity", MODES)
def test_conservation_minilm(minilm_dir, reference, similarity):
    encoder = load_encoder(minilm_dir, reference=reference, similarity=similarity)
    answers = check_conservation(encoder, MINILM_PAIRS)
    assert all(a["bias_share_a"] > 0.01 and a["bias_share_b"] > 0.01 for a in answers)


# -- the bias terms -------------------------------------------------------------------------------
def test_zero_biases_give_gradient_times_input(tiny_family):
    """Without biases the relevance is exactly gradient×input through the rules, the bias share 0."""
    _, path = tiny_family
    encoder = load_encoder(path, reference="none", similarity="cos")
    zero_biases(encoder)
    answers = answers_of(encoder, PAIRS)
    with relevance.gradients():
        run = relevance.explained_pass(encoder, PAIRS, "lrp")
        (gradient,) = torch.autograd.grad(run.scores.sum(), run.inputs)
    plain = (gradient * run.inputs).sum(-1).detach()
    for k, answer in enumerate(answers):
        for side, row in zip("ab", run.side_rows(k)):
            expected = plain[row, : run.batch.lengths[row]].double()
            assert torch.allclose(as_tensor(answer[f"relevance_{side}"]), expected, atol=1e-7, rtol=0)
            assert answer[f"bias_share_{side}"] == 0.0
            assert answer[f"bias_relevance_{side}"] == [0.0] * len(expected)
        assert answer["conservation_error"] < TOLERANCE


def biased_modules(encoder: Encoder) -> list[tuple[nn.Module, bool]]:
    """(module, on the sentence row) for every Linear / LayerNorm with a bias after the input,
    found here from the module tree (the query and key projections included)."""
    kinds = (nn.Linear, nn.LayerNorm)
    blocks = [m for m in encoder.adapter.blocks.modules() if isinstance(m, kinds) and m.bias is not None]
    dense = [m for m in encoder.dense.modules() if isinstance(m, kinds) and m.bias is not None] if encoder.dense else []
    return [(m, False) for m in blocks] + [(m, True) for m in dense]


@pytest.mark.parametrize("dense", [False, True])
def test_bias_terms_are_those_of_each_row(tmp_path, tiny_dirs, dense):
    """The bias part of the relevance is Σ_b b·∂f/∂y_i per row i, from the test's own output
    hooks (the sentence row's biases shared by the mean pooling's 1/n); dropping any one module's
    terms breaks conservation."""
    path = with_dense(tiny_dirs["bert"], tmp_path / "dense") if dense else tiny_dirs["bert"]
    encoder = biased_encoder(path, "none", "cos")
    prepare_methods(encoder)
    outputs: list[tuple[nn.Module, bool, torch.Tensor]] = []
    modules = biased_modules(encoder)
    handles = [
        module.register_forward_hook(lambda m, args, out, s=sentence: outputs.append((m, s, out)))
        for module, sentence in modules
    ]
    try:
        with relevance.gradients():
            run = relevance.explained_pass(encoder, PAIRS, "lrp")
            grads = torch.autograd.grad(run.scores.sum(), [o for _, _, o in outputs], allow_unused=True, retain_graph=True)
            inputs, bias = lrp_of(encoder).relevance_parts(run)
    finally:
        for handle in handles:
            handle.remove()
    mask = run.batch.attention_mask.double()
    expected = torch.zeros_like(mask)
    per_module = []
    for (module, sentence, _), grad in zip(outputs, grads):
        if grad is None:
            continue
        terms = (grad.double() * module.bias.detach().double()).sum(-1)
        terms = terms[:, None] * mask / mask.sum(1, keepdim=True) if sentence else terms
        per_module.append(terms)
        expected += terms
    assert len(per_module) == len(modules) - 2 * encoder.num_layers  # query and key: no gradient
    assert torch.allclose(bias.double(), expected, atol=1e-6, rtol=1e-5)
    for k, answer in enumerate(answers_of(encoder, PAIRS)):  # the answer's per-token bias part is that
        for side, row in zip("ab", run.side_rows(k)):
            length = run.batch.lengths[row]
            assert torch.allclose(as_tensor(answer[f"bias_relevance_{side}"]), expected[row, :length], atol=1e-6, rtol=1e-5)
    total = (inputs + bias).double().sum(1)
    scores = torch.cat([run.scores, run.scores]).detach().double()
    assert torch.allclose(total, scores, atol=TOLERANCE)
    for terms in per_module:  # every module's terms matter
        assert (total - terms.sum(1) - scores).abs().max() > 10 * TOLERANCE


def per_dimension_vectors(encoder: Encoder, hidden: torch.Tensor, reference: torch.Tensor | None) -> torch.Tensor:
    """[S, D] V[i, d] = x_i·∂e_d/∂x_i + Σ_b b·∂e_d/∂y_i by one backward pass per embedding dimension
    (the slow way), the bias terms through the rules' switches in reverse mode; e is the compared
    embedding (``reference`` given: the un-shifted e, minus the constant e(r)) or the raw e (None)."""
    rules = relevance.rules_of(encoder)
    length = hidden.shape[1]
    mask = torch.ones(1, length, dtype=torch.long)
    with relevance.gradients(), rules.active("lrp"):
        x = hidden.detach().requires_grad_(True)
        rows = torch.ones(1, length, requires_grad=True)
        sentence = torch.ones(1, requires_grad=True)
        with rules.bias_switches(rows, sentence):
            tokens = encoder.adapter.finish(encoder.adapter.run_blocks(x, encoder.adapter.context(mask, x)))
            pooled = encoder.head(tokens, mask)
        e = (encoder.scoring.explained(pooled, reference) if reference is not None else pooled)[0]
        weights = relevance.readout_weights(encoder, tokens.detach(), mask)[0]
        columns = []
        for d in range(e.shape[0]):
            gx, gs, gsentence = torch.autograd.grad(e[d], (x, rows, sentence), retain_graph=True, allow_unused=True)
            column = (gx * x).sum(-1)[0]
            column = column + (gs[0] if gs is not None else 0) + (gsentence * weights if gsentence is not None else 0)
            columns.append(column)
    return torch.stack(columns, 1).detach()


@pytest.mark.parametrize("reference,similarity", [("shift", "cos"), ("none", "dot")])
def test_pairwise_equals_per_dimension_backward_passes(tmp_path, tiny_family, reference, similarity):
    family, path = tiny_family
    if family == "bert":
        path = with_dense(path, tmp_path / "dense")
    encoder = biased_encoder(path, reference, similarity)
    answers = answers_of(encoder, PAIRS[:2], pairwise=True)
    with relevance.gradients():
        run = relevance.explained_pass(encoder, PAIRS[:2], "lrp")
    for k, answer in enumerate(answers):
        vectors = []
        for row in run.side_rows(k):
            length = run.batch.lengths[row]
            hidden = run.inputs[row : row + 1, :length]
            shift = encoder.reference_embeddings([length]) if reference == "shift" else None
            v = per_dimension_vectors(encoder, hidden, shift)
            if shift is not None:
                ids = encoder.references([length]).input_ids
                with torch.no_grad():
                    v = v - per_dimension_vectors(encoder, encoder.adapter.embed(ids), None)
            vectors.append(v)
        expected = vectors[0] @ vectors[1].T
        expected = expected / run.norms(encoder)[k] if similarity == "cos" else expected
        matrix = as_tensor(answer["attributions"])
        assert matrix.shape == (len(answer["tokens_a"]), len(answer["tokens_b"]))
        assert torch.allclose(matrix, expected.double(), atol=1e-5 * expected.abs().max().item(), rtol=1e-4)


def test_shift_subtracts_the_reference_position_by_position(tiny_dirs):
    """Shift mode: relevance = (V(x) − V(r)) · ∂f/∂e', with V the per-dimension decomposition of
    each un-shifted embedding (the slow way, here): the reference's adds up to e(r), carries bias
    terms, and comes off its own positions."""
    encoder = biased_encoder(tiny_dirs["bert"], "shift", "dot")
    method = lrp_of(encoder)
    with relevance.gradients():
        run = relevance.explained_pass(encoder, PAIRS[:1], "lrp")
        inputs, bias = method.relevance_parts(run)
    length = run.batch.lengths[0]
    ids = encoder.references([length]).input_ids
    with torch.no_grad():
        text, reference = run.inputs[:1, :length].detach(), encoder.adapter.embed(ids)
    v_text, v_reference = (per_dimension_vectors(encoder, x, None) for x in (text, reference))
    assert torch.allclose(v_reference.sum(0), encoder.reference_embeddings([length])[0], atol=1e-5, rtol=1e-5)
    expected = (v_text - v_reference) @ run.embeddings[1].detach()  # dot: ∂f/∂e'_a = e'_b
    assert torch.allclose((inputs + bias)[0, :length], expected, atol=1e-5)
    assert not torch.allclose(expected, v_text @ run.embeddings[1].detach(), atol=1e-3)


def test_lrp_follows_the_weights(tiny_dirs):
    """The kept reference graphs go when the weights change: after an update, the answer's score
    is still the prediction's and still adds up."""
    encoder = biased_encoder(tiny_dirs["bert"])
    before = check_conservation(encoder, PAIRS[:1], pairwise=False)
    assert len(lrp_of(encoder).references) > 0
    with torch.no_grad():
        bias = encoder.adapter.blocks[0].output.dense.bias
        bias.add_(torch.linspace(-1, 1, bias.shape[0]))  # not a constant: the norm would centre it away
    after = check_conservation(encoder, PAIRS[:1], pairwise=False)
    assert after[0]["score"] != before[0]["score"]


def test_gae_answers_are_unchanged_by_the_bias_switches(tiny_dirs):
    """GAE passes carry no bias switches: the same relevance before and after lrp has run."""
    encoder = biased_encoder(tiny_dirs["mpnet"])
    first = explain_all(encoder, PAIRS, "gae")
    answers_of(encoder, PAIRS, pairwise=True)
    again = explain_all(encoder, PAIRS, "gae")
    for x, y in zip(first, again):
        assert x["relevance_a"] == y["relevance_a"] and x["relevance_b"] == y["relevance_b"]
    rules = relevance.rules_of(encoder)
    assert rules.switch is None and rules.mode == "off"


def test_reference_graphs_keep_the_recent_lengths_within_their_bytes(tiny_dirs):
    encoder = biased_encoder(tiny_dirs["bert"])
    graphs = lrp.ReferenceGraphs(encoder, max_bytes=encoder.cost.pass_bytes(1, 4) + encoder.cost.pass_bytes(1, 3))
    for length in (4, 3, 2):
        graphs.graph(length)
    assert list(graphs._graphs) == [3, 2]
    graphs.graph(3)  # used again: the most recent
    graphs.graph(4)
    assert list(graphs._graphs) == [3, 4]
    cotangents = torch.stack([torch.ones(encoder.adapter.hidden_size), torch.linspace(-1, 1, encoder.adapter.hidden_size)])
    inputs, bias = graphs.shares(4, cotangents)
    expected = cotangents @ encoder.reference_embeddings([4])[0]
    assert torch.allclose((inputs + bias).sum(1), expected, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def long_bert(tmp_path_factory):
    """A tiny BERT that takes 256 tokens per text, as minilm does."""
    return tiny_models.build("bert", tmp_path_factory.mktemp("long") / "bert", max_length=256)


def test_conservation_at_unseen_lengths_up_to_the_longest(long_bert):
    """Every length up to the model's 256 tokens, each seen for the first time, pairwise too."""
    encoder = biased_encoder(long_bert)
    pairs = [(text_of_length(encoder.tokenizer, n), text_of_length(encoder.tokenizer, m, 7)) for n, m in ((256, 256), (200, 31), (5, 129))]
    answers = check_conservation(encoder, pairs[1:], pairwise=True)
    answers += check_conservation(encoder, pairs[:1], pairwise=False)
    assert [len(a["tokens_a"]) for a in answers] == [200, 5, 256] and len(answers[2]["tokens_b"]) == 256


def test_a_new_length_costs_what_a_seen_one_does(long_bert):
    """The CPU time of lrp at lengths seen for the first time against the same requests again,
    in one run: nothing is computed per length ahead of a request. A decomposition of e(r) per
    length, computed on first use, made it 20× a repeat at 64 tokens and 100× at 256 here; the
    bound leaves room for a shared machine's noise. A first call at another length takes the
    process's own first-use costs (kernels, allocator) out of the lengths measured."""
    encoder = biased_encoder(long_bert)
    method = lrp_of(encoder)
    options = LRP.Options()
    method.attribute([(text_of_length(encoder.tokenizer, 32), text_of_length(encoder.tokenizer, 31, 3))], options)
    ratios = []
    for n in (64, 128, 192, 256):
        pair = [(text_of_length(encoder.tokenizer, n), text_of_length(encoder.tokenizer, n - 1, 3))]
        first = time.process_time()
        method.attribute(pair, options)
        seen = time.process_time()
        method.attribute(pair, options)
        ratios.append((seen - first) / max(time.process_time() - seen, 1e-3))
    assert sorted(ratios)[len(ratios) // 2] < 5.0, ratios


@pytest.mark.parametrize("similarity", ["cos", "dot"])
def test_a_text_that_is_its_own_reference_scores_and_carries_zero(tiny_dirs, similarity):
    encoder = biased_encoder(tiny_dirs["bert"], "shift", similarity)
    reference = " ".join([encoder.tokenizer.pad_token] * 4)  # tokenized: [CLS] [PAD]×4 [SEP]
    batch = encoder.tokenize([reference])
    if not bool(encoder.is_reference(batch)[0]):
        pytest.skip("the tokenizer does not give the reference back from its text")
    (answer,) = answers_of(encoder, [(reference, PAIRS[0][0])], pairwise=True)
    assert answer["score"] == encoder.score(reference, PAIRS[0][0]) == 0.0
    assert answer["conservation_error"] == 0.0
    assert not any(answer["relevance_a"]) and not any(answer["relevance_b"])
