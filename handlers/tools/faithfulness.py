"""Faithfulness of the explanations: AOPC comprehensiveness and sufficiency, per method.

    siamese-faithfulness minilm mpnet --pairs data/sts_pairs.tsv \\
        --out docs/faithfulness

The definitions are ferret's (AOPC_Comprehensiveness_Evaluation / AOPC_Sufficiency_Evaluation
with ``based_on="perc"``), applied to one text of a pair while the other is held fixed:

- the candidates are the text's own tokens; the special tokens ([CLS]/[SEP], <s>/</s>, </s>)
  are never removed (ferret's ``remove_first_last``);
- for each fraction p of the grid (default 10, 20, 30, 40, 50 %) the rationale is the top
  k = int(p · n) of the n candidates by signed relevance (``only_pos=False``); k = 0 is skipped
  and a k already taken is counted once (ferret skips a rationale equal to the previous one);
- comprehensiveness: the score drop f(a, b) − f(a without its rationale, b); higher is better;
  sufficiency: f(a, b) − f(a with only its rationale, b); lower is better; AOPC is the mean drop
  over the distinct k.

A token is *removed* by deleting its id from the token ids (ferret's default
``remove_tokens=True``), special tokens kept, so the model sees a shorter text; the ids are not
decoded and re-tokenised, so word pieces are never re-merged. In shift mode the removed text is
scored against the reference of its new length, as the exact model scores any text. Kept tokens
stay in their original order. Both texts are explained: text a is perturbed with text b fixed
(relevance_a), then the converse (relevance_b), and the table averages the two sides over all
pairs. For ij the relevance of a token of a is its row sum of A, of a token of b its column sum
(each side sums to sum(A) ≈ score); gae and lrp are asked with ``normalization: none``.

Two baselines give the numbers a scale: ``random`` (a random order of the tokens, averaged over
``--random-draws`` draws) and ``loo`` (leave-one-out occlusion: the relevance of a token is the
drop when it alone is removed, the best possible ranking for k = 1 under comprehensiveness).
For ij the table adds the attribution error |sum(A) − score| (mean and max).

Writes ``<out>.json`` (settings, per-model and per-method results, mean curves), ``<out>.md``
(the table) and ``<out>.png`` (mean drop against the removed fraction, one row per model).
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from handlers.attribution import METHODS
from handlers.encoder import Encoder
from handlers.tools.client import LocalExplainer, Pair, explain_pairs, read_pairs
from handlers.tools.sources import STS_PAIRS

GRID = (0.1, 0.2, 0.3, 0.4, 0.5)
EXPLAINED = tuple(METHODS)
BASELINES = ("loo", "random")


@dataclass(frozen=True)
class Side:
    """One text of a pair as token ids, with the positions that may be removed."""

    ids: tuple[int, ...]
    candidates: tuple[int, ...]  # positions of the text's own (not special) tokens


def side_of(encoder: Encoder, text: str) -> Side:
    batch = encoder.tokenize([text])
    ids = batch.input_ids[0, : batch.lengths[0]].tolist()
    special = encoder.tokenizer.get_special_tokens_mask(ids, already_has_special_tokens=True)
    return Side(tuple(ids), tuple(i for i, s in enumerate(special) if not s))


def removal_count(fraction: float, n: int) -> int:
    """ferret's ``perc`` rationale size: int(fraction · n) (rounded first against 0.3·10 = 2.999…)."""
    return int(round(fraction * n, 9))


def removal_counts(n: int, grid: Sequence[float] = GRID) -> list[int]:
    """The distinct non-zero rationale sizes of a text with n candidate tokens."""
    return sorted({removal_count(p, n) for p in grid} - {0})


def ranking(side: Side, relevance: Sequence[float]) -> list[int]:
    """Candidate positions, most relevant first (``relevance`` has one value per token id)."""
    if len(relevance) != len(side.ids):
        raise ValueError(f"{len(relevance)} relevance values for {len(side.ids)} tokens")
    return sorted(side.candidates, key=lambda i: -float(relevance[i]))


