"""An archive's model-config.yaml, validated whole: TorchServe's keys and the ``handler:`` section.

Every setting has a default, so an archive may set only what differs. Unknown keys of the
``handler:`` section are an error (a typo must not silently fall back to a default), and the
rules between fields are checked here, so that ``siamese-archive`` refuses an archive whose
workers would refuse to start: every method's time budget must be below ``responseTimeout``.
"""
from __future__ import annotations

import copy
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, create_model, model_validator

from ..attribution import METHODS, MethodName, declared_options, options_for
from ..precision import Precision
from ..reference import Mode, Similarity
from .pools import PoolSettings

TORCHSERVE_RESPONSE_TIMEOUT_S = 120  # TorchServe's default responseTimeout


class _Explanations(BaseModel):
    """The archive's defaults of every method's options (``ExplanationSettings`` adds them as the
    methods declare them, ``Method.Options``, with their checks), the default method, and the
    limits of explanations."""

    model_config = ConfigDict(extra="forbid")

    method: MethodName = "ij"
    time_budget_s: dict[MethodName, PositiveFloat] = Field(
        default_factory=lambda: {"ij": 60.0, "gae": 20.0, "lrp": 60.0},
        description="per method: an explanation estimated to take longer is refused up front (serving/admission.py)",
    )
    cache_mb: float = Field(
        default=64, ge=0, description="per worker: explanations kept to answer identical requests again (0: off)"
    )

    @model_validator(mode="after")
    def _every_method_takes_its_defaults(self) -> "_Explanations":
        """Each method's own checks pass on the archive's defaults (ij: steps within max_steps)."""
        for method in METHODS:
            options_for(method, {}, self.defaults(method))
        return self

    def defaults(self, method: str) -> dict[str, Any]:
        """The archive's default options of ``method`` (only its own)."""
        fields = METHODS[method].Options.model_fields
        return {k: v for k, v in self.model_dump().items() if k in fields}


ExplanationSettings = create_model(
    "ExplanationSettings", __base__=_Explanations, __module__=__name__,
    **{name: (info.annotation, copy.copy(info)) for name, info in declared_options().items()},
)


class HandlerSettings(BaseModel):
    """The ``handler:`` section: what the handler reads from the archive."""

    model_config = ConfigDict(extra="forbid")

    model_dir: str = Field(default="model", description="model directory inside the archive")
    reference: Mode = "shift"
    similarity: Similarity = "cos"
    max_length: int = Field(default=256, ge=4)
    max_candidates: int = Field(default=64, ge=1)
    max_texts: int = Field(default=64, ge=1, description="texts per embeddings request")
    max_text_chars: int = Field(default=20_000, ge=1)
    max_body_bytes: int = Field(default=1_000_000, ge=1)
    runtime: Literal["torch", "onnx"] = Field(
        default="torch", description="predictions through torch or onnxruntime; explanations always use torch"
    )
    onnx_file: str = Field(default="model.onnx", description="the exported graph inside the archive (runtime onnx)")
    precision: Precision | None = Field(
        default=None, description="torch predictions in bf16 (where the device computes it natively, else fp32, "
        "logged and described) or fp32; explanations always fp32. Default: bf16 with runtime torch, fp32 with onnx",
    )
    native_bf16: Literal["detect", "no"] = Field(
        default="detect", description="no: run as on a device without native bf16 (the fp32 fallback)"
    )
    explanation: ExplanationSettings = ExplanationSettings()
    pool: PoolSettings = Field(default_factory=PoolSettings, description="which requests this model answers (pools.py)")

    @model_validator(mode="after")
    def _precision_of_runtime(self) -> "HandlerSettings":
        if self.precision is None:
            self.precision = "bf16" if self.runtime == "torch" else "fp32"
        elif self.precision == "bf16" and self.runtime != "torch":
            raise ValueError("precision bf16 needs runtime torch (an ONNX graph runs in its own precision)")
        return self

    @classmethod
    def from_model_yaml(cls, model_yaml: dict | None) -> "HandlerSettings":
        return ModelConfig.from_yaml(model_yaml).handler


class ModelConfig(BaseModel):
    """The whole model-config.yaml. TorchServe's own keys that the project does not set are
    passed through untouched."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    min_workers: PositiveInt = Field(default=1, alias="minWorkers")
    max_workers: PositiveInt = Field(default=1, alias="maxWorkers")
    batch_size: PositiveInt = Field(default=1, alias="batchSize")
    max_batch_delay: int = Field(default=100, ge=1, alias="maxBatchDelay",
                                 description="milliseconds; TorchServe replaces 0 with its default, 100")
    response_timeout: PositiveInt = Field(default=TORCHSERVE_RESPONSE_TIMEOUT_S, alias="responseTimeout",
                                          description="seconds")
    startup_timeout: PositiveInt = Field(default=120, alias="startupTimeout",
                                         description="seconds a worker may take to load: imports, calibration and the "
                                         "explanation checks (TorchServe's default is 120)")
    handler: HandlerSettings = HandlerSettings()

    @classmethod
    def from_yaml(cls, model_yaml: dict | None) -> "ModelConfig":
        return cls.model_validate(model_yaml or {})

    @model_validator(mode="after")
    def _consistent(self) -> "ModelConfig":
        if self.max_workers < self.min_workers:
            raise ValueError(f"maxWorkers ({self.max_workers}) is below minWorkers ({self.min_workers})")
        for method, budget in self.handler.explanation.time_budget_s.items():
            if budget >= self.response_timeout:
                raise ValueError(f"handler.explanation.time_budget_s.{method} ({budget:g} s) must be below "
                                 f"responseTimeout ({self.response_timeout} s): reaching it kills the worker")
        return self

    def to_yaml_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)
