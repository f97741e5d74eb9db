"""KServe's own model server as a custom runtime: the storage layout, the ServingRuntime and the
InferenceServices (a predictor and an explainer).

    python -m handlers.tools.deploy.modelserver minilm --layout model_store/kserve-modelserver/minilm
    python -m handlers.tools.deploy.modelserver minilm --layout DIR --runtime onnx   # predictions in onnxruntime
    python -m handlers.tools.deploy.modelserver minilm --image REGISTRY/explainable-similarity-kserve:0.1.0 \\
        --storage-uri 's3://BUCKET/explainable-similarity-modelserver/{name}' --out my-manifests

The layout under ``storageUri`` (mounted at ``/mnt/models``) is an archive's contents unpacked:
``model-config.yaml`` (the same ``handler:`` section; ``batchSize``, ``maxBatchDelay`` and
``responseTimeout`` set the collection window and admission) and ``model/`` (safetensors
weights only). The image (``modelserver.Dockerfile``) runs ``siamese-kserve``.

- ``explainable-similarity-runtime.yaml``: a ``ServingRuntime`` for the model format
  ``sentence-transformers``, both REST protocols, started with ``--explain_workers=0``: the
  predictor serves predictions only.
- ``<name>-modelserver-v1.yaml`` / ``-v2.yaml``: an ``InferenceService`` whose predictor uses
  that runtime, and whose explainer is the same image with one explanation process at nice 10
  (KServe routes ``/v1/models/<name>:explain`` to it; its storage comes through the
  ``STORAGE_URI`` variable, which KServe's storage initializer reads for custom containers).
  Predictor and explainer scale on their own.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from handlers.serving.kserve.config import ENGINE_SECTION, ONNX_ENGINE
from handlers.tools import archive
from handlers.tools.export_onnx import export_source
from handlers.tools.sources import model_dir
from handlers.tools.deploy.manifests import PROTOCOLS, parser, write_documents

RUNTIME = "explainable-similarity"
MODEL_FORMAT = "sentence-transformers"
IMAGE = "ghcr.io/example/explainable-similarity-kserve:0.1.0"
STORAGE_URI = "pvc://model-storage/explainable-similarity-modelserver/{name}"
HTTP_PORT = 8080  # KServe's model server port in a pod (also /metrics)
RESOURCES = {"cpu": "2", "memory": "4Gi"}  # requests = limits: Guaranteed QoS, steady latency
#: by hand, without a plan: ``siamese-capacity --write`` sizes both components from measured figures
HAND_SET = {
    "predictor": {"minReplicas": 1, "maxReplicas": 4},
    "explainer": {"minReplicas": 1, "maxReplicas": 2},
}
PREDICTOR_ARGS = ["--model_dir=/mnt/models", f"--http_port={HTTP_PORT}", "--http_host=0.0.0.0"]


def layout(source: str, out: Path, archive_options: list[str] | None = None) -> Path:
    """``out/model-config.yaml`` and ``out/model/`` of ``source``, as an archive would hold them;
    with ``--runtime onnx`` among ``archive_options`` also the exported graph, and the engine
    settings measured fastest with it (``ONNX_ENGINE``, in its ``kserve:`` section)."""
    args = archive.parser().parse_args([source, *(archive_options or [])])
    config = archive.model_config(args)
    if out.exists():
        shutil.rmtree(out)
    (out / "model").mkdir(parents=True)
    archive.stage_model(model_dir(source), out / "model")
    if config["handler"]["runtime"] == "onnx":
        export_source(model_dir(source), out / config["handler"]["onnx_file"], int8=args.int8)
        config[ENGINE_SECTION] = dict(ONNX_ENGINE)
    (out / "model-config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return out


def serving_runtime(image: str) -> dict:
    return {
        "apiVersion": "serving.kserve.io/v1alpha1",
        "kind": "ServingRuntime",
        "metadata": {"name": RUNTIME, "labels": {"app.kubernetes.io/part-of": "explainable-similarity"}},
        "spec": {
            "supportedModelFormats": [{"name": MODEL_FORMAT, "version": "1", "autoSelect": True}],
            "protocolVersions": list(PROTOCOLS),
            "annotations": {"prometheus.kserve.io/port": str(HTTP_PORT), "prometheus.kserve.io/path": "/metrics"},
            "containers": [{
                "name": "kserve-container",
                "image": image,
                "args": ["--model_name={{.Name}}", *PREDICTOR_ARGS, "--explain_workers=0"],
                "env": [{"name": "OMP_NUM_THREADS", "value": RESOURCES["cpu"]}],
                "ports": [{"containerPort": HTTP_PORT, "protocol": "TCP"}],
                "resources": {"requests": dict(RESOURCES), "limits": dict(RESOURCES)},
            }],
        },
    }


def sizing_of(component: str, plan=None) -> tuple[dict, dict, str]:
    """A component's scaling keys, its resources (requests = limits) and its cores: from a
    ``capacity.Plan`` when one is given, else the hand-set defaults."""
    if plan is None:
        return dict(HAND_SET[component]), {"requests": dict(RESOURCES), "limits": dict(RESOURCES)}, RESOURCES["cpu"]
    sized = getattr(plan, component)
    return {**sized.autoscaling, "containerConcurrency": sized.container_concurrency}, sized.resources(), sized.cpu


def inference_service(name: str, protocol: str, storage_uri: str, image: str, sizing=None) -> dict:
    """The model is named after the InferenceService (the runtime's ``{{.Name}}``): KServe routes
    ``/v1/models/<that name>:explain`` to the explainer, which serves the same name. ``sizing``
    (a ``capacity.Plan``) sets each component's replicas, autoscaling and resources."""
    storage = storage_uri.format(name=name)
    service = f"{name}-modelserver-{protocol}"
    (predictor_scaling, predictor_resources, predictor_cpu), (explainer_scaling, explainer_resources, explainer_cpu) = (
        sizing_of(component, sizing) for component in ("predictor", "explainer"))
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {
            "name": service,
            "labels": {"app.kubernetes.io/part-of": "explainable-similarity"},
            "annotations": {
                "serving.kserve.io/enable-prometheus-scraping": "true",
                "prometheus.kserve.io/port": str(HTTP_PORT),
                "prometheus.kserve.io/path": "/metrics",
                "prometheus.io/scrape": "true",
                "prometheus.io/port": str(HTTP_PORT),
                "prometheus.io/path": "/metrics",
            },
        },
        "spec": {
            "predictor": {
                **predictor_scaling,
                "timeout": 60,
                "model": {
                    "modelFormat": {"name": MODEL_FORMAT},
                    "runtime": RUNTIME,
                    "protocolVersion": protocol,
                    "storageUri": storage,
                    "env": [{"name": "OMP_NUM_THREADS", "value": predictor_cpu}],
                    "resources": predictor_resources,
                },
            },
            "explainer": {
                **explainer_scaling,
                "timeout": 300,
                "containers": [{
                    "name": "kserve-container",
                    "image": image,
                    "args": [f"--model_name={service}", *PREDICTOR_ARGS, "--explain_workers=1", "--explain_nice=10"],
                    "env": [{"name": "STORAGE_URI", "value": storage},
                            {"name": "OMP_NUM_THREADS", "value": explainer_cpu}],
                    "resources": explainer_resources,
                }],
            },
        },
    }


def write(name: str, out: Path, storage_uri: str, image: str, sizing=None) -> list[Path]:
    documents = {f"{RUNTIME}-runtime.yaml": serving_runtime(image)}
    documents.update({f"{name}-modelserver-{p}.yaml": inference_service(name, p, storage_uri, image, sizing)
                      for p in PROTOCOLS})
    return write_documents(out, documents)


def main() -> None:
    p = parser(__doc__, STORAGE_URI, IMAGE, "minilm, mpnet or a sentence-transformers directory (its name names "
               "the model)", "the image built from modelserver.Dockerfile")
    p.add_argument("--layout", type=Path, help="also write the storage layout of the model here")
    p.add_argument("--runtime", choices=["torch", "onnx"], default="torch",
                   help="the layout's predictions: torch (bf16 where native) or onnxruntime (the graph exported into it)")
    args = p.parse_args()
    if args.layout:
        print(f"wrote {layout(args.name, args.layout, ['--runtime', args.runtime])}")
    for path in write(Path(args.name).name, args.out, args.storage_uri, args.image):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
