"""Optional test dependencies: skip on a laptop without them, fail in CI where they are installed on purpose.

The fidelity tests compare our corruptions with OpenCV, scikit-image, SciPy, Pillow and `imagecorruptions`, and
the Ray tests need Ray; the block-map tests of `timm:` models need timm. `pytest.importorskip` would make a broken
install silently drop those contracts, so the
tests call `require(module)` instead: with `TTA_SURGICAL_REQUIRE_EXTRAS=1` (set by `.ci/run`) a module that does
not import is a test failure naming the module and the pip command; without it, the test is skipped.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

REQUIRE_ENV = "TTA_SURGICAL_REQUIRE_EXTRAS"

# top-level import name -> what to install (the package's extras pin the versions; see pyproject.toml)
PIP_NAMES = {
    "cv2": "opencv-python-headless",
    "skimage": "scikit-image",
    "scipy": "scipy",
    "PIL": "Pillow",
    "imagecorruptions": "imagecorruptions",
    "ray": "ray",
    "matplotlib": "matplotlib",
    "timm": "timm",
}


def extras_required() -> bool:
    """Whether a missing optional dependency must fail the test (CI) rather than skip it."""
    return os.environ.get(REQUIRE_ENV, "").strip().lower() in ("1", "true", "yes")


def require(module: str) -> ModuleType:
    """Import `module` (e.g. "scipy.ndimage") for a test, or skip / fail as described in the module docstring."""
    top = module.split(".")[0]
    if top not in PIP_NAMES:
        raise ValueError(f"require({module!r}): not an optional test dependency; known: {', '.join(PIP_NAMES)}")
    try:
        return importlib.import_module(module)
    except ImportError as err:
        hint = f"pip install {PIP_NAMES[top]}  (or pip install -e '.[bench,ray]')"
        if extras_required():
            pytest.fail(f"{module} does not import ({err}); {REQUIRE_ENV} is set, so this is a failure: {hint}",
                        pytrace=False)  # fmt: skip
        pytest.skip(f"{module} does not import ({err}): {hint}")
