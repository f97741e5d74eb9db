"""The encoder against sentence-transformers, and the shifted reference's defining property."""
from __future__ import annotations

import pytest
import torch
from sentence_transformers import SentenceTransformer

from handlers import load_encoder
from handlers.architectures import UnsupportedArchitecture
from tests.support import tiny_models
from handlers.tools.sources import sts_pairs

TEXTS = ["A man is playing a guitar.", "The cat sleeps on the sofa.", "Hi", "Berlin trains run late again today."]


def st_cos(model: SentenceTransformer, a: list[str], b: list[str]) -> torch.Tensor:
    ea, eb = model.encode(a, convert_to_tensor=True), model.encode(b, convert_to_tensor=True)
    return model.similarity_pairwise(ea, eb)


@pytest.mark.slow
def test_minilm_none_cos_equals_sentence_transformers(minilm_dir):
    pairs = sts_pairs()
    enc = load_encoder(minilm_dir, reference="none", similarity="cos")
    ours = torch.tensor(enc.score_pairs([(a, b) for a, b, _ in pairs]))
    theirs = st_cos(SentenceTransformer(str(minilm_dir), device="cpu"), [p[0] for p in pairs], [p[1] for p in pairs])
    assert torch.allclose(ours, theirs.float(), atol=1e-5)


def test_tiny_family_none_equals_sentence_transformers(tiny_family):
    family, path = tiny_family
    enc = load_encoder(path, reference="none", similarity="cos")
    st = SentenceTransformer(str(path), device="cpu")
    assert type(st[0].auto_model).__name__.lower().startswith(family.replace("-", ""))
    ours = torch.tensor(enc.score_pairs(list(zip(TEXTS, reversed(TEXTS)))))
    assert torch.allclose(ours, st_cos(st, TEXTS, TEXTS[::-1]).float(), atol=1e-5)
    assert torch.allclose(enc.encode(TEXTS), torch.tensor(st.encode(TEXTS)), atol=1e-5)


def test_reference_uses_the_tokenizers_own_special_tokens(tiny_dirs):
    xlmr = load_encoder(tiny_dirs["xlm-roberta"])
    tok = xlmr.tokenizer
    assert xlmr.reference_ids(5) == [tok.bos_token_id, tok.pad_token_id, tok.pad_token_id, tok.pad_token_id, tok.eos_token_id]
    assert tok.pad_token_id == 1  # XLM-R's own layout, not BERT's
    t5 = load_encoder(tiny_dirs["t5"])  # T5 adds no bos: pads, then eos
    assert t5.reference_ids(4) == [t5.tokenizer.pad_token_id] * 3 + [t5.tokenizer.eos_token_id]


@pytest.mark.parametrize("similarity", ["cos", "dot"])
def test_shift_makes_the_reference_score_zero(tiny_family, similarity):
    _, path = tiny_family
    enc = load_encoder(path, reference="shift", similarity=similarity)
    for text in TEXTS:
        length = enc.tokenize([text]).lengths[0]
        ref = enc.tokenizer.decode(enc.reference_ids(length))
        ids = enc.references([length])
        ref_emb = enc.encode_batch(ids)
        assert ref_emb.abs().max().item() == 0.0, ref
        other = enc.encode([TEXTS[0]])
        assert enc.similarity_of(ref_emb, other).abs().item() < 1e-6


def test_reference_rows_are_exactly_zero_among_other_texts(tiny_family):
    _, path = tiny_family
    enc = load_encoder(path, reference="shift")
    texts = enc.tokenize(TEXTS)
    rows = [texts.input_ids[i, :n].tolist() for i, n in enumerate(texts.lengths)]
    refs = [enc.reference_ids(n) for n in texts.lengths]
    mixed = enc.pad_rows([row for pair in zip(rows, refs) for row in pair], truncated=[False] * 2 * len(rows))
    emb = enc.encode_batch(mixed)
    assert enc.is_reference(mixed).tolist() == [False, True] * len(rows)
    assert emb[1::2].abs().max().item() == 0.0
    assert emb[0::2].abs().min(dim=1).values.gt(0).any()


def test_cached_reference_equals_the_same_pass_and_follows_the_weights(tiny_family):
    _, path = tiny_family
    enc = load_encoder(path, reference="shift")
    batch = enc.tokenize(TEXTS)

    def same_pass() -> torch.Tensor:
        with torch.enable_grad():  # autograd on: the reference rows ride in the same pass
            return enc.embeddings(batch).detach()

    assert torch.allclose(enc.encode_batch(batch), same_pass(), atol=1e-5)
    with torch.no_grad():  # as an optimizer step does: in place
        for parameter in enc.adapter.model.parameters():
            parameter.mul_(1.05)
    assert torch.allclose(enc.encode_batch(batch), same_pass(), atol=1e-5)


@pytest.mark.slow
def test_attention_switch_keeps_predictions_and_restores(minilm_dir):
    enc = load_encoder(minilm_dir, reference="shift")
    fast = enc.adapter.model.config._attn_implementation
    assert fast == "sdpa"
    batch = enc.tokenize(TEXTS)
    with enc.adapter.attention("eager"):
        assert enc.adapter.model.config._attn_implementation == "eager"
        eager = enc.embed_ids(batch.input_ids, batch.attention_mask)
    assert enc.adapter.model.config._attn_implementation == fast
    assert torch.allclose(enc.embed_ids(batch.input_ids, batch.attention_mask), eager, atol=1e-5)


def test_shift_is_batch_independent(minilm_shift):
    alone = [minilm_shift.score(a, b) for a, b in zip(TEXTS, TEXTS[1:])]
    together = minilm_shift.score_pairs(list(zip(TEXTS, TEXTS[1:])))
    assert alone == pytest.approx(together, abs=1e-5)


@pytest.mark.slow
def test_shift_mode_does_not_normalize_before_the_shift(minilm_dir):
    enc = load_encoder(minilm_dir, reference="shift", similarity="dot")
    assert enc.normalize  # the model has a Normalize module ...
    batch = enc.tokenize(["A man is playing a guitar."])
    raw = enc.embed_ids(batch.input_ids, batch.attention_mask)
    ref = enc.embed_ids(*(lambda r: (r.input_ids, r.attention_mask))(enc.references(batch.lengths)))
    assert torch.allclose(enc.encode_batch(batch), raw - ref, atol=1e-6)  # ... not applied in shift mode


@pytest.mark.parametrize("pooling", ["mean", "cls", "max", "lasttoken"])
def test_pooling_variants_equal_sentence_transformers(tmp_path, pooling):
    path = tiny_models.build("bert", tmp_path / pooling, pooling=pooling)
    enc = load_encoder(path, reference="none")
    st = SentenceTransformer(str(path), device="cpu")
    assert torch.allclose(enc.encode(TEXTS), torch.tensor(st.encode(TEXTS)), atol=1e-5)


def test_truncation_is_reported(minilm_shift):
    batch = minilm_shift.tokenize(["word " * 1000, "short"])
    assert batch.truncated == [True, False]
    assert batch.lengths[0] == minilm_shift.max_length
    assert batch.input_ids[0, batch.lengths[0] - 1].item() == minilm_shift.tokenizer.sep_token_id


def test_unknown_architecture_is_named_at_load_time(tmp_path):
    from transformers import GPT2Config, GPT2Model

    GPT2Model(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitecture, match="gpt2"):
        load_encoder(tmp_path)
