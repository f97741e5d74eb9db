"""Draw one ij integrand along its path, with the panels the adaptive rule placed on it.

f(α) = (J_g(h(α)) (x − r)) · w for text a: the derivative along the path of the projection of
text a's embedding on w, text b's shifted embedding (shift mode, dot), so that ∫₀¹ f = score.
The panels are those of the adaptive rule on text a's side at ``--tolerance``.

    python -m scripts.bench.integrand --model minilm --pair 2 --layer 3 --out docs/ij-integrand-minilm.png
    python -m scripts.bench.integrand --model mpnet --pair 2 --layer 8 --out docs/ij-integrand-mpnet.png
"""
from __future__ import annotations

import argparse
import os

import torch

from handlers.attribution import IntegratedJacobians
from handlers.attribution.integrated_jacobians.paths import context, embedding, sides_at
from handlers.attribution.adaptive import G10K21
from handlers.encoder import load_encoder
from handlers.tools.sources import model_dir, sts_pairs


def integrand(encoder, text: str, w: torch.Tensor, layer: int, alphas: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """f(α) at every α, for ``text``'s path at ``layer``, projected on ``w``."""
    with encoder.adapter.attention("eager"):
        (side,), _ = sides_at(encoder, [text], layer)
        values = []
        for part in alphas.split(chunk):
            hidden = (side.r + part[:, None, None].to(side.x) * side.delta).contiguous()
            mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
            ctx = context(encoder, mask, hidden.dtype)
            tangent = side.delta.expand_as(hidden).contiguous()
            with torch.no_grad():
                _, out = torch.func.jvp(lambda h: embedding(encoder, h, mask, ctx, layer), (hidden,), (tangent,))
            values.append(out.double().cpu() @ w.double())
    return torch.cat(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--pair", type=int, default=2, help="row of sts_pairs.tsv (0-based)")
    parser.add_argument("--layer", type=int, default=3)
    parser.add_argument("--tolerance", type=float, default=1e-3)
    parser.add_argument("--points", type=int, default=2001)
    parser.add_argument("--out", default="docs/ij-integrand.png")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    encoder = load_encoder(model_dir(args.model), reference="shift", similarity="dot", device=args.device)
    a, b, _ = sts_pairs()[args.pair]
    w = encoder.encode([b])[0].cpu()
    alphas = torch.linspace(0, 1, args.points, dtype=torch.float64)
    f = integrand(encoder, a, w, args.layer, alphas)
    options = IntegratedJacobians.Options(layer=args.layer, quadrature="adaptive", tolerance=args.tolerance)
    (result,) = IntegratedJacobians(encoder).attribute([(a, b)], options)
    panels = result.details["panels"][0]
    nodes = torch.cat([lo + (hi - lo) * torch.from_numpy(G10K21.nodes) for lo, hi in panels])
    fig, ax = plt.subplots(figsize=(9, 3.6))
    ax.plot(alphas, f, lw=1, color="#345", label="f(α)")
    ax.plot(nodes, integrand(encoder, a, w, args.layer, nodes), "o", ms=3, color="#c33",
            label=f"nodes of the final panels ({len(panels)} panels, {result.extras['nodes'][0]} nodes evaluated)")
    for lo, _ in panels[1:]:
        ax.axvline(lo, color="#c33", lw=0.4, alpha=0.5)
    ax.set_xlabel("α (path from the reference to the text)")
    ax.set_title(f"{args.model}, layer {args.layer}, pair {args.pair}: \"{a}\" · \"{b}\" (dot, tolerance {args.tolerance:g})",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=130)
    print(f"wrote {args.out}: {len(panels)} panels on text a, nodes {result.extras['nodes']}, score {result.score:.4f}, "
          f"relative error {result.delta / abs(result.score):.1e}")


if __name__ == "__main__":
    main()
