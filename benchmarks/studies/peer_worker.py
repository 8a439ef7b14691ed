"""One run of a method of the best-known TTA collection over a CIFAR-10-C folder, timed (`benchmarks/peer_worker.py`,
a child process of `benchmarks/peer_collection.py`).


The collection (github.com/mariodoebler/test-time-adaptation) is imported from `--peer-root`, never copied: its
method classes, its config defaults (`conf.py`) and its CIFAR-10-C config files (`cfgs/cifar10_c/<name>.yaml`) are
used as they are. What this worker does in their place, and why:

- the model is this package's pretrained resnet20 (`tta_surgical.models.create_model`), the one our run adapts;
- batches come from the same `.npy` arrays our `stream.source=cifar10c` reads, in the same order (the first
  `--n-per-domain` images of each corruption at severity 5, test-set order, batches of `--batch-size`); each batch
  is converted from uint8 NHWC to float NCHW in [0, 1] in one vectorised call (the collection converts per image in
  a DataLoader: ours is the cheaper path, so the comparison favours the collection);
- the loop is the collection's `get_accuracy` (predictions counted on the device, read once at the end; no per-batch
  output); the model is reset before the first domain and never again (the collection's continual setting);
- modules the chosen methods import only for other models or datasets are stubbed so the collection's full
  dependency set (CLIP, webdataset, the model zoos) is not needed: `models.model` (a class used in `isinstance`
  checks only), `methods` (the package, without its `__init__` importing every method), `datasets.data_loading`
  (EATA's source loader: here the first `SOURCE.NUM_SAMPLES` clean CIFAR-10 test images in test-set order, the
  images our EATA uses for its Fisher information);
- RoTTA: the collection's `forward_and_adapt` calls `self.loss_calculation(x)` in its fp32 branch while the method
  takes no argument (a TypeError as released, on any run without mixed precision): the worker's subclass accepts and
  ignores the argument; nothing else of the method changes.

Requirements beyond the package: `pip install yacs iopath einops` (the collection's config system and DeYO's patch
shuffle). The timing uses one torch thread unless `--threads` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
from torch import nn

# Our method name -> (the collection's config file, its class name, the module that defines it).
PEER_METHODS = {
    "tent": ("tent.yaml", "Tent", "methods.tent"),
    "eta": ("eta.yaml", "EATA", "methods.eata"),
    "eata": ("eata.yaml", "EATA", "methods.eata"),
    "sar": ("sar.yaml", "SAR", "methods.sar"),
    "deyo": ("deyo.yaml", "DeYO", "methods.deyo"),
    "roid": ("roid.yaml", "ROID", "methods.roid"),
    "cotta": ("cotta.yaml", "CoTTA", "methods.cotta"),
    "rotta": ("rotta.yaml", "RoTTA", "methods.rotta"),
}


def _stub_modules(root: Path, source_batches: list[torch.Tensor]) -> None:
    """Register the stand-ins described in the module docstring before any of the collection's modules loads."""
    sys.path.insert(0, str(root))
    methods_pkg = types.ModuleType("methods")
    methods_pkg.__path__ = [str(root / "methods")]  # submodules import; the package's __init__ does not run
    sys.modules["methods"] = methods_pkg

    model_mod = types.ModuleType("models.model")

    class ResNetDomainNet126(nn.Module):  # only ever used in isinstance checks by the chosen methods
        pass

    model_mod.ResNetDomainNet126 = ResNetDomainNet126
    sys.modules["models.model"] = model_mod

    loading = types.ModuleType("datasets.data_loading")

    def get_source_loader(**_: object) -> tuple[None, list[list[torch.Tensor]]]:
        return None, [[x] for x in source_batches]

    loading.get_source_loader = get_source_loader
    sys.modules["datasets.data_loading"] = loading


def _peer_config(root: Path, method: str, batch_size: int, n_per_domain: int):
    """The collection's global config with its defaults, merged with its CIFAR-10-C file for `method`."""
    os.chdir(root)  # conf.py and some methods read paths relative to the collection's folder
    import conf

    cfg = conf.cfg
    cfg.defrost()
    cfg.merge_from_other_cfg(conf._CFG_DEFAULT)
    conf.merge_from_file(str(root / "cfgs" / "cifar10_c" / PEER_METHODS[method][0]))
    cfg.TEST.BATCH_SIZE = batch_size
    cfg.CORRUPTION.NUM_EX = n_per_domain
    cfg.freeze()
    return cfg


