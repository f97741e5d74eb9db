"""ij's integrals over the path: a fixed rule (every node summed as it is computed) or the
adaptive rule to a tolerance, with the per-panel identities of ``PathValues`` in each panel's error."""
from __future__ import annotations

import math
from typing import Callable

import torch

from ..adaptive import G10K21, AdaptiveIntegral
from ..quadrature import nodes
from .paths import FLOAT64_BYTES, Float64Twin, PathValues, Side, Task
from .plan import Nodes, per_request, row_cost, short_lengths
from .products import long_rows, short_vectors

#: panels narrower than this run on a float64 copy of the model (``Float64Twin``): the outer
#: Kronrod nodes of a narrower panel are closer than two float32 steps of α (mpnet's layer 0 has
#: features narrower than 2e-7 in α, docs/ij.md)
FINE_PANEL = 2.0**-14
#: panels narrower than this are not bisected (features narrower still are answered
#: ``converged: false``, with their residuals in the estimate)
NARROWEST_PANEL = 2.0**-40


# -- the integrals -----------------------------------------------------------------------------
def fixed(encoder, tasks: list[Task], layer: int, rule: str, steps: int, budget: int):
    """v and A of every task with one fixed rule: each task's nodes summed as they are computed."""
    alphas, weights = nodes(rule, steps)
    path = Nodes.fixed(len(tasks), alphas, weights)
    vectors = short_vectors(encoder, tasks, path, layer, budget)
    stacked = long_rows(encoder, tasks, vectors, path, layer, budget)
    lengths = short_lengths(tasks)
    offsets = (torch.cumsum(lengths, 0) - lengths).tolist()
    return [stacked[o : o + n, : t.long.length] for o, n, t in zip(offsets, lengths.tolist(), tasks)]


def drive(integrals: list[AdaptiveIntegral], evaluate, exact: Callable[[int, torch.Tensor], bool]) -> None:
    """Round after round, every unfinished integral's nodes in one ``evaluate`` call (the passes
    of all pairs together; a request is (integral, alphas, fine), ``fine`` marking the nodes of
    panels narrower than ``FINE_PANEL``). An integral whose local estimate is met but whose ``exact`` check
    fails (a feature too narrow for its panels was missed) is refined everywhere, within its
    budget; if nothing is left to refine it ends unconverged."""
    while True:
        running = [t for t, q in enumerate(integrals) if not q.done]
        if running:
            requests = [(t, integrals[t].pending(), integrals[t].pending_fine()) for t in running]
            for t, values in zip(running, evaluate(requests)):
                integrals[t].feed(values)
            continue
        reopened = [q.refine_everywhere() for t, q in enumerate(integrals) if q.converged and not exact(t, q.estimate)]
        if not any(reopened):
            return


def _integral(tol_abs: float, max_nodes: int, known_error, eps: float, fine: bool) -> AdaptiveIntegral:
    """One side's path integral: G10/K21 panels (one panel often suffices on a smooth
    integrand), each panel's error the larger of K21's calibrated error estimate, the rounding
    of the model's precision (``eps``; float64's on the panels narrower than ``FINE_PANEL``
    where ``fine``: a float64 copy of the model computes them) and its identity's residual
    (``known_error``, from ``PathValues``). A float32 model without the copy stops splitting at
    ``FINE_PANEL``."""
    float64 = float(torch.finfo(torch.float64).eps)
    return AdaptiveIntegral(tol_abs, max_nodes, rule=G10K21, estimator="calibrated", known_error=known_error,
                            min_width=NARROWEST_PANEL if fine or eps <= float64 else FINE_PANEL, eps=eps, zoom=True,
                            fine_width=FINE_PANEL if fine else 0.0, fine_eps=float64)


def float64_fits(twin: Float64Twin) -> bool:
    """Whether the float64 copy's weights and one float64 path node of every side's passes fit
    the call's memory budget (what admission checks of the model's own passes, ``memory``)."""
    source, layer = twin.source, twin.layer
    scale = FLOAT64_BYTES / source.cost.bytes_per_value
    sides = [(t.short.length, "jvp") for t in twin.source_tasks] + [(t.long.length, "vjp") for t in twin.source_tasks]
    return all(scale * sum(row_cost(source, width, layer, mode)) <= twin.budget for width, mode in sides)


