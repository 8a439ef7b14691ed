"""Supervised few-shot surgical fine-tuning (Lee et al., ICLR 2023): the per-cell protocol and the resumable run.

One *cell* = (corruption, option, seed). For each cell:

1. a seeded class-balanced split of the target set into disjoint labeled train / val / test (`split_indices` on
   the source labels: the same indices for every corruption, option and target task of that seed), of whose
   training images `finetune.train_budget` may use a nested class-balanced subset (budget curves);
2. for each learning rate of the grid: restore the pretrained weights exactly (`load_state_dict` of a copy
   taken once), select the tensors of the option, Adam(lr, weight_decay) for `epochs` epochs over the
   training images (one seeded shuffle per epoch, identical for every lr and option), and after every epoch
   the validation and test accuracy;
3. report the test accuracy at the (lr, epoch) with the best validation accuracy (`select_best`: ties go to the
   lower learning rate, then the earlier epoch, i.e. to the smaller departure from the pretrained model).

Options: block specs (`input`, `block1`, `block1-2`, `block1.0`, `head`, `all`, ...), selected with
`select_params(model, resolve_blocks(model, option), kind)`; `auto-rgn` (every tensor of `kind` trains, with a
per-tensor learning rate base_lr x RGN weight recomputed on the first `rgn_batches` batches at the start of
every epoch, and Adam rebuilt each epoch, as the official code does); `auto-snr` (tensors whose normalised
gradient SNR on the training set, computed once at the pretrained weights, is below `snr_threshold` stay frozen).

BatchNorm: `bn_mode=source` keeps every BatchNorm layer in eval mode with the source running statistics (the
paper's setting); `batch` normalises with each batch's statistics and never writes the running buffers.
A step whose loss or gradients are not finite is skipped and counted (`n_skipped`).

Output folder: `config.yaml`, `results.jsonl` (one line per finished cell, flushed at once), `summary.json`,
`summary.md` (and `rgn_weights.png` with `plot=True`). `resume=True` skips the cells already in results.jsonl.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..autotune import block_weight_table, rgn_weights, snr_mask, snr_scores, weighted_param_groups
from ..data.context import DataContext, DataLike
from ..methods.base import guarded_step
from ..methods.bn import set_bn_stats
from ..metrics import json_safe
from ..models import block_spec, create_model_from_config, resolve_blocks, select_params
from ..runfolder import JsonlWriter, RunFolder, read_jsonl
from ..runtime import pick_device, seed_everything
from .config import AUTO_OPTIONS, FinetuneConfig, FinetuneSection
from .data import Split, TargetData, budget_subset, per_class_train
from .summary import plot_rgn_weights, summarize, summary_markdown

__all__ = [
    "CellData",
    "build_rgn_optimizer",
    "evaluate",
    "finetune_cell",
    "guarded_step",
    "option_params",
    "read_results",
    "run_finetune",
    "select_best",
    "validate_options",
]

CONFIG_FILE = "config.yaml"
RESULTS_FILE = "results.jsonl"
SUMMARY_FILE = "summary.json"
SUMMARY_MD = "summary.md"
_TAG_SHUFFLE = 0x5A0F

LrHook = Callable[[float, nn.Module], None]


# ----------------------------------------------------------------------------------------------- pure helpers


def select_best(history: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    """The history entry with the best validation accuracy; ties -> lower lr, then earlier epoch.

    Each entry needs `lr`, `epoch` and `val_correct` (an integer count, so ties are exact) or `val_acc`.
    Why this tie rule: among equally good settings, prefer the one that moved least from the pretrained model.
    """
    if not history:
        raise ValueError("select_best got an empty history (no (lr, epoch) was evaluated)")

    def key(h: Mapping[str, Any]) -> tuple[float, float, int]:
        val = h["val_correct"] if "val_correct" in h else h["val_acc"]
        return (-float(val), float(h["lr"]), int(h["epoch"]))

    return min(history, key=key)


def validate_options(model: nn.Module, options: Iterable[str], kind: str = "all") -> None:
    """Fail before any training when an option is unknown or selects no tensor, listing the valid options."""
    for option in options:
        if option in AUTO_OPTIONS:
            continue
        try:
            names = resolve_blocks(model, option)
        except ValueError as err:
            spec = block_spec(model)
            valid = ", ".join(
                [*AUTO_OPTIONS, "all", *(n for n, _ in spec.blocks), *(n for n, _ in spec.units if "." in n)]
            )
            raise ValueError(
                f"unknown finetune option {option!r} ({err}); valid options: {valid}, or block ranges like block1-2"
            ) from None
        if not select_params(model, names, kind):
            raise ValueError(
                f"finetune option {option!r} with kind={kind} selects no tensors (e.g. kind=norm on a block without "
                "norm layers); choose another option or finetune.kind=all"
            )


def option_params(model: nn.Module, option: str, kind: str = "all") -> list[tuple[str, nn.Parameter]]:
    """The (name, parameter) candidates of an option: its blocks' tensors, or every tensor for auto options."""
    if option in AUTO_OPTIONS:
        return select_params(model, "all", kind)
    return select_params(model, resolve_blocks(model, option), kind)


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int) -> int:
    """Number of correct predictions on uint8 images `x` (scaled to [0, 1] here) with labels `y`."""
    correct = 0
    for a in range(0, len(x), batch_size):
        xb = x[a : a + batch_size]
        logits = model(xb.to(_device_of(model), non_blocking=True).float().div_(255))
        correct += int((logits.argmax(1) == y[a : a + batch_size].to(logits.device)).sum().item())
    return correct


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits.float(), y)


