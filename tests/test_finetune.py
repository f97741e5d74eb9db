"""Exact-model fine-tuning: the weights move, the reference stays at zero, the archive builds."""
from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from handlers import load_encoder
from handlers.tools import finetune
from handlers.tools.sources import STS_PAIRS


def test_a_few_steps_change_the_weights_and_keep_the_model_exact(tiny_dirs, tmp_path):
    source = tiny_dirs["bert"]
    out = tmp_path / "run"
    args = finetune.parser().parse_args([
        str(source), "--pairs", str(STS_PAIRS), "--out", str(out), "--max-steps", "4",
        "--batch-size", "8", "--lr", "1e-3", "--checkpoint-every", "2",
    ])
    report = finetune.train(args)

    before, after = load_file(str(source / "model.safetensors")), load_file(str(out / "model" / "model.safetensors"))
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(moved) > len(before) // 2
    assert (out / "checkpoint-2" / "model.safetensors").exists() and (out / "checkpoint-4").exists()
    assert json.loads((out / "report.json").read_text())["steps"] == 4
    assert -1.0 <= report["spearman_before"] <= 1.0 and -1.0 <= report["spearman_after"] <= 1.0

    trained = load_encoder(out / "model", reference="shift")
    text = "A man is playing a guitar."
    length = trained.tokenize([text]).lengths[0]
    reference = trained.encode_batch(trained.references([length]))
    assert reference.abs().max().item() == 0.0
    assert trained.similarity_of(reference, trained.encode([text])).abs().item() < 1e-6
    assert trained.score(text, "A dog runs.") != load_encoder(source).score(text, "A dog runs.")


def test_pairs_are_read_from_csv_too(tmp_path):
    csv_file = tmp_path / "pairs.csv"
    csv_file.write_text('text_a,text_b,score\n"a, b",c,1.5\n')
    assert finetune.read_pairs(csv_file) == [("a, b", "c", 1.5)]
