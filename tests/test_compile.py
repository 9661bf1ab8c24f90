"""fastmeta under torch.compile: the C++ ops' registrations pass torch.library.opcheck (fake kernels,
AOT dispatch with dynamic shapes), the fused MLP meta-loss traces into a compiled graph, and the
public API (BatchedMAML, MAML, MetaSGD) gives inside a compiled step what it gives eagerly, in both
orders. The tests compile with the aot_eager backend: dynamo, fake tensors and AOT autograd, which
are what the registrations serve, without inductor's code generation."""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmeta
from fastmeta import ops

from conftest import requires_cpp


def _compiled(fn, **kw):
    torch._dynamo.reset()
    return torch.compile(fn, backend="aot_eager", **kw)


def _mlp_case(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(8, 2, generator=g, dtype=dtype), torch.randn(8, generator=g, dtype=dtype),
              torch.randn(3, 8, generator=g, dtype=dtype), torch.randn(3, generator=g, dtype=dtype)]
    params = [p.requires_grad_() for p in params]
    T, K, Q = 3, 5, 4
    batch = (torch.randn(T, K, 2, generator=g, dtype=dtype), torch.randn(T, K, 3, generator=g, dtype=dtype),
             torch.randn(T, Q, 2, generator=g, dtype=dtype), torch.randn(T, Q, 3, generator=g, dtype=dtype))
    lrs = [torch.full_like(p, 0.1).requires_grad_() for p in params]
    return params, batch, lrs