def in_two_precisions(coarse, fine):
    """An evaluator of ``drive``'s requests (task, alphas, fine) that sends the nodes marked
    fine to ``fine`` and the others to ``coarse`` (each an evaluator of (task, alphas)
    requests, as ``Nodes.each`` takes them), and puts each request's values back in node order."""
    def evaluate(requests):
        out: list[torch.Tensor | None] = [None] * len(requests)
        for wanted, run in ((False, coarse), (True, fine)):
            asked = [(k, t, alphas[marks == wanted]) for k, (t, alphas, marks) in enumerate(requests)
                     if bool((marks == wanted).any())]
            if not asked:
                continue
            for (k, _, _), part in zip(asked, run([(t, alphas) for _, t, alphas in asked])):
                marks = requests[k][2]
                if out[k] is None:
                    out[k] = torch.empty(len(marks), *part.shape[1:], dtype=torch.float64)
                out[k][marks == wanted] = part.double()
        return out
    return evaluate


def adaptive(encoder, tasks: list[Task], layer: int, tolerance: float, max_nodes: int, budget: int, scales):
    """v and A of every task to ``tolerance`` × scale (the |score| in path units) in Frobenius
    norm, by adaptive Gauss–Kronrod panels on each side's path; with each task's ``carry``,
    what the short side's error is multiplied by on its way to A.

    The short side goes first (its v are the long side's cotangents); half of the tolerance is
    its own. An error Δv reaches A as Δv · V_lᵀ, through the long side's per-token vectors V_l,
    and how strongly is measured along the error's own directions (``carry_ratios``): the
    short side's first panel (which does not depend on any target) is done when its error times
    that ``carry`` is within its half, the answer's estimate then being within the tolerance as
    soon as the long side's is. A side that its first panel does not resolve is refined toward
    tol / (2 ‖V_l‖), a bound whatever direction its later panels' errors take, with ‖V_l‖_F
    estimated (``long_norms``) and never below |g_l − g_l(r)| = |Σ_j V_l[j]| (tokens whose
    vectors cancel in the sum make ‖V_l‖ far larger than the sum's norm: mpnet's middle
    layers); its final panels' carry is measured again, never above the bound, and sets its
    target from then on: a side whose rounding (``AdaptiveIntegral``'s floor) keeps it above
    the bound's target goes on toward the carry's instead of ending (``_short_side``). A side
    resolved by one panel costs one probe pass (4 cotangents on 7 nodes), a side refined
    further three.
    Both sides are checked against exact identities of the path integral (the fundamental
    theorem of calculus along the straight path), panel by panel (``PathValues``): Σ_i v_i =
    g(x) − g(r) on the short side, and the row sums of A equal v_i · (g_l − g_l(r)) on the long
    side, and so on every panel [a, b] with g at its edges; and once more on the whole path.
    """
    lengths = short_lengths(tasks)
    ends = [(t.short.g - t.short.g_ref).double() for t in tasks], [(t.long.g - t.long.g_ref).double() for t in tasks]
    tol = [tolerance * s for s in scales]
    paths = [(PathValues(encoder, t.short, layer), PathValues(encoder, t.long, layer)) for t in tasks]
    twin = Float64Twin(encoder, tasks, layer, budget)
    eps = torch.finfo(tasks[0].short.x.dtype).eps  # the model's precision
    fine = eps > torch.finfo(torch.float64).eps and float64_fits(twin)  # narrow panels on the float64 copy

    def change(t: int, side: int, a: float, b: float) -> tuple[torch.Tensor, float]:
        return (twin.paths if fine and b - a < FINE_PANEL else paths)[t][side].change(a, b)

    def short_residual(t: int):
        def residual(a: float, b: float, panel: torch.Tensor) -> float:
            difference, rounding = change(t, 0, a, b)
            return max(0.0, float((panel.sum(0) - difference).norm()) - rounding)
        return residual

    short = [_integral(math.inf, max_nodes, short_residual(t), eps, fine) for t in range(len(tasks))]  # target below

    def short_values_on(model, model_tasks, model_budget):
        def values(requests):
            vectors = short_vectors(model, model_tasks, Nodes.each(requests), layer, model_budget)
            return per_request(vectors, lengths, requests)
        return values

    short_values = in_two_precisions(short_values_on(encoder, tasks, budget),
                                     lambda requests: short_values_on(twin.encoder, twin.tasks, twin.budget)(requests))

    def short_exact(t: int, v: torch.Tensor) -> bool:
        return float((v.sum(0) - ends[0][t]).norm() * ends[1][t].norm()) <= tol[t] / 2

    carry = _short_side(encoder, tasks, short, short_values, short_exact, ends[1], tol, layer, budget)
    vectors = torch.cat([q.estimate for q in short])

    def long_residual(t: int):
        v = short[t].estimate
        def residual(a: float, b: float, panel: torch.Tensor) -> float:
            difference, rounding = change(t, 1, a, b)
            return max(0.0, float((panel.sum(1) - v @ difference).norm()) - rounding * float(v.norm()))
        return residual

    long = [_integral(tol[t] / 2, max_nodes, long_residual(t), eps, fine) for t in range(len(tasks))]
    widths = [t.long.length for t in tasks]

    def long_values_on(model, model_tasks, model_budget):
        def values(requests):
            rows = long_rows(model, model_tasks, vectors, Nodes.each(requests), layer, model_budget)
            return per_request(rows, lengths, requests, widths)
        return values

    long_values = in_two_precisions(long_values_on(encoder, tasks, budget),
                                    lambda requests: long_values_on(twin.encoder, twin.tasks, twin.budget)(requests))

    def long_exact(t: int, matrix: torch.Tensor) -> bool:
        return float((matrix.sum(1) - short[t].estimate @ ends[1][t]).norm()) <= tol[t] / 2

    drive(long, long_values, long_exact)
    return short, long, carry


