"""Every manifest the project writes (the ServingRuntime and the InferenceServices: v1 and v2,
CPU and GPU, TorchServe runtime and the project's model server) against KServe's own API models,
unknown fields refused (``handlers.tools.deploy.schema``); no network."""
from __future__ import annotations

import copy

import pytest
import yaml

from handlers.tools.deploy import manifests, modelserver, schema


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> list:
    out = tmp_path_factory.mktemp("manifests")
    paths = manifests.write("minilm", out, manifests.STORAGE_URI.format(name="minilm"), manifests.IMAGE)
    paths += modelserver.write("minilm", out, modelserver.STORAGE_URI.format(name="minilm"), modelserver.IMAGE)
    return sorted(set(paths))


def test_every_written_manifest_matches_kserves_api_models(written):
    kinds = set()
    for path in written:
        assert schema.check_file(path) == [], path.name
        kinds |= {doc["kind"] for doc in yaml.safe_load_all(path.read_text()) if doc}
    assert kinds == {"InferenceService", "ServingRuntime"}
    assert len(written) >= 7  # 4 TorchServe-runtime services, 2 model-server services, the runtime


def test_the_committed_manifests_match_too():
    committed = sorted(manifests.OUT.glob("*.yaml"))
    assert committed and all(schema.check_file(path) == [] for path in committed)


def test_a_field_kserve_does_not_declare_or_a_wrong_type_is_named(written):
    service = next(doc for path in written for doc in yaml.safe_load_all(path.read_text())
                   if doc and doc["kind"] == "InferenceService")
    typo = copy.deepcopy(service)
    typo["spec"]["predictor"]["scaleMetrics"] = typo["spec"]["predictor"].pop("scaleMetric", "concurrency")
    assert schema.check_document(typo) == ["InferenceService.spec.predictor.scaleMetrics: not a field of V1beta1PredictorSpec"]
    wrong = copy.deepcopy(service)
    wrong["spec"]["predictor"]["minReplicas"] = "two"
    assert schema.check_document(wrong) == ["InferenceService.spec.predictor.minReplicas: int, not str 'two'"]
    nested = copy.deepcopy(service)
    nested["spec"]["explainer"]["containers"][0]["resources"]["limit"] = {"cpu": "1"}
    (problem,) = schema.check_document(nested)
    assert problem.endswith("containers[0].resources.limit: not a field of V1ResourceRequirements")
    assert schema.check_document({**service, "apiVersion": "serving.kserve.io/v1alpha1"})[0].startswith("apiVersion")
