"""The fast path (channels_last, fused/foreach optimiser kernels, torch.compile) computes what the plain path does.

Contract of issue 5: same predictions and same adapted parameters as a plain Tent loop, to floating-point
tolerance, on a short stream. The plain side is `bench.PlainTent` (contiguous, eager, torch's default Adam),
which shares no code with the package's methods.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tta_surgical.bench import PlainTent
from tta_surgical.config import ConfigError, OptimConfig, method_config
from tta_surgical.methods import build_method, build_optimizer
from tta_surgical.methods.base import grads_finite
from tta_surgical.models import create_model


def _stream(n_batches: int = 4, batch: int = 8, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # Shifted inputs (brighter, noisier than training data) so the entropy gradient is far from zero.
    return [(torch.rand(batch, 3, 32, 32, generator=g) * 0.6 + 0.4).clamp(0, 1) for _ in range(n_batches)]


def _source() -> torch.nn.Module:
    torch.manual_seed(0)
    model, _ = create_model("resnet20", pretrained=False)
    return model


def _run_plain(source: torch.nn.Module, stream: list[torch.Tensor]):
    ref = PlainTent(copy.deepcopy(source))
    logits = [ref.step(x) for x in stream]
    bn = {n: p.detach().clone() for n, p in ref.model.named_parameters() if p.requires_grad}
    return logits, bn


def _run_ours(source, stream, *, channels_last: bool, implementation: str, compile_model: bool = False):
    model = copy.deepcopy(source)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    method = build_method(model, method_config("tent"), OptimConfig(implementation=implementation))
    if compile_model:
        model.compile()
    logits = []
    for x in stream:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        logits.append(method.step(x))
    params = {n: p.detach().clone() for n, p in method.params()}
    return logits, params, method


@pytest.mark.parametrize(
    ("channels_last", "implementation"),
    [(True, "auto"), (True, "fused"), (False, "foreach"), (False, "for-loop")],
)
def test_fast_tent_matches_the_plain_loop(channels_last, implementation):
    source, stream = _source(), _stream()
    ref_logits, ref_params = _run_plain(source, stream)
    logits, params, method = _run_ours(source, stream, channels_last=channels_last, implementation=implementation)
    assert method.n_updates == len(stream) and method.n_skipped == 0
    for a, b in zip(logits, ref_logits):
        assert torch.equal(a.argmax(1), b.argmax(1))
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert set(params) == set(ref_params) and len(params) == 38  # 19 BN layers x (weight, bias)
    # Adam divides by the gradient's running RMS, so rounding differences in tiny gradients can move an element
    # by up to a few % of one step (lr 1e-3); 1e-4 is a tenth of a step. The parameters themselves moved by
    # several steps, so this tolerance still tells a different update apart.
    start = dict(source.named_parameters())
    moved = 0.0
    for name, p in params.items():
        torch.testing.assert_close(p, ref_params[name], rtol=0, atol=1e-4)
        moved = max(moved, float((p - start[name].detach()).abs().max()))
    assert moved > 2e-3  # the stream really adapted the parameters (else equality would prove nothing)


def test_auto_picks_fused_adam_where_supported_and_explicit_choices_are_honoured():
    p = [torch.nn.Parameter(torch.randn(3))]
    fused = build_optimizer(p, OptimConfig(implementation="auto"))
    assert fused.defaults["fused"] is True  # CPU fused Adam exists in every torch this package supports
    assert build_optimizer(p, OptimConfig(implementation="foreach")).defaults["foreach"] is True
    loop = build_optimizer(p, OptimConfig(implementation="for-loop")).defaults
    assert loop["foreach"] is False and not loop.get("fused")
    sgd = build_optimizer(p, OptimConfig(name="sgd", implementation="foreach"))
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["foreach"] is True
    with pytest.raises(ConfigError, match="implementation"):
        OptimConfig(implementation="turbo")


def test_auto_falls_back_to_foreach_when_fused_is_unsupported(monkeypatch):
    real = torch.optim.Adam

    def no_fused(params, **kw):
        if kw.get("fused"):
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices")
        return real(params, **kw)

    monkeypatch.setattr(torch.optim, "Adam", no_fused)
    opt = build_optimizer([torch.nn.Parameter(torch.randn(2))], OptimConfig())
    assert opt.defaults["foreach"] is True and not opt.defaults.get("fused")


def test_grads_finite_sees_nan_and_inf_in_any_tensor_or_the_loss():
    ok = torch.tensor(0.5)
    grads = [torch.ones(4), torch.zeros(2, 2)]
    assert grads_finite(ok, grads) and grads_finite(ok, [])
    for bad in (float("nan"), float("inf"), -float("inf")):
        broken = [torch.ones(4), torch.tensor([[0.0, bad], [0.0, 0.0]])]
        assert not grads_finite(ok, broken)
        assert not grads_finite(torch.tensor(bad), grads)


def test_fused_step_with_a_nan_gradient_is_skipped_and_changes_nothing():
    source, stream = _source(), _stream(n_batches=2)
    model = copy.deepcopy(source).to(memory_format=torch.channels_last)
    method = build_method(model, method_config("tent"), OptimConfig())
    method.step(stream[0])
    before = {n: p.detach().clone() for n, p in method.params()}
    state_before = copy.deepcopy(method.optimizer.state_dict()["state"])
    x = stream[1].clone()
    x[0, 0, 0, 0] = float("nan")  # one bad pixel: NaN logits for that image, NaN loss and gradients
    method.step(x)
    assert method.n_skipped == 1 and method.n_updates == 1
    for n, p in method.params():
        assert torch.equal(p, before[n])
    after = method.optimizer.state_dict()["state"]
    for k, st in state_before.items():
        for key, v in st.items():
            assert torch.equal(after[k][key], v), (k, key)


@pytest.mark.slow
def test_compiled_tent_matches_the_plain_loop():
    """torch.compile (inductor; needs a C++ compiler on the CPU; ~1 min to compile) keeps the results."""
    torch._dynamo.reset()
    source, stream = _source(), _stream()
    ref_logits, ref_params = _run_plain(source, stream)
    logits, params, _ = _run_ours(source, stream, channels_last=True, implementation="auto", compile_model=True)
    for a, b in zip(logits, ref_logits):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    for name, p in params.items():
        torch.testing.assert_close(p, ref_params[name], rtol=0, atol=2e-4)


class TinyBN(torch.nn.Module):
    """Two conv-BN-ReLU stages and a linear head: the smallest net with Tent's moving parts (BN affines, test-batch
    statistics), so the default suite can afford a cold inductor compile of its forward and backward."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.bn1 = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8)
        self.conv2, self.bn2 = torch.nn.Conv2d(8, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        return self.fc(x.mean((2, 3)))

    def block_spec(self):
        from tta_surgical.models import BlockSpec

        groups = (("input", ("conv1", "bn1")), ("block1", ("conv2", "bn2")), ("head", ("fc",)))
        return BlockSpec(groups, groups)


def test_compiled_tent_equals_eager_on_a_tiny_model():
    """The default-suite share of the slow resnet20 test above: Tent on an inductor-compiled model (compiled after
    the method is built, as the engine does with runtime.compile) predicts and adapts as the eager one. Cost: the
    cold compile (forward + backward kernels through the C++ compiler) took 15-55 s on the loaded 2-core dev
    machine; about 1 s with a warm inductor cache."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    source = TinyBN()
    g = torch.Generator().manual_seed(0)
    stream = [torch.rand(8, 3, 16, 16, generator=g) * 0.6 + 0.4 for _ in range(3)]
    eager = build_method(copy.deepcopy(source), method_config("tent"), OptimConfig())
    model = copy.deepcopy(source)
    compiled = build_method(model, method_config("tent"), OptimConfig())
    model.compile()
    for x in stream:
        torch.testing.assert_close(compiled.step(x), eager.step(x), rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] >= 1  # inductor really compiled the forward
    start, ours = dict(source.named_parameters()), dict(compiled.params())
    assert set(ours) == {"bn1.weight", "bn1.bias", "bn2.weight", "bn2.bias"}
    for name, p in eager.params():
        torch.testing.assert_close(ours[name], p, rtol=0, atol=1e-5)  # 1% of one Adam step
    assert max(float((p - start[n]).abs().max()) for n, p in ours.items()) > 2e-3  # they did adapt
    torch._dynamo.reset()


def test_compile_mode_reaches_torch_compile_in_bench_and_engine(tmp_path, monkeypatch, data_root):
    from tta_surgical import bench
    from tta_surgical.config import load_config
    from tta_surgical.engine import run

    modes = []

    def record(self, *a, **kw):  # stands in for nn.Module.compile: no compilation, just the arguments
        modes.append(kw.get("mode"))

    monkeypatch.setattr(torch.nn.Module, "compile", record)
    monkeypatch.setattr(torch._dynamo, "reset", lambda: None)
    spec = bench.quick_spec(methods=("tent",), batch_sizes=(2,), warmup=0, iters=1, autograd=False, compile=True,
                            compile_mode="reduce-overhead")  # fmt: skip
    cells = bench.run_bench(spec, tmp_path / "b", threads=1, log=None)["cells"]
    assert [c["compile_mode"] for c in cells] == [None, "reduce-overhead"]  # inference stays eager
    assert modes == ["reduce-overhead"]
    with pytest.raises(ValueError, match="compile mode"):
        bench.quick_spec(compile_mode="fastest")
    with pytest.raises(ConfigError, match="compile_mode"):
        load_config(overrides=["runtime.compile_mode=fastest"])
    cfg = load_config(overrides=["runtime.compile=true", "runtime.compile_mode=max-autotune", "runtime.progress=false",
                             "runtime.device=cpu", "stream.domains=[fog]", "stream.n_examples=8",
                             "stream.batch_size=8"])  # fmt: skip
    run(cfg, tmp_path / "run", data=data_root)
    assert modes[-1] == "max-autotune"


@pytest.mark.gpu
def test_fast_tent_matches_the_plain_loop_on_cuda(monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    # TF32 convolutions (cuDNN's default on Ampere+) round to ~1e-3 and differently per memory layout.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    source, stream = _source().cuda(), [x.cuda() for x in _stream()]
    ref_logits, ref_params = _run_plain(source, stream)
    logits, params, method = _run_ours(source, stream, channels_last=True, implementation="auto")
    assert method.optimizer.defaults.get("fused") is True  # CUDA always has the fused Adam kernel
    for a, b in zip(logits, ref_logits):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)  # cuDNN picks different algorithms per layout
    for name, p in params.items():
        torch.testing.assert_close(p, ref_params[name], rtol=0, atol=2e-4)
