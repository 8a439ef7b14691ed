"""`tta-surgical report`: online (unlabeled) vs supervised surgical adaptation, block by block, on one target task.

The study is `tta_surgical.studies` (read its docstring for the protocol). In short, per seed of the
finetune config the target set is split once: the supervised side fine-tunes on the labeled train split and is
tested on the test split; the online side adapts without labels on every image outside the labeled train / val
split (the "online pool", ~8,900 per corruption on CIFAR-10-C; `--online-images` draws fewer), and is scored twice:
its error on its own stream and the adapted model's accuracy on exactly the supervised test split.

Tasks (`--task`): `corruption` (input-level shift: the corruptions of `--corruptions`), `cifar_flip` (the paper's
CIFAR-Flip relabelling y -> 9 - y: label-level shift with `--corruptions none`, input- and label-level with real
corruptions). The online stream keeps the source's labels (an unlabeled method cannot learn a relabelling); give it
its own label-level shift with `stream.label_shift=dirichlet` and `stream.class_imbalance=10` (or
`stream.class_prior=[...]`).

Every run is a sweep cell (`OUT/supervised/`, `OUT/online/seed<k>/`, each with the `sweep.yaml` it ran, runnable by
`tta-surgical sweep ... --launcher ray`); `--launcher ray` / `--max-parallel N` run them in parallel, and rerunning
the same command reuses every finished cell. Outputs: `report.md`, `report.json` (per task and option:
`online_error_stream`, `online_accuracy_test`, `supervised_accuracy_test`, `rgn_top_block`; the verdict rows),
`report.png` with --plot; `--budgets` writes `budgets.md`, `budgets.json`, `budgets.png` instead; `--merge DIR ...`
combines earlier reports into one verdict table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..fileio import atomic_write_text
from ..hub import DATA_ENV
from .options import data_context

HELP = "online vs supervised surgical adaptation per block on one target task (tables, verdict, budget curves)"
DESCRIPTION = (
    "Run the supervised few-shot fine-tuning (tta-surgical finetune) and the online surgical method (entropy "
    "minimisation on one block, tta-surgical run) for the same options and target task; the online side adapts on "
    "the target images outside the supervised train/val split and is scored on exactly the supervised test split. "
    "Writes report.md / report.json (and the verdict per shift type); --budgets writes accuracy vs number of target "
    "images instead. Trailing key=value overrides: finetune.* go to the supervised side; method.*, optim.*, "
    "stream.* to the online side; model.* and runtime.* to both. Rerun the same command to resume."
)

ONLINE_SECTIONS = ("method", "optim", "stream")
SUPERVISED_SECTIONS = ("finetune",)
SHARED_SECTIONS = ("model", "runtime")
DEFAULT_LABELED = "100,250,500,1000"
DEFAULT_UNLABELED = "500,1000,2000,4000,all"


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def configure(parser: argparse.ArgumentParser) -> None:
    from ..finetune.tasks import TASKS
    from ..studies import ONLINE_MODES
    from ..sweep import LAUNCHERS

    parser.add_argument("--model", default=None, help="model name (sets model.name; default: the finetune config's)")
    parser.add_argument(
        "--task", choices=TASKS.names(), default=None, help="target task (sets finetune.task; default corruption)"
    )
    parser.add_argument(
        "--corruptions",
        default=None,
        help="comma-separated corruptions, 'none' = clean images (default: the finetune config's)",
    )
    parser.add_argument(
        "--options",
        default="input,block1,block2,block3,head,all",
        help="comma-separated block options (default input,block1,block2,block3,head,all; auto-rgn, auto-snr too); "
        "use ';' to separate options that are themselves comma lists",
    )
    parser.add_argument(
        "--finetune-config", metavar="FILE", default=None, help="finetune config YAML (default: built-in defaults)"
    )
    parser.add_argument("--out", metavar="DIR", default=None, help="output folder (default: runs/report-<model>)")
    parser.add_argument("--plot", action="store_true", help="also save report.png (accuracy per option, both sides)")
    online = parser.add_argument_group("online side")
    online.add_argument("--online-method", default="surgical", help="registered online method (default surgical)")
    online.add_argument("--online-mode", choices=ONLINE_MODES, default="reset", help="reset per corruption, or not")
    online.add_argument(
        "--online-images", default="all", metavar="N|all", help="unlabeled images per corruption (default all)"
    )
    online.add_argument(
        "--pool-excludes-test", action="store_true", help="keep the supervised test rows out of the online stream"
    )
    online.add_argument(
        "--references",
        default="norm",
        help="non-adapting reference methods, e.g. norm,source ('' = none; default norm)",
    )
    budgets = parser.add_argument_group("budget curves")
    budgets.add_argument("--budgets", action="store_true", help="write budgets.{md,json,png} instead of the report")
    budgets.add_argument("--labeled", default=DEFAULT_LABELED, help=f"labeled budgets (default {DEFAULT_LABELED})")
    budgets.add_argument(
        "--unlabeled", default=DEFAULT_UNLABELED, help=f"unlabeled stream lengths (default {DEFAULT_UNLABELED})"
    )
    run = parser.add_argument_group("running the cells")
    run.add_argument("--launcher", choices=LAUNCHERS, default="local", help="local (default) or ray")
    run.add_argument("--max-parallel", type=int, default=None, metavar="N", help="parallel cells (local workers)")
    run.add_argument("--address", default=None, help="a running Ray cluster (HEAD:6379 or auto)")
    parser.add_argument(
        "--merge", nargs="+", metavar="DIR", default=None, help="combine the report.json of these report folders"
    )
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


def parse_options(text: str) -> list[str]:
    options = [o.strip() for o in text.split(";")] if ";" in text else _csv(text)
    if not options:
        raise ValueError("--options needs at least one option, e.g. input,block1,block2,block3,head,all")
    return options


def parse_counts(text: str, flag: str) -> list[int | None]:
    """'500,1000,all' -> [500, 1000, None] (None = all); positive integers only."""
    out: list[int | None] = []
    for t in _csv(text):
        if t == "all":
            out.append(None)
        elif t.isdigit() and int(t) > 0:
            out.append(int(t))
        else:
            raise ValueError(f"{flag}: {t!r} is not a positive integer or 'all'")
    if not out:
        raise ValueError(f"{flag} needs at least one value")
    return out


def build_study(args: argparse.Namespace) -> Any:
    """The `ShiftStudy` of the command line: finetune config (task, corruptions, options) and online settings."""
    from ..finetune import load_finetune_config
    from ..studies import OnlineSettings, ShiftStudy

    options = parse_options(args.options)
    extra = list(args.overrides or [])
    if args.device:
        extra.append(f"runtime.device={args.device}")
    if args.no_progress:
        extra.append("runtime.progress=false")
    sup_over, onl_over = route_overrides(extra)
    pre = [f"finetune.options={json.dumps(options)}"]
    if args.model:
        pre.append(f"model.name={args.model}")
    if args.task:
        pre.append(f"finetune.task={args.task}")
    if args.corruptions:
        pre.append(f"finetune.corruptions={json.dumps(_csv(args.corruptions))}")
    ft_cfg = load_finetune_config(args.finetune_config, [*pre, *sup_over])
    n_images = parse_counts(args.online_images, "--online-images")[0]
    shared = [o for o in onl_over if o.split("=", 1)[0].strip().split(".")[0] in SHARED_SECTIONS]
    online = OnlineSettings(
        method=args.online_method,
        mode=args.online_mode,
        n_images=n_images,
        include_test=not args.pool_excludes_test,
        references=tuple(_csv(args.references)),
        overrides=tuple(o for o in onl_over if o not in shared),
    )
    out = Path(args.out) if args.out else Path("runs") / f"report-{ft_cfg.model.name}"
    return ShiftStudy(ft_cfg, options, online, out, data=data_context(args))


def launch_of(args: argparse.Namespace) -> Any:
    from ..studies import Launch

    return Launch(args.launcher, args.max_parallel, args.address, progress=not args.no_progress)


def write_report(out: Path, tasks: dict[str, Any], plot: bool) -> int:
    """report.md / report.json (and report.png) of one or several tasks, with their verdict rows."""
    from ..studies.render import plot_study, study_markdown, verdict_markdown

    rows = [r for t in tasks.values() for r in t["verdict"]]
    parts = [study_markdown(t) for t in tasks.values()]
    parts.append("### Verdict per shift type (the paper's Table 1 in our setting)\n\n" + verdict_markdown(rows))
    text = "\n".join(parts)
    atomic_write_text(out / "report.md", text)
    atomic_write_text(out / "report.json", json.dumps({"tasks": tasks, "verdict": rows}, indent=1) + "\n")
    print(text)
    print(f"written {out}/report.md and {out}/report.json")
    if plot:
        for name, task in tasks.items():
            suffix = "" if len(tasks) == 1 else f"-{name}"
            try:
                print(f"plot saved to {plot_study(task, out / f'report{suffix}.png')}")
            except ImportError as err:
                print(f"no plot: {err}")
                return 1
    return 0


def write_budgets(out: Path, budgets: dict[str, Any], plot: bool = True) -> int:
    """budgets.md / budgets.json / budgets.png."""
    from ..studies.render import budgets_markdown, plot_budgets

    text = budgets_markdown(budgets)
    atomic_write_text(out / "budgets.md", text)
    atomic_write_text(out / "budgets.json", json.dumps(budgets, indent=1) + "\n")
    print(text)
    print(f"written {out}/budgets.md and {out}/budgets.json")
    if plot:
        try:
            print(f"plot saved to {plot_budgets(budgets, out / 'budgets.png')}")
        except ImportError as err:
            print(f"no plot: {err}")
            return 1
    return 0


def merge_reports(folders: Sequence[str | os.PathLike]) -> dict[str, Any]:
    """The tasks of several report folders' report.json (a repeated task name gets `@<folder name>`)."""
    tasks: dict[str, Any] = {}
    for folder in folders:
        path = Path(folder) / "report.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run `tta-surgical report --out {folder}` first")
        for name, task in json.loads(path.read_text(encoding="utf-8"))["tasks"].items():
            key = name if name not in tasks else f"{name}@{Path(folder).name}"
            tasks[key] = task
    return tasks


