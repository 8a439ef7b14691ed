"""The one-off benchmark studies behind RESULTS.md, built on the installed package's tools (one module each).

- `stream_timing`: the end-to-end wall time of a whole corruption stream through the engine, per method;
- `corruption_speed`: the corruptions' speed, ours vs the NumPy reference (`imagecorruptions`);
- `accuracy`: a pretrained model's error on CIFAR-10-C images, ours or the official release;
- `sweep_wall`: a sweep's wall time with 1..N local workers;
- `augment_cost`: the cost of CoTTA's and MEMO's test-time views, batched vs a loop over views;
- `byom`: bring-your-own-model, `tta_surgical.adapt` over a torchvision / timm model;
- `grid`, `soak`: tables and plots of a finished sweep folder (the methods grid, the long soak), read through
  `sweep_cells.finished_cells`.

Each is run by its script in `benchmarks/` and imported by the tests as `benchmarks.studies.<name>`.
"""
