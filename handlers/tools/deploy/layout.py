"""Produce the storage layout of KServe's TorchServe runtime from the project's config and archives.

    python -m handlers.tools.deploy.layout minilm           # model_store/kserve/minilm/{config,model-store}
    python -m handlers.tools.deploy.layout minilm mpnet --out kserve/both
    python -m handlers.tools.deploy.layout path/to/x.mar --set job_queue_size=200
    python -m handlers.tools.deploy.layout minilm --explainer   # + config/explainer.properties, minilm-explain.mar

The runtime mounts the InferenceService's ``storageUri`` at /mnt/models and starts
``torchserve --start --model-store=/mnt/models/model-store --ts-config=/mnt/models/config/config.properties``;
KServe's model server (port 8080, in the same container) forwards ``/v1`` and ``/v2`` requests to
TorchServe's inference address and reads the model names from ``model_snapshot``. Copy the output
folder to that bucket or volume. Archives come from model_store/ (handlers.tools.archive).
The explainer component (``--explainer``) runs the same image on the same storage with
``config/explainer.properties``: the explanation pool's archive, served under the predictor's
model name, since KServe routes ``/v1/models/<name>:explain`` to it (handlers/tools/deploy/manifests.py).
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import zipfile
from pathlib import Path
from typing import Callable

import yaml

from handlers.tools.local.torchserve import named_files, read_properties, with_files
from handlers.serving.pools import EXPLAIN_SUFFIX, explanation_model
from handlers.tools.sources import ROOT

MOUNT = "/mnt/models"
EXPLAINER_CONFIG = "explainer.properties"  # the explainer component's TorchServe config, beside config.properties
SNAPSHOT_KEYS = ("minWorkers", "maxWorkers", "batchSize", "maxBatchDelay", "responseTimeout")

# What differs from the project's config.properties, and why (docs/engines.md).
KSERVE_PROPERTIES = {
    # KServe's model server owns 8080 (and 8081 for its gRPC) and forwards to TorchServe on
    # loopback; inference and management share 8085 as in KServe's own TorchServe config.
    "inference_address": "http://127.0.0.1:8085",
    "management_address": "http://127.0.0.1:8085",
    # Prometheus scrapes the pod's IP: the metrics API is the one TorchServe address outside loopback.
    "metrics_address": "http://0.0.0.0:8082",
    "grpc_inference_address": "127.0.0.1",
    "grpc_management_address": "127.0.0.1",
    "grpc_inference_port": "7070",
    "grpc_management_port": "7071",
    # The file is the only source of settings: the runtime's TS_SERVICE_ENVELOPE (TorchServe's
    # own kserve envelopes, which parse only the first request of a batch) is ignored.
    "enable_envvars_config": "false",
    # Only the model server in the same container reaches the loopback APIs.
    "disable_token_authorization": "true",
}
DROPPED = ("load_models", "service_envelope")  # models come from model_snapshot


def archive_info(mar: Path) -> tuple[str, str, dict]:
    """(model name, version, model-config.yaml) of an archive."""
    with zipfile.ZipFile(mar) as z:
        manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))["model"]
        config_file = manifest.get("configFile")
        config = yaml.safe_load(z.read(config_file)) if config_file else {}
    return manifest["modelName"], manifest.get("modelVersion", "1.0"), config or {}


def model_snapshot(archives: list[Path], served_as: Callable[[str], str] = str) -> dict:
    """TorchServe's startup snapshot: the models KServe's model server exposes (each archive's
    name, through ``served_as``), with the archives' own batching settings."""
    models = {}
    for mar in archives:
        name, version, config = archive_info(mar)
        name = served_as(name)
        entry = {"defaultVersion": True, "marName": mar.name}
        entry.update({k: config[k] for k in SNAPSHOT_KEYS if k in config})
        models[name] = {version: entry}
    return {"name": "startup.cfg", "modelCount": len(models), "models": models}


def kserve_properties(
    archives: list[Path], mount: str, project_config: Path, served_as: Callable[[str], str] = str
) -> dict[str, str]:
    props = read_properties(project_config)
    for key in DROPPED:
        props.pop(key, None)
    props.update(KSERVE_PROPERTIES)
    store = f"{mount}/model-store"
    props["model_store"] = store
    props["allowed_urls"] = f"file://{re.escape(store)}/.*"
    props = with_files(props, {key: f"{mount}/config/{Path(path).name}" for key, path in named_files(props).items()})
    props["model_snapshot"] = json.dumps(model_snapshot(archives, served_as), separators=(",", ":"))
    return props


