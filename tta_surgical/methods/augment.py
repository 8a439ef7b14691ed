"""Seeded, batched, on-device test-time augmentations shared by the methods that use them.

Every function takes a batch `x` (float (B, 3, H, W) in [0, 1], on any device) and an explicit
`torch.Generator` (the method's registered `rng`, so reset and resume replay the same draws), draws all its
random parameters for the whole batch at once and transforms the batch with tensor operations: no Python loop
over images. Views of a batch are produced as one tensor (views x batch) so a method runs them in one forward
where memory allows.
"""

from __future__ import annotations

__all__: list[str] = []

# ------------------------------------------------------------------------------------------ DeYO: patch shuffle


# ---------------------------------------------------------------- CoTTA / MEMO: augmented views of a batch
