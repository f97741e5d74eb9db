"""Adaptive Gauss–Kronrod quadrature on [0, 1] of many vector-valued integrands, driven in rounds.

ij's default quadrature (``quadrature: adaptive``; the fixed rules of ``quadrature.py`` take
``steps`` nodes per path whatever the integrand). Every integrand gets its own partition of
[0, 1] into panels, each integrated by a Gauss rule and its Kronrod extension: ij uses the
10-point Gauss rule and its 21-point extension (G10/K21), and G7/K15 is the default here. The
panels whose embedded error estimate is largest are bisected until the summed estimate is below
an absolute tolerance, a node budget is spent, or only panels bound by the rounding of the
values' precision are left (bisecting those does not lower their error).

The model is never called from here. An :class:`AdaptiveIntegral` only says which α nodes it
needs now (:meth:`AdaptiveIntegral.pending`) and takes their values (:meth:`AdaptiveIntegral.feed`),
so that a caller can pack the nodes of all its integrands, and of all their panels, into the same
batched, chunked model passes; one round is one such set of passes. :func:`integrate` is the
reference driver of that protocol.

    integrals = [AdaptiveIntegral(tol * abs(score), max_nodes=600) for score in scores]
    while not all(q.done for q in integrals):
        requests = [(i, q.pending()) for i, q in enumerate(integrals) if not q.done]
        for (i, _), values in zip(requests, evaluate(requests)):   # one round of model passes
            integrals[i].feed(values)
    matrices = [q.estimate for q in integrals]

The value of an integrand at α is a tensor of any fixed shape (a [S, D] matrix, say); sums are
kept in float64 on the device the values come from. The error is a norm of the whole value —
the Frobenius norm by default, or any norm the caller passes as ``error_norm`` — never only of
its sum, so that a tolerance bounds the error of every entry of an attribution matrix together.

A warning that no error estimate can lift: a feature narrower than the gaps between the nodes
of the first panels is invisible to them (all 15 values agree with a smooth function, K and G
agree, the panel "converges" to the wrong value). ``initial_panels`` sets how fine the first
look is. Measured on 15 + 70 exp(−((α − c)/w)²), w = 0.0025, 200 random c: first panels of
width 1/12 ≈ 33 w found the bump at every c (rel. tolerances 1e-3 and 1e-6); 1/8 ≈ 50 w missed
it at 16 of 200 c at 1e-3 (none at 1e-6: a tight tolerance also refines weakly seen bumps);
one panel never sees it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

import numpy as np
import torch

ErrorNorm = Callable[[torch.Tensor], float]
Estimator = Literal["quadpack", "kronrod-gauss", "calibrated"]
ESTIMATORS: tuple[str, ...] = ("quadpack", "kronrod-gauss", "calibrated")

#: the ``"calibrated"`` estimate of K21's error on a G10/K21 panel: ρ · min(1, C (‖K − G‖ / ρ)^p),
#: fitted to K21's true error against float64 references on minilm's and mpnet's ij integrands
#: (docs/ij.md, "The certificate")
CALIBRATED_FACTOR, CALIBRATED_POWER = 2.0, 1.75
#: panels whose ‖K − G‖ / ρ is above this are taken as unresolved: their error is ρ
CALIBRATED_RESOLVED = 0.05
#: the margin on the share of ‖K − G‖ that a panel's identity residuals give K (``AdaptiveIntegral``)
IDENTITY_MARGIN = 2.0
#: values computed in a precision of machine epsilon ε carry a rounding of up to this many ε of
#: ‖h Σ w_k |f(α_k)|‖ into a panel's sums (measured up to 24 ε on minilm and mpnet in float32); 50 for the older
#: estimators
CALIBRATED_FLOOR, ROUNDING_FLOOR = 32.0, 50.0

# G7/K15 on [-1, 1] (QUADPACK qk15, Piessens et al. 1983; 33 digits, so the float64 values are
# the correctly rounded ones). Non-negative Kronrod nodes, largest first; xgk[1], xgk[3],
# xgk[5], xgk[7] are the non-negative nodes of the 7-point Gauss rule, with weights wg.
_XGK = (
    0.991455371120812639206854697526329,
    0.949107912342758524526189684047851,
    0.864864423359769072789712788640926,
    0.741531185599394439863864773280788,
    0.586087235467691130294144845693013,
    0.405845151377397166906606412076961,
    0.207784955007898467600689403773245,
    0.000000000000000000000000000000000,
)
_WGK = (
    0.022935322010529224963732008058970,
    0.063092092629978553290700663189204,
    0.104790010322250183839876322541518,
    0.140653259715525918745189590510238,
    0.169004726639267902826583426598550,
    0.190350578064785409913256402421014,
    0.204432940075298892414161999234649,
    0.209482141084727828012999174891714,
)
_WG = (
    0.129484966168869693270611432679082,
    0.279705391489276667901467771423780,
    0.381830050505118944950369775488975,
    0.417959183673469387755102040816327,
)


@dataclass(frozen=True)
class GaussKronrod:
    """A Gauss–Kronrod pair on [0, 1]: nodes t (ascending), Kronrod weights and Gauss weights
    (zero at the Kronrod-only nodes), both summing to 1. On a panel [a, b] the nodes are
    a + (b − a) t and the weights (b − a) w."""

    nodes: np.ndarray
    kronrod_weights: np.ndarray
    gauss_weights: np.ndarray

    @property
    def size(self) -> int:
        return len(self.nodes)


def _symmetric_pair(xgk, wgk, wg) -> GaussKronrod:
    """A pair on [0, 1] from QUADPACK's half table on [-1, 1]: the non-negative Kronrod nodes
    ``xgk`` (largest first, ending at 0) with weights ``wgk``; the Gauss nodes are xgk[1::2]
    with weights ``wg``."""
    x, wk = np.array(xgk, dtype=np.float64), np.array(wgk, dtype=np.float64)
    wg_half = np.zeros(len(x))
    wg_half[1::2] = wg
    nodes = np.concatenate([-x[:-1], x[::-1]])  # ascending, x[-1] = 0 is the centre
    kronrod = np.concatenate([wk[:-1], wk[::-1]])
    gauss = np.concatenate([wg_half[:-1], wg_half[::-1]])
    return GaussKronrod((nodes + 1.0) / 2.0, kronrod / 2.0, gauss / 2.0)


def gauss_kronrod_15() -> GaussKronrod:
    """The G7/K15 pair on [0, 1] (K15 integrates polynomials of degree ≤ 23 on [0, 1] exactly,
    G7 those of degree ≤ 13)."""
    return _symmetric_pair(_XGK, _WGK, _WG)


# G10/K21 on [-1, 1] (QUADPACK qk21): the first panel of a path integral, whose integrand is
# smooth on most models, so that one panel of 21 nodes can meet a tolerance that G7/K15 needs
# three panels (45 nodes) for (docs/ij.md: "Quadrature").
_XGK21 = (
    0.995657163025808080735527280689003,
    0.973906528517171720077964012084452,
    0.930157491355708226001207180059508,
    0.865063366688984510732096688423493,
    0.780817726586416897063717578345042,
    0.679409568299024406234327365114874,
    0.562757134668604683339000099272694,
    0.433395394129247190799265943165784,
    0.294392862701460198131126603103866,
    0.148874338981631210884826001129720,
    0.000000000000000000000000000000000,
)
_WGK21 = (
    0.011694638867371874278064396062192,
    0.032558162307964727478818972459390,
    0.054755896574351996031381300244580,
    0.075039674810919952767043140916190,
    0.093125454583697605535065465083366,
    0.109387158802297641899210590325805,
    0.123491976262065851077208067618290,
    0.134709217311473325928054001771707,
    0.142775938577060080797094273138717,
    0.147739104901338491374841515972068,
    0.149445554002916905664936468389821,
)
_WG10 = (
    0.066671344308688137593568809893332,
    0.149451349150580593145776339657697,
    0.219086362515982043995534934228163,
    0.269266719309996355091226921569469,
    0.295524224714752870173892994651338,
)


def gauss_kronrod_21() -> GaussKronrod:
    """The G10/K21 pair on [0, 1] (K21 exact to degree 31, G10 to degree 19)."""
    return _symmetric_pair(_XGK21, _WGK21, _WG10)


G7K15 = gauss_kronrod_15()
G10K21 = gauss_kronrod_21()


def frobenius(tensor: torch.Tensor) -> float:
    """The default error norm: the L2 norm of all entries together."""
    return float(torch.linalg.vector_norm(tensor))


@dataclass
class Panel:
    """One panel [a, b] of the partition, once its values are in: its Kronrod estimate (a tensor
    of the value's shape) and its error estimate (a float in the caller's norm)."""

    a: float
    b: float
    estimate: torch.Tensor
    error: float
    #: the error's two likely shapes (unit norm, the value's shape): along K − G (truncation's),
    #: and spread in the pattern of |f| (rounding's, whose entries round independently)
    along: torch.Tensor | None = field(default=None, repr=False)
    spread: torch.Tensor | None = field(default=None, repr=False)
    #: where a panel that its nodes do not resolve has its feature: the α of the node farthest
    #: from the panel's mean value (None on a resolved panel)
    peak: float | None = None
    #: the rounding of its sums (``panel_estimates``), below which its error cannot go: a panel
    #: whose error is its floor is not bisected (its halves' floors sum to about as much: the norm
    #: of ∫|f| is subadditive), unless its halves run in a finer precision (``fine_width``)
    floor: float = 0.0
    #: half the width of the panel cut around ``peak`` (1.5 node gaps)
    _reach: float = field(default=0.0, repr=False)

    @property
    def width(self) -> float:
        return self.b - self.a

    def split(self, zoom: bool) -> list[tuple[float, float]]:
        """The panels that replace this one: its halves, or with ``zoom`` and a ``peak``, a
        narrow panel around the peak (1.5 node gaps on each side) between two outer ones, so
        that a narrow feature is closed in on several times faster than by halving."""
        mid = 0.5 * (self.a + self.b)
        if not zoom or self.peak is None:
            return [(self.a, mid), (mid, self.b)]
        low, high = max(self.a, self.peak - self._reach), min(self.b, self.peak + self._reach)
        edges = [self.a] + [e for e in (low, high) if self.a < e < self.b] + [self.b]
        return [(a, b) for a, b in zip(edges, edges[1:]) if b > a] if len(edges) > 2 else [(self.a, mid), (mid, self.b)]


def panel_estimates(
    values: torch.Tensor,
    edges: Sequence[tuple[float, float]],
    error_norm: ErrorNorm | None = None,
    estimator: Estimator = "quadpack",
    rule: GaussKronrod = G7K15,
    eps: float | None = None,
) -> tuple[torch.Tensor, list[float], torch.Tensor]:
    """Kronrod estimates [P, *shape], error estimates (P floats) and Gauss estimates of P panels
    from their values [P · n, *shape] (panel-major, each panel's n values in node order).

    The error of a panel [a, b] of width h, with K and G its Kronrod and Gauss sums, is

    * ``"kronrod-gauss"``: ‖K − G‖ — the error of the lower-order rule G, used as the error of K;
    * ``"quadpack"`` (default): QUADPACK's ``ρ · min(1, (200 ‖K − G‖ / ρ)^1.5)``, with
      ρ = ‖h Σ w_k |f(α_k) − K/h|‖ (elementwise; the Kronrod integral of the deviation from
      the mean, ``resasc``), as in ``qk15`` and scipy's ``quad_vec``;
    * ``"calibrated"``: ``ρ · min(1, C (‖K − G‖ / ρ)^p)`` with C and p fitted for G10/K21
      (``CALIBRATED_FACTOR``, ``CALIBRATED_POWER``) on a resolved panel (‖K − G‖ < 0.05 ρ),
      ρ on any other: once a panel is resolved K21's error falls as a power of G10's (degree
      31 against 19), where ‖K − G‖ overstates K21's error 100–1000×. A caller with an exact
      identity (``AdaptiveIntegral.known_error``) also checks the regime panel by panel.

    All are floored at the rounding of the sums, a multiple of ε ‖h Σ w_k |f(α_k)|‖, ε that of
    the precision the values were computed in (``eps``; default: the values' dtype): float32
    model outputs cannot be integrated below ~1e-6 relative, and this stops the refinement
    from chasing their noise.

    Why QUADPACK's by default: once a panel is resolved (‖K − G‖ ≪ ρ), K's error is far below
    G's (degree 23 against 13), and ‖K − G‖ overstates it by orders of magnitude; the 1.5 power
    reflects that and spares bisections (fewer model passes) while still, empirically over
    decades of QUADPACK use and in the tests here, staying above the true error. While a panel
    is not resolved (a peak seen by a node or two, where K and G may be wrong by similar
    amounts) the factor 200^1.5 ≈ 2800 makes it far more conservative than ‖K − G‖, capped at
    ρ, the integral of the deviation from the mean, which is what an unresolved panel can be
    off by. Measured on the bump of the module's doc (first panels 1/12 wide, 200 positions,
    rel. tolerance 1e-3): ‖K − G‖ accepted a half-seen bump at 9 positions, QUADPACK's at none;
    at tight tolerances both bound the true error, QUADPACK's by a wide margin (e.g. estimated
    relative 3e-9, true 5e-13, at 1e-6). ‖K − G‖ is offered for callers who want the plain,
    never-extrapolated error of the cheaper rule.

    The summed error is a bound of the total only if ``error_norm`` is a norm (a seminorm will
    do): the triangle inequality adds the panels' errors.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown error estimator {estimator!r}; one of {', '.join(ESTIMATORS)}")
    return _estimates(PanelSums.of(values, edges, rule), values.shape[1:], error_norm, estimator, _eps(values, eps))[:3]


