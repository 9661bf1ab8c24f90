"""fastmeta.MAML / MetaSGD: learn2learn 0.2.0 semantics."""
import pytest
import torch
from torch import nn

import fastmeta
from conftest import RTOL, assert_rel_close, loop_meta_grads


def net(dtype=torch.float64):
    return nn.Sequential(nn.Linear(3, 17), nn.Tanh(), nn.Linear(17, 2)).to(dtype)


def batch(T=3, dtype=torch.float64):
    return (torch.randn(T, 6, 3, dtype=dtype), torch.randn(T, 6, 2, dtype=dtype),
            torch.randn(T, 5, 3, dtype=dtype), torch.randn(T, 5, 2, dtype=dtype))


def drive(maml, model, xs, ys, xq, yq, steps, extra=()):
    """The learn2learn usage pattern: clone per task, adapt, query loss, backward."""
    mse = nn.functional.mse_loss
    total = 0.0
    for t in range(xs.shape[0]):
        learner = maml.clone()
        for _ in range(steps):
            learner.adapt(mse(learner(xs[t]), ys[t]))
        total = total + mse(learner(xq[t]), yq[t])
    loss = total / xs.shape[0]
    return torch.autograd.grad(loss, list(model.parameters()) + list(extra))


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_maml_meta_gradient_matches_loop(first_order, dtype):
    model = net(dtype)
    b = batch(dtype=dtype)
    got = drive(fastmeta.MAML(model, lr=0.1, first_order=first_order), model, *b, steps=3)
    _, want, _ = loop_meta_grads(model, *b, 0.1, 3, "mse", first_order)
    assert_rel_close(list(got), want, RTOL[dtype], "meta-grad")


def test_clone_first_order_override_and_attributes():
    model = net()
    maml = fastmeta.MAML(model, lr=0.1)
    b = batch()
    first = fastmeta.MAML(model, lr=0.1, first_order=True)
    # clone(first_order=True) on a second-order MAML behaves as a first-order one
    class Override:
        def clone(self):
            return maml.clone(first_order=True)
    got = drive(Override(), model, *b, steps=2)
    want = drive(first, model, *b, steps=2)
    assert_rel_close(list(got), list(want), 1e-12, "meta-grad")
    model.task_info = "sine"
    learner = maml.clone()
    assert learner.lr == 0.1 and learner.first_order is False
    assert learner.task_info == "sine"  # attribute lookups reach the wrapped module
    assert isinstance(learner.module, nn.Sequential) and learner.module is not model


def test_adapt_is_one_inner_update_call(monkeypatch):
    calls = []
    import fastmeta.maml as m
    real = m.ops.inner_update
    monkeypatch.setattr(m.ops, "inner_update", lambda *a: calls.append(len(a[0])) or real(*a))
    model = net()
    learner = fastmeta.MAML(model, lr=0.1).clone()
    learner.adapt(learner(torch.randn(4, 3, dtype=torch.float64)).pow(2).mean())
    assert calls == [4]


def test_clone_shares_graph_and_leaves_original_untouched():
    model = net()
    before = [p.detach().clone() for p in model.parameters()]
    maml = fastmeta.MAML(model, lr=0.5)
    learner = maml.clone()
    x = torch.randn(4, 3, dtype=torch.float64)
    learner.adapt(learner(x).pow(2).mean())
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)
        assert isinstance(p, nn.Parameter)
    adapted = list(learner.parameters())
    assert all(not isinstance(p, nn.Parameter) and p.grad_fn is not None for p in adapted)
    learner(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_buffers_are_carried():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)).double()
    learner = fastmeta.MAML(model, lr=0.1).clone()
    assert learner.module[1].running_mean is model[1].running_mean
    learner(torch.randn(8, 3, dtype=torch.float64))
    assert model[1].num_batches_tracked.item() == 1  # the shared buffer was updated in place
    learner.adapt(learner(torch.randn(8, 3, dtype=torch.float64)).pow(2).mean())
    assert learner.module[1].running_mean is model[1].running_mean


class _RecurrentNet(nn.Module):
    def __init__(self, cell):
        super().__init__()
        self.rnn = cell(3, 5, batch_first=True)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")  # (nn.Module._apply's)
