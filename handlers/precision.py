"""The number format of predictions: fp32, or bf16 where the device computes it natively.

Predictions in bf16 run a copy of the transformer whose Linear layers hold bf16 weights (the
embeddings and norms are shared with the fp32 model), under ``torch.autocast``: the matrix
products run in bf16, while the hidden state between blocks, the norms, pooling, the Dense
head, the shift and the score stay fp32. That is autocast's accuracy without casting the
weights on every pass (docs/performance.md: "Precision (bf16)"). Explanations always run the fp32 weights:
their completeness is measured in fp32. bf16 is worth it only where the hardware multiplies bf16
natively (x86 ``avx512_bf16`` or AMX, Arm ``bf16``, CUDA from Ampere on); elsewhere torch
emulates it, slower than fp32, so the encoder falls back to fp32 and says why
(``PrecisionChoice.reason``).
"""
from __future__ import annotations

import copy
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

Precision = Literal["fp32", "bf16"]
DTYPES: dict[Precision, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _arm_bf16() -> bool:
    cpuinfo = Path("/proc/cpuinfo")
    if platform.machine() not in ("aarch64", "arm64") or not cpuinfo.exists():
        return False
    return any(line.startswith("Features") and " bf16" in line for line in cpuinfo.read_text().splitlines())


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 matrices in hardware (not emulated through fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported() or _arm_bf16()
    return False


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision asked for, the one predictions use, and why they differ (empty if not)."""

    requested: Precision
    used: Precision
    reason: str = ""

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.used]

    def describe(self) -> dict[str, str]:
        return {"requested": self.requested, "used": self.used, "reason": self.reason}


def choose_precision(requested: Precision, device: torch.device, native: bool | None = None) -> PrecisionChoice:
    """The precision predictions run in on ``device``.

    ``native`` overrides the hardware check: ``False`` behaves as on a device without native
    bf16 (the fallback), ``True`` runs bf16 even where it is emulated; ``None`` detects it.
    """
    if requested not in DTYPES:
        raise ValueError(f"precision {requested!r}: expected one of {', '.join(DTYPES)}")
    if requested == "fp32":
        return PrecisionChoice("fp32", "fp32")
    detected = native_bf16(device) if native is None else native
    if detected:
        return PrecisionChoice("bf16", "bf16")
    how = "declared without" if native is False else "has no"
    return PrecisionChoice("bf16", "fp32", f"{device.type} {how} native bf16 (emulated bf16 is slower than fp32)")


def linear_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of ``model`` whose Linear layers hold their parameters in ``dtype``; every other
    parameter (embeddings, norms) is the fp32 model's own, shared, not copied."""
    shared = {id(p): p for m in model.modules() if not isinstance(m, nn.Linear) for p in m.parameters(recurse=False)}
    low = copy.deepcopy(model, memo=shared)
    for module in low.modules():
        if isinstance(module, nn.Linear):
            module.to(dtype)
    return low
