"""`method.blocks: auto`: the runtime chooses, batch by batch and without labels, what to adapt and with which
BatchNorm statistics.

The rule (the evidence is in README "Choosing what to adapt" and `benchmarks/autopilot_signals.py`):

1. **Did the inputs move away from the source?** A frozen copy of the source model (`signals.SourceReference`)
   measures, on the test batch, how far the input statistics of its BatchNorm layers are from the source running
   statistics (`covariate score`: the mean over layers of a per-channel Gaussian KL; a running average over
   batches). Below `shift_off` the stream counts as unshifted, above `shift_on` as shifted (hysteresis between).
   Unshifted: **adapt nothing and keep the source statistics** (the source model's prediction; a label-shifted
   clean stream is where test-batch statistics hurt most). Entering this state restores the source model
   (`method_reset` `auto_source`), so nothing learnt under other statistics is used with source statistics.
2. **Which statistics?** Shifted: the method normalises with the test batch's statistics (its own BatchNorm
   regime for RoTTA, whose robust BatchNorm is its algorithm), unless the batches hold few classes at a time (label
   shift): then with running target statistics (`bn.TargetStats`, "ema": an average of the batches' statistics,
   restarted at a detected domain change), which few-class batches do not bias. The label-shift signal
   (`signals.overdispersion`, `_update_label_shift`): how far the source copy's last-stage batch means of two
   consecutive probes are apart in units of their sampling noise; about 1 (or less) for i.i.d. batches, several
   times more for few-class ones. Pairs across a detected domain change, or far apart (an undetected change), are
   left out; the median of the last `label_window` pairs switches it on above `label_on`, off below `label_off`.
3. **Which blocks?** Shifted: all parameters of the first two stages while the current domain is young (the first
   `young` batches after a detected domain change: a change of the per-layer shift profile by more than
   `change_on`), then the first stage alone (`_adapt_choice`), with the method's own objective. The young-domain
   phase is the method's own (its settings `auto_young`, `auto_young_restore`; README "Choosing what to adapt"):
   how many batches (or the whole domain, `domain`), and whether the second stage goes back to its source values
   (parameters and optimiser state, `_restore_second_stage`) when the domain ages out of it, so that its
   adaptation never carries into later domains.

A new choice must win `confirm` consecutive decisions before it is taken (no flapping on one odd batch); the first
decision of a stream (or after a reset) is taken at once. The reference probe runs before every step while the
stream counts as unshifted (then its prediction *is* the step's prediction: no second forward) and every
`probe_every` steps while adapting.

Mechanics: the optimiser holds the union of every candidate's parameters; a step enables `requires_grad` on the
chosen ones only, so autograd stops at the earliest chosen block, torch's optimisers skip tensors without a
gradient (their Adam moments and steps are untouched) and the other tensors stay bit-identical. Everything the
policy carries (its choice, running scores, the domain's age, the label-shift evidence; the running target
statistics as the method's `target_stats`) is registered method state: `reset`, checkpoints and `--resume` cover it
exactly. Each step reports `adapted` and `bn_stats` for the results line.
"""

from __future__ import annotations

import contextlib
import math
import re
import statistics
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..models import block_names, select_params
from ..models.blocks import norm_layers
from .bn import TargetStats, batchnorm_layers, set_bn_stats
from .signals import BatchMeans, SourceReference, overdispersion

__all__ = ["AUTO", "AutoPolicy", "Selector", "candidate_blocks", "is_auto"]

AUTO = "auto"
NamedParams = list[tuple[str, nn.Parameter]]


def is_auto(blocks: Iterable[str] | str) -> bool:
    """True for the block selection `auto` (given as "auto" or ["auto"])."""
    items = [blocks] if isinstance(blocks, str) else list(blocks)
    return items == [AUTO]


