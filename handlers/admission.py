"""Refusals before any work: what one request item would cost, against the archive's budgets.

The handler admits every parsed item (``Admission.check``) before computing anything; a
refusal is a ``RequestError`` naming the field, for that request only.

- **Content** (``content_refusal``). A text that tokenizes to the special tokens alone
  (zero-width, control or combining characters only) is its own reference: its shifted
  embedding is 0, its cosine is undefined and an explanation of it would answer NaN. Refused
  with 400: explanations here, predictions where their one tokenization of the batch happens
  (``inference.predict_items``).
- **Memory** (``explanation.memory_budget_mb``). ij checks its own cost per path node and
  chunks the rest (``integrated_jacobians._check_budget``). gae and lrp hold the activations
  of every block for all rows of a pair (the two texts and, in shift mode, their references)
  in one autograd pass; they must fit the budget. Refused with 413.
- **Time** (``explanation.time_budget_s``, per method). TorchServe has one ``responseTimeout``
  per model, and reaching it kills the worker with every request of its batch. So each method
  has its own budget, checked up front: the item's work in block multiply-adds (``work``)
  times the seconds per unit measured for that method on this worker in ``initialize``
  (``calibrate``). Refused with 413 naming the option that scales the work (ij: ``steps``;
  lrp pairwise: ``pairwise``; otherwise the longer text). ``responseTimeout`` stays the hard
  stop and must exceed every budget (checked in ``initialize``). The rate then follows what
  the worker measures (``observe``, after every batch of explanations), so that a calibration
  taken while other workers were starting, or a machine whose load changes, does not fix the
  estimate for the worker's life.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from .attribution import METHODS, explain_items
from .config import ExplanationSettings
from .encoder import Encoder
from .protocol import ExplainItem, Item, RankItem, RequestError

FLOAT_BYTES = 4
OBSERVED_WEIGHT = 0.25  # share of the latest measured rate in seconds_per_unit (a moving average)
TORCHSERVE_RESPONSE_TIMEOUT_S = 120.0  # TorchServe's default responseTimeout
CALIBRATION_PAIR = (
    "A man is playing an acoustic guitar on a small stage in front of a quiet audience tonight.",
    "Someone performs a song with a guitar for the people who came to listen.",
)


def _sizes(encoder: Encoder) -> tuple[int, int, int]:
    """(hidden, intermediate, heads) of the encoder's blocks."""
    config = encoder.adapter.model.config
    inner = int(getattr(config, "intermediate_size", None) or 2 * config.d_ff)
    heads = int(getattr(config, "num_attention_heads", None) or config.num_heads)
    return encoder.adapter.hidden_size, inner, heads


def block_macs(encoder: Encoder, width: int) -> float:
    """Multiply-adds of one block over one row of ``width`` tokens (projections, MLP, attention)."""
    hidden, inner, _ = _sizes(encoder)
    return width * (4 * hidden * hidden + 2 * hidden * inner) + 2 * width * width * hidden


def block_activation_bytes(encoder: Encoder, width: int) -> int:
    """Bytes one block keeps for the backward pass of one row of ``width`` tokens."""
    hidden, inner, heads = _sizes(encoder)
    return FLOAT_BYTES * (3 * heads * width * width + 10 * width * hidden + 2 * width * inner)


def _rows_per_text(encoder: Encoder) -> int:
    return 2 if encoder.reference == "shift" else 1


def work(encoder: Encoder, item: ExplainItem, lengths: tuple[int, int]) -> float:
    """The relative cost of explaining ``item`` (texts of ``lengths`` tokens), in block multiply-adds."""
    layers = encoder.num_layers
    width = max(lengths)
    if item.method == "ij":
        short, long = sorted(lengths)
        return item.steps * (layers - item.layer) * (1 + short) * (block_macs(encoder, short) + block_macs(encoder, long))
    total = 3 * 2 * _rows_per_text(encoder) * layers * block_macs(encoder, width)  # forward + backward
    if item.method == "lrp" and item.pairwise:
        total += 3 * layers * sum(n * block_macs(encoder, n) for n in lengths)  # one tangent per token
    return total