def build_rgn_optimizer(
    model: nn.Module,
    params: Sequence[tuple[str, nn.Parameter]],
    batches: Iterable[tuple[Tensor, Tensor]],
    lr: float,
    weight_decay: float,
    n_batches: int,
) -> tuple[torch.optim.Optimizer, dict[str, float]]:
    """Adam with one group per tensor at lr x RGN weight (`tta_surgical.autotune.rgn_weights` on `batches`)."""
    weights = rgn_weights(model, list(params), batches, cross_entropy, n_batches=n_batches)
    for _, p in params:
        p.grad = None  # the RGN pass must leave no gradient behind for the first training step
    groups = weighted_param_groups(list(params), weights, lr, weight_decay=weight_decay)
    if not groups:
        raise FloatingPointError("auto-RGN: no tensor has a nonzero relative gradient norm (nothing to train)")
    return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay), dict(weights)


# ----------------------------------------------------------------------------------------------- one cell


class CellData:
    """The images (uint8 (n, 3, H, W), on the device when small) and labels of one corruption x split."""

    def __init__(self, images: Mapping[str, Tensor], labels: Mapping[str, Tensor], split: Split | None = None):
        for part in ("train", "val", "test"):
            if part not in images or part not in labels:
                raise ValueError(f"CellData needs train, val and test images and labels; {part!r} is missing")
            if len(images[part]) != len(labels[part]):
                raise ValueError(f"{part}: {len(images[part])} images but {len(labels[part])} labels")
            if len(images[part]) == 0:
                raise ValueError(f"the labeled {part} set is empty; every split needs at least one image per class")
        self.x = dict(images)
        self.y = dict(labels)
        self.split = split


def _configure(model: nn.Module, params: Sequence[tuple[str, nn.Parameter]], bn_mode: str) -> None:
    """Eval mode, everything frozen but `params`, BatchNorm statistics per `bn_mode` (never written)."""
    model.eval()
    model.requires_grad_(False)
    for _, p in params:
        p.requires_grad_(True)
    set_bn_stats(model, bn_mode)


def _batches(perm: Tensor, batch_size: int, drop_single: bool) -> list[Tensor]:
    out = [perm[a : a + batch_size] for a in range(0, len(perm), batch_size)]
    if drop_single and out and len(out[-1]) == 1 and len(out) > 1:
        out.pop()  # batch statistics of one image are undefined: BatchNorm in batch mode cannot take it
    return out


