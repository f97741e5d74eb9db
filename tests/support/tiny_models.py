"""Tiny randomly initialised sentence-transformers models of every supported family.

They let tests and examples exercise each family (BERT, MPNet, RoBERTa/XLM-R, T5 encoder)
without downloading anything: a small config, random weights saved as safetensors, and a
tokenizer built here from the words of the sentence pairs with the family's own special tokens
(XLM-R: <s> <pad> </s>, pad id 1; T5: only </s> appended; MPNet: <s> </s>).

    python -m tests.support.tiny_models out_dir        # writes out_dir/{bert,mpnet,xlm-roberta,t5}
"""
from __future__ import annotations

import json
import math
import sys
from collections import Counter
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (
    AutoModel,
    BertConfig,
    BertTokenizerFast,
    MPNetConfig,
    MPNetTokenizerFast,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
    XLMRobertaConfig,
    XLMRobertaTokenizerFast,
)

from handlers.tools.sources import STS_PAIRS, sts_pairs

FAMILIES = ("bert", "mpnet", "xlm-roberta", "t5")
SIZES = dict(hidden=32, layers=3, heads=4, intermediate=64)
VOCABULARY = 400


def corpus() -> list[str]:
    texts = [t for a, b, _ in (sts_pairs() if STS_PAIRS.exists() else []) for t in (a, b)]
    return texts + ["the quick brown fox jumps over the lazy dog", "a man is playing a guitar"]


def _word_counts(normalize, pre_tokenize) -> list[tuple[str, int]]:
    """The corpus's words as the tokenizer splits them, most frequent first (ties by the word):
    a vocabulary built from them is the same on every run, unlike the tokenizers' trainers."""
    counts: Counter[str] = Counter()
    for text in corpus():
        counts.update(word for word, _ in pre_tokenize(normalize(text)))
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))


def _wordpiece(specials: list[str]) -> Tokenizer:
    """WordPiece: the specials, every character alone and as a continuation, then whole words."""
    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = _word_counts(normalizer.normalize_str, pre_tokenizer.pre_tokenize_str)
    characters = sorted({c for word, _ in words for c in word})
    pieces = [*specials, *characters, *(f"##{c}" for c in characters)]
    pieces += [word for word, _ in words if word not in pieces][: max(0, VOCABULARY - len(pieces))]
    unk = "[UNK]" if "[UNK]" in specials else "<unk>"
    tok = Tokenizer(models.WordPiece({piece: i for i, piece in enumerate(pieces)}, unk_token=unk))
    tok.normalizer, tok.pre_tokenizer = normalizer, pre_tokenizer
    return tok


def _unigram(specials: list[str]) -> Tokenizer:
    """Unigram: the specials, every character, then whole words, scored by their frequency."""
    pre_tokenizer = pre_tokenizers.Metaspace()
    words = _word_counts(lambda text: text, pre_tokenizer.pre_tokenize_str)
    total = sum(count for _, count in words)
    characters: Counter[str] = Counter()
    for word, count in words:
        characters.update({c: count for c in word})
    scored = [(c, math.log(n / total)) for c, n in sorted(characters.items())]
    scored += [(w, math.log(n / total)) for w, n in words if len(w) > 1][: max(0, VOCABULARY - len(specials) - len(scored))]
    vocabulary = [(s, 0.0) for s in specials] + scored
    tok = Tokenizer(models.Unigram(vocabulary, unk_id=specials.index("<unk>"), byte_fallback=False))
    tok.pre_tokenizer, tok.decoder = pre_tokenizer, decoders.Metaspace()
    return tok


def _tokenizer(family: str):
    if family == "bert":
        tok = _wordpiece(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
        )
        return BertTokenizerFast(tokenizer_object=tok)
    if family == "mpnet":
        tok = _wordpiece(["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
        )
        return MPNetTokenizerFast(tokenizer_object=tok)
    if family == "xlm-roberta":
        tok = _unigram(["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
        )
        return XLMRobertaTokenizerFast(tokenizer_object=tok)
    tok = _unigram(["<pad>", "</s>", "<unk>"])
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, extra_ids=0)


def _model(family: str, vocab: int, pad_id: int, positions: int):
    h, n, heads, inter = SIZES["hidden"], SIZES["layers"], SIZES["heads"], SIZES["intermediate"]
    if family == "t5":
        config = T5Config(vocab_size=vocab, d_model=h, d_kv=h // heads, d_ff=inter, num_layers=n,
                          num_heads=heads, pad_token_id=pad_id, eos_token_id=1, feed_forward_proj="gated-gelu")
        return T5EncoderModel(config)
    common = dict(vocab_size=vocab, hidden_size=h, num_hidden_layers=n, num_attention_heads=heads,
                  intermediate_size=inter, max_position_embeddings=positions, pad_token_id=pad_id)
    config = {"bert": BertConfig, "mpnet": MPNetConfig, "xlm-roberta": XLMRobertaConfig}[family](**common)
    return AutoModel.from_config(config)


def build(
    family: str, target: Path, pooling: str = "mean", seed: int = 0, sharpness: float = 1.0, max_length: int = 64
) -> Path:
    """Write a tiny sentence-transformers directory of ``family`` to ``target``; ``sharpness``
    scales every Linear weight, so that the softmaxes and activations bend sharply along a path
    (a model whose integrand a few nodes cannot follow); ``max_length``: the tokens per text it
    takes (sentence-transformers' ``max_seq_length``)."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}")
    torch.manual_seed(seed)
    tokenizer = _tokenizer(family)
    model = _model(family, len(tokenizer), tokenizer.pad_token_id, max(128, max_length + 4)).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.mul_(sharpness)
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.model_max_length = max(128, max_length)
    tokenizer.save_pretrained(target)
    (target / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_length}))
    (target / "1_Pooling").mkdir(exist_ok=True)
    (target / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": SIZES["hidden"], "pooling_mode": pooling})
    )
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    (target / "modules.json").write_text(json.dumps(modules, indent=2))
    return target


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "tiny-models")
    for fam in FAMILIES:
        print(build(fam, out / fam))
