"""Explain sentence pairs and draw the explanations: one pair or a CSV/TSV of pairs, against a
running server or in-process, as JSONL answers plus a PNG heatmap (ij) or HTML token highlights
(gae, lrp) per pair.

Against a running server (token authorization: --token KEY sends `Authorization: Bearer KEY`):
    siamese-explain --url http://127.0.0.1:8080 --model minilm \\
        --text-a "A man is playing a guitar." --text-b "Someone plays music." --layer 4 --steps 50 -o ij.png
In-process, without a server (a named model, minilm or mpnet, or a sentence-transformers folder):
    siamese-explain --model-dir minilm --pairs data/sts_pairs.tsv \\
        --method lrp --jsonl out/lrp.jsonl --out-dir out/lrp
From a saved answer (the JSON body of /explanations):
    siamese-explain --answer answer.json -o ij.png

A pairs file is a CSV (or TSV, by its .tsv suffix) with a header and the columns text_a, text_b
and, optionally, score (copied to the JSONL as gold_score). Each JSONL line is the answer of one
pair, in input order, with index, text_a and text_b added; a pair that cannot be explained gets
a line with its status, error and field instead, and the exit status is 1.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, get_args

import requests
from tqdm import tqdm

from handlers import Encoder, load_encoder
from handlers.attribution import METHODS, method_of, plan
from handlers.attribution.base import Normalization
from handlers.attribution.quadrature import QUADRATURES
from handlers.errors import ExplanationError
from handlers.serving.protocol import ExplainItem, RequestError, item_context, parse_item
from handlers.serving.settings import HandlerSettings
from handlers.tools.plots import heatmap_png, relevance_html
from handlers.tools.sources import model_dir

#: the request options the command line sets: those an explanation request may carry
OPTIONS = tuple(name for name in ExplainItem.model_fields if name not in ("text_a", "text_b", "method"))


@dataclass(frozen=True)
class Pair:
    text_a: str
    text_b: str
    gold_score: float | None = None


def read_pairs(path: str | Path) -> list[Pair]:
    """The pairs of a CSV or TSV file with a header: text_a, text_b and optionally score."""
    path = Path(path)
    delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        missing = {"text_a", "text_b"} - set(reader.fieldnames or [])
        if missing:
            raise SystemExit(f"{path}: missing columns {sorted(missing)}")
        rows = list(reader)
    return [
        Pair(row["text_a"], row["text_b"], float(row["score"]) if row.get("score") not in (None, "") else None)
        for row in rows
    ]


class ExplainFailure(Exception):
    """An explanation the server or the encoder refused: its status and ``{"error", "field"}``."""

    def __init__(self, status: int, error: str, field: str | None):
        super().__init__(f"{status} {field}: {error}")
        self.status, self.error, self.field = status, error, field

    def record(self) -> dict[str, Any]:
        return {"status": self.status, "error": self.error, "field": self.field}


Explainer = Callable[[dict], dict]  # request body -> /explanations answer


class ServerExplainer:
    """POSTs request bodies to ``{url}/explanations/{model}`` of a running server."""

    def __init__(self, url: str, model: str, token: str | None = None, timeout: float = 600):
        self.endpoint = f"{url.rstrip('/')}/explanations/{model}"
        self.session = requests.Session()
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"
        self.timeout = timeout

    def __call__(self, body: dict) -> dict:
        reply = self.session.post(self.endpoint, json=body, timeout=self.timeout)
        if reply.status_code != 200:
            try:
                error = reply.json()
            except ValueError:
                error = {"error": reply.text}
            if not isinstance(error, dict):
                error = {"error": str(error)}
            raise ExplainFailure(reply.status_code, str(error.get("error", error)), error.get("field"))
        return reply.json()


class LocalExplainer:
    """Explains in this process, as a server with the default settings would, on an encoder loaded once."""

    def __init__(self, encoder: Encoder):
        self.encoder = encoder

    @classmethod
    def load(cls, source: str, reference: str = "shift", similarity: str = "cos") -> "LocalExplainer":
        return cls(load_encoder(model_dir(source), reference=reference, similarity=similarity))

    def __call__(self, body: dict) -> dict:
        """The server's answer to ``body``: validated and budgeted as the handler does it (its
        default settings); a refused body raises ExplainFailure (4xx, field)."""
        settings = HandlerSettings()
        try:
            item = parse_item(body, "explain", item_context(settings, self.encoder.num_layers))
            method = item.method_name(settings)  # type: ignore[union-attr]
            planned = plan(self.encoder, (item.text_a, item.text_b), method, item.options(settings),  # type: ignore[union-attr]
                           settings.explanation.memory_budget_mb)
            return method_of(self.encoder, method).attribute([planned.pair], planned.options)[0].to_answer()
        except ExplanationError as error:
            failure = RequestError.of(error)
            raise ExplainFailure(failure.status, failure.message, failure.field) from error
        except RequestError as error:
            raise ExplainFailure(error.status, error.message, error.field) from error


def request_body(pair: Pair, method: str, options: dict[str, Any]) -> dict:
    """The /explanations request of a pair; options left as None take the archive's defaults."""
    body = {"text_a": pair.text_a, "text_b": pair.text_b, "method": method}
    body.update({k: v for k, v in options.items() if v is not None})
    return body