def epoch_permutation(n: int, seed: int, epoch: int) -> Tensor:
    """The training order of one epoch: a function of (seed, epoch) only, so every lr and option sees the same."""
    g = torch.Generator().manual_seed(
        int(
            np.random.SeedSequence([int(seed), _TAG_SHUFFLE, int(epoch)]).generate_state(1, np.uint64)[0]
            & ((1 << 63) - 1)
        )
    )
    return torch.randperm(n, generator=g)


def _snr_selection(
    model: nn.Module,
    candidates: list[tuple[str, nn.Parameter]],
    data: CellData,
    section: FinetuneSection,
) -> tuple[list[tuple[str, nn.Parameter]], dict[str, Any]]:
    """auto-snr: score the candidates once, at the pretrained weights, on the whole training set (the official
    code's choice) and keep those at or above the threshold; returns (kept, record extras)."""
    device = _device_of(model)
    _configure(model, candidates, section.bn_mode)
    x_all = data.x["train"].to(device).float().div_(255)
    scores = snr_scores(model, candidates, x_all, data.y["train"].to(device), loss_fn=cross_entropy)
    mask = snr_mask(scores, section.snr_threshold)
    del x_all
    for _, p in candidates:
        p.grad = None
    kept = [(n, p) for n, p in candidates if mask.get(n, False)]
    if not kept:
        raise ValueError(
            f"auto-snr froze every tensor (threshold {section.snr_threshold}); lower finetune.snr_threshold"
        )
    extra = {
        "snr_frozen": [n for n, _ in candidates if not mask.get(n, False)],
        "snr_scores": {n: float(scores[n]) for n, _ in candidates},
    }
    return kept, extra


class _LrRun:
    """The epochs of one learning rate of a cell (the model already restored and configured): history lines,
    auto-RGN weight tables, skipped / total steps."""

    def __init__(self, model: nn.Module, option: str, candidates: list, data: CellData, section: FinetuneSection):
        self.model, self.option, self.candidates, self.data, self.section = model, option, candidates, data, section
        self.history: list[dict[str, Any]] = []
        self.rgn_tables: list[dict[str, float]] = []
        self.n_skipped = self.n_steps = self.n_rgn_failed = 0

    def run(self, lr: float, seed: int) -> None:
        sec, plist = self.section, [p for _, p in self.candidates]
        optimizer = None
        if self.option != "auto-rgn":
            optimizer = torch.optim.Adam(plist, lr=lr, weight_decay=sec.weight_decay)
        device = _device_of(self.model)
        for epoch in range(1, sec.epochs + 1):
            batches = self._batches(seed, epoch, device)
            if self.option == "auto-rgn":
                optimizer = self._rgn_optimizer(batches, lr, optimizer, plist)
            loss_sum, loss_n, skipped = 0.0, 0, 0
            with torch.enable_grad():
                for xb, yb in batches:
                    loss = cross_entropy(self.model(xb), yb)
                    if guarded_step(optimizer, plist, loss):
                        loss_sum += float(loss.detach()) * len(yb)
                        loss_n += len(yb)
                    else:
                        skipped += 1
            self.n_skipped += skipped
            self.n_steps += len(batches)
            self._evaluate(lr, epoch, loss_sum / loss_n if loss_n else None, skipped)

    def _batches(self, seed: int, epoch: int, device: torch.device) -> list[tuple[Tensor, Tensor]]:
        xt, yt = self.data.x["train"], self.data.y["train"].to(device)
        perm = epoch_permutation(len(xt), seed, epoch)
        out = []
        for idx in _batches(perm, self.section.batch_size, drop_single=self.section.bn_mode == "batch"):
            out.append((xt[idx.to(xt.device)].to(device, non_blocking=True).float().div_(255), yt[idx.to(device)]))
        return out

    def _rgn_optimizer(self, batches: list, lr: float, previous: Any, plist: list) -> torch.optim.Optimizer:
        """Adam rebuilt with this epoch's auto-RGN weights (as the official code does)."""
        sec = self.section
        try:
            optimizer, weights = build_rgn_optimizer(
                self.model, self.candidates, batches[: sec.rgn_batches], lr, sec.weight_decay, sec.rgn_batches
            )
            self.rgn_tables.append(dict(block_weight_table(self.model, weights)))
            return optimizer
        except FloatingPointError:
            # The loss diverged at this lr (non-finite gradients): keep last epoch's weights and optimiser;
            # every step of a diverged model is skipped by the guard anyway.
            self.n_rgn_failed += 1
            return previous if previous is not None else torch.optim.Adam(plist, lr=lr, weight_decay=sec.weight_decay)

    def _evaluate(self, lr: float, epoch: int, train_loss: float | None, skipped: int) -> None:
        data, bs = self.data, self.section.eval_batch_size
        val_c = evaluate(self.model, data.x["val"], data.y["val"], bs)
        test_c = evaluate(self.model, data.x["test"], data.y["test"], bs)
        self.history.append(
            {
                "lr": lr,
                "epoch": epoch,
                "val_correct": val_c,
                "val_acc": 100.0 * val_c / len(data.y["val"]),
                "test_acc": 100.0 * test_c / len(data.y["test"]),
                "train_loss": train_loss,
                "skipped": skipped,
            }
        )


