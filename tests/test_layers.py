"""The package's layers, checked over its own source: every import statement of every module of `tta_surgical/`
(those inside functions too, relative ones resolved) and every `importlib.import_module("<literal>")`.

From the bottom up: the runtime's parts (config, methods, models, corruptions, data, streams, the supervised
protocol in finetune, and small tools such as tables or fileio); then engine and sweep; then the studies
(`tta_surgical.studies`, experiments built on sweep and engine); then the command line (`commands/`, `cli.py`,
`__main__.py`). A layer imports only from below. The one-off benchmark studies live in `benchmarks/`, above the
installed package, which never imports them.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "tta_surgical"
ROOT = "tta_surgical"

EDGE = (f"{ROOT}.commands", f"{ROOT}.cli", f"{ROOT}.__main__")  # the command line: may import anything
STUDIES = f"{ROOT}.studies"
# The layers below engine and sweep: each must import neither of them, nor anything above them.
LOWER = tuple(
    f"{ROOT}.{name}"
    for name in (
        "config", "finetune", "methods", "models", "corruptions", "data", "streams",
        "registry", "fileio", "tables", "metrics", "runtime", "provenance", "hub", "render", "autotune",
    )
)  # fmt: skip
ABOVE_LOWER = (f"{ROOT}.engine", f"{ROOT}.sweep", STUDIES, f"{ROOT}.commands", f"{ROOT}.cli")


@dataclass(frozen=True)
class Import:
    """One import of one module: where it is and the module(s) it names."""

    module: str  # the importing module, e.g. tta_surgical.finetune.core
    path: str  # its file, relative to the repository
    line: int
    target: str  # an absolute module name the statement imports (or may import: `from X import name` gives X.name)

    def __str__(self) -> str:
        return f"{self.path}:{self.line} ({self.module}) imports {self.target}"


def module_name(path: Path, root: Path = PACKAGE) -> str:
    """`tta_surgical/finetune/core.py` -> `tta_surgical.finetune.core`; a package's `__init__.py` -> the package."""
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, is_package: bool, level: int, name: str | None) -> str:
    """The absolute module of `from <level dots><name> import ...` written in `module`."""
    if level == 0:
        return name or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    base = package[: len(package) - (level - 1)]
    return ".".join([*base, name] if name else base)


def imports_of(source: str, module: str, path: str, is_package: bool = False) -> list[Import]:
    """Every import of one module's source, wherever it stands (module level, functions, TYPE_CHECKING blocks)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [Import(module, path, node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, is_package, node.level, node.module)
            found.append(Import(module, path, node.lineno, base))
            # `from .. import studies` imports a module through a name: count the names as modules too.
            found += [Import(module, path, node.lineno, f"{base}.{a.name}") for a in node.names if a.name != "*"]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in (
            "import_module", "__import__",
        ):  # fmt: skip
            arg = node.args[0] if node.args else None
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and not arg.value.startswith("."):
                found.append(Import(module, path, node.lineno, arg.value))
    return sorted(found, key=lambda i: i.line)  # stable: a statement's module stays before the names it imports


def package_imports() -> list[Import]:
    """The imports of every module of the package."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        found += imports_of(
            path.read_text(encoding="utf-8"),
            module_name(path),
            str(path.relative_to(REPO)),
            is_package=path.name == "__init__.py",
        )
    return found


def within(name: str, prefixes: str | tuple[str, ...]) -> bool:
    """Whether module `name` is one of `prefixes` or inside one of them."""
    return any(name == p or name.startswith(p + ".") for p in ((prefixes,) if isinstance(prefixes, str) else prefixes))


def once_per_statement(imports: list[Import]) -> list[Import]:
    """The first offending target of each statement (`from ..sweep import a, b` is one offence, not three)."""
    seen, out = set(), []
    for i in imports:
        if (i.path, i.line) not in seen:
            seen.add((i.path, i.line))
            out.append(i)
    return out


def _report(bad: list[str], rule: str) -> None:
    assert not bad, f"{rule}; offending imports:\n  " + "\n  ".join(bad)


# ------------------------------------------------------------------------------------------------ the rules


def library_imports_no_edge(imports: list[Import]) -> list[str]:
    """(a) The library (all but commands/, cli.py, __main__.py, studies/) imports neither studies nor the CLI."""
    return [str(i) for i in imports if not within(i.module, (*EDGE, STUDIES)) and within(i.target, (STUDIES, *EDGE))]


