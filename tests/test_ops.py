"""Each op against its reference; gradcheck and gradgradcheck in float64."""
import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import fastmeta
from fastmeta import ops
from conftest import requires_cpp

import os

BACKENDS = ["torch", pytest.param("cpp", marks=requires_cpp),
            pytest.param("triton", marks=pytest.mark.skipif(
                os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                reason="triton runs on a GPU or under TRITON_INTERPRET=1"))]
f64 = dict(dtype=torch.float64)


def rnd(*shape, grad=True):
    return torch.randn(*shape, **f64).requires_grad_(grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lr_kind", ["float", "tensor", "per_param"])
def test_inner_update_matches_reference_and_gradchecks(backend, lr_kind):
    T = 3
    # a broadcast meta-parameter (step 0), a per-task tensor, an odd-sized one
    p0 = rnd(5, 7)
    params = [p0.unsqueeze(0).expand(T, 5, 7), rnd(T, 37), rnd(T, 2, 3, 1)]
    grads = [rnd(T, 5, 7), rnd(T, 37), rnd(T, 2, 3, 1)]
    lr = {"float": 0.3, "tensor": torch.tensor(0.3, **f64, requires_grad=True),
          "per_param": [rnd(5, 7), rnd(37), rnd(2, 3, 1)]}[lr_kind]
    with fastmeta.use_backend(backend):
        out = ops.inner_update(params, grads, lr)
        want = ops.inner_update_ref(params, grads, lr)
        for o, w in zip(out, want):
            torch.testing.assert_close(o, w, rtol=1e-14, atol=1e-14)
        flat_lr = lr if isinstance(lr, list) else ([lr] if isinstance(lr, torch.Tensor) else [])
        n = len(params)

        def f(*args):  # args[0] is the meta-parameter, broadcast inside as at step 0
            ps, gs, ls = list(args[:n]), list(args[n:2 * n]), list(args[2 * n:])
            ps[0] = ps[0].unsqueeze(0).expand(T, 5, 7)
            the_lr = ls if lr_kind == "per_param" else (ls[0] if ls else lr)
            return tuple(ops.inner_update(ps, gs, the_lr))
        inputs = [p0] + params[1:] + grads + flat_lr
        if backend != "triton":
            assert gradcheck(f, inputs)
            assert gradgradcheck(f, inputs)
            return
    # triton under the interpreter is too slow for finite differences: its first and second
    # derivatives are compared with the torch backend's (which gradcheck covers above)
    derivs = {}
    for b in ("torch", "triton"):
        with fastmeta.use_backend(b):
            outs = f(*inputs)
            w = [torch.randn_like(o, generator=torch.Generator().manual_seed(i)) for i, o in enumerate(outs)]
            g1 = torch.autograd.grad(sum((o * wi).sum() for o, wi in zip(outs, w)), inputs, create_graph=True,
                                     allow_unused=True)
            g1 = [torch.zeros_like(x) if g is None else g for g, x in zip(g1, inputs)]
            second = sum((g ** 2).sum() for g in g1)
            g2 = (torch.autograd.grad(second, inputs, allow_unused=True) if second.requires_grad
                  else [None] * len(inputs))
            derivs[b] = g1 + [torch.zeros_like(x) if g is None else g for g, x in zip(g2, inputs)]
    for a, c in zip(derivs["triton"], derivs["torch"]):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)


