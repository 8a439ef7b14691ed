"""Which statistics BatchNorm normalises with during adaptation; the source running statistics are never written.

- `source`: eval mode, the running (source) statistics.
- `batch`: the current test batch's statistics. BatchNorm runs in training mode with `track_running_stats`
  off, which makes PyTorch normalise with the batch statistics and pass no running buffers to update,
  so the buffers (still registered, still in `state_dict`) keep the source values bit for bit.
- `batch` with prior strength N > 0 (Schneider et al. 2020): per channel,
  mu = N/(N+n) mu_source + n/(N+n) mu_batch and var = N/(N+n) var_source + n/(N+n) var_batch, with n the
  batch size and the biased batch variance (the one BatchNorm normalises with). Implemented as a
  per-instance forward on the layer (so parameter names, buffers and `state_dict` keys are unchanged).
- target statistics (`use_target_statistics`): a running estimate of the *target* domain's statistics, an
  exponential moving average over test batches (momentum m): each layer normalises with
  mu = (1 - m) mu_ema + m mu_batch (and the same for the variance), which then becomes mu_ema. Batches that hold a
  few classes only (label shift, temporally correlated streams) bias single-batch statistics; the average over
  batches does not follow them as far. The estimates live in a `TargetStatistics` module (buffers), so a method
  registers it as state and reset / checkpoint / resume cover it exactly.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "TargetStatistics",
    "batch_stats_per_group",
    "batchnorm_layers",
    "mixed_batch_norm",
    "set_bn_stats",
    "use_target_statistics",
    "uses_batch_statistics",
]


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


def _prior_patched(bn: _BatchNorm) -> bool:
    """Whether `set_bn_stats` installed its prior-mixing forward on `bn` (not another patch, e.g. target statistics)."""
    return getattr(bn.__dict__.get("forward"), "__func__", None) is _prior_forward


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
        bn for bn in batchnorm_layers(model) if _prior_patched(bn) or (bn.training and not bn.track_running_stats)
    ]
    if groups <= 1 or not layers:
        yield
        return
    saved = [bn.__dict__.get("forward") for bn in layers]
    for bn in layers:
        bn._tta_groups = int(groups)
        # the prior applies only where `set_bn_stats` installed the prior forward (a stale attribute must not)
        bn._tta_group_prior = bn._tta_prior_strength if _prior_patched(bn) else 0.0
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


class TargetStatistics(nn.Module):
    """Running (EMA) estimates of the target domain's BatchNorm statistics, one mean/variance pair per layer.

    Buffers only: registered as method state it is restored in place (so the layers' forwards keep their reference).
    `updating` (a plain flag, not state) lets one forward per layer and step move the estimates: the owner sets it
    before the step's first forward and clears it after the step, so extra forwards of the step (augmented views,
    a sharpness-aware second pass) and `predict` read the estimates without moving them.
    """

    def __init__(self, layers: list[_BatchNorm], momentum: float) -> None:
        super().__init__()
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"target statistics momentum must lie in (0, 1], got {momentum}")
        self.momentum = float(momentum)
        self.n_layers = len(layers)
        for i, bn in enumerate(layers):
            device = bn.weight.device if bn.weight is not None else None
            self.register_buffer(f"mean{i}", torch.zeros(bn.num_features, device=device))
            self.register_buffer(f"var{i}", torch.ones(bn.num_features, device=device))
        first = layers[0].weight.device if layers and layers[0].weight is not None else None
        self.register_buffer("initialized", torch.zeros(len(layers), dtype=torch.bool, device=first))
        self.updating = False
        self._moved: set[int] = set()

    def start_step(self) -> None:
        """The next forward of each layer moves its estimate (once per layer until `end_step`)."""
        self.updating, self._moved = True, set()

    def end_step(self) -> None:
        self.updating, self._moved = False, set()

    def clear(self) -> None:
        """Forget the estimates: the next updating forward starts them at its batch's statistics."""
        self.initialized.zero_()

    def normalise(self, bn: _BatchNorm, index: int, x: Tensor) -> Tensor:
        """`x` normalised with the EMA mixed with this batch's statistics (in float32; differentiable through the
        batch part)."""
        xf = x.float()
        dims = [0] + list(range(2, xf.dim()))
        var_b, mean_b = torch.var_mean(xf, dim=dims, correction=0)
        seen = self.initialized[index]
        # no host sync: an uninitialised estimate starts at this batch's statistics (then mu = mu_batch exactly)
        prev_mean = torch.where(seen, getattr(self, f"mean{index}"), mean_b.detach())
        prev_var = torch.where(seen, getattr(self, f"var{index}"), var_b.detach())
        m = self.momentum
        mean = (1.0 - m) * prev_mean + m * mean_b
        var = (1.0 - m) * prev_var + m * var_b
        if self.updating and index not in self._moved:
            self._moved.add(index)
            with torch.no_grad():
                getattr(self, f"mean{index}").copy_(mean.detach())
                getattr(self, f"var{index}").copy_(var.detach())
                self.initialized[index] = True
        shape = [1, -1] + [1] * (x.dim() - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + bn.eps)
        if bn.affine:
            y = y * bn.weight.float().view(shape) + bn.bias.float().view(shape)
        return y.to(x.dtype)


def _target_forward(self: _BatchNorm, x: Tensor) -> Tensor:
    self._check_input_dim(x)
    return self._tta_target.normalise(self, self._tta_target_index, x)


def use_target_statistics(model: nn.Module, store: TargetStatistics) -> int:
    """Make every BatchNorm layer of `model` normalise with the running target statistics of `store` (built for
    `batchnorm_layers(model)`); `set_bn_stats` switches back. Returns the number of layers."""
    layers = batchnorm_layers(model)
    if len(layers) != store.n_layers:
        raise ValueError(f"target statistics hold {store.n_layers} layers but the model has {len(layers)}")
    for i, bn in enumerate(layers):
        if not hasattr(bn, "_tta_track_running_stats"):
            bn._tta_track_running_stats = bn.track_running_stats
        # in __dict__, not as a submodule: the store's buffers must not join the model's state_dict
        bn.__dict__["_tta_target"] = store
        bn._tta_target_index = i
        bn.forward = types.MethodType(_target_forward, bn)
        bn.track_running_stats = False
        bn.train(False)  # the forward above ignores the mode; eval keeps any stray call read-only
    return len(layers)
