"""Domain errors of the core. Each names the field (option or text) at fault.

The core never speaks HTTP: the serving layer maps these classes to statuses in one place
(``serving.protocol.RequestError.of``).
"""
from __future__ import annotations


class ExplanationError(ValueError):
    """A pair or an option the core cannot serve; ``field`` names what is at fault."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidOption(ExplanationError):
    """An option outside what the method or the model allows."""


class NoContent(ExplanationError):
    """A text with nothing but special tokens: its own reference, with no similarity to explain."""


class OverBudget(ExplanationError):
    """A request whose estimated memory or time exceeds its budget."""