@dataclass
class Admission:
    """The budgets of one worker: ``seconds_per_unit`` per method comes from ``calibrate``.

    ``response_timeout_s`` is the model's TorchServe ``responseTimeout``: every method's budget
    must be below it, and the explanations admitted into one batch together get half of it
    (an estimate may be off by that much); the rest of the batch is answered 503, to retry.
    """

    encoder: Encoder
    settings: ExplanationSettings
    response_timeout_s: float = TORCHSERVE_RESPONSE_TIMEOUT_S
    seconds_per_unit: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for method, budget in self.settings.time_budget_s.items():
            if budget >= self.response_timeout_s:
                raise ValueError(f"explanation.time_budget_s.{method} ({budget:g} s) must be below the model's "
                                 f"responseTimeout ({self.response_timeout_s:g} s)")

    def check_batch(self, items: list[Item]) -> list[RequestError | None]:
        """Per item of one TorchServe batch: its refusal, or None when it is admitted."""
        refusals: list[RequestError | None] = []
        spent = 0.0
        for item in items:
            try:
                seconds = self.check(item)
                if seconds and spent + seconds > self.response_timeout_s / 2:
                    raise RequestError(f"{item.method}: the explanations of this batch already take about "  # type: ignore[union-attr]
                                       f"{spent:.0f} s of the {self.response_timeout_s:g} s response timeout; "
                                       "retry", "method", 503)
                spent += seconds
                refusals.append(None)
            except RequestError as error:
                refusals.append(error)
        return refusals

    def check(self, item: Item) -> float:
        """The estimated seconds of ``item`` (0 when not measured); RequestError when it cannot be served
        within the archive's budgets."""
        if not isinstance(item, ExplainItem):
            return 0.0
        fields = text_fields(item)
        lengths = tuple(self.encoder.tokenize([text for _, text in fields]).lengths)
        refusal = content_refusal(self.encoder, [(name, n) for (name, _), n in zip(fields, lengths)])
        if refusal is not None:
            raise refusal
        self._check_memory(item, lengths)  # type: ignore[arg-type]
        return self._check_time(item, lengths)  # type: ignore[arg-type]

    def _check_memory(self, item: ExplainItem, lengths: tuple[int, int]) -> None:
        if item.method == "ij":
            return  # integrated_jacobians checks its own per-node cost and chunks the rest
        width = max(lengths)
        need = 2 * _rows_per_text(self.encoder) * self.encoder.num_layers * block_activation_bytes(self.encoder, width)
        budget = self.settings.memory_budget_mb * 2**20
        if need > budget:
            name = "text_a" if lengths[0] >= lengths[1] else "text_b"
            raise RequestError(
                f"{name}: {item.method} over {width} tokens needs about {need / 2**20:.0f} MB of activations; "
                f"the memory budget is {self.settings.memory_budget_mb} MB (a shorter text fits)", name, 413)

    def _check_time(self, item: ExplainItem, lengths: tuple[int, int]) -> float:
        budget = self.settings.time_budget_s.get(item.method)
        rate = self.seconds_per_unit.get(item.method)
        if budget is None or rate is None:
            return 0.0
        seconds = work(self.encoder, item, lengths) * rate
        if seconds > budget:
            if item.method == "ij":
                name = "steps"
            elif item.method == "lrp" and item.pairwise:
                name = "pairwise"
            else:
                name = "text_a" if lengths[0] >= lengths[1] else "text_b"
            raise RequestError(
                f"{name}: {item.method} on {lengths[0]}+{lengths[1]} tokens would take about {seconds:.0f} s here; "
                f"the {item.method} time budget is {budget:g} s", name, 413)
        return seconds

    def observe(self, items: list[ExplainItem], answers: list[dict | RequestError]) -> None:
        """Move each method's rate towards the one measured on answered ``items`` (their answers'
        ``elapsed_ms`` is the time of the method's whole group, ``tokens_a``/``tokens_b`` the lengths)."""
        measured: dict[str, tuple[float, float]] = {}  # method -> (work, seconds)
        for item, answer in zip(items, answers):
            if not isinstance(answer, dict) or item.method not in self.seconds_per_unit:
                continue
            units = work(self.encoder, item, (len(answer["tokens_a"]), len(answer["tokens_b"])))
            total, _ = measured.get(item.method, (0.0, 0.0))
            measured[item.method] = (total + units, answer["elapsed_ms"] / 1000.0)
        for method, (units, seconds) in measured.items():
            if units > 0 and seconds > 0:
                rate = seconds / units
                self.seconds_per_unit[method] += OBSERVED_WEIGHT * (rate - self.seconds_per_unit[method])

    def calibrate(self, repeats: int = 2) -> dict[str, float]:
        """Time each method once on a fixed pair (best of ``repeats``): seconds per unit of ``work``.

        Small workloads carry a larger share of fixed overhead, so the rate errs on the slow
        side: an estimate refuses early rather than late.
        """
        lengths = tuple(self.encoder.tokenize(list(CALIBRATION_PAIR)).lengths)
        for method in METHODS:
            if method not in self.settings.time_budget_s:
                continue
            options = {"layer": max(0, self.encoder.num_layers - 2), "steps": 4} if method == "ij" else {}
            item = ExplainItem(text_a=CALIBRATION_PAIR[0], text_b=CALIBRATION_PAIR[1], method=method,
                               normalization="none", pairwise=False, **options)
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                explain_items(self.encoder, [item], self.settings)
                best = min(best, time.perf_counter() - start)
            self.seconds_per_unit[method] = best / work(self.encoder, item, lengths)  # type: ignore[arg-type]
        return self.seconds_per_unit


def text_fields(item: Item) -> list[tuple[str, str]]:
    """(field name, text) of every text of ``item``."""
    if isinstance(item, RankItem):
        return [("query", item.query), *((f"candidates.{i}", c) for i, c in enumerate(item.candidates))]
    return [("text_a", item.text_a), ("text_b", item.text_b)]


def content_refusal(encoder: Encoder, lengths: list[tuple[str, int]]) -> RequestError | None:
    """The refusal of an item one of whose texts (field name, token count) has only special tokens."""
    specials = len(encoder.reference_ids(0))
    for name, length in lengths:
        if length <= specials:
            return RequestError(f"{name}: has no tokens but the special ones (only zero-width, control or "
                                "combining characters)", name)
    return None
