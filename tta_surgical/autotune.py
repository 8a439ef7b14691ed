"""Automatic per-tensor layer selection for surgical fine-tuning: auto-RGN and auto-SNR (Lee et al., ICLR 2023).

Surgical fine-tuning says *which* layers to tune depends on the shift; these criteria pick them from the data.

auto-RGN (relative gradient norm), as the paper's official code computes it:
  per tensor, RGN = ||g||_2 / ||theta||_2 (Frobenius norms of the loss gradient and of the tensor), averaged
  over the first `n_batches` (5) batches; the weights are RGN / max(RGN), so they lie in (0, 1] and the
  tensor with the largest relative gradient trains at the base learning rate; tensor i then trains with
  lr = base_lr * weight_i (`weighted_param_groups`: one optimiser group per tensor). The supervised
  protocol recomputes the weights at the start of every epoch on the current parameters and rebuilds the
  optimiser (Adam state resets); the online method (`tta_surgical.methods.entropy_min`) instead updates
  the groups' learning rates in place (see there).

  Choices made explicit here: the official code skips every tensor whose name contains "bn"; here norm
  layers are a flag (`include_norm`, default True; False gives norm-layer tensors weight 0, i.e. frozen,
  like the official code, but detected by module type rather than by name). A tensor with ||theta|| = 0
  (e.g. a freshly initialised BatchNorm bias) has an undefined relative gradient: it gets RGN 0, weight 0.

auto-SNR (gradient signal-to-noise ratio), our statistic:
  per-example gradients g_1..g_N of the loss (N = the examples of one labeled batch, N >= 2), computed with
  `torch.func` (`functional_call` + `vmap(grad(...))`, chunked) with the model in eval mode, so BatchNorm
  uses its running (source) statistics and the examples are independent; per element j,
  snr_j = mean_j^2 / var_j with mean_j = (1/N) sum_i g_ij and the unbiased variance
  var_j = 1/(N-1) sum_i (g_ij - mean_j)^2 (elements with var_j = 0, i.e. a gradient identically zero on
  every example, count as 0: no signal); the tensor's score is the mean of snr_j over its elements. Scores
  are divided by their max across tensors (not min-max: dividing keeps 0 meaning "no signal" and never
  forces the weakest tensor to 0, so the threshold is a fraction of the best tensor's SNR). `snr_mask` keeps
  tensors with score >= threshold. The official code's `eb-criterion` differs: it uses the *batch*
  gradient g and the variance of g across the tensor's first dimension, mean(g^2 / (var + 1e-8)),
  thresholded at 0.95 without normalisation.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from .models import block_map
from .models.blocks import NORM_TYPES

__all__ = [
    "block_weight_table",
    "relative_grad_norms",
    "rgn_from_grads",
    "rgn_weights",
    "rgn_weights_from_grads",
    "snr_mask",
    "snr_scores",
    "weighted_param_groups",
]

NamedParams = list[tuple[str, nn.Parameter]]
LossFn = Callable[[Tensor, Tensor | None], Tensor]


# ---------------------------------------------------------------------------------------------------- helpers


def _norm_ids(model: nn.Module) -> set[int]:
    """ids of the parameters owned by normalisation layers (BatchNorm, GroupNorm, LayerNorm, ...)."""
    return {id(p) for m in model.modules() if isinstance(m, NORM_TYPES) for p in m.parameters(recurse=False)}


def _considered(model: nn.Module, params: NamedParams, include_norm: bool) -> NamedParams:
    params = list(params)
    if not params:
        raise ValueError("auto-tuning got no parameters: pass the selected (name, Parameter) pairs")
    names = [n for n, _ in params]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate parameter names in params: {sorted({n for n in names if names.count(n) > 1})}")
    if include_norm:
        return params
    norm = _norm_ids(model)
    return [(n, p) for n, p in params if id(p) not in norm]


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """num / den where den > 0, else 0 (an undefined ratio counts as no signal); no NaN even in the gradient."""
    ok = den > 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def _divide_by_max(values: Tensor) -> Tensor:
    """values / max(values); all zeros stay zeros (no tensor has any signal)."""
    return _safe_div(values, values.max().expand_as(values))


def rgn_from_grads(params: Iterable[nn.Parameter | Tensor], grads: Iterable[Tensor | None]) -> Tensor:
    """Per-tensor ||g||_2 / ||theta||_2 as one float32 tensor on the parameters' device (no host sync).

    A missing gradient (None: the tensor does not influence the loss) gives 0; so does ||theta|| = 0.
    """
    theta = torch.stack([torch.linalg.vector_norm(p.detach().float()) for p in params])
    gnorm = torch.stack(
        [torch.linalg.vector_norm(g.detach().float()) if g is not None else theta.new_zeros(()) for g in grads]
    )
    return _safe_div(gnorm, theta)


def rgn_weights_from_grads(params: Iterable[nn.Parameter | Tensor], grads: Iterable[Tensor | None]) -> Tensor:
    """auto-RGN weights from one set of gradients: `rgn_from_grads` divided by its max (all zeros stay zeros).

    For callers that already hold the gradients (the online methods read `p.grad` after their backward)."""
    return _divide_by_max(rgn_from_grads(params, grads))


def _first_device(params: NamedParams) -> torch.device:
    return params[0][1].device


# ---------------------------------------------------------------------------------------------------- auto-RGN


def relative_grad_norms(
    model: nn.Module,
    params: NamedParams,
    batches: Iterable[tuple[Tensor, Tensor | None]],
    loss_fn: LossFn,
    n_batches: int = 5,
    include_norm: bool = True,
) -> dict[str, float]:
    """Raw per-tensor relative gradient norm ||g||_2 / ||theta||_2, averaged over up to `n_batches` batches.

    For each of the first `n_batches` items `(x, y)` of `batches` (y may be None for an unsupervised loss):
    `loss_fn(model(x), y)`, its gradient with respect to the tensors of `params` (via `torch.autograd.grad`,
    so no `.grad` attribute is touched), the per-tensor RGN; the mean over the batches is returned, keyed by
    name (norm-layer tensors left out when `include_norm` is False). The forward runs in the model's current
    mode (set BatchNorm as the protocol wants before calling: eval for the supervised protocol); the model's
    buffers (BatchNorm running statistics) and the `requires_grad` flags are restored afterwards, so the
    measurement has no side effect. Raises FloatingPointError if a loss or gradient is not finite.
    """
    if n_batches < 1:
        raise ValueError(f"n_batches must be >= 1, got {n_batches}")
    considered = _considered(model, params, include_norm)
    if not considered:
        return {}
    tensors = [p for _, p in considered]
    device = _first_device(considered)
    flags = [p.requires_grad for p in tensors]
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    total = None
    seen = 0
    try:
        for p in tensors:
            p.requires_grad_(True)
        with torch.enable_grad():
            for x, y in itertools.islice(batches, n_batches):
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True) if y is not None else None
                loss = loss_fn(model(x), y)
                grads = torch.autograd.grad(loss, tensors, allow_unused=True)
                rgn = rgn_from_grads(tensors, grads)
                total = rgn if total is None else total + rgn
                seen += 1
    finally:
        for p, flag in zip(tensors, flags):
            p.requires_grad_(flag)
        with torch.no_grad():
            for k, v in model.named_buffers():
                v.copy_(buffers[k])
    if seen == 0:
        raise ValueError("relative_grad_norms got no batches: pass an iterable of (x, y) pairs")
    values = (total / seen).tolist()  # the one host sync
    bad = [n for (n, _), v in zip(considered, values) if not math.isfinite(v)]
    if bad:
        raise FloatingPointError(
            f"non-finite gradient for {len(bad)} tensor(s) ({', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}) "
            "while computing auto-RGN: the loss diverged (lower the learning rate)"
        )
    return {n: v for (n, _), v in zip(considered, values)}


def rgn_weights(
    model: nn.Module,
    params: NamedParams,
    batches: Iterable[tuple[Tensor, Tensor | None]],
    loss_fn: LossFn,
    n_batches: int = 5,
    include_norm: bool = True,
) -> dict[str, float]:
    """auto-RGN weights: `relative_grad_norms` divided by their max, so they lie in [0, 1] with max exactly 1.

    Every tensor of `params` gets a weight, in the order of `params`: norm-layer tensors 0.0 when
    `include_norm` is False, zero-norm tensors (and tensors the loss does not depend on) 0.0; if no tensor
    has any gradient, all weights are 0. Use with `weighted_param_groups(params, weights, base_lr)`.
    """
    raw = relative_grad_norms(model, params, batches, loss_fn, n_batches=n_batches, include_norm=include_norm)
    top = max(raw.values(), default=0.0)
    return {n: (raw[n] / top if top > 0 and n in raw else 0.0) for n, _ in params}


# ---------------------------------------------------------------------------------------------------- auto-SNR


def _merge_moments(a: tuple[int, Tensor, Tensor] | None, n_b: int, mean_b: Tensor, m2_b: Tensor):
    """Chan et al.'s parallel update of (count, mean, sum of squared deviations): exact, no cancellation."""
    if a is None:
        return n_b, mean_b, m2_b
    n_a, mean_a, m2_a = a
    n = n_a + n_b
    delta = mean_b - mean_a
    return n, mean_a + delta * (n_b / n), m2_a + m2_b + delta.square() * (n_a * n_b / n)


