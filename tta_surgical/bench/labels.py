"""Method labels: the names `--methods` takes, for the latency grid (`tta-surgical bench`) and the stream
timing (`benchmarks/studies/stream_timing.py`).

A label is one of
- the name of a method registered in `tta_surgical.methods.METHODS` (`source`, `norm`, `tent`, `surgical`, and
  any method registered later, with no change here): that method with its default settings;
- `<method>:<block>[+<block>...]` for a registered method that adapts (`METHODS.get(name).adapts`): the method
  on every parameter (kind all) of the named blocks, e.g. `surgical:block1`, `surgical:block1+block2`,
  `surgical:block1.0` (block names as in `tta-surgical blocks MODEL`); `<method>:auto` is the method with
  `blocks: auto` (the runtime's label-free choice, `methods.selection`);
- one of the bench's own pseudo-methods: `inference` (the plain model forward under `inference_mode`, the
  baseline of every `ratio_to_inference`), `reference_tent` (`PlainTent`, Tent written as a plain loop; the
  package's `tent` is compared with it), `autorgn` (surgical entropy minimisation of every block with online
  auto-RGN per-tensor learning rates);
- any label of a registered method followed by `@guard` (or `@guard<k>`): that method with the run guard's reference
  forward (`norm` on a frozen copy of the source model, `source` where the model has no BatchNorm) after every k-th
  step (default `runtime.guard_every`), the cost of `runtime.on_collapse` with a reference, e.g. `tent@guard`,
  `surgical:block1@guard4`.

`method_settings` is the one function that turns a label into a method config; the pseudo-methods' definitions
(`REFERENCE_TWIN`, `SURGICAL`) are the only method names written here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from ..config import MethodSettings, RuntimeConfig, method_config
from ..methods import METHODS

INFERENCE = "inference"
REFERENCE = "reference_tent"
AUTORGN = "autorgn"
# The package methods the pseudo-methods and the baselines are defined by: the plain loop re-implements `tent`
# (so the `tent` cell gets `ratio_to_reference`); `autorgn` is `surgical` on every block with auto-RGN weighting.
REFERENCE_TWIN = "tent"
SURGICAL = "surgical"
BLOCK_SEPARATOR = ":"
GUARD_SUFFIX = "@guard"
BLOCK_JOINER = "+"
SURGICAL_BLOCK1 = f"{SURGICAL}{BLOCK_SEPARATOR}block1"  # the paper's headline: every parameter of the first stage


@dataclass(frozen=True)
class MethodSpec:
    """A parsed label: `label` as given, `kind` inference|method|reference, and for kind method its config."""

    label: str
    kind: str
    cfg: MethodSettings | None = None
    guard_every: int = 0  # > 0: the guard's reference forward after every guard_every-th step (`@guard`)

    @property
    def adapts(self) -> bool:
        """Whether a step updates parameters (the plain Tent loop does; registered methods say so themselves)."""
        if self.kind == "reference":
            return True
        return self.cfg is not None and METHODS.get(self.cfg.name).adapts


def method_settings(
    name: str, blocks: tuple[str, ...] | None = None, *, weighting: str | None = None
) -> MethodSettings:
    """The method config a label stands for: `name`'s defaults, with `blocks` adapted in full (kind all) and a
    per-tensor learning-rate `weighting` when given. The one place labels meet the method configs."""
    settings: dict[str, object] = {}
    if blocks is not None:
        settings.update(blocks=tuple(blocks), kind="all")  # a block label adapts every parameter of its blocks
    if weighting is not None:
        settings["weighting"] = weighting
    return method_config(name, **settings)


def _adapting() -> list[str]:
    return [n for n in METHODS.names() if METHODS.get(n).adapts]


def valid_labels() -> str:
    """What a label may be, for error messages and help texts."""
    adapting = _adapting()
    example = f"{adapting[0]}{BLOCK_SEPARATOR}block1" if adapting else "none registered"
    return (
        f"{', '.join((INFERENCE, *registered_labels(), AUTORGN, REFERENCE))}, or "
        f"<method>{BLOCK_SEPARATOR}<block>[{BLOCK_JOINER}<block>...] for a method that adapts "
        f"({', '.join(adapting)}), e.g. {example}"
    )


def parse_method(text: str) -> MethodSpec:
    """Parse a label (see the module docstring); an unknown or invalid one raises `ValueError` saying what is valid."""
    label = text.strip()
    base, at, every = label.partition(GUARD_SUFFIX)
    if at:
        ms = parse_method(base)
        if ms.kind != "method":
            raise ValueError(f"bench method {label!r}: {GUARD_SUFFIX} goes after a registered method, e.g. tent@guard")
        return MethodSpec(label, ms.kind, ms.cfg, _guard_every(label, every))
    if label == INFERENCE:
        return MethodSpec(label, "inference")
    if label == REFERENCE:
        return MethodSpec(label, "reference")
    name, sep, rest = label.partition(BLOCK_SEPARATOR)
    if label == AUTORGN:
        name, blocks, weighting = SURGICAL, ("all",), "auto-rgn"
    elif name in METHODS:
        blocks = _blocks(label, name, rest) if sep else None
        weighting = None
    else:
        raise ValueError(f"unknown bench method {label!r}; valid: {valid_labels()}")
    try:
        return MethodSpec(label, "method", method_settings(name, blocks, weighting=weighting))
    except ValueError as err:  # the config's own check of the method's settings
        raise ValueError(f"bench method {label!r}: {err}") from None


def _guard_every(label: str, text: str) -> int:
    """The check interval of a `@guard[<k>]` label: k, or the run default (`runtime.guard_every`)."""
    if not text:
        return int(RuntimeConfig().guard_every)
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"bench method {label!r}: write {GUARD_SUFFIX} or {GUARD_SUFFIX}<k> with k >= 1 batches")
    return int(text)


def _blocks(label: str, name: str, text: str) -> tuple[str, ...]:
    blocks = tuple(b for b in text.split(BLOCK_JOINER) if b)
    if not blocks:
        raise ValueError(
            f"method {label!r} names no block; write e.g. {name}{BLOCK_SEPARATOR}block1 or "
            f"{name}{BLOCK_SEPARATOR}block1{BLOCK_JOINER}block2"
        )
    if not METHODS.get(name).adapts:
        raise ValueError(
            f"method {label!r}: {name} adapts no parameters, so it takes no blocks; blocks go with a method that "
            f"adapts: {', '.join(_adapting())}"
        )
    return blocks


def registered_labels() -> tuple[str, ...]:
    """Every registered method's name, the ones that adapt nothing first (the cheap baselines lead a table)."""
    return tuple(sorted(METHODS.names(), key=lambda n: METHODS.get(n).adapts))


def baseline_first(labels: Iterable[str], baseline: str) -> tuple[str, ...]:
    """`labels` without duplicates or blanks, `baseline` first (every ratio divides by it; added when missing)."""
    rest = (label.strip() for label in labels)
    return (baseline, *dict.fromkeys(label for label in rest if label and label != baseline))


def split_args(values: Iterable[str] | None) -> tuple[str, ...] | None:
    """Flatten CLI lists that may also be comma-separated (`--methods tent,norm surgical:block1`)."""
    if values is None:
        return None
    return tuple(v.strip() for item in values for v in str(item).split(",") if v.strip())


def safe_label(label: str) -> str:
    """A folder name for a label (`surgical:block1` -> `surgical-block1`)."""
    return re.sub(r"[^A-Za-z0-9_.+-]", "-", label)


# The full latency grid (every registered method, the headline block-1 label, auto-RGN, the plain loop) and the
# quick one.
DEFAULT_METHODS = (INFERENCE, *registered_labels(), SURGICAL_BLOCK1, AUTORGN, REFERENCE)
QUICK_METHODS = (INFERENCE, REFERENCE_TWIN, SURGICAL_BLOCK1, REFERENCE)