@requires_cpp
@pytest.mark.parametrize("lr_kind", ["float", "shared_tensor", "per_param"])
def test_raw_inner_update_ops_differentiate_to_second_order(lr_kind):
    """torch.ops.fastmeta.inner_update_scalar / _tensor called directly (not through ops.inner_update):
    their autograd is registered in C++, so gradcheck and gradgradcheck hold on the raw ops; a
    meta-parameter broadcast over the tasks and one rate tensor given for every parameter included."""
    from fastmeta.ops.inner_update import _register_cpp
    _register_cpp()
    T = 3
    p0 = rnd(5, 7)
    params = [p0, rnd(T, 37), rnd(T, 2, 3, 1)]
    grads = [rnd(T, 5, 7), rnd(T, 37), rnd(T, 2, 3, 1)]
    lrs = {"float": [], "shared_tensor": [torch.tensor(0.3, **f64, requires_grad=True)],
           "per_param": [rnd(5, 7), rnd(37), rnd(2, 3, 1)]}[lr_kind]
    n = len(params)

    def f(*args):
        ps, gs, ls = list(args[:n]), list(args[n:2 * n]), list(args[2 * n:])
        if lr_kind == "float":
            return tuple(torch.ops.fastmeta.inner_update_scalar(ps, gs, 0.3))
        return tuple(torch.ops.fastmeta.inner_update_tensor(ps, gs, ls * n if len(ls) == 1 else ls))
    inputs = params + grads + lrs
    assert all(o.requires_grad for o in f(*inputs))
    assert gradcheck(f, inputs)
    assert gradgradcheck(f, inputs)


@requires_cpp
def test_raw_kernel_ops_refuse_a_backward():
    """fastmeta._C's convolution, bn_relu_pool and fused-MLP ops are differentiated through
    fastmeta.ops; a backward through a raw call raises naming the op instead of giving no gradient."""
    from fastmeta.ops.batched_conv2d import _register_aten
    from fastmeta.ops.bn_relu_pool import _register_cpp as register_bn
    _register_aten()
    register_bn()
    x = torch.randn(2, 3, 2, 6, 6, requires_grad=True)
    w = torch.randn(2, 4, 2, 3, 3, requires_grad=True)
    y = torch.ops.fastmeta.batched_conv2d(x, w, None, [1, 1], [1, 1], [1, 1], 1)
    with pytest.raises(RuntimeError, match="fastmeta::batched_conv2d is not implemented"):
        torch.autograd.grad(y.sum(), [x, w])
    wb, bb = torch.rand(2, 4, requires_grad=True), torch.randn(2, 4)
    z = torch.ops.fastmeta.bn_relu_pool(y.detach(), wb, bb, 1e-5)[0]
    with pytest.raises(RuntimeError, match="fastmeta::bn_relu_pool is not implemented"):
        torch.autograd.grad(z.sum(), [wb])
    with torch.no_grad():  # values only: no graph, no error
        assert not torch.ops.fastmeta.bn_relu_pool(y, wb, bb, 1e-5)[0].requires_grad
    # through fastmeta.ops the same kernels differentiate
    with fastmeta.use_backend("cpp"):
        gx, gw = torch.autograd.grad(ops.batched_conv2d(x, w, None, padding=1).sum(), [x, w])
    assert gx.shape == x.shape and gw.shape == w.shape


def test_inner_update_empty_and_single_call_for_all_tensors():
    assert ops.inner_update([], [], 0.1) == []


@pytest.mark.parametrize("act", [None, "relu", "leaky_relu", "tanh", "sigmoid"])
@pytest.mark.parametrize("shared", [False, True])
def test_batched_linear(act, shared):
    T, N, I, O = 3, 5, 7, 4
    x = rnd(T, N, I)
    W = rnd(O, I) if shared else rnd(T, O, I)
    b = rnd(O) if shared else rnd(T, O)
    y = ops.batched_linear(x, W, b, act)
    for t in range(T):
        Wt, bt = (W, b) if shared else (W[t], b[t])
        ref = ops.batched_linear_ref(x[t:t + 1], Wt.unsqueeze(0), bt.unsqueeze(0), act)[0]
        plain = torch.nn.functional.linear(x[t], Wt, bt)
        if act:
            plain = getattr(torch.nn.functional, act)(plain)
        torch.testing.assert_close(y[t], plain)
        torch.testing.assert_close(ref, plain)
    # relu/leaky kinks: perturbations in gradcheck stay away from zero with these random inputs
    assert gradcheck(lambda *a: ops.batched_linear(*a, activation=act), (x, W, b))
    assert gradgradcheck(lambda *a: ops.batched_linear(*a, activation=act), (x, W, b))


