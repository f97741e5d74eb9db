"""Write KServe InferenceService manifests for an archive: v1 and v2 protocol, CPU and GPU.

    python -m handlers.tools.deploy.manifests minilm --storage-uri s3://bucket/similarity/minilm
    kubectl apply -f scripts/deploy/kserve/manifests/minilm-v1-cpu.yaml

``storageUri`` holds the layout of ``python -m handlers.tools.deploy.layout --explainer``
(config/ + model-store/). Predictions and explanations are two components that scale on their
own, each with its resources and its autoscaling target:

- the ``predictor`` (``/v1/models/{m}:predict``, ``/v2/models/{m}/infer``): KServe's TorchServe
  runtime (``kserve-torchserve``), its container image replaced by one with the handler's
  dependencies (scripts/deploy/kserve/Dockerfile), serving ``<name>.mar``;
- the ``explainer`` (``/v1/models/{m}:explain``, where KServe routes it): the same image and
  storage as a custom container that starts TorchServe from ``config/explainer.properties`` (the
  explanation pool ``<name>-explain.mar``, served as ``<name>``) and KServe's model server.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from handlers.tools.sources import ROOT
from handlers.tools.deploy.layout import EXPLAINER_CONFIG, MOUNT

OUT = ROOT / "scripts" / "deploy" / "kserve" / "manifests"  # the checkout's written manifests
STORAGE_URI = "pvc://model-storage/explainable-similarity/{name}"
IMAGE = "ghcr.io/example/explainable-similarity-kfs:0.1.0"
METRICS_PORT = 8082
PROTOCOLS = ("v1", "v2")
DEVICES = ("cpu", "gpu")

# Requests = limits (Guaranteed QoS: predictable latency), per component and device. Predictor:
# the model in each of its workers and a batch. Explainer: the model and a batch of explanations,
# each within the archive's memory budget (1 GiB by default).
RESOURCES = {
    "predictor": {
        "cpu": {"cpu": "2", "memory": "4Gi"},
        "gpu": {"cpu": "2", "memory": "8Gi", "nvidia.com/gpu": "1"},
    },
    "explainer": {
        "cpu": {"cpu": "2", "memory": "6Gi"},
        "gpu": {"cpu": "2", "memory": "8Gi", "nvidia.com/gpu": "1"},
    },
}
# Each component scales on its own (Knative's autoscaler, on requests in flight per pod):
# predictions take milliseconds and batch well; an explanation takes seconds of a pod's cores.
AUTOSCALING = {
    "predictor": {"minReplicas": 1, "maxReplicas": 4, "scaleMetric": "concurrency", "scaleTarget": 16},
    "explainer": {"minReplicas": 1, "maxReplicas": 2, "scaleMetric": "concurrency", "scaleTarget": 2},
}
TIMEOUT_S = {"predictor": 60, "explainer": 300}
CONTAINER = "kserve-container"
TORCHSERVE = "torchserve --start --model-store={mount}/model-store --ts-config={config}"
KSERVE_WRAPPER = "/home/model-server/kserve_wrapper/__main__.py"  # KServe's model server in the kfs image
# KServe appends --model_name, --predictor_host and --http_port to a custom explainer's arguments;
# TorchServe's command line refuses unknown ones, so the script ignores them (bash's $0, $1, ...).
EXPLAINER_SCRIPT = f"{TORCHSERVE} && exec python {KSERVE_WRAPPER}".format(
    mount=MOUNT, config=f"{MOUNT}/config/{EXPLAINER_CONFIG}"
)
SECURITY = {  # as KServe's TorchServe runtime runs its container
    "runAsUser": 1000, "runAsNonRoot": True, "allowPrivilegeEscalation": False, "privileged": False,
    "capabilities": {"drop": ["ALL"]},
}


def gpu_image(image: str) -> str:
    """The GPU build of an image: its tag with ``-gpu`` appended (``x:0.1.0`` -> ``x:0.1.0-gpu``)."""
    repository, sep, tag = image.rpartition(":")
    if not sep or "/" in tag:
        return f"{image}:latest-gpu"
    return f"{repository}:{tag}-gpu"


def requests_and_limits(component: str, device: str) -> dict:
    resources = RESOURCES[component][device]
    return {"requests": dict(resources), "limits": dict(resources)}


def threads(component: str, device: str) -> list[dict]:
    return [{"name": "OMP_NUM_THREADS", "value": RESOURCES[component][device]["cpu"]}]


def explainer(storage_uri: str, image: str, device: str) -> dict:
    """The explainer component: TorchServe with the explanation pool, then KServe's model server."""
    return {
        **AUTOSCALING["explainer"],
        "timeout": TIMEOUT_S["explainer"],
        "containers": [{
            "name": CONTAINER,
            "image": image,
            "command": ["/bin/bash", "-c", EXPLAINER_SCRIPT, "explainer"],
            "env": [
                {"name": "STORAGE_URI", "value": storage_uri},  # KServe mounts it at /mnt/models
                {"name": "CONFIG_PATH", "value": f"{MOUNT}/config/{EXPLAINER_CONFIG}"},  # read by the model server
                {"name": "PROTOCOL_VERSION", "value": "v1"},  # KServe serves :explain in v1
                *threads("explainer", device),
            ],
            "resources": requests_and_limits("explainer", device),
            "securityContext": SECURITY,
        }],
    }


