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


def compare(params, batch, lr, steps, acts, loss, first_order, rtol, slope=0.01, step_weights=None):
    lr_list = lr if isinstance(lr, list) else []
    out = {}
    for backend in ("torch", "triton"):
        with fastmeta.use_backend(backend):
            losses = ops.mlp_inner_loop(*batch, params, lr, steps, acts, slope, loss, first_order,
                                        step_weights=step_weights)
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
def test_mlp_inner_loop_keeps_a_nan(first_order):
    """A NaN in one task's support set: that task's loss is NaN (relu(NaN) is NaN), the other
    tasks' as without it (a max-based ReLU drops the NaN on the GPU; the kernel's is where-based)."""
    params, batch = make((3, 20, 13, 2), 3, 6, 5, "mse", torch.float64)
    batch = list(batch)
    batch[0] = batch[0].clone()
    batch[0][1, 0, 1] = float("nan")
    with fastmeta.use_backend("triton"), torch.no_grad():
        losses = ops.mlp_inner_loop(*batch, params, 0.1, 2, ["relu", "relu", None], 0.0, "mse", first_order)
    with fastmeta.use_backend("torch"), torch.no_grad():
        rest = ops.mlp_inner_loop(*[t[[0, 2]] for t in batch], params, 0.1, 2, ["relu", "relu", None], 0.0,
                                  "mse", first_order)
    assert torch.isnan(losses[1]) and not torch.isnan(losses[[0, 2]]).any()
    assert_rel_close([losses[[0, 2]]], [rest], RTOL[torch.float64], "the other tasks")


@pytest.mark.parametrize("first_order", [False, True])
def test_mlp_inner_loop_cross_entropy_smooth_activations(first_order):
    params, batch = make((3, 37, 11, 5), 3, 7, 9, "cross_entropy", torch.float64)
    compare(params, batch, 0.1, 2, ["sigmoid", "leaky_relu", "tanh"], "cross_entropy", first_order,
            RTOL[torch.float64], slope=0.2)


@pytest.mark.parametrize("acts,loss", [(["gelu", "silu", None], "mse"), (["gelu_tanh", "gelu"], "cross_entropy")])
@pytest.mark.parametrize("first_order", [False, True])
def test_mlp_inner_loop_gelu_and_silu(acts, loss, first_order):
    """GELU (both forms) and SiLU, whose derivatives the kernel computes from z, with Meta-SGD rates."""
    params, batch = make((3, 19, 7, 4)[:len(acts) + 1], 3, 6, 5, loss, torch.float64)
    lrs = [torch.empty_like(p).uniform_(0.05, 0.3).requires_grad_() for p in params]
    compare(params, batch, lrs, 2, acts, loss, first_order, RTOL[torch.float64])


@pytest.mark.parametrize("first_order", [False, True])
def test_mlp_inner_loop_meta_sgd(first_order):
    params, batch = make((2, 37, 3), 3, 6, 5, "mse", torch.float64)
    lrs = [torch.empty_like(p).uniform_(0.01, 0.1).requires_grad_() for p in params]
    compare(params, batch, lrs, 3, ["tanh", None], "mse", first_order, RTOL[torch.float64])


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("rates", ["scalar", "per_entry", "per_step"])
def test_mlp_inner_loop_step_rates_and_losses(rates, first_order):
    """MAML++'s settings: per-step rates (one rate gradient set a step) and the multi-step loss
    (weights with zeros: a step of weight 0, the last one too, is not evaluated), MSE and
    cross-entropy, one task and three."""
    for T, loss, dtype in ((3, "mse", torch.float64), (1, "cross_entropy", torch.float32)):
        params, batch = make((3, 9, 5, 2), T, 4, 5, loss, dtype)
        lead = (3,) if rates == "per_step" else ()
        lr = (0.1 if rates == "scalar" else
              [torch.empty(*lead, *p.shape, dtype=dtype, device=DEVICE).uniform_(0.05, 0.2).requires_grad_()
               for p in params])
        for weights in ([0.2, 0.0, 0.8], [0.5, 0.5, 0.0]) + ((None,) if rates == "per_step" else ()):
            compare(params, batch, lr, 3, ["tanh", "relu", None], loss, first_order, RTOL[dtype],
                    step_weights=weights)


