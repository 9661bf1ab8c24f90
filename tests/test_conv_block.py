"""conv_bn_relu_pool (a first conv block that recomputes its convolution's output in the backward
passes) against batched_conv2d followed by bn_relu_pool: values, first and second derivatives, on
the cpp ops and (interpreter) the Triton kernels; what the graph keeps; BatchedMAML(recompute=True)
against the per-task loop."""
import pytest
import torch

import fastmeta
from fastmeta import ops
from conftest import RTOL, assert_rel_close, loop_meta_grads, requires_cpp, small_conv_net

CASES = [
    # T, N, C, H, W, O, padding, conv weight shared, conv bias, bn affine
    (1, 3, 3, 7, 7, 5, 1, False, "task", "task"),
    (3, 2, 1, 5, 5, 17, 1, True, "shared", "shared"),
    (2, 2, 3, 6, 7, 4, 0, False, None, None),
]


def _case(T, N, C, H, W, O, pad, shared, bias, affine, dtype):
    g = torch.Generator().manual_seed(T * 10 + C + O)
    d = dict(dtype=dtype)
    x = torch.randn(T, N, C, H, W, generator=g, **d)
    w = (0.5 * torch.randn(*(() if shared else (T,)), O, C, 3, 3, generator=g, **d)).requires_grad_()
    b = None if bias is None else torch.randn(*((O,) if bias == "shared" else (T, O)), generator=g, **d).requires_grad_()
    gamma = beta = None
    if affine is not None:
        shape = (O,) if affine == "shared" else (T, O)
        gamma = torch.rand(*shape, generator=g, **d).add(0.5).requires_grad_()
        beta = torch.randn(*shape, generator=g, **d).requires_grad_()
    return x, w, b, gamma, beta


def _derivatives(fn, ins, dtype):
    """The output, the first derivatives of a loss of it (with a graph) and the second derivatives
    of a function of those, w.r.t. ins."""
    y = fn()
    r = torch.linspace(-1, 1, y.numel(), dtype=dtype).view_as(y)
    g1 = torch.autograd.grad((y * r).sum() + (y ** 2).sum(), ins, create_graph=True)
    f = sum((g * g.detach().flip(-1)).sum() + (g ** 2).sum() for g in g1)
    return [y.detach()], [g.detach() for g in g1], list(torch.autograd.grad(f, ins))


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=requires_cpp), "triton"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES)
def test_matches_the_two_ops_to_second_order(case, dtype, backend):
    """Values, first and second derivatives w.r.t. the conv weight and bias and the BatchNorm
    affine parameters, against batched_conv2d -> bn_relu_pool on the same backend: 1, 3 and 17
    channels, 5x5 to 7x7 images, T in {1, 2, 3}, weights per task and shared, no bias or affine."""
    if backend == "triton":
        pytest.importorskip("triton")
    x, w, b, gamma, beta = _case(*case, dtype)
    pad = case[6]
    ins = [t for t in (w, b, gamma, beta) if t is not None]
    with fastmeta.use_backend(backend):
        got = _derivatives(lambda: ops.conv_bn_relu_pool(x, w, b, 1, pad, 1, 1, gamma, beta), ins, dtype)
        want = _derivatives(lambda: ops.bn_relu_pool(ops.batched_conv2d(x, w, b, 1, pad), gamma, beta), ins, dtype)
    for name, g, h in zip(("value", "first derivatives", "second derivatives"), got, want):
        assert_rel_close(g, h, RTOL[dtype], name)
    if dtype == torch.float64:  # and the pure-PyTorch reference
        ref = _derivatives(lambda: ops.conv_bn_relu_pool_ref(x, w, b, 1, pad, 1, 1, gamma, beta), ins, dtype)
        for name, g, h in zip(("value", "first derivatives", "second derivatives"), got, ref):
            assert_rel_close(g, h, 1e-9, name + " (reference)")


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpp", marks=requires_cpp), "triton"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_batch_stats_are_the_normalizing_statistics(backend, dtype):
    """batch_stats receives each task's batch mean and unbiased variance of the convolution's
    output (BatchedMAML(recompute=True) records tracked running statistics from them, without a
    second convolution); the output is unchanged."""
    if backend == "triton":
        pytest.importorskip("triton")
    for case in CASES:
        x, w, b, gamma, beta = _case(*case, dtype)
        pad = case[6]
        z = ops.batched_conv2d_ref(x.double(), w.double(), None if b is None else b.double(), 1, pad, 1, 1)
        var, mean = torch.var_mean(z, dim=(1, 3, 4), correction=1)
        made = []
        with fastmeta.use_backend(backend):
            y = ops.conv_bn_relu_pool(x, w, b, 1, pad, 1, 1, gamma, beta, batch_stats=made)
            assert torch.equal(y, ops.conv_bn_relu_pool(x, w, b, 1, pad, 1, 1, gamma, beta))
        tol = 1e-12 if dtype == torch.float64 else 2e-6
        assert len(made) == 1 and made[0][0].dtype == dtype, case
        assert_rel_close([made[0][0].double(), made[0][1].double()], [mean, var], tol, f"batch statistics {case}")
        ref = []  # (the pure-PyTorch reference gives the same)
        ops.conv_bn_relu_pool_ref(*(t if t is None else t.double() for t in (x, w, b)), 1, pad, 1, 1,
                                  *(t if t is None else t.double() for t in (gamma, beta)), batch_stats=ref)
        assert_rel_close(list(ref[0]), [mean, var], 1e-12, f"reference's batch statistics {case}")
    with pytest.raises(ValueError, match="batch_stats must be a list, got tuple"):
        ops.conv_bn_relu_pool(x, w, b, 1, pad, 1, 1, gamma, beta, batch_stats=())