def finetune_cell(
    model: nn.Module,
    pretrained: Mapping[str, Tensor],
    option: str,
    data: CellData,
    section: FinetuneSection,
    seed: int,
    *,
    on_lr_start: LrHook | None = None,
    on_lr_done: Callable[[float], None] | None = None,
) -> dict[str, Any]:
    """Run the lr grid of one (option, data, seed) and return its record (chosen lr and epoch, accuracies, ...).

    `pretrained` is a state_dict copy restored before every learning rate (and at the end), so the cell
    leaves the model as it found it. `on_lr_start(lr, model)` is called right after the restore.
    """
    t0 = time.perf_counter()
    extra: dict[str, Any] = {}
    model.load_state_dict(pretrained)
    candidates = option_params(model, option, section.kind)
    if not candidates:
        raise ValueError(f"finetune option {option!r} with kind={section.kind} selects no tensors")
    if option == "auto-snr":
        candidates, extra = _snr_selection(model, candidates, data, section)
        model.load_state_dict(pretrained)
    runs: dict[float, _LrRun] = {}
    for lr in section.lrs:
        model.load_state_dict(pretrained)
        seed_everything(seed)
        _configure(model, candidates, section.bn_mode)
        if on_lr_start is not None:
            on_lr_start(lr, model)
        runs[lr] = _LrRun(model, option, candidates, data, section)
        runs[lr].run(lr, seed)
        if on_lr_done is not None:
            on_lr_done(lr)
    model.load_state_dict(pretrained)
    set_bn_stats(model, "source")
    model.requires_grad_(False)
    return _cell_record(option, runs, candidates, extra, time.perf_counter() - t0)


def _cell_record(
    option: str, runs: Mapping[float, _LrRun], candidates: list, extra: dict[str, Any], wall_s: float
) -> dict[str, Any]:
    """The record of a cell: the (lr, epoch) with the best validation accuracy, its test accuracy, the history,
    and for auto-rgn the per-block weights of the chosen lr's run."""
    history = [h for r in runs.values() for h in r.history]
    best = select_best(history)
    record: dict[str, Any] = {
        "lr": best["lr"],
        "best_epoch": best["epoch"],
        "val_acc": best["val_acc"],
        "test_acc": best["test_acc"],
        "n_tensors": len(candidates),
        "tuned_params": int(sum(p.numel() for _, p in candidates)),
        "n_skipped": sum(r.n_skipped for r in runs.values()),
        "n_steps": sum(r.n_steps for r in runs.values()),
        "wall_s": round(wall_s, 3),
        "history": history,
        **extra,
    }
    tables = runs[best["lr"]].rgn_tables
    if option == "auto-rgn" and tables:
        record["rgn_failed_epochs"] = sum(r.n_rgn_failed for r in runs.values())
        blocks = list(tables[0])
        # Reported per-block weights: the mean over all epochs of the chosen lr's run (and epoch 1 alone).
        record["rgn_block_weights"] = {b: float(np.mean([t[b] for t in tables])) for b in blocks}
        record["rgn_block_weights_epoch1"] = {b: float(tables[0][b]) for b in blocks}
    return record


