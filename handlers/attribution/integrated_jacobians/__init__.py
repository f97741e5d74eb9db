"""Integrated Jacobians (ij): the token×token attribution matrix of a bi-encoder's score.

Moeller et al., EMNLP 2023, and the cosine / off-the-shelf variants of the EACL 2024 follow-up.
For a text x let x_l be the hidden state entering block ``layer`` and r_l that of its reference
(``Encoder.reference_ids``); along the path h(α) = r_l + α (x_l − r_l) the sentence embedding
g(h) has the per-token vectors

    v_i(x) = ∫₀¹ J_g(h(α))[:, i, :] (x_l − r_l)_i dα        (one D-vector per token i)

and A_ij = v_i(a) · v_j(b). The original computes J with one backward pass per embedding
dimension. Here the two integrals are taken apart: the shorter text's v_i come from
forward-mode products (one tangent per token and node), the rows of A on the longer text from
vector-Jacobian products whose cotangents are those v_i (one per short-side token and node).
Both run only through blocks ``layer`` … L−1, in chunks sized to the memory budget, with the
rows of every pair explained together packed into the same passes.

g is the shifted embedding e(x) − e(r) in shift mode (a constant shift, no Normalize; for
``cos`` A is divided by the norms of the shifted embeddings, as the EACL version does); in
``none`` mode it is the model's own embedding, L2-normalised when the score is a cosine or the
model ends in Normalize, so that sum(A) ≈ f(a, b) − f(a, r_b) − f(r_a, b) + f(r_a, r_b).

The parts: ``paths`` (the sides, g and its values along the path), ``plan`` (nodes and chunks
within the memory budget), ``products`` (the Jacobian products), ``integration`` (the fixed and
adaptive rules); this module is the method.
"""
from __future__ import annotations

import math

import torch
from pydantic import Field, ValidationInfo, field_validator

from ...encoder import Encoder
from ...errors import InvalidOption
from ..base import MEMORY_BUDGET_MB, TEXT_FIELDS, Explanation, Method, MethodOptions, Pair
from ..quadrature import Quadrature
from .integration import adaptive, fixed
from .paths import Side, Task, sides_at
from .plan import row_cost


def _compared(scoring, side: Side) -> torch.Tensor:
    """The embedding the score compares, in the units of the path function g."""
    return side.g - side.g_ref if scoring.shifted else side.g


def _scale(ea: torch.Tensor, eb: torch.Tensor) -> float:
    """|score| in the path function's units, at least 1e-3 of |ea| |eb| (a score near 0 must not
    ask for an absolute error near 0)."""
    ea, eb = ea.double(), eb.double()
    return max(abs(float(ea @ eb)), 1e-3 * float(ea.norm() * eb.norm()), 1e-30)