@requires_cpp
def test_keeps_the_images_not_the_convolution_output():
    """The graph of a create_graph=True backward through the block holds no tensor of the
    convolution output's size (the composed ops hold it twice); third derivatives are still the
    composed ops'."""
    x, w, b, gamma, beta = _case(2, 3, 3, 8, 8, 6, 1, False, "task", "task", torch.float64)
    conv_out = (2, 3, 6, 8, 8)
    third = []
    for fused in (False, True):
        sizes = []

        def pack(t):
            sizes.append(tuple(t.shape))
            return t
        with fastmeta.use_backend("cpp"):
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                y = (ops.conv_bn_relu_pool(x, w, b, 1, 1, 1, 1, gamma, beta) if fused else
                     ops.bn_relu_pool(ops.batched_conv2d(x, w, b, 1, 1), gamma, beta))
                g1 = torch.autograd.grad((torch.tanh(y) ** 2).sum(), (w, b, gamma, beta), create_graph=True)
            assert (conv_out in sizes) != fused, (fused, sizes)
            g2 = torch.autograd.grad(sum((g ** 2).sum() for g in g1), (w, b, gamma), create_graph=True)
            third.append(torch.autograd.grad(sum((g * g.detach().flip(-1)).sum() for g in g2), (w, b, gamma)))
    assert_rel_close(list(third[1]), list(third[0]), 1e-9, "third derivatives")


def _conv_net(dtype):
    return small_conv_net(dtype, 3, 2, 4 * 2 * 2)


@requires_cpp
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("meta_sgd", [False, True])
def test_batched_maml_recompute_matches_the_loop(first_order, meta_sgd):
    """BatchedMAML(recompute=True) on a two-block conv net (the first block on conv_bn_relu_pool):
    the meta-gradient (and Meta-SGD rates' gradient) equals the per-task loop's, two inner steps;
    explain() names the option."""
    model = _conv_net(torch.float64)
    T, K, Q = 3, 4, 5
    g = torch.Generator().manual_seed(3)
    batch = (torch.randn(T, K, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 5, (T, K), generator=g),
             torch.randn(T, Q, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 5, (T, Q), generator=g))
    meta = fastmeta.BatchedMAML(model, 0.3, 2, first_order=first_order, loss="cross_entropy",
                                learn_inner_lr=meta_sgd, recompute=True)
    assert "recompute=True" in repr(meta)
    names = [n for n, _ in model.named_parameters()]
    lrs = [meta.lrs[n.replace(".", "__")] for n in names] if meta_sgd else []
    with fastmeta.use_backend("cpp"):
        got = torch.autograd.grad(meta(*batch), list(model.parameters()) + lrs)
    rates = {n: meta.lrs[n.replace(".", "__")] for n in names} if meta_sgd else None
    _, want, want_lr = loop_meta_grads(model, *batch, 0.3, 2, "cross_entropy", first_order, lrs=rates)
    assert_rel_close(list(got[:len(names)]), list(want), 1e-10, "meta-gradient")
    if meta_sgd:
        assert_rel_close(list(got[len(names):]), list(want_lr), 1e-10, "rates' gradient")
    assert "BatchedMAML(recompute=True)" in fastmeta.explain(model)


