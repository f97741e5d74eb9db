"""Shared fixtures: the real minilm model, tiny models of each family, and a real TorchServe.

Every test is marked ``server`` (it starts, or talks to, a real server: a fixture of
``SERVER_FIXTURES``) or ``unit``, so that ``pytest -m unit`` runs the library and the serving
layer in-process.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from handlers import load_encoder  # noqa: E402
from handlers.tools import archive as build_archive
from scripts.dev import tiny_models  # noqa: E402
from scripts.dev.local_kserve import LocalKServe  # noqa: E402
from scripts.dev.local_server import LocalTorchServe  # noqa: E402
from handlers.tools.sources import model_dir  # noqa: E402

from handlers.tools.sources import STS_PAIRS, sts_pairs  # noqa: E402,F401  (re-exported for the tests)


SERVER_FIXTURES = {"server", "prod", "kserve_server", "kserve_engine", "onnx_server", "prometheus", "first_pids"}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("server") is None and SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.server)
        if item.get_closest_marker("server") is None:
            item.add_marker(pytest.mark.unit)


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    return model_dir("minilm")


@pytest.fixture(scope="session")
def minilm_shift(minilm_dir):
    return load_encoder(minilm_dir, reference="shift", similarity="cos")


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {family: tiny_models.build(family, root / family) for family in tiny_models.FAMILIES}


@pytest.fixture(scope="session", params=tiny_models.FAMILIES)
def tiny_family(request, tiny_dirs) -> tuple[str, Path]:
    return request.param, tiny_dirs[request.param]


def build_test_archive(store: Path, source: str | Path, name: str, *extra: str) -> Path:
    """An archive of one worker; fp32 predictions unless ``extra`` names a precision, so that
    served scores equal the in-process fp32 encoder's."""
    precision = [] if "--precision" in extra or "--runtime" in extra else ["--precision", "fp32"]
    args = build_archive.parser().parse_args(
        [str(source), "--name", name, "--export-path", str(store), "--workers", "1", *precision, *extra]
    )
    return build_archive.build(args)


@pytest.fixture(scope="session")
def model_store(tmp_path_factory) -> Path:
    """A model store with archives built from the current code (never a stale model_store/)."""
    store = tmp_path_factory.mktemp("model_store")
    build_test_archive(store, "minilm", "minilm", "--batch-size", "8", "--max-batch-delay", "50")
    return store


@pytest.fixture(scope="session")
def server(model_store):
    """A real TorchServe started from the project's config.properties, serving minilm."""
    with LocalTorchServe(models={"minilm": "minilm.mar"}, model_store=model_store) as ts:
        yield ts


@pytest.fixture(scope="session")
def kserve_engine(minilm_dir, tmp_path_factory):
    """KServe's own model server with minilm (``siamese-kserve``), batching as the test archive
    does (8 requests, 50 ms), one explanation process; time budgets that leave room for a
    machine whose load inflates the estimates."""
    config = tmp_path_factory.mktemp("kserve-engine") / "model-config.yaml"
    config.write_text(yaml.safe_dump({"batchSize": 8, "maxBatchDelay": 50, "responseTimeout": 900,
                                      "handler": {"precision": "fp32",
                                                  "explanation": {"time_budget_s": {"ij": 400, "gae": 100, "lrp": 400}}}}))
    with LocalKServe(minilm_dir, "minilm", ["--model_config", str(config), "--explain_workers", "1"]) as engine:
        yield engine


def post(server, body, path="predictions/minilm", **kwargs) -> requests.Response:
    """POST a JSON body (or raw bytes/str sent as application/json) to a test server."""
    kwargs.setdefault("timeout", 120)
    if isinstance(body, (bytes, str)):
        return requests.post(f"{server.inference}/{path}", data=body,
                             headers={"Content-Type": "application/json"}, **kwargs)
    return requests.post(f"{server.inference}/{path}", json=body, **kwargs)


def post_together(server, bodies: list, path="predictions/minilm") -> list[requests.Response]:
    """Release all requests at once (behind a barrier) so that they share a TorchServe batch."""
    barrier = threading.Barrier(len(bodies))

    def send(body):
        barrier.wait()
        return post(server, body, path)

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(send, bodies))
