"""The online-vs-supervised study's settings and its sweep cells: `ShiftStudy` splits the target set per seed, draws
the online pool, plans both sides as sweep-file mappings, runs (or reuses) them through `tta_surgical.sweep` and
reads each cell's result (the online runs scored by `scoring.score_run`). The protocol: `tta_surgical.studies`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..config import (
    Config,
    ConfigError,
    MethodSettings,
    OptimConfig,
    apply_overrides,
    from_dict,
    method_config,
    to_dict,
)
from ..data.context import DataContext, DataLike
from ..fileio import atomic_write_text
from ..finetune.config import AUTO_OPTIONS, FinetuneConfig
from ..finetune.data import TargetData, online_pool, per_class_train
from ..runfolder import RunFolder
from ..runtime import pick_device
from ..streams import StreamSpec, source_class
from ..sweep import cell_dir, load_sweep, run_sweep
from .scoring import score_run

__all__ = [
    "ONLINE_MODES",
    "ShiftStudy",
    "Launch",
    "OnlineSettings",
    "online_method",
    "online_options",
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
    has_rgn = "weighting" in {f.name for f in dataclasses.fields(MethodSettings.variant(method))}
    return [o for o in options if o not in AUTO_OPTIONS or (o == "auto-rgn" and has_rgn)]


def _section_overrides(cfg: Any, sections: Sequence[str]) -> list[str]:
    """`section={...}` overrides that set every key of these sections (JSON is valid YAML)."""
    return [f"{name}={json.dumps(to_dict(getattr(cfg, name)))}" for name in sections]


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class ShiftStudy:
    """One target task's study: the finetune config, the target data, each seed's split and online pool, and the
    sweep cells of both sides (the protocol: `tta_surgical.studies`)."""

    def __init__(
        self,
        ft_cfg: FinetuneConfig,
        options: Sequence[str],
        online: OnlineSettings,
        out: str | os.PathLike,
        *,
        data: DataLike = None,
        target: TargetData | None = None,
    ) -> None:
        if list(ft_cfg.finetune.options) != list(options):
            ft_cfg = apply_overrides(ft_cfg, [f"finetune.options={json.dumps(list(options))}"])
        self.cfg, self.sec, self.online = ft_cfg, ft_cfg.finetune, online
        self.options = list(options)
        self.out = Path(out)
        self.data = DataContext.of(data)
        self.device = pick_device(ft_cfg.runtime.device)
        self.target = target or TargetData(self.sec, data=self.data, device=self.device)
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
            data=self.data,
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
        data, keys = self.supervised_cells(budgets)
        folder = self.out / "supervised"
        sweep = self.run_cells(data, folder, launch)
        return {k: RunFolder(cell_dir(folder, cell)).read_summary() for k, cell in zip(keys, sweep.cells)}

    def online_results(self, seed: int, n_images: Sequence[int | None], launch: Launch) -> dict[tuple, dict]:
        """Run (or reuse) one seed's online cells and score them; (option, domains, n) -> per-corruption numbers."""
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
                cache[tag] = score_run(run_dir, cfg, tests, data=self.data)
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
    return from_dict(Config, plain)
