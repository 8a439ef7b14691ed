"""`tta-surgical run`: one method config over one stream, written to a resumable output folder."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .options import add_data_root, add_frost_dir, data_context

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
    from ..render import summary_markdown

    if args.continue_after_stop and not args.resume:
        raise ValueError("--continue-after-stop continues a stopped run: use it together with --resume")
    overrides = resolve_overrides(args)
    cfg = load_config(args.config, stream=args.stream, overrides=overrides)
    out = Path(args.out) if args.out else default_out(args.config, args.stream)
    # A run that has ended stays as it is on --resume (the engine returns its summary untouched): one line says so.
    note = ended_note(out, args.continue_after_stop) if args.resume else None
    summary = run(
        cfg,
        out,
        data=data_context(args),
        resume=args.resume,
        overwrite=args.overwrite,
        on_start=None if args.stream else _announce_default_stream(args.config, overrides),
        continue_after_stop=args.continue_after_stop,
    )
    if note is not None:
        print(note)
        return 0
    print(summary_markdown(summary))
    print(f"results in {out}/ (summary.json, summary.md, results.jsonl)")
    return 0


def _announce_default_stream(config: str, overrides: list[str]) -> Callable[[Any], None]:
    """Without --stream the stream comes from the config or the built-in default (15 corruptions x 10,000 images):
    say which one and how large it is on stderr before the first batch, so a long run is never a surprise."""
    from ..config import load_yaml

    where = f"the stream section of {config}" if load_yaml(config).get("stream") else "the built-in default stream"
    if any(o.startswith("stream.") for o in overrides):
        where += " with your stream.* overrides"

    def announce(built: Any) -> None:
        from ..engine import describe_stream

        stream, spec = built.stream, built.stream.spec
        n_domains, visits = len(spec.domains), len(spec.domains) * int(spec.rounds)
        domains = f"{n_domains} domain{'s' if n_domains != 1 else ''}"
        size = (
            f"{domains} x {stream.n_images // visits:,} images"
            + (f" x {spec.rounds} rounds" if spec.rounds > 1 else "")
            if stream.n_images % visits == 0
            else f"{stream.n_images:,} images over {domains}"
        )
        batches = f"{len(stream):,} batch{'es' if len(stream) != 1 else ''}"
        print(
            f"no --stream given: using {where}: {size} = {stream.n_images:,} images in {batches} "
            f"({describe_stream(spec)}); pass --stream FILE (streams/*.yaml) to choose another",
            file=sys.stderr,
            flush=True,
        )

    return announce