def snr_scores(
    model: nn.Module,
    params: NamedParams,
    x: Tensor,
    y: Tensor | None,
    loss_fn: LossFn | None = None,
    chunk: int = 64,
    include_norm: bool = True,
) -> dict[str, float]:
    """auto-SNR scores in [0, 1] (divided by the max) from per-example gradients on the batch `x`, `y`.

    See the module docstring for the exact statistic. `loss_fn(logits, y)` is called on one example at a
    time (logits of shape (1, C)); default cross-entropy. The per-example gradients are computed `chunk`
    examples at a time (memory: chunk x the selected parameters' size). The model is put in eval mode for
    the computation (BatchNorm with running statistics: examples independent) and its modes are restored.
    Layers whose eval forward still mixes examples (e.g. BatchNorm with a test-batch prior) are not supported.
    Norm-layer tensors are left out of the result when `include_norm` is False (`snr_mask` then omits them;
    treat a missing tensor as frozen).
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if x.shape[0] < 2:
        raise ValueError(f"snr_scores needs at least 2 examples for a variance, got a batch of {x.shape[0]}")
    if y is not None and y.shape[0] != x.shape[0]:
        raise ValueError(f"x has {x.shape[0]} examples but y has {y.shape[0]}")
    considered = _considered(model, params, include_norm)
    if not considered:
        return {}
    loss_fn = loss_fn if loss_fn is not None else F.cross_entropy
    device = _first_device(considered)
    x = x.to(device)
    y = y.to(device) if y is not None else None
    acc_dtype = torch.float64 if device.type in ("cpu", "cuda") else torch.float32
    primals = {n: p.detach() for n, p in considered}

    def example_loss(pdict: dict[str, Tensor], xi: Tensor, yi: Tensor | None) -> Tensor:
        logits = functional_call(model, pdict, (xi.unsqueeze(0),))
        return loss_fn(logits, yi.unsqueeze(0) if yi is not None else None)

    per_example = vmap(grad(example_loss), in_dims=(None, 0, 0 if y is not None else None))
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    moments: dict[str, tuple[int, Tensor, Tensor] | None] = {n: None for n in primals}
    try:
        with torch.enable_grad():
            for start in range(0, x.shape[0], chunk):
                xc = x[start : start + chunk]
                yc = y[start : start + chunk] if y is not None else None
                grads = per_example(primals, xc, yc)
                for n, g in grads.items():
                    g = g.detach().to(acc_dtype)
                    mean = g.mean(0)
                    m2 = (g - mean).square().sum(0)
                    moments[n] = _merge_moments(moments[n], g.shape[0], mean, m2)
    finally:
        for m, mode in modes:
            m.train(mode)
    raw = []
    for n in primals:
        count, mean, m2 = moments[n]
        var = m2 / (count - 1)
        raw.append(_safe_div(mean.square(), var).mean())
    values = _divide_by_max(torch.stack(raw)).tolist()
    bad = [n for n, v in zip(primals, values) if not math.isfinite(v)]
    if bad:
        raise FloatingPointError(f"non-finite per-example gradients for {', '.join(bad[:5])} while computing auto-SNR")
    return dict(zip(primals, values))


def snr_mask(scores: Mapping[str, float], threshold: float = 0.5) -> dict[str, bool]:
    """True = keep training (score >= threshold), False = freeze; `threshold` is a fraction of the best score."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"snr threshold must lie in [0, 1] (scores are normalised by their max), got {threshold}")
    return {n: bool(s >= threshold) for n, s in scores.items()}