def without(side: Side, removed: set[int]) -> tuple[int, ...]:
    return tuple(t for i, t in enumerate(side.ids) if i not in removed)


def only(side: Side, kept: set[int]) -> tuple[int, ...]:
    return tuple(t for i, t in enumerate(side.ids) if i in kept or i not in side.candidates)


class RowScores:
    """Embeddings of token-id rows, computed once per distinct row, in chunks."""

    def __init__(self, encoder: Encoder, chunk: int = 64):
        self.encoder = encoder
        self.chunk = chunk
        self.cache: dict[tuple[int, ...], torch.Tensor] = {}

    def embed(self, rows: Sequence[tuple[int, ...]]) -> torch.Tensor:
        missing = sorted({r for r in rows if r not in self.cache}, key=len)
        for start in range(0, len(missing), self.chunk):
            part = missing[start : start + self.chunk]
            # the Encoder's own right padding of id rows (the texts' attention masks)
            batch = self.encoder.pad_rows([list(r) for r in part], truncated=[False] * len(part))
            for row, emb in zip(part, self.encoder.encode_batch(batch)):
                self.cache[row] = emb
        return torch.stack([self.cache[r] for r in rows])

    def similarity(self, rows: Sequence[tuple[int, ...]], partner: tuple[int, ...]) -> np.ndarray:
        emb = self.embed([*rows, partner])
        return self.encoder.similarity_of(emb[:-1], emb[-1:].expand(len(rows), -1)).double().numpy()


def leave_one_out(scores: RowScores, side: Side, partner: Side) -> np.ndarray:
    """Per token id: the score drop when that token alone is removed (0 for special tokens)."""
    relevance = np.zeros(len(side.ids))
    if side.candidates:
        full = scores.similarity([side.ids], partner.ids)[0]
        dropped = scores.similarity([without(side, {i}) for i in side.candidates], partner.ids)
        relevance[list(side.candidates)] = full - dropped
    return relevance


@dataclass
class SideCurves:
    """Score drops of one side under one relevance: per grid fraction (NaN where k = 0) and AOPC."""

    comprehensiveness: np.ndarray
    sufficiency: np.ndarray
    aopc_comprehensiveness: float
    aopc_sufficiency: float


def side_curves(
    scores: RowScores, side: Side, partner: Side, relevance: Sequence[float], grid: Sequence[float] = GRID
) -> SideCurves | None:
    """ferret's AOPC comprehensiveness and sufficiency of ``relevance`` on ``side``; None when no k > 0."""
    n = len(side.candidates)
    counts = removal_counts(n, grid)
    if not counts:
        return None
    order = ranking(side, relevance)
    full = scores.similarity([side.ids], partner.ids)[0]
    removed = full - scores.similarity([without(side, set(order[:k])) for k in counts], partner.ids)
    kept = full - scores.similarity([only(side, set(order[:k])) for k in counts], partner.ids)
    at = {k: i for i, k in enumerate(counts)}

    def curve(drops: np.ndarray) -> np.ndarray:
        return np.array([drops[at[removal_count(p, n)]] if removal_count(p, n) else np.nan for p in grid])

    return SideCurves(curve(removed), curve(kept), float(removed.mean()), float(kept.mean()))


def relevance_of(answer: dict) -> tuple[np.ndarray, np.ndarray]:
    """Per-token relevance of both texts: ij row / column sums of A, gae / lrp relevance_a / _b."""
    if "attributions" in answer and answer.get("method") == "ij":
        matrix = np.asarray(answer["attributions"], dtype=float)
        return matrix.sum(1), matrix.sum(0)
    return np.asarray(answer["relevance_a"], dtype=float), np.asarray(answer["relevance_b"], dtype=float)


