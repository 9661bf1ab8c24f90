"""ops.mlp_forward (fastmeta::mlp_forward, csrc/mlp_forward.cpp): one MLP with its autograd in C++,
the drop-in learners' forward for such a model. Against the reference (the layers as torch ops):
values, first and second derivatives (closed form), third and fourth (recomputed with a graph), and
the learners' meta-gradients; what the learners call it for and what they leave to the module.
Each on both CPU paths (the `path` fixture): the small-MLP loops and ATen's calls."""
import pytest
import torch
from torch import nn

import fastmeta
from fastmeta import maml as M, ops
from conftest import assert_rel_close, loop_meta_grads

pytestmark = pytest.mark.skipif(fastmeta.backend.why_unavailable("cpp", "cpu") is not None,
                                reason="fastmeta._C not built")

# (activation codes, widths): every activation, a last layer with and without one, odd widths
CASES = [([1, 0], [3, 7, 2]), ([3, 4, 0], [2, 5, 4, 3]), ([2, 3], [4, 6, 1]), ([4], [3, 2]),
         ([0, 1, 1], [3, 4, 4, 2])]


@pytest.fixture(params=["loops", "aten"])
def path(request):
    """The op's CPU path for the test: its small-MLP loops (threshold above any test's size) or
    ATen's calls (threshold -1), the threshold restored afterwards."""
    from fastmeta import _C

    before = _C._mlp_forward_small_macs(1 << 40 if request.param == "loops" else -1)
    calls = _C._mlp_forward_small_calls()
    yield request.param
    _C._mlp_forward_small_macs(before)
    ran = _C._mlp_forward_small_calls() - calls
    assert (ran > 0) == (request.param == "loops"), f"{ran} calls of the loops on the {request.param} path"


def make(widths, dtype=torch.float64, x_grad=False, n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, widths[0], dtype=dtype, generator=g).requires_grad_(x_grad)
    params = []
    for i in range(len(widths) - 1):
        params += [torch.randn(widths[i + 1], widths[i], dtype=dtype, generator=g).requires_grad_(),
                   torch.randn(widths[i + 1], dtype=dtype, generator=g).requires_grad_()]
    return x, params


def fused(x, params, acts, slope):
    return torch.ops.fastmeta.mlp_forward(x, params, acts, slope)


@pytest.mark.parametrize("acts, widths", CASES)
@pytest.mark.parametrize("x_grad", [False, True])
def test_forward_and_derivatives_against_reference(acts, widths, x_grad, path):
    x, params = make(widths, x_grad=x_grad)
    slope = 0.2
    ins = ([x] if x_grad else []) + params

    def f(impl):
        def call(*a):
            return impl(a[0], list(a[1:]), acts, slope) if x_grad else impl(x, list(a), acts, slope)
        return call

    got, ref = f(fused), f(ops.mlp_forward_ref)
    assert "MLPForward" in got(*ins).grad_fn.name()
    torch.testing.assert_close(got(*ins), ref(*ins), rtol=1e-13, atol=1e-13)
    assert torch.autograd.gradcheck(got, ins)
    assert torch.autograd.gradgradcheck(got, ins)

    # each order's derivatives against the reference's, to the fourth: the second in closed form,
    # the third and fourth recomputed with a graph (partial derivatives: G depends on the params)
    # (each order's scalar a fixed random weighting of the last order's derivatives)
    gen = torch.Generator().manual_seed(1)
    weights = [[torch.randn(t.shape, dtype=t.dtype, generator=gen) for t in ins] for _ in range(3)]

    def orders(fn):
        y = fn(*ins)
        gs = [torch.autograd.grad((y ** 2).sum() + y.sin().sum(), ins, create_graph=True)]
        for k, w in enumerate(weights):
            last = k == len(weights) - 1
            gs.append(torch.autograd.grad(sum((g * v).sum() for g, v in zip(gs[-1], w)), ins, create_graph=not last,
                                          allow_unused=True, materialize_grads=True))
        return gs

    for k, (a, b) in enumerate(zip(orders(got), orders(ref)), 1):
        assert_rel_close(list(a), list(b), 1e-11, f"order {k}")


