"""Online (unlabeled) vs supervised surgical adaptation of one target task, block by block, as sweep cells.

The study behind `tta-surgical report`. For each seed of the finetune config, the target set is split once
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

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ..config import Config, ConfigError, OptimConfig, apply_overrides, method_config, to_dict
from ..fileio import atomic_write_text
from ..finetune.config import AUTO_OPTIONS, FinetuneConfig
from ..finetune.data import TargetData, online_pool, per_class_train
from ..finetune.tasks import get_task

__all__ = [
    "ONLINE_MODES",
    "Comparison",
    "Launch",
    "OnlineSettings",
    "online_method",
    "score_run",
]

ONLINE_MODES = ("reset", "continual")
REFERENCES = ("norm",)  # the default online reference: BatchNorm statistics of the test batch, no parameter update
# Stream keys the study sets itself (the online stream is defined by the split, the task and the mode).
FIXED_STREAM_KEYS = ("domains", "severities", "source", "path", "indices", "n_examples", "reset")
TEST_SCORES = "test_scores.json"


@dataclass(frozen=True)
class OnlineSettings:
    """The online side of the study.

    method: the registered online method run on each block option (its settings need `blocks`).
    mode: `reset` (the model restored at each corruption: one cell per corruption) or `continual` (no reset).
    n_images: images per corruption drawn (seeded) from the online pool; None = all of it.
    include_test: whether the pool holds the supervised test rows (unlabeled) or excludes them too.
    references: non-adapting methods run once per corruption for reference (e.g. norm, source; () = none).
    overrides: method.*, optim.*, stream.* overrides of the online runs (not the keys the study fixes).
    """

    method: str = "surgical"
    mode: str = "reset"
    n_images: int | None = None
    include_test: bool = True
    references: tuple[str, ...] = REFERENCES
    overrides: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.mode not in ONLINE_MODES:
            raise ConfigError(f"online mode {self.mode!r} is not valid; choose one of: {', '.join(ONLINE_MODES)}")
        if self.n_images is not None and self.n_images < 1:
            raise ConfigError(f"online images per corruption must be >= 1 or all, got {self.n_images}")
        for ref in self.references:
            from ..config import MethodSettings

            if "blocks" in {f.name for f in dataclasses.fields(MethodSettings.variant(ref))}:
                raise ConfigError(f"online reference {ref!r} adapts parameters; references are e.g. norm or source")
        for text in self.overrides:
            key = text.split("=", 1)[0].strip()
            if key == "method.blocks":
                raise ConfigError("method.blocks is set per option by the study; choose the blocks with the options")
            if key.startswith("stream.") and key.split(".", 1)[1] in FIXED_STREAM_KEYS:
                raise ConfigError(
                    f"{key} is fixed by the study (the online stream is the pool outside the supervised train/val "
                    "split); set finetune.corruptions / finetune.severity, the online mode or the online images"
                )


@dataclass(frozen=True)
class Launch:
    """How sweep cells run: `tta_surgical.sweep.run_sweep`'s launcher, workers and Ray address."""

    launcher: str = "local"
    max_parallel: int | None = None
    address: str | None = None
    progress: bool = True


def online_method(name: str, option: str) -> Any:
    """The settings of online method `name` adapting `option`: every parameter of its blocks (`kind: all`, the
    paper's surgical choice) with test-batch BatchNorm statistics where the method has those settings; `auto-rgn`
    = every tensor with per-tensor learning rates from auto-RGN (needs `method.weighting`)."""
    from ..config import MethodSettings

    cls = MethodSettings.variant(name)
    fields = {f.name for f in dataclasses.fields(cls)}
    if "blocks" not in fields:
        raise ConfigError(f"online method {name!r} adapts no blocks; choose an adapting method (e.g. surgical)")
    settings: dict[str, Any] = {"blocks": ["all" if option in AUTO_OPTIONS else option]}
    settings.update({k: v for k, v in (("kind", "all"), ("bn_stats", "batch")) if k in fields})
    if option == "auto-rgn":
        settings["weighting"] = "auto-rgn"
    return method_config(name, **settings)


