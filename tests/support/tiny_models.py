"""Tiny randomly initialised sentence-transformers models of every supported family.

They let tests and examples exercise each family (BERT, MPNet, RoBERTa/XLM-R, T5 encoder)
without downloading anything: a small config, random weights saved as safetensors, and a
tokenizer trained here on the shared sentence pairs with the family's own special tokens
(XLM-R: <s> <pad> </s>, pad id 1; T5: only </s> appended; MPNet: <s> </s>).

    python -m tests.support.tiny_models out_dir        # writes out_dir/{bert,mpnet,xlm-roberta,t5}
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
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


def corpus() -> list[str]:
    texts = [t for a, b, _ in (sts_pairs() if STS_PAIRS.exists() else []) for t in (a, b)]
    return texts + ["the quick brown fox jumps over the lazy dog", "a man is playing a guitar"]


def _wordpiece(specials: list[str]) -> Tokenizer:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]" if "[UNK]" in specials else "<unk>"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(corpus(), trainers.WordPieceTrainer(vocab_size=400, special_tokens=specials))
    return tok


def _unigram(specials: list[str]) -> Tokenizer:
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=400, special_tokens=specials, unk_token="<unk>")
    tok.train_from_iterator(corpus(), trainer)
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


def _model(family: str, vocab: int, pad_id: int):
    h, n, heads, inter = SIZES["hidden"], SIZES["layers"], SIZES["heads"], SIZES["intermediate"]
    if family == "t5":
        config = T5Config(vocab_size=vocab, d_model=h, d_kv=h // heads, d_ff=inter, num_layers=n,
                          num_heads=heads, pad_token_id=pad_id, eos_token_id=1, feed_forward_proj="gated-gelu")
        return T5EncoderModel(config)
    common = dict(vocab_size=vocab, hidden_size=h, num_hidden_layers=n, num_attention_heads=heads,
                  intermediate_size=inter, max_position_embeddings=128, pad_token_id=pad_id)
    config = {"bert": BertConfig, "mpnet": MPNetConfig, "xlm-roberta": XLMRobertaConfig}[family](**common)
    return AutoModel.from_config(config)


def build(family: str, target: Path, pooling: str = "mean", seed: int = 0) -> Path:
    """Write a tiny sentence-transformers directory of ``family`` to ``target``."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}")
    torch.manual_seed(seed)
    tokenizer = _tokenizer(family)
    model = _model(family, len(tokenizer), tokenizer.pad_token_id).eval()
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.model_max_length = 128
    tokenizer.save_pretrained(target)
    (target / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64}))
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
