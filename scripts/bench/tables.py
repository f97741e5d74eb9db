"""The benchmarks' markdown tables."""
from __future__ import annotations


def markdown(columns: list[str], rows: list[list[str]], align: str = "") -> str:
    """A markdown table of already formatted cells; ``align`` has one letter per column, l or r
    (right, the default for numbers)."""
    align = align or "r" * len(columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
