"""Pictures of explanation answers (the dicts of the HTTP contract).

``heatmap_png(answer, path)``: the ij token×token matrix, a diverging colour map centred on 0,
the tokens of text a down the side and of text b along the bottom, score and attribution error
in the title. ``relevance_html(answer, path)``: gae / lrp per-token relevance of both texts as
captum's text-visualisation HTML (its colour scale, one row per text).
"""
from __future__ import annotations

import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from captum.attr import visualization as captum_vis  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402


def heatmap_png(answer: dict, path: str | Path, cmap: str = "RdBu_r") -> Path:
    """Write the ij attribution matrix of ``answer`` as a PNG heatmap."""
    matrix = np.asarray(answer["attributions"], dtype=float)
    tokens_a, tokens_b = answer["tokens_a"], answer["tokens_b"]
    if matrix.shape != (len(tokens_a), len(tokens_b)):
        raise ValueError(f"attributions are {matrix.shape}, tokens {len(tokens_a)} × {len(tokens_b)}")
    bound = float(np.abs(matrix).max()) or 1.0
    rows, cols = matrix.shape
    figure, axes = plt.subplots(figsize=(min(40, 2 + 0.3 * cols), min(40, 2 + 0.3 * rows)))
    image = axes.imshow(matrix, cmap=cmap, norm=TwoSlopeNorm(vcenter=0.0, vmin=-bound, vmax=bound), aspect="auto")
    axes.set_yticks(range(rows), labels=tokens_a, fontsize=8)
    axes.set_xticks(range(cols), labels=tokens_b, rotation=60, ha="right", fontsize=8)
    axes.set_ylabel("text a")
    axes.set_xlabel("text b")
    title = f"score {answer['score']:.4f}   attribution error {answer['attribution_error']:.2e}"
    if "layer" in answer:
        title += f"\nlayer {answer['layer']}, {answer['steps']} steps"
    axes.set_title(title)
    figure.colorbar(image, ax=axes, shrink=0.8)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _scaled(values: list[float]) -> list[float]:
    bound = max((abs(v) for v in values), default=0.0) or 1.0
    return [v / bound for v in values]


def relevance_html(answer: dict, path: str | Path) -> Path:
    """Write the per-token relevance of a gae / lrp ``answer`` as captum's visualisation HTML."""
    legend = "".join(
        f'<span style="display: inline-block; width: 10px; height: 10px; border: 1px solid; '
        f'background-color: {captum_vis._get_color(value)}"></span> {label} '
        for value, label in zip([-1, 0, 1], ["Negative", "Neutral", "Positive"])
    )
    rows = ["<tr><th>Text</th><th>Score</th><th>Method</th><th>Relevance sum</th><th>Token relevance</th></tr>"]
    for side in ("a", "b"):
        relevance = [float(v) for v in answer[f"relevance_{side}"]]
        rows.append(
            "<tr>"
            + captum_vis.format_classname(f"text {side}")
            + captum_vis.format_classname(f"{answer['score']:.4f}")
            + captum_vis.format_classname(html.escape(str(answer.get("method", ""))))
            + captum_vis.format_classname(f"{sum(relevance):.3f}")
            + captum_vis.format_word_importances(
                [html.escape(t) for t in answer[f"tokens_{side}"]], _scaled(relevance)
            )
            + "</tr>"
        )
    document = (
        '<!DOCTYPE html><html><head><meta charset="utf-8"><title>relevance</title></head><body>'
        f'<div style="border-top: 1px solid; margin-top: 5px; padding-top: 5px; display: inline-block">'
        f"<b>Legend: </b>{legend}</div><table>{''.join(rows)}</table></body></html>"
    )
    path = Path(path)
    path.write_text(document, encoding="utf-8")
    return path
