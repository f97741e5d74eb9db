"""Write KServe InferenceService manifests for an archive: v1 and v2 protocol, CPU and GPU.

    python -m scripts.deploy.kserve.manifests minilm --storage-uri s3://bucket/similarity/minilm
    kubectl apply -f scripts/deploy/kserve/manifests/minilm-v1-cpu.yaml

``storageUri`` holds the layout of ``python -m scripts.deploy.kserve.layout`` (config/ + model-store/).
The runtime is KServe's TorchServe runtime (``kserve-torchserve``), its container image replaced
by one with the handler's dependencies (scripts/deploy/kserve/Dockerfile).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
OUT = HERE / "manifests"
STORAGE_URI = "pvc://model-storage/explainable-similarity/{name}"
IMAGE = "ghcr.io/example/explainable-similarity-kfs:0.1.0"
METRICS_PORT = 8082
PROTOCOLS = ("v1", "v2")
DEVICES = ("cpu", "gpu")

# Requests = limits (Guaranteed QoS: predictable latency). CPU: 2 cores serve predictions and
# explanations of short texts; memory covers the model, a batch and one explanation's budget.
RESOURCES = {
    "cpu": {"cpu": "2", "memory": "4Gi"},
    "gpu": {"cpu": "2", "memory": "8Gi", "nvidia.com/gpu": "1"},
}


def gpu_image(image: str) -> str:
    """The GPU build of an image: its tag with ``-gpu`` appended (``x:0.1.0`` -> ``x:0.1.0-gpu``)."""
    repository, sep, tag = image.rpartition(":")
    if not sep or "/" in tag:
        return f"{image}:latest-gpu"
    return f"{repository}:{tag}-gpu"


def inference_service(
    name: str, protocol: str, device: str, storage_uri: str, image: str, timeout_s: int = 300
) -> dict:
    resources = RESOURCES[device]
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
                "minReplicas": 1,
                "maxReplicas": 4,
                "timeout": timeout_s,
                "model": {
                    "modelFormat": {"name": "pytorch"},
                    "protocolVersion": protocol,
                    "runtime": "kserve-torchserve",
                    "storageUri": storage_uri.format(name=name),
                    "image": image if device == "cpu" else gpu_image(image),
                    "env": [{"name": "OMP_NUM_THREADS", "value": resources["cpu"]}],
                    "resources": {"requests": dict(resources), "limits": dict(resources)},
                },
            }
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
