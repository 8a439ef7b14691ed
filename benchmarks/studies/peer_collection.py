"""Our `tta-surgical run` against the methods of the best-known TTA collection, end to end, over the identical
continual CIFAR-10-C stream (`benchmarks/peer_collection.py`): images/s, CPU time, online error, our time breakdown.

    pip install yacs iopath einops        # the collection's config system and DeYO's patch shuffle (not ours)
    tta-surgical make-cifar10c --out /tmp/c10c --limit 1000 --severities 5 --corruptions benchmark
    python benchmarks/peer_collection.py --peer-root PATH/test-time-adaptation/classification --cifar10c /tmp/c10c \\
        --methods tent,eta,eata,sar,deyo,roid --rounds 3 --out /tmp/peer-bench --json peer.json

Per method and round, two processes run, each with `--threads` torch threads (default 1; `OMP_NUM_THREADS` and
`MKL_NUM_THREADS` set for both): `benchmarks/peer_worker.py` (the collection's method class on our resnet20, driven
by the collection's evaluation loop; see its docstring for what it stubs) and our CLI, `tta-surgical run --config
configs/<method>.yaml` with a stream file that reads the same `.npy` folder (`stream.source=cifar10c`, continual, the
first `--n-per-domain` images per corruption, batch `--batch-size`) with everything a user gets: results lines,
collapse monitor, progress bar, checkpoints at domain boundaries, summary. `--baseline-src DIR` adds a third process,
our code from another source tree (e.g. the commit before a change), for a before/after comparison under the same
conditions. The sides of a round run one after the other, the first side rotating from round to round, or all at
once (`--together`), which on a machine shared with other jobs gives them the same load.

Reported per method (medians over rounds; the spread is min-max of the per-round ratios):
- images/s of the stream loop: ours = images / `summary.wall_s_this_session` (first batch fetched to final
  checkpoint written), theirs = images / the evaluation loop (first batch converted to the accuracy read back);
  `ratio` = ours / theirs, per round, from the runs of that round;
- the CPU-time ratio: the collection loop's CPU seconds over ours (`summary.cpu_s_this_session`; both the process's
  user + system time over the loop, all threads): what each side's own work costs, whatever the machine's load;
- the process ratio: the whole process's wall time, theirs over ours (interpreter start, imports, model and method
  built, data opened, loop, files);
- the step alone (the time inside `method.step` vs inside the collection's `model(x)`), theirs over ours;
- online error of both and the gap (ours - theirs, points);
- our breakdown per batch (ms): `timing_this_session` of summary.json (data, input, step, the results line's
  statistics, writing it, meters and monitor, progress bar, checkpoint; the rest is `other`);
- CPU ms per batch inside the step and outside it, both sides (`summary.cpu_s_step_this_session`; the worker's
  `step_cpu_s`): unlike the wall breakdown, not stretched by other jobs' load.
The JSON keeps every run. Both images were checked to be the same rows: our stream's plan must read rows 0..n-1 of
every corruption in order, which is what the worker reads.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .peer_worker import PEER_METHODS

REPO = Path(__file__).resolve().parents[2]

BENCHMARK_DOMAINS = (
    "gaussian_noise,shot_noise,impulse_noise,defocus_blur,glass_blur,motion_blur,zoom_blur,snow,frost,fog,"
    "brightness,contrast,elastic_transform,pixelate,jpeg_compression"
)


def stream_yaml(cifar10c: Path, domains: list[str], n: int, batch_size: int) -> str:
    """Our stream file: the collection's continual CIFAR-10-C setting on the given folder."""
    return (
        "stream:\n"
        "  source: cifar10c\n"
        f"  path: {cifar10c}\n"
        f"  domains: [{', '.join(domains)}]\n"
        "  severities: [5]\n"
        "  order: sequential\n"
        f"  n_examples: {n}\n"
        f"  batch_size: {batch_size}\n"
        "  seed: 0\n"
        "  reset: never\n"
    )