# ----------------------------------------------------------------------------------------------- the run


def read_results(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The complete JSON lines of results.jsonl (a torn last line from a crash is dropped and cut off the file)."""
    return read_jsonl(path)


def cell_key(rec: Mapping[str, Any]) -> tuple[str, str, int]:
    return (str(rec["corruption"]), str(rec["option"]), int(rec["seed"]))


def run_finetune(
    cfg: FinetuneConfig,
    out_dir: str | os.PathLike,
    *,
    data: DataLike = None,
    resume: bool = False,
    overwrite: bool = False,
    plot: bool = False,
    target: TargetData | None = None,
) -> dict[str, Any]:
    """Run every (corruption, option, seed) cell of `cfg`, append each record to results.jsonl, write the summary.

    data: where the data lives (`DataContext`; a folder = the data root; None = $TTA_SURGICAL_DATA).
    resume: skip the cells already recorded in `out_dir/results.jsonl` (the config must equal the saved one).
    Without it, a folder that already holds results is an error unless `overwrite`.
    target: a prepared `TargetData` (else built from the config); lets callers share generated images.
    Returns the summary dict (also written to summary.json).
    """
    folder = RunFolder(out_dir, what="finetune run")
    with folder.lock():
        return _run_finetune(cfg, folder, DataContext.of(data), resume, overwrite, plot, target)


def _run_finetune(
    cfg: FinetuneConfig,
    folder: RunFolder,
    data: DataContext,
    resume: bool,
    overwrite: bool,
    plot: bool,
    target: TargetData | None,
) -> dict[str, Any]:
    sec = cfg.finetune
    folder.refuse_existing(resume, overwrite, (RESULTS_FILE, SUMMARY_FILE))
    if resume:
        folder.check_config(cfg)
        done_records = read_jsonl(folder.results)
    else:
        done_records = []
        folder.results.write_bytes(b"")
        folder.clear((SUMMARY_FILE,))
    folder.write_config(cfg)
    done = {cell_key(r) for r in done_records}
    job = _FinetuneJob(cfg, data, target)
    cells = [(c, o, s) for c in sec.corruptions for o in sec.options for s in sec.seeds]
    todo = [cell for cell in cells if cell not in done]
    n_lr = len(sec.lrs)
    bar = _progress(len(cells) * n_lr, (len(cells) - len(todo)) * n_lr, cfg.runtime.progress)
    try:
        with JsonlWriter(folder.results) as writer:
            for corruption in sec.corruptions:
                for rec in job.run_corruption(corruption, [c for c in todo if c[0] == corruption], bar):
                    writer.write(json_safe(rec))
                    writer.sync()  # a finished cell is minutes of work: make it durable at once
                    done_records.append(rec)
    finally:
        if bar is not None:
            bar.close()
    return _finish(folder, job, done_records, plot)


def _progress(total: int, initial: int, enabled: bool) -> Any:
    if not enabled:
        return None
    return tqdm(total=total, initial=initial, desc="finetune", unit="lr")


class _FinetuneJob:
    """The model, its pretrained weights, the target data and the seeds' splits of one finetune run."""

    def __init__(
        self,
        cfg: FinetuneConfig,
        data: DataContext,
        target: TargetData | None,
    ) -> None:
        self.cfg, sec = cfg, cfg.finetune
        self.device = pick_device(cfg.runtime.device)
        model, self.info = create_model_from_config(cfg.model, data)
        self.model = model.to(self.device)
        validate_options(self.model, sec.options, sec.kind)
        self.pretrained = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        if target is None:
            target = TargetData(sec, data=data, device=self.device)
        self.target = target
        self.per_class = per_class_train(sec.n_train, target.n_classes)
        self.splits = {s: target.split(self.per_class, s) for s in sec.seeds}
        # The labeled images each seed trains on: all of its train split, or a nested class-balanced budget of it.
        self.train_rows = {s: self._train_rows(sp) for s, sp in self.splits.items()}

    def _train_rows(self, split: Split) -> np.ndarray:
        budget = self.cfg.finetune.train_budget
        if budget is None or budget == len(split.train):
            return split.train
        per_class = per_class_train(budget, self.target.n_classes)
        return budget_subset(split.train, self.target.source_labels, per_class, split.seed)

    def run_corruption(self, corruption: str, cells: Sequence[tuple[str, str, int]], bar: Any) -> Iterable[dict]:
        """Yield the record of every (corruption, option, seed) cell of `cells`, one corruption's images loaded."""
        if not cells:
            return
        sec = self.cfg.finetune
        seeds = {c[2] for c in cells}
        need = np.unique(
            np.concatenate([np.concatenate([sp.train, sp.val, sp.test]) for s, sp in self.splits.items() if s in seeds])
        )
        pool = self.target.images(corruption, need)
        row_of = {int(i): k for k, i in enumerate(need.tolist())}
        labels = torch.as_tensor(self.target.labels, dtype=torch.long)
        # Small sets (CIFAR: ~1,200 images, 4 MB) live on the device; ImageNet-sized ones stay in host RAM.
        keep_on = self.device if pool.numel() < (1 << 31) else torch.device("cpu")
        source_acc: dict[int, tuple[float, ...]] = {}
        for _, option, seed in cells:
            sp = self.splits[seed]
            rows = {"train": self.train_rows[seed], "val": sp.val, "test": sp.test}
            data = CellData(
                {p: pool[torch.as_tensor([row_of[int(i)] for i in r])].to(keep_on) for p, r in rows.items()},
                {p: labels[torch.as_tensor(r)] for p, r in rows.items()},
                sp,
            )
            if seed not in source_acc:
                source_acc[seed] = self._source_accuracy(data)
            if bar is not None:
                bar.set_postfix_str(f"{corruption} {option} seed {seed}")
            rec = finetune_cell(
                self.model,
                self.pretrained,
                option,
                data,
                sec,
                seed,
                on_lr_done=(lambda _lr: bar.update(1)) if bar is not None else None,
            )
            yield {
                "corruption": corruption,
                "task": sec.task,
                "option": option,
                "seed": seed,
                "severity": sec.severity,
                "kind": sec.kind,
                "bn_mode": sec.bn_mode,
                "source_val_acc": source_acc[seed][0],
                "source_test_acc": source_acc[seed][1],
                "split": {**sp.sizes(), "train_used": len(rows["train"])},
                "device": str(self.device),
                **rec,
            }

    def _source_accuracy(self, data: CellData) -> tuple[float, ...]:
        """(val, test) accuracy of the pretrained model, BN as the protocol runs it."""
        sec = self.cfg.finetune
        self.model.load_state_dict(self.pretrained)
        _configure(self.model, [], sec.bn_mode)
        return tuple(
            100.0 * evaluate(self.model, data.x[p], data.y[p], sec.eval_batch_size) / len(data.y[p])
            for p in ("val", "test")
        )


def _finish(folder: RunFolder, job: _FinetuneJob, records: list[dict[str, Any]], plot: bool) -> dict[str, Any]:
    """Summarise the records, write summary.json / summary.md (and the auto-RGN plot), return the summary."""
    cfg, sec = job.cfg, job.cfg.finetune
    summary = summarize(records, sec.options, sec.corruptions, sec.seeds)
    summary.update(
        {
            "model": cfg.model.name,
            "model_pretrained": bool(job.info.pretrained),
            "model_warnings": list(job.info.warnings),
            "source": sec.source,
            "task": sec.task,
            "train_budget": sec.train_budget,
            "severity": sec.severity,
            "kind": sec.kind,
            "bn_mode": sec.bn_mode,
            "n_classes": job.target.n_classes,
            "split_per_class": {"train": job.per_class, "val": sec.n_val_per_class, "test": sec.n_test_per_class},
        }
    )
    summary = json_safe(summary)
    folder.write_summary(summary, summary_markdown(summary))
    if plot and summary.get("rgn_block_weights"):
        try:
            summary["plot"] = str(plot_rgn_weights(summary, folder.path / "rgn_weights.png"))
        except ImportError as err:
            print(f"no plot: {err}")
    return summary