def test_grads_of_a_subset_and_unit_cotangents(path):
    """Cotangents for only some of the backward's outputs (the others none), and a backward whose
    input needs no gradient: the closed form takes each term where it is given."""
    x, params = make([3, 6, 2])
    acts = [3, 0]
    for impl in (fused, ops.mlp_forward_ref):
        y = impl(x, params, acts, 0.01)
        g = torch.autograd.grad(y.pow(2).sum(), params, create_graph=True)
        out = torch.autograd.grad(g[0].sum() + g[3].pow(2).sum(), params)
        if impl is fused:
            got = out
        else:
            want = out
    assert_rel_close(list(got), list(want), 1e-12, "partial cotangents")


def test_leading_dims_and_dtypes(path):
    x, params = make([3, 5, 2], dtype=torch.float32)
    x3 = torch.randn(2, 4, 3)
    for t in (x3, x3[0, 0]):
        got = ops.mlp_forward(t, params, [1, 0])
        want = ops.mlp_forward_ref(t, params, [1, 0])
        assert got.shape == want.shape == (*t.shape[:-1], 2)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        ga = torch.autograd.grad(got.sum(), params)
        gb = torch.autograd.grad(want.sum(), params)
        assert_rel_close(list(ga), list(gb), 1e-5, "float32 gradients")


def test_small_path_threshold():
    """The loops take an MLP up to the threshold on N * sum_l d_l d_(l-1), ATen's calls above it (and
    with -1 always); both give the reference's values and gradients."""
    from fastmeta import _C

    assert _C._mlp_forward_small_macs() == 1 << 17  # the default
    x, params = make([3, 7, 2], n=5)  # 5 * (21 + 14) = 175 multiply-adds
    want = ops.mlp_forward_ref(x, params, [1, 0], 0.01)
    want_g = torch.autograd.grad(want.pow(2).sum(), params)
    before = _C._mlp_forward_small_macs(175)
    try:
        for limit in (175, 174, -1):
            _C._mlp_forward_small_macs(limit)
            calls = _C._mlp_forward_small_calls()
            got = fused(x, params, [1, 0], 0.01)
            torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)
            assert_rel_close(list(torch.autograd.grad(got.pow(2).sum(), params)), list(want_g), 1e-12, str(limit))
            assert _C._mlp_forward_small_calls() - calls == (2 if limit == 175 else 0), limit  # forward, backward
        assert _C._mlp_forward_small_macs() == -1
    finally:
        _C._mlp_forward_small_macs(before)