@requires_cpp
def test_cpp_ops_pass_opcheck():
    """Every test of opcheck (schema, fake tensors, autograd registration, AOT dispatch static and
    dynamic) for the C++ update and MLP ops. fastmeta::mlp_meta_loss used to call the CPU kernel
    directly from its autograd function and failed under fake tensors; the CPU kernels returned a
    rate tensor itself from .to() where its dtype was already right."""
    fm = torch.ops.fastmeta
    params, batch, lrs = _mlp_case()
    plain = [p.detach() for p in params]
    grads = [torch.randn_like(p).requires_grad_() for p in params]
    acts = [3, 0]  # tanh, none
    cases = [
        (fm.inner_update_scalar.default, ([p.detach().requires_grad_() for p in params], grads, 0.1)),
        (fm.inner_update_tensor.default, ([p.detach().requires_grad_() for p in params], grads,
                                          [l.detach().requires_grad_() for l in lrs])),
        (fm.mlp_inner_loop.default, (*batch, plain, [], 0.1, 2, acts, 0.01, 0, False, False)),
        (fm.mlp_meta_grad.default, (*batch, plain, [], 0.1, 2, acts, 0.01, 0, False, False)),
        (fm.mlp_meta_grad.default, (*batch, plain, [l.detach() for l in lrs], 0.1, 2, acts, 0.01, 0, True, True)),
        (fm.mlp_meta_loss.default, (*batch, params, [], 0.1, 2, acts, 0.01, 0, False)),
        (fm.mlp_meta_loss.default, (*batch, params, lrs, 0.1, 2, acts, 0.01, 0, False)),
        (fm.mlp_meta_loss.default, (*batch, params, lrs, 0.1, 2, acts, 0.01, 0, True)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


@requires_cpp
def test_fake_kernels_are_registered_when_fastmeta_loads():
    """An op met first inside torch.compile's tracing (a fresh process) has its fake kernel."""
    script = """
import torch, fastmeta
from fastmeta import ops
params = [torch.randn(8, 1).requires_grad_(), torch.randn(8).requires_grad_(), torch.randn(1, 8).requires_grad_(),
          torch.randn(1).requires_grad_()]
b = [torch.randn(2, 4, 1) for _ in range(4)]
@torch.compile(backend="aot_eager", fullgraph=True)
def step(xs, ys, xq, yq):
    return torch.ops.fastmeta.mlp_meta_loss(xs, ys, xq, yq, params, [], 0.1, 2, [1, 0], 0.01, 0, False)
with fastmeta.use_backend("cpp"):
    got = torch.autograd.grad(step(*b), params)
    want = torch.autograd.grad(torch.ops.fastmeta.mlp_meta_loss(*b, params, [], 0.1, 2, [1, 0], 0.01, 0, False), params)
print(max((x - y).abs().max().item() for x, y in zip(got, want)))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert float(out.stdout.strip().splitlines()[-1]) == 0.0


@requires_cpp
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("meta_sgd", [False, True])
def test_fused_mlp_meta_loss_in_a_compiled_graph(first_order, meta_sgd):
    """ops.mlp_meta_loss under torch.compile on the cpp backend: the fused op is in a compiled graph
    (the backend choice before it is a graph break), its loss and meta-gradient (and the rates')
    equal to the eager op's."""
    params, batch, lrs = _mlp_case()
    lr = lrs if meta_sgd else 0.1
    wanted = params + (lrs if meta_sgd else [])

    def step(xs, ys, xq, yq):
        return ops.mlp_meta_loss(xs, ys, xq, yq, params, lr, 2, ["tanh", None], first_order=first_order)

    with fastmeta.use_backend("cpp"):
        want_loss = step(*batch)
        want = torch.autograd.grad(want_loss, wanted)
        graphs = []

        def backend(gm, inputs):
            graphs.append(str(gm.graph))
            return torch._dynamo.lookup_backend("aot_eager")(gm, inputs)

        torch._dynamo.reset()
        loss = torch.compile(step, backend=backend)(*batch)
        got = torch.autograd.grad(loss * 2, wanted)  # an incoming gradient other than 1 too
    assert any("fastmeta.mlp_meta_loss" in g for g in graphs), graphs
    torch.testing.assert_close(loss, want_loss, rtol=0, atol=0)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, 2 * b, rtol=1e-12, atol=1e-14)


def _conv_net():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(16, 3)).double()


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("backend", ["torch", pytest.param("cpp", marks=requires_cpp)])
@pytest.mark.parametrize("model", ["mlp", "conv"])
def test_batched_maml_in_a_compiled_step(model, backend, first_order):
    """A compiled training step holding a BatchedMAML call: its meta-gradient equals the eager one
    (BatchedMAML runs as it is inside the step; before, the second-order inner loop failed inside
    torch.compile's once-differentiable graph, and the fused op under fake tensors)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if model == "mlp":
        net = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 3)).double()
        xs, xq = torch.randn(3, 5, 2, generator=g, dtype=torch.float64), torch.randn(3, 6, 2, generator=g,
                                                                                    dtype=torch.float64)
    else:
        net = _conv_net()
        xs, xq = (torch.randn(3, n, 1, 5, 5, generator=g, dtype=torch.float64) for n in (5, 6))
    ys, yq = torch.randint(0, 3, (3, 5), generator=g), torch.randint(0, 3, (3, 6), generator=g)
    meta = fastmeta.BatchedMAML(net, 0.1, 2, first_order=first_order, loss="cross_entropy", backend=backend)
    params = list(meta.parameters())

    def step(xs, ys, xq, yq):
        return meta(xs * 1.0, ys, xq, yq) * 0.5  # work of the step's own around the meta-loss

    want = torch.autograd.grad(step(xs, ys, xq, yq), params)
    got = torch.autograd.grad(_compiled(step)(xs, ys, xq, yq), params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    compiled_meta = _compiled(meta)  # the module itself compiled
    got = torch.autograd.grad(compiled_meta(xs, ys, xq, yq) * 0.5, params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("algo", ["MAML", "MetaSGD"])
@pytest.mark.parametrize("compiled_model", [False, True])
def test_maml_in_a_compiled_step(algo, first_order, compiled_model):
    """learn2learn-style clone / adapt inside a compiled step, and a model given as
    torch.compile(model): the same meta-gradient as eagerly. Before, a second-order adapt() failed on
    the compiled forward's once-differentiable graph, and cloning a compiled model recursed."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    x, y = torch.randn(6, 2, dtype=torch.float64), torch.randint(0, 3, (6,))

    def make():
        torch._dynamo.reset()
        return getattr(fastmeta, algo)(torch.compile(net, backend="aot_eager") if compiled_model else net,
                                       lr=0.1, first_order=first_order)

    def step(alg):
        learner = alg.clone()
        for _ in range(2):
            learner.adapt(F.cross_entropy(learner(x), y))
        return F.cross_entropy(learner(x * 0.5), y)

    eager = getattr(fastmeta, algo)(net, lr=0.1, first_order=first_order)
    want = torch.autograd.grad(step(eager), list(eager.parameters()))
    alg = make()
    assert alg.module is net
    got = torch.autograd.grad(_compiled(step)(alg), list(alg.parameters()))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_explain_and_batched_maml_take_the_module_inside_torch_compile():
    net = nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 1)).double()
    wrapped = torch.compile(net)
    text = fastmeta.explain(wrapped)
    assert "inside torch.compile's wrapper" in text and "vmap" not in text.split("whole inner loop")[0]
    meta = fastmeta.BatchedMAML(wrapped, 0.1, 1)
    assert meta.model is net
    x = torch.randn(3, 4, 1, dtype=torch.float64)
    torch.testing.assert_close(meta(x, x, x, x), fastmeta.BatchedMAML(net, 0.1, 1)(x, x, x, x), rtol=0, atol=0)


def test_importing_fastmeta_does_not_import_dynamo():
    """Marking functions for torch.compile at import would import torch._dynamo (about 2 s here)."""
    out = subprocess.run([sys.executable, "-c", "import sys, fastmeta; print('torch._dynamo' in sys.modules)"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"
