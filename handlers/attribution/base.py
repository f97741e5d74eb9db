"""What every explanation method shares: one call shape, typed results, one completeness delta.

A method is a class over an ``Encoder``:

    method = LRP(encoder)                         # one-time set-up (hooks) happens here
    results = method.attribute(pairs, LRP.Options(pairwise=True))

``attribute`` explains a list of (text_a, text_b) pairs with one set of options (the method's
own, a pydantic model declared on the class), computing them together, and returns one
``Explanation`` per pair. ``Explanation.delta`` is the completeness error |Σ relevance − score|
for methods that promise completeness (ij, lrp), ``None`` otherwise (gae).

``memory`` and ``work`` state what one pair would cost in the units of ``cost.CostModel``; the
serving layer's admission refuses from them before anything runs, and ``check`` raises
``OverBudget`` for an in-process caller.
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Sequence

import torch
from pydantic import BaseModel, ConfigDict

from ..encoder import Encoder
from ..errors import OverBudget

Pair = tuple[str, str]
Normalization = Literal["none", "min-max", "l2"]
TEXT_FIELDS = ("text_a", "text_b")
MEMORY_BUDGET_MB = 1024  # the default peak extra memory of one call


class MethodOptions(BaseModel):
    """A method's own options, with their checks; every field has the default an archive starts
    from. Those in ``LIMITS`` bound a request's cost: an archive sets them, a request may not."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    LIMITS: ClassVar[frozenset[str]] = frozenset({"max_steps", "memory_budget_mb"})


@dataclass
class Explanation:
    """The explanation of one pair.

    ``relevance_a`` / ``relevance_b``: one value per token (gae, lrp); ``attributions``: a
    len(tokens_a) × len(tokens_b) matrix (ij, lrp pairwise); ``delta``: the completeness error;
    ``extras``: the method's own answer fields (ij's layer and quadrature, lrp's bias shares);
    ``details``: the method's own diagnostics, not in the answer (ij's adaptive panels per side).
    Served answers also say whether they came from the serving layer's cache (``cached``; None
    in-process), and how many cached explanations storing this one evicted (``evictions``, for
    the metrics, not in the answer).
    """

    method: str
    score: float
    tokens_a: list[str]
    tokens_b: list[str]
    truncated: list[str] = field(default_factory=list)
    delta: float | None = None
    relevance_a: torch.Tensor | None = None
    relevance_b: torch.Tensor | None = None
    attributions: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    elapsed_ms: float = 0.0
    cached: bool | None = None
    evictions: int = 0

    @property
    def relative_delta(self) -> float | None:
        """delta / |score| (delta itself where the score is 0)."""
        if self.delta is None:
            return None
        return self.delta / abs(self.score) if self.score else self.delta

    def to_answer(self) -> dict[str, Any]:
        """The JSON object of the HTTP answer (the contract of docs/http.md)."""
        answer: dict[str, Any] = {"method": self.method, "score": self.score}
        for name in ("relevance_a", "relevance_b", "attributions"):
            value = getattr(self, name)
            if value is not None:
                answer[name] = value.tolist()
        answer.update(self.extras)
        answer.update(tokens_a=self.tokens_a, tokens_b=self.tokens_b, truncated=self.truncated,
                      elapsed_ms=self.elapsed_ms)
        if self.cached is not None:
            answer["cached"] = self.cached
        return answer


class Method(ABC):
    """One explanation method over one encoder."""

    name: ClassVar[str]
    Options: ClassVar[type[MethodOptions]]

    def __init__(self, encoder: Encoder):
        self.encoder = encoder

    def attribute(self, pairs: Sequence[Pair], options: MethodOptions | None = None) -> list[Explanation]:
        """Explain every pair with the same options; the pairs are computed together."""
        options = options if options is not None else self.Options()
        if not isinstance(options, self.Options):
            raise TypeError(f"{self.name} takes {self.Options.__name__}, not {type(options).__name__}")
        if not pairs:
            return []
        start = time.perf_counter()
        results = self._attribute(list(pairs), options)
        elapsed_ms = (time.perf_counter() - start) * 1000.0
        for result in results:
            result.elapsed_ms = elapsed_ms
        return results

    @abstractmethod
    def _attribute(self, pairs: list[Pair], options: Any) -> list[Explanation]: ...

    def memory(self, lengths: tuple[int, int], options: Any) -> list[tuple[str, int]]:
        """Per text field whose size drives it, the bytes one pass of this pair needs at once
        (what cannot be chunked). Empty when the method chunks everything."""
        return []

    @abstractmethod
    def work(self, lengths: tuple[int, int], options: Any) -> float:
        """The pair's work in block multiply-adds (``CostModel.block_macs`` units)."""

    def work_done(self, result: Explanation, options: Any) -> float:
        """The work one computed explanation took: ``work`` of its lengths (a method whose work
        depends on the pair counts what it did)."""
        return self.work((len(result.tokens_a), len(result.tokens_b)), options)

    def observe(self, options: Any, results: list[Explanation]) -> None:
        """Learn from computed answers what the next estimates need (nothing by default)."""

    #: the option that scales ``work`` up, named when a request is refused for its time
    work_option: ClassVar[str | None] = None

    def work_field(self, options: Any) -> str | None:
        """The option to name when the pair's work is refused (None: the longer text)."""
        return self.work_option if self.work_option and getattr(options, self.work_option) else None

    @classmethod
    def completed(cls, given: dict[str, Any]) -> dict[str, Any]:
        """The options a request gave, with what they imply (before the archive's defaults)."""
        return given

    def check(self, lengths: tuple[int, int], options: Any, budget_mb: int) -> None:
        """Raise ``OverBudget`` when the pair's memory exceeds ``budget_mb``."""
        for field_name, need in self.memory(lengths, options):
            if need > budget_mb * 2**20:
                side = TEXT_FIELDS.index(field_name)
                raise OverBudget(
                    field_name,
                    f"{self.name} over {lengths[side]} tokens needs about {need / 2**20:.0f} MB at once; "
                    f"the memory budget is {budget_mb} MB (a shorter text fits{self._budget_hint})",
                )

    _budget_hint = ""
