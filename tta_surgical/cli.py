"""`tta-surgical` command line: one subcommand per module in `tta_surgical.commands`.

Each command module defines `HELP` (one line), `configure(parser)` and `main(args) -> int`. The command line
stays light: a command module imports the package's heavy parts (anything that imports torch) inside its
functions, not at its top, and only the command being run is configured, so `tta-surgical --help` and
`import tta_surgical.cli` never import torch (`tests/test_structure.py` checks this and exempts this file, the
`commands/` package and the package's `__init__.py` from the comment each other lazy import needs).

Config overrides (`section.key=value`) are accepted anywhere after the command, for every command that takes them
(a positional `overrides` argument): `split_overrides` takes them out of the command line before argparse sees it,
so `sweep FILE --dry-run --out X key=value` and `run key=value --stream F` parse like `run --stream F key=value`.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Collection, Sequence

from ._version import __version__

# command name -> module; the order is the order of `--help`.
COMMANDS: dict[str, str] = {
    "run": "tta_surgical.commands.run",
    "compare": "tta_surgical.commands.compare",
    "finetune": "tta_surgical.commands.finetune",
    "sweep": "tta_surgical.commands.sweep",
    "report": "tta_surgical.commands.report",
    "bench": "tta_surgical.commands.bench",
    "make-cifar10c": "tta_surgical.commands.make_cifar10c",
    "methods": "tta_surgical.commands.methods",
    "blocks": "tta_surgical.commands.blocks",
    "corruptions": "tta_surgical.commands.corruptions",
}


def _available() -> dict[str, str]:
    """Commands whose module exists (lets the CLI grow one module at a time)."""
    return {name: mod for name, mod in COMMANDS.items() if importlib.util.find_spec(mod) is not None}


# A command-line word that sets a config key: `section.key=value`. The key has no leading dash and no path separator,
# so option words (`--out=X`) and paths holding an '=' (`runs/lr=1e-3`) are never taken for overrides.
_OVERRIDE = re.compile(r"^[^-=/\\\s][^=/\\\s]*=")


def build_parser() -> argparse.ArgumentParser:
    """The `tta-surgical` parser with one subparser per available command, each configured."""
    return _build()[0]


def _build(
    configure: Collection[str] | None = None,
) -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The parser and its subparsers, the commands named in `configure` (None: all) with their options. A command's
    options may list registry entries (models, tasks), which imports torch: `tta-surgical --help` configures none."""
    parser = argparse.ArgumentParser(
        prog="tta-surgical",
        description="Adapt chosen blocks of pretrained vision models to distribution shift, online or few-shot.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(
        dest="command", metavar="COMMAND", help="run `tta-surgical COMMAND --help` for its options"
    )
    subs: dict[str, argparse.ArgumentParser] = {}
    for name, modname in _available().items():
        mod = importlib.import_module(modname)
        p = sub.add_parser(name, help=mod.HELP, description=getattr(mod, "DESCRIPTION", mod.HELP))
        if configure is None or name in configure:
            mod.configure(p)
        p.set_defaults(_main=mod.main)
        subs[name] = p
    return parser, subs


def takes_overrides(parser: argparse.ArgumentParser) -> bool:
    """Whether a command's parser has the positional `overrides` (KEY=VALUE ...) argument."""
    return any(a.dest == "overrides" and not a.option_strings for a in parser._actions)


def _option(parser: argparse.ArgumentParser, word: str) -> argparse.Action | None:
    """The option `word` names, as argparse resolves it (exact, or an unambiguous prefix of a long option)."""
    if not word.startswith("-") or "=" in word:
        return None  # not an option, or `--opt=value`, which carries its own value
    actions = parser._option_string_actions  # argparse has no public lookup; stable since Python 3.2
    if word in actions:
        return actions[word]
    matches = {a for name, a in actions.items() if name.startswith("--") and name.startswith(word)}
    return matches.pop() if len(matches) == 1 else None


def split_overrides(parser: argparse.ArgumentParser, words: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the words left for argparse, the `key=value` overrides in command-line order) of one command's words.

    A word is an override when it looks like `key=value`, is not the value of an option that takes exactly one
    (`--out a=b` stays the folder name) and is not an existing file (a config file named `a=b.yaml`). Words after
    `--` are left to argparse.
    """
    rest: list[str] = []
    overrides: list[str] = []
    for i, word in enumerate(words):
        if word == "--":
            rest.extend(words[i:])
            break
        prev = _option(parser, words[i - 1]) if i else None
        is_value = prev is not None and prev.nargs in (None, "?")  # the one value of `--out X` (flags have nargs 0)
        if not is_value and _OVERRIDE.match(word) and not os.path.isfile(word):
            overrides.append(word)
        else:
            rest.append(word)
    return rest, overrides


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse a command line; overrides may appear anywhere after the command (see `split_overrides`), and an
    unknown word is reported with the command's own usage line, not the top-level one."""
    argv = list(sys.argv[1:] if argv is None else argv)
    at = next((i for i, w in enumerate(argv) if not w.startswith("-")), None)
    parser, subs = _build({argv[at]} if at is not None else set())
    command = subs.get(argv[at]) if at is not None else None
    overrides: list[str] = []
    if command is not None and takes_overrides(command):
        rest, overrides = split_overrides(command, argv[at + 1 :])
        argv = [*argv[: at + 1], *rest]
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        (command or parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    if command is not None and takes_overrides(command):
        # Positional words argparse still collected are not key=value: parse_override rejects them clearly.
        args.overrides = [*overrides, *(args.overrides or [])]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not getattr(args, "_main", None):
        _build(set())[0].print_help()
        return 2
    try:
        return int(args._main(args) or 0)
    except KeyboardInterrupt:
        print("interrupted; rerun with --resume where the command supports it", file=sys.stderr)
        return 130
    except (FileNotFoundError, ValueError, KeyError, TypeError, OSError) as err:
        if os.environ.get("TTA_SURGICAL_DEBUG"):
            raise
        # Expected user errors (bad paths, names, values) get one clear line, not a traceback;
        # TTA_SURGICAL_DEBUG=1 shows the traceback.
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"tta-surgical {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
