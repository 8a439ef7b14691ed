"""`tta-surgical report`: online (unsupervised) vs supervised surgical adaptation, block by block, on the same images.

"The same target data", precisely: for each seed of the finetune config, the supervised protocol splits the
target set into labeled train / val / test (`tta_surgical.finetune.split_indices`; the same indices for every
corruption). The online side adapts over a stream made of exactly that seed's *test* images of each corruption
(severity `finetune.severity`), in a seeded random order (stream.shuffle=true, stream.seed=<split seed>), with
the model reset to the pretrained weights at each corruption (reset per_domain), and its accuracy is the online
accuracy over those images. So both settings are scored on identical images; the online side never sees the
labeled train / val images. Each side's accuracy is averaged over the seeds (and then over corruptions).

The online method is `surgical` (entropy minimisation, as configs/surgical_<block>.yaml): blocks=[<option>],
kind all, BatchNorm with test-batch statistics, Adam lr 1e-3 (override with method.*, optim.*, stream.* keys).
auto-rgn runs online as configs/surgical_autorgn.yaml (every tensor, lr x its auto-RGN weight of the entropy
gradient) when the installed method supports `method.weighting=auto-rgn`; auto-snr has no online counterpart
(shown as "–").

The online stream reads the test images where they are: the finetune source's files at the test rows
(`stream.indices`) for CIFAR-10-C and ImageNet-C, or, for images the finetune side generates (source cifar10),
those images handed over in memory (`stream.source: memory`); nothing is copied to disk.

Layout of --out: `supervised/` (a `tta-surgical finetune` output folder), `online/seed<k>/<option>/` (one
`tta-surgical run` folder each), and `report.md`, `report.json` (and `report.png` with --plot). Rerunning the
same command resumes: finished cells and runs are reused, interrupted ones continued.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..hub import DATA_ENV

HELP = "online vs supervised surgical adaptation per block, on the same target images (side-by-side table)"
DESCRIPTION = (
    "Run the supervised few-shot fine-tuning (tta-surgical finetune) and the online surgical method (entropy "
    "minimisation on one block, tta-surgical run) for the same options and corruptions, the online stream being "
    "exactly the supervised test images, and tabulate their accuracies side by side. Trailing key=value "
    "overrides: finetune.* go to the supervised side; method.*, optim.*, stream.* to the online side; model.* and "
    "runtime.* to both. Rerun the same command to resume."
)

ONLINE_SECTIONS = ("method", "optim", "stream")
SUPERVISED_SECTIONS = ("finetune",)
SHARED_SECTIONS = ("model", "runtime")


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="model name (sets model.name; default: the finetune config's)")
    parser.add_argument(
        "--corruptions", default=None, help="comma-separated corruptions (default: the finetune config's)"
    )
    parser.add_argument(
        "--options",
        default="input,block1,block2,block3,head,all",
        help="comma-separated block options (default input,block1,block2,block3,head,all); use ';' to separate "
        "options that are themselves comma lists",
    )
    parser.add_argument(
        "--n-online",
        type=int,
        default=None,
        metavar="N",
        help="target test images per corruption shared by both settings (the online stream and the supervised "
        "test split); must be a multiple of the number of classes; sets finetune.n_test_per_class = N / classes",
    )
    parser.add_argument(
        "--finetune-config",
        metavar="FILE",
        default=None,
        help="finetune config YAML (default: the built-in defaults = configs/finetune_cifar10c.yaml)",
    )
    parser.add_argument("--out", metavar="DIR", default=None, help="output folder (default: runs/report-<model>)")
    parser.add_argument("--plot", action="store_true", help="also save report.png (accuracy per option, both settings)")
    parser.add_argument(
        "--data-root",
        metavar="DIR",
        default=os.environ.get(DATA_ENV),
        help=f"folder holding cifar-10-batches-py/, CIFAR-10-C/, ImageNet-C/ and weights/ (default: ${DATA_ENV})",
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None, help="sets runtime.device")
    parser.add_argument("--frost-dir", metavar="DIR", default=None, help="frost textures (default: <data-root>/frost)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides (see the description)")


def route_overrides(overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split dotted overrides into (supervised, online) lists by their first key; model.* and runtime.* go to both."""
    sup, onl = [], []
    for text in overrides:
        head = text.split("=", 1)[0].strip().split(".")[0]
        if head in SHARED_SECTIONS:
            sup.append(text)
            onl.append(text)
        elif head in SUPERVISED_SECTIONS:
            sup.append(text)
        elif head in ONLINE_SECTIONS:
            if text.split("=", 1)[0].strip() == "method.blocks":
                raise ValueError("method.blocks is set per option by `report`; choose the blocks with --options")
            onl.append(text)
        else:
            valid = ", ".join(SHARED_SECTIONS + SUPERVISED_SECTIONS + ONLINE_SECTIONS)
            raise ValueError(f"override {text!r}: unknown section {head!r}; valid sections: {valid}")
    return sup, onl


