"""Range checks the methods' settings share, so the same constraint reads the same in every method's error.

Each raises `ConfigError` naming `method.<key>`, the valid range and the value; NaN fails every check.
"""

from __future__ import annotations

import math

from ..schema import ConfigError

__all__ = ["check_finite_number", "check_fraction", "check_unit_interval"]


def check_fraction(key: str, value: float, meaning: str) -> None:
    """`value` in (0, 1]; `meaning` says what it is a fraction of (it is part of the error)."""
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise ConfigError(f"method.{key} must lie in (0, 1] ({meaning}), got {value!r}")


def check_unit_interval(key: str, value: float) -> None:
    """`value` in [0, 1] (a momentum or mixing weight)."""
    if not (0.0 <= value <= 1.0):
        raise ConfigError(f"method.{key} must be in [0, 1], got {value!r}")


def check_finite_number(key: str, value: float, *, positive: bool = False, meaning: str = "") -> None:
    """`value` finite and >= 0 (> 0 with `positive`); `meaning`, when given, is added to the error."""
    if not (math.isfinite(value) and (value > 0 if positive else value >= 0)):
        bound = "> 0" if positive else ">= 0"
        note = f" ({meaning})" if meaning else ""
        raise ConfigError(f"method.{key} must be a finite number {bound}{note}, got {value!r}")
