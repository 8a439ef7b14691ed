"""The CIFAR severity parameters against an outside source: the official CIFAR-10-C generator.

Every fidelity test reads its parameters from the package's own table (`tta_surgical.corruptions.params`), so a
typo there would be reproduced by the oracle and pass. The table below is typed independently from the source of
Hendrycks & Dietterich's generator, github.com/hendrycks/robustness, `ImageNet-C/create_c/make_cifar_c.py`
(commit ca360085d57889288c4143fddd8a707bbcae01bd), one `c = [...][severity - 1]` list per corruption function,
in the generator's own argument order. Only the numbers are taken from it (facts), not its code.
"""

from __future__ import annotations

import numpy as np
import pytest

from tta_surgical.corruptions import BENCHMARK_CORRUPTIONS, EXTRA_CORRUPTIONS
from tta_surgical.corruptions import textures as T
from tta_surgical.corruptions.params import CIFAR, PRESETS

IMSIZE = 32  # make_cifar_c.py's elastic_transform: IMSIZE = 32

# corruption -> severities 1..5, as written in make_cifar_c.py
OFFICIAL_CIFAR = {
    "gaussian_noise": [0.04, 0.06, 0.08, 0.09, 0.10],
    "shot_noise": [500, 250, 100, 75, 50],
    "impulse_noise": [0.01, 0.02, 0.03, 0.05, 0.07],
    "speckle_noise": [0.06, 0.1, 0.12, 0.16, 0.2],
    "gaussian_blur": [0.4, 0.6, 0.7, 0.8, 1],
    "glass_blur": [(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)],  # sigma, max_delta, iterations
    "defocus_blur": [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)],  # radius, alias_blur
    "motion_blur": [(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)],  # radius, sigma
    # np.arange(1, end, 0.01) per severity; the arrays are compared below
    "zoom_blur": [(1, 1.06, 0.01), (1, 1.11, 0.01), (1, 1.16, 0.01), (1, 1.21, 0.01), (1, 1.26, 0.01)],
    "snow": [
        (0.1, 0.2, 1, 0.6, 8, 3, 0.95),
        (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
        (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
        (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
        (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
    ],
    "frost": [(1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)],
    "fog": [(0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)],
    "spatter": [
        (0.62, 0.1, 0.7, 0.7, 0.5, 0),
        (0.65, 0.1, 0.8, 0.7, 0.5, 0),
        (0.65, 0.3, 1, 0.69, 0.5, 0),
        (0.65, 0.1, 0.7, 0.69, 0.6, 1),
        (0.65, 0.1, 0.5, 0.68, 0.6, 1),
    ],
    "contrast": [0.75, 0.5, 0.4, 0.3, 0.15],
    "brightness": [0.05, 0.1, 0.15, 0.2, 0.3],
    "saturate": [(0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)],
    "jpeg_compression": [80, 65, 58, 50, 40],
    "pixelate": [0.95, 0.9, 0.85, 0.75, 0.65],
    "elastic_transform": [
        (IMSIZE * 0, IMSIZE * 0, IMSIZE * 0.08),
        (IMSIZE * 0.05, IMSIZE * 0.2, IMSIZE * 0.07),
        (IMSIZE * 0.08, IMSIZE * 0.06, IMSIZE * 0.06),
        (IMSIZE * 0.1, IMSIZE * 0.04, IMSIZE * 0.05),
        (IMSIZE * 0.1, IMSIZE * 0.03, IMSIZE * 0.03),
    ],
}

# The generator's `d` dictionary: the 15 benchmark corruptions, then the 4 extra ones, in this order.
OFFICIAL_ORDER = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
    "speckle_noise", "gaussian_blur", "spatter", "saturate",
)  # fmt: skip
# frost(): idx = np.random.randint(5) over this list, so frost6.jpg is never used
OFFICIAL_FROST_FILES = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg", "frost6.jpg")


def _as_tuple(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def test_the_same_corruptions_in_the_generators_order():
    assert set(OFFICIAL_CIFAR) == set(OFFICIAL_ORDER) and len(OFFICIAL_ORDER) == 19
    assert set(CIFAR) == set(OFFICIAL_CIFAR)
    assert PRESETS["cifar"] is CIFAR
    assert BENCHMARK_CORRUPTIONS + EXTRA_CORRUPTIONS == OFFICIAL_ORDER


@pytest.mark.parametrize("name", [n for n in OFFICIAL_ORDER if n != "zoom_blur"])
def test_every_severity_equals_the_generators(name: str):
    ours, official = CIFAR[name], OFFICIAL_CIFAR[name]
    assert len(ours) == len(official) == 5, name
    for severity, (a, b) in enumerate(zip(ours, official, strict=True), start=1):
        a, b = _as_tuple(a), _as_tuple(b)
        # exact: both sides are the same decimal literals (or the same products with IMSIZE)
        assert len(a) == len(b) and all(float(x) == float(y) for x, y in zip(a, b)), f"{name} s{severity}: {a} vs {b}"


def test_zoom_factors_are_the_generators_arange():
    for severity, (ours, (start, stop, step)) in enumerate(zip(CIFAR["zoom_blur"], OFFICIAL_CIFAR["zoom_blur"]), 1):
        official = np.arange(start, stop, step)
        assert np.array_equal(np.asarray(ours, dtype=np.float64), official), f"zoom_blur s{severity}"
    # float rounding of arange includes the end point for these stops (the counts the generator really used)
    assert [len(z) for z in CIFAR["zoom_blur"]] == [7, 12, 16, 21, 26]


def test_frost_uses_the_generators_first_five_textures():
    assert tuple(T.FROST_USED) == OFFICIAL_FROST_FILES[:5]
    assert set(T.FROST_FILES) == set(OFFICIAL_FROST_FILES)