def _parse_options(text: str) -> list[str]:
    return [o.strip() for o in text.split(";")] if ";" in text else _csv(text)


def online_stream(target: Any, sec: Any, test: np.ndarray) -> tuple[dict[str, Any], Callable[[], Any]]:
    """Where the online stream of one seed reads its images: the stream keys naming them, and a function that
    returns the source to run on (None: opened from those keys). Both are exactly the supervised test images."""
    from ..streams import MemorySource, source_class

    if source_class(sec.source).corrupts_on_the_fly:
        # The finetune side generates these images (as make-cifar10c does); the stream takes them from memory.
        def generated() -> Any:
            images = {(c, sec.severity): target.images(c, test) for c in sec.corruptions}
            return MemorySource(images, target.labels[test])

        return {"source": "memory", "path": None, "indices": None}, generated
    keys = {"source": sec.source, "path": str(target.root), "indices": tuple(int(i) for i in test)}
    return keys, lambda: None


def online_options_filter(options: Sequence[str]) -> list[str]:
    """The options with an online counterpart: block specs always, auto-rgn when the online method supports it."""
    return [o for o in options if o in online_options() or o not in ("auto-rgn", "auto-snr")]


def online_options() -> tuple[str, ...]:
    """Auto options the online engine can run (auto-rgn once `method.weighting` accepts it; never auto-snr)."""
    from ..methods.entropy_min import WEIGHTINGS

    return ("auto-rgn",) if "auto-rgn" in WEIGHTINGS else ()


def online_config(ft_cfg: Any, option: str, images: Mapping[str, Any], seed: int, overrides: Sequence[str]) -> Any:
    """The run config of the online surgical method for one option over one seed's test images (`images`: the
    stream keys of `online_stream`)."""
    from ..config import Config, OptimConfig, StreamSpec, apply_overrides, method_config

    sec = ft_cfg.finetune
    if option == "auto-rgn":
        # The online auto-RGN of configs/surgical_autorgn.yaml: every tensor, per-tensor lr x RGN weight.
        method = method_config("surgical", blocks=("all",), kind="all", bn_stats="batch", weighting="auto-rgn")
    else:
        method = method_config("surgical", blocks=(option,), kind="all", bn_stats="batch")
    stream = StreamSpec(
        **images,
        domains=tuple(sec.corruptions),
        severities=(sec.severity,),
        order="sequential",
        shuffle=True,
        seed=seed,
        reset="per_domain",
    )
    cfg = Config(
        model=ft_cfg.model,
        method=method,
        optim=OptimConfig(name="adam", lr=1e-3),
        stream=stream,
        runtime=ft_cfg.runtime,
    )
    cfg = apply_overrides(cfg, overrides)
    if (
        cfg.stream.domains != tuple(sec.corruptions)
        or cfg.stream.severities != (sec.severity,)
        or any(getattr(cfg.stream, k) != v for k, v in images.items())
        or cfg.stream.n_examples not in (None, 0)
    ):
        raise ValueError(
            "stream.domains, stream.severities, stream.source, stream.path, stream.indices and stream.n_examples are "
            "fixed by `report` (the online stream is the supervised test split); set finetune.corruptions, "
            "finetune.severity or --n-online instead"
        )
    return cfg


