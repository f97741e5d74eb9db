"""How deep the property runs and load loops go: a default that fits the suite's time budget,
and ``SIAMESE_DEEP=1`` for deeper runs (docs/tests.md)."""
from __future__ import annotations

import os

DEEP = os.environ.get("SIAMESE_DEEP", "") not in ("", "0")


def repeats(default: int, deep: int) -> int:
    """The number of iterations of a loop: ``default``, or ``deep`` under SIAMESE_DEEP=1."""
    return deep if DEEP else default