def test_small_path_threshold_from_the_environment():
    """FASTMETA_MLP_SMALL_MACS sets the loops' threshold at load; a value that is not an integer >= -1
    keeps the default (2^17)."""
    import os
    import subprocess
    import sys
    read = "import fastmeta._C as C; print(C._mlp_forward_small_macs())"
    for value, want in [("4096", 4096), ("-1", -1), ("64k", 1 << 17), ("-2", 1 << 17), ("", 1 << 17)]:
        env = dict(os.environ, FASTMETA_MLP_SMALL_MACS=value)
        out = subprocess.run([sys.executable, "-c", read], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert int(out.stdout) == want, value


def test_loops_after_a_first_call_under_inference_mode():
    """The loops' test of plain tensors is made once, at the first call: made under inference_mode
    (an evaluation first), it still takes the loops for tensors of grad mode afterwards."""
    import subprocess
    import sys
    code = """
import torch, fastmeta._C as C
x = torch.randn(4, 3)
ps = [torch.randn(5, 3, requires_grad=True), torch.randn(5, requires_grad=True)]
with torch.inference_mode():
    torch.ops.fastmeta.mlp_forward(torch.randn(4, 3), [p.detach().clone() for p in ps], [1], 0.01)
first = C._mlp_forward_small_calls()
torch.autograd.grad(torch.ops.fastmeta.mlp_forward(x, ps, [1], 0.01).sum(), ps)
print(first, C._mlp_forward_small_calls() - first)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "2"], out.stdout


def test_strided_operands(path):
    """Operands that are strided views (a transposed x, a column slice of W, a column-major W): the
    reference's values and first and second derivatives."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 6, dtype=torch.float64, generator=g).t()  # [6, 4]
    params = [torch.randn(5, 8, dtype=torch.float64, generator=g)[:, ::2].requires_grad_(),
              torch.randn(5, dtype=torch.float64, generator=g).requires_grad_(),
              torch.randn(5, 3, dtype=torch.float64, generator=g).t().requires_grad_(),
              torch.randn(3, dtype=torch.float64, generator=g).requires_grad_()]
    assert not x.is_contiguous() and not params[0].is_contiguous() and not params[2].is_contiguous()
    for acts in ([1, 0], [2, 4], [3, 1]):
        got, want = fused(x, params, acts, 0.1), ops.mlp_forward_ref(x, params, acts, 0.1)
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)
        ga = torch.autograd.grad(got.pow(2).sum(), params, create_graph=True)
        gb = torch.autograd.grad(want.pow(2).sum(), params, create_graph=True)
        assert_rel_close(list(ga), list(gb), 1e-12, f"gradients {acts}")
        ha = torch.autograd.grad(sum((t * t).sum() for t in ga), params)
        hb = torch.autograd.grad(sum((t * t).sum() for t in gb), params)
        assert_rel_close(list(ha), list(hb), 1e-11, f"second order {acts}")