def comparison(
    supervised: Mapping[str, Any], online: Mapping[str, Mapping[str, Mapping[str, float]]], options: Sequence[str]
) -> dict[str, Any]:
    """The side-by-side numbers: per option, online and supervised accuracy (means over corruptions and seeds),
    plus the per-corruption detail. `online[option][seed][corruption]` = online accuracy %."""
    corruptions = list(supervised["corruptions"])
    rows: dict[str, Any] = {}
    for o in options:
        per_seed = online.get(o, {})
        onl_c = {}
        for c in corruptions:
            vals = [acc[c] for acc in per_seed.values() if c in acc]
            if vals:
                onl_c[c] = float(np.mean(vals))
        seed_means = [
            float(np.mean([acc[c] for c in corruptions]))
            for acc in per_seed.values()
            if all(c in acc for c in corruptions)
        ]
        from ..finetune import standard_error

        rows[o] = {
            "online": float(np.mean(list(onl_c.values()))) if onl_c else None,
            "online_se": standard_error(seed_means),
            "supervised": supervised["mean_accuracy"].get(o),
            "supervised_se": supervised["mean_accuracy_se"].get(o),
            "online_per_corruption": onl_c,
            "supervised_per_corruption": dict(supervised["accuracy"].get(o, {})),
            "supervised_rank": supervised["rank"].get(o),
        }
    return {
        "corruptions": corruptions,
        "options": list(options),
        "no_adaptation": supervised.get("source_mean_accuracy"),
        "no_adaptation_per_corruption": supervised.get("source_accuracy", {}),
        "rows": rows,
    }


def report_markdown(comp: Mapping[str, Any], title: str = "") -> str:
    """Rows = options; columns = online and supervised accuracy % (mean over corruptions; ± s.e. over seeds)."""

    def cell(m: float | None, se: float | None) -> str:
        if m is None or (isinstance(m, float) and math.isnan(m)):
            return "–"
        return f"{m:.1f} ± {se:.1f}" if se is not None else f"{m:.1f}"

    rows = comp["rows"]
    best_on = max((r["online"] for r in rows.values() if r["online"] is not None), default=None)
    best_sup = max((r["supervised"] for r in rows.values() if r["supervised"] is not None), default=None)
    lines = ["| option | online (unsupervised) acc % | supervised acc % |", "| --- | ---: | ---: |"]
    for o, r in rows.items():
        on = cell(r["online"], r["online_se"])
        sup = cell(r["supervised"], r["supervised_se"])
        on = f"**{on}**" if r["online"] is not None and r["online"] == best_on else on
        sup = f"**{sup}**" if r["supervised"] is not None and r["supervised"] == best_sup else sup
        lines.append(f"| {o} | {on} | {sup} |")
    na = comp.get("no_adaptation")
    lines.append(f"| no adaptation | {cell(na, None)} | {cell(na, None)} |")
    head = title or "### Online vs supervised surgical adaptation"
    note = (
        f"Mean over {len(comp['corruptions'])} corruption(s) ({', '.join(comp['corruptions'])}) and the seeds; both "
        "columns are measured on the same test images (the supervised test split; see report.json for each corruption)."
    )
    return f"{head}\n\n" + "\n".join(lines) + f"\n\n{note}\n"


