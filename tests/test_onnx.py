"""The ONNX path: export of every family, onnxruntime scores equal to torch's, int8, and an archive
with ``runtime: onnx`` served by a real TorchServe (predictions by onnxruntime, explanations by torch)."""
from __future__ import annotations

import asyncio
import os
import zipfile

import numpy as np
import onnx
import pytest
import torch
import yaml
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from handlers import explain, load_encoder
from handlers.serving.kserve.config import EngineSettings
from handlers.serving.kserve.metrics import PrometheusRecorder
from handlers.serving.kserve.model import SiameseModel
from handlers.serving.settings import HandlerSettings
from handlers.serving.predictions import predict_items
from handlers.serving.onnx_rows import INPUT_NAMES, OUTPUT_NAME, OnnxRows
from handlers.serving.protocol import PairItem
from handlers.tools.evaluation import pair_scores, spearman
from handlers.tools.export_onnx import OPSET, export, int8_name, quantize_int8
from handlers.tools.sources import sts_pairs
from tests.support.http import post

TEXTS = [  # lengths and a batch size the export's single traced row never had
    "A man is playing a guitar.",
    "x",
    "The quick brown fox jumps over the lazy dog while the cat sleeps on the warm sofa all day.",
]


@pytest.fixture(scope="module")
def minilm_onnx(minilm_shift, tmp_path_factory):
    return export(minilm_shift, tmp_path_factory.mktemp("onnx") / "minilm.onnx")


@pytest.fixture(scope="module")
def minilm_int8(minilm_onnx):
    return quantize_int8(minilm_onnx, int8_name(minilm_onnx))


