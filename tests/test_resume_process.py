"""A run killed mid-stream in one process and resumed in another ends exactly like an uninterrupted run.

For every method config under configs/ (a YAML file with a top-level `method:` section, minus the known-expensive
ones below), so that methods added later are covered without editing this file: the uninterrupted run happens
here; a child process (tests/_resume_child.py) kills a run of each config right after batch 2 (`os._exit`, in
the middle of the second domain, one batch past the checkpoint), and another child resumes it. Both children fork
one fresh process per config. Resuming in another process matters for methods that draw random numbers: the
resumed process starts with freshly seeded RNGs, so only restoring the checkpoint's RNG states reproduces the
run. The `+rng_probe` case makes Tent draw from torch's, NumPy's and Python's global RNGs at every step, so this
is checked even while no shipped method draws random numbers.

Equal means: `results.jsonl` byte for byte once the timing values are masked, and the summary's numbers.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from _resume_child import KILLED, PROBE_FILE, probe_builder

from tta_surgical.config import load_config
from tta_surgical.engine import RESULTS_FILE, STATE_FILE, SUMMARY_FILE, run

REPO = Path(__file__).resolve().parents[1]
CHILD = Path(__file__).resolve().parent / "_resume_child.py"
# Method configs too slow for a 4-batch CPU check in the default suite: name -> why.
EXPENSIVE = {
    "memo": "MEMO adapts on dozens of augmented copies of every test image (minutes per stream on CPU)",
}
STREAM = [
    "stream.domains=[gaussian_noise,brightness]",
    "stream.severities=[5]",
    "stream.n_examples=40",
    "stream.batch_size=20",  # 4 batches, a checkpoint at the domain boundary before batch 2
    "stream.reset=never",  # continual: the adapted state must carry over the kill
    "runtime.device=cpu",
    "runtime.progress=false",
]
KILL_AFTER = 2
# Summary values that must be equal; the rest are timings, memory, the device, or say where the session began.
SUMMARY_NUMBERS = (
    "method", "model", "errors", "mean_error", "online_error", "n_images", "n_batches", "n_skipped_updates",
    "n_nonfinite_batches", "adapted_tensors", "adapted_numel", "stream_fingerprint", "model_pretrained",
)  # fmt: skip
_TIMING = re.compile(rb'"(latency_ms|warmup)": [^,}]*')


def method_config_files() -> list[Path]:
    """configs/*.yaml with a top-level `method:` section (run configs, not finetune or sweep files), minus EXPENSIVE."""
    files = []
    for path in sorted((REPO / "configs").glob("*.yaml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and isinstance(data.get("method"), dict) and path.stem not in EXPENSIVE:
            files.append(path)
    return files


def _cases() -> list[tuple[str, Path, bool]]:
    """(id, config file, rng probe) per distinct run: configs that resolve to the same run here (quickstart.yaml is
    tent.yaml with a progress bar) are checked once, under the file named after the method when there is one."""
    from tta_surgical.config import to_dict

    seen, cases = set(), []
    configs = {path: load_config(path, overrides=STREAM) for path in method_config_files()}
    for path, cfg in sorted(configs.items(), key=lambda kv: (kv[0].stem != kv[1].method.name, kv[0].stem)):
        key = json.dumps(to_dict(cfg), sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            cases.append((path.stem, path, False))
    return [*cases, ("tent+rng_probe", REPO / "configs" / "tent.yaml", True)]


CASES = _cases()


def test_the_config_list_holds_the_shipped_methods():
    names = {p.stem for p in method_config_files()}
    assert {"source", "norm", "tent", "surgical_block1", "surgical_all", "surgical_autorgn"} <= names
    assert {c[0] for c in CASES} >= {"source", "norm", "tent", "surgical_block1", "surgical_autorgn", "tent+rng_probe"}
    assert not names & {"finetune_cifar10c", "finetune_imagenetc"}  # no top-level method: section


def masked(path: Path) -> bytes:
    """results.jsonl with the values of the timing keys blanked out (keys, order and every other byte kept)."""
    return _TIMING.sub(rb'"\1": _', path.read_bytes())


def _child(mode: str, cases: list[dict], data_root: Path, tmp: Path) -> list[dict]:
    spec = tmp / f"{mode}.json"
    spec.write_text(json.dumps({"mode": mode, "data_root": str(data_root), "cases": cases}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, str(CHILD), str(spec)], capture_output=True, text=True, env=env,
                          timeout=600, cwd=tmp)  # fmt: skip
    reports = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    assert [r["id"] for r in reports] == [c["id"] for c in cases], proc.stdout + proc.stderr[-3000:]
    return [{**r, "log": proc.stderr[-3000:]} for r in reports]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_root):
    """Per case: the uninterrupted folder (this process) and the killed-then-resumed folder (two children)."""
    if not hasattr(os, "fork"):
        pytest.skip("the kill/resume children fork one process per config (POSIX only)")
    tmp = tmp_path_factory.mktemp("resume_process")
    import tta_surgical.engine as methods  # build_method as the engine calls it

    cases, whole, errors = [], {}, {}
    for case_id, path, probe in CASES:
        overrides = [*STREAM]
        real = methods.build_method
        if probe:
            methods.build_method = probe_builder(real)
        whole[case_id] = tmp / "whole" / case_id
        try:
            run(load_config(path, overrides=overrides), whole[case_id], data=data_root, record_predictions=True)
        except Exception as err:  # reported by this config's test; the other configs still run
            errors[case_id] = f"{type(err).__name__}: {err}"
        finally:
            methods.build_method = real
        cases.append({"id": case_id, "config": str(path), "overrides": overrides, "out": str(tmp / "killed" / case_id),
                      "kill_after": KILL_AFTER, "rng_probe": probe})  # fmt: skip
    crashed = {r["id"]: r for r in _child("crash", cases, data_root, tmp)}
    after_kill = {c["id"]: _snapshot(Path(c["out"])) for c in cases}
    resumed = {r["id"]: r for r in _child("resume", cases, data_root, tmp)}
    return {c["id"]: (whole[c["id"]], Path(c["out"]), crashed[c["id"]], after_kill[c["id"]], resumed[c["id"]],
                      errors.get(c["id"])) for c in cases}  # fmt: skip


def _snapshot(folder: Path) -> dict:
    state = torch.load(folder / STATE_FILE, weights_only=True) if (folder / STATE_FILE).is_file() else {}
    lines = (folder / RESULTS_FILE).read_text().splitlines() if (folder / RESULTS_FILE).is_file() else []
    return {"lines": len(lines), "next_batch": state.get("next_batch"), "summary": (folder / SUMMARY_FILE).exists()}


@pytest.mark.parametrize("case_id", [c[0] for c in CASES])
def test_killed_and_resumed_in_fresh_processes_equals_uninterrupted(runs, case_id):
    whole, folder, crashed, after_kill, resumed, error = runs[case_id]
    assert error is None, f"the uninterrupted run failed: {error}"
    assert crashed["exit_code"] == KILLED, f"the child was to die right after batch 2:\n{crashed['log']}"
    # Killed after writing batch 2's line, one batch past the checkpoint at the domain boundary.
    assert after_kill == {"lines": KILL_AFTER + 1, "next_batch": KILL_AFTER, "summary": False}
    assert resumed["exit_code"] == 0, resumed["log"]

    assert masked(folder / RESULTS_FILE) == masked(whole / RESULTS_FILE)
    a = json.loads((whole / SUMMARY_FILE).read_text())
    b = json.loads((folder / SUMMARY_FILE).read_text())
    assert b["resumed_from_batch"] == KILL_AFTER
    assert {k: b.get(k) for k in SUMMARY_NUMBERS} == {k: a.get(k) for k in SUMMARY_NUMBERS}
    ma = torch.load(whole / STATE_FILE, weights_only=True)["method"]["state"]["model"]
    mb = torch.load(folder / STATE_FILE, weights_only=True)["method"]["state"]["model"]
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)


def test_the_rng_probe_drew_numbers_and_changed_the_results(runs):
    """The probe case is only a check if its random numbers were drawn in both children and moved the results."""
    whole, folder, *_ = runs["tent+rng_probe"]
    assert int((folder / f"{PROBE_FILE}.crash").read_text()) == KILL_AFTER + 1  # batches 0, 1, 2 before the kill
    assert int((folder / f"{PROBE_FILE}.resume").read_text()) == 4 - KILL_AFTER  # batches 2, 3 again
    plain, _ = runs["tent"][:2]
    assert masked(whole / RESULTS_FILE) != masked(plain / RESULTS_FILE)
