"""Readiness that checks explanations: at load each method explains a known pair with the
archive's defaults; a worker whose explanations do not add up is not ready, and says why."""
from __future__ import annotations

import time

import pytest

from prometheus_client import CollectorRegistry

from handlers import load_encoder
from handlers.serving.kserve.config import EngineSettings
from handlers.serving.kserve.model import SiameseModel
from handlers.serving.kserve.metrics import PrometheusRecorder
from handlers.serving.readiness import LRP_CONSERVATION, READINESS_PAIRS, NotReady, check_explanations
from handlers.serving.service import Service
from handlers.serving.settings import ExplanationSettings, HandlerSettings
from tests.support import tiny_models


@pytest.mark.slow
def test_each_method_is_checked_and_adds_up(minilm_shift):
    readiness = check_explanations(minilm_shift, HandlerSettings())
    assert set(readiness.errors) == {"ij", "gae", "lrp"}
    assert readiness.errors["gae"] is None  # gae promises no completeness: it must only answer
    assert readiness.errors["ij"] <= 1e-3 and readiness.errors["lrp"] <= LRP_CONSERVATION
    assert "explanations checked in" in readiness.describe()


#: one 21-node panel per side: on ``sharp_bert`` its completeness error is percents of the score
#: (its estimate is over 1), far above the tolerance; 1,000 nodes reach it
UNREACHABLE = ExplanationSettings(tolerance=1e-3, steps=21, max_steps=21)


@pytest.fixture(scope="module")
def sharp_bert(tmp_path_factory):
    """A tiny BERT whose Linear weights are scaled 50×: its softmaxes and activations bend sharply
    along the path, so that a few nodes cannot integrate it (a smooth tiny model needs one panel)."""
    return tiny_models.build("bert", tmp_path_factory.mktemp("sharp") / "bert", sharpness=50)


def test_an_explanation_that_does_not_add_up_keeps_the_worker_from_being_ready(sharp_bert):
    """ij asked for a tolerance its node budget cannot reach: the check says which method and why."""
    encoder = load_encoder(sharp_bert)
    unreachable = HandlerSettings(explanation=UNREACHABLE)
    check_explanations(encoder, HandlerSettings())  # the archive's default budget reaches it
    with pytest.raises(NotReady, match=r"ij: did not converge to its tolerance 0.001"):
        check_explanations(encoder, unreachable)
    assert str(READINESS_PAIRS["ij"]) in _message(encoder, unreachable)


def _message(encoder, settings) -> str:
    try:
        check_explanations(encoder, settings)
    except NotReady as error:
        return str(error)
    return ""


def test_a_service_loads_only_when_its_explanations_add_up(sharp_bert):
    """The same check in ``Service.load`` (what TorchServe's initialize and the KServe
    explanation worker run): it raises, and a passing load reports the checks and their time,
    which stay a small part of the load."""
    settings = HandlerSettings(model_dir=str(sharp_bert))
    started = time.perf_counter()
    service = Service.load("/", settings, 300, "cpu", "tiny")
    load_s = time.perf_counter() - started
    assert service.readiness is not None and service.readiness.seconds < load_s
    unreachable = settings.model_copy(update={"explanation": UNREACHABLE})
    with pytest.raises(NotReady):
        Service.load("/", unreachable, 300, "cpu", "tiny")
    assert Service.load("/", settings, 300, "cpu", "tiny", explanations=False).readiness is None


@pytest.mark.slow
def test_kserves_model_stays_not_ready_when_its_explanations_do_not_add_up(sharp_bert):
    """KServe's model server: the explanation worker's load fails the check, so the model is not
    ready (KServe answers 503 for it) instead of serving explanations that do not add up. (With
    reachable settings the same model loads: ``Service.load`` above, which the explanation worker
    runs; and the run's KServe model server becomes ready through its checks.)"""
    settings = HandlerSettings(model_dir=".", explanation=UNREACHABLE)
    model = SiameseModel("tiny", sharp_bert, settings, EngineSettings(explain_workers=1, explain_threads=1),
                         PrometheusRecorder("tiny", "ij", CollectorRegistry()))
    assert model.load() is False and model.ready is False
