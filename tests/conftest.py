"""Shared fixtures: the real minilm model (loaded once per run), tiny models of each family, and
the servers, each started once per run: one TorchServe (the production config) serving every
archive variant the tests need, and one KServe model server.

Markers (pyproject.toml): a test that uses a server or the archives they serve
(``SERVER_FIXTURES``) is marked ``server``; a test marked ``slow`` or ``gpu`` runs in the whole suite only; every other test is ``unit``.
``SIAMESE_DEEP=1`` deepens the property runs and load loops (docs/tests.md).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# kserve parses sys.argv when it is imported (kserve.model_server); pytest's own flags must not
# reach it (``--co`` would read as its ``--configure_logging``).
_pytest_argv, sys.argv = sys.argv, sys.argv[:1]
import kserve.model_server  # noqa: E402,F401
sys.argv = _pytest_argv

from handlers import load_encoder  # noqa: E402
from handlers.attribution import prepare_methods  # noqa: E402
from handlers.tools.load import grpc_ports  # noqa: E402
from handlers.tools.local.kserve_engine import LocalKServe  # noqa: E402
from handlers.tools.local.torchserve import LocalTorchServe  # noqa: E402
from handlers.tools.sources import model_dir  # noqa: E402
from tests.support import tiny_models  # noqa: E402
from tests.support.archives import PRODUCTION, UNCACHED, build_store  # noqa: E402
from tests.support.depth import DEEP  # noqa: E402

#: the run's TorchServe starts nine workers at once on two cores: their idle OpenMP threads sleep
#: instead of spinning, which nearly halves the start (110 s to 67 s measured, docs/tests.md). Not
#: for this process: in-process computations run 20-80 % slower with it.
WORKERS_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}

SERVER_FIXTURES = {"model_store", "server", "kserve_engine", "kserve_server", "kserve_runtime", "prometheus", "engine_prometheus",
                   "first_pids"}

# Property runs: a few examples per test by default; SIAMESE_DEEP=1 runs the deep profile.
settings.register_profile("default", max_examples=100, deadline=None)
settings.register_profile("deep", max_examples=2000, deadline=None)
settings.load_profile("deep" if DEEP else "default")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("server") is None and SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.server)
        if not any(item.get_closest_marker(kind) for kind in ("server", "slow", "gpu")):
            item.add_marker(pytest.mark.unit)


def pytest_configure(config: pytest.Config) -> None:
    """Every run prints its 15 slowest tests, so that the time budget stays visible."""
    if config.option.durations is None:
        config.option.durations = 15


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    return model_dir("minilm")


@pytest.fixture(scope="session")
def minilm_shift(minilm_dir):
    """minilm, shift mode, cosine: the one minilm of the run (every method prepared)."""
    encoder = load_encoder(minilm_dir, reference="shift", similarity="cos")
    prepare_methods(encoder)
    return encoder


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {family: tiny_models.build(family, root / family) for family in tiny_models.FAMILIES}


#: ``-m unit`` checks every per-family property on BERT (minilm's family); the whole suite on every family
UNIT_FAMILY = "bert"
FAMILY_PARAMS = [family if family == UNIT_FAMILY else pytest.param(family, marks=pytest.mark.slow)
                 for family in tiny_models.FAMILIES]


@pytest.fixture(scope="session", params=FAMILY_PARAMS)
def tiny_family(request, tiny_dirs) -> tuple[str, Path]:
    return request.param, tiny_dirs[request.param]


@pytest.fixture(scope="session")
def model_store(tmp_path_factory) -> Path:
    """Every archive the tests serve, built once from the current code (never a stale model_store/)."""
    store = tmp_path_factory.mktemp("model_store")
    build_store(store)
    return store


@pytest.fixture(scope="session")
def server(model_store):
    """The run's one TorchServe, started from config.production.properties (token authorization
    on), serving every archive of ``tests.support.archives.ARCHIVES``."""
    served = {mar.stem: mar.name for mar in sorted(model_store.glob("*.mar"))}
    with LocalTorchServe(models=served, model_store=model_store, config=PRODUCTION, overrides=grpc_ports(),
                         env=WORKERS_ENV) as ts:
        yield ts


@pytest.fixture(scope="session")
def kserve_engine(minilm_dir, tmp_path_factory):
    """The run's one KServe model server with minilm (``siamese-kserve``), batching as the test
    archive does (8 requests, 50 ms), one explanation process; time budgets that leave room for a
    machine whose load inflates the estimates."""
    config = tmp_path_factory.mktemp("kserve-engine") / "model-config.yaml"
    config.write_text(yaml.safe_dump({"batchSize": 8, "maxBatchDelay": 50, "responseTimeout": 900,
                                      "handler": {"precision": "fp32",
                                                  "explanation": {**UNCACHED, "time_budget_s": {"ij": 400, "gae": 100, "lrp": 400}}}}))
    with LocalKServe(minilm_dir, "minilm", ["--model_config", str(config), "--explain_workers", "1"]) as engine:
        yield engine
