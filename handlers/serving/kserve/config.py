"""The settings of KServe's model server as an engine: a model-config.yaml's ``handler:`` section
(as an archive's) and the engine's own (``EngineSettings``), under the command line's overrides."""
from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, NonNegativeInt, PositiveInt, ValidationError

from ..settings import HandlerSettings, ModelConfig

MODEL_CONFIG = "model-config.yaml"
#: the keys of TorchServe's model-config.yaml that this engine reads, and the settings they give
TORCHSERVE_KEYS = {"batchSize": "batch_size", "maxBatchDelay": "max_batch_delay_ms", "responseTimeout": "response_timeout_s"}
#: the section of a model-config.yaml with this engine's own settings (``EngineSettings``; no
#: archive has it, TorchServe never reads it): what a storage layout sets beyond TorchServe's keys,
#: such as no collection window, which TorchServe's ``maxBatchDelay`` cannot say
ENGINE_SECTION = "kserve"
#: the engine settings measured fastest with onnxruntime predictions (docs/performance.md): no
#: collection window, batches of up to 8 (the engine's default), two at once on every core
ONNX_ENGINE = {"max_batch_delay_ms": 0, "batch_size": 8}


class EngineSettings(BaseModel):
    """How KServe's model server runs the model (what TorchServe's config and archive give it)."""

    model_config = ConfigDict(extra="forbid")

    batch_size: PositiveInt = Field(default=8, description="requests per prediction batch, at most (batchSize)")
    max_batch_tokens: NonNegativeInt = Field(
        default=0, description="tokens per prediction batch, at most (every text of its requests); 0: no bound")
    max_batch_delay_ms: NonNegativeFloat = Field(default=2, description="the collection window (maxBatchDelay)")
    prediction_threads: PositiveInt = Field(default=2, description="prediction batches computed at once (as 2 workers)")
    torch_threads: NonNegativeInt = Field(
        default=0, description="threads per prediction batch, torch's or onnxruntime's; 0: cores / prediction_threads "
        "with torch, cores with onnxruntime (its idle threads sleep, so batches computed at once share the cores)")
    explain_workers: NonNegativeInt = Field(default=1, description="explanation processes; 0: none (501)")
    explain_nice: int = Field(default=10, ge=0, le=19, description="their CPU priority (nice)")
    explain_threads: NonNegativeInt = Field(default=0, description="torch threads per explanation process; 0: cores")
    explain_batch_size: PositiveInt = Field(default=8, description="explanation requests per batch, at most")
    response_timeout_s: PositiveInt = Field(default=300, description="admission: a batch's explanations get half")
    max_request_bytes: PositiveInt = Field(default=8 * 2**20, description="request body limit (413 above)")

    def batch_threads(self, runtime: str, cores: int) -> int:
        """The threads that compute one prediction batch (``torch_threads``, or its default)."""
        if self.torch_threads:
            return self.torch_threads
        return cores if runtime == "onnx" else max(1, cores // self.prediction_threads)


def load_settings(
    model_dir: Path, config_file: Path | None = None, handler: dict | None = None, engine: dict | None = None
) -> tuple[Path, HandlerSettings, EngineSettings]:
    """The model's root directory and settings: ``config_file`` (or ``model_dir``'s
    model-config.yaml, its ``kserve:`` section over TorchServe's keys) under the command line's
    ``handler`` and ``engine`` overrides. A
    ``runtime`` given there without a ``precision`` takes that runtime's default precision,
    not the file's."""
    config_file = config_file or (model_dir / MODEL_CONFIG if (model_dir / MODEL_CONFIG).is_file() else None)
    raw = yaml.safe_load(config_file.read_text()) if config_file else {}
    handler = dict(handler or {})
    if "runtime" in handler:
        handler.setdefault("precision", None)
    try:
        raw = dict(raw or {})
        raw["handler"] = {**(raw.get("handler") or {}), **handler}
        config = ModelConfig.from_yaml(raw)
        from_file = config.to_yaml_dict()
        given = {name: from_file[key] for key, name in TORCHSERVE_KEYS.items() if key in raw}
        settings = EngineSettings(**{**given, **(raw.get(ENGINE_SECTION) or {}), **(engine or {})})
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in error["loc"])
        raise SystemExit(f"{config_file or 'settings'}: {where}: {error['msg']}") from None
    handler_settings = config.handler
    if not (model_dir / handler_settings.model_dir).is_dir():  # model_dir is the model itself
        handler_settings = handler_settings.model_copy(update={"model_dir": "."})
    return model_dir, handler_settings, settings
