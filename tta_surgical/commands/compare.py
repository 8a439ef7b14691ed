"""`tta-surgical compare`: several method configs over the same stream, side by side."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .options import data_context
from .run import add_common_options, resolve_overrides

HELP = "run several configs over the same stream and tabulate their errors side by side"
DESCRIPTION = (
    "Run each config (e.g. configs/source.yaml configs/tent.yaml configs/surgical_block1.yaml) over the same "
    "stream, each in its own subfolder of --out, then write compare.md and compare.json (domains as rows, "
    "configs as columns). Finished runs with the same config are reused and interrupted ones resumed, so "
    "rerunning the same command after a crash only does the missing work. key=value overrides (anywhere after "
    "the command) apply to every config."
)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--configs", required=True, nargs="+", metavar="FILE", help="method config YAMLs; each becomes one column"
    )
    parser.add_argument("--stream", required=True, metavar="FILE", help="stream YAML shared by all configs")
    parser.add_argument(
        "--out", metavar="DIR", default=None, help="output folder (default: runs/compare-<stream-stem>)"
    )
    parser.add_argument(
        "--fresh", action="store_true", help="rerun every config from scratch instead of reusing or resuming"
    )
    parser.add_argument(
        "--plot", action="store_true", help="also save compare.png, a bar chart of error per domain (needs matplotlib)"
    )
    add_common_options(parser)


def main(args: argparse.Namespace) -> int:
    from ..runfolder import folder_lock

    # `key=value` words written straight after the config files are overrides: the CLI took them out already.
    if not args.configs:
        raise ValueError("--configs needs at least one config file")
    stems = [Path(c).stem for c in args.configs]
    dup = sorted({s for s in stems if stems.count(s) > 1})
    if dup:
        raise ValueError(f"config file names must differ (they name the columns and subfolders); repeated: {dup}")
    out = Path(args.out) if args.out else Path("runs") / f"compare-{Path(args.stream).stem}"
    with folder_lock(out, "compare"):  # one compare per folder: a second one fails at once, naming this one
        return _compare(args, stems, out)


def _compare(args: argparse.Namespace, stems: list[str], out: Path) -> int:
    from ..config import load_config
    from ..engine import finished_summary, run
    from ..render import compare_markdown, plot_errors

    overrides = resolve_overrides(args)
    configs = {
        stem: load_config(path, stream=args.stream, overrides=overrides) for stem, path in zip(stems, args.configs)
    }

    summaries: dict[str, dict[str, Any]] = {}
    data = data_context(args)
    for stem, cfg in configs.items():
        folder = out / stem
        previous = None if args.fresh else finished_summary(folder, cfg)
        if previous is not None:
            print(f"[{stem}] reusing the finished run in {folder}")
            summaries[stem] = previous
            continue
        print(f"[{stem}] running {cfg.method.name} on {cfg.model.name} -> {folder}")
        summaries[stem] = run(
            cfg,
            folder,
            data=data,
            resume=not args.fresh,
            overwrite=args.fresh,
        )

    table = compare_markdown(summaries)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(f"Stream: {args.stream}\n\n{table}", encoding="utf-8")
    payload = {
        "stream": str(args.stream),
        "configs": dict(zip(stems, map(str, args.configs))),
        "overrides": overrides,
        "errors": {
            d: {stem: s["errors"].get(d) for stem, s in summaries.items()}
            for d in dict.fromkeys(d for s in summaries.values() for d in s["errors"])
        },
        "mean_error": {stem: s["mean_error"] for stem, s in summaries.items()},
        "online_error": {stem: s["online_error"] for stem, s in summaries.items()},
        "summaries": summaries,
    }
    (out / "compare.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    print(table)
    print(f"written {out}/compare.md and {out}/compare.json")
    if args.plot:
        try:
            path = plot_errors(summaries, out / "compare.png")
        except ImportError as err:
            print(f"no plot: {err}")
            return 1
        print(f"plot saved to {path}")
    return 0
