"""The benchmark scripts behind RESULTS.md (`python benchmarks/<name>.py`); their logic is in `benchmarks.studies`.

A package so that the tests (run from the repository root) and the scripts import the studies as
`benchmarks.studies.<name>`; it is not installed with `tta_surgical`, which never imports it.
"""