# -- the method ---------------------------------------------------------------------------------
class IntegratedJacobians(Method):
    """ij: the token×token matrix A with sum(A) = score up to the quadrature's error."""

    name = "ij"
    _budget_hint = " per path node; a later layer fits too"
    #: path nodes per side that an adaptive explanation typically takes, for the time estimate
    #: until served requests say otherwise (two G10/K21 panels; docs/ij.md: "Quadrature")
    TYPICAL_ADAPTIVE_NODES = 63
    #: share of the latest request in the moving average of adaptive node counts
    NODES_WEIGHT = 0.3
    #: a path node on the float64 copy (``float64_nodes``) costs about this many of the model's
    #: own: mpnet at layer 0 on a CPU, 0.150 s against 0.073 s a node (docs/ij.md)
    FLOAT64_NODE_COST = 2.0

    def __init__(self, encoder: Encoder):
        super().__init__(encoder)
        #: per (layer, tolerance): the moving averages (geometric) of the nodes adaptive requests
        #: took on the shorter side and on the longer
        self.nodes_seen: dict[tuple[int, float], tuple[float, float]] = {}

    class Options(MethodOptions):
        layer: int | None = Field(default=None, description="the attributed layer; None: the last block but one")
        quadrature: Quadrature = Field(default="adaptive", description="adaptive to tolerance, or a fixed rule "
                                       "of steps nodes (right: the original's)")
        max_steps: int = Field(default=1000, ge=21, description="the node budget per side")
        steps: int = Field(default=50, description="path nodes per side of a fixed rule, at most max_steps")
        tolerance: float = Field(default=1e-3, ge=1e-6, le=0.5, description="adaptive: the error of the whole "
                                 "matrix relative to |score|")
        memory_budget_mb: int = Field(default=MEMORY_BUDGET_MB, ge=16, description="peak extra memory of one call")

        @field_validator("steps")
        @classmethod
        def _steps_within_budget(cls, steps: int, info: ValidationInfo) -> int:
            limit = info.data.get("max_steps")
            if limit is not None and not 1 <= steps <= limit:
                raise ValueError(f"must be an integer in [1, {limit}]")
            return steps

    @classmethod
    def completed(cls, given: dict) -> dict:
        """``steps`` without ``quadrature`` asks for a fixed rule: Gauss, the best fixed one."""
        if "steps" in given and "quadrature" not in given:
            return {**given, "quadrature": "gauss"}
        return given

    def nodes_per_side(self, options: "IntegratedJacobians.Options") -> tuple[int, int]:
        """Nodes on the shorter side and on the longer: a fixed rule's steps; for the adaptive
        rule, what requests at this layer and tolerance took so far (``observe``; float64 nodes
        counted at their cost), within the budget."""
        if options.quadrature != "adaptive":
            return options.steps, options.steps
        typical = (self.TYPICAL_ADAPTIVE_NODES, self.TYPICAL_ADAPTIVE_NODES)
        seen = self.nodes_seen.get((self.layer(options), options.tolerance), typical)
        most = options.max_steps * self.FLOAT64_NODE_COST
        return tuple(round(min(most, max(1, n))) for n in seen)  # type: ignore[return-value]

    def observe(self, options: "IntegratedJacobians.Options", results: list[Explanation]) -> None:
        """Learn the adaptive rule's node counts at this layer and tolerance from served answers.
        The counts come in whole panels (21, 63, 105, …), so their average is taken in log space:
        a layer whose pairs take 21 or 63 nodes is estimated at about 36, within 2× of either."""
        if options.quadrature != "adaptive":
            return
        key = (self.layer(options), options.tolerance)
        for result in results:
            taken = self._short_long(result)
            seen = self.nodes_seen.get(key, taken)
            self.nodes_seen[key] = tuple(  # type: ignore[assignment]
                math.exp(math.log(s) + self.NODES_WEIGHT * (math.log(t) - math.log(s))) for s, t in zip(seen, taken)
            )

    @classmethod
    def _short_long(cls, result: Explanation) -> tuple[float, float]:
        """An answer's work in path nodes on its shorter side and on its longer (the shorter is
        text_a on a tie), a node on the float64 copy counted as ``FLOAT64_NODE_COST`` nodes."""
        nodes_a, nodes_b = (n + (cls.FLOAT64_NODE_COST - 1.0) * fine
                            for n, fine in zip(result.extras["nodes"], result.extras.get("float64_nodes", (0, 0))))
        return (nodes_b, nodes_a) if len(result.tokens_b) < len(result.tokens_a) else (nodes_a, nodes_b)

    def work_done(self, result: Explanation, options: "IntegratedJacobians.Options") -> float:
        return self._work((len(result.tokens_a), len(result.tokens_b)), options, self._short_long(result))

    def work_field(self, options: "IntegratedJacobians.Options") -> str:
        return "tolerance" if options.quadrature == "adaptive" else "steps"

    @staticmethod
    def default_layer(num_layers: int) -> int:
        """The last block but one: late enough to be cheap, early enough to see the tokens interact."""
        return max(0, num_layers - 2)

    def layer(self, options: "IntegratedJacobians.Options") -> int:
        layers = self.encoder.num_layers
        layer = options.layer if options.layer is not None else self.default_layer(layers)
        if not 0 <= layer < layers:
            raise InvalidOption("layer", f"must be an integer in [0, {layers - 1}]")
        return layer

    def memory(self, lengths: tuple[int, int], options: "IntegratedJacobians.Options") -> list[tuple[str, int]]:
        """One path node of each side (more nodes are chunked): forward mode on the shorter
        text, backward on the longer."""
        layer = self.layer(options)
        short = 1 if lengths[1] < lengths[0] else 0
        return [
            (TEXT_FIELDS[side], sum(row_cost(self.encoder, lengths[side], layer, mode)))
            for side, mode in ((short, "jvp"), (1 - short, "vjp"))
        ]

    def work(self, lengths: tuple[int, int], options: "IntegratedJacobians.Options") -> float:
        return self._work(lengths, options, self.nodes_per_side(options))

    def _work(self, lengths: tuple[int, int], options: "IntegratedJacobians.Options", nodes: tuple[int, int]) -> float:
        """Per node, the shorter side's primal and one tangent per token through the blocks after
        the layer, and the longer side's forward and one cotangent per shorter-side token."""
        cost, blocks = self.encoder.cost, self.encoder.num_layers - self.layer(options)
        short, long = sorted(lengths)
        return blocks * (1 + short) * (nodes[0] * cost.block_macs(short) + nodes[1] * cost.block_macs(long))

    def _attribute(self, pairs: list[Pair], options: "IntegratedJacobians.Options") -> list[Explanation]:
        """The pairs' matrices at one layer, computed together: a fixed rule of ``steps`` nodes,
        or the adaptive rule to ``tolerance`` (relative to |score|, whole matrix) within
        ``max_steps`` nodes per side."""
        encoder, layer, rule = self.encoder, self.layer(options), options.quadrature
        budget = options.memory_budget_mb * 2**20
        texts = list(dict.fromkeys(t for pair in pairs for t in pair))
        scoring = encoder.scoring
        with encoder.adapter.attention("eager"):  # forward-mode products need attention in plain ops
            sides, batch = sides_at(encoder, texts, layer)
            row_of = {t: i for i, t in enumerate(texts)}
            tasks = [Task.of(sides[row_of[a]], sides[row_of[b]]) for a, b in pairs]
            scales = [_scale(_compared(scoring, t.short), _compared(scoring, t.long)) for t in tasks]
            if rule == "adaptive":
                short, long, carry = adaptive(encoder, tasks, layer, options.tolerance, options.max_steps, budget, scales)
                matrices = [q.estimate for q in long]
            else:
                matrices = fixed(encoder, tasks, layer, rule, options.steps, budget)

        results = []
        for k, ((a, b), task, raw) in enumerate(zip(pairs, tasks, matrices)):
            side_a, side_b = sides[row_of[a]], sides[row_of[b]]
            ea, eb = _compared(scoring, side_a), _compared(scoring, side_b)
            norm = float(ea.double().norm() * eb.double().norm()) if scoring.shifted and scoring.similarity == "cos" else 1.0
            matrix = ((raw.T if task.swapped else raw) / norm).contiguous()
            score = scoring.path_score(ea, eb)
            if scoring.shifted:
                terms = {"ra": 0.0, "rb": 0.0, "rr": 0.0}
            else:
                terms = {
                    "ra": scoring.path_score(side_a.g, side_b.g_ref),
                    "rb": scoring.path_score(side_a.g_ref, side_b.g),
                    "rr": scoring.path_score(side_a.g_ref, side_b.g_ref),
                }
            total = float(matrix.sum())
            error = abs(total - score)
            exact = error <= options.tolerance * scales[k] / norm if scoring.shifted else None  # tolerance in the answer's units
            details = {}
            if rule == "adaptive":
                used = (short[k].nodes_used, long[k].nodes_used)
                fine = (short[k].fine_nodes_used, long[k].fine_nodes_used)
                float64_nodes = fine[::-1] if task.swapped else fine
                panels = ([(q.a, q.b) for q in short[k].answer_panels], [(q.a, q.b) for q in long[k].answer_panels])
                nodes_used = used[::-1] if task.swapped else used
                details["panels"] = panels[::-1] if task.swapped else panels
                estimate = (short[k].error * carry[k] + long[k].error) / scales[k]
                converged = short[k].converged and long[k].converged and exact is not False
            else:
                nodes_used, estimate, converged = (options.steps, options.steps), None, exact
                float64_nodes = (0, 0)
            results.append(Explanation(
                method=self.name,
                score=score,
                tokens_a=batch.tokens(encoder.tokenizer, row_of[a]),
                tokens_b=batch.tokens(encoder.tokenizer, row_of[b]),
                truncated=[f for f, t in zip(TEXT_FIELDS, (a, b)) if batch.truncated[row_of[t]]],
                delta=error,
                attributions=matrix,
                extras={
                    "attribution_sum": total,
                    "attribution_error": error,
                    "reference_terms": terms,
                    "layer": layer,
                    "quadrature": rule,
                    "steps": max(nodes_used),
                    "nodes": list(nodes_used),
                    "float64_nodes": list(float64_nodes),
                    "tolerance": options.tolerance,
                    "converged": converged,
                    "error_estimate": estimate,
                },
                details=details,
            ))
        return results
