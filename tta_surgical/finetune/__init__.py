"""Supervised few-shot surgical fine-tuning (Lee et al., ICLR 2023) and its summaries.

    from tta_surgical.finetune import load_finetune_config, run_finetune
    cfg = load_finetune_config("configs/finetune_cifar10c.yaml", ["finetune.corruptions=[fog]"])
    summary = run_finetune(cfg, "runs/finetune", data="/data")   # the data root, or a DataContext

Modules: `config` (the frozen config tree), `tasks` (the target tasks: `corruption`, `cifar_flip`), `data` (seeded
class-balanced splits, training budgets, the online pool, target images generated exactly as make-cifar10c or
read from CIFAR-10-C / ImageNet-C folders), `core` (the per-cell protocol, the
resumable run), `summary` (means, standard errors, average ranks, Markdown, auto-RGN plot).
"""

from .config import AUTO_OPTIONS, FinetuneConfig, FinetuneSection, load_finetune_config
from .core import (
    CellData,
    build_rgn_optimizer,
    epoch_permutation,
    evaluate,
    finetune_cell,
    guarded_step,
    option_params,
    read_results,
    run_finetune,
    select_best,
    validate_options,
)
from .data import (
    Split,
    TargetData,
    budget_subset,
    online_pool,
    per_class_train,
    split_indices,
    write_cifar10c_subset,
)
from .summary import average_ranks, plot_rgn_weights, rank_row, standard_error, summarize, summary_markdown
from .tasks import CLEAN, TASKS, TargetTask, flip_labels, get_task, register_task, shift_level

__all__ = [
    "AUTO_OPTIONS",
    "CLEAN",
    "TASKS",
    "TargetTask",
    "budget_subset",
    "flip_labels",
    "get_task",
    "online_pool",
    "register_task",
    "shift_level",
    "CellData",
    "FinetuneConfig",
    "FinetuneSection",
    "Split",
    "TargetData",
    "average_ranks",
    "build_rgn_optimizer",
    "epoch_permutation",
    "evaluate",
    "finetune_cell",
    "guarded_step",
    "load_finetune_config",
    "option_params",
    "per_class_train",
    "plot_rgn_weights",
    "rank_row",
    "read_results",
    "run_finetune",
    "select_best",
    "split_indices",
    "standard_error",
    "summarize",
    "summary_markdown",
    "validate_options",
    "write_cifar10c_subset",
]
