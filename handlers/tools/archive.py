"""Build model_store/<name>.mar from a named model (minilm, mpnet) or a local directory.

    siamese-archive minilm
    siamese-archive mpnet --reference none --similarity dot
    siamese-archive path/to/st-model --name mymodel
    siamese-archive minilm --name minilm-onnx --runtime onnx [--int8]
    siamese-archive minilm --precision fp32          # predictions in fp32 (default: bf16 where native)
    siamese-archive minilm --pools          # minilm.mar (predictions) and minilm-explain.mar (explanations)
    siamese-archive minilm --explanation explanation.yaml   # the methods' defaults, budgets, cache

The archive is self-contained: the handler, the ``handlers`` package, the model directory
(safetensors weights only) and a model-config.yaml with the batching settings and the
handler's ``handler:`` section, validated whole here as the worker will validate it
(``serving.settings.ModelConfig``): an archive whose workers would refuse to start is not built. With
``--runtime onnx`` the model is also exported to ONNX (``siamese-export-onnx``, optionally
int8) and the graph is packed next to the model directory for predictions.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from pydantic import ValidationError

from handlers.serving.pools import EXPLAIN_NICE, EXPLAIN_THREADS, PoolSettings, explanation_model
from handlers.serving.settings import ExplanationSettings, HandlerSettings, ModelConfig
from handlers.tools.export_onnx import export_source
from handlers.tools.sources import PACKAGE, ROOT, model_dir

MODEL_FILES = (".json", ".txt", ".model", ".safetensors")
SKIPPED = {"README.md", "desktop.ini", ".gitattributes"}


def stage_model(source: Path, target: Path) -> None:
    """Copy what the encoder needs; weights only from safetensors, never from pickles."""
    if not (source / "model.safetensors").exists() and not any(source.glob("*.safetensors")):
        raise SystemExit(f"{source}: no model.safetensors (pickled weights are not packed)")
    for path in source.rglob("*"):
        relative = path.relative_to(source)
        if path.is_dir() or path.name in SKIPPED or path.suffix not in MODEL_FILES:
            continue
        if relative.parts[0] in ("onnx", "openvino"):
            continue
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target / relative)


def pool_settings(args: argparse.Namespace, name: str, explain_pool: bool) -> PoolSettings:
    """Which requests the archive answers: everything (no ``--pools``), one pool's share, or
    predictions only (``--explained-by``: no explanation set-up in its workers)."""
    if args.explained_by:
        return PoolSettings(explanations=False, explanation_model=args.explained_by, threads=args.threads)
    if not args.pools:
        return PoolSettings(threads=args.threads)
    if explain_pool:
        return PoolSettings(nice=args.explain_nice, threads=args.explain_threads)
    return PoolSettings(explanations=args.also_explain, explanation_model=explanation_model(name), threads=args.threads)


def explanation_settings(path: str | None) -> ExplanationSettings:
    """The archive's ``explanation:`` section: the defaults, with a YAML file's keys over them
    (a mapping such as ``time_budget_s`` is merged key by key)."""
    if path is None:
        return ExplanationSettings()
    given = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(given, dict):
        raise SystemExit(f"--explanation {path}: a YAML mapping of explanation settings, not {type(given).__name__}")
    merged = ExplanationSettings().model_dump()
    for key, value in given.items():
        merged[key] = {**merged[key], **value} if isinstance(merged.get(key), dict) and isinstance(value, dict) else value
    return ExplanationSettings(**merged)


def model_config(args: argparse.Namespace, name: str = "", explain_pool: bool = False) -> dict:
    """The model-config.yaml of the archive ``name`` (or of its explanation pool), validated whole
    (SystemExit naming the rule it breaks)."""
    workers, batch_size, max_batch_delay = (
        (args.explain_workers, args.explain_batch_size, args.explain_max_batch_delay) if explain_pool
        else (args.workers, args.batch_size, args.max_batch_delay)
    )
    try:
        handler = HandlerSettings(
            reference=args.reference,
            similarity=args.similarity,
            max_length=args.max_length,
            runtime=args.runtime,
            precision=args.precision,
            native_bf16=args.native_bf16,
            onnx_file="model.int8.onnx" if args.int8 else "model.onnx",
            pool=pool_settings(args, name, explain_pool),
            explanation=explanation_settings(args.explanation),
        )
        config = ModelConfig(
            minWorkers=workers,
            maxWorkers=workers,
            batchSize=batch_size,
            maxBatchDelay=max_batch_delay,
            responseTimeout=args.response_timeout,
            startupTimeout=args.startup_timeout,
            handler=handler,
        )
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        where = ".".join(str(part) for part in error["loc"])
        raise SystemExit(f"model-config.yaml: {where + ': ' if where else ''}{error['msg']}") from None
    return config.to_yaml_dict()


def build(args: argparse.Namespace) -> Path:
    if args.int8 and args.runtime != "onnx":
        raise SystemExit("--int8 needs --runtime onnx")
    if args.explained_by and args.pools:
        raise SystemExit("--explained-by builds a predictions-only archive; --pools builds both pools")
    name = args.name or (args.source if args.source in ("minilm", "mpnet") else Path(args.source).name)
    configs = {name: model_config(args, name)}  # refuse an archive whose workers would not start, before any work
    if args.pools:
        configs[explanation_model(name)] = model_config(args, name, explain_pool=True)
    source = model_dir(args.source)
    export = Path(args.export_path)
    export.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp) / "stage"
        shutil.copytree(PACKAGE, stage / "handlers", ignore=shutil.ignore_patterns("__pycache__", "tools"))
        stage_model(source, stage / "model")
        if args.runtime == "onnx":
            served = export_source(source, Path(tmp) / "onnx" / "model.onnx", int8=args.int8)
            shutil.copy2(served, stage / served.name)
        for model_name, config in configs.items():  # the pools: the same files, their own settings
            config_file = Path(tmp) / "configs" / model_name / "model-config.yaml"
            config_file.parent.mkdir(parents=True)
            config_file.write_text(yaml.safe_dump(config, sort_keys=False))
            command = [
                str(Path(sys.executable).parent / "torch-model-archiver"),
                "--model-name", model_name,
                "--version", args.version,
                "--handler", str(PACKAGE / "serving" / "torchserve" / "handler.py"),
                "--extra-files", str(stage),
                "--config-file", str(config_file),
                "--export-path", str(export),
                "--archive-format", "default" if args.deflate else "zip-store",
                "--force",
            ]
            subprocess.run(command, check=True)
            built = export / f"{model_name}.mar"
            print(f"built {built} from {source} ({built.stat().st_size / 2**20:.0f} MiB)")
    return export / f"{name}.mar"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="minilm, mpnet, or a local sentence-transformers directory")
    p.add_argument("--name", help="archive and TorchServe model name (default: the source's name)")
    p.add_argument("--reference", choices=["shift", "none"], default="shift")
    p.add_argument("--similarity", choices=["cos", "dot"], default="cos")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--runtime", choices=["torch", "onnx"], default="torch", help="what computes predictions")
    p.add_argument("--precision", choices=["fp32", "bf16"],
                   help="torch predictions (default: bf16 where the CPU or GPU computes it natively, else fp32)")
    p.add_argument("--native-bf16", choices=["detect", "no"], default="detect",
                   help="no: the workers run as on a device without native bf16 (the fp32 fallback)")
    p.add_argument("--int8", action="store_true", help="with --runtime onnx: int8 weights (dynamic quantisation)")
    p.add_argument("--workers", type=int, default=2,
                   help="worker processes; each runs cores/workers torch threads (docs/performance.md)")
    p.add_argument("--threads", type=int,
                   help="torch (and onnxruntime) threads per worker on CPU (default: cores / workers)")
    p.add_argument("--batch-size", type=int, default=4,
                   help="requests per TorchServe batch, at most (docs/performance.md)")
    p.add_argument("--max-batch-delay", type=int, default=1,
                   help="milliseconds a batch waits to fill (TorchServe takes 0 as its own default, 100)")
    p.add_argument("--response-timeout", type=int, default=300, help="seconds")
    p.add_argument("--startup-timeout", type=int, default=120,
                   help="seconds a worker may take to load (more where many workers start at once on few cores)")
    p.add_argument("--version", default="1.0")
    p.add_argument("--deflate", action="store_true",
                   help="compress the archive (safetensors weights shrink by about 8 %%, for about 6 s more "
                        "per 90 MB to build and to unpack; by default the files are stored)")
    p.add_argument("--explanation", metavar="YAML",
                   help="a YAML mapping over the handler's explanation settings: method defaults, tolerance, "
                        "memory_budget_mb, time_budget_s per method, cache_mb (docs/archives.md)")
    pools = p.add_argument_group("pools", "predictions and explanations in separate worker pools "
                                          "(docs/pools.md)")
    pools.add_argument("--pools", action="store_true",
                       help="also build <name>-explain.mar for explanations; <name>.mar then refuses them")
    pools.add_argument("--explained-by", metavar="MODEL",
                       help="predictions only: no explanation set-up in the workers (faster start, less memory); "
                            "an explanation is refused with 404 naming MODEL, the model that answers it")
    pools.add_argument("--also-explain", action="store_true",
                       help="with --pools: <name>.mar answers explanations too")
    pools.add_argument("--explain-workers", type=int, default=1, help="explanation pool: worker processes")
    pools.add_argument("--explain-batch-size", type=int, default=4, help="explanation pool: requests per batch")
    pools.add_argument("--explain-max-batch-delay", type=int, default=2,
                       help="explanation pool: milliseconds (a longer window delays an answer from the cache; "
                            "explanations queued while the worker computes join the next batch without it)")
    pools.add_argument("--explain-nice", type=int, default=EXPLAIN_NICE,
                       help="explanation pool: niceness added to its workers (0-19)")
    pools.add_argument("--explain-threads", type=int, default=EXPLAIN_THREADS,
                       help="explanation pool: torch threads per worker on CPU")
    p.add_argument("--export-path", default=str(ROOT / "model_store"))
    return p


def main(argv: list[str] | None = None) -> None:
    build(parser().parse_args(argv))


if __name__ == "__main__":
    main()
