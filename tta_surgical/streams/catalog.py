"""The registry of stream sources (`stream.source` names -> `Source` classes), apart from the classes themselves.

The stream spec checks and resolves `stream.source` against it (valid names, each source's class attributes) while
the source classes (`sources.py`) are built on the spec and the plan: keeping the registry here keeps that
dependency one-way. `tta_surgical.streams` imports `sources`, so every built-in source is registered before any
spec is checked.
"""

from __future__ import annotations

from typing import Any

from ..registry import Registry

__all__ = ["SOURCES", "register_source", "source_class"]

# name -> Source subclass (typed loosely here: the Source base class lives above, in `sources.py`).
SOURCES: Registry[Any] = Registry("stream source")


def register_source(cls: Any) -> Any:
    """Class decorator: register a `Source` subclass under `cls.name` (a duplicate name raises)."""
    SOURCES.register(cls.name, cls)
    return cls


def source_class(name: str) -> Any:
    """The registered source class `name` (an unknown name raises, listing the valid ones)."""
    return SOURCES.get(name)