@pytest.mark.parametrize("rates", ["scalar", "per_entry", "per_step"])
def test_mlp_adapt(rates):
    """fastmeta::mlp_adapt_triton (the kernel's inner loop alone: theta_S and the support loss at
    theta_0) against the reference: every kind of rate, MSE and cross-entropy, no steps and three, one
    task and three; BatchedMAML.reptile_grad on it against the batched ops."""
    for T, loss, dtype in ((3, "mse", torch.float64), (1, "cross_entropy", torch.float32)):
        params, batch = make((3, 9, 5, 2), T, 4, 5, loss, dtype)
        for S in (0, 3):  # (3: theta_S in the other slot of first order's two parameter sets)
            lead = (S,) if rates == "per_step" else ()
            lr = (0.1 if rates == "scalar" else
                  [torch.empty(*lead, *p.shape, dtype=dtype, device=DEVICE).uniform_(0.05, 0.2) for p in params])
            with fastmeta.use_backend("triton"):
                got, got_loss = ops.mlp_adapt(batch[0], batch[1], params, lr, S, ["tanh", "relu", None], loss=loss)
            want, want_loss = ops.mlp_adapt_ref(batch[0], batch[1], params, lr, S, ["tanh", "relu", None], loss=loss)
            assert_rel_close(got, want, RTOL[dtype], f"theta_S, {loss}, S={S}")
            assert_rel_close([got_loss], [want_loss], RTOL[dtype], f"support loss at theta_0, {loss}, S={S}")
    from fastmeta.ops.mlp_inner_loop import _ACT_CODE, _LOSS_CODE
    lrs = [] if rates == "scalar" else [r[:2] if rates == "per_step" else r for r in lr]
    ys = batch[1].long() if loss == "cross_entropy" else batch[1]
    torch.library.opcheck(torch.ops.fastmeta.mlp_adapt_triton.default,
                          (batch[0], ys, [p.detach() for p in params], lrs, 0.1, 2,
                           [_ACT_CODE[a] for a in ("tanh", "relu", None)], 0.01, _LOSS_CODE[loss]))
    model = nn.Sequential(nn.Linear(1, 9), nn.Tanh(), nn.Linear(9, 1)).double().to(DEVICE)
    xs = torch.rand(3, 4, 1, dtype=torch.float64, device=DEVICE)
    meta = fastmeta.BatchedMAML(model, 0.1, 3, learn_inner_lr={"scalar": False, "per_entry": True,
                                                               "per_step": "per_layer_step"}[rates])
    with fastmeta.use_backend("triton"):
        value, grads = meta.reptile_grad(xs, torch.sin(xs))
    assert meta.__dict__["_adapt_sig"][1]  # (the fused inner loop ran)
    with fastmeta.use_backend("torch"):
        want_value, want = meta.reptile_grad(xs, torch.sin(xs))
    assert_rel_close([value], [want_value], RTOL[torch.float64], "Reptile loss")
    assert_rel_close(grads, want, 1e-9, "Reptile update")


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


