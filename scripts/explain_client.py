"""Turn an explanation into a picture: a PNG heatmap for ij, an HTML page for gae and lrp.

From a live server:
    python -m scripts.explain_client --url http://127.0.0.1:8080 --model minilm \\
        --text-a "A man is playing a guitar." --text-b "Someone plays music." --layer 4 --steps 50 -o ij.png
From a saved answer (the JSON body of /explanations):
    python -m scripts.explain_client --answer answer.json -o ij.png
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import requests

from scripts.plots import heatmap_png, relevance_html


def request_explanation(url: str, model: str, body: dict, timeout: float = 600) -> dict:
    reply = requests.post(f"{url.rstrip('/')}/explanations/{model}", json=body, timeout=timeout)
    if reply.status_code != 200:
        raise SystemExit(f"{reply.status_code}: {reply.text}")
    return reply.json()


def render(answer: dict, output: str | Path) -> Path:
    """The picture of ``answer``: heatmap PNG for ij, relevance HTML for gae / lrp."""
    if answer.get("method") in ("gae", "lrp"):
        return relevance_html(answer, output)
    if "attributions" not in answer:
        raise SystemExit("the answer holds neither attributions nor relevance")
    return heatmap_png(answer, output)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--answer", help="a saved answer JSON file")
    source.add_argument("--url", help="inference address of a running server")
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--text-a")
    parser.add_argument("--text-b")
    parser.add_argument("--method", default="ij", choices=["ij", "gae", "lrp"])
    parser.add_argument("--layer", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--save-answer", help="also write the answer JSON here")
    parser.add_argument("-o", "--output", required=True, help="PNG (ij) or HTML (gae, lrp) file")
    args = parser.parse_args(argv)
    if args.answer:
        answer = json.loads(Path(args.answer).read_text(encoding="utf-8"))
    else:
        if not (args.text_a and args.text_b):
            parser.error("--url needs --text-a and --text-b")
        body = {"text_a": args.text_a, "text_b": args.text_b, "method": args.method}
        body.update({k: v for k, v in (("layer", args.layer), ("steps", args.steps)) if v is not None})
        answer = request_explanation(args.url, args.model, body)
    if args.save_answer:
        Path(args.save_answer).write_text(json.dumps(answer), encoding="utf-8")
    path = render(answer, args.output)
    print(path, file=sys.stderr)
    return path


if __name__ == "__main__":
    main()
