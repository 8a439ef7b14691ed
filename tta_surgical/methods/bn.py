"""Which statistics BatchNorm normalises with during adaptation; the source running statistics are never written.

- `source`: eval mode, the running (source) statistics.
- `batch`: the current test batch's statistics. BatchNorm runs in training mode with `track_running_stats`
  off, which makes PyTorch normalise with the batch statistics and pass no running buffers to update,
  so the buffers (still registered, still in `state_dict`) keep the source values bit for bit.
- `batch` with prior strength N > 0 (Schneider et al. 2020): per channel,
  mu = N/(N+n) mu_source + n/(N+n) mu_batch and var = N/(N+n) var_source + n/(N+n) var_batch, with n the
  batch size and the biased batch variance (the one BatchNorm normalises with). Implemented as a
  per-instance forward on the layer (so parameter names, buffers and `state_dict` keys are unchanged).
- `ema`: running target statistics (`TargetStats`): per channel, mu = (1 - w) mu_running + w mu_batch and likewise the
  variance, with w = max(momentum, 1/n) on the n-th batch since the last restart (a plain average until 1/n falls
  below the momentum, so a restart does not rest on one batch), the running part detached: the gradient flows
  through the current batch's share. For streams whose batches hold few classes, where one batch's statistics are
  biased by the classes present. The running values live in the `TargetStats` module (a method registers it as
  state), not in the layer.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "STATS",
    "TargetStats",
    "batch_stats_per_group",
    "batchnorm_layers",
    "mixed_batch_norm",
    "set_bn_stats",
    "uses_batch_statistics",
]

STATS = ("batch", "source", "ema")


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


class TargetStats(nn.Module):
    """Running target statistics for the BatchNorm layers of one model (`set_bn_stats` "ema"), as buffers.

    Per layer (in `batchnorm_layers` order): the running per-channel mean and biased variance and the number of batches
    they hold since the last `restart`. A step `arm`s it, the first forward of each layer in that step proposes its
    blended statistics and `commit` writes them, so a method's later forwards in the same step (augmented views, a
    second SAM pass) normalise against the same running values and do not count as batches. Forwards outside an armed
    step (predictions) read and never write. A module, so a method registers it as state and `reset`, checkpoints
    and resume restore it in place (the layers' forwards keep pointing at it).
    """

    def __init__(self, model: nn.Module, momentum: float = 0.1) -> None:
        super().__init__()
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"running-statistics momentum must be in (0, 1], got {momentum}")
        self.momentum = float(momentum)
        layers = batchnorm_layers(model)
        self.channels = [int(bn.num_features) for bn in layers]
        device = next((t.device for t in [*model.parameters(), *model.buffers()]), torch.device("cpu"))
        for i, c in enumerate(self.channels):
            self.register_buffer(f"mean{i}", torch.zeros(c, device=device))
            self.register_buffer(f"var{i}", torch.ones(c, device=device))
        self.register_buffer("counts", torch.zeros(len(layers), dtype=torch.long, device=device))
        self._pending: dict[int, tuple[Tensor, Tensor]] | None = None

    def restart(self) -> None:
        """Forget the running values: the next batch's statistics start them again (a new domain)."""
        self.counts.zero_()

    def arm(self) -> None:
        self._pending = {}

    def disarm(self) -> None:
        self._pending = None

    @torch.no_grad()
    def commit(self) -> None:
        """Write the statistics the armed step's first forward proposed (one batch more per layer), then disarm."""
        for i, (mean, var) in (self._pending or {}).items():
            getattr(self, f"mean{i}").copy_(mean)
            getattr(self, f"var{i}").copy_(var)
            self.counts[i] += 1
        self._pending = None

    def blend(self, index: int, mean_b: Tensor, var_b: Tensor) -> tuple[Tensor, Tensor]:
        """The statistics layer `index` normalises with: (1 - w) running + w batch, w = max(momentum, 1/(n + 1)) with n
        batches held (w = 1 right after a restart); differentiable in the batch share only. No host sync."""
        w = (1.0 / (self.counts[index] + 1).float()).clamp(min=self.momentum)
        mean = (1.0 - w) * getattr(self, f"mean{index}") + w * mean_b
        var = (1.0 - w) * getattr(self, f"var{index}") + w * var_b
        if self._pending is not None and index not in self._pending:
            self._pending[index] = (mean.detach(), var.detach())
        return mean, var


def _ema_forward(self: _BatchNorm, x: Tensor) -> Tensor:
    self._check_input_dim(x)
    xf = x.float()
    var_b, mean_b = torch.var_mean(xf, dim=[0] + list(range(2, x.dim())), correction=0)
    mean, var = self.__dict__["_tta_target"].blend(self._tta_target_index, mean_b, var_b)
    shape = [1, -1] + [1] * (x.dim() - 2)
    y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
    if self.affine:
        y = y * self.weight.float().view(shape) + self.bias.float().view(shape)
    return y.to(x.dtype)


@contextlib.contextmanager
def batch_stats_per_group(model: nn.Module, groups: int) -> Iterator[None]:
    """Inside the block, every BatchNorm layer of `model` that normalises with test-batch statistics (`set_bn_stats`
    "batch", with or without a prior) splits its input into `groups` equal consecutive slices and normalises each
    with its own statistics, as `groups` separate forwards would: several batches (e.g. CoTTA's augmented views, one
    batch per view) in one forward. Layers on source or running ("ema") statistics are left alone; groups <= 1 changes
    nothing."""
    on_batch = [bn for bn in batchnorm_layers(model) if "_tta_target" not in bn.__dict__]
    layers = [bn for bn in on_batch if "forward" in bn.__dict__ or (bn.training and not bn.track_running_stats)]
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


def set_bn_stats(model: nn.Module, stats: str, prior_strength: float = 0.0, target: TargetStats | None = None) -> int:
    """Make every BatchNorm layer of `model` normalise with `stats` ("batch", "source" or "ema"); returns how many.

    "ema" needs `target`, the `TargetStats` built for this model, which holds the running values. Other modules'
    modes are not touched (call `model.eval()` first so dropout is off). Idempotent: the original
    `track_running_stats` flag is remembered on the layer and restored by `stats="source"`.
    """
    if stats not in STATS:
        raise ValueError(f"BatchNorm statistics must be one of {', '.join(STATS)}; got {stats!r}")
    if prior_strength < 0:
        raise ValueError(f"prior_strength must be >= 0, got {prior_strength}")
    layers = batchnorm_layers(model)
    if stats == "ema" and (target is None or target.channels != [int(bn.num_features) for bn in layers]):
        raise ValueError("BatchNorm statistics 'ema' need the TargetStats built for this model (target=...)")
    for i, bn in enumerate(layers):
        if not hasattr(bn, "_tta_track_running_stats"):
            bn._tta_track_running_stats = bn.track_running_stats
        if "forward" in bn.__dict__:  # drop an earlier prior or running-statistics forward
            del bn.forward
        bn.__dict__.pop("_tta_target", None)
        if stats == "source":
            bn.track_running_stats = bn._tta_track_running_stats
            bn.train(False)
        elif stats == "ema":
            # in __dict__ directly: as a module attribute the target would become a submodule (state_dict keys)
            bn.__dict__["_tta_target"] = target
            bn._tta_target_index = i
            bn.forward = types.MethodType(_ema_forward, bn)
            bn.track_running_stats = False
            bn.train(False)  # as for the prior forward: eval keeps any stray call read-only
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
