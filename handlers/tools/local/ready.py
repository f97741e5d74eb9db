"""Wait until TorchServe reports a model's workers READY, or KServe's model server the model
ready (or fail with the server log's tail).

    python -m handlers.tools.local.ready --model minilm --management http://127.0.0.1:8081
    python -m handlers.tools.local.ready --model minilm --kserve http://127.0.0.1:8085
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Callable

import psutil
import requests


def _poll(check: Callable[[], str | None], model: str, timeout: float, alive: Callable[[], bool]) -> None:
    """Until ``check()`` returns None (ready); otherwise it says what it saw."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if not alive():
            raise TimeoutError(f"{model}: the server exited ({last})")
        try:
            last = check()
            if last is None:
                return
        except requests.RequestException as exc:
            last = type(exc).__name__
        time.sleep(0.5)
    raise TimeoutError(f"{model} not READY after {timeout:.0f}s ({last})")


def wait_ready(management: str, model: str, timeout: float, headers: dict | None = None) -> None:
    """Until TorchServe's management API shows every worker of ``model`` READY."""
    def check() -> str | None:
        reply = requests.get(f"{management}/models/{model}", headers=headers, timeout=5)
        if not reply.ok:
            return f"HTTP {reply.status_code}"
        workers = reply.json()[0].get("workers", [])
        if workers and all(w.get("status") == "READY" for w in workers):
            return None
        return ", ".join(w.get("status", "?") for w in workers) or "no workers"

    _poll(check, model, timeout, lambda: True)


def wait_kserve_ready(url: str, model: str, timeout: float, alive: Callable[[], bool] = lambda: True) -> None:
    """Until KServe's ``/v2/models/{model}/ready`` says ready; ``alive()`` False ends the wait."""
    def check() -> str | None:
        reply = requests.get(f"{url}/v2/models/{model}/ready", timeout=5)
        return None if reply.ok and reply.json().get("ready") else f"HTTP {reply.status_code}"

    _poll(check, model, timeout, alive)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="minilm")
    p.add_argument("--management", default="http://127.0.0.1:8081")
    p.add_argument("--kserve", metavar="URL", help="wait for KServe's model server at URL instead")
    p.add_argument("--pid", type=int, help="with --kserve: the server's process id (stop waiting when it exits)")
    p.add_argument("--timeout", type=float, default=300)
    args = p.parse_args()
    try:
        if args.kserve:
            alive = (lambda: psutil.pid_exists(args.pid)) if args.pid else (lambda: True)
            wait_kserve_ready(args.kserve, args.model, args.timeout, alive)
        else:
            wait_ready(args.management, args.model, args.timeout)
    except TimeoutError as exc:
        logs = "logs/kserve.out" if args.kserve else "logs/model_log.log and logs/torchserve.out"
        sys.exit(f"{exc}; see {logs}")
    print(f"{args.model} is READY")


if __name__ == "__main__":
    main()
