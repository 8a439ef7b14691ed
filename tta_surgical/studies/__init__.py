"""Studies: experiments built on the library's tools, above `sweep` and `engine`; run by `tta-surgical report`.

Nothing in the library imports this package (`tests/test_layers.py` checks it); only `commands/` does. Today it
holds one study, online (unlabeled) vs supervised surgical adaptation of one target task, block by block:

- `cells`: its settings (`OnlineSettings`, `Launch`) and `ShiftStudy`, the split, the online pool and the sweep
  cells of both sides, run (or reused) through `tta_surgical.sweep`;
- `scoring`: `score_run`, a finished online run's adapted model on the labeled test split;
- `gather`: the cells' numbers as one task's `report.json` entry (`run_study`);
- `verdict`: the paper's Table 1 in our setting (`verdict_rows`);
- `budgets`: accuracy vs the number of labeled / unlabeled target images (`run_budgets`);
- `render`: the study's Markdown tables and plots.

The protocol. For each seed of the finetune config, the target set is split once
(`TargetData.split`, on the source labels): labeled train / val / test for the supervised side, and the *online
pool*, every row outside the labeled train and validation splits (8,900 of CIFAR-10's 10,000 with the paper's
split; the test rows are in it: an online method sees its test images unlabeled as they stream).

- supervised: one `finetune` cell per corruption (every option and seed inside), exactly `tta-surgical finetune`;
  its test accuracy is at the (lr, epoch) with the best validation accuracy.
- online: one `run` cell per (corruption, option) with the model restored per corruption (`mode=reset`), or one
  per option over all corruptions in sequence (`mode=continual`): the online method (`surgical` entropy
  minimisation on the option's blocks by default; `auto-rgn` = every tensor at lr x its auto-RGN weight) adapts
  over `n_images` images of the pool (None = all) in a seeded order. Images: for `finetune.source` cifar10c /
  imagenetc the same files the supervised side reads (`stream.indices`); for cifar10 (generated) the stream
  corrupts the same rows on the fly with its own seeded noise (for the random corruptions another draw of the
  same corruption than the supervised images; nothing is written to disk). The stream keeps the source's labels
  (no unlabeled method can learn a relabelling); its label-level shift is its own (`stream.label_shift`,
  `stream.class_imbalance`, `stream.class_prior` overrides).
- scoring, twice: `online_error_stream` = the run's error on its stream; `online_accuracy_test` = the adapted
  model (the run's final state) predicting exactly the supervised test split of the corruption, with the task's
  labels, through the method's `predict` in batches of the stream's batch size (continual: the final model on
  every corruption's test split). Reference runs of non-adapting methods (`norm`: test-batch BatchNorm
  statistics, no update, by default; `source`: the model as it is) show how much of the online result is the
  statistics alone.

Every cell is a sweep cell (`tta_surgical.sweep`): the study writes its sweep files (`sweep.yaml`, runnable by
`tta-surgical sweep ... --launcher ray`) and runs them with the chosen launcher; cells are keyed by the hash of
their config, so a rerun (or the budget study) reuses every finished cell.
"""

from .budgets import run_budgets
from .cells import ONLINE_MODES, Launch, OnlineSettings, ShiftStudy, online_method, online_options
from .gather import Gathered, gather, model_blocks, run_study, task_report
from .scoring import score_run
from .verdict import top_block, verdict_rows

__all__ = [
    "ONLINE_MODES",
    "ShiftStudy",
    "Gathered",
    "Launch",
    "OnlineSettings",
    "gather",
    "model_blocks",
    "online_method",
    "online_options",
    "run_budgets",
    "run_study",
    "score_run",
    "task_report",
    "top_block",
    "verdict_rows",
]