def online_options(method: str, options: Sequence[str]) -> list[str]:
    """The options with an online form: block specs always, auto-rgn when the method has `weighting: auto-rgn`
    (auto-snr needs labels and has none)."""
    from ..config import MethodSettings

    has_rgn = "weighting" in {f.name for f in dataclasses.fields(MethodSettings.variant(method))}
    return [o for o in options if o not in AUTO_OPTIONS or (o == "auto-rgn" and has_rgn)]


def _section_overrides(cfg: Any, sections: Sequence[str]) -> list[str]:
    """`section={...}` overrides that set every key of these sections (JSON is valid YAML)."""
    return [f"{name}={json.dumps(to_dict(getattr(cfg, name)))}" for name in sections]


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Comparison:
    """One target task's study: the finetune config, the target data, each seed's split and online pool, and the
    sweep cells of both sides (see the module docstring)."""

    def __init__(
        self,
        ft_cfg: FinetuneConfig,
        options: Sequence[str],
        online: OnlineSettings,
        out: str | os.PathLike,
        *,
        data_root: str | os.PathLike | None = None,
        frost_dir: str | os.PathLike | None = None,
        target: TargetData | None = None,
    ) -> None:
        from ..corruptions.textures import default_frost_dir
        from ..runtime import pick_device

        if list(ft_cfg.finetune.options) != list(options):
            ft_cfg = apply_overrides(ft_cfg, [f"finetune.options={json.dumps(list(options))}"])
        self.cfg, self.sec, self.online = ft_cfg, ft_cfg.finetune, online
        self.options = list(options)
        self.out = Path(out)
        # The frost textures: <data-root>/frost when present (the target images of `frost` need them here too).
        self.data_root, self.frost_dir = data_root, default_frost_dir(frost_dir, data_root)
        self.device = pick_device(ft_cfg.runtime.device)
        self.target = target or TargetData(self.sec, data_root=data_root, frost_dir=self.frost_dir, device=self.device)
        self.per_class = per_class_train(self.sec.n_train, self.target.n_classes)
        self.splits = {s: self.target.split(self.per_class, s) for s in self.sec.seeds}
        n_rows = len(self.target.source_labels)
        self.pools = {s: online_pool(n_rows, sp, online.include_test) for s, sp in self.splits.items()}
        self.online_options = online_options(online.method, self.options)

    def count(self, seed: int, n: int | None) -> int | None:
        """`stream.n_examples` of an online cell asking for `n` images (None = the whole pool of `seed`)."""
        return None if n is None or n >= len(self.pools[seed]) else int(n)

    # ------------------------------------------------------------------------------------------ cell plans
    def supervised_cells(self, budgets: Sequence[int | None] = (None,)) -> tuple[dict[str, Any], list[tuple]]:
        """The finetune sweep (as a sweep-file mapping) and each cell's key (corruption, train budget)."""
        base = apply_overrides(self.cfg, ["runtime.progress=false"])
        cells, keys = [], []
        for c in self.sec.corruptions:
            for b in budgets:
                budget = None if b is None or b >= self.sec.n_train else int(b)
                cells.append({"finetune.corruptions": [c], "finetune.train_budget": budget})
                keys.append((c, budget))
        data = {
            "name": f"supervised-{self.sec.task}",
            "kind": "finetune",
            "overrides": _section_overrides(base, ("model", "finetune", "runtime")),
            "cells": cells,
            "resources": {"num_gpus": 0, "num_cpus": 1},
        }
        return data, keys

    def online_base(self, seed: int) -> Config:
        """The run config shared by the online cells of `seed` (method and domains are set per cell)."""
        from ..streams import StreamSpec, source_class

        sec, onl = self.sec, self.online
        on_the_fly = source_class(sec.source).corrupts_on_the_fly
        stream = StreamSpec(
            source=sec.source,
            path=None if on_the_fly else str(self.target.root),
            domains=tuple(sec.corruptions),
            severities=(sec.severity,),
            order="sequential",
            shuffle=True,
            seed=int(seed),
            reset="per_domain" if onl.mode == "reset" else "never",
            indices=tuple(int(i) for i in self.pools[seed]),
        )
        cfg = Config(
            model=self.cfg.model,
            method=online_method(onl.method, self.online_options[0] if self.online_options else "all"),
            optim=OptimConfig(name="adam", lr=1e-3),
            stream=stream,
            runtime=dataclasses.replace(self.cfg.runtime, progress=False),
        )
        return apply_overrides(cfg, onl.overrides)

    def _cell_method(self, base: Config, option: str) -> dict[str, Any]:
        """The full method section of one option's cell (the user's method.* overrides applied over it)."""
        if option in self.online.references:
            return to_dict(method_config(option))
        method_over = [o for o in self.online.overrides if o.split("=", 1)[0].strip().startswith("method.")]
        cfg = apply_overrides(dataclasses.replace(base, method=online_method(self.online.method, option)), method_over)
        return to_dict(cfg.method)

    def online_cells(
        self, seed: int, n_images: Sequence[int | None] | None = None
    ) -> tuple[dict[str, Any], list[tuple]]:
        """The run sweep of one seed (a sweep-file mapping) and each cell's key (option, corruptions, n_images);
        n_images: the stream lengths to run (default: the study's own)."""
        n_images = (self.online.n_images,) if n_images is None else n_images
        base = self.online_base(seed)
        groups = [[c] for c in self.sec.corruptions] if self.online.mode == "reset" else [list(self.sec.corruptions)]
        options = self.online_options + list(self.online.references)
        cells, keys = [], []
        for domains in groups:
            for n in n_images:
                count = self.count(seed, n)
                for option in options:
                    if option in self.online.references and count != self.count(seed, self.online.n_images):
                        continue  # the reference runs at the study's own stream length only
                    method = self._cell_method(base, option)
                    cells.append({"method": method, "stream.domains": domains, "stream.n_examples": count})
                    keys.append((option, tuple(domains), count))
        data = {
            "name": f"online-{self.sec.task}-seed{seed}",
            "kind": "run",
            "overrides": _section_overrides(base, ("model", "optim", "stream", "runtime")),
            "cells": cells,
            "resources": {"num_gpus": 0, "num_cpus": 1},
        }
        return data, keys

    # ------------------------------------------------------------------------------------------ running
    def run_cells(self, data: Mapping[str, Any], folder: Path, launch: Launch) -> Any:
        """Write `folder/sweep.yaml`, load it as any sweep file is loaded, run its unfinished cells; the Sweep."""
        from ..sweep import load_sweep, run_sweep

        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "sweep.yaml"
        head = (
            "# Written by `tta-surgical report`; run it elsewhere (e.g. a Ray cluster) with\n"
            f"#   tta-surgical sweep {path} --out {folder} --resume --launcher ray\n"
            "# and rerun the same report command: finished cells are reused.\n"
        )
        atomic_write_text(path, head + yaml.safe_dump(dict(data), sort_keys=False, width=1 << 30))
        sweep = load_sweep(path)
        result = run_sweep(
            sweep,
            folder,
            launcher=launch.launcher,
            max_parallel=launch.max_parallel,
            address=launch.address,
            resume=True,
            data_root=self.data_root,
            frost_dir=self.frost_dir,
            progress=launch.progress,
        )
        if result.failed:
            first = result.failed[0]
            raise RuntimeError(
                f"{len(result.failed)} cell(s) of {folder} failed, e.g. cell {first.cell.index} "
                f"({first.cell.label()}): {first.reason}; see {first.log}"
            )
        return sweep

    # ------------------------------------------------------------------------------------------ results
    def supervised_results(self, budgets: Sequence[int | None], launch: Launch) -> dict[tuple, dict[str, Any]]:
        """Run (or reuse) the finetune cells; (corruption, budget) -> that cell's finetune summary."""
        from ..runfolder import RunFolder
        from ..sweep import cell_dir

        data, keys = self.supervised_cells(budgets)
        folder = self.out / "supervised"
        sweep = self.run_cells(data, folder, launch)
        return {k: RunFolder(cell_dir(folder, cell)).read_summary() for k, cell in zip(keys, sweep.cells)}

    def online_results(self, seed: int, n_images: Sequence[int | None], launch: Launch) -> dict[tuple, dict]:
        """Run (or reuse) one seed's online cells and score them; (option, domains, n) -> per-corruption numbers."""
        from ..runfolder import RunFolder
        from ..sweep import cell_dir

        data, keys = self.online_cells(seed, n_images)
        folder = self.out / "online" / f"seed{seed}"
        sweep = self.run_cells(data, folder, launch)
        split = self.splits[seed]
        scores_path = folder / TEST_SCORES
        cache = json.loads(scores_path.read_text()) if scores_path.is_file() else {}
        out: dict[tuple, dict] = {}
        for key, cell in zip(keys, sweep.cells):
            run_dir = cell_dir(folder, cell)
            summary = RunFolder(run_dir).read_summary()
            tag = f"{cell.id}:{self._test_digest(split)}"
            if tag not in cache:
                cfg = _run_config(cell.config)
                tests = self.test_sets(split, key[1])
                cache[tag] = score_run(run_dir, cfg, tests, data_root=self.data_root, frost_dir=self.frost_dir)
                atomic_write_text(scores_path, json.dumps(cache, indent=1) + "\n")
            scored = cache[tag]
            out[key] = {
                "errors": {c: float(summary["errors"][c]) for c in key[1]},
                "online_error": float(summary["online_error"]),
                "n_images": int(summary["n_images"]),
                "accuracy_test": scored["accuracy"],
                "rgn_block_weights": scored.get("rgn_block_weights"),
            }
        return out

    def _test_digest(self, split: Any) -> str:
        """What a test score depends on besides the run: the task, the test rows and how their images are made."""
        sec = self.sec
        images = (sec.source, sec.path, sec.limit, sec.severity, sec.generation_seed, sec.generation_batch_size)
        return _digest(sec.task, split.test.tolist(), images)

    def test_sets(self, split: Any, corruptions: Sequence[str]) -> dict[str, tuple[Any, Any]]:
        """Each corruption's supervised test split: (uint8 images, task labels), exactly what `finetune` tests on."""
        return {c: self.target.labeled(c, split.test) for c in corruptions}