def check_same_rows(stream_file: Path, data_root: str | None, n: int) -> None:
    """Our plan must read rows 0..n-1 of each corruption in order (what the worker reads); raise if not."""
    import numpy as np
    import torch

    from tta_surgical.config import load_config
    from tta_surgical.streams import build_stream

    cfg = load_config(str(REPO / "configs" / "tent.yaml"), stream=str(stream_file))
    stream = build_stream(cfg.stream, data=data_root, device=torch.device("cpu"))
    by_domain: dict[str, list[int]] = {}
    for p in stream.plan:
        by_domain.setdefault(p.domain, []).extend(np.asarray(p.indices).tolist())
    for name, rows in by_domain.items():
        if rows != list(range(n)):
            raise SystemExit(f"error: our stream reads rows {rows[:5]}... of {name}, not 0..{n - 1}: not comparable")


def _env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


@dataclass
class Job:
    """One timed child process: its command, and how to read its result (given its wall and CPU seconds)."""

    cmd: list[str]
    env: dict[str, str]
    cwd: Path
    log: Path
    collect: Callable[[float, float], dict[str, Any]]


def peer_job(args: argparse.Namespace, method: str, out: Path, log: Path) -> Job:
    """The collection's method over the stream (`benchmarks/peer_worker.py`)."""
    cmd = [
        sys.executable, str(REPO / "benchmarks" / "peer_worker.py"), "--peer-root", args.peer_root, "--method", method,
        "--cifar10c", args.cifar10c, "--n-per-domain", str(args.n_per_domain), "--batch-size", str(args.batch_size),
        "--domains", args.domains, "--threads", str(args.threads), "--out", str(out),
    ]  # fmt: skip
    if args.data_root:
        cmd += ["--data-root", args.data_root]

    def collect(wall: float, cpu: float) -> dict[str, Any]:
        return {**json.loads(out.read_text()), "process_s": wall, "process_cpu_s": cpu}

    return Job(cmd, _env(args.threads), REPO, log, collect)