def _conv_case(T, N, C, H, W, O, k, pad, shared, bias, dtype):
    g = torch.Generator().manual_seed(T * 100 + C)
    d = dict(dtype=dtype)
    x = torch.randn(T, N, C, H, W, generator=g, **d).to(DEVICE).requires_grad_()
    w = torch.randn(*(() if shared else (T,)), O, C, k, k, generator=g, **d).to(DEVICE).requires_grad_()
    b = None if bias is None else torch.randn(*((O,) if bias == "shared" else (T, O)), generator=g, **d).to(
        DEVICE).requires_grad_()
    return x, w, b


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", [
    # T, N, C, H, W, O, k, padding, shared weight, bias
    (1, 2, 3, 5, 5, 17, 3, 1, False, "task"),
    (3, 1, 17, 7, 7, 3, 3, 1, True, "shared"),
    (3, 2, 3, 7, 5, 4, 3, 0, False, None),
    (2, 1, 2, 6, 6, 5, 3, 2, False, "task"),
])
def test_batched_conv2d_triton_matches_reference_to_second_order(case, dtype):
    """The Triton implicit-GEMM conv and its weight gradient against the grouped-conv reference:
    values, first derivatives (input, weight, bias) and second derivatives, for odd image sizes,
    3 and 17 channels, T in {1, 3}, paddings 0-2, weights per task or shared (stride 0 over T)."""
    x, w, b = _conv_case(*case, dtype)
    pad = case[7]
    with fastmeta.use_backend("triton"):
        y = ops.batched_conv2d(x, w, b, 1, pad)
    want = ops.batched_conv2d_ref(x, w, b, 1, pad)
    rtol = RTOL[dtype]
    assert_rel_close([y.detach()], [want.detach()], rtol, "conv")
    ins = [t for t in (x, w, b) if t is not None]
    r = torch.linspace(-1, 1, y.numel(), dtype=dtype, device=DEVICE).view_as(y)
    g1 = torch.autograd.grad((y * r).sum(), ins, create_graph=True)
    g2 = torch.autograd.grad((want * r).sum(), ins, create_graph=True)
    assert_rel_close([g.detach() for g in g1], [g.detach() for g in g2], rtol, "first derivatives")

    def second(gs):  # a function of the input and weight gradients, differentiated again
        return (gs[0] ** 2).sum() + (gs[1] * gs[1].detach().flip(-1)).sum()
    h1 = torch.autograd.grad(second(g1), [x, w])
    h2 = torch.autograd.grad(second(g2), [x, w])
    assert_rel_close(list(h1), list(h2), rtol, "second derivatives")


def test_batched_conv2d_triton_falls_back_outside_its_configurations():
    """stride 2, dilation 2, groups 2: the torch path (the same values as the reference)."""
    x, w, _ = _conv_case(2, 1, 4, 7, 7, 4, 3, 1, False, None, torch.float64)
    for kw in (dict(stride=2, padding=1), dict(dilation=2, padding=2), dict(groups=2, padding=1)):
        ww = w[:, :, :2] if kw.get("groups") == 2 else w
        with fastmeta.use_backend("triton"):
            y = ops.batched_conv2d(x, ww, None, **kw)
        torch.testing.assert_close(y, ops.batched_conv2d_ref(x, ww, None, **kw))


def test_batched_conv2d_triton_fake_kernels():
    """torch.library.opcheck of fastmeta::batched_conv2d_triton / ::conv_wgrad_triton: schema and fake
    kernels against the real outputs."""
    from fastmeta.ops.batched_conv2d import _register_triton
    _register_triton()
    x, w, _ = _conv_case(2, 1, 3, 5, 6, 4, 3, 1, False, None, torch.float32)
    x, w = x.detach(), w.detach()
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.fastmeta.batched_conv2d_triton.default, (x, w, 1, 0), test_utils=utils)
    gy = torch.randn(2, 1, 4, 5, 6, device=DEVICE)
    torch.library.opcheck(torch.ops.fastmeta.conv_wgrad_triton.default, (x, gy, 3, 3, 1, 1), test_utils=utils)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("meta_sgd", [False, True])
def test_batched_maml_conv_block_on_triton_conv(first_order, meta_sgd):
    """A conv block (Conv 3x3 -> BatchNorm -> ReLU -> MaxPool2d(2)) and a linear head through
    BatchedMAML with the triton backend, against the naive per-task loop (float64)."""
    from conftest import loop_meta_grads
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(5 * 3 * 3, 4)).double().to(DEVICE)
    d = dict(dtype=torch.float64, device=DEVICE)
    T = 2
    xs, xq = torch.randn(T, 3, 3, 7, 7, **d), torch.randn(T, 2, 3, 7, 7, **d)
    ys, yq = torch.randint(0, 4, (T, 3), device=DEVICE), torch.randint(0, 4, (T, 2), device=DEVICE)
    with fastmeta.use_backend("triton"):
        meta = fastmeta.BatchedMAML(model, 0.1, 2, first_order=first_order, loss="cross_entropy",
                                    learn_inner_lr=meta_sgd)
        loss = meta(xs, ys, xq, yq)
        lr_list = [meta.lrs[name.replace(".", "__")] for name, _ in model.named_parameters()] if meta_sgd else []
        got = torch.autograd.grad(loss, list(model.parameters()) + lr_list)
        assert "batched_conv2d: the convolutions of all tasks' weights at once (backend triton)" in \
            fastmeta.explain(model)
    n = len(list(model.parameters()))
    lrs = None
    if meta_sgd:
        lrs = {name: meta.lrs[name.replace(".", "__")] for name, _ in model.named_parameters()}
    want_loss, want, want_lr = loop_meta_grads(model, xs, ys, xq, yq, 0.1, 2, "cross_entropy", first_order, lrs=lrs)
    assert_rel_close([loss.detach()], [want_loss.detach()], 1e-10, "meta-loss")
    assert_rel_close(list(got[:n]), list(want), 1e-9, "meta-grad")
    if meta_sgd:
        assert_rel_close(list(got[n:]), list(want_lr), 1e-9, "lr-grad")