def _eps(values: torch.Tensor, eps: float | None) -> float:
    """``eps``, or by default the machine epsilon of the values' dtype (float64's for integers)."""
    if eps is not None:
        return eps
    return float(torch.finfo(values.dtype).eps if values.dtype.is_floating_point else np.finfo(np.float64).eps)


@dataclass
class PanelSums:
    """The rule's sums over P panels, from their values: the values themselves ``f`` [P, n, E]
    (float64, flattened), the panels' widths [P], and per panel [P, E] the Kronrod and Gauss
    integrals, ``resasc`` (the Kronrod integral of |f − mean|) and ``resabs`` (of |f|)."""

    f: torch.Tensor
    widths: torch.Tensor
    kronrod: torch.Tensor
    gauss: torch.Tensor
    resasc: torch.Tensor
    resabs: torch.Tensor

    @classmethod
    def of(cls, values: torch.Tensor, edges: Sequence[tuple[float, float]], rule: GaussKronrod) -> "PanelSums":
        n, count = rule.size, len(edges)
        if values.shape[0] != count * n:
            raise ValueError(f"expected {count * n} values (dim 0) for {count} panels, got {values.shape[0]}")
        f = values.to(torch.float64).reshape(count, n, -1)  # [P, n, E]
        device = f.device
        widths = torch.tensor([b - a for a, b in edges], dtype=torch.float64, device=device)
        wk = torch.from_numpy(rule.kronrod_weights).to(device)
        wg = torch.from_numpy(rule.gauss_weights).to(device)
        kronrod = torch.einsum("pne,n->pe", f, wk) * widths[:, None]  # [P, E]
        gauss = torch.einsum("pne,n->pe", f, wg) * widths[:, None]
        mean = kronrod / widths[:, None]
        resasc = torch.einsum("pne,n->pe", (f - mean[:, None]).abs(), wk) * widths[:, None]
        resabs = torch.einsum("pne,n->pe", f.abs(), wk) * widths[:, None]
        return cls(f, widths, kronrod, gauss, resasc, resabs)