@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU])
@pytest.mark.parametrize("first_order", [False, True])
def test_recurrent_module_meta_gradient(cell, first_order):
    """An RNN (whose clone and update re-register their flat weights, as learn2learn's do through
    flatten_parameters): the clone's weights are the differentiable copies, and the meta-gradient is
    the functional loop's."""
    from fastmeta import maml as M

    torch.manual_seed(0)
    model = _RecurrentNet(cell).double()
    assert M._flattens(model.rnn) and not M._flattens(model.head) and not M._flattens(model)
    learner = fastmeta.MAML(model, lr=0.1).clone()
    assert all(a is b for a, b in zip(learner.module.rnn._flat_weights, learner.module.rnn.parameters()))
    assert learner.module.rnn.weight_ih_l0 is not model.rnn.weight_ih_l0
    xs, xq = torch.randn(2, 4, 6, 3, dtype=torch.float64), torch.randn(2, 3, 6, 3, dtype=torch.float64)
    ys, yq = torch.randn(2, 4, 2, dtype=torch.float64), torch.randn(2, 3, 2, dtype=torch.float64)
    got = drive(fastmeta.MAML(model, lr=0.1, first_order=first_order), model, xs, ys, xq, yq, steps=2)
    _, want, _ = loop_meta_grads(model, xs, ys, xq, yq, 0.1, 2, "mse", first_order)
    assert_rel_close(list(got), want, 1e-10, "meta-grad")


def test_shared_submodule_stays_shared():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(nn.Linear(2, 4), shared, nn.Tanh(), shared, nn.Linear(4, 1)).double()
    maml = fastmeta.MAML(model, lr=0.1)
    learner = maml.clone()
    assert learner.module[1].weight is learner.module[3].weight
    x, y = torch.randn(5, 2, dtype=torch.float64), torch.randn(5, 1, dtype=torch.float64)
    learner.adapt(nn.functional.mse_loss(learner(x), y))
    assert learner.module[1].weight is learner.module[3].weight
    # against the functional oracle, where the shared weight is one parameter updated once
    b = (x[None], y[None], x[None] * 2, y[None])
    got = drive(maml, model, *b, steps=2)
    _, want, _ = loop_meta_grads(model, *b, 0.1, 2)
    assert_rel_close(list(got), want, 1e-10, "meta-grad")


def test_allow_unused_and_allow_nograd():
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1)).double()
    unused = nn.Linear(2, 2).double()
    model.add_module("unused", unused)  # a parameter the forward never touches
    x = torch.randn(4, 2, dtype=torch.float64)
    fwd = lambda m: m.module[1](m.module[0](x)).pow(2).mean()  # noqa: E731
    learner = fastmeta.MAML(model, lr=0.1).clone()
    with pytest.raises(RuntimeError, match="allow_unused"):
        learner.adapt(fwd(learner))
    learner = fastmeta.MAML(model, lr=0.1, allow_unused=True).clone()
    w_unused = learner.module.unused.weight
    learner.adapt(fwd(learner))
    assert learner.module.unused.weight is w_unused
    assert learner.module[0].weight is not model[0].weight

    model[0].bias.requires_grad_(False)
    learner = fastmeta.MAML(model, lr=0.1, allow_unused=True).clone()
    with pytest.raises(RuntimeError, match="allow_nograd"):
        learner.adapt(fwd(learner))
    learner = fastmeta.MAML(model, lr=0.1, allow_nograd=True).clone()  # allow_unused defaults to it
    b0 = learner.module[0].bias
    learner.adapt(fwd(learner))
    assert learner.module[0].bias is b0
    learner = fastmeta.MAML(model, lr=0.1).clone(allow_nograd=True, allow_unused=True)
    learner.adapt(fwd(learner))