def _bn_relu_pool_both(x, weight, bias):
    """Outputs and gradients (w.r.t. x and the given weight/bias) of the triton and torch backends."""
    inputs = [t for t in (x, weight, bias) if t is not None]
    out = {}
    for backend in ("triton", "torch"):
        with fastmeta.use_backend(backend):
            y = ops.bn_relu_pool(x, weight, bias)
        gy = torch.linspace(-1, 2, y.numel(), dtype=y.dtype, device=y.device).view(y.shape)
        out[backend] = [y.detach()] + list(torch.autograd.grad(y, inputs, gy))
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape,affine", [((1, 4, 3, 5, 5), "shared"), ((3, 2, 17, 7, 7), "per_task"),
                                          ((1, 3, 5, 9, 6), "none"), ((3, 5, 4, 2, 3), "per_task")])
def test_bn_relu_pool_triton_matches_reference(dtype, shape, affine):
    """The Triton BatchNorm -> ReLU -> MaxPool2d(2) against the reference: values, and gradients of x,
    weight and bias, odd sizes (5x5, 7x7, 9x6, 2x3), 3 and 17 channels, T in {1, 3}."""
    T, N, C, H, W = shape
    d = dict(dtype=dtype, device=DEVICE)
    x = (3 * torch.randn(*shape, **d) + 1).requires_grad_()
    weight = bias = None
    if affine == "shared":
        weight = torch.rand(C, **d).add(0.5).requires_grad_()
        bias = torch.randn(C, **d).requires_grad_()
    elif affine == "per_task":
        weight, bias = torch.rand(T, C, **d).add(0.5).requires_grad_(), torch.randn(T, C, **d).requires_grad_()
    r = _bn_relu_pool_both(x, weight, bias)
    assert r["triton"][0].shape == (T, N, C, H // 2, W // 2)
    assert_rel_close(r["triton"], r["torch"], RTOL[dtype] / 10, "values and gradients")


def test_bn_relu_pool_triton_ties_and_second_order():
    """Integer-valued inputs (ties in most windows: the gradient reaches the first maximum, as
    max_pool2d's), and a second derivative through the op (its recomputed backward)."""
    d = dict(dtype=torch.float64, device=DEVICE)
    x = torch.randint(-2, 3, (2, 6, 5, 8, 8), device=DEVICE).to(torch.float64).requires_grad_()
    weight = torch.ones(5, **d, requires_grad=True)
    r = _bn_relu_pool_both(x, weight, None)
    assert_rel_close(r["triton"], r["torch"], 1e-12, "values and gradients with ties")
    x = torch.randn(2, 3, 4, 5, 5, **d, requires_grad=True)
    weight = torch.rand(4, **d).add(0.5).requires_grad_()
    hs = {}
    for backend in ("triton", "torch"):
        with fastmeta.use_backend(backend):
            y = ops.bn_relu_pool(x, weight, None)
        gx, gw = torch.autograd.grad((y * y.detach().flip(-1)).sum(), (x, weight), create_graph=True)
        hs[backend] = list(torch.autograd.grad((gx ** 2).sum() + (gw ** 2).sum(), (x, weight)))
    assert_rel_close(hs["triton"], hs["torch"], 1e-10, "second derivatives")


def test_bn_relu_pool_triton_fake_kernels():
    from fastmeta.ops.bn_relu_pool import _register_triton
    _register_triton()
    x = torch.randn(2, 3, 4, 6, 5, device=DEVICE)
    w, b = torch.rand(2, 4, device=DEVICE) + 0.5, torch.randn(2, 4, device=DEVICE)
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.fastmeta.bn_relu_pool_triton.default, (x, w, b, 1e-5), test_utils=utils)
    y, idx, mean, invstd = torch.ops.fastmeta.bn_relu_pool_triton(x, w, b, 1e-5)
    torch.library.opcheck(torch.ops.fastmeta.bn_relu_pool_backward_triton.default,
                          (torch.randn_like(y), x, w, idx, y, mean, invstd), test_utils=utils)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_bn_relu_pool_triton_task_inner(dtype):
    """x task-inner ([N, T, C, H, W] in memory, as batched_conv2d returns it): the Triton kernels read
    it as it is and give y, idx and dx in that layout (their fake kernels too); a task-major
    gradient is taken too. Values and gradients against the reference."""
    from fastmeta.ops.bn_relu_pool import _register_triton, task_inner
    _register_triton()
    d = dict(dtype=dtype, device=DEVICE)
    T, N, C, H, W = 3, 2, 5, 7, 6
    x = (2 * torch.randn(N, T, C, H, W, **d) + 0.5).transpose(0, 1)
    w, b = torch.rand(T, C, **d).add(0.5), torch.randn(T, C, **d)
    y, idx, mean, invstd = torch.ops.fastmeta.bn_relu_pool_triton(x, w, b, 1e-5)
    assert task_inner(y) and task_inner(idx)
    yc, idxc, _, _ = torch.ops.fastmeta.bn_relu_pool_triton(x.contiguous(), w, b, 1e-5)
    assert torch.equal(idx, idxc) and torch.equal(y, yc)
    gy = torch.randn(T, N, C, H // 2, W // 2, **d)
    dx, dw, db = torch.ops.fastmeta.bn_relu_pool_backward_triton(gy, x, w, idx, y, mean, invstd)
    assert task_inner(dx)
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    ref = ops.bn_relu_pool_ref(xr, wr, br)
    want = [ref.detach()] + list(torch.autograd.grad(ref, (xr, wr, br), gy))
    assert_rel_close([y, dx, dw, db], want, RTOL[dtype] / 10, "task-inner values and gradients")
    if dtype == torch.float32:
        utils = ("test_schema", "test_faketensor")
        torch.library.opcheck(torch.ops.fastmeta.bn_relu_pool_triton.default, (x, w, b, 1e-5), test_utils=utils)
        torch.library.opcheck(torch.ops.fastmeta.bn_relu_pool_backward_triton.default,
                              (gy, x, w, idx, y, mean, invstd), test_utils=utils)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape,layout", [((3, 2, 5, 7, 6), "task-inner"), ((1, 3, 17, 9, 9), "task-major"),
                                          ((2, 4, 3, 2, 3), "task-major")])
