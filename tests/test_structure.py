"""The package's import structure: no circle in its import graph (every import counts: module level, inside
functions, TYPE_CHECKING), and an import inside a function only where an optional dependency or a stated reason
needs it."""

from __future__ import annotations

import ast
import io
import subprocess
import sys
import tokenize
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tta_surgical"


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the package modules it imports (a name imported from a package counts as its submodule when one
    exists, else as the package), read from the source with `ast` so a lazy import that dodges a circle is seen."""
    files = {_module_name(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for module, path in files.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = module.split(".") if is_package else module.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                else:
                    base = []
                stem = ".".join([*base, *([node.module] if node.module else [])])
                targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in files else stem for a in node.names]
            for target in targets:
                while target and target not in files:
                    target = target.rpartition(".")[0]
                if target and target != module:
                    graph[module].add(target)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle_in_the_package():
    found = circles(import_graph())
    assert not found, "import circles (every import counted, lazy ones too): " + "; ".join(
        " <-> ".join(c) for c in found
    )


def test_the_circle_check_sees_lazy_and_type_checking_imports(tmp_path):
    pkg = tmp_path / "tta_surgical"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .sub import b  # lazy\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..a import f\n"
    )
    (pkg / "c.py").write_text("from . import a\n")
    assert circles(import_graph(pkg)) == [["tta_surgical.a", "tta_surgical.sub.b"]]


# ------------------------------------------------------------------------------------------------ lazy imports

# Optional dependencies (pyproject's extras, and Pillow for the corruption previews): imported where they are used, so
# the package works without them; no comment needed.
OPTIONAL_DEPENDENCIES = frozenset(
    {"matplotlib", "ray", "timm", "huggingface_hub", "imagecorruptions", "scipy", "skimage", "cv2", "PIL"}
)
# The command-line layer defers every import so `import tta_surgical` and `tta-surgical --help` stay light; each of
# these files' docstring states that rule once instead of a comment per import.
CLI_LAYER = ("__init__.py", "cli.py", "commands/")


@dataclass(frozen=True)
class LazyImport:
    """One import statement inside a function."""

    path: str  # relative to the package's parent, e.g. tta_surgical/engine.py
    line: int
    module: str  # as written: `..models`, `torchvision.io`
    top: str  # the top-level package of an absolute import ('' for a relative one)
    commented: bool  # a comment on one of its lines or on the line above

    def __str__(self) -> str:
        return f"{self.path}:{self.line} imports {self.module} inside a function"


def _comment_lines(source: str) -> tuple[set[int], set[int]]:
    """(the lines holding a comment, the lines holding only a comment)."""
    tokens = [t for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.COMMENT]
    return {t.start[0] for t in tokens}, {t.start[0] for t in tokens if not t.line[: t.start[1]].strip()}


def lazy_imports(root: Path = PACKAGE) -> list[LazyImport]:
    """Every import statement inside a function of the package (nested functions counted once)."""
    found: dict[tuple[str, int], LazyImport] = {}
    for path in sorted(root.rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        comments, comment_only = _comment_lines(source)
        rel = path.relative_to(root.parent).as_posix()
        for fn in ast.walk(ast.parse(source)):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    module, top = node.names[0].name, node.names[0].name.split(".")[0]
                elif isinstance(node, ast.ImportFrom):
                    module = "." * node.level + (node.module or "")
                    top = "" if node.level else (node.module or "").split(".")[0]
                else:
                    continue
                own = set(range(node.lineno, (node.end_lineno or node.lineno) + 1))
                commented = bool(own & comments) or node.lineno - 1 in comment_only
                found[(rel, node.lineno)] = LazyImport(rel, node.lineno, module, top, commented)
    return sorted(found.values(), key=lambda i: (i.path, i.line))


def unexplained(imports: list[LazyImport], root_name: str = PACKAGE.name) -> list[str]:
    """The lazy imports that are neither of an optional dependency, nor commented, nor in the command-line layer."""
    cli = tuple(f"{root_name}/{f}" for f in CLI_LAYER)
    return [
        str(i)
        for i in imports
        if i.top not in OPTIONAL_DEPENDENCIES and not i.commented and not i.path.startswith(cli)
    ]


def test_imports_inside_functions_say_why():
    """An import belongs at the top of its module; inside a function only for an optional dependency, the command
    line's light start, or a reason given in a comment on its line or the line above (a real import cost, a circle
    it avoids)."""
    bad = unexplained(lazy_imports())
    assert not bad, "move these imports to the top of their module, or say why in a comment:\n  " + "\n  ".join(bad)


@pytest.mark.parametrize("argv", [[], ["--help"], ["run", "--help"], ["sweep", "--help"], ["methods", "--help"]])
def test_the_command_line_layer_stays_light(argv):
    """What the exemption above buys: `import tta_surgical`, listing the commands and a light command's help import
    neither torch nor numpy (a command whose options list registry entries, `blocks` or `report`, may)."""
    code = (
        "import contextlib, io, sys\nimport tta_surgical\nfrom tta_surgical import cli\n"
        f"with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n    cli.main({argv!r})\n"
        "print(sorted(m for m in ('torch', 'torchvision', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent, check=True)
    assert out.stdout.strip() == "[]", (argv, out.stdout, out.stderr)


def test_the_lazy_import_check_sees_what_it_must(tmp_path):
    pkg = tmp_path / "tta_surgical"
    (pkg / "commands").mkdir(parents=True)
    (pkg / "__init__.py").write_text("def f():\n    from .a import g\n")
    (pkg / "commands" / "run.py").write_text("def main():\n    from ..engine import run\n")
    (pkg / "a.py").write_text(
        "import os\n"
        "def g():\n    import matplotlib.pyplot as plt\n    from scipy import ndimage\n"
        "def h():\n    # torchvision.io costs 0.5 s to import\n    import torchvision.io\n"
        "def i():\n    from .b import (  # circle: b imports a\n        x,\n    )\n"
        "def j():\n    def inner():\n        from .b import y\n    s = '# not a comment'; import json\n"
        "class C:\n    def m(self):\n        from . import b\n"
        "def k():\n    x = 1  # a comment about x, not the import below\n    import typing\n"
    )
    (pkg / "b.py").write_text("x = y = 1\n")
    bad = unexplained(lazy_imports(pkg))
    assert bad == [
        "tta_surgical/a.py:14 imports .b inside a function",
        "tta_surgical/a.py:15 imports json inside a function",
        "tta_surgical/a.py:18 imports . inside a function",
        "tta_surgical/a.py:21 imports typing inside a function",
    ], bad