def test_task_losses():
    pred, target = rnd(3, 5, 2), rnd(3, 5, 2, grad=False)
    torch.testing.assert_close(ops.mse(pred, target),
                               torch.stack([torch.nn.functional.mse_loss(pred[t], target[t]) for t in range(3)]))
    assert gradcheck(lambda p: ops.mse(p, target), (pred,))
    assert gradgradcheck(lambda p: ops.mse(p, target), (pred,))
    logits, labels = rnd(3, 7, 4), torch.randint(0, 4, (3, 7))
    torch.testing.assert_close(ops.cross_entropy(logits, labels), torch.stack(
        [torch.nn.functional.cross_entropy(logits[t], labels[t]) for t in range(3)]))
    assert gradcheck(lambda l: ops.cross_entropy(l, labels), (logits,))
    assert gradgradcheck(lambda l: ops.cross_entropy(l, labels), (logits,))


@pytest.mark.parametrize("shared", [False, True])
def test_batched_conv2d(shared):
    T, N, C, O = 2, 3, 3, 5
    x = rnd(T, N, C, 7, 5)
    w = rnd(O, C, 3, 3) if shared else rnd(T, O, C, 3, 3)
    b = rnd(O) if shared else rnd(T, O)
    y = ops.batched_conv2d(x, w, b, 1, 1)
    for t in range(T):
        wt, bt = (w, b) if shared else (w[t], b[t])
        torch.testing.assert_close(y[t], torch.nn.functional.conv2d(x[t], wt, bt, 1, 1))
    small = (rnd(1, 2, 1, 4, 4), rnd(1, 2, 1, 3, 3), rnd(1, 2))
    assert gradcheck(lambda *a: ops.batched_conv2d(*a, padding=1), small)
    assert gradgradcheck(lambda *a: ops.batched_conv2d(*a, padding=1), small)


def test_batched_batch_norm():
    T, N, C = 3, 4, 17
    x = rnd(T, N, C, 5, 5)
    w, b = rnd(T, C), rnd(T, C)
    y = ops.batched_batch_norm(x, w, b)
    for t in range(T):
        ref = torch.nn.functional.batch_norm(x[t], None, None, w[t], b[t], training=True)
        torch.testing.assert_close(y[t], ref)
    small = (rnd(2, 3, 2, 3, 3), rnd(2, 2), rnd(2, 2))
    assert gradcheck(ops.batched_batch_norm, small)
    assert gradgradcheck(ops.batched_batch_norm, small)
    rm, rv = torch.randn(C, **f64), torch.rand(C, **f64) + 0.5
    y = ops.batched_batch_norm(x, w, b, 1e-5, rm, rv)
    ref = torch.nn.functional.batch_norm(x[1], rm, rv, w[1], b[1], training=False)
    torch.testing.assert_close(y[1], ref)
    # batch_stats: each task's batch mean and unbiased variance, from the same call, output unchanged
    made = []
    y2 = ops.batched_batch_norm(x, w, b, batch_stats=made)
    torch.testing.assert_close(y2, ops.batched_batch_norm(x, w, b), rtol=0, atol=0)
    var, mean = torch.var_mean(x, dim=(1, 3, 4), correction=1)
    assert len(made) == 1
    torch.testing.assert_close(made[0][0], mean, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(made[0][1], var, rtol=1e-12, atol=1e-13)
    with pytest.raises(ValueError, match="batch_stats must be a list .got tuple. and needs batch statistics"):
        ops.batched_batch_norm(x, w, b, batch_stats=())
    with pytest.raises(ValueError, match="batch_stats must be a list .got list. and needs batch statistics"):
        ops.batched_batch_norm(x, w, b, 1e-5, rm, rv, batch_stats=[])
