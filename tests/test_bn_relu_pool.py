"""bn_relu_pool (cpp) against its reference (batched_batch_norm -> relu -> max_pool2d(2)): values,
gradients, the differentiable backward of second order, ties in the pooling windows, odd sizes, and
the planner's use of it."""
import pytest
import torch
from torch import nn

import fastmeta
from fastmeta import ops
from conftest import RTOL, assert_rel_close, loop_meta_grads, requires_cpp

pytestmark = requires_cpp


def both(x, weight, bias, eps=1e-5):
    """Outputs and gradients (w.r.t. x and the given weight/bias) of cpp and torch."""
    inputs = [t for t in (x, weight, bias) if t is not None]
    out = {}
    for backend in ("cpp", "torch"):
        with fastmeta.use_backend(backend):
            y = ops.bn_relu_pool(x, weight, bias, eps)
        gy = torch.linspace(-1, 2, y.numel(), dtype=y.dtype).view(y.shape)
        out[backend] = [y.detach()] + list(torch.autograd.grad(y, inputs, gy))
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(1, 4, 3, 5, 5), (3, 2, 17, 7, 7), (2, 6, 8, 28, 28), (1, 3, 5, 9, 6),
                                   (3, 5, 4, 2, 3)])
@pytest.mark.parametrize("affine", ["shared", "per_task", "none"])
def test_matches_reference(dtype, shape, affine):
    T, N, C, H, W = shape
    x = (3 * torch.randn(*shape, dtype=dtype) + 1).requires_grad_()
    weight = bias = None
    if affine == "shared":
        weight, bias = torch.rand(C, dtype=dtype).add(0.5).requires_grad_(), torch.randn(C, dtype=dtype).requires_grad_()
    elif affine == "per_task":
        weight = torch.rand(T, C, dtype=dtype).add(0.5).requires_grad_()
        bias = torch.randn(T, C, dtype=dtype).requires_grad_()
    r = both(x, weight, bias)
    assert r["cpp"][0].shape == (T, N, C, H // 2, W // 2)
    assert_rel_close(r["cpp"], r["torch"], RTOL[dtype] / 10, "values and gradients")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ties_take_the_first_maximum(dtype):
    """Integer-valued inputs: most windows hold equal maxima; the gradient must reach the element
    max_pool2d picks (the first in row-major order)."""
    x = torch.randint(-2, 3, (2, 6, 5, 8, 8)).to(dtype).requires_grad_()
    weight = torch.ones(5, dtype=dtype, requires_grad=True)
    r = both(x, weight, None)
    assert_rel_close(r["cpp"], r["torch"], RTOL[dtype] / 10, "values and gradients")



@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_inputs_at_the_mean_give_the_bias(backend, dtype):
    """A blank region of an image (every element at the channel's mean) normalizes to exactly the
    bias, as in the reference's (x - mean) invstd w + b: the forward subtracts the mean first
    instead of folding it into a shift (x (w invstd) + (b - mean w invstd) rounds both terms, and on
    binary Omniglot-like images left the float32 second-order meta-gradient 2.1e-4 from the float64
    loop's, against the float32 loop's 1.7e-4)."""
    if backend == "triton":
        pytest.importorskip("triton")
    x = torch.full((2, 2, 3, 8, 8), 5.0, dtype=dtype)
    x[:, 0, :, 0, 0], x[:, 1, :, 0, 0] = 4.0, 6.0  # the mean stays exactly 5 (all but one window blank)
    weight = torch.tensor([[0.7, 1.3, 2.9], [0.3, 1.1, 5.7]], dtype=dtype)
    bias = torch.tensor([[0.1, 0.3, 0.7], [0.2, 0.9, 1.9]], dtype=dtype)
    with fastmeta.use_backend(backend):
        y = ops.bn_relu_pool(x, weight, bias)
    blank = y[:, :, :, 1:, 1:]
    assert torch.equal(blank, bias.view(2, 1, 3, 1, 1).expand_as(blank))

def test_second_order_gradcheck():
    x = torch.randn(2, 3, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(4, dtype=torch.float64).add(0.5).requires_grad_()
    bias = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)

    def f(x, weight, bias):
        with fastmeta.use_backend("cpp"):
            return ops.bn_relu_pool(x, weight, bias)
    assert torch.autograd.gradcheck(f, (x, weight, bias))
    assert torch.autograd.gradgradcheck(f, (x, weight, bias))


def test_bad_input_is_named():
    x = torch.randn(2, 3, 4, 6, 6)
    with pytest.raises(ValueError, match="weight"):
        ops.bn_relu_pool(x, torch.ones(5))
    with pytest.raises(ValueError, match="bias"):
        ops.bn_relu_pool(x, None, torch.ones(3, 4))
    with pytest.raises(ValueError, match="2x2"):
        ops.bn_relu_pool(torch.randn(1, 2, 3, 1, 4))
    with pytest.raises(ValueError, match="x"):
        ops.bn_relu_pool(torch.randn(2, 3, 6, 6))
    with pytest.raises(TypeError, match="weight"):
        ops.bn_relu_pool(x, torch.ones(4, dtype=torch.float64))


def conv_net(ch, dtype, track=False):
    blocks, c = [], 1
    for _ in range(3):
        blocks += [nn.Conv2d(c, ch, 3, padding=1), nn.BatchNorm2d(ch, track_running_stats=track), nn.ReLU(),
                   nn.MaxPool2d(2)]
        c = ch
    return nn.Sequential(*blocks, nn.Flatten(), nn.Linear(ch, 4)).to(dtype)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("chunk", ["1", "2", "100"])
def test_batched_maml_uses_it_and_matches_the_loop(first_order, dtype, chunk, monkeypatch):
    """Odd sizes (9x9 images, 17 channels), T=3, through BatchedMAML (where the planner fuses the
    three modules) against the per-task loop; a task at a time (the CPU default for a large input), two (chunks of 2
    and 1) and all tasks in one pass (FASTMETA_CPU_TASK_CHUNK=100: the conv output then arrives
    task-inner, [N, T, ...])."""
    monkeypatch.setenv("FASTMETA_CPU_TASK_CHUNK", chunk)
    model = conv_net(17, dtype)
    assert "bn_relu_pool" in fastmeta.explain(model)
    assert "second-order derivative in closed form" in fastmeta.explain(model)
    with fastmeta.use_backend("torch"):
        assert "closed form" not in fastmeta.explain(model)
    T, K, Q = 3, 4, 5
    batch = (torch.randn(T, K, 1, 9, 9, dtype=dtype), torch.randint(0, 4, (T, K)),
             torch.randn(T, Q, 1, 9, 9, dtype=dtype), torch.randint(0, 4, (T, Q)))
    params = list(model.parameters())
    _, want, _ = loop_meta_grads(model, *batch, 0.3, 2, "cross_entropy", first_order)
    meta = fastmeta.BatchedMAML(model, 0.3, 2, first_order=first_order, loss="cross_entropy")
    got = torch.autograd.grad(meta(*batch), params)
    assert_rel_close(list(got), want, RTOL[dtype], "meta-grad")


def test_eval_mode_running_statistics_stay_unfused():
    """BatchNorm in eval mode with running statistics: the block runs as three steps and matches
    the loop (the fused op computes batch statistics only)."""
    model = conv_net(3, torch.float64, track=True)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    model.eval()
    batch = (torch.randn(2, 3, 1, 8, 8, dtype=torch.float64), torch.randint(0, 4, (2, 3)),
             torch.randn(2, 3, 1, 8, 8, dtype=torch.float64), torch.randint(0, 4, (2, 3)))
    _, want, _ = loop_meta_grads(model, *batch, 0.3, 1, "cross_entropy", False)
    meta = fastmeta.BatchedMAML(model, 0.3, 1, loss="cross_entropy")
    got = torch.autograd.grad(meta(*batch), list(model.parameters()))
    assert_rel_close(list(got), want, RTOL[torch.float64], "meta-grad")


def test_fake_kernels_and_schema():
    """torch.library.opcheck: schema, and the fake (meta) kernels against the real outputs."""
    from fastmeta.ops.bn_relu_pool import _register_cpp
    _register_cpp()
    x = torch.randn(2, 3, 4, 7, 6)
    w, b = torch.rand(2, 4).add(0.5), torch.randn(2, 4)
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.fastmeta.bn_relu_pool.default, (x, w, b, 1e-5), test_utils=utils)
    y, idx, mean, invstd = torch.ops.fastmeta.bn_relu_pool(x, w, b, 1e-5)
    torch.library.opcheck(torch.ops.fastmeta.bn_relu_pool_backward.default,
                          (torch.randn_like(y), x, w, idx, y, mean, invstd), test_utils=utils)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("gy_layout", ["same", "task-major"])
