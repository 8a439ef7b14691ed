"""Cost of CoTTA's and MEMO's augmented views: the batched steps of the package vs a Python loop over the views.

    python benchmarks/augment_cost.py --data-root ../shared/data                    # CPU, 1 thread, 5 repeats
    python benchmarks/augment_cost.py --data-root ../shared/data --quick            # 2 repeats, MEMO batch 4
    python benchmarks/augment_cost.py --device cuda --threads 0                     # a GPU, default threads

resnet20 (pretrained when --data-root holds the weights, else random: timing only), clean CIFAR-10 test images
(random images without --data-root). One step each, timed interleaved (every variant once per repeat, in turn), after
one untimed warm-up step per variant; the median over repeats is reported:

- `cotta` (batch --cotta-batch, default 200, --views 32 views): the package's `CoTTA.step` with ap = 1, so every
  step runs the augmented teacher, which is what is measured; `images_per_forward` auto (one view per teacher
  forward on a CPU) and `all` (all views in one forward, per-view BatchNorm statistics by grouping);
- `cotta loop` (the straightforward way, the baseline, defined here and not in the package): the authors' loop
  (qinenergy/cotta `forward_and_adapt`) written plainly: anchor forward, then for each view one augmentation call
  (`augment.cotta_views(x, 1, g)`: the same tensor operations, one view at a time) and one teacher forward, mean of
  the logits, student forward/backward and Adam step, EMA over the parameter list, per-tensor stochastic restore;
- `cotta loop, torchvision` (the authors' augmentation itself): the same loop with the authors' torchvision
  pipeline per view (colour jitter in a random order, edge pad, RandomAffine, GaussianBlur, centre crop, flip,
  noise, clip), applied to the batch tensor as they do;
- `memo` (batch --memo-batch, default 16 images, --views 32 views each): the package's `MEMO.step`
  (vmap over per-image parameter copies; `images_per_forward` auto and `all`);
- `memo loop` (the baseline): the authors' per-image loop (zhangmarvin/memo `test_adapt.py`): restore the source
  weights, one augmentation call per view (`augment.augmix_views(x_i, 1, g)`), the views stacked into one forward,
  marginal entropy, backward, SGD step, prediction on the image.

Ratios are loop time / batched time (> 1: the batched step is cheaper). Writes --out (JSON: the command, the machine,
the settings, every timing) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout: its package (installed or not) and benchmarks.studies

from benchmarks.studies.augment_cost import run_augment_cost, table  # noqa: E402
from tta_surgical.fileio import atomic_write_text  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "out" / "augment_cost.json"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data-root", default=None, help="folder with cifar-10-batches-py/ and weights/ (else random)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: leave the default)")
    p.add_argument("--views", type=int, default=32, help="augmented views per image (default 32)")
    p.add_argument("--cotta-batch", type=int, default=200, help="CoTTA batch size (default 200)")
    p.add_argument("--memo-batch", type=int, default=16, help="MEMO images per step (default 16)")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per variant, interleaved (default 5)")
    p.add_argument("--quick", action="store_true", help="2 repeats and a MEMO batch of 4: a smoke run")
    p.add_argument("--only", choices=("cotta", "memo"), default=None, help="time one method only")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    record = {"command": " ".join([Path(sys.executable).name, *sys.argv]), **run_augment_cost(args)}
    print(table(record["rows"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if record["finite"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
