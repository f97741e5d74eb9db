"""Fine-tune a sentence-transformers model into an exact shifted-reference model.

    siamese-finetune minilm --pairs data/sts_pairs.tsv --out runs/minilm-exact \
        --epochs 2 --similarity cos --build-archive

The reference shift is kept while training: the loss is computed on
e'(x) = e(x) − e(r_len(x)) (Encoder.embeddings, the same code the server runs), so the
trained model is exact (f(r, ·) = 0) and its attributions are complete. Pairs come from a TSV or
CSV with columns text_a, text_b, score (any range; scaled to [0, 1] for cosine, kept for dot).
A held-out part is scored before and after (Spearman correlation); checkpoints are written as
sentence-transformers directories, and the final model can be packed as an archive.
"""
from __future__ import annotations

import argparse
import csv
import json
import random
import shutil
from pathlib import Path

import torch
from scipy.stats import spearmanr
from tqdm import tqdm

from handlers.encoder import Encoder, load_encoder
from handlers.tools.sources import model_dir

Pair = tuple[str, str, float]


def read_pairs(path: Path) -> list[Pair]:
    """Rows of text_a, text_b, score from a TSV or CSV file with a header."""
    delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter=delimiter))
    missing = {"text_a", "text_b", "score"} - set(rows[0] if rows else {})
    if missing:
        raise SystemExit(f"{path}: missing columns {sorted(missing)}")
    return [(r["text_a"], r["text_b"], float(r["score"])) for r in rows]


def split(pairs: list[Pair], held_out: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    shuffled = pairs[:]
    random.Random(seed).shuffle(shuffled)
    n_eval = max(2, int(round(len(shuffled) * held_out)))
    return shuffled[n_eval:], shuffled[:n_eval]


def pair_scores(encoder: Encoder, pairs: list[Pair], grad: bool = False) -> torch.Tensor:
    texts = list(dict.fromkeys(t for a, b, _ in pairs for t in (a, b)))
    batch = encoder.tokenize(texts)
    emb = encoder.embeddings(batch) if grad else encoder.encode_batch(batch)
    row = {t: i for i, t in enumerate(texts)}
    return encoder.similarity_of(emb[[row[a] for a, _, _ in pairs]], emb[[row[b] for _, b, _ in pairs]])


def spearman(encoder: Encoder, pairs: list[Pair]) -> float:
    predicted = pair_scores(encoder, pairs).tolist()
    return float(spearmanr(predicted, [s for _, _, s in pairs]).statistic)


def save(encoder: Encoder, source: Path, target: Path) -> Path:
    """Write the trained model as a sentence-transformers directory (safetensors)."""
    target.mkdir(parents=True, exist_ok=True)
    encoder.adapter.model.save_pretrained(target, safe_serialization=True)
    encoder.tokenizer.save_pretrained(target)
    for path in source.iterdir():  # modules.json, pooling, dense, normalize configs
        destination = target / path.name
        if path.is_dir():
            shutil.copytree(path, destination, dirs_exist_ok=True)
        elif path.suffix == ".json" and not destination.exists():
            shutil.copy2(path, destination)
    return target


def train(args: argparse.Namespace) -> dict:
    source = model_dir(args.source)
    torch.manual_seed(args.seed)
    encoder = load_encoder(source, reference="shift", similarity=args.similarity, max_length=args.max_length)
    if encoder.dense is not None:
        raise SystemExit("fine-tuning trains the transformer only; models with a Dense module are not supported")
    pairs = read_pairs(Path(args.pairs))
    train_pairs, eval_pairs = split(pairs, args.held_out, args.seed)
    top = max(abs(s) for _, _, s in pairs) or 1.0
    scale = (1.0 / top) if args.similarity == "cos" else 1.0
    before = spearman(encoder, eval_pairs)

    model = encoder.adapter.model
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    steps_per_epoch = (len(train_pairs) + args.batch_size - 1) // args.batch_size
    total = args.max_steps or args.epochs * steps_per_epoch
    progress = tqdm(total=total, desc="fine-tuning", unit="step")
    out = Path(args.out)
    step = 0
    model.train()
    while step < total:
        random.Random(args.seed + step).shuffle(train_pairs)
        for start in range(0, len(train_pairs), args.batch_size):
            chunk = train_pairs[start : start + args.batch_size]
            target = torch.tensor([s * scale for _, _, s in chunk], device=encoder.device)
            loss = torch.nn.functional.mse_loss(pair_scores(encoder, chunk, grad=True), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.4f}")
            if args.checkpoint_every and step % args.checkpoint_every == 0:
                model.eval()
                save(encoder, source, out / f"checkpoint-{step}")
                model.train()
            if step >= total:
                break
    progress.close()
    model.eval()
    after = spearman(encoder, eval_pairs)
    final = save(encoder, source, out / "model")
    report = {"steps": step, "spearman_before": before, "spearman_after": after,
              "train_pairs": len(train_pairs), "held_out_pairs": len(eval_pairs), "model": str(final)}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    if args.build_archive:
        from handlers.tools import archive as build_archive

        build_archive.build(build_archive.parser().parse_args(
            [str(final), "--name", args.name or f"{Path(args.source).name}-exact", "--similarity", args.similarity]
        ))
    return report


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="minilm, mpnet or a local sentence-transformers directory")
    p.add_argument("--pairs", required=True, help="TSV or CSV with text_a, text_b, score")
    p.add_argument("--out", required=True, help="output folder: checkpoints, model/, report.json")
    p.add_argument("--similarity", choices=["cos", "dot"], default="cos")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: epochs decide)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--held-out", type=float, default=0.2, help="fraction of pairs for the Spearman evaluation")
    p.add_argument("--checkpoint-every", type=int, default=0, help="steps between checkpoints (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--build-archive", action="store_true", help="pack the result as model_store/<name>.mar")
    p.add_argument("--name", help="archive name (default: <source>-exact)")
    return p


def main(argv: list[str] | None = None) -> None:
    train(parser().parse_args(argv))


if __name__ == "__main__":
    main()
