"""Triton kernels against their references. On a CPU they run under TRITON_INTERPRET=1 (set in
conftest.py before triton is imported) at small shapes; on a GPU, on the device."""
import os

import pytest
import torch
from torch import nn

import fastmeta
from fastmeta import ops
from fastmeta.backend import why_unavailable
from conftest import RTOL, assert_rel_close, make_mlp_batch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(why_unavailable("triton", DEVICE) is not None,
                                reason=f"triton unavailable: {why_unavailable('triton', DEVICE)}")


def make(widths, T, K, Q, loss, dtype):
    return make_mlp_batch(widths, T, K, Q, loss, dtype, DEVICE)


def compare(params, batch, lr, steps, acts, loss, first_order, rtol, slope=0.01):
    lr_list = lr if isinstance(lr, list) else []
    out = {}
    for backend in ("torch", "triton"):
        with fastmeta.use_backend(backend):
            losses = ops.mlp_inner_loop(*batch, params, lr, steps, acts, slope, loss, first_order)
        w = torch.linspace(0.5, 1.5, losses.shape[0], dtype=losses.dtype, device=losses.device)
        out[backend] = (losses.detach(), list(torch.autograd.grad((losses * w).sum(), params + lr_list)))
    assert_rel_close([out["triton"][0]], [out["torch"][0]], rtol, "losses")
    assert_rel_close(out["triton"][1], out["torch"][1], rtol, "meta-grad")


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_mlp_inner_loop_sine_widths(first_order, T, dtype):
    params, batch = make((1, 40, 37, 1), T, 10, 10, "mse", dtype)
    compare(params, batch, 0.01, 3, ["relu", "relu", None], "mse", first_order, RTOL[dtype])


@pytest.mark.parametrize("first_order", [False, True])
def test_mlp_inner_loop_cross_entropy_smooth_activations(first_order):
    params, batch = make((3, 37, 11, 5), 3, 7, 9, "cross_entropy", torch.float64)
    compare(params, batch, 0.1, 2, ["sigmoid", "leaky_relu", "tanh"], "cross_entropy", first_order,
            RTOL[torch.float64], slope=0.2)


@pytest.mark.parametrize("first_order", [False, True])
def test_mlp_inner_loop_meta_sgd(first_order):
    params, batch = make((2, 37, 3), 3, 6, 5, "mse", torch.float64)
    lrs = [torch.empty_like(p).uniform_(0.01, 0.1).requires_grad_() for p in params]
    compare(params, batch, lrs, 3, ["tanh", None], "mse", first_order, RTOL[torch.float64])


def test_batched_maml_picks_triton_when_asked():
    model = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
    model = model.double().to(DEVICE)
    T = 3
    g = torch.Generator().manual_seed(3)
    xs, xq = (torch.rand(T, 10, 1, generator=g, dtype=torch.float64) * 10 - 5 for _ in range(2))
    ys, yq = torch.sin(xs), torch.sin(xq)
    xs, ys, xq, yq = (t.to(DEVICE) for t in (xs, ys, xq, yq))
    grads = {}
    for backend in ("torch", "triton"):
        with fastmeta.use_backend(backend):
            meta = fastmeta.BatchedMAML(model, 0.01, 2)
            grads[backend] = torch.autograd.grad(meta(xs, ys, xq, yq), list(model.parameters()))
    assert_rel_close(list(grads["triton"]), list(grads["torch"]), RTOL[torch.float64], "meta-grad")


def test_interpreter_is_on_without_a_gpu():
    if DEVICE == "cpu":
        assert os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.parametrize("act", [None, "relu", "leaky_relu", "tanh", "sigmoid"])
@pytest.mark.parametrize("shared", [False, True])
def test_batched_linear_matches_reference_with_second_order(act, shared):
    T, N, I, O = 3, 19, 37, 21
    d = dict(dtype=torch.float64, device=DEVICE)
    x = torch.randn(T, N, I, **d, requires_grad=True)
    W = torch.randn(*((O, I) if shared else (T, O, I)), **d, requires_grad=True)
    b = torch.randn(*((O,) if shared else (T, O)), **d, requires_grad=True)
    with fastmeta.use_backend("triton"):
        y = ops.batched_linear(x, W, b, act, 0.1)
    want = ops.batched_linear_ref(x, W, b, act, 0.1)
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    gy = torch.randn_like(y)
    g1 = torch.autograd.grad((y * gy).sum(), (x, W, b), create_graph=True)
    g2 = torch.autograd.grad((want * gy).sum(), (x, W, b), create_graph=True)
    for a, c in zip(g1, g2):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)
    # second order: differentiate a function of the first-order gradients again
    # (b enters the gradients only through a smooth activation: allow_unused for the others)
    h1 = torch.autograd.grad(sum((g ** 2).sum() for g in g1), (x, W, b), allow_unused=True)
    h2 = torch.autograd.grad(sum((g ** 2).sum() for g in g2), (x, W, b), allow_unused=True)
    for a, c, inp in zip(h1, h2, (x, W, b)):
        a = torch.zeros_like(inp) if a is None else a
        c = torch.zeros_like(inp) if c is None else c
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-10)


def test_batched_maml_conv_free_model_runs_on_triton_linear():
    model = nn.Sequential(nn.Linear(3, 17), nn.Tanh(), nn.Linear(17, 2)).double().to(DEVICE)
    d = dict(dtype=torch.float64, device=DEVICE)
    xs, ys, xq, yq = torch.randn(2, 5, 3, **d), torch.randn(2, 5, 2, **d), torch.randn(2, 4, 3, **d), torch.randn(2, 4, 2, **d)
    grads = {}
    for backend in ("torch", "triton"):
        with fastmeta.use_backend(backend):
            meta = fastmeta.BatchedMAML(model, 0.1, 2, check_finite=True)  # check_finite: step by step
            grads[backend] = torch.autograd.grad(meta(xs, ys, xq, yq), list(model.parameters()))
    assert_rel_close(list(grads["triton"]), list(grads["torch"]), 1e-10, "meta-grad")


@pytest.mark.parametrize("kind", ["mse", "cross_entropy"])
def test_task_losses_and_their_first_and_second_derivatives(kind):
    d = dict(dtype=torch.float64, device=DEVICE)
    T, N, C = 3, 7, 5
    pred = torch.randn(T, N, C, **d, requires_grad=True)
    if kind == "mse":
        target = torch.randn(T, N, C, **d)
        fn, ref = ops.mse, ops.mse_ref
    else:
        target = torch.randint(0, C, (T, N), device=DEVICE)
        fn, ref = ops.cross_entropy, ops.cross_entropy_ref
    with fastmeta.use_backend("triton"):
        got = fn(pred, target)
    want = ref(pred, target)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    w = torch.linspace(0.5, 1.5, T, **d)
    g_fast = torch.autograd.grad((got * w).sum(), pred, retain_graph=True)[0]  # the kernel's gradient
    g_want = torch.autograd.grad((want * w).sum(), pred, create_graph=True)[0]
    torch.testing.assert_close(g_fast, g_want, rtol=1e-12, atol=1e-12)
    g_graph = torch.autograd.grad((got * w).sum(), pred, create_graph=True)[0]  # differentiable path
    h_got = torch.autograd.grad((g_graph ** 3).sum(), pred)[0]
    h_want = torch.autograd.grad((g_want ** 3).sum(), pred)[0]
    torch.testing.assert_close(h_got, h_want, rtol=1e-10, atol=1e-12)
