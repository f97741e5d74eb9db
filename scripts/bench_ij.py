"""Benchmark of the ij method against the original per-dimension algorithm.

``per_dimension_attributions`` is the original algorithm (lucasmllr/xsbert,
``explain_similarity``), written against this project's adapters: a forward pre-hook on block
``layer`` replaces the hidden state by the path r + α (x − r), α = 1, 1 − 1/N, …, 1/N, plus
the reference row; the token embeddings are shifted by the reference row, pooled, and the
Jacobian is taken with one backward pass per embedding dimension. It is the reference the
tests compare with, and the baseline the benchmark times.

    python -m scripts.bench_ij --model mpnet --layer 8 --steps 50 --pairs 1   # both, and the ratio
    python -m scripts.bench_ij --model mpnet --long-case                      # 20 vs 256 tokens
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import time

import torch

from handlers.attribution.integrated_jacobians import attribute_pairs
from handlers.config import HandlerSettings
from handlers.encoder import Encoder, load_encoder
from scripts.sources import ROOT, model_dir

PAIRS = ROOT.parent / "shared" / "data" / "sts_pairs.tsv"


def sts_pairs() -> list[tuple[str, str]]:
    rows = PAIRS.read_text(encoding="utf-8").splitlines()[1:]
    return [tuple(row.split("\t")[:2]) for row in rows if row.strip()]  # type: ignore[misc]


class _Interpolation:
    """Forward pre-hook of block ``layer``: batch [x, r] -> [r + α_k (x − r) for k] + [r]."""

    def __init__(self, steps: int):
        self.steps = steps
        self.path: torch.Tensor | None = None

    def __call__(self, module, args):
        hidden = args[0]
        x, r = hidden[0], hidden[1:2]
        alphas = torch.arange(self.steps, 0, -1, dtype=hidden.dtype) / self.steps
        path = torch.cat([r + alphas[:, None, None] * (x - r), r]).detach().requires_grad_(True)
        self.path = path
        return (path, *_broadcast_rows(args[1:]))


def _broadcast_rows(args: tuple) -> tuple:
    """Mask and position-bias rows of x and r are equal (same length, all attended): keep one."""
    return tuple(a[:1] if isinstance(a, torch.Tensor) and a.shape[0] == 2 else a for a in args)


def _reshape_hook(module, args):
    """Later blocks get the batch-2 mask / bias with the path's batch: broadcast them."""
    return (args[0], *_broadcast_rows(args[1:]))


def _vectors(encoder: Encoder, text: str, layer: int, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """v_i (per token, [S, D]) and the shifted embedding e'(x), by D backward passes."""
    batch = encoder.tokenize([text])
    ids = torch.cat([batch.input_ids, encoder.references(batch.lengths).input_ids])
    mask = torch.ones_like(ids)
    hook = _Interpolation(steps)
    blocks = encoder.adapter.blocks
    handles = [blocks[layer].register_forward_pre_hook(hook)]
    handles += [block.register_forward_pre_hook(_reshape_hook) for block in list(blocks)[layer + 1 :]]
    try:
        with torch.enable_grad():
            tokens = encoder.adapter.forward(ids, mask)
            tokens = tokens - tokens[-1]  # the shift, on token embeddings as the original does
            emb = encoder.head(tokens, mask[:1].expand(tokens.shape[0], -1))[:-1]
            jacobian = []
            for d in range(emb.shape[1]):
                (grad,) = torch.autograd.grad(emb[:, d].sum(), hook.path, retain_graph=d < emb.shape[1] - 1)
                jacobian.append(grad[:-1].sum(0) / steps)
    finally:
        for handle in handles:
            handle.remove()
    delta = (hook.path[0] - hook.path[-1]).detach()
    J = torch.stack(jacobian)  # [D, S, H]
    return torch.einsum("dsh,sh->sd", J, delta).double(), emb[0].detach().double()


def per_dimension_attributions(encoder: Encoder, text_a: str, text_b: str, layer: int, steps: int) -> torch.Tensor:
    """A of the original algorithm (shift mode, its right Riemann sum), [S_a, S_b] float64."""
    va, ea = _vectors(encoder, text_a, layer, steps)
    vb, eb = _vectors(encoder, text_b, layer, steps)
    A = va @ vb.T
    if encoder.similarity == "cos":
        A = A / ea.norm() / eb.norm()
    return A


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def relative_difference(A: torch.Tensor, B: torch.Tensor) -> float:
    return float((A - B).abs().max() / B.abs().max())


def compare(encoder: Encoder, pairs, layer: int, steps: int, budget: int) -> dict:
    rows = []
    for a, b in pairs:
        start = time.perf_counter()
        ours = attribute_pairs(encoder, [(a, b)], layer, steps, "right", budget)[0]
        fast = time.perf_counter() - start
        start = time.perf_counter()
        reference = per_dimension_attributions(encoder, a, b, layer, steps)
        slow = time.perf_counter() - start
        rows.append(dict(
            tokens=[len(ours.tokens_a), len(ours.tokens_b)], ij_s=round(fast, 3), per_dimension_s=round(slow, 2),
            ratio=round(slow / fast, 1), relative_difference=relative_difference(ours.attributions, reference),
        ))
    return {"layer": layer, "steps": steps, "pairs": rows}


def long_case(encoder: Encoder, layer: int, steps: int, budget: int) -> dict:
    """A 20-token claim against a 256-token post."""
    texts = [t for pair in sts_pairs() for t in pair]
    claim_ids = encoder.tokenizer(texts[0], add_special_tokens=False)["input_ids"]
    claim = encoder.tokenizer.decode((claim_ids * 20)[:18])
    post = " ".join(texts)
    start = time.perf_counter()
    result = attribute_pairs(encoder, [(claim, post)], layer, steps, "right", budget)[0]
    return {
        "layer": layer, "steps": steps, "memory_budget_mb": budget,
        "tokens": [len(result.tokens_a), len(result.tokens_b)],
        "seconds": round(time.perf_counter() - start, 2), "peak_rss_mb": round(peak_rss_mb()),
        "attribution_error": result.attribution_error,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--similarity", default="cos", choices=["cos", "dot"])
    parser.add_argument("--layer", type=int, default=None)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--pairs", type=int, default=1, help="how many sts pairs to compare")
    parser.add_argument("--memory-budget-mb", type=int, default=1024)
    parser.add_argument("--long-case", action="store_true", help="20 vs 256 tokens instead of the comparison")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    encoder = load_encoder(model_dir(args.model), reference="shift", similarity=args.similarity,
                           max_length=HandlerSettings().max_length)
    info = {"model": args.model, "similarity": args.similarity, "threads": torch.get_num_threads()}
    if args.long_case:
        layer = args.layer if args.layer is not None else encoder.num_layers - 2
        report = long_case(encoder, layer, args.steps, args.memory_budget_mb)
    else:
        layer = args.layer if args.layer is not None else encoder.num_layers - 2
        report = compare(encoder, sts_pairs()[: args.pairs], layer, args.steps, args.memory_budget_mb)
    print(json.dumps({**info, **report}, indent=1))


if __name__ == "__main__":
    main()