@dataclass(frozen=True)
class AutoPolicy:
    """The selector's constants (measured on resnet20 / CIFAR-10-C: README "Choosing what to adapt").

    shift_on / shift_off: covariate score (mean Gaussian KL per BatchNorm layer of the source reference) above which
    the stream counts as shifted / below which as unshifted again. momentum: weight of the newest probe in the running
    score and profile. change_on: mean |log ratio| between a probe's per-layer shifts and the running profile above
    which a new domain begins. confirm: consecutive decisions a new choice needs. probe_every: reference probes
    while adapting (every N steps). The young-domain phase differs by method: it is in each method's settings
    (`auto_young`, `auto_young_restore`), not here.
    label_on / label_off: median overdispersion of the last `label_window` probe pairs above which the batches count
    as label-shifted (running target statistics) / below which as i.i.d. again. label_cap: a pair at or above it is
    a change of domain, not evidence. ema_momentum: weight of the newest batch in the running target statistics.
    """

    shift_on: float = 0.032
    shift_off: float = 0.028
    momentum: float = 0.3
    change_on: float = 0.4
    confirm: int = 2
    probe_every: int = 4
    label_on: float = 2.0
    label_off: float = 1.5
    label_cap: float = 20.0
    label_window: int = 5
    ema_momentum: float = 0.1


DEFAULT_POLICY = AutoPolicy()


def candidate_blocks(model: nn.Module) -> dict[str, list[str]]:
    """The selections `auto` chooses from, by name -> block list: the first stage, the second, and both."""
    stages = [b for b in block_names(model) if re.fullmatch(r"block\d+", b)]
    if not stages:
        raise ValueError("blocks: auto needs a block map with stages (block1, block2, ...); this model has none")
    if len(stages) == 1:
        return {stages[0]: [stages[0]]}
    first, second = stages[0], stages[1]
    both = f"{first}-{second[len('block'):]}"
    return {first: [first], second: [second], both: [first, second]}


def _score_layers(model: nn.Module) -> list[int]:
    """Indices (in `batchnorm_layers` order, those with running statistics) of the BatchNorm layers of the input
    block and of every stage but the last; all of them when the model has a single stage."""
    names = block_names(model)
    stages = [b for b in names if re.fullmatch(r"block\d+", b)]
    keep = [b for b in names if b == "input" or (b in stages[:-1])] if len(stages) > 1 else ["input", *stages]
    chosen = {id(m) for _, m in norm_layers(model, keep)}
    layers = [bn for bn in batchnorm_layers(model) if bn.running_mean is not None and bn.running_var is not None]
    index = [i for i, bn in enumerate(layers) if id(bn) in chosen]
    return index or list(range(len(layers)))


def _dispersion_layers(model: nn.Module) -> list[int]:
    """Indices (as in `_score_layers`) of the BatchNorm layers of the last stage, whose batch means follow the classes
    a batch holds (the label-shift signal); all of them when the model has no stages."""
    stages = [b for b in block_names(model) if re.fullmatch(r"block\d+", b)]
    chosen = {id(m) for _, m in norm_layers(model, stages[-1:])} if stages else set()
    layers = [bn for bn in batchnorm_layers(model) if bn.running_mean is not None and bn.running_var is not None]
    index = [i for i, bn in enumerate(layers) if id(bn) in chosen]
    return index or list(range(len(layers)))


def _adapt_choice(names: list[str], domain_age: int, young: int | None) -> str:
    """The block rule while the stream is shifted (see README for the evidence): both early stages while the
    current domain is young (the first `young` batches after a detected change; None: the whole domain), then the
    first stage alone."""
    if len(names) == 1:
        return names[0]
    return names[-1] if young is None or domain_age < young else names[0]