def _seed(seed: int) -> None:
    """What the collection's `load_cfg_from_args` seeds (RNG_SEED)."""
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def read_domain(folder: Path, name: str, severity: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first n images and labels of `name` at `severity` from a CIFAR-10-C folder (official or make-cifar10c)."""
    images = np.load(folder / f"{name}.npy", mmap_mode="r")
    labels = np.load(folder / "labels.npy", mmap_mode="r")
    sidecar = folder / f"{name}.json"
    if sidecar.is_file():
        start = int(json.loads(sidecar.read_text())["rows"][str(severity)][0])
    else:  # the official layout: 10,000 rows per severity
        start = (severity - 1) * (len(images) // 5)
    lab_start = (severity - 1) * (len(labels) // 5)
    return np.array(images[start : start + n]), np.array(labels[lab_start : lab_start + n], dtype=np.int64)


def _build(args: argparse.Namespace):
    """(the collection's method wrapping our model, its config, the number of classes)."""
    from tta_surgical.data.cifar import find_cifar10, load_cifar10
    from tta_surgical.models import create_model

    cfg_name, cls_name, module = PEER_METHODS[args.method]
    sources: list[torch.Tensor] = []
    if args.method == "eata":
        clean, _ = load_cifar10(find_cifar10(args.data_root))
        n = 2000
        x = torch.from_numpy(np.ascontiguousarray(clean[:n])).permute(0, 3, 1, 2).float().div_(255.0)
        sources = list(x.split(args.batch_size))
    _stub_modules(Path(args.peer_root), sources)
    cfg = _peer_config(Path(args.peer_root), args.method, args.batch_size, args.n_per_domain)
    _seed(int(cfg.RNG_SEED))
    model, _ = create_model("resnet20", data=args.data_root)
    model.model_preprocess = None  # the collection's evaluate() sets it on every model (None: no pre-processing)
    import importlib

    cls = getattr(importlib.import_module(module), cls_name)
    if args.method == "rotta":
        base = cls

        class RoTTAFp32(base):  # see the module docstring: the released fp32 branch passes an argument
            def loss_calculation(self, *_: object):
                return base.loss_calculation(self)

        cls = RoTTAFp32
    return cls(cfg=cfg, model=model, num_classes=10), cfg


def run(args: argparse.Namespace, t_process: float) -> dict:
    torch.set_num_threads(args.threads)
    t_setup = time.perf_counter()
    method, cfg = _build(args)
    domains = list(cfg.CORRUPTION.TYPE) if args.domains is None else args.domains.split(",")
    data = [read_domain(Path(args.cifar10c), d, 5, args.n_per_domain) for d in domains]
    setup_s = time.perf_counter() - t_setup
    step_s = step_cpu_s = 0.0
    per_domain = {}
    t_loop, cpu_loop = time.perf_counter(), time.process_time()
    method.reset()  # the collection resets before the first domain
    total_correct = torch.zeros(())
    n_images = 0
    with torch.no_grad():  # the collection's get_accuracy
        for name, (images, labels) in zip(domains, data):
            correct = torch.zeros(())
            for start in range(0, len(images), args.batch_size):
                x = torch.from_numpy(images[start : start + args.batch_size]).permute(0, 3, 1, 2).float().div_(255.0)
                y = torch.from_numpy(labels[start : start + args.batch_size])
                t0, c0 = time.perf_counter(), time.process_time()
                output = method(x)
                step_s += time.perf_counter() - t0
                step_cpu_s += time.process_time() - c0
                correct += (output.argmax(1) == y).float().sum()
            per_domain[name] = correct
            total_correct += correct
            n_images += len(images)
        total = float(total_correct.item())
    loop_s = time.perf_counter() - t_loop
    cpu_s = time.process_time() - cpu_loop
    errors = {k: 100.0 * (1.0 - float(v) / args.n_per_domain) for k, v in per_domain.items()}
    return {
        "method": args.method,
        "peer_class": PEER_METHODS[args.method][1],
        "n_images": n_images,
        "online_error": 100.0 * (1.0 - total / max(n_images, 1)),
        "errors": errors,
        "loop_s": loop_s,
        "cpu_s": cpu_s,
        "step_s": step_s,
        "step_cpu_s": step_cpu_s,
        "other_s": max(loop_s - step_s, 0.0),
        "setup_s": setup_s,
        "process_s_to_end": time.perf_counter() - t_process,
        "threads": torch.get_num_threads(),
        "optimizer": type(getattr(method, "optimizer", None)).__name__,
        "images_per_s": n_images / loop_s if loop_s > 0 else math.nan,
    }