def plot_report(comp: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Grouped bars: accuracy per option, online and supervised (matplotlib optional, imported only here)."""
    from ..report import save_figure

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plotting needs matplotlib, which is not installed: pip install matplotlib") from None
    opts = list(comp["rows"])
    x = np.arange(len(opts))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(opts) + 2), 3.8))
    for k, (key, label) in enumerate((("online", "online (entropy)"), ("supervised", "supervised few-shot"))):
        vals = [comp["rows"][o][key] if comp["rows"][o][key] is not None else math.nan for o in opts]
        ax.bar(x + (k - 0.5) * 0.4, vals, width=0.4, label=label)
    if comp.get("no_adaptation") is not None:
        ax.axhline(comp["no_adaptation"], color="gray", linestyle="--", label="no adaptation")
    ax.set_xticks(x)
    ax.set_xticklabels(opts)
    ax.set_ylabel("accuracy (%)")
    # Below the axes: inside, it would cover the first bars (accuracies fill the whole height).
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3, frameon=False)
    fig.tight_layout()
    return save_figure(fig, path)


def main(args: argparse.Namespace) -> int:
    with contextlib.ExitStack() as held:  # the output folder's writer lock, taken once the folder is known
        return _main(args, held)


def _main(args: argparse.Namespace, held: contextlib.ExitStack) -> int:
    from ..corruptions.textures import default_frost_dir
    from ..engine import finished_summary, pick_device, run
    from ..finetune import (
        TargetData,
        load_finetune_config,
        per_class_train,
        run_finetune,
        split_indices,
    )
    from ..runfolder import folder_lock

    options = _parse_options(args.options)
    if not options:
        raise ValueError("--options needs at least one option, e.g. input,block1,block2,block3,head,all")
    extra = list(args.overrides or [])
    if args.device:
        extra.append(f"runtime.device={args.device}")
    if args.no_progress:
        extra.append("runtime.progress=false")
    sup_over, onl_over = route_overrides(extra)
    pre = [f"finetune.options={json.dumps(options)}"]
    if args.model:
        pre.append(f"model.name={args.model}")
    if args.corruptions:
        pre.append(f"finetune.corruptions={json.dumps(_csv(args.corruptions))}")
    ft_cfg = load_finetune_config(args.finetune_config, [*pre, *sup_over])
    sec = ft_cfg.finetune
    frost_dir = default_frost_dir(args.frost_dir, args.data_root)
    device = pick_device(ft_cfg.runtime.device)
    target = TargetData(sec, data_root=args.data_root, frost_dir=frost_dir, device=device)
    if args.n_online is not None:
        k = target.n_classes
        if args.n_online < k or args.n_online % k:
            raise ValueError(
                f"--n-online {args.n_online} must be a positive multiple of the {k} classes (the test split is "
                "class-balanced)"
            )
        from ..config import apply_overrides

        ft_cfg = apply_overrides(ft_cfg, [f"finetune.n_test_per_class={args.n_online // k}"])
        sec = ft_cfg.finetune
    out = Path(args.out) if args.out else Path("runs") / f"report-{ft_cfg.model.name}"
    held.enter_context(folder_lock(out, "report"))

    print(f"[supervised] {len(sec.corruptions)} corruption(s) x {len(options)} option(s) x {len(sec.seeds)} seed(s)")
    supervised = run_finetune(
        ft_cfg, out / "supervised", data_root=args.data_root, frost_dir=frost_dir, resume=True, target=target
    )

    per_class = per_class_train(sec.n_train, target.n_classes)
    online: dict[str, dict[int, dict[str, float]]] = {o: {} for o in options}
    online_set = online_options_filter(options)
    online_summaries: dict[str, dict[str, Any]] = {}
    for seed in sec.seeds:
        split = split_indices(target.labels, per_class, sec.n_val_per_class, sec.n_test_per_class, seed)
        images, open_images = online_stream(target, sec, split.test)
        source = None  # opened once per seed, and only when a run needs it
        for option in options:
            if option not in online_set:
                continue
            cfg = online_config(ft_cfg, option, images, seed, onl_over)
            folder = out / "online" / f"seed{seed}" / option.replace(",", "+")
            summary = finished_summary(folder, cfg)
            if summary is None:
                print(f"[online] {option} seed {seed} -> {folder}")
                if source is None:
                    source = open_images()
                summary = run(cfg, folder, data_root=args.data_root, resume=True, frost_dir=frost_dir, source=source)
            online[option][seed] = {c: 100.0 - float(e) for c, e in summary["errors"].items()}
            online_summaries[f"{option}/seed{seed}"] = {
                k: summary.get(k)
                for k in (
                    "mean_error",
                    "online_error",
                    "n_images",
                    "adapted_numel",
                    "n_skipped_updates",
                    "stream_fingerprint",
                )
            }

    comp = comparison(supervised, online, options)
    title = (
        f"### Online vs supervised surgical adaptation: {ft_cfg.model.name}, severity {sec.severity}, "
        f"{sec.n_test_per_class} test images per class"
    )
    table = report_markdown(comp, title)
    payload = {
        **comp,
        "model": ft_cfg.model.name,
        "severity": sec.severity,
        "seeds": list(sec.seeds),
        "n_test_per_class": sec.n_test_per_class,
        "online_overrides": onl_over,
        "supervised_overrides": [*pre, *sup_over],
        "online_runs": online_summaries,
        "online_per_seed": {o: {str(s): v for s, v in d.items()} for o, d in online.items()},
    }
    (out / "report.md").write_text(table, encoding="utf-8")
    (out / "report.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    print(table)
    print(f"written {out}/report.md and {out}/report.json")
    if args.plot:
        try:
            print(f"plot saved to {plot_report(comp, out / 'report.png')}")
        except ImportError as err:
            print(f"no plot: {err}")
            return 1
    return 0
