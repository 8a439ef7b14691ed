"""Error of a pretrained CIFAR-10 model on CIFAR-10-C, per corruption and severity, no adaptation
(`benchmarks/cifar10c_accuracy.py`).

Images come from a CIFAR-10-C folder in the official layout (`cifar10c`: the Zenodo release or the output of
`tta-surgical make-cifar10c`), or, without it, are generated on the fly with our engine exactly as
`make-cifar10c` would write them (same seeds, same uint8 rounding). `reference` adds a second folder (e.g. the
official generator's output) evaluated on the same images, with the difference per corruption: the fidelity
check of the corruption engine (target: within 2 points per corruption at severity 5, within 1 point on the
mean).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tta_surgical.corruptions import BENCHMARK_CORRUPTIONS, corrupt, make_generator, to_uint8
from tta_surgical.fileio import atomic_write_text
from tta_surgical.provenance import provenance
from tta_surgical.streams import StreamSpec, open_source
from tta_surgical.tables import fmt, markdown_table

__all__ = ["AccuracyOptions", "accuracy_markdown", "error_rate", "generate", "run_cifar10c_accuracy"]


@dataclasses.dataclass(frozen=True)
class AccuracyOptions:
    """One evaluation: model, data, the corruptions and severities, where the corrupted images come from."""

    model: str = "resnet20"
    data_root: str | None = None
    cifar10c: str | None = None  # a CIFAR-10-C folder to evaluate; None = generate on the fly
    reference: str | None = None  # a second CIFAR-10-C folder to compare against
    corruptions: tuple[str, ...] = BENCHMARK_CORRUPTIONS
    severities: tuple[int, ...] = (1, 2, 3, 4, 5)
    limit: int | None = None  # the first N test images only
    seed: int = 0  # of the on-the-fly generation
    device: str = "cpu"
    frost_dir: str | None = None
    out: str | Path | None = None  # default benchmarks/out/cifar10c_<model>.json

    def out_path(self) -> Path:
        return Path(self.out or f"benchmarks/out/cifar10c_{self.model}.json")


@torch.inference_mode()
def error_rate(
    model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, device: torch.device, batch_size: int = 500
) -> float:
    """Top-1 error (%) of `model` on uint8 NHWC images."""
    wrong = 0
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(np.array(images[i : i + batch_size])).to(device)
        x = x.permute(0, 3, 1, 2).float().div_(255)
        pred = model(x).argmax(1).cpu().numpy()
        wrong += int((pred != labels[i : i + batch_size]).sum())
    return 100.0 * wrong / len(images)


def generate(
    clean: np.ndarray,
    name: str,
    severity: int,
    seed: int,
    device: torch.device,
    batch_size: int = 1000,
    frost_dir: str | None = None,
) -> np.ndarray:
    """Our corruption of `clean` (uint8 NHWC), batch for batch as make-cifar10c writes it (its seeds, its rounding)."""
    from tta_surgical.data.make_cifar10c import batch_seed

    out = np.empty_like(clean)
    for start in range(0, len(clean), batch_size):
        x = torch.from_numpy(clean[start : start + batch_size]).to(device).permute(0, 3, 1, 2).float() / 255
        g = make_generator(batch_seed(seed, name, severity, start), device)
        y = to_uint8(corrupt(x, name, severity, g, preset="cifar", frost_dir=frost_dir))
        out[start : start + len(x)] = y.permute(0, 2, 3, 1).cpu().numpy()
    return out


def _reference_rows(folder: str, name: str, severity: int, severities: tuple[int, ...], n: int) -> np.ndarray:
    """Severity `severity`'s first `n` images of `<folder>/<name>.npy`: our layout (only `severities`, stacked in
    order) when the file has exactly that many rows, else the official 5-severity layout."""
    ref = np.load(Path(folder) / f"{name}.npy", mmap_mode="r", allow_pickle=False)
    if len(ref) == len(severities) * n:
        i = severities.index(severity)
        return ref[i * n : (i + 1) * n]
    per = len(ref) // 5
    return ref[(severity - 1) * per : (severity - 1) * per + n]


def run_cifar10c_accuracy(opts: AccuracyOptions, log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Evaluate, log the table, write the JSON to `opts.out_path()`, return the result."""
    from tqdm.auto import tqdm

    from tta_surgical.corruptions.textures import default_frost_dir
    from tta_surgical.models import create_model

    say = log or (lambda _: None)
    device = torch.device(opts.device)
    frost_dir = default_frost_dir(opts.frost_dir, opts.data_root)
    model, info = create_model(opts.model, data=opts.data_root)
    model.eval().to(device)
    source = open_source(StreamSpec(source="cifar10"), opts.data_root)  # the CIFAR-10 test set, as a run reads it
    n = opts.limit or len(source.images)
    clean, labels = source.images[:n], source.labels[:n]
    sevs = tuple(opts.severities)
    files = None  # the CIFAR-10-C folder, read by the stream source a run with stream.source cifar10c uses
    if opts.cifar10c:
        spec = StreamSpec(source="cifar10c", path=opts.cifar10c, domains=tuple(opts.corruptions), severities=sevs)
        files = open_source(spec, opts.data_root)
    result: dict[str, Any] = {
        "model": opts.model, "weights": str(info.weights), "n_images": n, "device": str(device),
        "clean_error": error_rate(model, clean, labels, device), "errors": {}, "reference_errors": {},
    }  # fmt: skip
    say(f"{opts.model}: clean error {result['clean_error']:.2f}% on {n} images")
    t0 = time.perf_counter()
    for name in tqdm(opts.corruptions, desc="corruptions"):
        for s in sevs:
            if files is not None:
                imgs = files.stored_images(name, s, np.arange(min(n, len(files)))).permute(0, 2, 3, 1).numpy()
                lab = files.labels[:n]
            else:
                imgs, lab = generate(clean, name, s, opts.seed, device, frost_dir=frost_dir), labels
            result["errors"].setdefault(name, {})[str(s)] = error_rate(model, imgs, lab, device)
            if opts.reference:
                rows = _reference_rows(opts.reference, name, s, sevs, n)
                result["reference_errors"].setdefault(name, {})[str(s)] = error_rate(model, rows, labels, device)
    result["seconds"] = time.perf_counter() - t0
    result["mean_errors"] = {
        str(s): float(np.mean([result["errors"][c][str(s)] for c in opts.corruptions])) for s in sevs
    }
    if opts.reference:
        last = str(sevs[-1])
        result["reference_mean"] = float(np.mean([result["reference_errors"][c][last] for c in opts.corruptions]))
    result["provenance"] = provenance(device)
    say(accuracy_markdown(result))
    out = opts.out_path()
    atomic_write_text(out, json.dumps(result, indent=1))
    say(f"wrote {out} ({result['seconds']:.0f} s)")
    return result


def accuracy_markdown(result: dict[str, Any]) -> str:
    """Error % per corruption (rows) and severity (columns), a mean row; with a reference, its error and the
    difference at the last severity."""
    sevs = list(result["mean_errors"])
    reference = "reference_mean" in result
    header = ["corruption", *(f"s{s}" for s in sevs)]
    header += [f"reference s{sevs[-1]}", f"diff s{sevs[-1]}"] if reference else []
    rows = []
    for name, e in result["errors"].items():
        row = [name, *(fmt(e[s]) for s in sevs)]
        if reference:
            r = result["reference_errors"][name][sevs[-1]]
            row += [fmt(r), f"{e[sevs[-1]] - r:+.2f}"]
        rows.append(row)
    means = result["mean_errors"]
    mean_row = ["**mean**", *(fmt(means[s]) for s in sevs)]
    if reference:
        rm = result["reference_mean"]
        mean_row += [fmt(rm), f"{means[sevs[-1]] - rm:+.2f}"]
    return markdown_table(header, [*rows, mean_row])
