"""Randomly drawn models against the per-task loop: conv nets with every Conv2d setting the planner
lowers (kernel size, stride, padding, dilation, groups, bias), BatchNorm with and without affine
weights or running statistics, each activation, max / average pooling, through BatchedMAML on the
torch and cpp backends (first and second order, MAML and Meta-SGD); the same for random nets of
Conv1d, GroupNorm, LayerNorm, the adaptive pools and every elementwise activation, also with
MAML's variants and memory switches; those nets written as custom modules with their own forwards
(traced); and MLPs of random depth,
widths, activations and loss through the fused kernel against its reference, and as modules
through BatchedMAML against the loop. The draws are fixed
by their seeds, so a failure names a reproducible case. The draws and their checks are
tests/fuzz_models.py's, which runs them over many more seeds."""
import pytest

import fastmeta
from conftest import has_cpp
import fuzz_models
from fuzz_models import (conv_case, mlp_case, mlp_module_case, random_conv_case, random_module_case, traced,
                         variants_case)

BACKENDS = ["torch"] + (["cpp"] if has_cpp() else [])


def _run(case):
    """Runs a case's check, naming the drawn case in a failure."""
    _, check, _, desc = case
    try:
        check()
    except AssertionError as e:
        raise AssertionError(f"{e}\n{desc}") from None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", range(16))
def test_random_conv_net(seed, backend):
    """Loss, meta-gradient and Meta-SGD rates' gradients against the per-task loop (1e-8), autograd
    against value_and_grad (1e-10): fuzz_models.conv_case."""
    _run(conv_case(seed, backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", range(16))
def test_random_module_net(seed, backend):
    """The same checks on random nets of the other lowered modules (Conv1d, GroupNorm, LayerNorm,
    the 1d and adaptive pools, every elementwise activation, LogSoftmax):
    fuzz_models.random_module_case."""
    _run(conv_case(seed, backend, draw=random_module_case))


@pytest.mark.parametrize("seed", range(12))
def test_random_module_variants(seed):
    """Those nets with random learned rates, the multi-step loss, a head-only inner loop and memory
    switches against the torch backend without switches: fuzz_models.variants_case."""
    _run(variants_case(seed, draw=random_module_case))


@pytest.mark.parametrize("seed", range(12))
def test_random_traced_net(seed):
    """Those nets (conv's on even seeds, the other modules' on odd ones) rewritten as custom modules
    whose forwards call them in turn, activations and flattens written as functions, code between
    them: traced by the planner, the same checks: fuzz_models.traced."""
    _run(conv_case(seed, draw=traced(random_conv_case if seed % 2 == 0 else random_module_case)))


@pytest.mark.skipif(not has_cpp(), reason="fastmeta._C not built")
@pytest.mark.parametrize("seed", range(16))
def test_random_mlp_fused(seed):
    """The fused kernel's losses (1e-10) and meta-gradient (1e-8) against its reference:
    fuzz_models.mlp_case."""
    _run(mlp_case(seed))


@pytest.mark.skipif(not has_cpp(), reason="fastmeta._C not built")
@pytest.mark.parametrize("seed", range(16))
def test_random_mlp_modules(seed):
    """Those MLPs as nn.Sequential models through BatchedMAML (value_and_grad and forward three
    times each: checked, then bound to the kernel where mse and a fixed rate allow) against the
    per-task loop: fuzz_models.mlp_module_case."""
    _run(mlp_module_case(seed))


def test_fuzz_driver_tells_a_tie_from_a_failure(monkeypatch, capsys):
    """tests/fuzz_models.py (the longer campaign): passes on good draws; a mismatch is a failure
    where the reference is stable under a 1e-12 move of a parameter, and reported as a tie or kink
    where it is not (seed 8828: a BatchNorm channel of equal entries, normalized to rounding noise
    that decides a ReLU and a max)."""
    assert fuzz_models.main(["--seeds", "16:20", "--kinds", "conv,variants,mlp"]) == 0
    if fuzz_models.why_unavailable("triton", "cpu") is None:  # (the interpreter, as the tests run it)
        assert fuzz_models.main(["--seeds", "1:2", "--kinds", "triton-conv,triton-mlp"]) == 0
        assert "2 passed" in capsys.readouterr().out
    model, _, reference, _ = fuzz_models.conv_case(16)
    assert fuzz_models.moves_under_perturbation(model, reference) is None
    model, _, reference, _ = fuzz_models.conv_case(8828)
    assert "the reference moves by" in fuzz_models.moves_under_perturbation(model, reference)
    assert fuzz_models.verdict(model, reference)[0] == "tie or kink"
    model, _, reference, _ = fuzz_models.conv_case(16)
    assert fuzz_models.verdict(model, reference)[0] == "failed"
    if has_cpp():  # a linear MLP whose Meta-SGD inner loop overflows to inf and nan
        model, _, reference, _ = fuzz_models.mlp_case(27339)
        assert fuzz_models.verdict(model, reference)[0] == "diverged"
    real = fastmeta.BatchedMAML.value_and_grad

    def off(self, *a, **k):  # a meta-gradient 1e-6 off
        loss, grads = real(self, *a, **k)
        return loss, [None if g is None else g * (1 + 1e-6) for g in grads]
    monkeypatch.setattr(fastmeta.BatchedMAML, "value_and_grad", off)
    capsys.readouterr()
    assert fuzz_models.main(["--seeds", "8828:8829", "--kinds", "conv"]) == 0
    assert "tie or kink: conv seed 8828" in capsys.readouterr().out
    assert fuzz_models.main(["--seeds", "16:17", "--kinds", "conv"]) == 1
    out = capsys.readouterr().out
    assert "failed: conv seed 16" in out and "the reference is stable there" in out

    def broken(self, *a, **k):  # an error: a failure too, and the campaign goes on to the next draw
        raise ValueError("broken")
    monkeypatch.setattr(fastmeta.BatchedMAML, "value_and_grad", broken)
    assert fuzz_models.main(["--seeds", "16:18", "--kinds", "conv"]) == 1
    out = capsys.readouterr().out
    assert "failed: conv seed 16: raised ValueError: broken" in out and "failed: conv seed 17" in out
    assert "seeds 16..17: 0 passed, 0 tie or kink, 0 diverged, 2 failed" in out