class Selector:
    """The `auto` policy of one method: candidates, running scores, the current choice, and applying it."""

    def __init__(self, method: Any, policy: AutoPolicy | None = None) -> None:
        # `method`: the owning `base.Method` (not imported: base imports this module)
        self.method = method
        self.policy = policy if policy is not None else DEFAULT_POLICY
        # the method's own young-domain phase (its settings; None = the whole domain)
        young = method.cfg.auto_young
        self.young: int | None = None if young == "domain" else int(young)
        self.restore_second = bool(method.cfg.auto_young_restore)
        model = method.model
        self.blocks = candidate_blocks(model)
        self.candidates: dict[str, NamedParams] = {n: select_params(model, b, "all") for n, b in self.blocks.items()}
        seen: dict[int, tuple[str, nn.Parameter]] = {}
        for params in self.candidates.values():
            for name, p in params:
                seen.setdefault(id(p), (name, p))
        order = {id(p): i for i, (_, p) in enumerate(model.named_parameters())}
        self.union: NamedParams = sorted(seen.values(), key=lambda item: order[id(item[1])])
        self._chosen_ids = {n: {id(p) for _, p in ps} for n, ps in self.candidates.items()}
        # The frozen source reference, copied before the method changes modes or patches layers. Its covariate score
        # reads the layers of the input block and of every stage but the last: their statistics follow the inputs,
        # while the last stage's follow the classes present (label shift moves them, corruptions hardly more).
        self.reference = SourceReference(model, _dispersion_layers)
        self.score_layers = _score_layers(self.reference.model)
        self._source_logits: Tensor | None = None
        self.normalised: dict[str, nn.Module] = {}
        self.adapting = False

    # ------------------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        """After the method's `configure`: find the models whose BatchNorm the choice switches, register state."""
        m = self.method
        self.own_norm = not m.updates_norm_statistics
        if self.own_norm:
            names = ["model"] + [n for n in m._state_names if n != "model"]
            for name in names:
                value = getattr(m, name)
                if isinstance(value, nn.Module) and batchnorm_layers(value):
                    self.normalised[name] = value
        if self.restore_second:
            others = [n for n in m._state_names if n != "model" and isinstance(getattr(m, n), nn.Module)]
            if others or m.optimizer is None:
                raise ValueError(
                    f"method {m.cfg.name}: auto_young_restore restores the second stage of the adapted model and its "
                    f"optimiser state, but this method also keeps {others or 'no optimiser'}; drop auto_young_restore"
                )
        if self.own_norm:  # the running target statistics ("ema"), one per normalised model
            targets = {name: TargetStats(module, self.policy.ema_momentum) for name, module in self.normalised.items()}
            m.target_stats = nn.ModuleDict(targets)
            m.register_state("target_stats")
        m.selection = {**self._initial_state(), **_initial_label_state()}
        m.register_state("selection")
        self._apply(("none", "source"))

    def _initial_state(self) -> dict[str, Any]:
        return {
            "choice": ["none", "source"],
            "pending": None,
            "pending_count": 0,
            "shift": None,
            "shifted": False,
            "steps": 0,
            "since_probe": 0,
            "pristine": True,
            "profile": None,
            "changed": False,
            "domain_age": 0,
        }

    # ------------------------------------------------------------------------------------------- a step
    def step(self, x: Tensor) -> Tensor:
        """Decide (with this batch's probe when one is due), apply the choice, run the method's step, report."""
        m = self.method
        state = m.selection
        if state["pristine"] and tuple(state["choice"]) != ("none", "source"):
            state["pristine"] = False
        probed = self._probe_due(state)
        state["changed"] = False
        if probed:
            logits, shifts = self.reference.probe(x)
            self._source_logits = logits
            self._update_shift(state, shifts)
            self._update_label_shift(state)
            state["since_probe"] = 0
        else:
            state["since_probe"] += 1
        if state["changed"]:
            state["domain_age"] = 0  # a new domain: the young-domain block rule starts again
            self._restart_targets()  # and the running target statistics with it
        choice = self._decide(state)
        if choice != tuple(state["choice"]):
            self._switch(state, choice)
        adapted, bn = tuple(state["choice"])
        if self.serving_source():
            out = self._source_logits if probed else self.reference.probe(x)[0]
            self._source_logits = None
        else:
            self._apply((adapted, bn))
            with self._running_stats(bn):
                out = m.adapt_step(x)
        state["steps"] += 1
        state["domain_age"] += 1
        m.last.adapted, m.last.bn_stats = adapted, bn if self.own_norm or bn == "source" else "robust"
        return out

    def predict(self, x: Tensor) -> Tensor:
        """Logits without a step, as the current choice predicts them (a batch the time machinery only predicts):
        the source model while it is served, else the method's model under the chosen statistics; changes no
        state of the policy or the model."""
        adapted, bn = tuple(self.method.selection["choice"])
        with torch.no_grad():
            if self.serving_source():
                return self.reference.model(x)
            self._apply((adapted, bn))
            with self.method.autocast(x):
                return self.method.model(x)

    def serving_source(self) -> bool:
        """True while the policy serves the source model itself (nothing adapted, source statistics, source
        weights): the guard has nothing to judge then."""
        state = self.method.selection
        return tuple(state["choice"]) == ("none", "source") and bool(state["pristine"])

    def note_skipped(self) -> None:
        """A batch that was not adapted on (non-finite input): report the current statistics, nothing adapted."""
        bn = self.method.selection["choice"][1]
        self.method.last.adapted = "none"
        self.method.last.bn_stats = bn if self.own_norm or bn == "source" else "robust"

    def _probe_due(self, state: dict[str, Any]) -> bool:
        """Every step while serving the source model or while a new choice waits for confirmation; else every
        `probe_every` steps."""
        if state["choice"][0] == "none" or state["pending"] is not None:
            return True
        return state["since_probe"] + 1 >= self.policy.probe_every

    # ------------------------------------------------------------------------------------------- scores
    def _update_shift(self, state: dict[str, Any], shifts: Tensor | None) -> None:
        if shifts is None:
            return
        shifts = shifts[self.score_layers]
        profile = torch.log(shifts.float() + 0.01)  # the floor keeps tiny, noisy layer shifts from faking a change
        value, finite = (float(v) for v in torch.stack([shifts.mean(), torch.isfinite(profile).all()]).tolist())
        if not (finite and math.isfinite(value)):
            return
        k = self.policy.momentum
        if state["profile"] is not None:
            # a new domain: the layers' shifts moved away from their running profile (mean |log ratio|)
            state["changed"] = float((profile - state["profile"]).abs().mean()) > self.policy.change_on
        if state["profile"] is None or state["changed"]:  # the running scores restart with the new domain
            state["shift"], state["profile"] = value, profile
        else:
            state["shift"] = (1.0 - k) * state["shift"] + k * value
            state["profile"] = (1.0 - k) * state["profile"] + k * profile

    # ------------------------------------------------------------------------------------------- the rule
    def _decide(self, state: dict[str, Any]) -> tuple[str, str]:
        p = self.policy
        shift = state["shift"]
        if shift is not None:
            state["shifted"] = shift > (p.shift_off if state["shifted"] else p.shift_on)
        if not state["shifted"]:
            proposal = ("none", "source")
        else:
            proposal = (
                _adapt_choice(list(self.candidates), state["domain_age"], self.young),
                self._shifted_stats(state),
            )
        current = tuple(state["choice"])
        if proposal == current:
            state["pending"], state["pending_count"] = None, 0
            return current
        if state["steps"] == 0:
            return proposal  # the first decision of a stream is taken at once
        if state["pending"] == list(proposal):
            state["pending_count"] += 1
        else:
            state["pending"], state["pending_count"] = list(proposal), 1
        if state["pending_count"] >= p.confirm:
            state["pending"], state["pending_count"] = None, 0
            return proposal
        return current

    def _switch(self, state: dict[str, Any], choice: tuple[str, str]) -> None:
        """Take `choice`; entering the unshifted state restores the source model (all but the policy's state); with
        `auto_young_restore`, leaving the young phase (both stages -> the first) restores the second stage."""
        if choice == ("none", "source") and not state["pristine"]:
            self.method.self_reset("auto_source", keep=("rng", "selection"))
            state["pristine"] = True
        names = list(self.candidates)
        if self.restore_second and len(names) > 1 and (state["choice"][0], choice[0]) == (names[-1], names[0]):
            self._restore_second_stage()
        if choice[1] == "ema" and state["choice"][1] != "ema":
            self._restart_targets()  # running statistics start from the batches they will serve
        state["choice"] = list(choice)

    def _restore_second_stage(self) -> None:
        """The parameters that only the young phase adapts (the second stage) back to their values after
        `configure` (the source), with their optimiser state, so their adaptation never outlives its domain."""
        m = self.method
        names = list(self.candidates)
        first = self._chosen_ids[names[0]]
        second = [(n, p) for n, p in self.candidates[names[-1]] if id(p) not in first]
        saved_model, saved_opt = m._initial["model"], m._initial["optimizer"]
        order = [p for group in m.optimizer.param_groups for p in group["params"]]
        index = {id(p): i for i, p in enumerate(order)}
        with torch.no_grad():
            for name, p in second:
                p.copy_(saved_model[name])
                p.grad = None
                m.optimizer.state.pop(p, None)
                saved = saved_opt["state"].get(index[id(p)]) if id(p) in index else None
                if saved:  # state right after configure (usually none: no step yet)
                    m.optimizer.state[p] = {k: v.clone() if isinstance(v, Tensor) else v for k, v in saved.items()}
        m.note_method_reset("auto_young_restore")

    # ------------------------------------------------------------------------------------------- applying
    def _apply(self, choice: tuple[str, str]) -> None:
        adapted, bn = choice
        ids = self._chosen_ids.get(adapted, set())
        for _, p in self.union:
            p.requires_grad_(id(p) in ids)
        self.adapting = bool(ids)
        if not self.own_norm:
            return
        for name, module in self.normalised.items():
            set_bn_stats(module, bn, target=self.method.target_stats[name] if bn == "ema" else None)

    # ------------------------------------------------------------------------------------------- label shift
    def _update_label_shift(self, state: dict[str, Any]) -> None:
        """The label-shift evidence of this probe: its overdispersion against the previous probe (`signals`), left out
        across a detected domain change or at `label_cap` and above (an undetected one); the median of the last
        `label_window` pairs (three at least) against `label_on` / `label_off` sets `label_shift`."""
        p = self.policy
        means = self.reference.stats.means()
        if means is None:
            return
        prev = state["batch_means"]
        state["batch_means"] = {"means": list(means.means), "noise": list(means.noise)}
        if prev is None or state["changed"]:
            return
        value = float(overdispersion(BatchMeans(prev["means"], prev["noise"]), means))
        if not math.isfinite(value) or value >= p.label_cap:
            return
        evidence = (list(state["dispersion"]) + [value])[-p.label_window :]
        state["dispersion"] = evidence
        if len(evidence) >= min(3, p.label_window):
            level = statistics.median(evidence)
            state["label_shift"] = level > (p.label_off if state["label_shift"] else p.label_on)

    def _shifted_stats(self, state: dict[str, Any]) -> str:
        """The statistics a shifted stream adapts with: running target statistics under label shift, else the test
        batch's (a method with its own BatchNorm regime, RoTTA, keeps it: "batch" stands for it)."""
        return "ema" if self.own_norm and state["label_shift"] else "batch"

    def _restart_targets(self) -> None:
        for target in getattr(self.method, "target_stats", {}).values():
            target.restart()

    @contextlib.contextmanager
    def _running_stats(self, bn: str) -> Iterator[None]:
        """Around the method's step under "ema": the step's first forward per layer updates the running statistics
        (committed when the step is done; a step that raised leaves them as they were)."""
        targets = list(self.method.target_stats.values()) if bn == "ema" else []
        for target in targets:
            target.arm()
        try:
            yield
        except BaseException:
            for target in targets:
                target.disarm()
            raise
        for target in targets:
            target.commit()


def _initial_label_state() -> dict[str, Any]:
    """The label-shift part of the policy's state: the verdict, the recent evidence, the last probe's batch means."""
    return {"label_shift": False, "dispersion": [], "batch_means": None}
