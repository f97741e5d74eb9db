"""Send a known mix of requests to a TorchServe model and count what was answered.

Fills the dashboard locally and feeds the metrics tests: predictions (pairs, rankings, KServe
v1 batches), explanations for every method the server offers, and requests that must fail
(bad JSON, invalid fields, methods the archive lacks). ``Traffic.requests`` counts the answers
by the labels ``siamese_requests_total`` must carry: (kind, method, status), with the status
the client actually received.

    python -m handlers.tools.traffic --url http://127.0.0.1:8080 --model minilm --rounds 20
    python -m handlers.tools.traffic --model minilm --explain-model minilm-explain   # the pools
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import requests

from handlers.attribution import METHODS

PAIRS = [
    ("A man is playing a guitar.", "Someone plays music."),
    ("A cat sleeps on the sofa.", "The stock market fell sharply today."),
    ("Two dogs run across a field.", "Dogs are running outside."),
]
METHOD_OPTIONS: dict[str, dict[str, Any]] = {"ij": {"steps": 4}}  # cheap explanations


@dataclass(frozen=True)
class Request:
    kind: str  # "prediction" | "explanation"
    method: str  # the method label the request must be counted under
    body: Any  # a JSON value, or raw bytes sent as they are


@dataclass
class Traffic:
    """What was sent and answered: counts by (kind, method, status) and the explanations."""

    requests: Counter = field(default_factory=Counter)
    explanations: list[dict] = field(default_factory=list)

    def add(self, other: "Traffic") -> None:
        self.requests.update(other.requests)
        self.explanations.extend(other.explanations)


def explain_body(method: str, pair: tuple[str, str]) -> dict:
    return {"text_a": pair[0], "text_b": pair[1], "method": method, **METHOD_OPTIONS.get(method, {})}


def request_mix(methods: list[str]) -> list[Request]:
    """One round: every kind of request, each explanation method in ``methods`` at least once."""
    mix = [Request("prediction", "none", {"text_a": a, "text_b": b}) for a, b in PAIRS]
    mix += [
        Request("prediction", "none", {"query": PAIRS[0][0], "candidates": [b for _, b in PAIRS]}),
        Request("prediction", "none", {"instances": [{"text_a": a, "text_b": b} for a, b in PAIRS[:2]]}),
        Request("prediction", "none", b"{not json"),
        Request("prediction", "none", {"text_a": "", "text_b": "empty text_a"}),
        Request("explanation", "unknown", {"text_a": "a", "text_b": "b", "method": "nope"}),
    ]
    for i, method in enumerate(METHODS):
        mix.append(Request("explanation", method, explain_body(method, PAIRS[i % len(PAIRS)])))
    if len(methods) >= 2:
        instances = [explain_body(m, PAIRS[0]) for m in methods[:2]]
        mix.append(Request("explanation", "mixed", {"instances": instances}))
    return mix


def send(url: str, model: str, request: Request, timeout: float = 300,
         headers: dict[str, str] | None = None) -> requests.Response:
    path = "explanations" if request.kind == "explanation" else "predictions"
    raw = request.body if isinstance(request.body, bytes) else json.dumps(request.body).encode()
    return requests.post(f"{url}/{path}/{model}", data=raw, timeout=timeout,
                         headers={"Content-Type": "application/json", **(headers or {})})


def run(url: str, model: str, rounds: int = 1, methods: list[str] | None = None,
        explain_model: str | None = None, headers: dict[str, str] | None = None) -> Traffic:
    """Send ``rounds`` rounds of ``request_mix`` one request at a time; count the answers.
    Explanations go to ``explain_model`` where given (the explanation pool), else to ``model``;
    ``headers`` go with every request (a bearer token where token authorization is on)."""
    methods = list(METHODS) if methods is None else methods
    traffic = Traffic()
    for _ in range(rounds):
        for request in request_mix(methods):
            response = send(url, explain_model or model if request.kind == "explanation" else model, request,
                            headers=headers)
            traffic.requests[(request.kind, request.method, str(response.status_code))] += 1
            if request.kind == "explanation" and response.status_code == 200:
                answer = response.json()
                traffic.explanations.extend(answer.get("explanations", [answer]))
    return traffic


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8080", help="TorchServe inference address")
    p.add_argument("--model", default="minilm")
    p.add_argument("--explain-model", help="where explanations go (the explanation pool, e.g. minilm-explain); "
                                           "default: --model")
    p.add_argument("--rounds", type=int, default=10)
    args = p.parse_args()
    traffic = run(args.url, args.model, args.rounds, explain_model=args.explain_model)
    for (kind, method, status), n in sorted(traffic.requests.items()):
        print(f"{kind:12s} {method:8s} {status}  {n}")


if __name__ == "__main__":
    main()
