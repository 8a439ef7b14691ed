"""The partition primitives of block maps: `BlockSpec` (ordered groups of dotted name prefixes) and the check that
groups put every parameter of a model in exactly one group (whole-component prefix matching).

The lowest layer of `tta_surgical.models`: the hand-written maps (`blocks`), the inferred ones (`infer`) and the
user's maps given as data (`overrides`) all build on it, and it imports none of them.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = ["VIT_GROUPS", "BlockSpec", "Groups", "check_partition", "matches", "partition"]

# A ViT's encoder layers are grouped into this many blocks (hand-written torchvision map and inferred maps alike).
VIT_GROUPS = 4

Groups = tuple[tuple[str, tuple[str, ...]], ...]


@dataclass(frozen=True)
class BlockSpec:
    """The block map of one architecture: ordered (name, prefixes) pairs at two granularities.

    `blocks` must start with `input` and end with `head`; `units` refines the middle blocks into
    residual units named `blockK.i` (and repeats `input` and `head` unchanged), so both lists
    partition the parameters.
    """

    blocks: Groups
    units: Groups

    def __post_init__(self) -> None:
        for kind, groups in (("blocks", self.blocks), ("units", self.units)):
            names = [n for n, _ in groups]
            if len(set(names)) != len(names):
                raise ValueError(f"BlockSpec {kind} has duplicate names: {names}")
            if not names or names[0] != "input" or names[-1] != "head":
                raise ValueError(f"BlockSpec {kind} must run from 'input' to 'head', got {names}")
            for name, prefixes in groups:
                if not prefixes or any(not p or p.endswith(".") or p.startswith(".") for p in prefixes):
                    raise ValueError(
                        f"BlockSpec {kind}[{name!r}] needs dotted prefixes without edge dots, got {prefixes}"
                    )
        block_set = {n for n, _ in self.blocks}
        for name, _ in self.units:
            if name.split(".")[0] not in block_set:
                raise ValueError(f"unit {name!r} does not belong to any block of {sorted(block_set)}")

    def prefixed(self, prefix: str) -> BlockSpec:
        """The same spec with `prefix` in front of every parameter prefix (for wrapped models)."""
        if not prefix:
            return self
        add = lambda groups: tuple((n, tuple(prefix + p for p in ps)) for n, ps in groups)  # noqa: E731
        return BlockSpec(add(self.blocks), add(self.units))


def matches(name: str, prefix: str) -> bool:
    """Whole-component prefix match: `layer1` matches `layer1` and `layer1.x`, never `layer10.x`."""
    return name == prefix or name.startswith(prefix + ".")


def _assign(model: nn.Module, groups: Groups) -> tuple[dict[str, list[str]], list[str], list[tuple[str, list[str]]]]:
    """Each parameter's group: `(groups -> names, names in no group, [(name, groups)] for names in several)`.

    Whole-component matching by lookup: a parameter `a.b.c` can only match the prefixes `a`, `a.b`, `a.b.c`, so
    each of those is looked up instead of testing every prefix of every group (ViT/EfficientNet maps have
    hundreds of tensors and dozens of units).
    """
    out: dict[str, list[str]] = {name: [] for name, _ in groups}
    rank = {name: i for i, (name, _) in enumerate(groups)}
    owners: dict[str, list[str]] = {}
    for name, prefixes in groups:
        for prefix in prefixes:
            owners.setdefault(prefix, []).append(name)
    orphans: list[str] = []
    several: list[tuple[str, list[str]]] = []
    for pname, _ in model.named_parameters():
        parts = pname.split(".")
        found = {g for i in range(1, len(parts) + 1) for g in owners.get(".".join(parts[:i]), ())}
        hits = sorted(found, key=rank.__getitem__)
        if not hits:
            orphans.append(pname)
        elif len(hits) > 1:
            several.append((pname, hits))
        else:
            out[hits[0]].append(pname)
    return out, orphans, several


def check_partition(model: nn.Module, groups: Groups, what: str) -> str | None:
    """None when `groups` put every parameter of `model` in exactly one group and leave no group empty;
    otherwise what is wrong (parameters in no group: the first few and the count)."""
    return _problem(model, *_assign(model, groups), what)


def _problem(
    model: nn.Module, out: dict[str, list[str]], orphans: list[str], several: list[tuple[str, list[str]]], what: str
) -> str | None:
    cls = type(model).__qualname__
    if orphans:
        more = f" (+{len(orphans) - 5} more)" if len(orphans) > 5 else ""
        shown = ", ".join(repr(n) for n in orphans[:5])
        return (
            f"parameter(s) {shown}{more} of {cls} are in no {what} ({len(orphans)} in all): the block spec is "
            f"incomplete ({what}s: {', '.join(out)})"
        )
    if several:
        pname, hits = several[0]
        return f"parameter {pname!r} of {cls} is in several {what}s: {hits}"
    empty = [g for g, names in out.items() if not names]
    if empty:
        return f"{what}(s) {empty} of {cls} match no parameter: the block spec is stale"
    return None


def partition(model: nn.Module, groups: Groups, what: str) -> dict[str, list[str]]:
    out, orphans, several = _assign(model, groups)
    problem = _problem(model, out, orphans, several, what)
    if problem:
        raise ValueError(problem)
    return out