def test_task_inner_layout(dtype, gy_layout):
    """x task-inner ([N, T, C, H, W] in memory, as batched_conv2d returns it): the kernels read it as
    it is and write y, idx and dx in that layout (no copy on the way through a conv block); a
    gradient arriving task-major is taken too. Values and gradients against the reference."""
    from fastmeta.ops.bn_relu_pool import _register_cpp, task_inner
    _register_cpp()
    T, N, C, H, W = 3, 4, 5, 7, 6
    x = (2 * torch.randn(N, T, C, H, W, dtype=dtype) + 0.5).transpose(0, 1).requires_grad_()
    assert task_inner(x)
    w, b = torch.rand(T, C, dtype=dtype).add(0.5), torch.randn(T, C, dtype=dtype)
    y, idx, mean, invstd = torch.ops.fastmeta.bn_relu_pool(x.detach(), w, b, 1e-5)
    assert task_inner(y) and task_inner(idx)
    gy = torch.randn(T, N, C, H // 2, W // 2, dtype=dtype)
    if gy_layout == "same":
        gy = gy.transpose(0, 1).contiguous().transpose(0, 1)
    dx, dw, db = torch.ops.fastmeta.bn_relu_pool_backward(gy, x.detach(), w, idx, y, mean, invstd)
    assert task_inner(dx)
    ref = ops.bn_relu_pool_ref(x, w.requires_grad_(), b.requires_grad_())
    want = [ref.detach()] + list(torch.autograd.grad(ref, (x, w, b), gy))
    assert_rel_close([y, dx, dw, db], want, RTOL[dtype] / 10, "task-inner values and gradients")
    # the same numbers as from the task-major copy, bit for bit
    yc, idxc, _, _ = torch.ops.fastmeta.bn_relu_pool(x.detach().contiguous(), w, b, 1e-5)
    assert torch.equal(yc, y) and torch.equal(idxc, idx)


def test_task_inner_fake_kernels():
    """opcheck with task-inner inputs: the fake kernels give the outputs the real ones' strides."""
    from fastmeta.ops.bn_relu_pool import _register_cpp
    _register_cpp()
    x = torch.randn(3, 2, 4, 7, 6).transpose(0, 1)
    w, b = torch.rand(2, 4).add(0.5), torch.randn(2, 4)
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.fastmeta.bn_relu_pool.default, (x, w, b, 1e-5), test_utils=utils)
    y, idx, mean, invstd = torch.ops.fastmeta.bn_relu_pool(x, w, b, 1e-5)
    for gy in (torch.randn_like(y), torch.randn(y.shape)):
        torch.library.opcheck(torch.ops.fastmeta.bn_relu_pool_backward.default,
                              (gy, x, w, idx, y, mean, invstd), test_utils=utils)
    # another layout is copied to task-major first
    odd = torch.randn(2, 3, 7, 6, 4).permute(0, 1, 4, 2, 3)
    torch.library.opcheck(torch.ops.fastmeta.bn_relu_pool.default, (odd, w, b, 1e-5), test_utils=utils)
    assert torch.ops.fastmeta.bn_relu_pool(odd, w, b, 1e-5)[0].is_contiguous()