def test_tensors_the_loops_do_not_read(path):
    """A negated view (its data is the value's negation), FakeTensors (no data) and functorch's
    transforms: the op gives the reference's values or its own error, never a read of their data."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastmeta import _C

    x, params = make([3, 4, 2])
    neg = torch._neg_view(x.detach())
    assert neg.is_neg()
    calls = _C._mlp_forward_small_calls()
    torch.testing.assert_close(fused(neg, params, [1, 0], 0.01), ops.mlp_forward_ref(neg, params, [1, 0], 0.01),
                               rtol=1e-13, atol=1e-13)
    assert _C._mlp_forward_small_calls() == calls  # (ATen's calls read the view's value)
    fused(x, params, [1, 0], 0.01)  # (the plain operands: the path's own)
    negp = [torch._neg_view(p.detach()) for p in params]
    torch.testing.assert_close(fused(x, negp, [3, 0], 0.01), ops.mlp_forward_ref(x, negp, [3, 0], 0.01),
                               rtol=1e-13, atol=1e-13)
    with FakeTensorMode() as mode:
        out = fused(mode.from_tensor(x), [mode.from_tensor(p) for p in params], [1, 0], 0.01)
    assert out.shape == (5, 2)
    with pytest.raises(RuntimeError, match="Batching rule not implemented for fastmeta::mlp_forward"):
        torch.vmap(lambda t: fused(t, params, [1, 0], 0.01))(x.detach().unsqueeze(0))


@pytest.mark.parametrize("act", [1, 2])
def test_nan_passes_as_in_aten(act, path):
    """relu(NaN) = NaN with derivative 1 there (threshold_backward passes g where a is NaN), leaky
    relu's NaN * slope: the bias gradient (finite) tells a NaN row's derivative apart."""
    x, params = make([3, 4])
    x = x.detach().clone()
    x[1, 0] = float("nan")
    got, want = fused(x, params, [act], 0.2), ops.mlp_forward_ref(x, params, [act], 0.2)
    torch.testing.assert_close(got, want, equal_nan=True)
    assert got[1].isnan().all()
    ga = torch.autograd.grad(got.sum(), params)
    gb = torch.autograd.grad(want.sum(), params)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13, equal_nan=True)
    assert ga[1].isfinite().all()


@pytest.mark.parametrize("seed", range(12))
def test_random_mlps_on_both_sides_of_the_threshold(seed):
    """Random depths, widths (1 to 70), row counts (1 to 40), activations and slopes, at the default
    threshold (so that some run as loops and some through ATen): values, gradients and the
    second-order product against the reference (float64)."""
    g = torch.Generator().manual_seed(100 + seed)
    depth = int(torch.randint(1, 5, (), generator=g))
    widths = [int(v) for v in torch.randint(1, 71, (depth + 1,), generator=g)]
    acts = [int(v) for v in torch.randint(0, 5, (depth,), generator=g)]
    n = int(torch.randint(1, 41, (), generator=g))
    slope = float(torch.rand((), generator=g))
    x, params = make(widths, n=n, seed=seed, x_grad=bool(seed % 2))
    ins = ([x] if x.requires_grad else []) + params
    results = []
    for impl in (fused, ops.mlp_forward_ref):
        y = impl(x, params, acts, slope)
        grads = torch.autograd.grad((y * y.detach().cos()).sum(), ins, create_graph=True)
        second = torch.autograd.grad(sum((t * t).sum() for t in grads), ins, allow_unused=True, materialize_grads=True)
        results.append([y] + list(grads) + list(second))
    assert_rel_close(results[0], results[1], 1e-10, f"widths {widths} acts {acts} n {n}")


def test_bad_arguments_are_named():
    x, params = make([3, 5, 2])
    with pytest.raises(RuntimeError, match=r"layer 2 takes 5 features: W must be \[out, 5\] and b \[out\], got W "
                                           r"\[2, 4\]"):
        fused(x, [params[0], params[1], torch.randn(2, 4, dtype=torch.float64), params[3]], [1, 0], 0.01)
    with pytest.raises(RuntimeError, match=r"activation code 7 of layer 1"):
        fused(x, params, [7, 0], 0.01)
    with pytest.raises(RuntimeError, match=r"params must be \[W_1, b_1, ..., W_L, b_L\] for the 2 activation codes, "
                                           r"got 3 tensors"):
        fused(x, params[:3], [1, 0], 0.01)
    with pytest.raises(RuntimeError, match=r"x must be \[N, d_0\]"):
        fused(x[0], params, [1, 0], 0.01)
    with pytest.raises(RuntimeError, match=r"layer 1's W and b must have x's dtype and device"):
        fused(x.float(), params, [1, 0], 0.01)


def _mlp(kind=nn.Tanh, dtype=torch.float64):
    return nn.Sequential(nn.Linear(3, 17), kind(), nn.Linear(17, 9), nn.ReLU(), nn.Linear(9, 2)).to(dtype)


def _drive(learner_cls, model, steps, first_order, dtype=torch.float64, **kw):
    g = torch.Generator().manual_seed(1)
    xs, ys, xq, yq = (torch.randn(3, n, d, dtype=dtype, generator=g) for n, d in ((6, 3), (6, 2), (5, 3), (5, 2)))
    maml = learner_cls(model, lr=0.1, first_order=first_order, **kw)
    mse = nn.functional.mse_loss
    total = 0.0
    for t in range(3):
        learner = maml.clone()
        for _ in range(steps):
            learner.adapt(mse(learner(xs[t]), ys[t]))
        total = total + mse(learner(xq[t]), yq[t])
    extra = list(maml.lrs) if learner_cls is fastmeta.MetaSGD else []
    return torch.autograd.grad(total / 3, list(model.parameters()) + extra), (xs, ys, xq, yq)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("kind", [nn.Tanh, nn.Sigmoid, lambda: nn.LeakyReLU(0.3), nn.ReLU])
def test_learners_take_it_and_match_the_loop(first_order, kind, path):
    model = _mlp(kind)
    assert M._mlp_layers(model, torch.zeros(1, 3, dtype=torch.float64)) is not None
    learner = fastmeta.MAML(model, lr=0.1).clone()
    assert "MLPForward" in learner(torch.zeros(4, 3, dtype=torch.float64)).grad_fn.name()
    got, batch = _drive(fastmeta.MAML, model, 3, first_order)
    _, want, _ = loop_meta_grads(model, *batch, 0.1, 3, "mse", first_order)
    assert_rel_close(list(got), want, 1e-10, "MAML meta-gradient")
    with fastmeta.use_backend("torch"):  # the module's own call
        ref, _ = _drive(fastmeta.MetaSGD, model, 2, first_order)
    got, _ = _drive(fastmeta.MetaSGD, model, 2, first_order)
    assert_rel_close(list(got), list(ref), 1e-10, "MetaSGD meta-gradient and rates' gradient")


def test_evaluation_forward_without_a_graph(monkeypatch, path):
    """Under no_grad and inference_mode (an evaluation after adapt) the learner's forward is still the
    op, without a graph: the module's values."""
    model = _mlp()
    learner = fastmeta.MAML(model, lr=0.1).clone()
    x = torch.randn(4, 3, dtype=torch.float64)
    learner.adapt(learner(x).pow(2).mean())
    calls, real = [], ops.mlp_forward
    monkeypatch.setattr(ops, "mlp_forward", lambda *a: calls.append(1) or real(*a))
    want = learner.module(x)
    with torch.no_grad():
        got = learner(x)
    assert calls == [1] and got.grad_fn is None and not got.requires_grad
    torch.testing.assert_close(got, want.detach(), rtol=1e-13, atol=1e-13)
    with torch.inference_mode():
        got = learner(x)
    assert calls == [1, 1] and got.is_inference()
    torch.testing.assert_close(got, want.detach(), rtol=1e-13, atol=1e-13)


