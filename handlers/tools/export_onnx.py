"""Export an encoder to ONNX: token-id rows -> un-normalised sentence embeddings.

    siamese-export-onnx minilm out/minilm.onnx
    siamese-export-onnx minilm out/minilm.onnx --int8     # also out/minilm.int8.onnx

The graph is the encoder's own forward pass, family adapter and head (``encoder.adapter.forward``
then ``encoder.head``: pooling and Dense), with inputs ``input_ids`` and ``attention_mask``
([batch, sequence], int64, both axes dynamic) and output ``embeddings`` ([batch, dim]). It
covers both reference modes: in shift mode ``Encoder.encode_batch`` subtracts the reference
embeddings, computed once per length by the same graph (``handlers/onnx_runtime.py``), exactly
as it does with torch; the model's Normalize module is applied there too, never in the graph.
Attention is traced in its eager form (plain MatMul and Softmax ops).

The result is checked with onnx's checker and compared with torch on rows of a length the
export never saw. ``--int8`` adds a copy with int8 weights (onnxruntime dynamic quantisation).
"""
from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from handlers.encoder import Encoder, load_encoder
from handlers.serving.onnx_rows import INPUT_NAMES, OUTPUT_NAME, OnnxRows
from handlers.tools.sources import model_dir

OPSET = 17  # LayerNormalization is a single op from opset 17 on
PROBE_TEXTS = ["a short one", "a somewhat longer text, to give the rows different lengths and padding"]


class RowEmbeddings(nn.Module):
    """``encoder.embed_ids`` as a module, so that its weights become the graph's initializers."""

    def __init__(self, encoder: Encoder):
        super().__init__()
        self.encoder = encoder
        self.transformer = encoder.adapter.model
        self.dense = encoder.dense

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder.embed_ids(input_ids, attention_mask)


def export(encoder: Encoder, target: Path) -> Path:
    """Write the row-embedding graph of ``encoder`` to ``target`` and check it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    sample = encoder.tokenize(["a sample text for tracing"])
    module = RowEmbeddings(encoder).eval().cpu()
    with torch.no_grad(), encoder.adapter.attention("eager"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on Python-side shape arithmetic
        torch.onnx.export(
            module,
            (sample.input_ids.cpu(), sample.attention_mask.cpu()),
            str(target),
            input_names=list(INPUT_NAMES),
            output_names=[OUTPUT_NAME],
            dynamic_axes={
                INPUT_NAMES[0]: {0: "batch", 1: "sequence"},
                INPUT_NAMES[1]: {0: "batch", 1: "sequence"},
                OUTPUT_NAME: {0: "batch"},
            },
            opset_version=OPSET,
            dynamo=False,
        )
    onnx.checker.check_model(str(target), full_check=True)
    return target


def quantize_int8(source: Path, target: Path) -> Path:
    """Dynamic quantisation: int8 weights of the MatMul/Gemm ops, activations quantised per run."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
    onnx.checker.check_model(str(target), full_check=True)
    return target


def max_difference(encoder: Encoder, onnx_file: Path, texts: list[str] = PROBE_TEXTS) -> float:
    """Largest |onnx - torch| of the row embeddings of ``texts`` and their reference rows."""
    batch = encoder.tokenize(texts)
    rows = OnnxRows(onnx_file, device=encoder.device)
    references = encoder.references(batch.lengths)
    differences = []
    for ids, mask in ((batch.input_ids, batch.attention_mask), (references.input_ids, references.attention_mask)):
        with torch.inference_mode():
            expected = encoder.embed_ids(ids, mask)
        differences.append(float((rows(ids, mask) - expected).abs().max()))
    return max(differences)


def int8_name(onnx_file: Path) -> Path:
    return onnx_file.with_name(onnx_file.stem + ".int8.onnx")


def export_source(source: Path, target: Path, int8: bool = False) -> Path:
    """Export a model directory to ``target`` (and its int8 copy); the file to serve."""
    exported = export(load_encoder(source, reference="none"), target)
    return quantize_int8(exported, int8_name(exported)) if int8 else exported


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="minilm, mpnet, or a local sentence-transformers directory")
    p.add_argument("target", type=Path, help="the .onnx file to write")
    p.add_argument("--int8", action="store_true", help="also write <target>.int8.onnx (dynamic quantisation)")
    args = p.parse_args(argv)
    encoder = load_encoder(model_dir(args.source), reference="none")
    export(encoder, args.target)
    print(f"exported {args.target} (opset {OPSET}); max |onnx - torch| = {max_difference(encoder, args.target):.2e}")
    if args.int8:
        quantized = quantize_int8(args.target, int8_name(args.target))
        print(f"quantised {quantized}; max |int8 - torch| = {max_difference(encoder, quantized):.2e}")


if __name__ == "__main__":
    main()
