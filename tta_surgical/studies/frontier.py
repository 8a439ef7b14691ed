"""The accuracy-cost frontier: methods x block selections x update budgets, each a run, drawn as accuracy against
the compute spent per image, with the Pareto front marked (`tta-surgical frontier`).

A point is one run of the engine (a sweep cell: resumable, local workers or Ray). Its cost is the compute its batches
used, in plain forwards of a batch per batch (= x plain inference per image: 1.0 costs what inference alone costs),
from the run's clock (`summary.time.compute_forwards_per_batch`: fixed ratios or measured times), and in ms per image.

- selections: `default` (the method's own parameters), block names (`block1`, `head`, `all`, `block1+block2`: every
  parameter of those blocks), `auto` (a label-free selection policy, when the installed package has one: the cell is
  skipped with a note otherwise). Methods that adapt nothing (source, norm, lame) have only `default`.
- budgets: `wait` (the classic protocol: the stream waits, every batch adapted), `every:K` (runtime.update_every),
  `speed:S` (a constant stream at S x plain inference, realistic protocol), `queue:S` (the same, batches wait),
  `latency:MS` (runtime.latency_budget_ms), `overhead:MS` (Tempora's amortised budget); a `+async` suffix adds
  runtime.async_adapt.

With fixed costs the schedule of a run (which batches are adapted) is known before it runs; two points with the same
config apart from time keys and the same schedule give identical numbers, so only the first is run and the other
reports it (`same_schedule_as`): e.g. a method whose update fits in the stream's gap adapts every batch, as `wait`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ConfigError, from_dict, load_config, parse_override
from ..data.context import DataLike
from ..methods import METHODS
from ..methods.settings import MethodSettings
from ..models import create_model_from_config, resolve_blocks
from ..render import pyplot, save_figure
from ..runtime import RuntimeConfig
from ..schedule import Scheduler, cost_ratio_for
from ..streams import StreamSpec, open_source, plan_stream
from ..streams.arrival import ArrivalSpec
from ..sweep import cell_dir, check_cells, sweep_from_dict
from ..tables import MISSING, escape, fmt, markdown_table

__all__ = [
    "DEFAULT_BUDGETS",
    "DEFAULT_SELECTIONS",
    "Entry",
    "FrontierPlan",
    "collect_points",
    "frontier_markdown",
    "pareto_front",
    "parse_budget",
    "parse_selection",
    "plan_frontier",
    "plot_frontier",
    "planned_adaptations",
]

DEFAULT_SELECTIONS = ("default", "block1", "block2", "head", "all", "auto")
DEFAULT_BUDGETS = ("wait", "speed:1", "speed:0.5", "speed:0.25")
# Config keys that only shape the schedule: two cells differing only here, with the same schedule, are the same run.
TIME_KEYS = (
    "cost_mode", "cost_ratio", "forward_ms", "update_every", "latency_budget_ms", "latency_budget_stat",
    "overhead_budget_ms", "response_budget_ms", "decay_threshold_ms", "deadline_ms", "record_times",
)  # fmt: skip
BUDGET_FORMS = "wait, every:K, speed:S, queue:S, latency:MS, overhead:MS (each optionally +async)"


def parse_budget(text: str) -> tuple[str, list[str]]:
    """(label, overrides) of one budget (module doc)."""
    word = text.strip()
    asynchronous = word.endswith("+async")
    word = word.removesuffix("+async")
    name, _, value = word.partition(":")
    try:
        number = float(value) if value else None
    except ValueError:
        number = None
    if name == "wait" and not value:
        label, over = "wait", []
    elif name == "every" and number is not None and number.is_integer() and number >= 1:
        label, over = f"every {int(number)}", [f"runtime.update_every={int(number)}"]
    elif name in ("speed", "queue") and number is not None and number > 0:
        protocol = "realistic" if name == "speed" else "queue"
        label = f"{'speed' if name == 'speed' else 'queue'} {number:g}x"
        over = ["stream.arrival.kind=constant", f"stream.arrival.speed={value}", f"stream.arrival.protocol={protocol}"]
    elif name in ("latency", "overhead") and number is not None and number > 0:
        key = "latency_budget_ms" if name == "latency" else "overhead_budget_ms"
        label, over = f"{name} {number:g} ms", [f"runtime.{key}={value}"]
    else:
        raise ValueError(f"budget {text!r} is not valid; write one of: {BUDGET_FORMS}")
    if asynchronous:
        label, over = f"{label} async", [*over, "runtime.async_adapt=true"]
    return label, over


def parse_selection(text: str) -> list[str]:
    """The overrides of one block selection: `default` none, `auto` the policy, else every parameter of the blocks."""
    word = text.strip()
    if word == "default":
        return []
    if word == "auto":
        return ["method.blocks=auto"]
    blocks = [b for b in word.split("+") if b]
    if not blocks:
        raise ValueError(f"block selection {text!r} is empty; write default, auto or block names such as block1+head")
    return [f"method.blocks=[{','.join(blocks)}]", "method.kind=all"]


@dataclass(frozen=True)
class Entry:
    """One point of the frontier: what it is and which sweep cell holds its numbers."""

    method: str
    selection: str
    budget: str
    cell_id: str
    same_schedule_as: str | None = None  # the cell whose identical schedule it shares (then it was not run)

    @property
    def label(self) -> str:
        sel = "" if self.selection == "default" else f":{self.selection}"
        return f"{self.method}{sel} @ {self.budget}"


@dataclass
class FrontierPlan:
    """The sweep to run (distinct schedules only), every point, and what was skipped and why."""

    sweep: Any
    entries: list[Entry]
    skipped: list[str] = field(default_factory=list)


def _adapts(method: str) -> bool:
    return bool(METHODS.get(method).adapts)


def plan_frontier(
    methods: Sequence[str],
    selections: Sequence[str] = DEFAULT_SELECTIONS,
    budgets: Sequence[str] = DEFAULT_BUDGETS,
    *,
    base: Path | None = None,
    stream: Path | None = None,
    overrides: Iterable[str] = (),
    data: DataLike = None,
    dedupe: bool = True,
) -> FrontierPlan:
    """Validate every point (each config through the real loader, block names against the model) and plan the sweep;
    `data`: where the data lives (a `DataContext` or the data root), read to plan the batches of fixed-cost twins.

    Every cell records its clock (`runtime.record_times`), so the cost of `wait` points is known too.
    """
    parsed = [(b, *parse_budget(b)) for b in budgets]
    cells: list[dict[str, Any]] = []
    labels: list[tuple[str, str, str]] = []
    skipped: list[str] = []
    for method in methods:
        for selection in selections if _adapts(method) else ("default",):
            sel = parse_selection(selection)
            if selection == "auto" and not _auto_available(method, base, stream):
                skipped.append(f"{method}:auto (blocks auto is not available in this build; issue 21 adds it)")
                continue
            for _, label, over in parsed:
                parsed_over = (parse_override(o) for o in [f"method.name={method}", *sel, *over])
                point = {".".join(keys): value for keys, value in parsed_over}
                cells.append(point)
                labels.append((method, selection, label))
    if not cells:
        raise ValueError("the frontier has no point: give methods, selections and budgets")
    extra = [*overrides, "runtime.record_times=true"]
    spec: dict[str, Any] = {"name": "frontier", "kind": "run", "cells": cells}
    if base is not None:
        spec["base"] = str(base)
    if stream is not None:
        spec["stream"] = str(stream)
    full = sweep_from_dict(spec, extra_overrides=extra)
    check_cells(full)
    twins = _twins(full.cells, data) if dedupe else {}
    entries = [
        Entry(m, s, b, cell.id, twins.get(cell.id)) for (m, s, b), cell in zip(labels, full.cells, strict=True)
    ]
    unique = [c for c in full.cells if c.id not in twins]
    sweep = dataclasses.replace(full, cells=tuple(unique))
    return FrontierPlan(sweep, entries, skipped)


def _auto_available(method: str, base: Path | None, stream: Path | None) -> bool:
    """Whether `method.blocks=auto` builds (a selection policy of issue 21); never raises."""
    try:
        cfg = load_config(base, stream=stream, overrides=[f"method.name={method}", "method.blocks=auto"])
        model = create_model_from_config(dataclasses.replace(cfg.model, pretrained=False, allow_random=True))[0]
        resolve_blocks(model, cfg.method.blocks)  # type: ignore[attr-defined]
    except (ConfigError, ValueError, KeyError, TypeError):
        return False
    return True


def planned_adaptations(config: Mapping[str, Any], batch_sizes: Sequence[int]) -> tuple[int, ...] | None:
    """The batches a fixed-cost run will adapt (its schedule does not depend on the data), or None when it cannot be
    known before the run (measured costs, or budgets in ms with the plain forward measured in the run)."""
    rt = from_dict(RuntimeConfig, config["runtime"], "runtime")
    if rt.cost_mode != "fixed":
        return None
    in_ms = (rt.latency_budget_ms, rt.overhead_budget_ms, rt.response_budget_ms)
    if rt.forward_ms is None and any(v is not None for v in in_ms):
        return None
    method = from_dict(MethodSettings, config["method"], "method")
    arrival = from_dict(ArrivalSpec, config["stream"].get("arrival") or {}, "stream.arrival")
    forward = rt.forward_ms if rt.forward_ms is not None else 1.0
    sched = Scheduler(batch_sizes, arrival, rt, forward_ms=forward, step_units=cost_ratio_for(rt.cost_ratio, method))
    adapted = []
    for i in range(len(batch_sizes)):
        slot = sched.plan(i)
        adapted.append(slot.adapt)
        sched.done(slot, 0.0)
    return tuple(i for i, a in enumerate(adapted) if a)


def _twins(cells: Sequence[Any], data: DataLike) -> dict[str, str]:
    """cell id -> the id of the first cell with the same config apart from time keys and the same schedule."""
    sizes_of: dict[str, list[int]] = {}
    first: dict[str, str] = {}
    twins: dict[str, str] = {}
    for cell in cells:
        stream_key = json.dumps({k: v for k, v in cell.config["stream"].items() if k != "arrival"}, sort_keys=True)
        if stream_key not in sizes_of:
            sizes_of[stream_key] = _batch_sizes(cell.config["stream"], data)
        adapted = planned_adaptations(cell.config, sizes_of[stream_key])
        if adapted is None:
            continue
        rest = dict(cell.config)
        rest["stream"] = {k: v for k, v in cell.config["stream"].items() if k != "arrival"}
        rest["runtime"] = {k: v for k, v in cell.config["runtime"].items() if k not in TIME_KEYS}
        key = json.dumps({"config": rest, "adapted": adapted}, sort_keys=True)
        if key in first:
            twins[cell.id] = first[key]
        else:
            first[key] = cell.id
    return twins


def _batch_sizes(stream: Mapping[str, Any], data: DataLike) -> list[int]:
    spec = from_dict(StreamSpec, stream, "stream")
    source = open_source(spec, data)
    labels = source.labels if spec.indices is None else source.labels[list(spec.indices)]
    return [len(p) for p in plan_stream(spec, labels)]


# ------------------------------------------------------------------------------------------------ results


def collect_points(plan: FrontierPlan, out: Path) -> list[dict[str, Any]]:
    """One record per point from its cell's summary (a twin reads its twin's): error, adapted share, cost."""
    cells = {c.id: c for c in plan.sweep.cells}
    points = []
    for e in plan.entries:
        source_id = e.same_schedule_as or e.cell_id
        path = cell_dir(out, cells[source_id]) / "summary.json" if source_id in cells else None
        summary = json.loads(path.read_text(encoding="utf-8")) if path is not None and path.is_file() else None
        time = (summary or {}).get("time") or {}
        points.append(
            {
                "label": e.label,
                "method": e.method,
                "selection": e.selection,
                "budget": e.budget,
                "cell": e.cell_id,
                "same_schedule_as": e.same_schedule_as,
                "online_error": summary.get("online_error") if summary else None,
                "mean_error": summary.get("mean_error") if summary else None,
                "adapted_share": summary.get("adapted_share") if summary else None,
                "cost_x_inference": time.get("compute_forwards_per_batch"),
                "cost_ms_per_image": time.get("compute_ms_per_image"),
            }
        )
    front = pareto_front([(p["cost_x_inference"], p["online_error"]) for p in points])
    for p, on in zip(points, front):
        p["pareto"] = on
    return points


def pareto_front(points: Sequence[tuple[float | None, float | None]]) -> list[bool]:
    """Which (cost, error) points no other point beats: none has cost <= and error <= with one strictly lower."""
    ok = [c is not None and e is not None and math.isfinite(c) and math.isfinite(e) for c, e in points]
    out = []
    for i, (c, e) in enumerate(points):
        if not ok[i]:
            out.append(False)
            continue
        beaten = any(
            ok[j] and points[j][0] <= c and points[j][1] <= e and (points[j][0] < c or points[j][1] < e)
            for j in range(len(points))
        )
        out.append(not beaten)
    return out


def frontier_markdown(points: Sequence[Mapping[str, Any]], reference: str | None = "norm") -> str:
    """The points by cost (Pareto front marked), the error pivot (method:selection x budget) and, with a `wait`
    budget and the reference method among the points, how much of each gain over the reference survives."""
    rows = []
    for p in sorted(points, key=lambda p: (p["cost_x_inference"] is None, p["cost_x_inference"] or 0.0)):
        rows.append(
            [
                escape(p["label"]),
                fmt(p["online_error"]),
                fmt(p["adapted_share"]),
                fmt(p["cost_x_inference"]),
                fmt(p["cost_ms_per_image"], 3),
                "yes" if p["pareto"] else "",
                p["same_schedule_as"] or "",
            ]
        )
    head = ["point", "online error %", "adapted share", "cost (x inference)", "ms / image", "Pareto", "same as"]
    parts = ["### Frontier: every point by cost", markdown_table(head, rows), _pivot(points, reference)]
    return "\n\n".join(p for p in parts if p) + "\n"


def _pivot(points: Sequence[Mapping[str, Any]], reference: str | None) -> str:
    budgets = list(dict.fromkeys(p["budget"] for p in points))
    keys = list(dict.fromkeys((p["method"], p["selection"]) for p in points))
    err = {(p["method"], p["selection"], p["budget"]): p["online_error"] for p in points}
    rank = {}
    for b in budgets:
        ordered = sorted((e, k) for k in keys if (e := err.get((*k, b))) is not None)
        rank.update({(*k, b): 1 + sum(x < e for x, _ in ordered) for e, k in ordered})
    rows = [
        [escape(m if s == "default" else f"{m}:{s}"),
         *(f"{fmt(err.get((m, s, b)))} ({rank[(m, s, b)]})" if (m, s, b) in rank else MISSING for b in budgets)]
        for m, s in keys
    ]  # fmt: skip
    table = "### Online error % (rank) by budget\n\n" + markdown_table(["method", *budgets], rows)
    ref = {b: err.get((reference, "default", b)) for b in budgets} if reference else {}
    if "wait" not in budgets or ref.get("wait") is None:
        return table
    surv = []
    for m, s in keys:
        if m == reference:
            continue
        gain0 = ref["wait"] - err[(m, s, "wait")] if err.get((m, s, "wait")) is not None else None
        cells = [fmt(gain0)]
        for b in budgets:
            if b == "wait":
                continue
            e = err.get((m, s, b))
            gain = ref[b] - e if e is not None and ref.get(b) is not None else None
            share = gain / gain0 if gain is not None and gain0 and gain0 > 0 else None
            cells.append(f"{fmt(gain)} ({fmt(100 * share, 0)}%)" if share is not None else fmt(gain))
        surv.append([escape(m if s == "default" else f"{m}:{s}"), *cells])
    others = [b for b in budgets if b != "wait"]
    head = ["method", f"gain over {reference}, wait (points)", *(f"{b}: gain (share kept)" for b in others)]
    note = (
        f"Gain = {reference}'s online error minus the method's under the same budget; the share kept is the gain "
        "under the budget over the gain when the stream waits. " + MISSING + " where a number is missing."
    )
    survival = f"### Gain over {reference} that survives\n\n" + markdown_table(head, surv)
    return f"{table}\n\n{survival}\n\n{note}"


def plot_frontier(points: Sequence[Mapping[str, Any]], path: Path, title: str = "", ymin: float | None = None) -> Path:
    """Accuracy (100 - online error) against cost (x plain inference per image, log scale); one colour per method,
    one marker per selection; the Pareto front as a step line through its points, labelled. A point that shares its
    run with an earlier one (`same_schedule_as`) is drawn once, as that run. `ymin`: the lowest accuracy shown
    (points below it are named in a note instead, so one collapsed method does not flatten the rest)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(10, 6.5))
    methods = list(dict.fromkeys(p["method"] for p in points))
    selections = list(dict.fromkeys(p["selection"] for p in points))
    markers = "osD^v<>PX*h"
    cmap = plt.get_cmap("tab20" if len(methods) > 10 else "tab10")
    runs = [p for p in points if p["cost_x_inference"] and p["online_error"] is not None and not p["same_schedule_as"]]
    if not runs:
        raise ValueError("no finished point has a cost and an error to plot (did the runs fail? see cells/*/ERROR)")
    shown = [p for p in runs if ymin is None or 100 - p["online_error"] >= ymin]
    hidden = [p for p in runs if p not in shown]
    for p in shown:
        ax.scatter(
            p["cost_x_inference"], 100 - p["online_error"], color=cmap(methods.index(p["method"]) % cmap.N),
            marker=markers[selections.index(p["selection"]) % len(markers)], s=46, alpha=0.9,
            edgecolors="black" if p["pareto"] else "none", linewidths=1.2, zorder=3,
        )  # fmt: skip
    front = sorted((p for p in shown if p["pareto"]), key=lambda p: p["cost_x_inference"])
    if front:
        ax.step([p["cost_x_inference"] for p in front], [100 - p["online_error"] for p in front], where="post",
                color="black", linewidth=1, label="Pareto front", zorder=2)  # fmt: skip
        for p in front:
            ax.annotate(p["label"], (p["cost_x_inference"], 100 - p["online_error"]), fontsize=7, rotation=20,
                        xytext=(5, 5), textcoords="offset points")  # fmt: skip
    if hidden:
        note = "below the plot: " + ", ".join(f"{p['label']} ({100 - p['online_error']:.1f}%)" for p in hidden)
        # wrapped to the axes' width: one long line would widen the figure and squeeze the plot
        ax.text(0.01, 0.01, textwrap.fill(note, 110), transform=ax.transAxes, fontsize=7, va="bottom")
    for m in methods:
        ax.scatter([], [], color=cmap(methods.index(m) % cmap.N), marker="o", label=m)
    for sel in selections:
        ax.scatter([], [], facecolors="none", edgecolors="black", marker=markers[selections.index(sel) % len(markers)],
                   label=f"[{sel}]")
    ax.set_xscale("log")
    if ymin is not None:
        ax.set_ylim(bottom=ymin)
    ax.set_xlabel("compute per image (x plain inference), log scale")
    ax.set_ylabel("accuracy (%) = 100 - online error")
    ax.set_title(title or "accuracy vs cost per image")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    return save_figure(fig, path)
