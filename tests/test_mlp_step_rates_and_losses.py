"""The fused mlp_inner_loop op with MAML++'s inner-loop settings: rates per parameter and inner step
(lr [S, *shape]) and the multi-step loss (step_weights), on the cpp kernel against the reference
(which unrolls the loop under autograd) and the reference against a plain per-task loop: the three
entry points (mlp_inner_loop and its autograd, mlp_meta_loss, mlp_meta_grad, from the kernel's
reduction and from its per-task rows), both orders, MSE and cross-entropy, meta-batches of one,
part of and more than one group of SIMD lanes; the backends that do not run them; the errors."""
import importlib
import math

import pytest
import torch
import torch.nn.functional as F

import fastmeta
from fastmeta import ops
from conftest import has_cpp, make_mlp_batch, requires_cpp

mlp_mod = importlib.import_module("fastmeta.ops.mlp_inner_loop")  # (the module, not the function)
ACTS = ["tanh", "relu", None]
WIDTHS = (3, 7, 5, 2)
WEIGHTS = [None, [0.2, 0.0, 0.8], [0.5, 0.3, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]


def _case(T, loss, dtype=torch.float64, per_step=True, S=3, seed=0):
    torch.manual_seed(seed)
    params, batch = make_mlp_batch(WIDTHS, T, 4, 5, loss, dtype)
    g = torch.Generator().manual_seed(seed + 1)
    lead = (S,) if per_step else ()
    lrs = [(0.05 + 0.3 * torch.rand(*lead, *p.shape, generator=g, dtype=dtype)).requires_grad_() for p in params]
    return params, batch, lrs


def _net(theta, x):
    """The MLP of ACTS at parameters theta [W_1, b_1, ...] (plain torch)."""
    for l, act in enumerate(ACTS):
        x = F.linear(x, theta[2 * l], theta[2 * l + 1])
        x = {"tanh": torch.tanh, "relu": torch.relu, None: lambda v: v}[act](x)
    return x


def _loop(params, batch, lrs, S, loss, first_order, weights):
    """A per-task loop with its own SGD steps and losses (no fastmeta op): per-task losses [T]."""
    xs, ys, xq, yq = batch
    fn = F.mse_loss if loss == "mse" else F.cross_entropy

    out = []
    for t in range(xs.shape[0]):
        theta, total = list(params), 0.0
        for s in range(S):
            if first_order:
                probe = [p.detach().requires_grad_() for p in theta]
                grads = torch.autograd.grad(fn(_net(probe, xs[t]), ys[t]), probe)
            else:
                grads = torch.autograd.grad(fn(_net(theta, xs[t]), ys[t]), theta, create_graph=True)
            theta = [p - r[s] * g for p, r, g in zip(theta, lrs, grads)]
            w = (1.0 if s == S - 1 else 0.0) if weights is None else weights[s]
            if w != 0.0:
                total = total + w * fn(_net(theta, xq[t]), yq[t])
        out.append(total if torch.is_tensor(total) else sum(p.sum() for p in theta) * 0)
    return torch.stack(out)


def _grads(losses, wrt):
    w = torch.linspace(0.5, 1.5, losses.shape[0], dtype=losses.dtype)
    return [g.detach() for g in torch.autograd.grad((losses * w).sum(), wrt, retain_graph=True, allow_unused=True,
                                                    materialize_grads=True)]


def _close(got, want, rtol):
    for a, b in zip(got, want):
        scale = b.abs().max().item() + 1e-30
        assert (a - b).abs().max().item() <= rtol * scale, ((a - b).abs().max().item(), scale)


@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_reference_equals_a_per_task_loop(loss, first_order):
    params, batch, lrs = _case(3, loss)
    for weights in WEIGHTS:
        with fastmeta.use_backend("torch"):
            ref = ops.mlp_inner_loop(*batch, params, lrs, 3, ACTS, loss=loss, first_order=first_order,
                                     step_weights=weights)
        want = _loop(params, batch, lrs, 3, loss, first_order, weights)
        torch.testing.assert_close(ref.detach(), want.detach(), rtol=1e-12, atol=1e-12)
        _close(_grads(ref, params + lrs), _grads(want, params + lrs), 1e-10)


@requires_cpp
@pytest.mark.parametrize("T", [1, 3, 19])
@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("per_step", [True, False], ids=["per_step", "per_entry"])
def test_cpp_kernel_equals_the_reference(per_step, loss, first_order, T):
    params, batch, lrs = _case(T, loss, per_step=per_step)
    for weights in WEIGHTS:
        kw = dict(loss=loss, first_order=first_order, step_weights=weights)
        with fastmeta.use_backend("torch"):
            ref = ops.mlp_inner_loop(*batch, params, lrs, 3, ACTS, **kw)
            want = _grads(ref, params + lrs)
            want_mean = [g.detach() for g in torch.autograd.grad(ref.mean(), params + lrs)]
        with fastmeta.use_backend("cpp"):
            got = ops.mlp_inner_loop(*batch, params, lrs, 3, ACTS, **kw)
            torch.testing.assert_close(got.detach(), ref.detach(), rtol=1e-12, atol=1e-12)
            _close(_grads(got, params + lrs), want, 1e-10)
            mean = ops.mlp_meta_loss(*batch, params, lrs, 3, ACTS, **kw)
            torch.testing.assert_close(mean.detach(), ref.mean().detach(), rtol=1e-12, atol=1e-12)
            _close([g.detach() for g in torch.autograd.grad(mean, params + lrs)], want_mean, 1e-10)
            value, g, glr = ops.mlp_meta_grad(*batch, params, lrs, 3, ACTS, **kw)
            torch.testing.assert_close(value, ref.mean().detach(), rtol=1e-12, atol=1e-12)
            assert [tuple(r.shape) for r in glr] == [tuple(r.shape) for r in lrs]
            _close(list(g) + list(glr), want_mean, 1e-10)


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_per_step_rates_for_no_steps(backend):
    """Per-step rates of zero steps ([0, *shape]): the query loss at the meta-parameters, their
    gradient, and empty rate gradients, on every backend this machine has."""
    from fastmeta.backend import why_unavailable
    if why_unavailable(backend, "cpu") is not None:
        pytest.skip(f"{backend}: {why_unavailable(backend, 'cpu')}")
    params, batch, lrs = _case(3, "mse", per_step=True, S=0)
    with fastmeta.use_backend("torch"):
        want = _grads(ops.mlp_inner_loop(*batch, params, 0.1, 0, ACTS), params)
    with fastmeta.use_backend(backend):
        losses = ops.mlp_inner_loop(*batch, params, lrs, 0, ACTS)
        got = _grads(losses, params + lrs)
        value, g, glr = ops.mlp_meta_grad(*batch, params, lrs, 0, ACTS)
    _close(got[:len(params)], want, 1e-12)
    assert [tuple(r.shape) for r in got[len(params):]] == [tuple(r.shape) for r in lrs]
    assert [tuple(r.shape) for r in glr] == [tuple(r.shape) for r in lrs]
    torch.testing.assert_close(value, losses.mean().detach(), rtol=1e-12, atol=1e-12)


@requires_cpp
@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
def test_meta_grad_from_per_task_rows(first_order, monkeypatch):
    """fastmeta::mlp_meta_grad from the kernel's per-task rows (CUDA's way, FASTMETA_META_GRAD_ROWS=1)
    splits the per-step rate gradients by the rates' shapes."""
    params, batch, lrs = _case(5, "mse")
    with fastmeta.use_backend("cpp"):
        want = ops.mlp_meta_grad(*batch, params, lrs, 3, ACTS, first_order=first_order, step_weights=[0.3, 0.2, 0.5])
        monkeypatch.setenv("FASTMETA_META_GRAD_ROWS", "1")
        got = ops.mlp_meta_grad(*batch, params, lrs, 3, ACTS, first_order=first_order, step_weights=[0.3, 0.2, 0.5])
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
    assert [tuple(r.shape) for r in got[2]] == [tuple(r.shape) for r in lrs]
    _close(list(got[1]) + list(got[2]), list(want[1]) + list(want[2]), 1e-12)


@requires_cpp
def test_float32_on_the_kernel():
    params, batch, lrs = _case(19, "cross_entropy", dtype=torch.float32)
    with fastmeta.use_backend("torch"):
        want = _grads(ops.mlp_inner_loop(*batch, params, lrs, 3, ACTS, loss="cross_entropy",
                                         step_weights=[0.3, 0.3, 0.4]), params + lrs)
    with fastmeta.use_backend("cpp"):
        got = _grads(ops.mlp_inner_loop(*batch, params, lrs, 3, ACTS, loss="cross_entropy",
                                        step_weights=[0.3, 0.3, 0.4]), params + lrs)
    _close(got, want, 1e-4)


@requires_cpp
def test_op_schema_and_fakes():
    """torch.library.opcheck of the three ops with per-step rates and step weights (schema, fake
    kernels against the outputs, autograd registration)."""
    params, batch, lrs = _case(3, "mse", dtype=torch.float32)
    plain, rates = [p.detach() for p in params], [r.detach() for r in lrs]
    ops.mlp_meta_grad(*batch, params, 0.1, 3, ACTS)  # registers the fakes
    fm, acts = torch.ops.fastmeta, [3, 1, 0]
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(fm.mlp_inner_loop.default,
                          (*batch, plain, rates, 0.0, 3, acts, 0.01, 0, False, True, [0.2, 0.0, 0.8]),
                          test_utils=utils)
    torch.library.opcheck(fm.mlp_meta_grad.default,
                          (*batch, plain, rates, 0.0, 3, acts, 0.01, 0, False, True, [0.2, 0.3, 0.5]),
                          test_utils=utils)
    torch.library.opcheck(fm.mlp_meta_loss.default, (*batch, params, lrs, 0.0, 3, acts, 0.01, 0, True, [0.5, 0.0, 0.5]))


@requires_cpp
def test_in_a_compiled_graph():
    """ops.mlp_meta_loss with per-step rates and step weights under torch.compile: the fused op is in
    the compiled graph, its fakes give the rate gradients their shapes."""
    params, batch, lrs = _case(3, "mse", dtype=torch.float32)

    def step(xs, ys, xq, yq):
        return ops.mlp_meta_loss(xs, ys, xq, yq, params, lrs, 3, ACTS, step_weights=[0.2, 0.3, 0.5])
    with fastmeta.use_backend("cpp"):
        want = torch.autograd.grad(step(*batch), params + lrs)
        graphs = []

        def backend(gm, inputs):
            graphs.append(str(gm.graph))
            return torch._dynamo.lookup_backend("aot_eager")(gm, inputs)
        torch._dynamo.reset()
        got = torch.autograd.grad(torch.compile(step, backend=backend)(*batch), params + lrs)
    assert any("fastmeta.mlp_meta_loss" in g for g in graphs), graphs
    _close(got, want, 1e-6)


def test_backends_without_them(monkeypatch):
    """A backend whose kernel does not run per-step rates or step weights (here triton taken out of
    STEP_BACKENDS): under the auto request the reference takes such a call; an explicit request
    raises, naming the backend."""
    params, batch, lrs = _case(3, "mse")
    with fastmeta.use_backend("torch"):
        want = ops.mlp_inner_loop(*batch, params, lrs, 3, ACTS, step_weights=[0.2, 0.3, 0.5])
    called = []
    monkeypatch.setattr(mlp_mod, "STEP_BACKENDS", ("torch", "cpp", "cuda"))
    monkeypatch.setattr(mlp_mod, "select", lambda op, device_type: "triton")
    monkeypatch.setattr(mlp_mod, "_kernel", lambda backend: called.append(backend))
    monkeypatch.setattr(mlp_mod, "requested", lambda op: "auto")
    got = ops.mlp_inner_loop(*batch, params, lrs, 3, ACTS, step_weights=[0.2, 0.3, 0.5])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    value, grads, _ = ops.mlp_meta_grad(*batch, params, lrs, 3, ACTS, step_weights=[0.2, 0.3, 0.5])
    torch.testing.assert_close(value, want.mean().detach(), rtol=1e-12, atol=1e-12)
    assert not called
    monkeypatch.setattr(mlp_mod, "requested", lambda op: "triton")
    for kw in (dict(lr=lrs), dict(lr=0.1, step_weights=[0.2, 0.3, 0.5])):
        for fn in (ops.mlp_inner_loop, ops.mlp_meta_loss, ops.mlp_meta_grad):
            with pytest.raises(ValueError, match="'triton'"):
                fn(*batch, params, steps=3, activations=ACTS, **kw)
    assert not called


def test_cuda_takes_at_most_its_weighted_steps(monkeypatch):
    """The CUDA kernel holds the step weights of at most CUDA_MAX_WEIGHTED_STEPS steps: more go to the
    reference under the auto request, and an explicit cuda request raises, naming the count."""
    most = mlp_mod.CUDA_MAX_WEIGHTED_STEPS
    assert ops.runs_step_settings("cuda", most, True, [1.0] * most)
    assert not ops.runs_step_settings("cuda", most + 1, False, [1.0] * (most + 1))
    assert ops.runs_step_settings("cuda", most + 1, True, None)  # (per-step rates alone: any count)
    assert ops.runs_step_settings("cpp", 1000, True, [1.0] * 1000)
    assert ops.runs_step_settings("triton", 100, True, [0.01] * 100)
    torch.manual_seed(0)
    params, batch = make_mlp_batch((2, 3, 1), 2, 3, 3, "mse", torch.float64)
    S = most + 1
    weights = [1.0 / S] * S
    with fastmeta.use_backend("torch"):
        want = ops.mlp_inner_loop(*batch, params, 0.01, S, ["tanh", None], step_weights=weights)
    called = []
    monkeypatch.setattr(mlp_mod, "select", lambda op, device_type: "cuda")
    monkeypatch.setattr(mlp_mod, "_kernel", lambda backend: called.append(backend))
    monkeypatch.setattr(mlp_mod, "requested", lambda op: "auto")
    got = ops.mlp_inner_loop(*batch, params, 0.01, S, ["tanh", None], step_weights=weights)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not called
    monkeypatch.setattr(mlp_mod, "requested", lambda op: "cuda")
    with pytest.raises(ValueError, match=f"'cuda' for {S} steps"):
        ops.mlp_inner_loop(*batch, params, 0.01, S, ["tanh", None], step_weights=weights)


def _adapt_loop(params, batch, lrs, S, loss):
    """Each task's parameters after S first-order SGD steps and its support loss at the start, by
    a plain per-task loop (rates: None for 0.1, else [S, *shape] per parameter or *shape)."""
    xs, ys = batch[:2]
    fn = F.mse_loss if loss == "mse" else F.cross_entropy

    finals, first = [], []
    for t in range(xs.shape[0]):
        theta = [p.detach() for p in params]
        first.append(fn(_net(theta, xs[t]), ys[t]).detach())
        for s in range(S):
            probe = [p.requires_grad_() for p in theta]
            grads = torch.autograd.grad(fn(_net(probe, xs[t]), ys[t]), probe)
            rates = [0.1] * len(params) if lrs is None else [r.detach()[s] if r.dim() > p.dim() else r.detach()
                                                             for r, p in zip(lrs, params)]
            theta = [(p - r * g).detach() for p, r, g in zip(theta, rates, grads)]
        finals.append(theta)
    return [torch.stack(ts) for ts in zip(*finals)], torch.stack(first)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("rates", ["scalar", "per_entry", "per_step"])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_mlp_adapt_equals_a_per_task_loop(loss, rates, backend):
    """ops.mlp_adapt (the inner loop alone: Reptile's and adapt's values) against a per-task loop:
    every kind of rate, no steps and three, one task and more than one group of SIMD lanes, flat
    output; float32 on the kernel against float64."""
    if backend == "cpp" and not has_cpp():
        pytest.skip("no cpp backend")
    for T, S in ((1, 3), (19, 3), (3, 0)):
        params, batch, lrs = _case(T, loss, per_step=rates == "per_step", S=S)
        lr = 0.1 if rates == "scalar" else lrs
        want, want_loss = _adapt_loop(params, batch, None if rates == "scalar" else lrs, S, loss)
        with fastmeta.use_backend(backend):
            got, got_loss = ops.mlp_adapt(batch[0], batch[1], params, lr, S, ACTS, loss=loss)
            flat, _ = ops.mlp_adapt(batch[0], batch[1], params, lr, S, ACTS, loss=loss, flat=True)
        torch.testing.assert_close(got_loss, want_loss, rtol=1e-12, atol=1e-12)
        _close(got, want, 1e-12)
        assert not any(g.requires_grad for g in got)
        torch.testing.assert_close(flat, torch.cat([g.reshape(T, -1) for g in got], 1), rtol=0, atol=0)
    params, batch, lrs = _case(19, loss, per_step=True, dtype=torch.float32)
    with fastmeta.use_backend(backend):
        got, _ = ops.mlp_adapt(batch[0], batch[1], params, lrs, 3, ACTS, loss=loss)
    want, _ = _adapt_loop([p.double() for p in params], [t.double() if t.is_floating_point() else t for t in batch],
                          [r.double() for r in lrs], 3, loss)
    _close(got, [w.float() for w in want], 1e-5)


@requires_cpp
def test_mlp_adapt_op_schema_and_fake():
    params, batch, lrs = _case(3, "mse", dtype=torch.float32)
    ops.mlp_adapt(batch[0], batch[1], params, 0.1, 3, ACTS)  # registers the fake
    torch.library.opcheck(torch.ops.fastmeta.mlp_adapt.default,
                          (batch[0], batch[1], [p.detach() for p in params], [r.detach() for r in lrs], 0.0, 3,
                           [3, 1, 0], 0.01, 0), test_utils=("test_schema", "test_faketensor"))


def test_mlp_adapt_bad_input_is_named():
    """ops.mlp_adapt's errors name the op and the argument (its support set checked as a query set
    too, the errors still name xs and ys)."""
    params, batch, lrs = _case(3, "mse")
    xs, ys = batch[:2]
    with pytest.raises(ValueError, match=r"mlp_adapt: ys \(3, 4, 1\) must be \[T, 4, 2\]"):
        ops.mlp_adapt(xs, ys[..., :1], params, 0.1, 3, ACTS)
    with pytest.raises(ValueError, match=r"mlp_adapt: per-parameter lr shapes .*steps=2"):
        ops.mlp_adapt(xs, ys, params, lrs, 2, ACTS)
    with pytest.raises(ValueError, match="xs: expected 3 dims"):
        ops.mlp_adapt(xs[0], ys, params, 0.1, 3, ACTS)
    _, c_batch, _ = _case(3, "cross_entropy")
    with pytest.raises(ValueError, match=r"mlp_adapt: ys .* has labels outside \[0, 2\)"):
        ops.mlp_adapt(c_batch[0], c_batch[1] + 2, params, 0.1, 3, ACTS, loss="cross_entropy")


def test_bad_rates_and_weights_are_named():
    params, batch, lrs = _case(3, "mse")
    with pytest.raises(ValueError, match=r"lr shapes .*steps=2"):
        ops.mlp_inner_loop(*batch, params, lrs, 2, ACTS)
    with pytest.raises(ValueError, match="lr shapes"):
        ops.mlp_inner_loop(*batch, params, lrs[:1] + [r[0] for r in lrs[1:]], 3, ACTS)
    with pytest.raises(TypeError, match="lr must be"):
        ops.mlp_inner_loop(*batch, params, [0.1] * 6, 3, ACTS)
    with pytest.raises(ValueError, match=r"step_weights .*steps=3"):
        ops.mlp_inner_loop(*batch, params, 0.1, 3, ACTS, step_weights=[0.5, 0.5])
    with pytest.raises(ValueError, match="step_weights"):
        ops.mlp_meta_grad(*batch, params, 0.1, 3, ACTS, step_weights=[0.5, math.nan, 0.5])
    with pytest.raises(TypeError, match="step_weights"):
        ops.mlp_meta_loss(*batch, params, 0.1, 3, ACTS, step_weights=0.5)


@requires_cpp
def test_kernel_checks_the_op_arguments():
    """The C++ op itself refuses rates of the wrong step count and weights of the wrong length."""
    params, batch, lrs = _case(3, "mse")
    plain, rates = [p.detach() for p in params], [r.detach() for r in lrs]
    fm, acts = torch.ops.fastmeta, [3, 1, 0]
    with pytest.raises(RuntimeError, match=r"lrs\[0\].*one rate set per step"):
        fm.mlp_inner_loop(*batch, plain, rates, 0.0, 2, acts, 0.01, 0, False, False)
    with pytest.raises(RuntimeError, match="step_weights must be empty or one weight a step"):
        fm.mlp_meta_grad(*batch, plain, [], 0.1, 3, acts, 0.01, 0, False, False, [0.5, 0.5])
    with pytest.raises(RuntimeError, match="finite"):
        fm.mlp_meta_grad(*batch, plain, [], 0.1, 3, acts, 0.01, 0, False, False, [0.5, math.inf, 0.5])