@pytest.mark.parametrize("with_ggx", [True, False])
def test_bn_relu_pool_triton_double_backward(dtype, shape, layout, with_ggx):
    """The Triton double backward against the reference's double backward (the derivatives of the
    backward's outputs w.r.t. gy, x and weight, contracted with cotangents; without a dx cotangent
    too), odd sizes, both layouts, T in {1, 2, 3}; opcheck of its fake kernel."""
    from fastmeta.ops.bn_relu_pool import _register_triton
    _register_triton()
    d = dict(dtype=dtype, device=DEVICE)
    T, N, C, H, W = shape
    g = torch.Generator(device=DEVICE).manual_seed(3)
    x = 2 * torch.randn(shape, generator=g, **d) + 0.3
    if layout == "task-inner":
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
    w = torch.rand(T, C, generator=g, **d).add(0.5)
    b = torch.randn(T, C, generator=g, **d)
    y, idx, mean, invstd = torch.ops.fastmeta.bn_relu_pool_triton(x, w, b, 1e-5)
    gy = torch.randn(y.shape, generator=g, **d)
    ggx = torch.randn(shape, generator=g, **d) if with_ggx else None
    ggw, ggb = torch.randn(T, C, generator=g, **d), torch.randn(T, C, generator=g, **d)
    got = torch.ops.fastmeta.bn_relu_pool_double_backward_triton(ggx, ggw, ggb, gy, x, w, idx, y, mean, invstd)
    xr, wr, br, gyr = (t.clone().requires_grad_() for t in (x, w, b, gy))
    first = torch.autograd.grad(ops.bn_relu_pool_ref(xr, wr, br), (xr, wr, br), gyr, create_graph=True)
    outs, cots = zip(*[(o, c) for o, c in zip(first, (ggx, ggw, ggb)) if c is not None])
    want = torch.autograd.grad(outs, (gyr, xr, wr), cots)
    assert_rel_close(list(got), list(want), RTOL[dtype] / 10, "double backward")
    if dtype == torch.float32 and with_ggx:
        torch.library.opcheck(torch.ops.fastmeta.bn_relu_pool_double_backward_triton.default,
                              (ggx, ggw, ggb, gy, x, w, idx, y, mean, invstd),
                              test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("taps", [False, True])
@pytest.mark.parametrize("case", [
    # T, N, C, H, W, O, k, padding, shared weight
    (2, 2, 17, 5, 7, 5, 3, 1, False),
    (1, 3, 16, 6, 6, 4, 3, 0, True),
    (2, 1, 20, 5, 5, 6, 5, 2, False),
    (2, 2, 3, 5, 5, 4, 3, 1, True),
])
def test_conv_kernels_in_both_reduction_orders(case, taps):
    """The conv and weight-gradient kernels with the reduction flat over (c, a, b) and tap-major
    (per tap, blocks of channels; the default from 16 channels), each forced on both sides of that
    default: channel counts that are and are not a multiple of the channel block, 3x3 and 5x5
    kernels, paddings 0-2, weights per task and shared."""
    from fastmeta.kernels.batched_conv2d import conv_fwd, conv_wgrad
    T, N, C, H, W, O, k, pad, shared = case
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, N, C, H, W, dtype=torch.float64, generator=g).to(DEVICE)
    w = torch.randn(*((O, C, k, k) if shared else (T, O, C, k, k)), dtype=torch.float64, generator=g).to(DEVICE)
    want = ops.batched_conv2d_ref(x, w, None, 1, pad)
    assert_rel_close([conv_fwd(x, w, (pad, pad), taps=taps)], [want], 1e-12, f"conv taps={taps}")
    gy = torch.randn(want.shape, dtype=torch.float64, generator=g).to(DEVICE)
    wr = (w if w.dim() == 5 else w.unsqueeze(0).expand(T, *w.shape)).clone().requires_grad_()
    gw_want = torch.autograd.grad(ops.batched_conv2d_ref(x, wr, None, 1, pad), wr, gy)[0]
    got = conv_wgrad(x, gy, (k, k), (pad, pad), split=2, taps=taps)
    assert_rel_close([got], [gw_want], 1e-12, f"wgrad taps={taps}")


