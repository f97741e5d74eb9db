"""The archive's model-config.yaml as ``siamese-archive`` writes it (no archive is built here)."""
from __future__ import annotations

import pytest
import yaml

from handlers.serving.settings import ExplanationSettings, ModelConfig
from handlers.tools import archive as build_archive


def config_of(tmp_path, *argv: str) -> dict:
    return build_archive.model_config(build_archive.parser().parse_args(["minilm", *argv]), "minilm")


def test_default_archive_batching_and_a_delay_torchserve_would_replace():
    defaults = build_archive.parser().parse_args(["minilm"])
    assert (defaults.workers, defaults.batch_size, defaults.max_batch_delay) == (2, 4, 1)
    with pytest.raises(ValueError, match="greater than or equal to 1"):  # TorchServe would wait 100 ms
        ModelConfig.model_validate({"maxBatchDelay": 0})


def test_an_explanation_file_sets_the_explanation_section_key_by_key(tmp_path):
    settings = tmp_path / "explanation.yaml"
    settings.write_text(yaml.safe_dump({"cache_mb": 0, "tolerance": 1e-4, "time_budget_s": {"lrp": 7.5}}))
    explanation = config_of(tmp_path, "--explanation", str(settings))["handler"]["explanation"]
    defaults = ExplanationSettings().model_dump()
    assert (explanation["cache_mb"], explanation["tolerance"]) == (0, 1e-4)
    assert explanation["time_budget_s"] == {**defaults["time_budget_s"], "lrp": 7.5}  # the others kept
    assert {k: v for k, v in explanation.items() if k not in ("cache_mb", "tolerance", "time_budget_s")} == \
        {k: v for k, v in defaults.items() if k not in ("cache_mb", "tolerance", "time_budget_s")}
    assert config_of(tmp_path)["handler"]["explanation"] == defaults  # no file: the defaults


@pytest.mark.parametrize("given, named", [
    ({"time_budget_s": {"lrp": -1}}, "time_budget_s.lrp"),
    ({"tolerance": 2}, "tolerance"),
    ({"cache": 1}, "cache"),
    ([1, 2], "a YAML mapping"),
])
def test_a_bad_explanation_file_stops_the_build_naming_the_key(tmp_path, given, named):
    settings = tmp_path / "explanation.yaml"
    settings.write_text(yaml.safe_dump(given))
    with pytest.raises(SystemExit, match=named):
        config_of(tmp_path, "--explanation", str(settings))


def test_threads_per_worker_reach_the_pool_settings_of_the_predicting_archive(tmp_path):
    assert config_of(tmp_path)["handler"]["pool"]["threads"] is None  # cores / workers
    assert config_of(tmp_path, "--threads", "2")["handler"]["pool"]["threads"] == 2
    pools = build_archive.parser().parse_args(["minilm", "--pools", "--threads", "2", "--explain-threads", "1"])
    assert build_archive.model_config(pools, "minilm")["handler"]["pool"]["threads"] == 2
    assert build_archive.model_config(pools, "minilm", explain_pool=True)["handler"]["pool"]["threads"] == 1