# ---------------------------------------------------------------------------------------------------- using them


def weighted_param_groups(
    params: NamedParams,
    weights: Mapping[str, float],
    base_lr: float,
    weight_decay: float = 0.0,
    min_weight: float = 0.0,
) -> list[dict]:
    """One optimiser parameter group per tensor, lr = base_lr * weight, in the order of `params`.

    Tensors with weight <= `min_weight` are dropped (frozen: keep their `requires_grad` off, or they still get
    gradients); every tensor of `params` must have a weight. Each group also carries `name` and `weight`
    (optimisers keep extra keys, so they survive `state_dict()`). A mask from `snr_mask` works as weights
    (True = 1.0). May return an empty list when everything is dropped; the caller decides what that means.
    """
    if not (base_lr >= 0 and math.isfinite(base_lr)):
        raise ValueError(f"base_lr must be a finite number >= 0, got {base_lr!r}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    missing = [n for n, _ in params if n not in weights]
    if missing:
        raise ValueError(
            f"no weight for {len(missing)} tensor(s) ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); "
            "compute the weights on the same params (a tensor left out on purpose should get weight 0)"
        )
    groups = []
    for name, p in params:
        w = float(weights[name])
        if not (w >= 0 and math.isfinite(w)):
            raise ValueError(f"weight of {name!r} must be a finite number >= 0, got {weights[name]!r}")
        if w <= min_weight:
            continue
        groups.append({"params": [p], "lr": base_lr * w, "weight_decay": weight_decay, "name": name, "weight": w})
    return groups


def block_weight_table(model: nn.Module, weights: Mapping[str, float]) -> dict[str, float]:
    """Mean weight per block (`tta_surgical.models.block_map`), every block in model order, for reporting.

    The mean is over the block's tensors that appear in `weights` (unweighted by size); a block none of whose
    tensors appears gets 0.0 (it does not train). Names in `weights` that are not parameters of `model` raise.
    """
    blocks = block_map(model)
    known = {n for names in blocks.values() for n in names}
    unknown = [n for n in weights if n not in known]
    if unknown:
        raise ValueError(f"weights name tensors that are not parameters of the model: {unknown[:5]}")
    table = {}
    for block, names in blocks.items():
        vals = [float(weights[n]) for n in names if n in weights]
        table[block] = sum(vals) / len(vals) if vals else 0.0
    return table
