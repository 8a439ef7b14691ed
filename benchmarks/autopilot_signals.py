"""The evidence behind `method.blocks: auto`: label-free signals per domain, what each would choose, what each costs.

    python benchmarks/autopilot_signals.py --data-root ../shared/data --out OUT
    python benchmarks/autopilot_signals.py --data-root ../shared/data --out OUT --runs RUN_DIR ...   # + part B

Part A (computed here, resnet20 pretrained, severity 5): for each of the 15 CIFAR-10-C corruptions and the clean
images ('none'), on two streams of the domain alone -- i.i.d. batches of 200, and Dirichlet-ordered labels
(delta 0.1) in batches of 64 as `streams/cifar10c_dirichlet.yaml` (clean: plus class imbalance 10, batch 200: the
label-shifted clean stream of RESULTS section 11) -- every candidate signal, averaged over the domain's batches:

- `shift`: covariate score, the mean over BatchNorm layers of the Gaussian KL of the layer's input statistics from
  its source running statistics, on a frozen source copy (`signals.SourceReference`); `shift by block`: the block
  whose layers moved most (input, block1, block2, block3);
- `drift`: class-prior drift, KL of the batch's mean prediction from the running mean of earlier batches, in units
  of its i.i.d. sampling noise (C - 1) / (2B);
- `agree`: agreement of the source model's predictions with test-batch BatchNorm's (`norm`) on the batch;
- `aug`: consistency of `norm`'s predictions under one batched CoTTA augmentation (`augment.cotta_views`);
- `rgn`: per block, ||g|| / ||theta|| of the entropy gradient of `norm` (every parameter), the argmax block;
- the error of source, norm (batch statistics) and ema (running target statistics, momentum 0.1) on the domain:
  which BatchNorm statistics a perfect signal would choose.

Costs: each signal's time as a ratio to one ETA step on blocks block1-2 (kind all) on the same batch, timed
interleaved (median over the batches); a shared machine gives noisy ratios, the passes they need are stated too.

Part B (--runs): finished run folders of fixed selections on one stream (e.g. the screening sweep's cells): the
error of each selection per domain, the best one per domain in hindsight, and which candidate block the block-level
signals (`shift by block`, `rgn`, restricted to block1 / block2) would pick there.

Writes OUT/signals.json and OUT/signals.md, and prints the tables.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout: its package (installed or not) and benchmarks.studies

from benchmarks.studies.autopilot_signals import write_report  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data-root", default=None, help="folder with cifar-10-batches-py/, weights/ and frost/")
    p.add_argument("--frost-dir", default=None, help="frost textures (default <data-root>/frost)")
    p.add_argument("--images", type=int, default=1000, help="images per domain stream (default 1000)")
    p.add_argument("--batches", type=int, default=8, help="at most this many batches per domain (default 8)")
    p.add_argument("--seed", type=int, default=0, help="stream seed (default 0)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: leave the default)")
    p.add_argument("--runs", nargs="*", type=Path, default=[], help="finished run folders of fixed selections")
    p.add_argument("--out", type=Path, required=True, help="folder for signals.json / signals.md")
    print(write_report(p.parse_args(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
