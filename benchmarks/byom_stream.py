"""A short CIFAR-10-C stream through `tta_surgical.adapt` on models outside the zoo, timed against plain inference.

    python benchmarks/byom_stream.py --data-root ../shared/data --threads 2
    python benchmarks/byom_stream.py --models torchvision:mobilenet_v3_small timm:resnet18 --blocks block1

Prints a table (median ms per batch, ratio adapt / inference in the same interleaved run) and writes byom.json /
byom.md to --out. See `benchmarks/studies/byom.py`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout: its package (installed or not) and benchmarks.studies

from benchmarks.studies.byom import ByomSpec, byom_markdown, run_byom, write  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    d = ByomSpec()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(d.models), help="torchvision:<name> or timm:<name> models")
    p.add_argument("--method", default=d.method, help="a registered method (tta-surgical methods)")
    p.add_argument("--blocks", nargs="+", default=list(d.blocks), help="the blocks to adapt")
    p.add_argument("--kind", default=d.kind, choices=("all", "norm", "conv"), help="which parameters of the blocks")
    p.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate")
    p.add_argument("--n-per-corruption", type=int, default=d.n_per_corruption, help="images per corruption")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per batch")
    p.add_argument("--image-size", type=int, default=d.image_size, help="resize CIFAR images to this size")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--data-root", default=os.environ.get("TTA_SURGICAL_DATA"), help="folder with cifar-10-batches-py/")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "byom"), help="output folder")
    a = p.parse_args(argv)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    spec = ByomSpec(
        models=tuple(a.models), method=a.method, blocks=tuple(a.blocks), kind=a.kind, lr=a.lr,
        n_per_corruption=a.n_per_corruption, batch_size=a.batch_size, image_size=a.image_size,
    )  # fmt: skip
    result = run_byom(spec, a.data_root)
    write(result, Path(a.out))
    print(byom_markdown(result))
    print(f"written {a.out}/byom.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
