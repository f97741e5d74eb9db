"""Wait until TorchServe reports a model's workers READY (or fail with the server log's tail).

    python -m scripts.dev.wait_ready --model minilm --management http://127.0.0.1:8081
"""
from __future__ import annotations

import argparse
import sys
import time

import requests


def wait_ready(management: str, model: str, timeout: float, headers: dict | None = None) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            reply = requests.get(f"{management}/models/{model}", headers=headers, timeout=5)
            if reply.ok:
                workers = reply.json()[0].get("workers", [])
                if workers and all(w.get("status") == "READY" for w in workers):
                    return
                last = ", ".join(w.get("status", "?") for w in workers) or "no workers"
            else:
                last = f"HTTP {reply.status_code}"
        except requests.RequestException as exc:
            last = type(exc).__name__
        time.sleep(1)
    raise TimeoutError(f"{model} not READY after {timeout:.0f}s ({last})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="minilm")
    p.add_argument("--management", default="http://127.0.0.1:8081")
    p.add_argument("--timeout", type=float, default=300)
    args = p.parse_args()
    try:
        wait_ready(args.management, args.model, args.timeout)
    except TimeoutError as exc:
        sys.exit(f"{exc}; see logs/model_log.log and logs/torchserve.out")
    print(f"{args.model} is READY")


if __name__ == "__main__":
    main()