def test_what_the_learners_leave_to_the_module():
    x = torch.zeros(4, 3, dtype=torch.float64)

    class MyLinear(nn.Linear):
        pass

    hooked = _mlp()
    hooked[2].register_forward_hook(lambda m, i, o: o * 2)
    backward_hooked = _mlp()
    backward_hooked[0].register_full_backward_hook(lambda m, gi, go: None)
    pre_hooked = _mlp()
    pre_hooked.register_forward_pre_hook(lambda m, i: None)
    no_bias = nn.Sequential(nn.Linear(3, 4, bias=False), nn.ReLU(), nn.Linear(4, 2)).double()
    slopes = nn.Sequential(nn.Linear(3, 4), nn.LeakyReLU(0.1), nn.Linear(4, 4), nn.LeakyReLU(0.2),
                           nn.Linear(4, 2)).double()
    two_acts = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Tanh(), nn.Linear(4, 2)).double()
    others = [nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2)).double(),
              nn.Sequential(MyLinear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double(),
              nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 2)).double(),
              nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(3, 4)), nn.Linear(4, 2)).double(),
              nn.Sequential(nn.ReLU(), nn.Linear(3, 2)).double()]
    for model in [hooked, backward_hooked, pre_hooked, no_bias, slopes, two_acts] + others:
        assert M._mlp_layers(model, x) is None, model
        out = fastmeta.MAML(model, lr=0.1).clone()(x)
        assert "MLPForward" not in out.grad_fn.name()
    model = _mlp()
    assert M._mlp_layers(model, x.float()) is None  # dtype of the input
    assert M._mlp_layers(model, torch.zeros(4, 5, dtype=torch.float64)) is None  # its width
    assert M._mlp_layers(model, torch.zeros(4, 3, dtype=torch.float16)) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert M._mlp_layers(model, x) is None
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    try:
        assert M._mlp_layers(model, x) is None
    finally:
        handle.remove()
    with fastmeta.use_backend("torch"):
        assert "MLPForward" not in fastmeta.MAML(model, lr=0.1).clone()(x).grad_fn.name()
    # a hook on the model's output sees the module's result: a forward hook that changes it is run
    got = fastmeta.MAML(hooked, lr=0.1).clone()(x)
    torch.testing.assert_close(got, hooked(x))
    # the module's own error for a batch of another width
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        fastmeta.MAML(model, lr=0.1).clone()(torch.zeros(4, 5, dtype=torch.float64))