def _estimates(
    sums: PanelSums, shape: torch.Size, error_norm: ErrorNorm | None, estimator: Estimator, eps: float | Sequence[float]
) -> tuple[torch.Tensor, list[float], torch.Tensor, list[float]]:
    """``panel_estimates`` from the panels' sums (``eps`` one for all panels, or one per panel),
    and each panel's rounding floor."""
    kronrod, gauss, resasc, resabs = sums.kronrod, sums.gauss, sums.resasc, sums.resabs
    count = kronrod.shape[0]
    diff = kronrod - gauss
    if error_norm is None:
        raw = torch.linalg.vector_norm(diff, dim=1).tolist()
        spread = torch.linalg.vector_norm(resasc, dim=1).tolist()
        scale = torch.linalg.vector_norm(resabs, dim=1).tolist()
    else:
        raw = [float(error_norm(d.reshape(shape))) for d in diff]
        spread = [float(error_norm(d.reshape(shape))) for d in resasc]
        scale = [float(error_norm(d.reshape(shape))) for d in resabs]
    factor = CALIBRATED_FLOOR if estimator == "calibrated" else ROUNDING_FLOOR
    per_unit = [factor * e for e in eps] if isinstance(eps, Sequence) else [factor * eps] * count
    floors = [unit * s for unit, s in zip(per_unit, scale)]
    errors = []
    for e, rho, floor in zip(raw, spread, floors):
        if estimator == "quadpack" and rho > 0.0 and e > 0.0:
            e = rho * min(1.0, (200.0 * e / rho) ** 1.5)
        elif estimator == "calibrated" and rho > 0.0 and e > 0.0:
            resolved = e < CALIBRATED_RESOLVED * rho
            e = rho * min(1.0, CALIBRATED_FACTOR * (e / rho) ** CALIBRATED_POWER) if resolved else rho
        errors.append(max(e, floor))
    return kronrod.reshape(count, *shape), errors, gauss.reshape(count, *shape), floors


