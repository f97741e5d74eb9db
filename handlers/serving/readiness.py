"""Readiness that checks explanations: before a worker that answers explanations is ready, each
method explains a known pair with the archive's own defaults and its completeness is checked.

- ij: converged, and |Σ A − score| within the tolerance (relative to |score|);
- lrp: Σ relevance = score within ``LRP_CONSERVATION`` (relative), on each side;
- gae: it answers, with finite relevance (it promises no completeness).

A worker that fails the check does not become ready (``NotReady``: TorchServe's ``initialize``
raises it; KServe's model server stays not ready), and the message says which method failed and
by how much. The checks' time is reported so that it can be compared with the worker's start.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

from ..attribution import Explanation, method_of, options_for
from ..encoder import Encoder
from .admission import CALIBRATION_PAIR
from .settings import HandlerSettings

#: the pair each method explains: the one admission times the methods on; ij, whose cost grows
#: with the tokens, explains a short pair
READINESS_PAIRS = {"ij": ("A man plays a guitar.", "Someone plays music.")}
#: lrp is exactly conservative: relevance sums to the score up to float32 rounding
LRP_CONSERVATION = 1e-5


class NotReady(RuntimeError):
    """An explanation method failed its readiness check."""


@dataclass(frozen=True)
class Readiness:
    """What the checks found: per method, its relative completeness error (None for gae), and
    the seconds they took in all."""

    errors: dict[str, float | None]
    seconds: float

    def describe(self) -> str:
        found = ", ".join(f"{m} {'ran' if e is None else f'{e:.1e} of the score'}" for m, e in self.errors.items())
        return f"explanations checked in {self.seconds:.2f} s: {found}"


def failure(method: str, explanation: Explanation, tolerance: float) -> str | None:
    """Why ``explanation`` does not pass, or None."""
    if method == "gae":
        values = [*explanation.relevance_a.tolist(), *explanation.relevance_b.tolist()]  # type: ignore[union-attr]
        return None if all(math.isfinite(v) for v in values) else "gae: relevance is not finite"
    error = explanation.relative_delta
    if error is None or not math.isfinite(error):
        return f"{method}: no completeness error to check"
    if method == "ij" and not explanation.extras.get("converged", True):
        return f"ij: did not converge to its tolerance {tolerance:g} (error {error:.2e} of the score)"
    if error > tolerance:
        return f"{method}: sums to the score within {error:.2e} of it, more than {tolerance:g}"
    return None


def check_explanations(encoder: Encoder, settings: HandlerSettings) -> Readiness:
    """Explain ``READINESS_PAIR`` with each method the archive answers, with its defaults; raise
    ``NotReady`` naming the first that fails."""
    start = time.perf_counter()
    errors: dict[str, float | None] = {}
    for method in settings.explanation.time_budget_s:
        options = options_for(method, {}, settings.explanation.defaults(method))
        pair = READINESS_PAIRS.get(method, CALIBRATION_PAIR)
        (explanation,) = method_of(encoder, method).attribute([pair], options)
        tolerance = getattr(options, "tolerance", None) or LRP_CONSERVATION
        if method == "ij" and getattr(options, "quadrature", "adaptive") != "adaptive":
            tolerance = math.inf  # a fixed rule promises no tolerance: its error is reported, not checked
        reason = failure(method, explanation, tolerance)
        if reason is not None:
            raise NotReady(f"not ready: {reason} on {pair}")
        errors[method] = explanation.relative_delta
    return Readiness(errors, time.perf_counter() - start)