def test_every_family_exports_with_dynamic_axes(tiny_family, tmp_path):
    family, path = tiny_family
    encoder = load_encoder(path, reference="shift")
    onnx_file = export(encoder, tmp_path / f"{family}.onnx")
    model = onnx.load(str(onnx_file))
    assert [i.name for i in model.graph.input] == list(INPUT_NAMES)
    assert [o.name for o in model.graph.output] == [OUTPUT_NAME]
    for graph_input in model.graph.input:
        assert [d.dim_param for d in graph_input.type.tensor_type.shape.dim] == ["batch", "sequence"]
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == OPSET
    rows = OnnxRows(onnx_file)
    batch = encoder.tokenize(TEXTS)
    with torch.inference_mode():
        expected = encoder.embed_ids(batch.input_ids, batch.attention_mask)
    assert torch.allclose(rows(batch.input_ids, batch.attention_mask), expected, atol=1e-5)
    for reference in ("shift", "none"):
        mode = load_encoder(path, reference=reference)
        assert torch.allclose(mode.encode_batch(batch, rows), mode.encode_batch(batch), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("reference", ["shift", "none"])
def test_minilm_scores_equal_torch_on_sts_pairs(minilm_dir, minilm_onnx, reference):
    encoder = load_encoder(minilm_dir, reference=reference, similarity="cos")
    pairs = sts_pairs()[:60]
    onnx_scores = pair_scores(encoder, pairs, OnnxRows(minilm_onnx))
    np.testing.assert_allclose(onnx_scores, pair_scores(encoder, pairs), rtol=0, atol=1e-4)


@pytest.mark.slow
def test_int8_quantises_the_matmuls_and_keeps_the_ranking(minilm_shift, minilm_onnx, minilm_int8):
    ops = {node.op_type for node in onnx.load(str(minilm_int8)).graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops
    assert minilm_int8.stat().st_size < 0.75 * minilm_onnx.stat().st_size  # the embedding table stays fp32
    pairs = sts_pairs()
    torch_scores = pair_scores(minilm_shift, pairs)
    int8_scores = pair_scores(minilm_shift, pairs, OnnxRows(minilm_int8))
    drift = np.abs(int8_scores - torch_scores)
    assert 0 < drift.max() < 0.1  # measured: about 0.04 (docs/performance.md, "ONNX predictions")
    assert spearman(int8_scores, torch_scores) > 0.97


def test_runtime_setting_is_validated():
    assert HandlerSettings().runtime == "torch"
    assert HandlerSettings.from_model_yaml({"handler": {"runtime": "onnx"}}).onnx_file == "model.onnx"
    with pytest.raises(ValidationError):
        HandlerSettings.from_model_yaml({"handler": {"runtime": "tensorrt"}})


def test_missing_graph_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.onnx"):
        OnnxRows(tmp_path / "model.onnx")


def test_kserves_model_server_runs_onnx_predictions_on_every_core(minilm_dir, minilm_shift, minilm_onnx):
    """``siamese-kserve --runtime onnx --onnx_file ...`` on a model directory: its batches run in
    onnxruntime on all the cores (two batches at once share them; idle threads sleep)."""
    settings = HandlerSettings(model_dir=".", runtime="onnx", onnx_file=str(minilm_onnx))
    model = SiameseModel("m", minilm_dir, settings, EngineSettings(explain_workers=0, max_batch_delay_ms=0),
                         PrometheusRecorder("m", "ij", CollectorRegistry()))
    threads = torch.get_num_threads()
    try:
        assert model.load()
        assert torch.get_num_threads() == (os.cpu_count() or 1)
        rows = model.service.embed_rows
        assert isinstance(rows, OnnxRows) and rows.session.get_session_options().intra_op_num_threads == os.cpu_count()

        async def scores(pairs):
            answers = await asyncio.gather(*(model.predict({"text_a": a, "text_b": b}) for a, b in pairs))
            return [answer["score"] for answer in answers]

        pairs = [(a, b) for a, b, _ in sts_pairs()[:6]]
        served = asyncio.run(scores(pairs))
        in_process = [predict_items(minilm_shift, [PairItem(text_a=a, text_b=b)], rows)[0]["score"] for a, b in pairs]
        assert served == pytest.approx(in_process, abs=1e-6)
        assert served == pytest.approx(minilm_shift.score_pairs(pairs), abs=1e-4)
    finally:
        model.stop()
        torch.set_num_threads(threads)


# -- a real TorchServe with archives whose predictions run in onnxruntime -----------------------
def test_int8_archive_packs_the_quantised_graph(model_store):
    with zipfile.ZipFile(model_store / "minilm-int8.mar") as mar:
        names = set(mar.namelist())
        config = yaml.safe_load(mar.read("model-config.yaml"))
    assert config["handler"]["runtime"] == "onnx"
    assert config["handler"]["onnx_file"] == "model.int8.onnx" and "model.int8.onnx" in names
    assert "model.onnx" not in names


def predict(server, model: str, body: dict) -> dict:
    reply = post(server, body, f"predictions/{model}", timeout=120)
    assert reply.status_code == 200, reply.text
    return reply.json()


@pytest.mark.server
def test_served_onnx_predictions_equal_torch(server, minilm_shift):
    pairs = sts_pairs()[:8]
    for a, b, _ in pairs:
        body = predict(server, "minilm-onnx", {"text_a": a, "text_b": b})
        assert body["score"] == pytest.approx(minilm_shift.score(a, b), abs=1e-4)
        assert body["reference"] == "shift"
    query, candidates = pairs[0][0], [b for _, b, _ in pairs]
    body = predict(server, "minilm-onnx", {"query": query, "candidates": candidates})
    expected = minilm_shift.score_pairs([(query, c) for c in candidates])
    assert body["scores"] == pytest.approx(expected, abs=1e-4)


@pytest.mark.server
def test_served_int8_predictions_come_from_onnxruntime(server, model_store, minilm_shift, tmp_path):
    with zipfile.ZipFile(model_store / "minilm-int8.mar") as mar:
        rows = OnnxRows(mar.extract("model.int8.onnx", tmp_path))
    served, in_process, torch_scores = [], [], []
    for a, b, _ in sts_pairs()[:8]:
        served.append(predict(server, "minilm-int8", {"text_a": a, "text_b": b})["score"])
        in_process.append(predict_items(minilm_shift, [PairItem(text_a=a, text_b=b)], rows)[0]["score"])
        torch_scores.append(minilm_shift.score(a, b))
    assert served == pytest.approx(in_process, abs=1e-4)
    assert max(abs(s - t) for s, t in zip(served, torch_scores)) > 1e-3  # not torch's answers


@pytest.mark.server
def test_served_onnx_archive_explains_with_torch(server, minilm_shift):
    a, b, _ = sts_pairs()[0]
    reply = post(server, {"text_a": a, "text_b": b, "method": "ij", "steps": 8}, "explanations/minilm-int8")
    assert reply.status_code == 200, reply.text
    body = reply.json()
    expected = explain(minilm_shift, a, b, method="ij", steps=8)
    assert body["score"] == pytest.approx(minilm_shift.score(a, b), abs=1e-5)
    np.testing.assert_allclose(body["attributions"], expected["attributions"], atol=1e-5)


@pytest.mark.server
def test_served_onnx_bad_request_gets_4xx(server):
    reply = post(server, {"text_a": "x"}, "predictions/minilm-onnx", timeout=60)
    assert 400 <= reply.status_code < 500 and reply.json()["field"] == "text_b"
