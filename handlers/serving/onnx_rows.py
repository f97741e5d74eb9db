"""Row embeddings through onnxruntime, for predictions.

``OnnxRows(path)`` loads a graph written by ``siamese-export-onnx`` (``handlers/tools/export_onnx.py``) (token-id rows ->
un-normalised pooled, Dense-projected embeddings) and is called like ``Encoder.embed_ids``.
Pass it to ``Encoder.encode_batch(batch, embed_rows)``: the encoder runs the rows through the
graph, shifts them by the reference embeddings (computed once per length by the same graph) in
shift mode or normalises them in none mode, exactly as it does with torch. Explanations never use it; they need torch's gradients.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "embeddings"


def session_options(threads: int) -> ort.SessionOptions:
    """One intra-op pool of ``threads`` (sized like torch's), no inter-op parallelism."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle threads sleep instead of spinning: torch (explanations) shares the worker's cores.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class OnnxRows:
    """Sentence embeddings of token-id rows from an exported graph, on the CPU."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", threads: int | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no ONNX graph (build the archive with --runtime onnx)")
        self.device = torch.device(device)
        self.session = ort.InferenceSession(
            str(self.path),
            sess_options=session_options(threads or torch.get_num_threads()),
            providers=["CPUExecutionProvider"],
        )
        names = tuple(i.name for i in self.session.get_inputs())
        if names != INPUT_NAMES:
            raise ValueError(f"{self.path}: graph inputs {names}, expected {INPUT_NAMES}")

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        feeds = {
            INPUT_NAMES[0]: input_ids.detach().cpu().numpy().astype(np.int64, copy=False),
            INPUT_NAMES[1]: attention_mask.detach().cpu().numpy().astype(np.int64, copy=False),
        }
        (embeddings,) = self.session.run([OUTPUT_NAME], feeds)
        return torch.from_numpy(embeddings).to(self.device)
