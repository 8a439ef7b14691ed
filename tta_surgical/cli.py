"""`tta-surgical` command line: one subcommand per module in `tta_surgical.commands`.

Each command module defines `HELP` (one line), `configure(parser)` and `main(args) -> int`; modules are
imported only when their command runs, so `tta-surgical --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from collections.abc import Sequence

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tta-surgical",
        description="Adapt chosen blocks of pretrained vision models to distribution shift, online or few-shot.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, modname in _available().items():
        mod = importlib.import_module(modname)
        p = sub.add_parser(name, help=mod.HELP, description=getattr(mod, "DESCRIPTION", mod.HELP))
        mod.configure(p)
        p.set_defaults(_main=mod.main)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_main", None):
        parser.print_help()
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
