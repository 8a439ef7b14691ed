"""Which statistics BatchNorm normalises with during adaptation; the source running statistics are never written.

- `source`: eval mode, the running (source) statistics.
- `batch`: the current test batch's statistics. BatchNorm runs in training mode with `track_running_stats`
  off, which makes PyTorch normalise with the batch statistics and pass no running buffers to update,
  so the buffers (still registered, still in `state_dict`) keep the source values bit for bit.
- `batch` with prior strength N > 0 (Schneider et al. 2020): per channel,
  mu = N/(N+n) mu_source + n/(N+n) mu_batch and var = N/(N+n) var_source + n/(N+n) var_batch, with n the
  batch size and the biased batch variance (the one BatchNorm normalises with). Implemented as a
  per-instance forward on the layer (so parameter names, buffers and `state_dict` keys are unchanged).
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["batch_stats_per_group", "batchnorm_layers", "mixed_batch_norm", "set_bn_stats", "uses_batch_statistics"]


def batchnorm_layers(model: nn.Module) -> list[nn.Module]:
    """Every BatchNorm layer (1d/2d/3d/Sync) of `model`, in module order."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


def uses_batch_statistics(model: nn.Module) -> bool:
    """Whether a BatchNorm layer of `model` normalises with the current batch's statistics alone (training mode, no
    tracking, no prior-mixed forward): then a batch of one image has no meaningful statistics (and torch refuses one
    where a layer's maps are 1x1)."""
    return any(
        bn.training and not bn.track_running_stats and "forward" not in bn.__dict__ for bn in batchnorm_layers(model)
    )


def mixed_batch_norm(bn: _BatchNorm, x: Tensor, prior_strength: float, groups: int = 1) -> Tensor:
    """BatchNorm of `x` with the source statistics of `bn` mixed into the batch ones (weight N = prior_strength).

    Statistics in float32 (bf16 autocast would otherwise round them); differentiable, so a method may adapt
    parameters through it. Layers without running statistics fall back to pure batch statistics. `groups` > 1
    splits the batch into that many equal consecutive slices, each normalised with its own statistics (n = its size),
    exactly as separate forwards of the slices would.
    """
    if groups < 1 or x.shape[0] % groups:
        raise ValueError(f"cannot split a batch of {x.shape[0]} into {groups} equal groups")
    xf = x.float().reshape(groups, x.shape[0] // groups, *x.shape[1:])
    dims = [1] + list(range(3, xf.dim()))
    var_b, mean_b = torch.var_mean(xf, dim=dims, correction=0)  # (groups, C)
    if bn.running_mean is not None and bn.running_var is not None and prior_strength > 0:
        n = xf.shape[1]
        w_src = prior_strength / (prior_strength + n)
        mean = w_src * bn.running_mean.float() + (1.0 - w_src) * mean_b
        var = w_src * bn.running_var.float() + (1.0 - w_src) * var_b
    else:
        mean, var = mean_b, var_b
    shape = [groups, 1, -1] + [1] * (x.dim() - 2)  # per group and channel
    y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + bn.eps)
    if bn.affine:
        shape[0] = 1
        y = y * bn.weight.float().view(shape) + bn.bias.float().view(shape)
    return y.reshape(x.shape).to(x.dtype)


def _prior_forward(self: _BatchNorm, x: Tensor) -> Tensor:
    self._check_input_dim(x)
    return mixed_batch_norm(self, x, self._tta_prior_strength)


def _grouped_forward(self: _BatchNorm, x: Tensor) -> Tensor:
    self._check_input_dim(x)
    return mixed_batch_norm(self, x, self._tta_group_prior, self._tta_groups)


@contextlib.contextmanager
def batch_stats_per_group(model: nn.Module, groups: int) -> Iterator[None]:
    """Inside the block, every BatchNorm layer of `model` that normalises with test-batch statistics (`set_bn_stats`
    "batch", with or without a prior) splits its input into `groups` equal consecutive slices and normalises each
    with its own statistics, as `groups` separate forwards would: several batches (e.g. CoTTA's augmented views, one
    batch per view) in one forward. Layers on source statistics are left alone; groups <= 1 changes nothing."""
    layers = [
        bn for bn in batchnorm_layers(model) if "forward" in bn.__dict__ or (bn.training and not bn.track_running_stats)
    ]
    if groups <= 1 or not layers:
        yield
        return
    saved = [bn.__dict__.get("forward") for bn in layers]
    for bn in layers:
        bn._tta_groups = int(groups)
        # the prior applies only where `set_bn_stats` installed the prior forward (a stale attribute must not)
        bn._tta_group_prior = bn._tta_prior_strength if "forward" in bn.__dict__ else 0.0
        bn.forward = types.MethodType(_grouped_forward, bn)
    try:
        yield
    finally:
        for bn, forward in zip(layers, saved):
            if forward is None:
                del bn.forward
            else:
                bn.forward = forward


def set_bn_stats(model: nn.Module, stats: str, prior_strength: float = 0.0) -> int:
    """Make every BatchNorm layer of `model` normalise with `stats` ("batch" or "source"); returns how many.

    Other modules' modes are not touched (call `model.eval()` first so dropout is off). Idempotent: the
    original `track_running_stats` flag is remembered on the layer and restored by `stats="source"`.
    """
    if stats not in ("batch", "source"):
        raise ValueError(f"BatchNorm statistics must be 'batch' or 'source', got {stats!r}")
    if prior_strength < 0:
        raise ValueError(f"prior_strength must be >= 0, got {prior_strength}")
    layers = batchnorm_layers(model)
    for bn in layers:
        if not hasattr(bn, "_tta_track_running_stats"):
            bn._tta_track_running_stats = bn.track_running_stats
        if "forward" in bn.__dict__:  # drop an earlier prior forward
            del bn.forward
        if stats == "source":
            bn.track_running_stats = bn._tta_track_running_stats
            bn.train(False)
        elif prior_strength > 0:
            bn._tta_prior_strength = float(prior_strength)
            bn.forward = types.MethodType(_prior_forward, bn)
            bn.track_running_stats = False
            bn.train(False)  # the forward above ignores the mode; eval keeps any stray call read-only
        else:
            # Training mode + no tracking: F.batch_norm gets the batch statistics and no running buffers.
            bn.track_running_stats = False
            bn.train(True)
    return len(layers)
