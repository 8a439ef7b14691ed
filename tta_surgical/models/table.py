"""`BlockTable`: a model's blocks (and units) with their parameters and counts, iterable and printable.

What `tta_surgical.blocks(model)` returns and what `tta-surgical blocks MODEL` prints:

    table = tta_surgical.blocks(model)
    list(table)                 # ['input', 'block1', ..., 'head'] in model order
    table["block1"]             # [(name, Parameter), ...] of that block (a unit name such as 'block1.0' works too)
    table.numel("block1")       # its parameter count
    print(table)                # block | tensors | params | % | prefixes
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from .blocks import block_map, block_spec, block_spec_source, unit_map

__all__ = ["BlockRow", "BlockTable"]


@dataclass(frozen=True)
class BlockRow:
    """One block or unit: its name, the name prefixes that define it, and its `(name, Parameter)` pairs."""

    name: str
    prefixes: tuple[str, ...]
    params: tuple[tuple[str, nn.Parameter], ...]

    @property
    def numel(self) -> int:
        return sum(p.numel() for _, p in self.params)


class BlockTable:
    """The block map of one model with its parameters: iterates over block names in model order.

    `table[name]` / `table.params(name)` give a block's (or unit's) `(name, Parameter)` pairs in model order;
    `units(block)` the unit names inside a block; `source` says where the map came from (`given`,
    `built-in`, `built-in (registered)`, `inferred (...)`). Built from the model's current map (validated:
    every parameter in exactly one block and one unit).
    """

    def __init__(self, model: nn.Module) -> None:
        spec = block_spec(model)
        named = dict(model.named_parameters())
        prefixes = dict(spec.units) | dict(spec.blocks)

        def rows(mapping: dict[str, list[str]]) -> dict[str, BlockRow]:
            return {
                g: BlockRow(g, tuple(prefixes[g]), tuple((n, named[n]) for n in names)) for g, names in mapping.items()
            }

        self._blocks = rows(block_map(model))
        self._units = rows(unit_map(model))
        self.source = block_spec_source(model)
        self.total = sum(p.numel() for p in named.values())
        self.tensors = len(named)

    # ---------------------------------------------------------------------------------------- mapping protocol

    def __iter__(self) -> Iterator[str]:
        return iter(self._blocks)

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, name: object) -> bool:
        return name in self._blocks or name in self._units

    def __getitem__(self, name: str) -> list[tuple[str, nn.Parameter]]:
        return self.params(name)

    def _row(self, name: str) -> BlockRow:
        row = self._blocks.get(name) or self._units.get(name)
        if row is None:
            raise KeyError(f"unknown block {name!r}; valid: {', '.join(self.names)} (units: {', '.join(self._units)})")
        return row

    def params(self, name: str) -> list[tuple[str, nn.Parameter]]:
        """The `(name, Parameter)` pairs of block or unit `name`, in model order."""
        return list(self._row(name).params)

    def numel(self, name: str) -> int:
        """The number of parameter elements in block or unit `name`."""
        return self._row(name).numel

    def prefixes(self, name: str) -> tuple[str, ...]:
        """The dotted name prefixes that define block or unit `name`."""
        return self._row(name).prefixes

    @property
    def names(self) -> list[str]:
        """Block names in model order: `input`, `block1`, ..., `head`."""
        return list(self._blocks)

    def units(self, block: str | None = None) -> list[str]:
        """Unit names in model order (`input`, `block1.0`, ..., `head`), or those inside `block`."""
        if block is None:
            return list(self._units)
        self._row(block)
        return [u for u in self._units if u != block and u.split(".")[0] == block]

    def counts(self) -> dict[str, int]:
        """`{block: number of parameter elements}` in model order."""
        return {name: row.numel for name, row in self._blocks.items()}

    # ---------------------------------------------------------------------------------------- printing

    def format(self, units: bool = False) -> str:
        """The table as text: block, tensors, params, % of the model, prefixes (units indented when asked)."""
        rows = [("block", "tensors", "params", "%", "prefixes")]

        def add(label: str, row: BlockRow) -> None:
            share = 100 * row.numel / self.total if self.total else 0.0
            rows.append((label, str(len(row.params)), f"{row.numel:,}", f"{share:.2f}", ", ".join(row.prefixes)))

        for block, row in self._blocks.items():
            add(block, row)
            if units:
                for unit in self.units(block):
                    add("  " + unit, self._units[unit])
        rows.append(("total", str(self.tensors), f"{self.total:,}", "100.00", ""))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        return "\n".join(
            f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]:>{widths[3]}}  {r[4]}".rstrip()
            for r in rows
        )

    def __str__(self) -> str:
        return self.format()

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}={c:,}" for n, c in self.counts().items())
        return f"BlockTable({parts}; map {self.source})"
