"""The library on a CUDA device: the same scores and explanations as on the CPU.

Skipped where no GPU is present (CI has none); run where one is:
    SIAMESE_TEST_MODEL=path/to/minilm python -m pytest tests/test_cuda.py
"""
from __future__ import annotations

import os

import pytest
import torch

from handlers import explain, load_encoder
from handlers.tools.sources import model_dir

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

PAIRS = [("A man is playing a guitar.", "Someone plays music."),
         ("The cat sleeps on the sofa.", "A kitten is napping on the couch in the afternoon sun.")]


@pytest.fixture(scope="module")
def encoders():
    path = os.environ.get("SIAMESE_TEST_MODEL") or model_dir("minilm")
    return load_encoder(path), load_encoder(path, device="cuda")


def relative_gap(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).abs().max() / b.abs().max())


def test_scores_equal_the_cpus(encoders):
    cpu, gpu = encoders
    assert torch.allclose(torch.tensor(gpu.score_pairs(PAIRS)), torch.tensor(cpu.score_pairs(PAIRS)), atol=1e-5)


@pytest.mark.parametrize("method, options", [("ij", {"layer": 3}), ("ij", {"layer": 0, "steps": 20}),
                                             ("gae", {}), ("lrp", {"pairwise": True})])
def test_explanations_equal_the_cpus(encoders, method, options):
    cpu, gpu = encoders
    for a, b in PAIRS:
        on_cpu, on_gpu = explain(cpu, a, b, method=method, **options), explain(gpu, a, b, method=method, **options)
        assert on_gpu["score"] == pytest.approx(on_cpu["score"], abs=1e-5)
        for field in ("attributions", "relevance_a", "relevance_b"):
            if field in on_cpu:
                assert relative_gap(on_gpu[field], on_cpu[field]) < 1e-3, field
        if method == "ij" and on_gpu["quadrature"] == "adaptive":
            assert on_gpu["converged"] and on_gpu["attribution_error"] <= 1e-3 * abs(on_gpu["score"])


def test_bf16_runs_natively_and_stays_within_the_drift_bound(encoders):
    _, gpu = encoders
    path = os.environ.get("SIAMESE_TEST_MODEL") or model_dir("minilm")
    bf16 = load_encoder(path, device="cuda", precision="bf16")
    assert bf16.precision.used == "bf16"
    drift = (torch.tensor(bf16.score_pairs(PAIRS)) - torch.tensor(gpu.score_pairs(PAIRS))).abs().max()
    assert 0 < drift <= 5e-3
    a, b = PAIRS[0]
    assert relative_gap(explain(bf16, a, b, method="lrp")["relevance_a"], explain(gpu, a, b, method="lrp")["relevance_a"]) < 1e-6