@dataclass
class MethodResult:
    comprehensiveness: list[float]  # AOPC per (pair, side)
    sufficiency: list[float]
    curve_comprehensiveness: list[np.ndarray]
    curve_sufficiency: list[np.ndarray]

    @classmethod
    def empty(cls) -> "MethodResult":
        return cls([], [], [], [])

    def add(self, curves: SideCurves | None) -> None:
        if curves is None:
            return
        self.comprehensiveness.append(curves.aopc_comprehensiveness)
        self.sufficiency.append(curves.aopc_sufficiency)
        self.curve_comprehensiveness.append(curves.comprehensiveness)
        self.curve_sufficiency.append(curves.sufficiency)

    def summary(self) -> dict:
        def mean_curve(curves: list[np.ndarray]) -> list[float | None]:
            if not curves:
                return []
            with np.errstate(all="ignore"):
                values = np.nanmean(np.stack(curves), axis=0)
            return [None if math.isnan(v) else float(v) for v in values]

        return {
            "sides": len(self.comprehensiveness),
            "aopc_comprehensiveness": float(np.mean(self.comprehensiveness)) if self.comprehensiveness else None,
            "aopc_sufficiency": float(np.mean(self.sufficiency)) if self.sufficiency else None,
            "curve_comprehensiveness": mean_curve(self.curve_comprehensiveness),
            "curve_sufficiency": mean_curve(self.curve_sufficiency),
        }


def random_relevance(rng: np.random.Generator, side: Side) -> np.ndarray:
    return rng.standard_normal(len(side.ids))


