"""Markdown tables and number formatting: the one place every table of this package formats its figures.

Used by the run and compare tables (`render`), the finetune summary (`finetune.summary`), the merged sweep
(`sweep.merge`), the latency bench (`bench.results`) and the studies (`studies.render`, `benchmarks/studies`).
Conventions: a missing or non-finite number is an en dash (`MISSING`), floats get a fixed number of decimals, the
best value of a compared row is bold only when at least two values compete, and a spread is the sample standard
deviation (n - 1).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = [
    "MISSING",
    "best_value",
    "bold_best",
    "escape",
    "fmt",
    "fmt_mean_se",
    "markdown_table",
    "mean_sd",
    "standard_error",
]

MISSING = "–"  # an en dash: reads as "no value" and cannot be mistaken for a minus sign


def fmt(value: Any, digits: int = 2) -> str:
    """One table cell: a float with `digits` decimals; None, NaN and infinities as `MISSING`; anything else as str."""
    if value is None:
        return MISSING
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        value = float(value)  # numpy floats too
        return f"{value:.{digits}f}" if math.isfinite(value) else MISSING
    return str(value)


def fmt_mean_se(mean: float | None, se: float | None, digits: int = 1) -> str:
    """`mean ± se` (just the mean when there is no standard error, `MISSING` without a mean)."""
    if mean is None:
        return MISSING
    return f"{fmt(mean, digits)} ± {fmt(se, digits)}" if se is not None else fmt(mean, digits)


def escape(text: str) -> str:
    """Text safe inside a table cell: a `|` would end the cell."""
    return text.replace("|", "\\|")


def markdown_table(
    header: Sequence[str], rows: Iterable[Sequence[str]], *, left: int = 1, right: int | None = None
) -> str:
    """A GitHub Markdown table (no trailing newline).

    The first `left` columns are left-aligned (labels), the next `right` (default: all the rest) right-aligned
    (numbers), any after those left-aligned again (notes).
    """
    n_right = len(header) - left if right is None else right
    sep = ["---:" if left <= i < left + n_right else "---" for i in range(len(header))]
    return "\n".join("| " + " | ".join(r) + " |" for r in [list(header), sep, *rows])


def best_value(values: Iterable[float | None], *, lower: bool = True) -> float | None:
    """The best finite value (the lowest, or the highest with `lower=False`); None when fewer than two values
    are finite, since a single value is not a comparison."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if len(finite) < 2:
        return None
    return min(finite) if lower else max(finite)


def bold_best(values: Sequence[float | None], texts: Sequence[str], *, lower: bool = True) -> list[str]:
    """`texts` (the formatted `values`) with the best value's text in bold (`best_value`; ties all bold)."""
    best = best_value(values, lower=lower)
    return [f"**{t}**" if best is not None and v == best else t for v, t in zip(values, texts)]


def mean_sd(values: Sequence[float]) -> tuple[float, float | None]:
    """The mean and the sample standard deviation (n - 1) of a non-empty sequence; the sd is None for one value."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def standard_error(values: Iterable[float | None]) -> float | None:
    """The standard error of the mean (sample sd / sqrt(n)) of the values that are not None; None for fewer than
    two."""
    kept = [float(v) for v in values if v is not None]
    if len(kept) < 2:
        return None
    _, sd = mean_sd(kept)
    return sd / math.sqrt(len(kept))
