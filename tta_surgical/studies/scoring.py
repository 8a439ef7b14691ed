"""Scoring a finished online run: its adapted model (the final `state.pt`) on labeled test sets."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from ..autotune import block_weight_table
from ..config import Config
from ..data.context import DataLike
from ..engine import build
from ..runfolder import RunFolder

__all__ = ["score_run"]


def score_run(
    folder: str | os.PathLike,
    cfg: Config,
    tests: Mapping[str, tuple[Any, Any]],
    *,
    data: DataLike = None,
) -> dict[str, Any]:
    """The adapted model of a finished run (its final `state.pt`) on labeled test sets: accuracy % per set through
    the method's `predict` (batches of the stream's batch size), and the per-block auto-RGN weights of the
    method's latest refresh when it has them. Changes nothing in `folder`."""
    state = RunFolder(folder).load_checkpoint()
    if state is None:
        raise FileNotFoundError(f"{folder} holds no state.pt: the run has not finished")
    # Built exactly as the run built it (model, method, its context), then given the run's final state.
    built = build(cfg, data=data)
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