def served_by_explainer(name: str) -> str:
    """The name an explanation pool's archive is served under in the explainer component: its
    predictor's (``minilm-explain`` -> ``minilm``), where KServe routes ``/v1/models/minilm:explain``."""
    return name.removesuffix(EXPLAIN_SUFFIX)


def explainer_archives(archives: list[Path]) -> list[Path]:
    """``<name>-explain.mar`` beside each archive (``siamese-archive <source> --pools``)."""
    paths = [mar.with_name(f"{explanation_model(archive_info(mar)[0])}.mar") for mar in archives]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise SystemExit(f"no explanation pool archive: {', '.join(missing)}; build it with siamese-archive --pools")
    return paths


def resolve_archive(source: str) -> Path:
    path = Path(source)
    if path.suffix != ".mar":
        path = ROOT / "model_store" / f"{source}.mar"
    if not path.is_file():
        raise SystemExit(f"{path}: no such archive; build it with siamese-archive {source}")
    return path


def build(
    archives: list[Path],
    out: Path,
    mount: str = MOUNT,
    overrides: dict[str, str] | None = None,
    project_config: Path = ROOT / "config.properties",
    explainers: list[Path] | None = None,
) -> Path:
    """Write ``out/config/config.properties`` (and the metrics and log configs it names) and
    ``out/model-store/*.mar``; ``mount`` is where the runtime will see ``out``. With
    ``explainers`` (the explanation pools' archives) also ``out/config/explainer.properties``:
    the explainer component's TorchServe, serving each under its predictor's name."""
    names = [archive_info(mar)[0] for mar in archives]
    if len(set(names)) != len(names):
        raise SystemExit(f"two archives serve the same model name: {names}")
    (out / "config").mkdir(parents=True, exist_ok=True)
    (out / "model-store").mkdir(parents=True, exist_ok=True)
    for mar in [*archives, *(explainers or [])]:
        shutil.copy2(mar, out / "model-store" / mar.name)
    for path in named_files(read_properties(project_config)).values():  # metrics and log config
        source = Path(path)
        shutil.copy2(source if source.is_absolute() else project_config.parent / source, out / "config" / source.name)
    config = out / "config" / "config.properties"
    write_properties(config, kserve_properties(archives, mount, project_config), overrides)
    if explainers:
        props = kserve_properties(explainers, mount, project_config, served_by_explainer)
        write_properties(out / "config" / EXPLAINER_CONFIG, props, overrides)
    return config


def write_properties(path: Path, props: dict[str, str], overrides: dict[str, str] | None) -> None:
    props = {**props, **(overrides or {})}
    lines = ["# KServe TorchServe runtime settings, from config.properties (docs/engines.md)."]
    lines += [f"{key}={value}" for key, value in props.items()]
    path.write_text("\n".join(lines) + "\n")


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set {pair!r}: expected key=value")
        overrides[key.strip()] = value.strip()
    return overrides


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("archives", nargs="+", help="archive names in model_store/ (minilm, mpnet) or .mar paths")
    p.add_argument("--out", help="output folder (default: model_store/kserve/<first archive's name>)")
    p.add_argument("--mount", default=MOUNT, help="where the runtime mounts the storage (default: %(default)s)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a property")
    p.add_argument("--explainer", action="store_true",
                   help=f"also config/{EXPLAINER_CONFIG} for the explainer component, serving each "
                        "archive's explanation pool (<name>-explain.mar, from siamese-archive --pools)")
    args = p.parse_args()
    archives = [resolve_archive(a) for a in args.archives]
    explainers = explainer_archives(archives) if args.explainer else []
    out = Path(args.out) if args.out else ROOT / "model_store" / "kserve" / archives[0].stem
    config = build(archives, out, args.mount, parse_overrides(args.set), explainers=explainers)
    written = [config] + ([config.with_name(EXPLAINER_CONFIG)] if explainers else [])
    print(f"wrote {', '.join(map(str, written))} and {len(archives) + len(explainers)} archive(s) "
          f"in {out / 'model-store'}")


if __name__ == "__main__":
    main()