def explain_pairs(
    explainer: Explainer, pairs: Iterable[Pair], method: str, options: dict[str, Any], progress: bool = True
) -> Iterator[dict]:
    """One record per pair, in order: the answer (or the failure) with index, texts and gold score."""
    pairs = list(pairs)
    for index, pair in enumerate(tqdm(pairs, desc=f"explain {method}", unit="pair", disable=not progress)):
        record: dict[str, Any] = {"index": index, "text_a": pair.text_a, "text_b": pair.text_b}
        if pair.gold_score is not None:
            record["gold_score"] = pair.gold_score
        try:
            record.update(explainer(request_body(pair, method, options)))
        except ExplainFailure as failure:
            record.update(failure.record())
        yield record


def render(answer: dict, output: str | Path) -> Path:
    """The picture of ``answer``: heatmap PNG for ij, relevance HTML for gae / lrp."""
    if answer.get("method") in ("gae", "lrp"):
        return relevance_html(answer, output)
    if "attributions" not in answer:
        raise SystemExit("the answer holds neither attributions nor relevance")
    return heatmap_png(answer, output)


def picture_path(folder: Path, record: dict) -> Path:
    suffix = "png" if record["method"] == "ij" else "html"
    return folder / f"pair-{record['index']:04d}-{record['method']}.{suffix}"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--answer", help="a saved answer JSON file (draws it with -o)")
    source.add_argument("--url", help="inference address of a running server")
    source.add_argument("--model-dir", help="explain in-process: minilm, mpnet or a sentence-transformers folder")
    p.add_argument("--model", default="minilm", help="model name on the server (with --url)")
    p.add_argument("--token", help="inference key of a server with token authorization (--token=KEY where the key begins with -)")
    p.add_argument("--reference", choices=["shift", "none"], default="shift", help="in-process encoder")
    p.add_argument("--similarity", choices=["cos", "dot"], default="cos", help="in-process encoder")
    p.add_argument("--text-a")
    p.add_argument("--text-b")
    p.add_argument("--pairs", help="CSV or TSV of pairs: text_a, text_b[, score]")
    p.add_argument("--limit", type=int, help="only the first N pairs of --pairs")
    p.add_argument("--method", default="ij", choices=METHODS)
    p.add_argument("--layer", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--quadrature", choices=QUADRATURES)
    p.add_argument("--tolerance", type=float, help="ij adaptive: the error of the matrix relative to |score|")
    p.add_argument("--normalization", choices=get_args(Normalization))
    p.add_argument("--pairwise", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--jsonl", help="write the answers here, one JSON object a line")
    p.add_argument("--out-dir", help="write a picture per pair here: pair-NNNN-<method>.png|html")
    p.add_argument("--save-answer", help="one pair: also write the answer JSON here")
    p.add_argument("-o", "--output", help="one pair: the picture, PNG (ij) or HTML (gae, lrp)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _pairs(args: argparse.Namespace, p: argparse.ArgumentParser) -> list[Pair]:
    if args.pairs:
        if args.text_a or args.text_b:
            p.error("--pairs or --text-a/--text-b, not both")
        return read_pairs(args.pairs)[: args.limit]
    if not (args.text_a and args.text_b):
        p.error("--url and --model-dir need --text-a and --text-b, or --pairs")
    return [Pair(args.text_a, args.text_b)]


def run(argv: list[str] | None = None) -> Path:
    """What ``siamese-explain`` does; the path it wrote (a picture, the JSONL file or the folder)."""
    p = parser()
    args = p.parse_args(argv)
    if args.answer:
        if not args.output:
            p.error("--answer needs -o")
        path = render(json.loads(Path(args.answer).read_text(encoding="utf-8")), args.output)
        print(path, file=sys.stderr)
        return path
    pairs = _pairs(args, p)
    if len(pairs) > 1 and (args.output or args.save_answer):
        p.error("-o and --save-answer draw one pair; with --pairs use --out-dir and --jsonl")
    if not (args.output or args.jsonl or args.out_dir):
        p.error("nothing to write: give -o, --jsonl or --out-dir")
    explainer: Explainer = (
        ServerExplainer(args.url, args.model, args.token)
        if args.url
        else LocalExplainer.load(args.model_dir, args.reference, args.similarity)
    )
    options = {name: getattr(args, name) for name in OPTIONS}
    folder = Path(args.out_dir) if args.out_dir else None
    if folder:
        folder.mkdir(parents=True, exist_ok=True)
    jsonl = open(args.jsonl, "w", encoding="utf-8") if args.jsonl else None
    failures, last = 0, None
    try:
        for record in explain_pairs(explainer, pairs, args.method, options, progress=not args.quiet):
            if jsonl:
                jsonl.write(json.dumps(record) + "\n")
            if "error" in record:
                failures += 1
                print(f"pair {record['index']}: {record['status']} {record['field']}: {record['error']}", file=sys.stderr)
                continue
            if folder:
                last = render(record, picture_path(folder, record))
            if args.output:
                last = render(record, args.output)
            if args.save_answer:
                Path(args.save_answer).write_text(json.dumps(record), encoding="utf-8")
    finally:
        if jsonl:
            jsonl.close()
    if failures:
        raise SystemExit(f"{failures} of {len(pairs)} pairs were not explained")
    result = Path(args.output or args.jsonl or folder or last)  # type: ignore[arg-type]
    print(result, file=sys.stderr)
    return result


def main(argv: list[str] | None = None) -> None:
    """The console command: exit status 0 once everything is written (a returned value would be 1)."""
    run(argv)


if __name__ == "__main__":
    main()
