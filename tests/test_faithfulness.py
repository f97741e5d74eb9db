"""Faithfulness evaluation: ferret's AOPC rationale sizes, removal in token-id space, the scale
given by the leave-one-out and random baselines, and the whole report on a tiny model."""
from __future__ import annotations

import json

import numpy as np
import pytest

from handlers import explain, load_encoder
from handlers.tools import faithfulness
from handlers.tools.client import LocalExplainer, Pair
from handlers.tools.faithfulness import RowScores, leave_one_out, removal_counts, side_curves, side_of

PAIRS = [
    ("A man is playing a guitar.", "A person plays an acoustic guitar."),
    ("The cat sleeps on the sofa.", "A kitten is napping on the couch."),
    ("The train to Berlin was delayed by two hours.", "Our train arrived in Berlin two hours late."),
    ("She bought fresh bread at the bakery this morning.", "Stock markets fell sharply on Monday."),
]


def test_rationale_sizes_are_ferrets_percentages():
    # int(p * n) over 10..50 %, zero and repeated sizes dropped
    assert removal_counts(10) == [1, 2, 3, 4, 5]
    assert removal_counts(6) == [1, 2, 3]
    assert removal_counts(3) == [1]
    assert removal_counts(1) == []
    assert removal_counts(20, [0.05, 0.25]) == [1, 5]


def test_removal_keeps_the_special_tokens(tiny_family):
    family, path = tiny_family
    encoder = load_encoder(path)
    side = side_of(encoder, "the quick brown fox jumps over the lazy dog")
    special = set(encoder.tokenizer.all_special_ids)
    assert all(side.ids[i] not in special for i in side.candidates)
    assert len(side.ids) - len(side.candidates) == sum(t in special for t in side.ids) > 0
    removed = faithfulness.without(side, set(side.candidates[:2]))
    kept = faithfulness.only(side, set(side.candidates[:2]))
    assert len(removed) == len(side.ids) - 2 and len(kept) == len(side.ids) - len(side.candidates) + 2
    assert [t for t in side.ids if t in special] == [t for t in removed if t in special] == [t for t in kept if t in special]
    assert kept == tuple(t for i, t in enumerate(side.ids) if i in side.candidates[:2] or t in special)  # order kept


def test_unperturbed_rows_score_as_the_encoder(minilm_shift):
    scores = RowScores(minilm_shift)
    for a, b in PAIRS:
        value = scores.similarity([side_of(minilm_shift, a).ids], side_of(minilm_shift, b).ids)[0]
        assert value == pytest.approx(minilm_shift.score(a, b), abs=1e-6)


@pytest.mark.slow
def test_leave_one_out_is_the_best_single_removal_and_beats_random(minilm_shift):
    scores = RowScores(minilm_shift)
    rng = np.random.default_rng(0)
    loo_aopc, random_aopc = [], []
    for a, b in PAIRS:
        side, partner = side_of(minilm_shift, a), side_of(minilm_shift, b)
        loo = leave_one_out(scores, side, partner)
        best = side_curves(scores, side, partner, loo)
        draws = [side_curves(scores, side, partner, rng.standard_normal(len(side.ids))) for _ in range(5)]
        # one token removed: LOO's top token gives the largest drop of any ranking
        one = [1.0 / len(side.candidates)]
        assert side_curves(scores, side, partner, loo, one).aopc_comprehensiveness == pytest.approx(loo.max(), abs=1e-6)
        for _ in range(5):
            assert side_curves(scores, side, partner, rng.standard_normal(len(side.ids)), one).aopc_comprehensiveness <= loo.max() + 1e-6
        loo_aopc.append(best.aopc_comprehensiveness)
        random_aopc.append(np.mean([d.aopc_comprehensiveness for d in draws]))
        # the reverse ranking removes the least relevant tokens first: a smaller drop
        worst = side_curves(scores, side, partner, -loo)
        assert worst.aopc_comprehensiveness < best.aopc_comprehensiveness
        assert worst.aopc_sufficiency > best.aopc_sufficiency
    assert np.mean(loo_aopc) > np.mean(random_aopc) + 0.02


def test_ij_relevance_of_each_side_is_a_complete_attribution(minilm_shift):
    answer = explain(minilm_shift, *PAIRS[0], method="ij", layer=4, steps=3)
    rel_a, rel_b = faithfulness.relevance_of(answer)
    assert len(rel_a) == len(answer["tokens_a"]) and len(rel_b) == len(answer["tokens_b"])
    assert rel_a.sum() == pytest.approx(answer["attribution_sum"]) == pytest.approx(rel_b.sum())
    matrix = np.asarray(answer["attributions"])
    assert rel_a[1] == pytest.approx(matrix[1].sum()) and rel_b[2] == pytest.approx(matrix[:, 2].sum())
    lrp = explain(minilm_shift, *PAIRS[0], method="lrp")
    assert faithfulness.relevance_of(lrp)[1].tolist() == lrp["relevance_b"]


@pytest.mark.slow
def test_evaluate_reports_every_method_and_side(minilm_shift):
    pairs = [Pair(a, b) for a, b in PAIRS[:3]]
    summary = faithfulness.evaluate(
        LocalExplainer(minilm_shift), pairs, ["ij", "lrp"], {"layer": 4, "steps": 3}, random_draws=3, progress=False
    )
    assert set(summary) == {"ij", "lrp", "loo", "random"}
    for row in summary.values():
        assert row["sides"] == 2 * len(pairs)
        assert len(row["curve_comprehensiveness"]) == len(faithfulness.GRID)
        assert np.isfinite(row["aopc_comprehensiveness"]) and np.isfinite(row["aopc_sufficiency"])
    ij = summary["ij"]
    assert ij["layer"] == 4 and ij["steps"] == 3 and ij["failed_pairs"] == 0
    answers = [explain(minilm_shift, p.text_a, p.text_b, method="ij", layer=4, steps=3) for p in pairs]
    assert ij["attribution_error_max"] == pytest.approx(max(a["attribution_error"] for a in answers), rel=1e-4)
    assert summary["loo"]["aopc_comprehensiveness"] > summary["random"]["aopc_comprehensiveness"]


def test_report_files(tiny_dirs, tmp_path):
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("text_a,text_b\nthe cat sleeps on the sofa,a dog runs in the park\na man plays,music is loud\n")
    out = tmp_path / "report" / "faith"
    assert faithfulness.main(  # a console command's exit status: None is 0 (a dict was printed, status 1)
        [str(tiny_dirs["bert"]), "--pairs", str(pairs), "--steps", "2", "--random-draws", "2", "--out", str(out), "--quiet"]
    ) is None
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["settings"]["pair_count"] == 2 and report["settings"]["steps"] == 2
    methods = report["results"]["bert"]
    assert set(methods) == {"ij", "gae", "lrp", "loo", "random"}
    table = out.with_suffix(".md").read_text().splitlines()
    assert len(table) == 2 + 5 and all(f"| bert | {m} |" in "\n".join(table) for m in methods)
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
