"""Edge paths of the online engine, through its public API `engine.run(cfg, out_dir, ...)`.

Non-finite batches and their accounting, periodic checkpoints of single-domain streams, resumes that must be
refused (other stream, other checkpoint version) or that meet a damaged `results.jsonl`, which seed changes what,
and the every-N-batches reset policy. The real pretrained ResNet-20 on CIFAR-10 test images corrupted on the fly,
in tiny streams (2 domains x 40 images, batches of 20, continual unless said otherwise).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tta_surgical import engine
from tta_surgical.config import load_config
from tta_surgical.data.context import DataContext
from tta_surgical.engine import RESULTS_FILE, STATE_FILE, STATE_VERSION, run

REPO = Path(__file__).resolve().parents[1]
DOMAINS = ("gaussian_noise", "brightness")
TIMING_KEYS = ("latency_ms", "warmup")  # the only per-line values that may differ between equal runs


class Crash(RuntimeError):
    """Raised by an `on_batch` hook: the run stops as if the process died after writing that batch's line."""


def cfg(config: str = "tent", *extra: str, domains=DOMAINS, n: int = 40, batch: int = 20):
    return load_config(
        REPO / "configs" / f"{config}.yaml",
        overrides=[
            f"stream.domains=[{','.join(domains)}]",
            "stream.severities=[5]",
            f"stream.n_examples={n}",
            f"stream.batch_size={batch}",
            "stream.reset=never",
            "runtime.device=cpu",
            "runtime.progress=false",
            *extra,
        ],
    )


def crash_at(k: int):
    def hook(batch_index: int, record: dict) -> None:
        if batch_index == k:
            raise Crash(f"planned crash after batch {k}")

    return hook


def lines_of(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / RESULTS_FILE).read_text().splitlines() if x.strip()]


def stable(lines: list[dict]) -> list[dict]:
    """The lines without their timing values: what an interrupted and resumed run must reproduce exactly."""
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in lines]


def final_model(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / STATE_FILE, weights_only=True)["method"]["state"]["model"]