def main(args: argparse.Namespace) -> int:
    from ..runfolder import folder_lock

    if args.merge:
        out = Path(args.out) if args.out else Path("runs") / "report-merged"
        with folder_lock(out, "report"):
            return write_report(out, merge_reports(args.merge), args.plot)
    with contextlib.ExitStack() as held:  # the output folder's writer lock, taken once the folder is known
        return _study(args, held)


def _study(args: argparse.Namespace, held: contextlib.ExitStack) -> int:
    from ..runfolder import folder_lock
    from ..studies import run_budgets, run_study

    comp = build_study(args)
    held.enter_context(folder_lock(comp.out, "report"))
    launch = launch_of(args)
    sec = comp.sec
    print(
        f"[report] task {sec.task}: {len(sec.corruptions)} corruption(s) x {len(comp.options)} option(s) x "
        f"{len(sec.seeds)} seed(s); online {comp.online.method} ({comp.online.mode}) -> {comp.out}"
    )
    if args.budgets:
        labeled = [n if n is not None else sec.n_train for n in parse_counts(args.labeled, "--labeled")]
        budgets = run_budgets(comp, labeled, parse_counts(args.unlabeled, "--unlabeled"), launch)
        return write_budgets(comp.out, budgets)
    task = run_study(comp, launch)
    return write_report(comp.out, {sec.task: task}, args.plot)
