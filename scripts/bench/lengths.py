"""Every method at lengths 8 to 256 tokens per side: its time against a prediction of the same
pair, on first use of the length and repeated, and admission's estimate against the time.

    python -m scripts.bench.lengths --model minilm [--lengths 8 32 64 128 256] [--out lengths.json]

One process, one thread (as an explanation-pool worker). Admission is calibrated first, as a
worker does at load; the estimates are its ``estimate`` for each request, which refuses a
request past its method's time budget (then the request is not run: a served one would get
413). For each length, a fresh pair of texts of that many tokens (with the special tokens) is
made from the words of ``data/sts_pairs.tsv``; each call runs on first use, then three times more (the best of
those is the repeat), and admission observes every answer, as a served worker's does.
It prints a Markdown table: milliseconds (CPU time of the process), the ratio to the
prediction, and estimate / measured (the repeat's estimate is taken after the first answer).
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


#: a repeated call's time is the best of this many
REPEATS = 3


def measure(encoder: Encoder, admission: Admission, lengths: list[int], cells: list[tuple] = CELLS) -> list[dict]:
    rows = []
    for k, n in enumerate(lengths):
        pair = (text_of_length(encoder.tokenizer, n, 1000 * k), text_of_length(encoder.tokenizer, n, 1000 * k + 500))
        tokens = tuple(encoder.tokenize(list(pair)).lengths)
        prediction = [_timed(lambda: predict_items(encoder, [PairItem(text_a=pair[0], text_b=pair[1])]))["cpu"]
                      for _ in range(3)]
        row = {"tokens": tokens, "prediction_ms": min(prediction)}
        for label, method, given in cells:
            options = options_for(method, given, admission.settings.explanation.defaults(method))
            try:
                estimate = admission.estimate(method, options, tokens) * 1000.0
            except OverBudget as refusal:
                row[label] = {"refused": str(refusal)}
                continue
            instance = method_of(encoder, method)

            def served() -> None:  # as a worker does: the answers teach admission (adaptive ij: its nodes)
                admission.observe(method, options, instance.attribute([pair], options))

            first = _timed(served)["cpu"]
            estimate_again = admission.estimate(method, options, tokens) * 1000.0
            again = min(_timed(served)["cpu"] for _ in range(REPEATS))
            row[label] = {"estimate_ms": estimate, "first_ms": first, "estimate_again_ms": estimate_again, "again_ms": again}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def table(rows: list[dict], cells_of: list[tuple] = CELLS) -> str:
    lines = ["| tokens (a + b) | prediction ms | " + " | ".join(label for label, _, _ in cells_of) + " |",
             "|---|---:|" + "---|" * len(cells_of)]
    for row in rows:
        cells = []
        for label, _, _ in cells_of:
            cell = row[label]
            if "refused" in cell:
                cells.append("refused (413)")
                continue
            p = row["prediction_ms"]
            cells.append(f"{cell['first_ms']:.0f} / {cell['again_ms']:.0f} ms, "
                         f"{cell['first_ms'] / p:.1f}× / {cell['again_ms'] / p:.1f}×, "
                         f"est. {cell['estimate_ms'] / cell['first_ms']:.2f} / {cell['estimate_again_ms'] / cell['again_ms']:.2f}")
        lines.append(f"| {row['tokens'][0]} + {row['tokens'][1]} | {row['prediction_ms']:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--lengths", type=int, nargs="+", default=[8, 32, 64, 128, 256])
    parser.add_argument("--methods", nargs="+", choices=[label for label, _, _ in CELLS],
                        help="only these columns (default: all)")
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    encoder = load_encoder(model_dir(args.model))
    admission = Admission(encoder, HandlerSettings())
    admission.calibrate()
    print(f"# {args.model}, one thread, load average {os.getloadavg()[0]:.2f}; calibrated: "
          + ", ".join(f"{m} {admission.overhead_s[m] * 1000:.1f} ms + {r:.3g} s/unit" for m, r in admission.seconds_per_unit.items()))
    cells = [cell for cell in CELLS if not args.methods or cell[0] in args.methods]
    rows = measure(encoder, admission, args.lengths, cells)
    print(table(rows, cells))
    print(f"# load average at the end {os.getloadavg()[0]:.2f}")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