@pytest.mark.parametrize("first_order", [False, True])
def test_metasgd_meta_gradient_and_lr_gradient(first_order):
    model = net()
    meta = fastmeta.MetaSGD(model, lr=0.05, first_order=first_order)
    with torch.no_grad():
        for l in meta.lrs:
            l.uniform_(0.02, 0.08)
    assert len(list(meta.parameters())) == 2 * len(list(model.parameters()))
    b = batch()
    got = drive(meta, model, *b, steps=2, extra=meta.lrs)
    lrs = {n: l for (n, _), l in zip(model.named_parameters(), meta.lrs)}
    _, want, want_lr = loop_meta_grads(model, *b, None, 2, "mse", first_order, lrs=lrs)
    n = len(want)
    assert_rel_close(list(got[:n]), want, 1e-10, "meta-grad")
    assert_rel_close(list(got[n:]), want_lr, 1e-10, "lr-grad")


def test_metasgd_clone_copies_rates_differentiably():
    model = net()
    meta = fastmeta.MetaSGD(model, lr=0.3)
    learner = meta.clone()
    assert all(torch.equal(a, b) and a is not b for a, b in zip(learner.lrs, meta.lrs))
    assert all(a.grad_fn is not None for a in learner.lrs)
    custom = fastmeta.MetaSGD(model, lrs=[torch.full_like(p, 0.2) for p in model.parameters()])
    assert float(custom.lrs[0][0, 0]) == pytest.approx(0.2)


def test_maml_optimizer_step_trains():
    model = net()
    maml = fastmeta.MAML(model, lr=0.1)
    opt = torch.optim.SGD(maml.parameters(), lr=0.05)
    b = batch(T=4)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        total = 0.0
        for t in range(4):
            learner = maml.clone()
            learner.adapt(nn.functional.mse_loss(learner(b[0][t]), b[1][t]))
            total = total + nn.functional.mse_loss(learner(b[2][t]), b[3][t])
        (total / 4).backward()
        opt.step()
        losses.append(total.item() / 4)
    assert losses[-1] < losses[0]


def test_maml_bad_arguments():
    with pytest.raises(TypeError, match="model"):
        fastmeta.MAML("not a module", lr=0.1)
    with pytest.raises(TypeError, match="lr"):
        fastmeta.MAML(net(), lr="0.1")
    learner = fastmeta.MAML(net(), lr=0.1).clone()
    with pytest.raises(ValueError, match="scalar"):
        learner.adapt(torch.randn(3, dtype=torch.float64, requires_grad=True))
    with pytest.raises(ValueError, match="lrs"):
        fastmeta.MetaSGD(net(), lrs=[torch.ones(1)])


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("steps", [1, 2])
def test_metasgd_with_a_module_used_twice(first_order, steps):
    """Meta-SGD on a model that applies one Linear twice: each step updates the shared weight once,
    by its rate times its whole gradient (both uses), as the functional form does (learn2learn
    0.2.0 updates such a module at each place it is found, which gives another loss, and fails at
    the second step)."""
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = self.a
            self.out = nn.Linear(4, 3)

        def forward(self, x):
            return self.out(torch.tanh(self.b(torch.relu(self.a(x)))))

    torch.manual_seed(0)
    model = Twice().double()
    alg = fastmeta.MetaSGD(model, lr=0.1, first_order=first_order)
    with torch.no_grad():
        for r in alg.lrs:
            r.uniform_(0.05, 0.2)
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    ce = torch.nn.functional.cross_entropy
    learner = alg.clone()
    for _ in range(steps):
        learner.adapt(ce(learner(x), y))
    got_loss = ce(learner(x * 0.5), y)

    params, rates = list(model.parameters()), list(alg.lrs)
    assert len(params) == 4  # a.weight, a.bias, out.weight, out.bias

    def f(ps, inp):
        aw, ab, ow, ob = ps
        h = torch.relu(inp @ aw.t() + ab)
        return torch.tanh(h @ aw.t() + ab) @ ow.t() + ob

    ps = params
    for _ in range(steps):
        gs = torch.autograd.grad(ce(f(ps, x), y), ps, create_graph=not first_order)
        ps = [p - r * g for p, r, g in zip(ps, rates, gs)]
    want_loss = ce(f(ps, x * 0.5), y)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-12, atol=0)
    got = torch.autograd.grad(got_loss, params + rates)
    want = torch.autograd.grad(want_loss, params + rates)
    assert_rel_close(list(got), list(want), 1e-10, "meta-grad and rate grads")