def studies_imported_by_the_cli_only(imports: list[Import]) -> list[str]:
    """(b) `studies` is imported only by the command line (and by itself)."""
    bad = [i for i in imports if within(i.target, STUDIES) and not within(i.module, (*EDGE, STUDIES))]
    return [str(i) for i in once_per_statement(bad)]


def nothing_imports_benchmarks(imports: list[Import]) -> list[str]:
    """(c) The installed package never imports the benchmark scripts or their studies."""
    return [str(i) for i in once_per_statement([i for i in imports if within(i.target, "benchmarks")])]


def lower_layers_stay_below(imports: list[Import]) -> list[str]:
    """(d) The runtime's parts import neither engine nor sweep nor anything above them."""
    above = ", ".join(p.split(".", 1)[1] for p in ABOVE_LOWER)
    bad = [i for i in imports if within(i.module, LOWER) and within(i.target, ABOVE_LOWER)]
    return [f"{i} (a lower layer must not import {above})" for i in once_per_statement(bad)]


def test_library_never_imports_studies_commands_or_cli():
    _report(library_imports_no_edge(package_imports()), "library modules must not import studies, commands or cli")


def test_studies_are_imported_only_by_the_command_line():
    _report(studies_imported_by_the_cli_only(package_imports()), "only commands/ and cli.py may import studies")


def test_the_package_never_imports_benchmarks():
    _report(nothing_imports_benchmarks(package_imports()), "tta_surgical must not import benchmarks")


def test_lower_layers_never_import_engine_sweep_or_above():
    _report(
        lower_layers_stay_below(package_imports()), "lower layers must not import engine, sweep, studies, commands, cli"
    )


def test_the_layers_exist_where_the_rules_say():
    """The rules name real modules (a rename would otherwise leave a rule checking nothing)."""
    names = {module_name(p) for p in PACKAGE.rglob("*.py")}
    for prefix in (*LOWER, *ABOVE_LOWER, *EDGE):
        assert any(within(n, prefix) for n in names), f"no module {prefix} in tta_surgical/: update the layer rules"


# ------------------------------------------------------------------------------------------------ the checker


@pytest.mark.parametrize(
    ("module", "is_package", "source", "target"),
    [
        ("tta_surgical.finetune.compare", False, "def f():\n    from ..sweep import run_sweep\n", "tta_surgical.sweep"),
        ("tta_surgical.finetune", True, "from .core import x\n", "tta_surgical.finetune.core"),
        ("tta_surgical.bench.results", False, "from .. import studies\n", "tta_surgical.studies"),
        ("tta_surgical.engine", False, "import tta_surgical.commands.run as r\n", "tta_surgical.commands.run"),
        (
            "tta_surgical.models.zoo",
            False,
            "if TYPE_CHECKING:\n    from ..engine import Built\n",
            "tta_surgical.engine",
        ),
        ("tta_surgical.hub", False, "importlib.import_module('benchmarks.studies.soak')\n", "benchmarks.studies.soak"),
    ],
)
def test_checker_sees_every_kind_of_import(module, is_package, source, target):
    assert target in {i.target for i in imports_of(source, module, "x.py", is_package)}


def test_rules_flag_the_old_study_inside_finetune():
    """Before issue 20 the online-vs-supervised study was `finetune/compare.py`, importing sweep and engine inside
    its functions; `finetune/summary.py` rendered through the study's `report` module. The rules reject both."""
    old = imports_of(
        "from ..config import Config\n"
        "def run_cells():\n    from ..sweep import load_sweep, run_sweep\n"
        "def score_run():\n    from ..engine import build\n",
        "tta_surgical.finetune.compare",
        "tta_surgical/finetune/compare.py",
    )
    bad = lower_layers_stay_below(old)
    assert len(bad) == 2 and "finetune/compare.py:3" in bad[0] and "imports tta_surgical.sweep" in bad[0], bad
    assert "imports tta_surgical.engine" in bad[1]
    moved = imports_of("from ..studies.render import plot_study\n", "tta_surgical.finetune.summary", "s.py")
    assert library_imports_no_edge(moved) and studies_imported_by_the_cli_only(moved)
    assert not library_imports_no_edge(
        imports_of("from ..studies import ShiftStudy\n", "tta_surgical.commands.report", "r.py")
    )
