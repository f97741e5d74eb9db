"""How a batch of texts is split into forward passes: the least padding plus a cost per pass."""
from __future__ import annotations

import itertools
import random

import pytest

from handlers.inference import encode_texts, passes


def cost(lengths: list[int], parts: list[range], pass_cost: float) -> float:
    return sum(len(part) * lengths[part[-1]] + pass_cost for part in parts)


def all_splits(n: int):
    for cuts in itertools.product([False, True], repeat=n - 1):
        bounds = [0, *[i + 1 for i, cut in enumerate(cuts) if cut], n]
        yield [range(a, b) for a, b in zip(bounds, bounds[1:])]


@pytest.mark.parametrize("seed", range(40))
def test_passes_are_the_cheapest_split(seed):
    rng = random.Random(seed)
    lengths = sorted(rng.randint(3, 40) for _ in range(rng.randint(1, 11)))
    pass_cost = rng.choice([0, 8, 32, 200])
    parts = passes(lengths, pass_cost)
    assert [i for part in parts for i in part] == list(range(len(lengths)))  # every row once, in order
    best = min(cost(lengths, split, pass_cost) for split in all_splits(len(lengths)))
    assert cost(lengths, parts, pass_cost) == pytest.approx(best)


@pytest.mark.parametrize("seed", range(10))
def test_passes_hold_at_most_max_rows(seed):
    rng = random.Random(seed)
    lengths = sorted(rng.randint(3, 12) for _ in range(rng.randint(1, 60)))
    parts = passes(lengths, rng.choice([0, 32, 1e9]), max_rows=7)
    assert [i for part in parts for i in part] == list(range(len(lengths)))
    assert all(0 < len(part) <= 7 for part in parts)


def test_passes_extremes():
    assert passes([]) == []
    assert passes([5, 5, 5, 30], pass_cost=1e9) == [range(0, 4)]  # one pass when passes are dear
    assert passes([5, 5, 5, 30], pass_cost=0) == [range(0, 3), range(3, 4)]  # no padding when free
    assert passes([7] * 10, pass_cost=0, max_rows=4) == [range(0, 4), range(4, 8), range(8, 10)]


def test_split_passes_give_the_one_pass_embeddings(minilm_shift):
    texts = ["Hi", "A cat.", "A man is playing a guitar on the stage tonight.", "Dogs run.",
             "The quick brown fox jumps over the lazy dog near the river bank."]
    split, batch = encode_texts(minilm_shift, texts)
    assert len(passes(sorted(batch.lengths))) > 1
    assert batch.lengths == minilm_shift.tokenize(texts).lengths
    one = minilm_shift.encode(texts)
    assert (split - one).abs().max().item() < 1e-5
