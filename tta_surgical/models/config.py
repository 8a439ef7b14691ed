"""The `model:` section of a run or fine-tuning config: which network, which weights, how its input is normalised.

Owned by the models package (the zoo reads it in `create_model_from_config`); the run configs compose it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..schema import ConfigError

__all__ = ["ModelConfig"]


@dataclass(frozen=True)
class ModelConfig:
    """Which network, which weights, and how its input is normalised.

    `name`: a zoo name (resnet20, ...), `torchvision:<name>`, `timm:<name>` or `module:<python.path>:<factory>`.
    `pretrained`: true = the architecture's published weights (an error when unavailable, unless
    `allow_random: true`, which continues with random init and says so); false = random init (for `module:`,
    whatever the factory returns); a string = a checkpoint path (older form of `checkpoint`).
    `checkpoint`: your weights for the architecture, loaded strictly with weights_only=True; replaces the
    pretrained ones. `num_classes`: the classifier size (null = the architecture's default).
    `mean`/`std`: the normalisation applied inside the model, which is always fed [0, 1] images: `auto` = the
    model's own (zoo: as trained; torchvision/timm: their weights' statistics, ImageNet; module: none), null =
    raw [0, 1] input, or three numbers each. `block_map`: a YAML file mapping block names to module names
    (`input: [conv1, bn1]`, `block1: [layer1]`, ..., `head: [fc]`), for models whose blocks cannot be inferred.
    """

    name: str = "resnet20"
    pretrained: bool | str = True
    allow_random: bool = False
    checkpoint: str | None = None
    num_classes: int | None = None
    mean: tuple[float, ...] | str | None = "auto"
    std: tuple[float, ...] | str | None = "auto"
    block_map: str | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("model.name must be a non-empty model name (see `tta-surgical blocks --help`)")
        if ":" in self.name:
            source, _, target = self.name.partition(":")
            if source not in ("torchvision", "timm", "module"):
                raise ConfigError(
                    f"model.name={self.name!r} has an unknown source {source!r}; valid: a zoo name, "
                    "torchvision:<name>, timm:<name>, module:<python.path>:<factory>"
                )
            if not target or target.count(":") != (1 if source == "module" else 0):
                form = "module:<python.path>:<factory>" if source == "module" else f"{source}:<name>"
                raise ConfigError(f"model.name={self.name!r} is malformed; expected {form}")
        if isinstance(self.pretrained, str) and not self.pretrained:
            raise ConfigError("model.pretrained must be true, false or a checkpoint path, got an empty string")
        if isinstance(self.pretrained, str) and self.checkpoint is not None:
            raise ConfigError("model.pretrained is a path and model.checkpoint is set: give the checkpoint once")
        for key in ("checkpoint", "block_map"):
            if getattr(self, key) == "":
                raise ConfigError(f"model.{key} must be a file path or null, got an empty string")
        if self.num_classes is not None and self.num_classes < 1:
            raise ConfigError(f"model.num_classes must be >= 1 or null, got {self.num_classes}")
        self._check_normalisation()

    def _check_normalisation(self) -> None:
        kinds = {"auto" if v == "auto" else "null" if v is None else "numbers" for v in (self.mean, self.std)}
        if len(kinds) != 1:
            raise ConfigError(
                "model.mean and model.std go together (both auto, both null, or both numbers), got "
                f"{self.mean!r}, {self.std!r}"
            )
        for key, value in (("mean", self.mean), ("std", self.std)):
            if isinstance(value, str) and value != "auto":
                raise ConfigError(f"model.{key}={value!r} is not valid; choose auto, null, or three numbers")
            if isinstance(value, tuple) and (len(value) != 3 or not all(math.isfinite(v) for v in value)):
                raise ConfigError(f"model.{key} must be three finite numbers (one per RGB channel), got {list(value)}")
        if isinstance(self.std, tuple) and not all(v > 0 for v in self.std):
            raise ConfigError(f"model.std must be positive, got {list(self.std)}")
