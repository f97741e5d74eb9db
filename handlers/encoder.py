"""A sentence-transformers bi-encoder loaded from a local directory, with a shifted reference.

``load_encoder(path, reference="shift"|"none", similarity="cos"|"dot")`` reads the directory's
modules.json (Transformer, Pooling, optional Dense and Normalize) and builds one object that
tokenizes, builds reference inputs from the tokenizer's own special tokens, runs the
transformer through its family adapter, pools, shifts and scores.

Shift mode: e'(x) = e(x) - e(r_len(x)), so that f(r, x) = 0 exactly. e(r_n) depends only on
the length n and the weights: it is a constant of the model, computed once per length
(``reference_embeddings``) and again only when the weights change; a row that is itself the
reference gets e'(r) = 0 exactly. With autograd on (fine-tuning), where e(r) moves with the
weights, the reference rows ride in the same forward pass instead. The model's Normalize module
is not applied before the shift.
None mode: the unchanged off-the-shelf model (Normalize applied when the model has one).

Precision (``handlers.precision``): predictions (``encode_batch``) run in fp32, or, where the
device computes bf16 natively, with their matrix products in bf16 (a copy of the Linear
weights in bf16, under autocast); explanations and training always run the fp32 weights.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import AutoTokenizer

from .architectures import Adapter, load_transformer
from .cost import CostModel
from .precision import Precision, PrecisionChoice, choose_precision, linear_copy
from .reference import Mode, Reference, Similarity

RowEmbedder = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (input_ids, attention_mask) -> [B, D]
POOLING_MODES = ("mean", "cls", "max", "lasttoken")


@dataclass
class TokenBatch:
    """Right-padded token ids of several texts, with what tokenizing did to each."""

    input_ids: torch.Tensor  # [B, S]
    attention_mask: torch.Tensor  # [B, S]
    lengths: list[int]
    truncated: list[bool]

    def subset(self, rows: list[int]) -> "TokenBatch":
        """The given rows, with the padding trimmed to the longest of them."""
        width = max(self.lengths[i] for i in rows)
        return TokenBatch(
            self.input_ids[rows, :width],
            self.attention_mask[rows, :width],
            [self.lengths[i] for i in rows],
            [self.truncated[i] for i in rows],
        )

    def tokens(self, tokenizer, row: int) -> list[str]:
        return tokenizer.convert_ids_to_tokens(self.input_ids[row, : self.lengths[row]].tolist())


def _module_kind(entry: dict) -> str:
    return entry["type"].rsplit(".", 1)[-1]


def _read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _pooling_mode(config: dict) -> str:
    mode = config.get("pooling_mode")
    if mode is None:
        flags = {
            "cls": config.get("pooling_mode_cls_token"),
            "mean": config.get("pooling_mode_mean_tokens"),
            "max": config.get("pooling_mode_max_tokens"),
            "lasttoken": config.get("pooling_mode_lasttoken"),
        }
        active = [name for name, on in flags.items() if on]
        mode = active if len(active) != 1 else active[0]
        if not active:
            mode = "mean"
    if isinstance(mode, list) and len(mode) == 1:
        mode = mode[0]
    if mode not in POOLING_MODES:
        raise ValueError(f"unsupported pooling mode {mode!r}; supported: {', '.join(POOLING_MODES)}")
    return mode


def pool(token_embeddings: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Pool token embeddings [B, S, H] over the attended positions of each row."""
    mask = attention_mask.to(token_embeddings.dtype).unsqueeze(-1)
    if mode == "mean":
        return (token_embeddings * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    if mode == "cls":
        return token_embeddings[:, 0]
    if mode == "max":
        return max_pool(token_embeddings, mask != 0)
    last = attention_mask.sum(1).long() - 1
    return token_embeddings[torch.arange(token_embeddings.shape[0], device=last.device), last]


#: tokens within this relative distance of a dimension's maximum share its gradient
MAX_TIE = 1e-5


def max_pool(token_embeddings: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
    """[B, H] the maximum over the attended tokens [B, S, 1] of each dimension, whose gradient
    (and forward-mode tangent) is shared evenly by the tokens that tie for it within ``MAX_TIE``.

    A reference's [pad] rows tie exactly in families that give every pad the same position
    (XLM-R, MPNet), and rounding breaks such a tie differently from one pass to another (the
    backward of a batch, the tangents of one text): an argmax's gradient would then go to a
    different token in each. Each tied token i gets the share max / (k · x_i) (1 / k where x_i
    is 0), so the shares times the inputs add up to the maximum, the value returned exactly.
    """
    values = token_embeddings.masked_fill(~attended, torch.finfo(token_embeddings.dtype).min)
    top = values.amax(1, keepdim=True)
    v, t = values.detach(), top.detach()
    tied = attended & (v >= t - MAX_TIE * t.abs())
    ratio = torch.where(v == 0, torch.ones_like(v), t / v)
    share = torch.where(tied, ratio / tied.sum(1, keepdim=True), torch.zeros_like(v))
    shared = (token_embeddings.masked_fill(~attended, 0) * share).sum(1)
    return shared + (top[:, 0] - shared).detach()


_ACTIVATIONS = {"Identity": nn.Identity, "Tanh": nn.Tanh, "ReLU": nn.ReLU, "GELU": nn.GELU, "Sigmoid": nn.Sigmoid}


def _load_dense(path: Path) -> nn.Sequential:
    config = _read_json(path / "config.json")
    weights_file = path / "model.safetensors"
    if not weights_file.exists():
        raise ValueError(f"{path}: Dense weights must be in model.safetensors (pickles are not loaded)")
    linear = nn.Linear(config["in_features"], config["out_features"], bias=config.get("bias", True))
    state = load_file(str(weights_file))
    linear.load_state_dict({k.removeprefix("linear."): v for k, v in state.items()})
    activation = str(config.get("activation_function", "torch.nn.modules.activation.Tanh")).rsplit(".", 1)[-1]
    if activation not in _ACTIVATIONS:
        raise ValueError(f"{path}: unsupported Dense activation {activation!r}")
    return nn.Sequential(linear, _ACTIVATIONS[activation]())


class Encoder:
    """Tokenize, reference, encode, pool, shift and score, for one local model directory."""

    def __init__(
        self,
        path: str | Path,
        reference: Mode = "shift",
        similarity: Similarity = "cos",
        max_length: int | None = None,
        device: str | torch.device = "cpu",
        precision: Precision = "fp32",
        native_bf16: bool | None = None,
    ):
        Reference(reference, similarity)  # refuse a bad mode or similarity before loading anything
        self.path = Path(path)
        self.device = torch.device(device)

        modules = self._read_modules()
        kinds = [_module_kind(entry) for entry in modules]
        unknown = set(kinds) - {"Transformer", "Pooling", "Dense", "Normalize"}
        if unknown:
            raise ValueError(f"{self.path}: unsupported sentence-transformers modules {sorted(unknown)}")
        transformer_dir = self.path / next(e["path"] for e in modules if _module_kind(e) == "Transformer")
        self.adapter: Adapter = load_transformer(str(transformer_dir))
        self.adapter.model.to(self.device)
        self.precision: PrecisionChoice = choose_precision(precision, self.device, native_bf16)
        # predictions' transformer with low-precision Linear weights (None: they use the fp32 one);
        # made before any explanation method puts its hooks on the fp32 model
        self._low: Adapter | None = None
        if self.precision.used != "fp32":
            self._low = type(self.adapter)(linear_copy(self.adapter.model, self.precision.dtype))
        self.tokenizer = AutoTokenizer.from_pretrained(str(transformer_dir), local_files_only=True)

        pooling = [e for e in modules if _module_kind(e) == "Pooling"]
        self.pooling_mode = _pooling_mode(_read_json(self.path / pooling[0]["path"] / "config.json")) if pooling else "mean"
        dense = [_load_dense(self.path / e["path"]) for e in modules if _module_kind(e) == "Dense"]
        self.dense = nn.Sequential(*dense).to(self.device).eval() if dense else None
        self.normalize = "Normalize" in kinds
        self.scoring = Reference(reference, similarity, self.normalize)
        self.cost = CostModel.of(self.adapter)
        self._weights = list(self._parameters())  # listed once: walking the modules per batch costs ~0.3 ms
        self._low_version = self.weights_version()  # the weights the low-precision copy holds

        self.max_length = self._max_length(transformer_dir, max_length)
        self._prefix, self._suffix = self._special_tokens()
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        # e(r) by row embedder and token count, valid for the weights version it was computed at
        self._reference_cache: dict[Any, dict[int, torch.Tensor]] = {}
        self._reference_version = -1
        #: what the explanation methods set up on this encoder, once: each method by name
        #: (``attribution.method_of``) and the relevance rules that gae and lrp share (their hooks,
        #: ``attribution.relevance.rules_of``)
        self.methods: dict[str, Any] = {}
        self.relevance_rules: Any = None

    # -- loading -----------------------------------------------------------------------------
    def _read_modules(self) -> list[dict]:
        modules_file = self.path / "modules.json"
        if not modules_file.exists():  # a bare transformers directory: Transformer + mean pooling
            return [
                {"path": "", "type": "Transformer"},
            ]
        return sorted(_read_json(modules_file), key=lambda e: e.get("idx", 0))

    def _max_length(self, transformer_dir: Path, requested: int | None) -> int:
        config_file = transformer_dir / "sentence_bert_config.json"
        model_max = _read_json(config_file).get("max_seq_length") if config_file.exists() else None
        limits = [v for v in (requested, model_max, self.tokenizer.model_max_length, self.adapter.max_positions) if v]
        return int(min(limits)) if limits else 512

    def _special_tokens(self) -> tuple[list[int], list[int]]:
        """The ids the tokenizer puts before and after a text's own tokens."""
        probe = "hello"
        content = self.tokenizer(probe, add_special_tokens=False)["input_ids"]
        full = self.tokenizer(probe, add_special_tokens=True)["input_ids"]
        for start in range(len(full) - len(content) + 1):
            if full[start : start + len(content)] == content:
                return full[:start], full[start + len(content) :]
        raise ValueError(f"{self.path}: cannot locate the special tokens of the tokenizer")

    # -- tokens and references -----------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.adapter.num_layers

    @property
    def reference(self) -> Mode:
        return self.scoring.mode

    @property
    def similarity(self) -> Similarity:
        return self.scoring.similarity

    def tokenize(self, texts: list[str]) -> TokenBatch:
        budget = self.max_length - len(self._prefix) - len(self._suffix)
        content = self.tokenizer(
            texts, add_special_tokens=False, truncation=True, max_length=budget + 1
        )["input_ids"]
        rows = [self._prefix + ids[:budget] + self._suffix for ids in content]
        return self.pad_rows(rows, truncated=[len(ids) > budget for ids in content])

    def reference_ids(self, length: int) -> list[int]:
        """[bos] + [pad] * (S - 2) + [eos], from the tokenizer's own special tokens."""
        middle = max(0, length - len(self._prefix) - len(self._suffix))
        return self._prefix + [self.pad_id] * middle + self._suffix

    def references(self, lengths: list[int]) -> TokenBatch:
        return self.pad_rows([self.reference_ids(n) for n in lengths], truncated=[False] * len(lengths))

    def is_reference(self, batch: TokenBatch) -> torch.Tensor:
        """[B] bool: which rows are exactly the reference of their own length."""
        refs = self.references(batch.lengths)
        width = refs.input_ids.shape[1]
        same = (batch.input_ids[:, :width] == refs.input_ids) | (refs.attention_mask == 0)
        return same.all(1)

    def pad_rows(self, rows: list[list[int]], truncated: list[bool]) -> TokenBatch:
        """Right-pad token-id rows into a TokenBatch on the encoder's device."""
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        return TokenBatch(ids.to(self.device), mask.to(self.device), [len(r) for r in rows], truncated)

    # -- embeddings ----------------------------------------------------------------------------
    def head(self, token_embeddings: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Pooling and Dense: token embeddings of the last layer -> sentence embedding."""
        pooled = pool(token_embeddings, attention_mask, self.pooling_mode)
        return self.dense(pooled) if self.dense is not None else pooled

    def embed_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Un-shifted, un-normalised sentence embeddings of token-id rows."""
        return self.head(self.adapter.forward(input_ids, attention_mask), attention_mask)

    def predict_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``embed_ids`` in the precision of predictions: ``embed_ids`` itself in fp32; in bf16 the
        transformer's matrix products in bf16 (autocast, on the bf16 Linear copy), the rest fp32."""
        if self._low is None:
            return self.embed_ids(input_ids, attention_mask)
        self._sync_low()
        with torch.autocast(self.device.type, dtype=self.precision.dtype):
            tokens = self._low.forward(input_ids, attention_mask)
        return self.head(tokens.float(), attention_mask)

    def _sync_low(self) -> None:
        """Copy the fp32 Linear weights into the low-precision ones after they changed (fine-tuning)."""
        version = self.weights_version()
        if self._low is None or version == self._low_version:
            return
        with torch.no_grad():
            for low, weight in zip(self._low.model.parameters(), self.adapter.model.parameters()):
                if low is not weight:
                    low.copy_(weight)
        self._low_version = version

    @torch.inference_mode()
    def encode_batch(self, batch: TokenBatch, embed_rows: RowEmbedder | None = None) -> torch.Tensor:
        """Final embeddings of a token batch: shifted in shift mode, as the model has them otherwise.

        ``embed_rows`` computes the un-shifted sentence embeddings of token-id rows (default
        ``predict_ids``, in the encoder's precision; ``handlers.serving.onnx_rows.OnnxRows`` runs
        the same graph in onnxruntime).
        """
        return self.embeddings(batch, embed_rows or self.predict_ids)

    def embeddings(self, batch: TokenBatch, embed_rows: RowEmbedder | None = None) -> torch.Tensor:
        """``encode_batch`` with autograd on (fine-tuning keeps the shift while training)."""
        embed_rows = embed_rows or self.embed_ids
        if not self.scoring.shifted:
            return self.scoring.compared(embed_rows(batch.input_ids, batch.attention_mask), None)
        if torch.is_grad_enabled():  # e(r) moves with the weights: the reference rows join the pass
            return self._shift_in_one_pass(batch, embed_rows)
        emb = embed_rows(batch.input_ids, batch.attention_mask)
        shifted = self.scoring.compared(emb, self.reference_embeddings(batch.lengths, embed_rows))
        return shifted.masked_fill(self.is_reference(batch)[:, None], 0.0)

    def _shift_in_one_pass(self, batch: TokenBatch, embed_rows: RowEmbedder) -> torch.Tensor:
        distinct = sorted(set(batch.lengths))
        refs = self.references(distinct)
        width = max(batch.input_ids.shape[1], refs.input_ids.shape[1])
        ids = torch.cat([_pad_to(batch.input_ids, width, self.pad_id), _pad_to(refs.input_ids, width, self.pad_id)])
        mask = torch.cat([_pad_to(batch.attention_mask, width, 0), _pad_to(refs.attention_mask, width, 0)])
        emb = embed_rows(ids, mask)
        texts, ref_emb = emb[: len(batch.lengths)], emb[len(batch.lengths) :]
        row_of_length = {n: i for i, n in enumerate(distinct)}
        return self.scoring.compared(texts, ref_emb[[row_of_length[n] for n in batch.lengths]])

    def reference_embeddings(self, lengths: list[int], embed_rows: RowEmbedder | None = None) -> torch.Tensor:
        """[len(lengths), D] the un-shifted e(r) of the reference of each length, without autograd.

        Computed once per length and row embedder, and again after the weights change (any
        in-place update, as an optimizer step, bumps a parameter's version).
        """
        embed_rows = embed_rows or self.embed_ids
        version = self.weights_version()
        if version != self._reference_version:
            self._reference_cache, self._reference_version = {}, version
        known = self._reference_cache.setdefault(embed_rows, {})
        missing = sorted(set(lengths) - known.keys())
        if missing:
            refs = self.references(missing)
            with torch.inference_mode(False), torch.no_grad():  # usable as a constant in autograd
                known.update(zip(missing, embed_rows(refs.input_ids, refs.attention_mask)))
        return torch.stack([known[n] for n in lengths])

    def _parameters(self):
        yield from self.adapter.model.parameters()
        if self.dense is not None:
            yield from self.dense.parameters()

    def weights_version(self) -> int:
        """Grows with every in-place update of a weight (an optimizer step bumps a parameter's version)."""
        return sum(p._version for p in self._weights)

    def encode(self, texts: list[str]) -> torch.Tensor:
        return self.encode_batch(self.tokenize(texts))

    # -- scores --------------------------------------------------------------------------------
    def similarity_of(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Row-wise similarity of two [N, D] embedding tensors."""
        return self.scoring.score(a, b)

    def score(self, text_a: str, text_b: str) -> float:
        return self.score_pairs([(text_a, text_b)])[0]

    def score_pairs(self, pairs: list[tuple[str, str]]) -> list[float]:
        texts = list(dict.fromkeys(t for pair in pairs for t in pair))
        emb = self.encode(texts)
        index = {t: i for i, t in enumerate(texts)}
        a = emb[[index[p[0]] for p in pairs]]
        b = emb[[index[p[1]] for p in pairs]]
        return self.similarity_of(a, b).tolist()


def _pad_to(tensor: torch.Tensor, width: int, value: int) -> torch.Tensor:
    return F.pad(tensor, (0, width - tensor.shape[1]), value=value)


def load_encoder(path: str | Path, **options: Any) -> Encoder:
    """Load a local sentence-transformers directory as a (shifted-reference) bi-encoder.

    ``options`` are ``Encoder``'s: ``reference`` (shift, none), ``similarity`` (cos, dot),
    ``max_length``, ``device``, and ``precision``: ``"bf16"`` runs predictions in bf16 where the
    device computes it natively and in fp32 elsewhere (``encoder.precision`` says which, and
    why); ``native_bf16=False`` forces that fallback. Explanations always use the fp32 weights.
    """
    return Encoder(path, **options)
