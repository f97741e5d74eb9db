"""Start and stop KServe's model server with the project's model (``siamese-kserve``) on a free port.

Used by the tests and the benchmarks, beside ``local_server.LocalTorchServe``:

    with LocalKServe(model_dir("minilm"), "minilm", ["--max_batch_delay_ms", "5"]) as ks:
        requests.post(f"{ks.inference}/v1/models/minilm:predict", json={"instances": [...]})

The server runs in its own process group (its explanation workers with it), so that ``stop``
ends all of it.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil

from handlers.tools.sources import ROOT
from handlers.tools.local.torchserve import free_port
from handlers.tools.local.ready import wait_kserve_ready


class LocalKServe:
    def __init__(self, model_dir: str | Path, name: str = "minilm", options: list[str] | None = None,
                 timeout: float = 300, env: dict[str, str] | None = None, cpus: str | None = None) -> None:
        self.model_dir = Path(model_dir)
        self.name = name
        self.options = list(options or [])
        self.timeout = timeout
        self.extra_env = env or {}
        self.cpus = cpus  # e.g. "0" or "0,1": the server and its explanation processes run on these cores only
        self.port = free_port()
        self.inference = self.metrics = f"http://127.0.0.1:{self.port}"
        self.workdir = Path(tempfile.mkdtemp(prefix="kserve-"))
        self.log = self.workdir / "kserve.out"
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        pinned = ["taskset", "-c", self.cpus] if self.cpus else []
        return [*pinned, sys.executable, "-m", "handlers.serving.kserve.server", "--model_name", self.name,
                "--model_dir", str(self.model_dir), "--http_port", str(self.port), *self.options]

    def start(self) -> "LocalKServe":
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **self.extra_env}
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(self.command(), cwd=self.workdir, env=env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_kserve_ready(self.inference, self.name, self.timeout, alive=lambda: self.process.poll() is None)
        except TimeoutError as exc:
            tail = self.log_tail()
            self.stop()
            raise TimeoutError(f"{exc}\n{tail}") from None
        return self

    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def explainer_pids(self) -> list[int]:
        """The explanation worker processes (the server's children that are not its helpers)."""
        if self.process is None:
            return []
        children = psutil.Process(self.process.pid).children()
        return [c.pid for c in children if "resource_tracker" not in " ".join(c.cmdline())]

    def log_tail(self, lines: int = 60) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM to the server's process group, SIGKILL after 30 s."""
        if self.process is not None and self.process.poll() is None:
            group = os.getpgid(self.process.pid)
            os.killpg(group, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(group, signal.SIGKILL)
                self.process.wait()
            try:  # workers that outlived the server
                os.killpg(group, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "LocalKServe":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