def _short_side(encoder, tasks: list[Task], short: list[AdaptiveIntegral], short_values, short_exact,
                long_ends: list[torch.Tensor], tol: list[float], layer: int, budget: int) -> list[float]:
    """Drive the short sides (``adaptive``'s doc) and return each one's carry: its first panel,
    done if its error times its carry is within its half; the others toward the bound first,
    then, once their final panels' carry is measured, toward the carry's target."""
    for q, values in zip(short, short_values([(t, q.pending(), q.pending_fine()) for t, q in enumerate(short)])):
        q.feed(values)  # the first panel: one K21 panel on [0, 1], whatever the target
    carry = [PROBE_SAFETY * r for r in carry_ratios(encoder, tasks, short, layer, budget)]
    reach = [math.inf] * len(tasks)
    unresolved = [t for t, q in enumerate(short) if q.error * carry[t] > tol[t] / 2]
    if unresolved:  # refined toward the bound, which holds whatever the later panels' errors look like
        norms = long_norms(encoder, [tasks[t] for t in unresolved], layer, budget)
        for t, norm in zip(unresolved, norms):
            reach[t] = max(PROBE_SAFETY * norm, float(long_ends[t].norm()))
    for t, q in enumerate(short):
        q.retarget(tol[t] / (2 * (reach[t] if t in unresolved else carry[t]) + 1e-30))
    drive(short, short_values, short_exact)
    measured = [1] * len(tasks)  # the round whose partition the carry was measured on
    bound = set(unresolved)  # sides whose target is still the bound's
    while True:
        stale = [t for t, q in enumerate(short) if q.rounds > measured[t]]  # their final panels' carry
        if stale:
            ratios = carry_ratios(encoder, [tasks[t] for t in stale], [short[t] for t in stale], layer, budget)
            for t, ratio in zip(stale, ratios):
                carry[t], measured[t] = min(PROBE_SAFETY * ratio, reach[t]), short[t].rounds
        # done if within its half as carried; one the bound could not bring there (only panels
        # bound by their rounding left, above the bound's target) goes on toward the carry's
        again = [t for t, q in enumerate(short) if t in stale or (t in bound and not q.converged)]
        if not again:
            return [min(c, r) for c, r in zip(carry, reach)]
        for t in again:
            bound.discard(t)
            short[t].retarget(tol[t] / (2 * carry[t] + 1e-30))
        drive(short, short_values, short_exact)


#: random cotangents per task that estimate ‖V_l‖_F, the margin put on the estimate, and the
#: Gauss nodes it is integrated on: the estimate is statistical (4 probes), so a rule finer than
#: 7 nodes buys nothing; on minilm the 7-node estimate is within 0.96-1.41 of a 64-node one with
#: the same probes, at every layer (docs/ij.md, "The certificate")
PROBES, PROBE_SAFETY, PROBE_NODES = 4, 1.5, 7