def evaluate(
    explainer: LocalExplainer,
    pairs: list[Pair],
    methods: Sequence[str] = EXPLAINED,
    options: dict | None = None,
    grid: Sequence[float] = GRID,
    random_draws: int = 5,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """AOPC of every method and baseline over ``pairs``, both sides, with ij's attribution error."""
    encoder = explainer.encoder
    options = options or {}
    answers = {}
    for method in methods:
        method_options = {"normalization": "none"} if method != "ij" else {
            k: options[k] for k in ("layer", "steps", "tolerance") if options.get(k) is not None}
        answers[method] = list(explain_pairs(explainer, pairs, method, method_options, progress))
    scores = RowScores(encoder)
    rng = np.random.default_rng(seed)
    results = {name: MethodResult.empty() for name in (*methods, *BASELINES)}
    failures: dict[str, int] = {method: 0 for method in methods}
    for index, pair in enumerate(tqdm(pairs, desc="perturb", unit="pair", disable=not progress)):
        sides = (side_of(encoder, pair.text_a), side_of(encoder, pair.text_b))
        for which, (side, partner) in enumerate((sides, sides[::-1])):
            for method in methods:
                answer = answers[method][index]
                if "error" in answer:
                    failures[method] += which == 0
                    continue
                results[method].add(side_curves(scores, side, partner, relevance_of(answer)[which], grid))
            loo = leave_one_out(scores, side, partner)
            results["loo"].add(side_curves(scores, side, partner, loo, grid))
            draws = [side_curves(scores, side, partner, random_relevance(rng, side), grid) for _ in range(random_draws)]
            if draws[0] is not None:
                results["random"].add(average_curves(draws))  # type: ignore[arg-type]
    summary = {name: result.summary() for name, result in results.items()}
    for method in methods:
        summary[method]["failed_pairs"] = failures[method]
        explained = [a for a in answers[method] if "error" not in a]
        summary[method]["mean_elapsed_ms"] = float(np.mean([a["elapsed_ms"] for a in explained])) if explained else None
    if "ij" in methods:
        explained = [a for a in answers["ij"] if "error" not in a]
        errors = [a["attribution_error"] for a in explained]
        summary["ij"].update(
            attribution_error_mean=float(np.mean(errors)) if errors else None,
            attribution_error_max=float(np.max(errors)) if errors else None,
            layer=explained[0]["layer"] if explained else None,
            steps=explained[0]["steps"] if explained else None,
            quadrature=explained[0].get("quadrature") if explained else None,
        )
    return summary


def average_curves(draws: list[SideCurves]) -> SideCurves:
    return SideCurves(
        np.mean([d.comprehensiveness for d in draws], axis=0),
        np.mean([d.sufficiency for d in draws], axis=0),
        float(np.mean([d.aopc_comprehensiveness for d in draws])),
        float(np.mean([d.aopc_sufficiency for d in draws])),
    )


def _cell(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown_table(results: dict[str, dict]) -> str:
    """One row per model and method: AOPC comprehensiveness (↑), sufficiency (↓), ij's error."""
    lines = [
        "| model | method | AOPC comprehensiveness ↑ | AOPC sufficiency ↓ | attribution error mean / max | sides |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for model, methods in results.items():
        for method, row in methods.items():
            error = (
                f"{row['attribution_error_mean']:.2e} / {row['attribution_error_max']:.2e}"
                if row.get("attribution_error_mean") is not None
                else ""
            )
            lines.append(
                f"| {model} | {method} | {_cell(row['aopc_comprehensiveness'])} | "
                f"{_cell(row['aopc_sufficiency'])} | {error} | {row['sides']} |"
            )
    return "\n".join(lines) + "\n"


def plot(results: dict[str, dict], grid: Sequence[float], path: Path) -> Path:
    """Mean score drop against the removed / kept fraction, one row of two panels per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(results), 2, figsize=(9, 3.2 * len(results)), squeeze=False)
    percent = [100 * p for p in grid]
    for row, (model, methods) in enumerate(results.items()):
        for col, (key, title) in enumerate(
            (("curve_comprehensiveness", "comprehensiveness: top-k% removed (↑)"),
             ("curve_sufficiency", "sufficiency: only top-k% kept (↓)"))
        ):
            ax = axes[row][col]
            for method, summary in methods.items():
                values = [np.nan if v is None else v for v in summary[key]]
                style = "--" if method in BASELINES else "-"
                ax.plot(percent, values, style, marker="o", markersize=3, label=method)
            ax.set_title(f"{model} — {title}", fontsize=9)
            ax.set_xlabel("k (% of the text's tokens)")
            ax.set_ylabel("score drop")
            ax.grid(alpha=0.3)
        axes[row][0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="minilm, mpnet or sentence-transformers folders")
    p.add_argument("--pairs", default=str(STS_PAIRS), help="CSV or TSV: text_a, text_b[, score]")
    p.add_argument("--limit", type=int, help="only the first N pairs")
    p.add_argument("--methods", nargs="+", choices=EXPLAINED, default=list(EXPLAINED))
    p.add_argument("--layer", type=int, help="ij layer (default: the encoder's, the last block but one)")
    p.add_argument("--steps", type=int, help="ij: a fixed Gauss rule of this many nodes (default: the adaptive rule)")
    p.add_argument("--tolerance", type=float, help="ij: the adaptive rule's tolerance (default: the method's, 1e-3)")
    p.add_argument("--grid", nargs="+", type=float, default=list(GRID), help="fractions of the tokens")
    p.add_argument("--random-draws", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reference", choices=["shift", "none"], default="shift")
    p.add_argument("--similarity", choices=["cos", "dot"], default="cos")
    p.add_argument("--out", required=True, help="path prefix: writes <out>.json, <out>.md, <out>.png")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    pairs = read_pairs(args.pairs)[: args.limit]
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "quiet")}
    settings["pair_count"] = len(pairs)
    results: dict[str, dict] = {}
    for model in args.models:
        explainer = LocalExplainer.load(model, args.reference, args.similarity)
        results[Path(model).name] = evaluate(
            explainer, pairs, args.methods, {"layer": args.layer, "steps": args.steps, "tolerance": args.tolerance},
            args.grid, args.random_draws, args.seed, progress=not args.quiet,
        )
        write_report(Path(args.out), settings, results)  # after every model: a long run keeps what it has
    print(markdown_table(results))


def write_report(out: Path, settings: dict, results: dict[str, dict]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"settings": settings, "results": results}, indent=1))
    out.with_suffix(".md").write_text(markdown_table(results))
    plot(results, settings["grid"], out.with_suffix(".png"))


if __name__ == "__main__":
    main()