@pytest.mark.parametrize("split", [None, 1, 2, 3, 50])
def test_conv_wgrad_split_reduction(split):
    """The weight gradient with its reduction over output pixels split between programs (partial
    sums added after): equal to autograd's weight gradient of the reference conv."""
    from fastmeta.kernels.batched_conv2d import conv_wgrad
    x, w, _ = _conv_case(2, 3, 3, 7, 6, 5, 3, 1, False, None, torch.float64)
    y = ops.batched_conv2d_ref(x, w, None, 1, 1)
    gy = torch.randn_like(y)
    want = torch.autograd.grad(y, w, gy)[0]
    got = conv_wgrad(x.detach(), gy, (3, 3), (1, 1), split=split)
    assert_rel_close([got], [want], 1e-12, f"wgrad split={split}")


ATEN = "cuda" if DEVICE == "cuda" else "cpp"


def _tuning(monkeypatch, picks=None):
    """Tuned conv primitives (under auto: fastmeta._C's ops against the triton ones) with the clock
    replaced by picks(n) -> True where the n-th key tuned should take triton (None: the real
    clock); returns the module."""
    import importlib
    bc = importlib.import_module("fastmeta.ops.batched_conv2d")  # (the package exports the function)
    monkeypatch.setenv("FASTMETA_CONV_AUTOTUNE", "1")
    monkeypatch.delenv("FASTMETA_CONV_PER_TASK", raising=False)
    monkeypatch.setattr(bc, "_TUNED_DTYPES", (torch.float32, torch.float64))  # (float32 only by default)
    bc.clear_backend_choices()
    if picks is not None:
        calls = []

        def timer(fn, device):  # aten first, then triton, for each key
            n = len(calls)
            calls.append(n)
            ms = (0.5 if picks(n // 2) else 2.0) if n % 2 else 1.0
            return ms, fn()
        monkeypatch.setattr(bc, "_time_call", timer)
    return bc


def _conv_to_second_order(x, w, b, fn):
    y = fn(x, w, b, padding=1)
    r = torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=y.device).view_as(y)
    ins = [x, w, b]
    gs = torch.autograd.grad((torch.tanh(y) * r).sum(), ins, create_graph=True)
    gg = torch.autograd.grad(sum((g * g.detach().flip(-1)).sum() for g in gs), ins)
    return [y.detach(), *[g.detach() for g in gs], *gg]


@pytest.mark.parametrize("mode", ["triton", "aten", "mixed"])
def test_tuned_conv_primitives_to_second_order(mode, monkeypatch):
    """Under auto with the autotune on, each convolution primitive call (forward, input and weight
    gradient, their one-call backward) takes whichever of fastmeta._C's ops and the triton kernels
    timed faster for its shapes: whichever is taken, and mixed between the primitives of one
    graph, values and derivatives to second order are the reference's, and each key is timed
    once."""
    bc = _tuning(monkeypatch, {"triton": lambda n: True, "aten": lambda n: False,
                               "mixed": lambda n: n % 2 == 0}[mode])
    g = torch.Generator().manual_seed(1)
    d = dict(dtype=torch.float64)
    x = torch.randn(3, 2, 4, 6, 5, generator=g, **d).to(DEVICE).requires_grad_()
    w = torch.randn(3, 5, 4, 3, 3, generator=g, **d).to(DEVICE).requires_grad_()
    b = torch.randn(3, 5, generator=g, **d).to(DEVICE).requires_grad_()
    with fastmeta.use_backend("auto"):
        got = _conv_to_second_order(x, w, b, ops.batched_conv2d)
    assert_rel_close(got, _conv_to_second_order(x, w, b, ops.batched_conv2d_ref), 1e-10, f"tuned conv ({mode})")
    lines = bc.backend_choices()
    picked = {ln.rsplit("|", 1)[1].strip() for ln in lines}
    assert lines and picked == {"triton": {"triton"}, "aten": {ATEN}, "mixed": {"triton", ATEN}}[mode], lines
    assert any(ln.startswith("conv 3x2x4x6x5, 3x5x4x3x3, 3x5 |") for ln in lines), lines
    with fastmeta.use_backend("auto"):
        again = _conv_to_second_order(x, w, b, ops.batched_conv2d)
    assert_rel_close(again, got, 1e-12, "tuned conv, cached choices")
    assert bc.backend_choices() == lines


def test_tuned_conv_primitives_in_a_conv_net_meta_gradient(monkeypatch):
    """A conv net through BatchedMAML (second order, two inner steps) with its convolution
    primitives split between the two backends by the autotune: the meta-gradient is the loop's."""
    from conftest import loop_meta_grads, small_conv_net
    bc = _tuning(monkeypatch, lambda n: n % 3 != 1)
    monkeypatch.setenv("FASTMETA_CPU_TASK_CHUNK", "3")
    model = small_conv_net(torch.float64, 1, 2, 4).to(DEVICE)
    T, K, Q = 3, 4, 3
    g = torch.Generator().manual_seed(3)
    batch = (torch.randn(T, K, 1, 6, 6, generator=g, dtype=torch.float64).to(DEVICE),
             torch.randint(0, 5, (T, K), generator=g).to(DEVICE),
             torch.randn(T, Q, 1, 6, 6, generator=g, dtype=torch.float64).to(DEVICE),
             torch.randint(0, 5, (T, Q), generator=g).to(DEVICE))
    with fastmeta.use_backend("auto"):
        meta = fastmeta.BatchedMAML(model, 0.3, 2, loss="cross_entropy")
        got = torch.autograd.grad(meta(*batch), list(model.parameters()))
        assert "or triton's kernels where faster" in fastmeta.explain(model)
    _, want, _ = loop_meta_grads(model, *batch, 0.3, 2, "cross_entropy", False)
    assert_rel_close(list(got), list(want), 1e-9, "meta-gradient, tuned conv primitives")
    picked = {ln.rsplit("|", 1)[1].strip() for ln in bc.backend_choices()}
    assert picked == {"triton", ATEN}, bc.backend_choices()


def test_tuned_conv_primitives_keep_aten_where_triton_fails(monkeypatch):
    """A triton primitive that raises while it is timed leaves fastmeta._C's op chosen, with the
    reason in the choice's line; the call's value is right."""
    bc = _tuning(monkeypatch)

    def broken(self, x, w, b=None):
        raise RuntimeError("no kernel for this card")
    monkeypatch.setattr(bc._TritonPrims, "conv", broken)
    x = torch.randn(2, 2, 3, 5, 5, dtype=torch.float64, device=DEVICE)
    w = torch.randn(2, 4, 3, 3, 3, dtype=torch.float64, device=DEVICE)
    with fastmeta.use_backend("auto"):
        y = ops.batched_conv2d(x, w, None, padding=1)
    torch.testing.assert_close(y, ops.batched_conv2d_ref(x, w, None, padding=1))
    (line,) = bc.backend_choices()
    assert "failed: RuntimeError: no kernel for this card" in line and line.endswith(f"| {ATEN}"), line


@pytest.mark.parametrize("setting", ["explicit backend", "autotune off", "default", "float64"])
def test_tuned_conv_primitives_only_under_auto_with_the_autotune_on(setting, monkeypatch):
    """An explicitly requested backend runs as requested; FASTMETA_CONV_AUTOTUNE=0 keeps
    fastmeta._C's ops; unset, the autotune is on for CUDA tensors only; float64 convolutions
    (by default) stay on fastmeta._C's ops."""
    bc = _tuning(monkeypatch, lambda n: True)
    if setting == "float64":
        monkeypatch.setattr(bc, "_TUNED_DTYPES", (torch.float32,))
    backend = ATEN if setting == "explicit backend" else "auto"
    if setting == "autotune off":
        monkeypatch.setenv("FASTMETA_CONV_AUTOTUNE", "0")
    if setting == "default":
        monkeypatch.delenv("FASTMETA_CONV_AUTOTUNE")
    x = torch.randn(2, 2, 3, 5, 5, dtype=torch.float64, device=DEVICE)
    w = torch.randn(2, 4, 3, 3, 3, dtype=torch.float64, device=DEVICE)
    with fastmeta.use_backend(backend):
        y = ops.batched_conv2d(x, w, None, padding=1)
    torch.testing.assert_close(y, ops.batched_conv2d_ref(x, w, None, padding=1))
    tuned = setting == "default" and DEVICE == "cuda"
    assert bool(bc.backend_choices()) == tuned, bc.backend_choices()
    if setting == "float64":  # and explain says so for a float64 model
        from conftest import small_conv_net
        with fastmeta.use_backend(backend):
            assert "triton's kernels" not in fastmeta.explain(small_conv_net(torch.float64, 1, 1, 4).to(DEVICE))
            assert "triton's kernels" in fastmeta.explain(small_conv_net(torch.float32, 1, 1, 4).to(DEVICE))


def test_tuned_conv_primitives_time_nothing_under_a_dispatch_mode(monkeypatch):
    """Under a dispatch mode (as when a step is traced) a key not yet chosen runs fastmeta._C's op
    and times nothing: the clock is never read and no choice is recorded."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    bc = _tuning(monkeypatch)
    monkeypatch.setattr(bc, "_time_call", lambda fn, device: pytest.fail("timed under a dispatch mode"))
    x = torch.randn(2, 2, 3, 5, 5, device=DEVICE)
    w = torch.randn(2, 4, 3, 3, 3, device=DEVICE)
    with fastmeta.use_backend("auto"), Passthrough():
        y = ops.batched_conv2d(x, w, None, padding=1)
    torch.testing.assert_close(y, ops.batched_conv2d_ref(x, w, None, padding=1), rtol=1e-4, atol=1e-5)
    assert bc.backend_choices() == []