def assert_same_model(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------------------- non-finite batches


class NanInBatch1:
    """A stream whose batch 1 carries one NaN pixel (as a broken decoder or sensor would deliver it)."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def __getattr__(self, name: str):
        return getattr(self._stream, name)

    def __len__(self) -> int:
        return len(self._stream)

    def __iter__(self):
        return self.iter_from(0)

    def iter_from(self, start: int):
        for batch in self._stream.iter_from(start):
            if batch.batch_index == 1:
                batch.x[0, 0, 0, 0] = float("nan")
            yield batch


@pytest.fixture
def nan_in_batch_1(monkeypatch):
    import tta_surgical.engine as engine

    real = engine.build_stream
    monkeypatch.setattr(engine, "build_stream", lambda *a, **kw: NanInBatch1(real(*a, **kw)))


@pytest.mark.parametrize(("config", "skipped"), [("tent", 1), ("source", 0)])
def test_nonfinite_batch_is_counted_and_skips_the_update(nan_in_batch_1, tmp_path, data_root, config, skipped):
    summary = run(cfg(config), tmp_path / "run", data=data_root, record_predictions=True)
    lines = lines_of(tmp_path / "run")
    assert [r["finite"] for r in lines] == [True, False, True, True]
    assert summary["n_nonfinite_batches"] == 1
    # Tent's update on the NaN batch is skipped (loss and gradients are NaN), every later one is taken.
    assert [r["n_skipped"] for r in lines] == [0, skipped, skipped, skipped]
    assert summary["n_skipped_updates"] == skipped
    model = final_model(tmp_path / "run")
    assert all(torch.isfinite(v).all() for v in model.values() if v.is_floating_point())
    if config == "tent":  # four steps, three updates: only the NaN batch's was skipped
        state = torch.load(tmp_path / "run" / STATE_FILE, weights_only=True)["method"]["counters"]
        assert {k: state[k] for k in ("n_steps", "n_updates", "n_skipped", "n_resets")} == {
            "n_steps": 4, "n_updates": 3, "n_skipped": 1, "n_resets": 0
        }  # fmt: skip


def test_skipped_updates_and_nonfinite_batches_survive_a_resume(nan_in_batch_1, tmp_path, data_root):
    whole = run(cfg(), tmp_path / "whole", data=data_root, record_predictions=True)
    folder = tmp_path / "crashed"
    with pytest.raises(Crash):
        run(cfg(), folder, data=data_root, on_batch=crash_at(3), record_predictions=True)
    ckpt = torch.load(folder / STATE_FILE, weights_only=True)
    skipped = ckpt["method"]["counters"]["n_skipped"]
    assert (ckpt["next_batch"], ckpt["n_lines"], skipped) == (2, 2, 1)  # the skip happened before it

    resumed = run(cfg(), folder, data=data_root, resume=True, record_predictions=True)
    assert resumed["resumed_from_batch"] == 2
    assert resumed["n_skipped_updates"] == whole["n_skipped_updates"] == 1
    assert resumed["n_nonfinite_batches"] == whole["n_nonfinite_batches"] == 1  # replayed from the kept lines
    assert stable(lines_of(folder)) == stable(lines_of(tmp_path / "whole"))
    assert_same_model(final_model(folder), final_model(tmp_path / "whole"))


# ------------------------------------------------------------------------------------------- periodic checkpoints


def test_periodic_checkpoints_of_a_single_domain_stream(tmp_path, data_root, monkeypatch):
    """One domain has no boundary to checkpoint at: `checkpoint_every` (or the automatic period) does it."""
    single = cfg("tent", domains=("gaussian_noise",), n=120)  # 6 batches
    run(single, tmp_path / "whole", data=data_root, record_predictions=True)
    want = stable(lines_of(tmp_path / "whole"))
    assert len(want) == 6

    # A crash after batch 5 falls between the checkpoints at batches 2 and 4: the resume redoes 4 and 5 only.
    folder = tmp_path / "every2"
    with pytest.raises(Crash):
        run(single, folder, data=data_root, checkpoint_every=2, on_batch=crash_at(5), record_predictions=True)
    ckpt = torch.load(folder / STATE_FILE, weights_only=True)
    assert (ckpt["next_batch"], ckpt["n_lines"]) == (4, 4)
    seen: list[int] = []
    resumed = run(single, folder, data=data_root, resume=True, checkpoint_every=2,
                  on_batch=lambda i, r: seen.append(i), record_predictions=True)  # fmt: skip
    assert seen == [4, 5] and resumed["resumed_from_batch"] == 4
    assert stable(lines_of(folder)) == want
    assert_same_model(final_model(folder), final_model(tmp_path / "whole"))

    # Without checkpoint_every a single-domain stream checkpoints every AUTO_CHECKPOINT_EVERY batches.
    monkeypatch.setattr(engine, "AUTO_CHECKPOINT_EVERY", 3)
    folder = tmp_path / "auto"
    with pytest.raises(Crash):
        run(single, folder, data=data_root, on_batch=crash_at(4), record_predictions=True)
    assert torch.load(folder / STATE_FILE, weights_only=True)["next_batch"] == 3
    run(single, folder, data=data_root, resume=True, record_predictions=True)
    assert stable(lines_of(folder)) == want


# ------------------------------------------------------------------------------------------- refused resumes


@pytest.fixture
def crashed(tmp_path, data_root):
    """A continual tent run that died after batch 2 (checkpoint at batch 2, 3 lines written) and its clean twin."""
    whole = tmp_path / "whole"
    run(cfg(), whole, data=data_root, record_predictions=True)
    folder = tmp_path / "crashed"
    with pytest.raises(Crash):
        run(cfg(), folder, data=data_root, on_batch=crash_at(2), record_predictions=True)
    assert len(lines_of(folder)) == 3
    assert torch.load(folder / STATE_FILE, weights_only=True)["n_lines"] == 2
    return folder, whole


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("stream_fingerprint", "0" * 64, "the stream's batch plan differs from the checkpoint's"),
        ("version", STATE_VERSION + 1, f"checkpoint version {STATE_VERSION + 1}, expected {STATE_VERSION}"),
    ],
)
def test_resume_is_refused_for_another_stream_or_checkpoint_version(crashed, data_root, key, value, match):
    folder, whole = crashed
    state_path = folder / STATE_FILE
    good = torch.load(state_path, weights_only=True)
    torch.save({**good, key: value}, state_path)
    before = (folder / RESULTS_FILE).read_bytes()
    with pytest.raises(ValueError, match=match):
        run(cfg(), folder, data=data_root, resume=True, record_predictions=True)
    assert (folder / RESULTS_FILE).read_bytes() == before  # refused before touching anything
    torch.save(good, state_path)  # the intact checkpoint resumes
    run(cfg(), folder, data=data_root, resume=True, record_predictions=True)
    assert stable(lines_of(folder)) == stable(lines_of(whole))


# ------------------------------------------------------------------------------------------- damaged results.jsonl


def _raw_lines(folder: Path) -> list[bytes]:
    return (folder / RESULTS_FILE).read_bytes().splitlines(keepends=True)


@pytest.mark.parametrize("torn", ["the third line", "a fourth line"])
def test_a_torn_last_line_past_the_checkpoint_is_dropped(crashed, data_root, torn):
    """A process killed while writing leaves half a line; lines past the checkpoint are redone anyway."""
    folder, whole = crashed
    raw = _raw_lines(folder)
    if torn == "the third line":
        damaged = raw[0] + raw[1] + raw[2][: len(raw[2]) // 2]
    else:
        damaged = b"".join(raw) + raw[2][:20]
    (folder / RESULTS_FILE).write_bytes(damaged)
    seen: list[int] = []
    run(cfg(), folder, data=data_root, resume=True, on_batch=lambda i, r: seen.append(i), record_predictions=True)
    assert seen == [2, 3]
    assert stable(lines_of(folder)) == stable(lines_of(whole))
    assert (folder / RESULTS_FILE).read_bytes().endswith(b"}\n")


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        ("missing", r"results\.jsonl is missing but the checkpoint expects 2 result lines"),
        ("one line", r"holds 1 complete lines but the checkpoint expects 2"),
        ("torn second line", r"holds 1 complete lines but the checkpoint expects 2"),  # half a line is no line
    ],
)
def test_fewer_lines_than_the_checkpoint_counts_is_a_clear_error(crashed, data_root, damage, match):
    folder, _ = crashed
    raw = _raw_lines(folder)
    path = folder / RESULTS_FILE
    if damage == "missing":
        path.unlink()
    else:
        path.write_bytes(raw[0] + (b"" if damage == "one line" else raw[1][:-10]))
    before = path.read_bytes() if path.exists() else None
    with pytest.raises(OSError, match=match):
        run(cfg(), folder, data=data_root, resume=True, record_predictions=True)
    assert (path.read_bytes() if path.exists() else None) == before


# ------------------------------------------------------------------------------------------- seeds


def test_stream_seed_changes_the_results_and_runtime_seed_does_not(tmp_path, data_root):
    """README: `stream.seed` picks the corruption noise (and order); Tent draws no random numbers of its own."""
    one = ("gaussian_noise",)
    base = run(cfg("tent", domains=one), tmp_path / "base", data=data_root, record_predictions=True)
    other_rt = run(cfg("tent", "runtime.seed=1", domains=one), tmp_path / "rt", data=data_root,
                   record_predictions=True)  # fmt: skip
    other_stream = run(cfg("tent", "stream.seed=1", domains=one), tmp_path / "st", data=data_root,
                       record_predictions=True)  # fmt: skip
    assert stable(lines_of(tmp_path / "rt")) == stable(lines_of(tmp_path / "base"))
    assert_same_model(final_model(tmp_path / "rt"), final_model(tmp_path / "base"))
    assert other_rt["stream_fingerprint"] == base["stream_fingerprint"]

    assert other_stream["stream_fingerprint"] != base["stream_fingerprint"]
    preds = [r["pred"] for r in lines_of(tmp_path / "base")]
    assert [r["pred"] for r in lines_of(tmp_path / "st")] != preds  # other noise, other predictions
    assert not torch.equal(final_model(tmp_path / "st")["bn1.weight"], final_model(tmp_path / "base")["bn1.weight"])


# ------------------------------------------------------------------------------------------- reset every N batches


def test_reset_every_n_batches_restarts_from_the_source_model(tmp_path, data_root):
    from tta_surgical.methods import build_method
    from tta_surgical.models import create_model
    from tta_surgical.streams import build_stream

    extra = ("stream.reset=every_n", "stream.reset_every=2", "runtime.channels_last=false")
    c = cfg("tent", *extra, domains=("gaussian_noise",), n=80)  # 4 batches: reset before batch 2
    run(c, tmp_path / "every2", data=data_root, record_predictions=True)
    lines = lines_of(tmp_path / "every2")
    assert [r["reset"] for r in lines] == [False, False, True, False]
    state = torch.load(tmp_path / "every2" / STATE_FILE, weights_only=True)["method"]
    assert state["counters"]["n_resets"] == 1

    # What batches 2-3 must be: a fresh Tent on the pretrained model over just those batches.
    model, _ = create_model("resnet20", data=data_root)
    fresh = build_method(model, c.method, c.optim)
    batches = list(build_stream(c.stream, data=DataContext.resolve(data_root, data_root / "frost")).iter_from(2))
    assert len(batches) == 2
    preds = [fresh.step(b.x).argmax(1).tolist() for b in batches]
    assert [r["pred"] for r in lines[2:]] == preds
    assert_same_model(state["state"]["model"], model.state_dict())

    never = cfg("tent", "runtime.channels_last=false", domains=("gaussian_noise",), n=80)
    run(never, tmp_path / "never", data=data_root)
    assert not torch.equal(final_model(tmp_path / "never")["bn1.weight"], state["state"]["model"]["bn1.weight"])