def long_norms(encoder, tasks: list[Task], layer: int, budget: int, probe_nodes: int = PROBE_NODES) -> list[float]:
    """‖V_l‖_F of each task's long side, estimated on ``probe_nodes`` Gauss nodes with random
    cotangents z ~ N(0, I): E (z · V[j])² = |V[j]|², so the mean over probes of Σ_j (z · V[j])² is
    ‖V‖_F²."""
    return [_norm(rows) for rows in _probed(encoder, tasks, _gaussian(tasks), layer, budget, probe_nodes)]


def carry_ratios(encoder, tasks: list[Task], short: list[AdaptiveIntegral], layer: int, budget: int) -> list[float]:
    """How strongly each task's short-side error reaches A: ‖Δv V_lᵀ‖_F / ‖Δv‖_F for errors Δv
    drawn in the shapes of the short side's own panels (``AdaptiveIntegral.error_draw``: along
    K − G, and spread as rounding is, each part at the panel's full size, so that the ratio is
    the root sum of squares of what each part carries, at least either's). Each probe sends
    w = Σ_i z_i Δv_i (z_i = ±1 at random) through the long side, so that E ‖V_l w‖² =
    ‖Δv V_lᵀ‖_F² and E ‖w‖² = ‖Δv‖_F² = 2 Σ_p e_p²; the ratio is taken over ``PROBES`` draws.

    Rounding's and truncation's errors point nowhere near V_l's strongest direction: on mpnet
    at layer 10 they reached A 7–11× more weakly than the spectral norm ‖V_l‖₂ would carry them
    (docs/ij.md, "The certificate")."""
    sent = _error_draws(short)
    return [_ratio(w, rows) for w, rows in zip(sent.split(PROBES), _probed(encoder, tasks, sent, layer, budget))]


def _gaussian(tasks: list[Task]) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(len(tasks) * PROBES, tasks[0].long.g.shape[-1], generator=generator, dtype=torch.float64)


def _error_draws(short: list[AdaptiveIntegral]) -> torch.Tensor:
    """``PROBES`` cotangents per task, Σ_i z_i Δv_i for draws Δv of its short side's error."""
    generator = torch.Generator().manual_seed(1)
    sent = []
    for integral in short:
        for _ in range(PROBES):
            draw = integral.error_draw(generator)
            signs = torch.randint(0, 2, (draw.shape[0],), generator=generator, dtype=draw.dtype) * 2 - 1
            sent.append(signs @ draw)
    return torch.stack(sent)  # [Σ PROBES, D]


def _norm(rows: torch.Tensor) -> float:
    """‖V_l‖_F from the rows V_l z of Gaussian probes z: √(mean over probes of ‖V_l z‖²)."""
    return float(rows.pow(2).sum(1).mean().sqrt())


def _ratio(sent: torch.Tensor, rows: torch.Tensor) -> float:
    """√(Σ ‖V_l w‖² / Σ_p e_p²) over the draws: each draw holds each panel's error twice over."""
    norm = sent.pow(2).sum() / 2
    return float((rows.pow(2).sum() / norm).sqrt()) if norm > 0 else 0.0


def _probed(encoder, tasks: list[Task], cotangents: torch.Tensor, layer: int, budget: int,
            probe_nodes: int = PROBE_NODES) -> list[torch.Tensor]:
    """V_l w for ``PROBES`` cotangents w per task (``cotangents`` [tasks · PROBES, D]), each
    [PROBES, S_long], integrated on ``probe_nodes`` Gauss nodes: the probes ride the long side's
    own backward passes as a short side of ``PROBES`` tokens."""
    empty = torch.empty(PROBES, 0)
    probes = [Task(Side(empty, empty, t.long.g, t.long.g_ref), t.long, t.swapped) for t in tasks]
    path = Nodes.fixed(len(tasks), *nodes("gauss", probe_nodes))
    rows = long_rows(encoder, probes, cotangents, path, layer, budget)  # [Σ PROBES, max S_long]
    return [rows[k * PROBES : (k + 1) * PROBES, : t.long.length] for k, t in enumerate(tasks)]
