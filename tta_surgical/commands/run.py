"""`tta-surgical run`: one method config over one stream, written to a resumable output folder."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .options import add_data_root, add_frost_dir

HELP = "adapt a model online over a stream (one config) and report error, latency and memory"
DESCRIPTION = (
    "Run one method config (configs/*.yaml) over one deployment stream (streams/*.yaml) and write "
    "config.yaml, results.jsonl (one line per batch), summary.json and summary.md to the output folder. "
    "A checkpoint is written at every domain boundary; --resume continues an interrupted run with identical results. "
    "key=value arguments (anywhere after the command) override config fields, e.g. optim.lr=1e-4 "
    "stream.n_examples=1000."
)


def add_common_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by `run` and `compare`."""
    add_data_root(parser)
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default=None, help="where to run; sets runtime.device"
    )
    add_frost_dir(parser)
    parser.add_argument(
        "--no-progress", action="store_true", help="hide the progress bar (sets runtime.progress=false)"
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="config overrides as dotted keys, anywhere after the command, e.g. optim.lr=1e-4 "
        "method.blocks=[block1] stream.n_examples=all (values are read as YAML)",
    )


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, metavar="FILE", help="method config YAML (e.g. configs/tent.yaml)")
    parser.add_argument(
        "--stream",
        metavar="FILE",
        default=None,
        help="stream YAML (e.g. streams/cifar10c_reset.yaml); default: the config's stream section or the "
        "built-in default stream",
    )
    parser.add_argument(
        "--out", metavar="DIR", default=None, help="output folder (default: runs/<config-stem>-<stream-stem>)"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last checkpoint (a finished run, or one stopped on collapse, is "
        "left as it is)",
    )
    parser.add_argument(
        "--continue-after-stop",
        action="store_true",
        help="with --resume: continue a run that runtime.on_collapse=stop ended, past the stop",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a finished or partial run in --out")
    add_common_options(parser)


def resolve_overrides(args: argparse.Namespace) -> list[str]:
    """Positional overrides, then the options that map onto config keys (options win)."""
    overrides = list(args.overrides or [])
    if args.device:
        overrides.append(f"runtime.device={args.device}")
    if args.no_progress:
        overrides.append("runtime.progress=false")
    return overrides


def default_out(config: str | os.PathLike, stream: str | os.PathLike | None) -> Path:
    return Path("runs") / f"{Path(config).stem}-{Path(stream).stem if stream else 'default'}"


def main(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..engine import ended_note, run
    from ..report import summary_markdown

    if args.continue_after_stop and not args.resume:
        raise ValueError("--continue-after-stop continues a stopped run: use it together with --resume")
    cfg = load_config(args.config, stream=args.stream, overrides=resolve_overrides(args))
    out = Path(args.out) if args.out else default_out(args.config, args.stream)
    # A run that has ended stays as it is on --resume (the engine returns its summary untouched): one line says so.
    note = ended_note(out, args.continue_after_stop) if args.resume else None
    summary = run(
        cfg,
        out,
        data_root=args.data_root,
        resume=args.resume,
        frost_dir=args.frost_dir,
        overwrite=args.overwrite,
        continue_after_stop=args.continue_after_stop,
    )
    if note is not None:
        print(note)
        return 0
    print(summary_markdown(summary))
    print(f"results in {out}/ (summary.json, summary.md, results.jsonl)")
    return 0
