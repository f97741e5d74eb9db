"""Every method at lengths 8 to 256 tokens per side: its time against a prediction of the same
pair, on first use of the length and repeated, and admission's estimate against the time.

    python -m scripts.bench.lengths --model minilm [--lengths 8 32 64 128 256] [--out lengths.json]

One process, one thread (as an explanation-pool worker). Admission is calibrated first, as a
worker does at load; the estimates are its ``estimate`` for each request, which refuses a
request past its method's time budget (then the request is not run: a served one would get
413). For each length, a fresh pair of texts of that many tokens (with the special tokens) is
made from the words of ``data/sts_pairs.tsv``; each call runs twice, first use and repeated.
It prints a Markdown table: milliseconds (CPU time of the process), the ratio to the
prediction, and estimate / measured.
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from handlers.attribution import method_of, options_for
from handlers.encoder import Encoder, load_encoder
from handlers.errors import OverBudget
from handlers.serving.admission import Admission
from handlers.serving.predictions import predict_items
from handlers.serving.protocol import PairItem
from handlers.serving.settings import HandlerSettings
from handlers.tools.sources import model_dir, text_of_length
from scripts.bench.gae_lrp import _timed

#: (label, method, options): every method and the option sets whose cost differs
CELLS = [
    ("gae", "gae", {}),
    ("lrp", "lrp", {}),
    ("lrp pairwise", "lrp", {"pairwise": True}),
    ("ij gauss 20", "ij", {"quadrature": "gauss", "steps": 20}),
    ("ij adaptive", "ij", {}),
]


def measure(encoder: Encoder, admission: Admission, lengths: list[int]) -> list[dict]:
    rows = []
    for k, n in enumerate(lengths):
        pair = (text_of_length(encoder.tokenizer, n, 1000 * k), text_of_length(encoder.tokenizer, n, 1000 * k + 500))
        tokens = tuple(encoder.tokenize(list(pair)).lengths)
        prediction = [_timed(lambda: predict_items(encoder, [PairItem(text_a=pair[0], text_b=pair[1])]))["cpu"]
                      for _ in range(3)]
        row = {"tokens": tokens, "prediction_ms": min(prediction)}
        for label, method, given in CELLS:
            options = options_for(method, given, admission.settings.explanation.defaults(method))
            try:
                estimate = admission.estimate(method, options, tokens) * 1000.0
            except OverBudget as refusal:
                row[label] = {"refused": str(refusal)}
                continue
            instance = method_of(encoder, method)
            first, again = (_timed(lambda: instance.attribute([pair], options))["cpu"] for _ in range(2))
            row[label] = {"estimate_ms": estimate, "first_ms": first, "again_ms": again}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| tokens (a + b) | prediction ms | " + " | ".join(label for label, _, _ in CELLS) + " |",
             "|---|---:|" + "---|" * len(CELLS)]
    for row in rows:
        cells = []
        for label, _, _ in CELLS:
            cell = row[label]
            if "refused" in cell:
                cells.append("refused (413)")
                continue
            p = row["prediction_ms"]
            cells.append(f"{cell['first_ms']:.0f} / {cell['again_ms']:.0f} ms, "
                         f"{cell['first_ms'] / p:.1f}× / {cell['again_ms'] / p:.1f}×, "
                         f"est. {cell['estimate_ms'] / cell['first_ms']:.2f} / {cell['estimate_ms'] / cell['again_ms']:.2f}")
        lines.append(f"| {row['tokens'][0]} + {row['tokens'][1]} | {row['prediction_ms']:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--lengths", type=int, nargs="+", default=[8, 32, 64, 128, 256])
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    encoder = load_encoder(model_dir(args.model))
    admission = Admission(encoder, HandlerSettings())
    admission.calibrate()
    print(f"# {args.model}, one thread, load average {os.getloadavg()[0]:.2f}; calibrated: "
          + ", ".join(f"{m} {admission.overhead_s[m] * 1000:.1f} ms + {r:.3g} s/unit" for m, r in admission.seconds_per_unit.items()))
    rows = measure(encoder, admission, args.lengths)
    print(table(rows))
    print(f"# load average at the end {os.getloadavg()[0]:.2f}")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
