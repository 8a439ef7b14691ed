"""Deployment-shift streams: a spec (data) -> an explicit, seeded batch plan -> batches on a device.

Four parts, each usable alone:

1. `StreamSpec` (`spec.py`): the scenario as typed, validated data (the `stream:` section of a run config, or
   a file under `streams/`): which corruptions, severities, order, label shift, reset policy, data source.
2. `plan_stream(spec, labels)` (`plan.py`): a pure function of the spec and the source labels ->
   `list[BatchPlan]`, the exact (domain, severity, image index) of every image of every batch and where the
   model resets. It never touches images or a device, so every method (and every device) sees the identical
   order for the same seed, and the plan can be fingerprinted and logged (`plan_fingerprint`).
3. Sources (`sources.py`): where the images come from, one registered class per kind of data (CIFAR-10
   corrupted on the fly, CIFAR-10-C files, ImageNet folders, ImageNet-C folders, images in memory), each
   giving `labels` and `load(plan, rows)`. A new kind of data is one class there.
4. `build_stream(spec, ...)` -> `Stream` (`stream.py`): opens the source once and turns the plan into `Batch`es
   on a device, corrupting clean images on the fly with the torch corruption engine, seeded per batch so
   `iter_from(k)` regenerates batch k bit for bit on resume.
"""

from __future__ import annotations

from .plan import (
    BatchPlan,
    batch_bounds,
    class_prior,
    class_prior_counts,
    derive_seed,
    dirichlet_order,
    plan_fingerprint,
    plan_stream,
    select_images,
)
from .sources import SOURCES, MemorySource, Source, open_source, register_source, source_class
from .spec import CLEAN, DOMAIN_SHORTHANDS, StreamSpec, gradual_severities, load_stream_spec
from .stream import Batch, Stream, build_stream

__all__ = [
    "CLEAN",
    "DOMAIN_SHORTHANDS",
    "SOURCES",
    "Batch",
    "BatchPlan",
    "MemorySource",
    "Source",
    "Stream",
    "StreamSpec",
    "batch_bounds",
    "build_stream",
    "class_prior",
    "class_prior_counts",
    "derive_seed",
    "dirichlet_order",
    "gradual_severities",
    "load_stream_spec",
    "open_source",
    "plan_fingerprint",
    "plan_stream",
    "register_source",
    "select_images",
    "source_class",
]
