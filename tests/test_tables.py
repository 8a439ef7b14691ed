"""The one table/format module (`tta_surgical.tables`): cells, alignment, the bold best value, mean / sd / s.e."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tta_surgical.tables import (
    MISSING,
    best_value,
    bold_best,
    escape,
    fmt,
    fmt_mean_se,
    markdown_table,
    mean_sd,
    standard_error,
)


def test_fmt_numbers_and_missing_values():
    assert fmt(1.23456) == "1.23" and fmt(1.23456, 0) == "1" and fmt(2.5, 3) == "2.500"
    assert fmt(np.float32(0.5)) == "0.50" and fmt(np.float64(1 / 3), 1) == "0.3"  # numpy floats are numbers too
    assert fmt(7) == "7" and fmt(np.int64(7)) == "7" and fmt(True) == "True" and fmt("cpu") == "cpu"
    for missing in (None, math.nan, math.inf, -math.inf):
        assert fmt(missing) == MISSING == "–"


def test_fmt_mean_se():
    assert fmt_mean_se(71.25, 1.04) == "71.2 ± 1.0"  # round-half-even of the float, as f-strings do
    assert fmt_mean_se(71.25, None) == "71.2" and fmt_mean_se(None, 1.0) == MISSING
    assert fmt_mean_se(3.14159, 0.001, digits=3) == "3.142 ± 0.001"


def test_markdown_table_alignment_and_shape():
    table = markdown_table(["name", "a", "b", "note"], [["x", "1", "2", ""], ["y", "3", "4", "!"]], left=1, right=2)
    assert table.splitlines() == [
        "| name | a | b | note |",
        "| --- | ---: | ---: | --- |",
        "| x | 1 | 2 |  |",
        "| y | 3 | 4 | ! |",
    ]
    # default: the first column left-aligned (labels), the rest right-aligned (numbers); no trailing newline
    assert markdown_table(["k", "v"], [["a", "1"]]).splitlines()[1] == "| --- | ---: |"
    assert not markdown_table(["k"], []).endswith("\n")
    assert markdown_table(["a", "b", "c"], [], left=2).splitlines()[1] == "| --- | --- | ---: |"
    assert escape("a|b") == "a\\|b"


def test_bold_best_needs_two_finite_values_and_bolds_ties():
    assert best_value([3.0, 1.0, None, math.nan]) == 1.0 and best_value([3.0, 1.0], lower=False) == 3.0
    assert best_value([2.0, None, math.nan]) is None  # a single value is not a comparison
    texts = ["3.00", "1.00", "1.00", "–"]
    assert bold_best([3.0, 1.0, 1.0, None], texts) == ["3.00", "**1.00**", "**1.00**", "–"]
    assert bold_best([3.0, 1.0], ["a", "b"], lower=False) == ["**a**", "b"]
    assert bold_best([5.0, None], ["5", "–"]) == ["5", "–"]


def test_mean_sd_and_standard_error():
    mean, sd = mean_sd([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and sd == pytest.approx(np.std([1, 2, 3, 4], ddof=1), rel=1e-15)
    assert mean_sd([5.0]) == (5.0, None)
    assert standard_error([1.0, None, 2.0, 3.0, 4.0]) == pytest.approx(sd / 2, rel=1e-15)  # None is left out
    assert standard_error([1.0]) is None and standard_error([None, None]) is None
    with pytest.raises(ZeroDivisionError):
        mean_sd([])