@dataclass
class AdaptiveIntegral:
    """∫₀¹ f(α) dα of one tensor-valued integrand, refined in rounds (see the module's doc).

    tol_abs: the target of ``error``, in ``error_norm`` (the caller scales it, e.g. tol · |score|).
    max_nodes: the most values this integral may ask for, all rounds together.
    initial_panels: the first partition: a number of equal panels, or the edges
        (0 = e_0 < e_1 < … < e_m = 1).
    error_norm: a norm of a tensor of the value's shape, as a float; default: Frobenius.
    estimator: the panel error estimate, ``"quadpack"`` or ``"kronrod-gauss"`` (``panel_estimates``).
    min_width: panels narrower than this are not bisected (a jump in the integrand would
        otherwise be chased down to rounding); when such panels alone miss the tolerance, the
        integral is done without converging, spending no more of its budget.
    known_error: optional ``(a, b, estimate) -> float``: an error of one panel's estimate that
        the caller can measure exactly, as the residual of an identity every panel's integral
        satisfies (ij: the fundamental theorem of calculus along its path). A panel's error is
        the larger of it and the local estimate, so that the refinement goes where the identity
        fails — a feature that the local estimate cannot see — and ``converged`` promises both.
    eps: the machine epsilon of the precision the values were computed in (a float32 model's
        values arrive as float64 sums); default: the values' dtype.
    zoom: a panel that its own nodes do not resolve is split around its peak (``Panel.split``)
        instead of halved.
    fine_width, fine_eps: panels narrower than ``fine_width`` are evaluated by the caller in a
        finer precision, of machine epsilon ``fine_eps`` (``pending_fine`` says which nodes): a
        feature narrower than the values' precision resolves along α (ij: a float32 model
        cannot tell α apart below ~1e-7, and a float64 copy of it takes the panels narrower
        than 2^-14). 0 (default): every panel in the values' precision.

    Each round: ``pending()`` gives the α of the nodes needed now (float64, 15 per new panel,
    panel after panel), ``feed(values)`` takes their values stacked along dim 0 and decides the
    next round. A node is asked for once: the Kronrod nodes of two halves never meet those of
    their parent, and a bisected parent's values are not needed again. After ``feed``, if the
    summed error is ≤ tol_abs the integral is ``converged``; otherwise the panels with the
    largest errors are bisected — as many, largest first, as bring the error of the panels
    left alone to ≤ tol_abs / 2, so that one round fixes all that needs fixing and rounds stay
    few — within the budget (as many of them as fit). If none can be bisected the integral is
    ``done`` without converging and keeps the best estimate it has, with its error.
    """

    tol_abs: float
    max_nodes: int = 2000
    initial_panels: int | Sequence[float] = 1
    error_norm: ErrorNorm | None = None
    estimator: Estimator = "quadpack"
    min_width: float = 2.0**-40
    rule: GaussKronrod = field(default=G7K15, repr=False)
    known_error: Callable[[float, float, torch.Tensor], float] | None = field(default=None, repr=False)
    eps: float | None = None
    zoom: bool = False
    fine_width: float = 0.0
    fine_eps: float | None = None

    def __post_init__(self) -> None:
        if not self.tol_abs >= 0.0:
            raise ValueError(f"tol_abs must be a number ≥ 0, not {self.tol_abs}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"unknown error estimator {self.estimator!r}; one of {', '.join(ESTIMATORS)}")
        if isinstance(self.initial_panels, int):
            if self.initial_panels < 1:
                raise ValueError(f"initial_panels must be ≥ 1, not {self.initial_panels}")
            edges = np.linspace(0.0, 1.0, self.initial_panels + 1)
        else:
            edges = np.asarray(self.initial_panels, dtype=np.float64)
            if edges.ndim != 1 or len(edges) < 2 or edges[0] != 0.0 or edges[-1] != 1.0 or np.any(np.diff(edges) <= 0):
                raise ValueError("initial_panels: edges must increase from 0 to 1")
        panels = [(float(a), float(b)) for a, b in zip(edges[:-1], edges[1:])]
        if len(panels) * self.rule.size > self.max_nodes:
            raise ValueError(
                f"max_nodes {self.max_nodes} is below the {len(panels) * self.rule.size} nodes of the first panels"
            )
        self._panels: list[Panel] = []  # the partition's panels whose values are in
        self._pending: list[tuple[float, float]] = panels  # panels whose values are asked for
        self._splitting: list[int] = []  # indices into _panels replaced once _pending is fed
        #: the partition with the least error so far: its error, its sum and its panels
        self._best: tuple[float, torch.Tensor, list[Panel]] | None = None
        self._shape: torch.Size | None = None
        self.nodes_used = 0
        self.fine_nodes_used = 0  # of them, the nodes of panels narrower than ``fine_width``
        self.rounds = 0
        self.done = False
        self.converged = False

    # -- the round protocol --------------------------------------------------------------------
    def pending(self) -> torch.Tensor:
        """The α nodes [n] (float64) whose values the next ``feed`` takes; empty when done."""
        if self.done or not self._pending:
            return torch.empty(0, dtype=torch.float64)
        a = torch.tensor([p[0] for p in self._pending], dtype=torch.float64)
        h = torch.tensor([p[1] - p[0] for p in self._pending], dtype=torch.float64)
        t = torch.from_numpy(self.rule.nodes)
        return (a[:, None] + h[:, None] * t[None, :]).reshape(-1)

    def pending_fine(self) -> torch.Tensor:
        """Per node of ``pending()`` (bool [n]): whether the caller evaluates it in the fine
        precision (its panel is narrower than ``fine_width``)."""
        if self.done or not self._pending:
            return torch.empty(0, dtype=torch.bool)
        return torch.tensor([self._fine(a, b) for a, b in self._pending]).repeat_interleave(self.rule.size)

    def _fine(self, a: float, b: float) -> bool:
        return b - a < self.fine_width

    def feed(self, values: torch.Tensor) -> None:
        """Values at ``pending()``'s nodes, stacked along dim 0 ([n, *shape], any float dtype)."""
        if self.done:
            raise RuntimeError("this integral is done; it needs no more values")
        values = torch.as_tensor(values)
        if not bool(torch.isfinite(values).all()):
            raise ValueError("values must be finite")
        if self._shape is None:
            self._shape = values.shape[1:]
        elif values.shape[1:] != self._shape:
            raise ValueError(f"values of shape {tuple(values.shape[1:])}, earlier {tuple(self._shape)}")
        sums = PanelSums.of(values, self._pending, self.rule)
        eps: float | list[float] = _eps(values, self.eps)
        if self.fine_width > 0.0:
            fine_eps = self.fine_eps if self.fine_eps is not None else float(np.finfo(np.float64).eps)
            eps = [fine_eps if self._fine(a, b) else eps for a, b in self._pending]
        kronrod, errors, gauss, floors = _estimates(sums, values.shape[1:], self.error_norm, self.estimator, eps)
        if self.known_error is not None:
            errors = [self._checked(a, b, k, g, e) for (a, b), k, g, e in zip(self._pending, kronrod, gauss, errors)]
        peaks = self._peaks(sums) if self.zoom else [(None, 0.0)] * len(self._pending)
        new = [Panel(a, b, k, e, _unit(k - g), _unit(spread.reshape(k.shape)), peak, floor, _reach=reach)
               for (a, b), k, g, spread, e, (peak, reach), floor
               in zip(self._pending, kronrod, gauss, sums.resabs, errors, peaks, floors)]
        drop = set(self._splitting)
        self._panels = [p for i, p in enumerate(self._panels) if i not in drop] + new
        self._panels.sort(key=lambda p: p.a)
        error = float(sum(p.error for p in self._panels))
        if self._best is None or error <= self._best[0]:
            self._best = (error, torch.stack([p.estimate for p in self._panels]).sum(0), list(self._panels))
        self.nodes_used += values.shape[0]
        self.fine_nodes_used += sum(self.rule.size for a, b in self._pending if self._fine(a, b))
        self.rounds += 1
        self._pending, self._splitting = [], []
        self._plan()

    def _checked(self, a: float, b: float, kronrod: torch.Tensor, gauss: torch.Tensor, error: float) -> float:
        """A panel's error with its identity's residual: at least the residual of K (an exact
        error of K's sums). With the ``"calibrated"`` estimate, a residual of K also says how far
        the panel is from the regime the calibration assumes: K's residual over G's is how much
        better K is than G on this panel, exactly, in the identity's direction, so that K's error
        is taken as at least ``IDENTITY_MARGIN`` times that share of ‖K − G‖ (all of it when K
        is no better than G: a feature both rules miss)."""
        residual = self.known_error(a, b, kronrod)
        if residual > 0.0 and self.estimator == "calibrated":
            spread = frobenius(kronrod - gauss) if self.error_norm is None else float(self.error_norm(kronrod - gauss))
            share = min(1.0, IDENTITY_MARGIN * residual / max(self.known_error(a, b, gauss), 1e-300))
            error = max(error, share * spread)
        return max(error, residual)

    def _peaks(self, sums: PanelSums) -> list[tuple[float | None, float]]:
        """Per new panel: the α of its node farthest from the panel's mean value and 1.5 times
        the larger gap to that node's neighbours, where the nodes do not resolve the panel
        (‖K − G‖ ≥ ``CALIBRATED_RESOLVED`` ρ, ρ the mean absolute deviation); (None, 0) elsewhere,
        and where that node is one of the panel's two outermost: values that deviate most at
        the edge show a trend across the panel rather than a feature inside, and a cut around
        the edge node would take a sliver off a round and leave the panel as wide and as far off
        (one panel on mpnet's layer 4 lost 300 nodes so, and the pair its convergence)."""
        n = self.rule.size
        mean = sums.kronrod / sums.widths[:, None]
        deviation = torch.linalg.vector_norm(sums.f - mean[:, None], dim=2)  # [P, n]
        spread = torch.linalg.vector_norm(sums.resasc, dim=1)
        gap = torch.linalg.vector_norm(sums.kronrod - sums.gauss, dim=1)
        t = self.rule.nodes
        out: list[tuple[float | None, float]] = []
        for (a, b), dev, rho, e in zip(self._pending, deviation, spread.tolist(), gap.tolist()):
            if rho <= 0.0 or e < CALIBRATED_RESOLVED * rho:
                out.append((None, 0.0))
                continue
            k = int(dev.argmax())
            if k in (0, n - 1):  # a trend across the panel: halved
                out.append((None, 0.0))
                continue
            gaps = [t[k] - t[k - 1] if k > 0 else t[k], t[k + 1] - t[k] if k + 1 < n else 1.0 - t[k]]
            out.append((a + (b - a) * float(t[k]), 1.5 * (b - a) * float(max(gaps))))
        return out

    def _plan(self) -> None:
        total = float(sum(p.error for p in self._panels))
        if total <= self.tol_abs:
            self.done = self.converged = True
            return
        if sum(p.error for p in self._panels if p.width / 2 < self.min_width) > self.tol_abs:
            self.done = True  # panels too narrow to bisect miss the tolerance alone: no budget can help
            return
        left = total
        budget = self.max_nodes - self.nodes_used
        for i in sorted(range(len(self._panels)), key=lambda i: -self._panels[i].error):
            if left <= 0.5 * self.tol_abs or budget < 2 * self.rule.size:
                break
            panel = self._panels[i]
            if panel.width / 2 < self.min_width:
                continue
            if panel.error <= panel.floor and not self._fine(panel.a, panel.a + panel.width / 2):
                continue  # bound by its rounding, which its halves carry as well
            parts = panel.split(self.zoom)
            if min(b - a for a, b in parts) < self.min_width or len(parts) * self.rule.size > budget:
                parts = panel.split(False)
            self._pending += parts
            self._splitting.append(i)
            left -= panel.error
            budget -= len(parts) * self.rule.size
        if not self._pending:
            self.done = True

    def retarget(self, tol_abs: float) -> None:
        """Ask for ``tol_abs`` from here on, for a caller that learns its target from the first
        values (ij: the long side's ‖V_l‖ is probed after the short side's first panel): the
        integral goes on, or ends, as ``feed`` would have decided with that target."""
        if self._pending:
            raise RuntimeError("retarget between rounds: values are still asked for")
        self.tol_abs = tol_abs
        self.done = self.converged = False
        self._plan()

    def refine_everywhere(self) -> bool:
        """Bisect every panel (widest first, within the budget) although the local estimates
        are met: for a caller whose own check (an exact completeness) says that a feature too
        narrow for the first panels was missed. True when any panel was scheduled."""
        if self._pending:
            return True
        budget = self.max_nodes - self.nodes_used
        cost = 2 * self.rule.size
        for i in sorted(range(len(self._panels)), key=lambda i: -self._panels[i].width):
            panel = self._panels[i]
            if budget < cost or panel.width / 2 < self.min_width:
                continue
            mid = 0.5 * (panel.a + panel.b)
            self._pending += [(panel.a, mid), (mid, panel.b)]
            self._splitting.append(i)
            budget -= cost
        self.done = not self._pending
        self.converged = False
        if self._pending:  # the caller found the best partition wrong: the next one replaces it
            self._best = None
        return bool(self._pending)

    # -- results -----------------------------------------------------------------------------
    @property
    def estimate(self) -> torch.Tensor:
        """The integral (float64, the value's shape): the Kronrod sums of the partition whose
        summed error was the least so far (a bisection that hits a narrow feature can make the
        newest partition worse for a round; the answer never gets worse as nodes are added)."""
        if self._best is None:
            raise RuntimeError("no values fed yet")
        return self._best[1]

    @property
    def error(self) -> float:
        """The estimated absolute error of ``estimate`` in ``error_norm``: its panels' sum."""
        return self._best[0] if self._best is not None else float("inf")

    def error_draw(self, generator: torch.Generator) -> torch.Tensor:
        """A random error of ``estimate`` (the value's shape): each panel of its partition lends
        it two parts, each of the panel's estimated size, in the two shapes its error may take:
        along K − G with a random sign (truncation's), and in |f|'s pattern with a random sign per
        entry (rounding's). For any linear map L the draws' mean ‖L(draw)‖² is Σ_p error_p²
        (‖L(u_p)‖² + E ‖L(r_p)‖²), u_p and r_p the two parts, at least what either carries alone,
        and their mean ‖draw‖² is 2 Σ_p error_p²: how strongly the error reaches what a caller
        computes from the integral (ij: A, through the long side's Jacobians), against the
        panels' summed error (``error``), which assumes every error points where L carries
        farthest."""
        draw = torch.zeros_like(self.estimate)
        for panel in self.answer_panels:
            sign = torch.randint(0, 2, (), generator=generator, dtype=draw.dtype) * 2 - 1
            signs = torch.randint(0, 2, draw.shape, generator=generator, dtype=draw.dtype) * 2 - 1
            draw += panel.error * (sign * panel.along + signs.to(draw.device) * panel.spread)
        return draw

    @property
    def panels(self) -> list[Panel]:
        """The partition's panels whose values are in, in order of α."""
        return list(self._panels)

    @property
    def answer_panels(self) -> list[Panel]:
        """The panels of the partition that ``estimate`` and ``error`` come from (the latest
        one's, unless a round made it worse)."""
        return list(self._best[2]) if self._best is not None else []


def _unit(tensor: torch.Tensor) -> torch.Tensor:
    norm = torch.linalg.vector_norm(tensor)
    return tensor / norm if norm > 0 else tensor


Evaluator = Callable[[list[tuple[int, torch.Tensor]]], Sequence[torch.Tensor]]


def integrate(
    evaluate: Evaluator,
    count: int,
    tol: float | Sequence[float],
    max_nodes: int | Sequence[int] = 2000,
    *,
    max_rounds: int = 1000,
    **options,
) -> list[AdaptiveIntegral]:
    """Integrate ``count`` integrands on [0, 1] together, one batched evaluation per round.

    evaluate(requests) gets ``[(integrand_index, alphas [n_i] float64), ...]`` — every integrand
    still running, in index order — and returns one tensor [n_i, *shape_i] per request, in
    order. ``tol`` and ``max_nodes`` are one for all or one per integrand (absolute, as in
    :class:`AdaptiveIntegral`); other keywords go to every :class:`AdaptiveIntegral`.
    Returns the integrals (``estimate``, ``error``, ``converged``, ``nodes_used``), in order.
    """
    tols = [float(tol)] * count if np.isscalar(tol) else [float(t) for t in tol]
    budgets = [int(max_nodes)] * count if np.isscalar(max_nodes) else [int(m) for m in max_nodes]
    if len(tols) != count or len(budgets) != count:
        raise ValueError(f"tol and max_nodes need one value or {count}")
    integrals = [AdaptiveIntegral(t, m, **options) for t, m in zip(tols, budgets)]
    for _ in range(max_rounds):
        requests = [(i, q.pending()) for i, q in enumerate(integrals) if not q.done]
        if not requests:
            break
        answers = list(evaluate(requests))
        if len(answers) != len(requests):
            raise ValueError(f"evaluate answered {len(answers)} requests out of {len(requests)}")
        for (i, _), values in zip(requests, answers):
            integrals[i].feed(values)
    return integrals