def inference_service(name: str, protocol: str, device: str, storage_uri: str, image: str) -> dict:
    storage = storage_uri.format(name=name)
    device_image = image if device == "cpu" else gpu_image(image)
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {
            "name": f"{name}-{protocol}-{device}",
            "labels": {"app.kubernetes.io/part-of": "explainable-similarity"},
            "annotations": {
                # KServe's own switch: scrape the runtime's metrics port (TorchServe's metrics API).
                "serving.kserve.io/enable-prometheus-scraping": "true",
                "prometheus.kserve.io/port": str(METRICS_PORT),
                "prometheus.kserve.io/path": "/metrics",
                # For a Prometheus that discovers pods by the usual annotations.
                "prometheus.io/scrape": "true",
                "prometheus.io/port": str(METRICS_PORT),
                "prometheus.io/path": "/metrics",
            },
        },
        "spec": {
            "predictor": {
                **AUTOSCALING["predictor"],
                "timeout": TIMEOUT_S["predictor"],
                "model": {
                    "modelFormat": {"name": "pytorch"},
                    "protocolVersion": protocol,
                    "runtime": "kserve-torchserve",
                    "storageUri": storage,
                    "image": device_image,
                    "env": threads("predictor", device),
                    "resources": requests_and_limits("predictor", device),
                },
            },
            "explainer": explainer(storage, device_image, device),
        },
    }


def write_documents(out: Path, documents: dict[str, dict]) -> list[Path]:
    """Each document as YAML under ``out``, by file name."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for file_name, document in documents.items():
        path = out / file_name
        path.write_text(yaml.safe_dump(document, sort_keys=False))
        paths.append(path)
    return paths


def write(name: str, out: Path, storage_uri: str, image: str) -> list[Path]:
    return write_documents(out, {
        f"{name}-{protocol}-{device}.yaml": inference_service(name, protocol, device, storage_uri, image)
        for protocol in PROTOCOLS for device in DEVICES
    })


def parser(doc: str, storage_uri: str, image: str, name_help: str, image_help: str) -> argparse.ArgumentParser:
    """The options of a manifests command: the model's name, storage URI, image and folder."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", help=name_help)
    p.add_argument("--storage-uri", default=storage_uri, help="{name} is replaced (default: %(default)s)")
    p.add_argument("--image", default=image, help=image_help)
    p.add_argument("--out", type=Path, default=OUT)
    return p


def main() -> None:
    args = parser(__doc__, STORAGE_URI, IMAGE, "the archive's model name (minilm, mpnet, ...)",
                  "CPU image; the GPU image adds -gpu to its tag").parse_args()
    for path in write(args.name, args.out, args.storage_uri, args.image):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
