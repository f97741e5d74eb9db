"""Where ij's integrand has a feature narrower than its panels, and which block makes it.

g(h(α)) is the shifted embedding along one text's straight path h(α) = r + α (x − r) at a layer.
The command evaluates g on a grid of α, in float32 and on a float64 copy of the model, and prints
the largest step of g between neighbouring points against the median step (a jump narrower than
the grid shows as one step holding much of the change) and how far float32 is from float64 there.
With ``--blocks`` it also hooks every block's output and every LayerNorm's input, and prints per
block the largest step over the median step (where a jump first appears, and how it grows) and
per LayerNorm the smallest input variance (a LayerNorm whose input nearly vanishes amplifies).

    python -m scripts.bench.path_features --model mpnet --text "A man is playing a guitar." \
        --layer 0 --from 0.48 --to 0.50
    python -m scripts.bench.path_features --model mpnet --text "A man is playing a guitar." \
        --layer 0 --from 0.48972 --to 0.48974 --blocks
"""
from __future__ import annotations

import argparse

import torch

from handlers.attribution.integrated_jacobians.paths import context, embedding, sides_at
from handlers.encoder import load_encoder
from handlers.tools.sources import model_dir


def along_path(encoder, side, layer: int, alphas: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """g at every α of the grid [A, D], the model in ``dtype``."""
    r, delta = side.r.to(dtype), side.delta.to(dtype)
    hidden = r[None] + alphas.to(dtype)[:, None, None] * delta[None]
    mask = torch.ones(hidden.shape[:2], dtype=torch.long)
    with torch.no_grad():
        return embedding(encoder, hidden, mask, context(encoder, mask, hidden.dtype), layer).double()


def steps(values: torch.Tensor) -> torch.Tensor:
    """The norm of the change between neighbouring grid points [A − 1]."""
    flat = values.flatten(1)
    return (flat[1:] - flat[:-1]).norm(dim=1)


def hooked(model: torch.nn.Module) -> dict[str, list[torch.Tensor]]:
    """Record every block's output (its first tensor) and every LayerNorm's input variance."""
    records: dict[str, list[torch.Tensor]] = {}

    def keep(name: str, layer_norm: bool):
        def hook(module, inputs, output):
            if layer_norm:
                records.setdefault(name, []).append(inputs[0].var(-1, unbiased=False).detach())
            else:
                records.setdefault(name, []).append((output[0] if isinstance(output, tuple) else output).detach())
        return hook

    for name, module in model.named_modules():
        parts = name.split(".")
        if isinstance(module, torch.nn.LayerNorm):
            module.register_forward_hook(keep(name, True))
        elif len(parts) >= 2 and parts[-1].isdigit() and parts[-2] in ("layer", "block", "layers"):
            module.register_forward_hook(keep(name, False))
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mpnet")
    parser.add_argument("--text", required=True)
    parser.add_argument("--layer", type=int, default=0)
    parser.add_argument("--from", dest="start", type=float, default=0.0)
    parser.add_argument("--to", dest="end", type=float, default=1.0)
    parser.add_argument("--points", type=int, default=101)
    parser.add_argument("--blocks", action="store_true", help="hook the blocks and LayerNorms (float64)")
    args = parser.parse_args()
    encoder = load_encoder(model_dir(args.model), reference="shift", similarity="cos")
    exact = load_encoder(model_dir(args.model), reference="shift", similarity="cos")
    exact.adapter.model.double()
    alphas = torch.linspace(args.start, args.end, args.points, dtype=torch.float64)
    with encoder.adapter.attention("eager"), exact.adapter.attention("eager"):
        (side,), _ = sides_at(encoder, [args.text], args.layer)
        g32 = along_path(encoder, side, args.layer, alphas, torch.float32)
        records = hooked(exact.adapter.model) if args.blocks else {}
        g64 = along_path(exact, side, args.layer, alphas, torch.float64)
    step = steps(g64)
    k = int(step.argmax())
    print(f"{side.length} tokens, layer {args.layer}, {args.points} points in [{args.start}, {args.end}]")
    print(f"|g| from {float(g64.norm(dim=1).min()):.4f} to {float(g64.norm(dim=1).max()):.4f}; largest step "
          f"{float(step[k]):.3e} between α = {float(alphas[k]):.8f} and {float(alphas[k + 1]):.8f}, "
          f"{float(step[k] / step.median()):.0f}× the median step; total change {float(step.sum()):.3e}")
    print(f"float32 against float64: max |Δg| {float((g32 - g64).norm(dim=1).max()):.2e}")
    for name, values in records.items():
        stacked = torch.cat(values)
        if stacked.dim() == 2:  # a LayerNorm's input variance [A, S]
            print(f"{name:48s} smallest input variance {float(stacked.min()):.3e}")
        else:
            block = steps(stacked)
            print(f"{name:48s} largest step {float(block.max() / block.median()):8.1f}× the median, at point {int(block.argmax())}")


if __name__ == "__main__":
    main()
