"""The archives the tests serve, built once per test run into one model store, and the one
TorchServe that serves them all (from the project's production config, token authorization on).

Each archive has one worker and fp32 predictions unless it names a precision, so that served
scores equal the in-process fp32 encoder's."""
from __future__ import annotations

import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from handlers.tools import archive as build_archive
from handlers.tools.sources import ROOT

PRODUCTION = ROOT / "config.production.properties"
BATCHING = ("--batch-size", "8", "--max-batch-delay", "50")
#: room for slow explanations on a loaded machine (the archives' responseTimeout is 300 s)
ROOMY = {"time_budget_s": {"ij": 250.0, "gae": 250.0, "lrp": 250.0}}
#: a 16 MB explanation memory budget and short time budgets, under a 90 s responseTimeout
TIGHT = {"memory_budget_mb": 16, "time_budget_s": {"ij": 50.0, "gae": 2.0, "lrp": 2.0}}

#: the run's servers compute every explanation they are sent: several tests hold a worker with
#: an explanation, which must not come from a cache that an earlier test filled (the cache is
#: on by default; tests/test_explanation_cache.py tests it)
UNCACHED = {"cache_mb": 0}

#: the run's TorchServe starts its nine workers at once on two cores: each may take this long
STARTUP_TIMEOUT_S = 900

#: the archives whose tests only predict: their workers skip the explanations' set-up (calibration
#: and readiness check, about 3 s of CPU each while the run's workers start on two cores)
PREDICTIONS_ONLY = ("--explained-by", "minilm")

#: served name -> (archive options, explanation settings written into it)
ARCHIVES: dict[str, tuple[tuple[str, ...], dict]] = {
    "minilm": (BATCHING, ROOMY),
    "budget": (BATCHING + ("--response-timeout", "90"), TIGHT),
    "pooled": (BATCHING + ("--pools",), ROOMY),  # also pooled-explain.mar
    "bf16": (("--precision", "bf16"), {}),
    "fallback": (("--precision", "bf16", "--native-bf16", "no") + PREDICTIONS_ONLY, {}),
    "minilm-onnx": (("--runtime", "onnx", "--max-batch-delay", "50") + PREDICTIONS_ONLY, {}),
    "minilm-int8": (("--runtime", "onnx", "--int8", "--max-batch-delay", "50"), {}),
}
POOLED_EXPLAIN = "pooled-explain"


def build_test_archive(store: Path, source: str | Path, name: str, *extra: str) -> Path:
    """An archive of one worker; fp32 predictions unless ``extra`` names a precision or a runtime."""
    precision = [] if "--precision" in extra or "--runtime" in extra else ["--precision", "fp32"]
    args = build_archive.parser().parse_args(
        [str(source), "--name", name, "--export-path", str(store), "--workers", "1", *precision,
         "--startup-timeout", str(STARTUP_TIMEOUT_S), *extra]
    )
    return build_archive.build(args)


def archive_config(mar: Path) -> dict:
    with zipfile.ZipFile(mar) as z:
        return yaml.safe_load(z.read("model-config.yaml"))


def build_store(store: Path) -> dict[str, str]:
    """Every archive of ``ARCHIVES`` in ``store``; served name -> archive file. Two builds run at
    a time: the ONNX ones (an export is not thread-safe) and ``bf16`` in one thread, the other
    torch ones in the other, about as long (their time is mostly the archiver's own process,
    zipping)."""
    onnx = [name for name, (options, _) in ARCHIVES.items() if "onnx" in options] + ["bf16"]
    groups = [onnx, [name for name in ARCHIVES if name not in onnx]]
    with ThreadPoolExecutor(len(groups)) as pool:
        built = pool.map(lambda names: [_build(store, name) for name in names], groups)
        return {name: mar for group in built for served in group for name, mar in served.items()}


def _build(store: Path, name: str) -> dict[str, str]:
    options, settings = ARCHIVES[name]
    explanation = store / f"{name}.explanation.yaml"
    explanation.write_text(yaml.safe_dump({**UNCACHED, **settings}))
    build_test_archive(store, "minilm", name, *options, "--explanation", str(explanation))
    explanation.unlink()
    names = [name, POOLED_EXPLAIN] if "--pools" in options else [name]
    return {each: f"{each}.mar" for each in names}
