"""BatchedMAML.reptile_grad: Reptile (Nichol et al. 2018) on a whole meta-batch, checked against a
per-task loop (float64, 1e-10): theta - the tasks' mean adapted theta, the support loss at the
meta-parameters, zero for what the inner loop does not adapt, BatchNorm running statistics as the
loop's support passes update them; on the torch and cpp backends, with inner_params, learned rates
and per-step BatchNorm; Reptile's update with SGD; the errors."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmeta
from fastmeta.plan import call_with
from conftest import assert_grads_close, conv2_net, has_cpp

BACKENDS = ["torch"] + (["cpp"] if has_cpp() else [])


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 7), nn.Tanh(), nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 2)).double()


def _mlp_batch(T=3):
    g = torch.Generator().manual_seed(1)
    return torch.randn(T, 6, 3, generator=g, dtype=torch.float64), torch.randn(T, 6, 2, generator=g, dtype=torch.float64)


def _conv_batch(T=3):
    g = torch.Generator().manual_seed(1)
    return torch.randn(T, 5, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (T, 5), generator=g)


def _loss(kind, out, y):
    return F.mse_loss(out, y) if kind == "mse" else F.cross_entropy(out, y)


def loop_reptile(model, xs, ys, lr, steps, loss, adapted, rate=None):
    """The per-task loop: S SGD steps on each task's support set from the meta-parameters (rate(name,
    step) -> its rate, else lr); returns (mean first-step loss, theta - mean adapted theta per
    parameter that requires grad, zero where not adapted)."""
    named = dict(model.named_parameters())
    finals, first = [], []
    for t in range(xs.shape[0]):
        p = {n: v.detach().requires_grad_(n in adapted) for n, v in named.items()}
        for s in range(steps):
            value = _loss(loss, call_with(model, p, (xs[t],)), ys[t])
            if s == 0:
                first.append(value.detach())
            names = [n for n in named if n in adapted]
            g = torch.autograd.grad(value, [p[n] for n in names], allow_unused=True)
            for n, d in zip(names, g):
                if d is not None:
                    r = rate(n, s) if rate is not None else lr
                    p[n] = (p[n] - r * d).detach().requires_grad_()
        finals.append(p)
    grads = [(v.detach() - torch.stack([f[n].detach() for f in finals]).mean(0)) if n in adapted
             else torch.zeros_like(v) for n, v in named.items() if v.requires_grad]
    return torch.stack(first).mean(), grads


@pytest.mark.parametrize("backend", BACKENDS)
def test_mlp_against_the_loop(backend):
    model, (xs, ys) = _mlp(), _mlp_batch()
    for inner in (None, "4"):
        meta = fastmeta.BatchedMAML(model, 0.1, 3, inner_params=inner)
        with fastmeta.use_backend(backend):
            loss, grads = meta.reptile_grad(xs, ys)
        want_loss, want = loop_reptile(model, xs, ys, 0.1, 3, "mse", set(meta._adapt_names))
        torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=1e-12)
        assert_grads_close(grads, want)
        assert inner is None or all(g.abs().max() == 0 for g in grads[:4])  # (the body: not adapted)


@pytest.mark.skipif(not has_cpp(), reason="needs fastmeta._C (the cpp backend)")
@pytest.mark.parametrize("kind", [False, True, "per_layer", "per_layer_step"], ids=str)
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_mlp_on_the_fused_inner_loop(kind, loss, monkeypatch):
    """An MLP's Reptile on the cpp backend runs the fused inner loop (ops.mlp_adapt), with every kind
    of rate (the learned rates get zero), MSE and cross-entropy, meta-batches of part of and more
    than one group of SIMD lanes; adapt() under no_grad takes it too, with the same values."""
    calls = []
    real = fastmeta.ops.mlp_adapt
    monkeypatch.setattr(fastmeta.ops, "mlp_adapt", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = _mlp()
    for T in (3, 19):
        g = torch.Generator().manual_seed(T)
        xs = torch.randn(T, 6, 3, generator=g, dtype=torch.float64)
        ys = (torch.randn(T, 6, 2, generator=g, dtype=torch.float64) if loss == "mse"
              else torch.randint(0, 2, (T, 6), generator=g))
        meta = fastmeta.BatchedMAML(model, 0.1, 3, loss=loss, learn_inner_lr=kind)
        if meta.lrs is not None:
            with torch.no_grad():
                for r in meta.lrs.values():
                    r.mul_(0.5 + torch.rand(r.shape, generator=g, dtype=r.dtype))
        rates = None if meta.lrs is None else {n: meta.lrs[meta._lr_key(n)] for n in meta._adapt_names}

        def rate(n, s):
            r = rates[n].detach()
            return r[s] if kind == "per_layer_step" else r
        n_calls = len(calls)
        with fastmeta.use_backend("cpp"):
            value, grads = meta.reptile_grad(xs, ys)
            with torch.no_grad():
                P = meta.adapt(xs, ys)
        assert len(calls) == n_calls + 2, "the fused inner loop did not run"
        want_loss, want = loop_reptile(model, xs, ys, 0.1, 3, loss, set(meta._adapt_names),
                                       rate if rates is not None else None)
        want += [torch.zeros_like(r) for r in rates.values()] if rates is not None else []
        torch.testing.assert_close(value, want_loss, rtol=1e-12, atol=1e-12)
        assert_grads_close(grads, want)
        with fastmeta.use_backend("torch"), torch.no_grad():
            P0 = meta.adapt(xs, ys)
        for n in P0:
            torch.testing.assert_close(P[n], P0[n], rtol=1e-12, atol=1e-12)
        assert len(calls) == n_calls + 2  # (the torch backend: the batched ops)
    # a parameter frozen after a fused call: the next call adapts the others only (the batched ops)
    with fastmeta.use_backend("cpp"):
        meta.reptile_grad(xs, ys)
    assert len(calls) == n_calls + 3
    model[0].bias.requires_grad_(False)
    try:
        with fastmeta.use_backend("cpp"):
            value, grads = meta.reptile_grad(xs, ys)
        assert len(calls) == n_calls + 3
        want_loss, want = loop_reptile(model, xs, ys, 0.1, 3, loss, set(meta._adapt_names),
                                       rate if rates is not None else None)
        want += [torch.zeros_like(r) for r in rates.values()] if rates is not None else []
        assert grads[1] is None and "0.bias" not in meta._adapt_names
        assert_grads_close([g for g in grads if g is not None], want)
        torch.testing.assert_close(value, want_loss, rtol=1e-12, atol=1e-12)
    finally:
        model[0].bias.requires_grad_(True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_with_running_statistics_and_learned_rates(backend):
    """conv4-like, BatchNorm tracking running statistics (updated as the loop's S support passes
    a task update them), per-layer per-step rates used as they are (their own entries zero)."""
    model, (xs, ys) = conv2_net(track=True), _conv_batch()
    ref = copy.deepcopy(model)
    meta = fastmeta.BatchedMAML(model, 0.1, 3, loss="cross_entropy", learn_inner_lr="per_layer_step")
    with torch.no_grad():
        for i, r in enumerate(meta.lrs.values()):
            r.copy_(torch.tensor([0.05, 0.1, 0.2], dtype=r.dtype) * (1 + 0.1 * i))
    with fastmeta.use_backend(backend):
        loss, grads = meta.reptile_grad(xs, ys)
    rates = {n: meta.lrs[meta._lr_key(n)].detach() for n in meta._adapt_names}
    want_loss, want = loop_reptile(ref, xs, ys, 0.1, 3, "cross_entropy", set(meta._adapt_names),
                                   rate=lambda n, s: rates[n][s])
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=1e-12)
    n_model = len(want)
    assert_grads_close(grads[:n_model], want)
    assert all(g.abs().max() == 0 for g in grads[n_model:])  # the rates: not adapted, not moved
    for (name, a), (_, b) in zip(model.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")


def test_per_step_batch_norm_rows():
    """With per_step_bn the support pass of step s runs with row s of the BatchNorm tables."""
    model, (xs, ys) = conv2_net(), _conv_batch()
    meta = fastmeta.BatchedMAML(model, 0.1, 2, loss="cross_entropy", per_step_bn=True)
    with torch.no_grad():
        for t in meta.step_bn.parameters():
            t.add_(0.3 * torch.randn(t.shape, generator=torch.Generator().manual_seed(2), dtype=t.dtype))
    loss, grads = meta.reptile_grad(xs, ys)
    ref = copy.deepcopy(model)
    tables = {f"{k.split('.')[1]}.{k.split('.')[0]}": v.detach() for k, v in meta.step_bn.named_parameters()}
    # the loop with each step's rows: a model copy per step whose BatchNorm weights are that row's
    copies = []
    for s in range(2):
        c = copy.deepcopy(ref)
        with torch.no_grad():
            for name, row in tables.items():
                c.get_parameter(name).copy_(row[s])
        copies.append(c)
    named = dict(ref.named_parameters())
    adapted = meta._adapt_names
    finals, first = [], []
    for t in range(xs.shape[0]):
        p = {n: v.detach().requires_grad_(n in adapted) for n, v in named.items()}
        for s in range(2):
            q = {**p, **{n: copies[s].get_parameter(n) for n in tables}}
            value = F.cross_entropy(call_with(copies[s], q, (xs[t],)), ys[t])
            if s == 0:
                first.append(value.detach())
            g = torch.autograd.grad(value, [p[n] for n in adapted])
            p.update({n: (p[n] - 0.1 * d).detach().requires_grad_() for n, d in zip(adapted, g)})
        finals.append(p)
    torch.testing.assert_close(loss, torch.stack(first).mean(), rtol=1e-12, atol=1e-12)
    by_name = dict(zip([n for n, _ in meta.named_parameters()], grads))
    for n in adapted:
        want = named[n].detach() - torch.stack([f[n].detach() for f in finals]).mean(0)
        torch.testing.assert_close(by_name[f"model.{n}"], want, rtol=1e-10, atol=1e-12)
    assert all(by_name[f"step_bn.{k}"].abs().max() == 0 for k, _ in meta.step_bn.named_parameters())


def test_sgd_on_it_is_reptiles_update():
    model, (xs, ys) = _mlp(), _mlp_batch()
    meta = fastmeta.BatchedMAML(model, 0.1, 2)
    before = [p.detach().clone() for p in model.parameters()]
    _, want = loop_reptile(model, xs, ys, 0.1, 2, "mse", set(meta._adapt_names))
    opt = torch.optim.SGD(meta.parameters(), lr=0.5)
    _, grads = meta.reptile_grad(xs, ys)
    for p, g in zip(meta.parameters(), grads):
        p.grad = g
    opt.step()
    for p, b, d in zip(model.parameters(), before, want):  # theta + eps (mean theta' - theta)
        torch.testing.assert_close(p.detach(), b - 0.5 * d, rtol=1e-12, atol=1e-12)
    frozen = _mlp()
    frozen[0].weight.requires_grad_(False)
    _, grads = fastmeta.BatchedMAML(frozen, 0.1, 2).reptile_grad(xs, ys)
    assert grads[0] is None and grads[1] is not None
    with torch.inference_mode():  # (evaluation contexts: still the same values)
        loss, again = meta.reptile_grad(xs, ys)
    _, fresh = meta.reptile_grad(xs, ys)
    assert_grads_close(again, fresh, rtol=1e-12)


def test_errors():
    model, (xs, ys) = _mlp(), _mlp_batch()
    with pytest.raises(ValueError, match="reptile_grad: needs inner_steps >= 1"):
        fastmeta.BatchedMAML(model, 0.1, 0).reptile_grad(xs, ys)
    with pytest.raises(ValueError, match="the task dim T differs"):
        fastmeta.BatchedMAML(model, 0.1, 1).reptile_grad(xs, ys[:2])
