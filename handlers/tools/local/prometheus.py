"""A real Prometheus (Debian's package) on a free port, scraping one target with the project's
scrape config (scripts/deploy/monitoring/prometheus.yml) at a short interval.

    with LocalPrometheus(binary, "127.0.0.1:8082", workdir, job="torchserve") as prometheus:
        requests.get(f"{prometheus.url}/api/v1/query", params={"query": "up"})
"""
from __future__ import annotations

import subprocess
import time
from pathlib import Path
from urllib.parse import urlparse

import requests
import yaml

from handlers.tools.sources import ROOT
from handlers.tools.local.torchserve import free_port

CONFIG = ROOT / "scripts" / "deploy" / "monitoring" / "prometheus.yml"


class LocalPrometheus:
    def __init__(self, binary: str, target: str, workdir: Path, job: str = "torchserve",
                 interval_s: float = 1, metrics_path: str = "/metrics") -> None:
        self.binary = binary
        self.workdir = Path(workdir)
        self.url = f"http://127.0.0.1:{free_port()}"
        config = yaml.safe_load(CONFIG.read_text())
        config["global"]["scrape_interval"] = f"{interval_s:g}s"
        config["rule_files"] = [str(CONFIG.parent / name) for name in config.get("rule_files", [])]  # runs elsewhere
        (scrape,) = config["scrape_configs"]
        scrape.update(job_name=job, metrics_path=metrics_path, static_configs=[{"targets": [target]}])
        self.config = config
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> "LocalPrometheus":
        (self.workdir / "prometheus.yml").write_text(yaml.safe_dump(self.config))
        with open(self.workdir / "prometheus.log", "w") as log:
            self.process = subprocess.Popen(
                [self.binary, f"--config.file={self.workdir / 'prometheus.yml'}",
                 f"--storage.tsdb.path={self.workdir / 'data'}", f"--web.listen-address={urlparse(self.url).netloc}"],
                stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while not self.ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("Prometheus did not get ready:\n"
                                   + (self.workdir / "prometheus.log").read_text()[-3000:])
            time.sleep(0.2)
        return self

    def ready(self) -> bool:
        try:
            return requests.get(f"{self.url}/-/ready", timeout=2).status_code == 200
        except requests.ConnectionError:
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> "LocalPrometheus":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