@requires_cpp
def test_later_blocks_keep_their_inputs_only():
    """Program(..., recompute=True, later_blocks=True) (the query pass of BatchedMAML(recompute=True)):
    the blocks after the first keep only their inputs, their internals recomputed in the backward.
    Same output, first and second derivatives (w.r.t. the parameters and the input) as without;
    what the graph holds is smaller (three blocks)."""
    import gc
    import weakref
    from fastmeta import plan
    model = small_conv_net(torch.float64, 3, 3, 4 * 2 * 2)
    prog = plan.lower(model)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 6, 3, 16, 16, generator=g, dtype=torch.float64)
    P0 = {n: p.detach().unsqueeze(0).expand(2, *p.shape).clone() for n, p in model.named_parameters()}

    def run(later):
        P = {n: v.clone().requires_grad_() for n, v in P0.items()}
        packed = []

        def pack(t):
            packed.append(weakref.ref(t))
            return t
        with fastmeta.use_backend("cpp"), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = prog(P, x, recompute=True, later_blocks=later)
        gc.collect()
        kept = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for t in (r() for r in packed) if t is not None}.values())
        loss = torch.tanh(out).pow(2).sum()
        with fastmeta.use_backend("cpp"):
            g1 = torch.autograd.grad(loss, list(P.values()), create_graph=True)
            g2 = torch.autograd.grad(sum((gi * gi).sum() for gi in g1), list(P.values()))
        return out.detach(), [t.detach() for t in g1], list(g2), kept

    plain, later = run(False), run(True)
    assert_rel_close([later[0]], [plain[0]], 1e-13, "output")
    assert_rel_close(later[1], plain[1], 1e-11, "first derivatives")
    assert_rel_close(later[2], plain[2], 1e-10, "second derivatives")
    assert later[3] < 0.85 * plain[3], (later[3], plain[3])  # (the convolutions' outputs: 25% here)


def test_op_errors_name_the_argument():
    """Bad shapes raise before any kernel runs, naming the argument and the shapes."""
    x, w, b, gamma, beta = _case(2, 3, 3, 6, 6, 5, 1, False, "task", "task", torch.float64)
    with pytest.raises(ValueError, match=r"conv_bn_relu_pool: weight \(2, 5, 4, 3, 3\) with groups=1 expects 4"):
        ops.conv_bn_relu_pool(x, torch.zeros(2, 5, 4, 3, 3, dtype=torch.float64), b, 1, 1, 1, 1, gamma, beta)
    with pytest.raises(ValueError, match=r"conv_bn_relu_pool: weight \(4,\) must be \[T=2, C=5\] or \[C=5\] for "
                                         r"the convolution's output \(2, 3, 5, 6, 6\)"):
        ops.conv_bn_relu_pool(x, w, b, 1, 1, 1, 1, gamma[0, :4].detach(), beta)
    with pytest.raises(ValueError, match="smaller than the 2x2 pooling window"):
        ops.conv_bn_relu_pool(x[..., :3, :3], w, b, 1, 0, 1, 1, gamma, beta)


def test_recompute_argument_is_checked():
    with pytest.raises(TypeError, match="recompute: expected True or False, got 1"):
        fastmeta.BatchedMAML(_conv_net(torch.float32), 0.1, 1, recompute=1)
