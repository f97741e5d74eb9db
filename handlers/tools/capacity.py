"""How many replicas for a load: the KServe model server's predictor and explainer, sized from
per-replica figures that ``scripts/bench/capacity.py`` measures (``capacity_figures.json``,
with its date, machine and command).

    siamese-capacity --pairs-per-s 500 --explanations-per-s ij=2 lrp=5 --p99-ms 250 --json
    siamese-capacity --pairs-per-s 500 --explanations-per-s ij=2 --write manifests/   # and the manifests
    siamese-capacity --table --p99-ms 250    # replicas from 100 to 10,000 pairs/s, 1 to 100 explanations/s

The model (docs/scaling.md):

- **Predictor.** The figures give one replica's throughput X(c) and p99 at c requests in flight.
  The plan takes the largest measured c whose p99 is within ``--p99-ms``; a replica then serves
  X(c) pairs/s at that p99. Knative's autoscaler keeps a pod at ``utilization`` (70 %, its
  default) of ``scaleTarget`` = c, so the replicas are ceil(rate / (utilization × X(c))).
  ``containerConcurrency`` = c caps what one pod takes at once (the rest wait in Knative's queue),
  so that a burst does not push a pod past the p99 measured.
- **Explainer.** An explanation occupies one explanation process (one per replica) for its
  seconds s_m, measured per method. The busy seconds per second are the sum of rate_m × s_m; a
  replica gives ``utilization`` of one, so the replicas are ceil(busy / utilization).
  ``scaleTarget`` is 1 request in flight, ``containerConcurrency`` 2 (the next one waits in the
  pod, so that the process never idles between two).
- ``minReplicas`` is the plan for the given rate (no cold start at that rate); ``maxReplicas``
  is twice it, room for a burst of twice the rate.
- CPU per replica is what the figures were measured on; memory is the replica's measured peak
  resident memory, plus the explanation memory budget for the explainer, with a quarter of
  headroom, rounded up to 256 MiB.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path


FIGURES = Path(__file__).with_name("capacity_figures.json")
METHODS = ("ij", "gae", "lrp")
UTILIZATION = 0.7  # Knative's default target utilization of scaleTarget
HEADROOM = 1.25
MEMORY_STEP_MIB = 256


class PlanError(ValueError):
    """A request the planner cannot answer (the message says which option and why)."""


@dataclass
class Component:
    replicas: int
    cpu: str
    memory: str
    autoscaling: dict
    container_concurrency: int
    expected: dict  # what the figures predict for the planned replicas

    def resources(self) -> dict:
        amounts = {"cpu": self.cpu, "memory": self.memory}
        return {"requests": dict(amounts), "limits": dict(amounts)}


@dataclass
class Plan:
    device: str
    figures: str  # where the per-replica figures come from (date, machine)
    predictor: Component
    explainer: Component

    def to_json(self) -> dict:
        return asdict(self)


def load_figures(path: Path = FIGURES) -> dict:
    return json.loads(Path(path).read_text())


def memory(mib: float) -> str:
    return f"{math.ceil(mib * HEADROOM / MEMORY_STEP_MIB) * MEMORY_STEP_MIB}Mi"


def autoscaling(replicas: int, target: int) -> dict:
    return {"minReplicas": replicas, "maxReplicas": 2 * replicas, "scaleMetric": "concurrency", "scaleTarget": target}


def plan_predictor(figures: dict, pairs_per_s: float, p99_ms: float | None) -> Component:
    levels = sorted(figures["levels"], key=lambda level: level["concurrency"])
    within = [level for level in levels if p99_ms is None or level["p99_ms"] <= p99_ms]
    if not within:
        raise PlanError(f"--p99-ms {p99_ms:g}: below the fastest measured p99 of a replica "
                        f"({levels[0]['p99_ms']:.0f} ms at {levels[0]['concurrency']} in flight)")
    level = max(within, key=lambda each: each["pairs_per_s"])
    replicas = max(1, math.ceil(pairs_per_s / (UTILIZATION * level["pairs_per_s"])))
    return Component(
        replicas=replicas, cpu=str(figures["cpu"]), memory=memory(figures["rss_mib"]),
        autoscaling=autoscaling(replicas, level["concurrency"]), container_concurrency=level["concurrency"],
        expected={"pairs_per_s_per_replica": level["pairs_per_s"], "capacity_pairs_per_s": replicas * level["pairs_per_s"],
                  "p99_ms": level["p99_ms"], "in_flight_per_replica": level["concurrency"]},
    )


def plan_explainer(figures: dict, explanations_per_s: dict[str, float]) -> Component:
    seconds = figures["seconds"]
    busy = sum(rate * seconds[method] for method, rate in explanations_per_s.items())
    replicas = max(1, math.ceil(busy / UTILIZATION))
    return Component(
        replicas=replicas, cpu=str(figures["cpu"]),
        memory=memory(figures["rss_mib"] + figures["memory_budget_mib"]),
        autoscaling=autoscaling(replicas, 1), container_concurrency=2,
        expected={"busy_processes": round(busy, 3), "utilization": round(busy / replicas, 3),
                  "seconds_per_explanation": {m: seconds[m] for m in explanations_per_s},
                  "p99_seconds_alone": {m: figures["p99_seconds"][m] for m in explanations_per_s}},
    )


def plan(pairs_per_s: float, explanations_per_s: dict[str, float], p99_ms: float | None = None,
         device: str = "cpu", figures: dict | None = None) -> Plan:
    figures = figures or load_figures()
    if device not in figures["devices"]:
        raise PlanError(f"--device {device}: no measured figures for it in {FIGURES.name} "
                        f"(scripts/bench/capacity.py measures them on such a machine); measured: "
                        f"{', '.join(sorted(figures['devices']))}")
    measured = figures["devices"][device]
    return Plan(
        device=device, figures=f"{measured['measured']}, {measured['machine']}",
        predictor=plan_predictor(measured["predictor"], pairs_per_s, p99_ms),
        explainer=plan_explainer(measured["explainer"], explanations_per_s),
    )


# -- command line --------------------------------------------------------------------------------
def rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a rate is a finite number ≥ 0")
    return value


def method_rate(text: str) -> tuple[str, float]:
    method, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r}: write METHOD=RATE, e.g. ij=2")
    if method not in METHODS:
        raise argparse.ArgumentTypeError(f"{method!r}: unknown method (one of {', '.join(METHODS)})")
    return method, rate(value)


def positive(text: str) -> float:
    value = rate(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be > 0")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="siamese-capacity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs-per-s", type=rate, help="predictions (pairs) per second (required but with --table)")
    p.add_argument("--explanations-per-s", type=method_rate, nargs="*", default=[], metavar="METHOD=RATE",
                   help="explanations per second, per method: ij=2 lrp=5 gae=1")
    p.add_argument("--p99-ms", type=positive, help="the predictions' p99 latency at a replica (default: none)")
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--figures", type=Path, default=FIGURES, help="per-replica figures (default: the measured ones)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--write", type=Path, metavar="DIR",
                   help="also write the model server's manifests sized by the plan (handlers.tools.deploy.modelserver)")
    p.add_argument("--name", default="minilm", help="with --write: the model's name")
    p.add_argument("--table", action="store_true",
                   help="print the replicas for 100 to 10,000 pairs/s and 1 to 100 explanations/s per method")
    return p


PAIR_RATES = (100, 300, 1000, 3000, 10000)
EXPLANATION_RATES = (1, 3, 10, 30, 100)


def scaling_tables(figures: dict, p99_ms: float | None, device: str = "cpu") -> str:
    """Markdown: predictor replicas per pairs/s; explainer replicas per explanations/s of each method."""
    head = plan(0, {}, p99_ms, device, figures).predictor
    lines = [f"Predictor ({head.cpu} CPU, {head.memory} a replica; {head.container_concurrency} in flight, "
             f"{head.expected['pairs_per_s_per_replica']:g} pairs/s and p99 {head.expected['p99_ms']:g} ms a replica):", "",
             "| pairs/s | " + " | ".join(f"{r:,}" for r in PAIR_RATES) + " |", "|---|" + "---:|" * len(PAIR_RATES),
             "| replicas | " + " | ".join(str(plan(r, {}, p99_ms, device, figures).predictor.replicas) for r in PAIR_RATES) + " |",
             "", f"Explainer ({plan(0, {}, p99_ms, device, figures).explainer.cpu} CPU, "
             f"{plan(0, {}, p99_ms, device, figures).explainer.memory} a replica), replicas for one method alone:", "",
             "| explanations/s | " + " | ".join(str(r) for r in EXPLANATION_RATES) + " |", "|---|" + "---:|" * len(EXPLANATION_RATES)]
    for method in METHODS:
        seconds = figures["devices"][device]["explainer"]["seconds"][method]
        cells = [str(plan(0, {method: r}, p99_ms, device, figures).explainer.replicas) for r in EXPLANATION_RATES]
        lines.append(f"| {method} ({seconds:g} s each) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table(result: Plan) -> str:
    lines = [f"figures: {result.figures} ({result.device})", "",
             "| component | replicas (min-max) | cpu | memory | scaleTarget | containerConcurrency | expected |",
             "|---|---|---|---|---|---|---|"]
    for name in ("predictor", "explainer"):
        c: Component = getattr(result, name)
        a = c.autoscaling
        lines.append(f"| {name} | {a['minReplicas']}-{a['maxReplicas']} | {c.cpu} | {c.memory} | "
                     f"{a['scaleMetric']} {a['scaleTarget']} | {c.container_concurrency} | {json.dumps(c.expected)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.table:
        try:
            print(scaling_tables(load_figures(args.figures), args.p99_ms, args.device))
        except PlanError as error:
            print(f"siamese-capacity: error: {error}", file=sys.stderr)
            return 2
        return 0
    if args.pairs_per_s is None:
        parser().error("--pairs-per-s is required (or --table)")
    explanations = dict(args.explanations_per_s)
    if len(explanations) != len(args.explanations_per_s):
        parser().error("--explanations-per-s: a method is given twice")
    try:
        result = plan(args.pairs_per_s, explanations, args.p99_ms, args.device, load_figures(args.figures))
    except PlanError as error:
        print(f"siamese-capacity: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_json(), indent=2) if args.json else table(result))
    if args.write:
        from handlers.tools.deploy import modelserver

        for path in modelserver.write(args.name, args.write, modelserver.STORAGE_URI, modelserver.IMAGE, sizing=result):
            print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
