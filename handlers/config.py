"""Handler settings: the ``handler:`` section of an archive's model-config.yaml.

Every setting has a default, so an archive may set only what differs. Unknown keys are an
error at load time (a typo must not silently fall back to a default).
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, model_validator


class ExplanationSettings(BaseModel):
    """Defaults and limits of the explanation methods."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["ij", "gae", "lrp"] = "ij"
    layer: int | None = Field(default=None, description="ij layer; None = the last block but one")
    steps: int = Field(default=50, ge=1)
    max_steps: int = Field(default=200, ge=1)
    quadrature: Literal["right", "left", "midpoint", "trapezoid", "gauss"] = Field(
        default="gauss", description="ij rule; gauss: lowest median attribution error (README), right: the original"
    )
    normalization: Literal["none", "min-max", "l2"] = "none"
    pairwise: bool = False
    memory_budget_mb: int = Field(default=1024, ge=16, description="peak extra memory of one explanation")
    time_budget_s: dict[Literal["ij", "gae", "lrp"], PositiveFloat] = Field(
        default_factory=lambda: {"ij": 60.0, "gae": 20.0, "lrp": 60.0},
        description="per method: an explanation estimated to take longer is refused up front (handlers/admission.py)",
    )

    @model_validator(mode="after")
    def _steps_within_limit(self) -> "ExplanationSettings":
        if self.steps > self.max_steps:
            raise ValueError(f"steps ({self.steps}) exceeds max_steps ({self.max_steps})")
        return self


class HandlerSettings(BaseModel):
    """Everything the handler reads from the archive, validated once in initialize."""

    model_config = ConfigDict(extra="forbid")

    model_dir: str = Field(default="model", description="model directory inside the archive")
    reference: Literal["shift", "none"] = "shift"
    similarity: Literal["cos", "dot"] = "cos"
    max_length: int = Field(default=256, ge=4)
    max_candidates: int = Field(default=64, ge=1)
    max_text_chars: int = Field(default=20_000, ge=1)
    max_body_bytes: int = Field(default=1_000_000, ge=1)
    runtime: Literal["torch", "onnx"] = Field(
        default="torch", description="predictions through torch or onnxruntime; explanations always use torch"
    )
    onnx_file: str = Field(default="model.onnx", description="the exported graph inside the archive (runtime onnx)")
    explanation: ExplanationSettings = ExplanationSettings()

    @classmethod
    def from_model_yaml(cls, model_yaml: dict | None) -> "HandlerSettings":
        return cls.model_validate((model_yaml or {}).get("handler") or {})