def ours_job(
    args: argparse.Namespace, method: str, stream_file: Path, out: Path, log: Path, src: Path | None = None
) -> Job:
    """`tta-surgical run` of this checkout, or (`src`) of another source tree of the package (the code before a
    change: `git archive` of a commit), run the same way: `python -m tta_surgical.cli` with that tree first on the
    path (and as the working folder, which `-m` puts first)."""
    root = src if src is not None else REPO
    cmd = [
        sys.executable, "-m", "tta_surgical.cli", "run", "--config", str(root / "configs" / f"{method}.yaml"),
        "--stream", str(stream_file), "--out", str(out), "--overwrite", "--device", "cpu",
    ]  # fmt: skip
    if args.data_root:
        cmd += ["--data-root", args.data_root]
    env = _env(args.threads)
    env["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [env.get("PYTHONPATH")])])

    def collect(wall: float, cpu: float) -> dict[str, Any]:
        s = json.loads((out / "summary.json").read_text())
        timing = dict(s["timing_this_session"])
        return {
            "online_error": s["online_error"],
            "errors": s["errors"],
            "n_images": s["n_images"],
            "n_batches": s["n_batches"],
            "loop_s": s["wall_s_this_session"],
            "cpu_s": s.get("cpu_s_this_session"),
            "step_cpu_s": s.get("cpu_s_step_this_session"),
            "peak_memory_mb": s["peak_memory_mb"],
            "step_s": timing["step_s"],
            "timing": timing,
            "process_s": wall,
            "process_cpu_s": cpu,
            "images_per_s": s["n_images"] / s["wall_s_this_session"],
            "device": s["device"],
        }

    return Job(cmd, env, root, log, collect)


def run_jobs(jobs: list[Job], together: bool) -> list[dict[str, Any]]:
    """Run `jobs` one after the other, or all at once (`together`); each one's result with its own wall time and
    CPU time (user + system, from `wait4`)."""
    results: list[dict[str, Any] | None] = [None] * len(jobs)
    batches = [list(range(len(jobs)))] if together else [[i] for i in range(len(jobs))]
    for batch in batches:
        started = {}
        for i in batch:
            fh = jobs[i].log.open("w")
            proc = subprocess.Popen(jobs[i].cmd, stdout=fh, stderr=subprocess.STDOUT, env=jobs[i].env, cwd=jobs[i].cwd)
            started[proc.pid] = (i, time.perf_counter(), fh)
        while started:
            pid, status, usage = os.wait4(-1, 0)
            if pid not in started:
                continue
            i, t0, fh = started.pop(pid)
            fh.close()
            if os.waitstatus_to_exitcode(status) != 0:
                raise SystemExit(f"error: {' '.join(jobs[i].cmd[:4])} ... failed; see {jobs[i].log}")
            results[i] = jobs[i].collect(time.perf_counter() - t0, usage.ru_utime + usage.ru_stime)
    return [r for r in results if r is not None]


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def summarise(method: str, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over rounds and the min-max spread of the per-round ratios."""
    ratio = [r["ours"]["images_per_s"] / r["peer"]["images_per_s"] for r in rounds]
    step_ratio = [r["peer"]["step_s"] / r["ours"]["step_s"] for r in rounds]
    proc_ratio = [r["peer"]["process_s"] / r["ours"]["process_s"] for r in rounds]
    cpu_ratio = [r["peer"]["cpu_s"] / r["ours"]["cpu_s"] for r in rounds if r["ours"].get("cpu_s")]
    n_batches = rounds[0]["ours"]["n_batches"]
    keys = sorted({k for r in rounds for k in r["ours"]["timing"]})
    breakdown = {k: _median([1000.0 * r["ours"]["timing"].get(k, 0.0) / n_batches for r in rounds]) for k in keys}
    return {
        "method": method,
        "rounds": len(rounds),
        "n_images": rounds[0]["ours"]["n_images"],
        "ours_images_per_s": _median([r["ours"]["images_per_s"] for r in rounds]),
        "peer_images_per_s": _median([r["peer"]["images_per_s"] for r in rounds]),
        "ratio": _median(ratio),
        "ratio_min": min(ratio),
        "ratio_max": max(ratio),
        "step_ratio": _median(step_ratio),
        "process_ratio": _median(proc_ratio),
        "cpu_ratio": _median(cpu_ratio),
        "cpu_ratio_min": min(cpu_ratio, default=float("nan")),
        "cpu_ratio_max": max(cpu_ratio, default=float("nan")),
        "ours_error": rounds[0]["ours"]["online_error"],
        "peer_error": rounds[0]["peer"]["online_error"],
        "error_gap": rounds[0]["ours"]["online_error"] - rounds[0]["peer"]["online_error"],
        "ours_ms_per_batch": breakdown,
        "peer_other_ms_per_batch": _median([1000.0 * r["peer"]["other_s"] / n_batches for r in rounds]),
        "cpu_ms_per_batch": _cpu_breakdown(rounds, n_batches),
    }


def _cpu_breakdown(rounds: list[dict[str, Any]], n_batches: int) -> dict[str, float] | None:
    """CPU ms per batch inside and outside the step, ours and theirs (medians over rounds); None when a side did
    not measure its step's CPU time (code from before `cpu_s_step_this_session`)."""
    usable = [r for r in rounds if r["ours"].get("step_cpu_s") is not None and r["peer"].get("step_cpu_s") is not None]
    if not usable:
        return None
    out = {}
    for side in ("ours", "peer"):
        step = [1000.0 * r[side]["step_cpu_s"] / n_batches for r in usable]
        outside = [1000.0 * (r[side]["cpu_s"] - r[side]["step_cpu_s"]) / n_batches for r in usable]
        out[f"{side}_step"], out[f"{side}_outside"] = _median(step), _median(outside)
    return out


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: the comparison, then our breakdown per batch."""
    head = (
        "| method | rounds | images | ours img/s | theirs img/s | ratio (min-max) | CPU-time ratio (min-max) | "
        "step ratio | process ratio | ours err % | theirs err % | gap pts |\n"
        "|---|---:|---:|---:|---:|---|---|---:|---:|---:|---:|---:|\n"
    )
    lines = [
        f"| {r['method']} | {r['rounds']} | {r['n_images']} | {r['ours_images_per_s']:.1f} | "
        f"{r['peer_images_per_s']:.1f} | {r['ratio']:.2f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) | "
        f"{r['cpu_ratio']:.2f} ({r['cpu_ratio_min']:.2f}-{r['cpu_ratio_max']:.2f}) | "
        f"{r['step_ratio']:.2f} | {r['process_ratio']:.2f} | {r['ours_error']:.2f} | {r['peer_error']:.2f} | "
        f"{r['error_gap']:+.2f} |"
        for r in rows
    ]
    keys = sorted({k for r in rows for k in r["ours_ms_per_batch"]}, key=_order)
    head2 = "| method | " + " | ".join(k.removesuffix("_s") for k in keys) + " | theirs outside model(x) |\n"
    head2 += "|---|" + "---:|" * (len(keys) + 1) + "\n"
    lines2 = [
        f"| {r['method']} | "
        + " | ".join(f"{r['ours_ms_per_batch'].get(k, 0.0):.2f}" for k in keys)
        + f" | {r['peer_other_ms_per_batch']:.2f} |"
        for r in rows
    ]
    text = head + "\n".join(lines) + "\n\nOur time per batch (ms, median over rounds):\n\n" + head2 + "\n".join(lines2)
    cpu_rows = [r for r in rows if r.get("cpu_ms_per_batch")]
    if cpu_rows:
        text += (
            "\n\nCPU time per batch (ms, median over rounds), inside the step and outside it:\n\n"
            "| method | ours step | ours outside | theirs step | theirs outside | step ratio (CPU) |\n"
            "|---|---:|---:|---:|---:|---:|\n"
        )
        text += "\n".join(_cpu_line(r["method"], r["cpu_ms_per_batch"]) for r in cpu_rows)
    return text


def _cpu_line(method: str, c: dict[str, float]) -> str:
    return (
        f"| {method} | {c['ours_step']:.1f} | {c['ours_outside']:.1f} | {c['peer_step']:.1f} | "
        f"{c['peer_outside']:.1f} | {c['peer_step'] / c['ours_step']:.2f} |"
    )


def _order(key: str) -> tuple[int, str]:
    first = ["data_s", "step_s", "record_s", "write_s", "monitor_s", "progress_s", "checkpoint_s", "other_s"]
    return (first.index(key) if key in first else len(first), key)


def compare(args: argparse.Namespace) -> int:
    """Run every round (see the module doc), print the tables, write the JSON; the exit status."""
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in PEER_METHODS]
    if bad:
        raise SystemExit(f"error: no collection counterpart for {bad}; valid: {', '.join(sorted(PEER_METHODS))}")
    args.cifar10c = str(Path(args.cifar10c).resolve())
    work = Path(args.out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    stream_file = work / "stream.yaml"
    domains = args.domains.split(",")
    stream_file.write_text(stream_yaml(Path(args.cifar10c), domains, args.n_per_domain, args.batch_size))
    check_same_rows(stream_file, args.data_root, args.n_per_domain)
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    base = Path(args.baseline_src).resolve() if args.baseline_src else None
    order = ["peer", "ours"] + (["base"] if base is not None else [])
    source = {"ours": None, "base": base}
    for k in range(args.rounds):
        for m in methods:
            sides = order[k % len(order) :] + order[: k % len(order)]  # who starts rotates from round to round
            tag = f"{m}-r{k + 1}"
            jobs = [
                peer_job(args, m, work / f"peer-{tag}.json", work / f"peer-{tag}.log")
                if side == "peer"
                else ours_job(args, m, stream_file, work / f"{side}-{tag}", work / f"{side}-{tag}.log", source[side])
                for side in sides
            ]
            pair: dict[str, Any] = {"round": k + 1, "order": sides, "together": args.together}
            pair.update(zip(sides, run_jobs(jobs, args.together)))
            runs[m].append(pair)
            print(f"round {k + 1} {m}: " + ", ".join(_brief(side, pair) for side in order), flush=True)
    rows = [summarise(m, runs[m]) for m in methods]
    print(table(rows))
    base_rows = None
    if base is not None:
        base_rows = [summarise(m, [{**r, "ours": r["base"]} for r in runs[m]]) for m in methods]
        print(f"\nThe same, our code at {base} (before):\n")
        print(table(base_rows))
    if args.json:
        info = {
            "command": " ".join(sys.argv),
            "threads": args.threads,
            "cpu": _cpu(),
            "started_rounds": args.rounds,
            "summary": rows,
            "baseline_src": str(base) if base is not None else None,
            "baseline_summary": base_rows,
            "runs": runs,
        }
        Path(args.json).write_text(json.dumps(info, indent=2) + "\n")
    return 0




def _brief(side: str, pair: dict[str, Any]) -> str:
    r = pair[side]
    text = f"{side} {r['images_per_s']:.1f} img/s ({r['online_error']:.2f}%)"
    if side != "peer":
        text += f" ratio {r['images_per_s'] / pair['peer']['images_per_s']:.2f}"
    return text


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{os.cpu_count()} cores"
