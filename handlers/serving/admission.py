"""Refusals before any work: what one request item would cost, against the archive's budgets.

The handler admits every parsed item (``Admission.check_batch``) before computing anything: an
admitted explanation is planned once (``attribution.plan``: its options resolved, its texts
tokenized), a refusal is a ``RequestError`` naming the field, for that request only.

- **Content**. A text that tokenizes to the special tokens alone (zero-width, control or
  combining characters only) is its own reference (``inference.no_content``). Refused with 400:
  explanations here, predictions where their one tokenization of the batch happens
  (``predictions.predict_items``).
- **Memory** (``explanation.memory_budget_mb``), checked first: what the method must hold at
  once (``Method.memory``, from the one cost model; ij chunks its path nodes, so one node of
  each side must fit). Refused with 413.
- **Time** (``explanation.time_budget_s``, per method). TorchServe has one ``responseTimeout``
  per model, and reaching it kills the worker with every request of its batch. So each method
  has its own budget, checked up front: a fixed overhead per call plus the item's work
  (``Method.work``, block multiply-adds) times the seconds per unit, both measured for that
  method on this worker in ``initialize`` (``calibrate``, on a short and a longer pair: the
  overhead, which dominates short texts, is not charged by the multiply-adds of long ones, and
  the rate is measured where the work dominates). Refused with 413 naming the option that scales the work (ij: ``steps``;
  lrp: ``pairwise``), else the longer text. ``responseTimeout`` stays the hard stop; every
  budget is below it (``settings.ModelConfig``). The rate then follows what the worker
  measures (``observe``, after every batch of explanations), so that a calibration taken while
  other workers were starting, or a machine whose load changes, does not fix the estimate for
  the worker's life.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..attribution import METHODS, Explanation, Plan, method_of, options_for, plan
from ..encoder import Encoder
from ..errors import ExplanationError, OverBudget
from .protocol import ExplainItem, Item, RequestError
from .settings import TORCHSERVE_RESPONSE_TIMEOUT_S, HandlerSettings

OBSERVED_WEIGHT = 0.25  # share of the latest measured rate in seconds_per_unit (a moving average)
CALIBRATION_PAIR = (
    "A man is playing an acoustic guitar on a small stage in front of a quiet audience tonight.",
    "Someone performs a song with a guitar for the people who came to listen.",
)
#: a pair of a few tokens: with a longer pair it separates a call's fixed overhead from its rate
SHORT_CALIBRATION_PAIR = ("A dog runs.", "A cat sleeps.")
#: about 70 tokens a side: the rate of gae and lrp is measured where the work, not the overhead,
#: dominates (ij, whose cost grows with the square of the tokens, is timed on ``CALIBRATION_PAIR``)
LONG_CALIBRATION_PAIR = (
    "The evening concert began late because the band's van had broken down on the motorway, so the "
    "guitarist borrowed an old acoustic guitar from the café owner, tuned it on the small stage while "
    "the audience waited quietly, and then played for nearly two hours, mixing folk songs from his "
    "childhood with new pieces that he had written during the long winter spent in a cabin by the lake.",
    "A musician who arrived late to his own show played a borrowed instrument for a patient crowd, "
    "performing traditional tunes and his own recent compositions; people who came to listen said "
    "afterwards that the unexpected change of guitar made the whole evening feel more personal and "
    "relaxed than the polished performances they had heard from the same band in larger halls before.",
)
CALIBRATION_PAIRS = {"ij": (SHORT_CALIBRATION_PAIR, CALIBRATION_PAIR)}
CALIBRATION_OPTIONS = {"ij": {"steps": 4}}  # and the last layer but one, ij's default


@dataclass
class Admission:
    """The budgets of one worker: ``seconds_per_unit`` per method comes from ``calibrate``.

    ``response_timeout_s`` is the model's TorchServe ``responseTimeout``: the explanations
    admitted into one batch together get half of it (an estimate may be off by that much); the
    rest of the batch is answered 503, to retry.
    """

    encoder: Encoder
    settings: HandlerSettings
    response_timeout_s: float = TORCHSERVE_RESPONSE_TIMEOUT_S
    seconds_per_unit: dict[str, float] = field(default_factory=dict)
    overhead_s: dict[str, float] = field(default_factory=dict)  # per call, whatever its work

    def check_batch(self, items: list[Item]) -> list[Plan | RequestError | None]:
        """Per item of one batch: its refusal, else its plan (an explanation) or None (a prediction)."""
        admitted: list[Plan | RequestError | None] = []
        spent = 0.0
        for item in items:
            try:
                planned, seconds = self.check(item)
                if seconds and spent + seconds > self.response_timeout_s / 2:
                    raise RequestError("method", f"the explanations of this batch already take about {spent:.0f} s "
                                       f"of the {self.response_timeout_s:g} s response timeout; retry", 503)
                spent += seconds
                admitted.append(planned)
            except RequestError as error:
                admitted.append(error)
        return admitted

    def check(self, item: Item) -> tuple[Plan | None, float]:
        """An explanation's plan and its estimated seconds (0 when not measured); RequestError
        when it cannot be served within the archive's budgets. A prediction: (None, 0)."""
        if not isinstance(item, ExplainItem):
            return None, 0.0
        try:
            method = item.method_name(self.settings)
            planned = plan(self.encoder, (item.text_a, item.text_b), method, item.options(self.settings),
                           self.settings.explanation.memory_budget_mb)
            return planned, self.estimate(method, planned.options, planned.lengths)
        except ExplanationError as error:
            raise RequestError.of(error) from None

    def estimate(self, method: str, options, lengths: tuple[int, int]) -> float:
        """The seconds one pair would take (0 when not calibrated): a call's overhead plus its
        work at the method's rate. OverBudget when its work alone is past the budget: a refusal
        is about what the request asks, and the overhead, per call and shared by the batch,
        is no reason to refuse the smallest requests (a calibration taken while the workers
        start together inflates it until the first calls correct it, ``observe``)."""
        instance = method_of(self.encoder, method)
        budget = self.settings.explanation.time_budget_s.get(method)
        rate = self.seconds_per_unit.get(method)
        work_s = instance.work(lengths, options) * rate if rate is not None else 0.0
        seconds = self.overhead_s.get(method, 0.0) + work_s if rate is not None else 0.0
        if budget is not None and work_s > budget:
            name = instance.work_field(options) or ("text_a" if lengths[0] >= lengths[1] else "text_b")
            raise OverBudget(name, f"{method} on {lengths[0]}+{lengths[1]} tokens would take about "
                                   f"{seconds:.0f} s here; the {method} time budget is {budget:g} s")
        return seconds

    def observe(self, method: str, options, results: list[Explanation]) -> None:
        """Move the method's line towards the time measured on ``results`` of one call (their
        ``elapsed_ms`` is the time of the whole call): its overhead and rate are both scaled by
        the measured / estimated ratio (the estimate of the work the call did: adaptive ij's
        nodes as taken), by the moving average's weight, so that the line keeps the shape
        calibration found and follows the machine's speed. The method learns from the answers
        too (adaptive ij: the nodes its requests take at each layer and tolerance)."""
        if method not in self.seconds_per_unit or not results:
            return
        instance = method_of(self.encoder, method)
        instance.observe(options, results)
        units = sum(instance.work_done(r, options) for r in results)
        estimated = self.overhead_s.get(method, 0.0) + units * self.seconds_per_unit[method]
        seconds = results[0].elapsed_ms / 1000.0
        if estimated > 0 and seconds > 0:
            scale = 1.0 + OBSERVED_WEIGHT * (seconds / estimated - 1.0)
            self.seconds_per_unit[method] *= scale
            if method in self.overhead_s:
                self.overhead_s[method] *= scale

    def calibrate(self, repeats: int = 2) -> dict[str, float]:
        """Time each method on a short and a longer fixed pair (best of ``repeats``; the longer one
        about 70 tokens a side, ij's about 20): the line through the two gives the seconds per
        unit of ``work`` and the overhead of a call.

        When the two do not separate (a noisy machine: the short pair timed as slow as the
        longer one), the rate is the longer pair's time over its work, with no overhead: an
        estimate then errs on the slow side and refuses early rather than late.
        """
        for method in METHODS:
            if method not in self.settings.explanation.time_budget_s:
                continue
            instance = method_of(self.encoder, method)
            options = options_for(method, CALIBRATION_OPTIONS.get(method, {}))
            points = []
            for pair in CALIBRATION_PAIRS.get(method, (SHORT_CALIBRATION_PAIR, LONG_CALIBRATION_PAIR)):
                lengths = tuple(self.encoder.tokenize(list(pair)).lengths)
                best = float("inf")
                for _ in range(repeats):
                    start = time.perf_counter()
                    instance.attribute([pair], options)
                    best = min(best, time.perf_counter() - start)
                points.append((instance.work(lengths, options), best))  # type: ignore[arg-type]
            (short_work, short_s), (work, seconds) = points
            rate = (seconds - short_s) / (work - short_work) if work > short_work else 0.0
            overhead = short_s - rate * short_work
            if rate <= 0 or overhead < 0:
                rate, overhead = seconds / work, 0.0
            self.seconds_per_unit[method], self.overhead_s[method] = rate, overhead
        return self.seconds_per_unit
