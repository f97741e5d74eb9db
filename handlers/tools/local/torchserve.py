"""Start and stop a real TorchServe from the project's config.properties, on free ports.

Used by the tests and the benchmarks: each server gets its own ports, worker ports, pid file
(TMPDIR), log folder and model store, so that several can run side by side.

    with LocalTorchServe(models={"minilm": "minilm.mar"}) as ts:
        requests.post(f"{ts.inference}/predictions/minilm", json={...})
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from handlers.tools.sources import ROOT
from handlers.tools.local.ready import wait_ready


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LOG_CONFIG_FLAG = "-Dlog4j.configurationFile="


def named_files(props: dict[str, str]) -> dict[str, str]:
    """The files a TorchServe config names: ``metrics_config`` and ``log_config`` (the log4j2
    file that ``vmargs`` hands to the JVM)."""
    files = {"metrics_config": props["metrics_config"]} if "metrics_config" in props else {}
    for word in props.get("vmargs", "").split():
        if word.startswith(LOG_CONFIG_FLAG):
            files["log_config"] = word.removeprefix(LOG_CONFIG_FLAG)
    return files


def with_files(props: dict[str, str], files: dict[str, str]) -> dict[str, str]:
    """``props`` naming other paths for the files of ``named_files``."""
    props = dict(props)
    if "metrics_config" in files:
        props["metrics_config"] = files["metrics_config"]
    if "log_config" in files:
        props["vmargs"] = " ".join(
            LOG_CONFIG_FLAG + files["log_config"] if word.startswith(LOG_CONFIG_FLAG) else word
            for word in props["vmargs"].split()
        )
    return props


def read_properties(path: Path) -> dict[str, str]:
    props = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            props[key.strip()] = value.strip()
    return props


class LocalTorchServe:
    """A TorchServe process started from ``config`` with ``overrides`` applied."""

    def __init__(
        self,
        models: dict[str, str],
        model_store: str | Path = ROOT / "model_store",
        config: str | Path = ROOT / "config.properties",
        overrides: dict[str, str] | None = None,
        timeout: float = 300,
        env: dict[str, str] | None = None,
        own_session: bool = False,
    ):
        """``own_session``: start TorchServe in a session of its own, so that the kernel schedules it
        as a group apart from the caller (as a service runs), not within the caller's CPU share."""
        self.models = models
        self.own_session = own_session
        self.model_store = Path(model_store).resolve()
        self.config = Path(config)
        self.overrides = overrides or {}
        self.timeout = timeout
        self.extra_env = env or {}
        self.workdir = Path(tempfile.mkdtemp(prefix="ts-"))
        self.ports = {name: free_port() for name in ("inference", "management", "metrics")}
        self.inference = f"http://127.0.0.1:{self.ports['inference']}"
        self.management = f"http://127.0.0.1:{self.ports['management']}"
        self.metrics = f"http://127.0.0.1:{self.ports['metrics']}"
        self.log_dir = self.workdir / "logs"

    def properties(self) -> dict[str, str]:
        props = read_properties(self.config)
        props.update(
            inference_address=self.inference,
            management_address=self.management,
            metrics_address=self.metrics,
            model_store=str(self.model_store),
            load_models=",".join(f"{k}={v}" for k, v in self.models.items()),
            grpc_inference_port=str(free_port()),
            grpc_management_port=str(free_port()),
            initial_worker_port=str(random.randrange(20000, 60000, 100)),
        )
        props = with_files(props, {key: str(self.config.parent.resolve() / path)  # the server runs elsewhere
                                   for key, path in named_files(props).items()})
        props.update(self.overrides)
        return props

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            TMPDIR=str(self.workdir),
            LOG_LOCATION=str(self.log_dir),
            METRICS_LOCATION=str(self.log_dir),
            PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        )
        env.update(self.extra_env)
        return env

    def start(self) -> "LocalTorchServe":
        self.log_dir.mkdir(parents=True, exist_ok=True)
        config_file = self.workdir / "config.properties"
        config_file.write_text("".join(f"{k}={v}\n" for k, v in self.properties().items()))
        command = [
            str(Path(sys.executable).parent / "torchserve"), "--start", "--ncs",
            "--ts-config", str(config_file), "--model-store", str(self.model_store),
        ]
        subprocess.run(command, env=self.env, cwd=self.workdir, check=True, start_new_session=self.own_session,
                       stdout=open(self.log_dir / "torchserve.out", "w"), stderr=subprocess.STDOUT)
        try:
            self._wait_for_key_file()
            for model in self.models:
                wait_ready(self.management, model, self.timeout, headers=self.auth_headers("management"))
        except Exception:
            tail = self.log_tail()
            self.stop()
            raise TimeoutError(f"TorchServe did not get ready:\n{tail}")
        return self

    def _wait_for_key_file(self) -> None:
        """With token authorization on, TorchServe writes key_file.json a moment after it starts."""
        if self.properties().get("disable_token_authorization", "false") == "true":
            return
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                if self.auth_headers("management"):
                    return
            except ValueError:  # being written
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("TorchServe wrote no key_file.json")
            time.sleep(0.2)

    def auth_headers(self, api: str) -> dict[str, str]:
        """Bearer header from the token file TorchServe writes when token authorization is on."""
        token_file = self.workdir / "key_file.json"
        if not token_file.exists():
            return {}
        import json

        keys = json.loads(token_file.read_text())
        return {"Authorization": f"Bearer {keys[api]['key']}"}

    def pid(self) -> int | None:
        pid_file = self.workdir / ".model_server.pid"
        return int(pid_file.read_text().strip()) if pid_file.exists() else None

    def log_tail(self, lines: int = 60) -> str:
        out = []
        for name in ("torchserve.out", "model_log.log", "ts_log.log"):
            path = self.log_dir / name
            if path.exists():
                out.append(f"== {name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(out)

    def stop(self) -> None:
        pid = self.pid()
        if pid:
            try:
                os.kill(pid, signal.SIGTERM)
                for _ in range(30):  # a graceful stop, or its workers are killed below
                    os.kill(pid, 0)
                    time.sleep(0.1)
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        subprocess.run(["pkill", "-f", f"{self.workdir}"], check=False)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "LocalTorchServe":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