def _run_config(plain: Mapping[str, Any]) -> Config:
    from ..config import from_dict

    return from_dict(Config, plain)


def score_run(
    folder: str | os.PathLike,
    cfg: Config,
    tests: Mapping[str, tuple[Any, Any]],
    *,
    data_root: str | os.PathLike | None = None,
    frost_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """The adapted model of a finished run (its final `state.pt`) on labeled test sets: accuracy % per set through
    the method's `predict` (batches of the stream's batch size), and the per-block auto-RGN weights of the
    method's latest refresh when it has them. Changes nothing in `folder`."""
    import torch

    from ..autotune import block_weight_table
    from ..engine import build
    from ..runfolder import RunFolder

    state = RunFolder(folder).load_checkpoint()
    if state is None:
        raise FileNotFoundError(f"{folder} holds no state.pt: the run has not finished")
    # Built exactly as the run built it (model, method, its context), then given the run's final state.
    built = build(cfg, data_root=data_root, frost_dir=frost_dir)
    method = built.method
    method.load_state_dict(state["method"])
    bs = int(cfg.stream.batch_size)
    accuracy = {}
    for name, (x, y) in tests.items():
        correct = 0
        for a in range(0, len(x), bs):
            xb = x[a : a + bs].to(built.device).float().div_(255)
            if cfg.runtime.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            pred = method.predict(xb).argmax(1).cpu()
            correct += int((pred == y[a : a + bs]).sum())
        accuracy[name] = 100.0 * correct / len(y)
    result: dict[str, Any] = {"accuracy": accuracy}
    weights = getattr(method, "weights", None)
    if weights:
        result["rgn_block_weights"] = block_weight_table(built.model, weights)
    return result


@dataclass
class Gathered:
    """Numbers of one study, per option and corruption (means over seeds); see `gather`."""

    online_error: dict[str, dict[str, float]] = field(default_factory=dict)
    online_test: dict[str, dict[str, float]] = field(default_factory=dict)
    supervised_test: dict[str, dict[str, float]] = field(default_factory=dict)
    rgn_supervised: dict[str, dict[str, float]] = field(default_factory=dict)
    rgn_online: dict[str, dict[str, float]] = field(default_factory=dict)
    no_adaptation: dict[str, float] = field(default_factory=dict)
    n_online_images: dict[str, int] = field(default_factory=dict)


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def gather(
    comp: Comparison,
    supervised: Mapping[tuple, Mapping[str, Any]],
    online: Mapping[int, Mapping[tuple, Mapping[str, Any]]],
    budget: int | None = None,
    n_images: int | None = None,
) -> Gathered:
    """Per option and corruption, the means over seeds of one (labeled budget, online images) point."""
    g = Gathered()
    sec = comp.sec
    for c in sec.corruptions:
        summ = supervised[(c, None if budget is None or budget >= sec.n_train else budget)]
        for o in comp.options:
            acc = summ["accuracy"].get(o, {}).get(c)
            if acc is not None:
                g.supervised_test.setdefault(o, {})[c] = float(acc)
        if summ.get("source_accuracy", {}).get(c) is not None:
            g.no_adaptation[c] = float(summ["source_accuracy"][c])
        if summ.get("rgn_block_weights", {}).get(c):
            g.rgn_supervised[c] = dict(summ["rgn_block_weights"][c])
    options = comp.online_options + list(comp.online.references)
    for o in options:
        for c in sec.corruptions:
            recs = [
                rec
                for seed, by_key in online.items()
                for (opt, doms, count), rec in by_key.items()
                if opt == o and c in doms and count == comp.count(seed, n_images)
            ]
            if not recs:
                continue
            g.online_error.setdefault(o, {})[c] = float(np.mean([r["errors"][c] for r in recs]))
            g.online_test.setdefault(o, {})[c] = float(np.mean([r["accuracy_test"][c] for r in recs]))
            g.n_online_images[c] = int(recs[0]["n_images"] // len(recs[0]["errors"]))
            weights = [r["rgn_block_weights"] for r in recs if r.get("rgn_block_weights")]
            if o == "auto-rgn" and weights:
                g.rgn_online[c] = {b: float(np.mean([w[b] for w in weights])) for b in weights[0]}
    return g


def top_block(tables: Sequence[Mapping[str, float]]) -> str | None:
    """The block with the largest mean weight over `tables` (block -> weight), or None without tables."""
    if not tables:
        return None
    blocks = list(tables[0])
    means = {b: float(np.mean([t[b] for t in tables])) for b in blocks}
    return max(blocks, key=lambda b: means[b])


def task_report(comp: Comparison, g: Gathered, blocks: Sequence[str]) -> dict[str, Any]:
    """The report.json entry of one task: per option the four numbers (means over corruptions), per corruption
    the detail, the references, the auto-RGN weights and the verdict rows."""
    from ..finetune.tasks import shift_level

    sec = comp.sec
    cs = list(sec.corruptions)

    def mean_over(table: Mapping[str, Mapping[str, float]], o: str) -> float | None:
        vals = [table.get(o, {}).get(c) for c in cs]
        return _mean([v for v in vals if v is not None]) if all(v is not None for v in vals) else None

    options: dict[str, Any] = {}
    for o in comp.options:
        entry: dict[str, Any] = {
            "online_error_stream": mean_over(g.online_error, o),
            "online_accuracy_test": mean_over(g.online_test, o),
            "supervised_accuracy_test": mean_over(g.supervised_test, o),
            "rgn_top_block": None,
        }
        if o == "auto-rgn":
            entry["rgn_top_block"] = {
                "supervised": top_block([g.rgn_supervised[c] for c in cs if c in g.rgn_supervised]),
                "online": top_block([g.rgn_online[c] for c in cs if c in g.rgn_online]),
            }
        entry["per_corruption"] = {
            c: {
                "online_error_stream": g.online_error.get(o, {}).get(c),
                "online_accuracy_test": g.online_test.get(o, {}).get(c),
                "supervised_accuracy_test": g.supervised_test.get(o, {}).get(c),
            }
            for c in cs
        }
        options[o] = entry
    report: dict[str, Any] = {
        "task": sec.task,
        "model": comp.cfg.model.name,
        "severity": sec.severity,
        "seeds": list(sec.seeds),
        "corruptions": cs,
        "shift_levels": {c: shift_level(sec.task, c) for c in cs},
        "blocks": list(blocks),
        "options": options,
        "reference": {
            "no_adaptation_accuracy_test": {**g.no_adaptation, "mean": _mean(list(g.no_adaptation.values()))},
            **{
                ref: {
                    "online_error_stream": g.online_error.get(ref, {}),
                    "online_accuracy_test": g.online_test.get(ref, {}),
                }
                for ref in comp.online.references
            },
        },
        "rgn_block_weights": {"supervised": g.rgn_supervised, "online": g.rgn_online},
        "online": {
            "method": comp.online.method,
            "mode": comp.online.mode,
            "images_per_corruption": g.n_online_images,
            "pool_includes_test": comp.online.include_test,
            "overrides": list(comp.online.overrides),
        },
        "supervised": {
            "n_train": sec.n_train,
            "n_val_per_class": sec.n_val_per_class,
            "n_test_per_class": sec.n_test_per_class,
            "lrs": list(sec.lrs),
            "epochs": sec.epochs,
        },
    }
    report["verdict"] = verdict_rows(report)
    return report


EARLY_BLOCKS = ("input", "block1")  # "an early block" of the paper's input-level claim


def _ordering(level: str, score: Mapping[str, float], blocks: Sequence[str]) -> bool | None:
    """Whether `score` (higher = better) shows the paper's ordering for a shift level; None when the options
    needed are missing or the paper makes no claim for the level.

    input: an early block (input or block1) beats tuning all layers, and the head is the worst of the single
    blocks and all. label: the head beats every other single block and all layers.
    """
    singles = [b for b in blocks if b in score]
    if "all" not in score or "head" not in score or len(singles) < 2:
        return None
    if level == "input":
        early = [score[b] for b in EARLY_BLOCKS if b in score]
        if not early:
            return None
        worst = min(score[b] for b in [*singles, "all"])
        return max(early) > score["all"] and score["head"] == worst and score["head"] < max(early)
    if level == "label":
        return all(score["head"] > score[b] for b in [*singles, "all"] if b != "head")
    return None


def _verdict_row(report: Mapping[str, Any], label: str, level: str, cs: Sequence[str]) -> dict[str, Any]:
    blocks = report["blocks"]
    opts = report["options"]

    def score(metric: str, sign: float) -> dict[str, float]:
        out = {}
        for o, e in opts.items():
            vals = [e["per_corruption"][c][metric] for c in cs]
            if all(v is not None for v in vals):
                out[o] = sign * float(np.mean(vals))
        return out

    def best(scores: Mapping[str, float]) -> str | None:
        singles = {b: v for b, v in scores.items() if b in blocks}
        return max(singles, key=singles.get) if singles else None

    def same(a: str | None, b: str | None) -> bool | None:
        return None if a is None or b is None else a == b

    online = score("online_error_stream", -1.0)  # lower error = better
    sup = score("supervised_accuracy_test", 1.0)
    # On the test split the online models answer in the source's labels: meaningless for a relabelling task.
    online_test = {} if get_task(report["task"]).relabels else score("online_accuracy_test", 1.0)
    weights = report["rgn_block_weights"]
    rgn_sup = top_block([weights["supervised"][c] for c in cs if c in weights["supervised"]])
    rgn_on = top_block([weights["online"][c] for c in cs if c in weights["online"]])
    best_on, best_on_test, best_sup = best(online), best(online_test), best(sup)
    return {
        "task": report["task"],
        "shift": level,
        "label": label,
        "corruptions": list(cs),
        "best_block_online": best_on,
        "best_block_online_test": best_on_test,
        "best_block_supervised": best_sup,
        "rgn_top_supervised": rgn_sup,
        "rgn_top_online": rgn_on,
        "rgn_matches_oracle_supervised": same(rgn_sup, best_sup),
        "rgn_matches_oracle_online": same(rgn_on, best_on),
        "rgn_matches_oracle_online_test": same(rgn_on, best_on_test),
        "paper_ordering_supervised": _ordering(level, sup, blocks),
        "paper_ordering_online": _ordering(level, online, blocks),
    }


def verdict_rows(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The paper's Table 1 in our setting: per corruption and per shift level (mean over its corruptions), the
    best single block online (lowest error on its stream; and highest accuracy of the adapted model on the test
    split, for tasks that keep the source's labels) and supervised (highest test accuracy), auto-RGN's top-weighted
    block on each side and whether it is the oracle's, and whether the paper's ordering holds."""
    levels: dict[str, list[str]] = {}
    for c, level in report["shift_levels"].items():
        levels.setdefault(level, []).append(c)
    rows = []
    for level, cs in levels.items():
        rows += [_verdict_row(report, c, level, [c]) for c in cs]
        if len(cs) > 1:
            rows.append(_verdict_row(report, f"mean of {len(cs)}", level, cs))
    return rows


def model_blocks(cfg: FinetuneConfig) -> list[str]:
    """The block names of the study's model, in order (its shape only: no weights are loaded)."""
    from ..models import block_map, create_model_from_config

    shape = dataclasses.replace(cfg.model, pretrained=False, checkpoint=None, allow_random=True)
    return list(block_map(create_model_from_config(shape)[0]))


def run_study(comp: Comparison, launch: Launch) -> dict[str, Any]:
    """Both sides of the study at its own stream length, scored and gathered: the task's report.json entry."""
    supervised = comp.supervised_results((None,), launch)
    online = {s: comp.online_results(s, (comp.online.n_images,), launch) for s in comp.sec.seeds}
    gathered = gather(comp, supervised, online, None, comp.online.n_images)
    return task_report(comp, gathered, model_blocks(comp.cfg))


def run_budgets(
    comp: Comparison, labeled: Sequence[int], unlabeled: Sequence[int | None], launch: Launch
) -> dict[str, Any]:
    """Accuracy on the supervised test split vs the number of target images used, per option: labeled training
    images (supervised; nested class-balanced subsets of the training split) and unlabeled streamed images
    (online; seeded subsets of the pool). Each point is a sweep cell; the result is budgets.json's content."""
    sec = comp.sec
    for b in labeled:
        if b < comp.target.n_classes or b % comp.target.n_classes or b > sec.n_train:
            raise ValueError(
                f"labeled budget {b} must be a multiple of the {comp.target.n_classes} classes in "
                f"{comp.target.n_classes}..{sec.n_train} (finetune.n_train)"
            )
    supervised = comp.supervised_results(list(labeled), launch)
    online = {s: comp.online_results(s, list(unlabeled), launch) for s in sec.seeds}
    out: dict[str, Any] = {
        "task": sec.task,
        "model": comp.cfg.model.name,
        "corruptions": list(sec.corruptions),
        "seeds": list(sec.seeds),
        "labeled": [int(b) for b in labeled],
        "unlabeled": [],
        "supervised": {o: {} for o in comp.options},
        "online": {o: {} for o in comp.online_options},
        "supervised_per_corruption": {o: {} for o in comp.options},
        "online_per_corruption": {o: {} for o in comp.online_options},
    }
    for b in labeled:
        g = gather(comp, supervised, online, b, None)
        for o in comp.options:
            vals = g.supervised_test.get(o, {})
            out["supervised"][o][str(b)] = _mean(list(vals.values())) if len(vals) == len(sec.corruptions) else None
            out["supervised_per_corruption"][o][str(b)] = dict(vals)
        out["no_adaptation"] = _mean(list(g.no_adaptation.values()))
    for n in unlabeled:
        g = gather(comp, supervised, online, labeled[-1], n)
        size = int(np.mean(list(g.n_online_images.values()))) if g.n_online_images else n
        out["unlabeled"].append(size)
        for o in comp.online_options:
            vals = g.online_test.get(o, {})
            full = len(vals) == len(sec.corruptions)
            out["online"][o][str(size)] = _mean(list(vals.values())) if full else None
            out["online_per_corruption"][o][str(size)] = dict(vals)
    return out
