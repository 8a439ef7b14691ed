"""`tta-surgical methods`: the registered online methods, their settings and defaults."""

from __future__ import annotations

import argparse
import json

HELP = "list the online methods with their settings and defaults"
DESCRIPTION = (
    "List every registered online method (the names `method.name` accepts), whether it updates parameters, and "
    "its settings (`method.<key>`) with their defaults. Adapting methods accept `method.blocks` / `method.kind` to "
    "adapt any blocks instead of their authors' choice."
)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("names", nargs="*", help="methods to show (default: all)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def describe(name: str) -> dict:
    """The method `name`: its class, whether it adapts, the first docstring line, and its settings' defaults."""
    from ..config import method_config, to_dict
    from ..methods import METHODS

    cls = METHODS.get(name)
    doc = (cls.__doc__ or cls.Settings.__doc__ or "").strip().splitlines()
    defaults = to_dict(method_config(name))
    defaults.pop("name")
    return {
        "name": name,
        "adapts": bool(cls.adapts),
        "summary": doc[0] if doc else "",
        "settings": defaults,
        "settings_help": (cls.Settings.__doc__ or "").strip(),
    }


def main(args: argparse.Namespace) -> int:
    from ..methods import METHODS

    names = args.names or sorted(METHODS.names())
    info = [describe(n) for n in names]
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for item in info:
        kind = "adapts" if item["adapts"] else "no parameter update"
        print(f"{item['name']}  ({kind})  {item['summary']}")
        for key, value in item["settings"].items():
            print(f"    method.{key} = {json.dumps(value)}")
    print("\nSet any of them in a config's `method:` section or as an override, e.g. method.blocks=[block1].")
    return 0


__all__ = ["HELP", "configure", "describe", "main"]
