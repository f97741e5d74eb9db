"""Domain errors of the core. Each names the field (option or text) at fault and says what is
wrong with it; the message is built from the two, once (``message``).

The core never speaks HTTP: the serving layer maps these classes to statuses in one place
(``serving.protocol.RequestError.of``).
"""
from __future__ import annotations


class ExplanationError(ValueError):
    """A pair or an option the core cannot serve: ``field`` is at fault, ``detail`` says how."""

    def __init__(self, field: str, detail: str):
        super().__init__(field, detail)
        self.field = field
        self.detail = detail

    @property
    def message(self) -> str:
        return f"{self.field}: {self.detail}"

    def __str__(self) -> str:
        return self.message


class InvalidOption(ExplanationError):
    """An option outside what the method or the model allows."""


class NoContent(ExplanationError):
    """A text with nothing but special tokens: its own reference, with no similarity to explain."""


class OverBudget(ExplanationError):
    """A request whose estimated memory or time exceeds its budget."""