def _second_derivatives(backend, x, w, b, gy, cot, which=(0, 1, 2)):
    """The backward of bn_relu_pool taken with a graph (as a second-order inner step does), then
    differentiated w.r.t. (gy, x, w, b) with the cotangents cot of (dx, dw, db) that `which` keeps."""
    with fastmeta.use_backend(backend):
        y = ops.bn_relu_pool(x, w, b)
    grads = torch.autograd.grad(y, (x, w, b), gy, create_graph=True)
    outs = [grads[i] for i in which]
    return y, grads, torch.autograd.grad(outs, (gy, x, w, b), [cot[i] for i in which], allow_unused=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape,layout", [((3, 4, 5, 7, 6), "task-major"), ((3, 4, 5, 7, 6), "task-inner"),
                                          ((1, 2, 17, 9, 9), "task-major"), ((2, 5, 3, 2, 3), "task-inner"),
                                          ((2, 6, 4, 28, 28), "task-major")])
@pytest.mark.parametrize("which", [(0, 1, 2), (1, 2), (0,)])
def test_double_backward_matches_reference(dtype, shape, layout, which):
    """The closed-form double backward (fastmeta::bn_relu_pool_double_backward): the derivatives of
    the backward's (dx, dweight, dbias) w.r.t. gy, x and weight, contracted with cotangents of all
    three or of some (a missing dx cotangent is a null ggx), against the reference's double
    backward; odd sizes (7x6, 9x9, 2x3), 3 and 17 channels, T in {1, 2, 3}, both layouts."""
    T, N, C, H, W = shape
    g = torch.Generator().manual_seed(sum(shape))
    x = 2 * torch.randn(shape, generator=g, dtype=dtype) + 0.3
    if layout == "task-inner":
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
    x.requires_grad_()
    w = torch.rand(T, C, generator=g, dtype=dtype).add(0.5).requires_grad_()
    b = torch.randn(T, C, generator=g, dtype=dtype).requires_grad_()
    gy = torch.randn(T, N, C, H // 2, W // 2, generator=g, dtype=dtype).requires_grad_()
    cot = (torch.randn(shape, generator=g, dtype=dtype), torch.randn(T, C, generator=g, dtype=dtype),
           torch.randn(T, C, generator=g, dtype=dtype))
    y, g1, got = _second_derivatives("cpp", x, w, b, gy, cot, which)
    _, g2, want = _second_derivatives("torch", x, w, b, gy, cot, which)
    for d in (got[3], want[3]):  # nothing depends on the bias beyond the (piecewise constant) ReLU mask
        assert d is None or float(d.abs().max()) == 0.0
    tol = RTOL[dtype] / 10
    assert_rel_close([t.detach() for t in g1], [t.detach() for t in g2], tol, "first derivatives")
    assert_rel_close(list(got[:3]), list(want[:3]), tol, "second derivatives (gy, x, weight)")


@pytest.mark.parametrize("outer", ["linear", "nonlinear"])
def test_double_backward_gradcheck_and_third_order(outer):
    """gradgradcheck through the kernel (float64), and a third derivative (the double backward taken
    with a graph recomputes through the reference) against the reference's, with a shared weight
    ([C], expanded per task) and no bias. nonlinear: the output gradient is itself a function of the
    output (tanh(y)^2), as in any real loss, so the recompute must take partial derivatives in
    (gy, x, weight), not follow gy back to x a second time."""
    x = torch.randn(2, 3, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(4, dtype=torch.float64).add(0.5).requires_grad_()

    def f(x, weight):
        with fastmeta.use_backend("cpp"):
            return ops.bn_relu_pool(x, weight, None)
    assert torch.autograd.gradgradcheck(f, (x, weight))
    r = torch.randn(2, 3, 4, 2, 2, dtype=torch.float64)
    third, second = {}, {}
    for backend in ("cpp", "torch"):
        with fastmeta.use_backend(backend):
            y = ops.bn_relu_pool(x, weight, None)
        loss = (y * r).sum() if outer == "linear" else (torch.tanh(y) ** 2 * r).sum()
        gx, gw = torch.autograd.grad(loss, (x, weight), create_graph=True)
        hx, hw = torch.autograd.grad((gx ** 2).sum() + (gw ** 3).sum(), (x, weight), create_graph=True)
        second[backend] = [hx.detach(), hw.detach()]
        third[backend] = list(torch.autograd.grad((hx * x.detach()).sum() + hw.sum(), (x, weight)))
    assert_rel_close(second["cpp"], second["torch"], 1e-9, "second derivatives taken with a graph")
    assert_rel_close(third["cpp"], third["torch"], 1e-9, "third derivatives")


def test_double_backward_fake_kernel_and_errors():
    from fastmeta.ops.bn_relu_pool import _register_cpp
    _register_cpp()
    x = torch.randn(3, 2, 4, 7, 6).transpose(0, 1)
    w, b = torch.rand(2, 4).add(0.5), torch.randn(2, 4)
    y, idx, mean, invstd = torch.ops.fastmeta.bn_relu_pool(x, w, b, 1e-5)
    gy, ggw, ggb = torch.randn(y.shape), torch.randn(2, 4), torch.randn(2, 4)
    op = torch.ops.fastmeta.bn_relu_pool_double_backward
    utils = ("test_schema", "test_faketensor")
    for ggx in (torch.randn(x.shape), None):
        torch.library.opcheck(op.default, (ggx, ggw, ggb, gy, x, w, idx, y, mean, invstd), test_utils=utils)
    with pytest.raises(RuntimeError, match="ggw and ggb"):
        op(None, torch.randn(4), ggb, gy, x, w, idx, y, mean, invstd)
    with pytest.raises(RuntimeError, match="ggx"):
        op(torch.randn(2, 3, 4, 7, 5), ggw, ggb, gy, x, w, idx, y, mean, invstd)
    # the saved statistics are checked too (the kernels read one per task and channel)
    for bwd_args in ((gy, x, w, idx, y, mean[:1], invstd), (gy, x, w, idx, y, mean, invstd.double())):
        with pytest.raises(RuntimeError, match="mean and invstd must be"):
            torch.ops.fastmeta.bn_relu_pool_backward(*bwd_args)
        with pytest.raises(RuntimeError, match="mean and invstd must be"):
            op(None, ggw, ggb, *bwd_args)
    with pytest.raises(RuntimeError, match=r"gy \[2, 2, 4, 3, 3\].*must be \[T, N, C, H/2, W/2\]"):
        torch.ops.fastmeta.bn_relu_pool_backward(gy[:, :2], x, w, idx, y, mean, invstd)


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpp", marks=requires_cpp), "triton"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_batch_stats_are_the_normalizing_statistics(backend, dtype):
    """batch_stats receives each task's batch mean and unbiased variance (the planner records
    tracked running statistics from them), in both layouts; the output is unchanged."""
    if backend == "triton":
        pytest.importorskip("triton")
    T, N, C, H, W = 3, 4, 5, 6, 4
    g = torch.Generator().manual_seed(0)
    base = torch.randn(N, T, C, H, W, generator=g, dtype=torch.float64).mul(2).add(1).to(dtype)
    w, b = torch.rand(T, C, generator=g, dtype=torch.float64).to(dtype), torch.randn(T, C, dtype=dtype)
    for x in (base.transpose(0, 1), base.transpose(0, 1).contiguous()):
        var, mean = torch.var_mean(x.double(), dim=(1, 3, 4), correction=1)
        made = []
        with fastmeta.use_backend(backend):
            y = ops.bn_relu_pool(x, w, b, batch_stats=made)
            assert torch.equal(y, ops.bn_relu_pool(x, w, b))
        tol = 1e-12 if dtype == torch.float64 else 2e-6
        assert len(made) == 1 and made[0][0].dtype == dtype
        assert_rel_close([made[0][0].double(), made[0][1].double()], [mean, var], tol, "batch statistics")
    with pytest.raises(ValueError, match="batch_stats must be a list, got dict"):
        ops.bn_relu_pool(base.transpose(0, 1), w, b, batch_stats={})
