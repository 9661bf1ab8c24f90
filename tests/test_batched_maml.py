"""BatchedMAML's meta-gradient against the naive per-task autograd loop."""
from unittest.mock import patch

import pytest
import torch
from torch import nn
import torch.nn.functional as F

import fastmeta
from conftest import RTOL, assert_grads_close, assert_rel_close, has_cpp, loop_meta_grads, requires_cpp

BACKENDS = ["torch", pytest.param("cpp", marks=requires_cpp)]


def mlp(widths=(2, 37, 23, 3), act=nn.Tanh, dtype=torch.float64):
    layers = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(act())
    return nn.Sequential(*layers).to(dtype)


def regression_batch(T, K, Q, din, dout, dtype):
    return (torch.randn(T, K, din, dtype=dtype), torch.randn(T, K, dout, dtype=dtype),
            torch.randn(T, Q, din, dtype=dtype), torch.randn(T, Q, dout, dtype=dtype))


def classification_batch(T, K, Q, din, C, dtype):
    return (torch.randn(T, K, din, dtype=dtype), torch.randint(0, C, (T, K)),
            torch.randn(T, Q, din, dtype=dtype), torch.randint(0, C, (T, Q)))


def meta_grads(meta, model, batch):
    loss = meta(*batch)
    params = [p for p in model.parameters() if p.requires_grad]
    extra = ([meta.lrs[n.replace(".", "__")] for n, p in model.named_parameters() if p.requires_grad]
             if meta.lrs is not None else [])
    g = torch.autograd.grad(loss, params + extra)
    return loss.detach(), list(g[: len(params)]), list(g[len(params):])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("steps", [1, 2, 5])
def test_mlp_mse(backend, dtype, first_order, steps):
    model = mlp(dtype=dtype)
    batch = regression_batch(3, 7, 5, 2, 3, dtype)
    want_loss, want, _ = loop_meta_grads(model, *batch, 0.05, steps, "mse", first_order)
    with fastmeta.use_backend(backend):
        meta = fastmeta.BatchedMAML(model, 0.05, steps, first_order=first_order)
        loss, got, _ = meta_grads(meta, model, batch)
    assert_rel_close([loss], [want_loss], RTOL[dtype], "meta-loss")
    assert_rel_close(got, want, RTOL[dtype], "meta-grad")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", [nn.ReLU, nn.Sigmoid, lambda: nn.LeakyReLU(0.1)])
@pytest.mark.parametrize("first_order", [False, True])
def test_mlp_cross_entropy(backend, act, first_order):
    dtype = torch.float64
    model = mlp((4, 37, 5), act=act, dtype=dtype)
    batch = classification_batch(3, 10, 6, 4, 5, dtype)
    _, want, _ = loop_meta_grads(model, *batch, 0.3, 3, "cross_entropy", first_order)
    with fastmeta.use_backend(backend):
        meta = fastmeta.BatchedMAML(model, 0.3, 3, first_order=first_order, loss="cross_entropy")
        _, got, _ = meta_grads(meta, model, batch)
    assert_rel_close(got, want, RTOL[dtype], "meta-grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_entropy_over_positions(backend):
    """Outputs [T, N, L, C] with labels [T, N, L] (a sequence model's): the classes are the last
    dim and each of a task's N * L positions is a sample of the mean, as a per-task loop with
    F.cross_entropy over the flattened positions gives."""
    torch.manual_seed(0)
    L, C = 3, 5
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, L * C), nn.Unflatten(-1, (L, C))).double()
    xs, xq = torch.randn(2, 4, 6, dtype=torch.float64), torch.randn(2, 7, 6, dtype=torch.float64)
    ys, yq = torch.randint(0, C, (2, 4, L)), torch.randint(0, C, (2, 7, L))

    def flat(pred, target):
        return F.cross_entropy(pred.reshape(-1, C), target.reshape(-1))
    want_loss, want, _ = loop_meta_grads(model, xs, ys, xq, yq, 0.3, 2, flat)
    with fastmeta.use_backend(backend):
        meta = fastmeta.BatchedMAML(model, 0.3, 2, loss="cross_entropy")
        loss, got, _ = meta_grads(meta, model, (xs, ys, xq, yq))
        assert_rel_close([loss], [want_loss], 1e-12, "meta-loss")
        assert_rel_close(got, want, RTOL[torch.float64], "meta-grad")
        with pytest.raises(ValueError, match=r"labels \(2, 4\) do not match the model's output \(2, 4, 3, 5\): "
                           r"expected \(2, 4, 3\)"):  # one label a sample where L are made
            meta(xs, ys[..., 0], xq, yq[..., 0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_meta_sgd(backend, first_order, dtype):
    model = mlp((1, 13, 1), act=nn.ReLU, dtype=dtype)
    batch = regression_batch(3, 10, 10, 1, 1, dtype)
    with fastmeta.use_backend(backend):
        meta = fastmeta.BatchedMAML(model, 0.02, 3, first_order=first_order, learn_inner_lr=True)
        with torch.no_grad():  # distinct rates per entry, so a mix-up of entries shows
            for l in meta.lrs.values():
                l.uniform_(0.01, 0.05)
        lrs = {n: meta.lrs[n.replace(".", "__")] for n, _ in model.named_parameters()}
        _, want, want_lr = loop_meta_grads(model, *batch, None, 3, "mse", first_order, lrs=lrs)
        _, got, got_lr = meta_grads(meta, model, batch)
    assert {id(p) for p in meta.lrs.values()} <= {id(p) for p in meta.parameters()}
    assert_rel_close(got, want, RTOL[dtype], "meta-grad")
    assert_rel_close(got_lr, want_lr, RTOL[dtype], "lr-grad")



def test_meta_sgd_rates_follow_the_model_order():
    """The learned rates are listed (meta.parameters(), value_and_grad's grads, an optimizer's
    groups) in the order of the model's parameters, each after its name, not sorted by name."""
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    meta = fastmeta.BatchedMAML(model, 0.1, 1, learn_inner_lr=True)
    names = [n for n, _ in model.named_parameters()]
    assert list(meta.lrs.keys()) == [n.replace(".", "__") for n in names]
    assert [n for n, _ in meta.named_parameters()] == [f"model.{n}" for n in names] + \
        [f"lrs.{n.replace('.', '__')}" for n in names]
    for (_, p), l in zip(model.named_parameters(), meta.lrs.values()):
        assert l.shape == p.shape

def conv_net(ch=3, classes=5, dtype=torch.float64, track=False):
    blocks, c = [], 1
    for _ in range(4):
        blocks += [nn.Conv2d(c, ch, 3, padding=1), nn.BatchNorm2d(ch, track_running_stats=track),
                   nn.ReLU(), nn.MaxPool2d(2)]
        c = ch
    return nn.Sequential(*blocks, nn.Flatten(), nn.Linear(ch, classes)).to(dtype)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("steps", [1, 2, 5])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_conv4_batchnorm(first_order, steps, dtype):
    model = conv_net(dtype=dtype)
    T, K, Q = 3, 5, 4
    batch = (torch.randn(T, K, 1, 16, 16, dtype=dtype), torch.randint(0, 5, (T, K)),
             torch.randn(T, Q, 1, 16, 16, dtype=dtype), torch.randint(0, 5, (T, Q)))
    _, want, _ = loop_meta_grads(model, *batch, 0.4, steps, "cross_entropy", first_order)
    meta = fastmeta.BatchedMAML(model, 0.4, steps, first_order=first_order, loss="cross_entropy")
    _, got, _ = meta_grads(meta, model, batch)
    assert_rel_close(got, want, RTOL[dtype], "meta-grad")


def test_conv_mse_tracked_bn_and_meta_sgd():
    """BatchNorm with running stats in training mode uses batch stats (as the loop does); MSE head."""
    model = conv_net(ch=2, classes=3, track=True)
    T = 2
    batch = (torch.randn(T, 4, 1, 16, 16, dtype=torch.float64), torch.randn(T, 4, 3, dtype=torch.float64),
             torch.randn(T, 3, 1, 16, 16, dtype=torch.float64), torch.randn(T, 3, 3, dtype=torch.float64))
    meta = fastmeta.BatchedMAML(model, 0.1, 2, learn_inner_lr=True)
    lrs = {n: meta.lrs[n.replace(".", "__")] for n, _ in model.named_parameters()}
    _, got, got_lr = meta_grads(meta, model, batch)
    _, want, want_lr = loop_meta_grads(model, *batch, None, 2, "mse", False, lrs=lrs)
    assert_rel_close(got, want, RTOL[torch.float64], "meta-grad")
    assert_rel_close(got_lr, want_lr, RTOL[torch.float64], "lr-grad")


def test_zero_steps_is_plain_query_loss():
    model = mlp()
    batch = regression_batch(3, 4, 4, 2, 3, torch.float64)
    meta = fastmeta.BatchedMAML(model, 0.1, 0)
    _, got, _ = meta_grads(meta, model, batch)
    _, want, _ = loop_meta_grads(model, *batch, 0.1, 0)
    assert_rel_close(got, want, 1e-12, "meta-grad")


@pytest.mark.parametrize("trace", ["1", "0"], ids=["traced", "untraced"])
def test_callable_loss_and_fallback_module(trace, monkeypatch):
    monkeypatch.setenv("FASTMETA_TRACE", trace)
    class Scale(nn.Module):  # no batched lowering: runs through the vmap fallback
        def __init__(self):
            super().__init__()
            self.s = nn.Parameter(torch.tensor([1.5, 0.5, 2.0], dtype=torch.float64))

        def forward(self, x):
            return x * self.s

    model = nn.Sequential(nn.Linear(2, 3), Scale(), nn.Tanh(), nn.Linear(3, 2)).to(torch.float64)
    huber = lambda p, y: torch.nn.functional.smooth_l1_loss(p, y)  # noqa: E731
    batch = regression_batch(3, 6, 5, 2, 2, torch.float64)
    meta = fastmeta.BatchedMAML(model, 0.2, 2, loss=huber)
    # (traced: its forward's code runs under vmap as a step; else the module as a whole)
    assert ("code(mul) under vmap" if trace == "1" else "vmap(Scale)") in fastmeta.explain(model)
    _, got, _ = meta_grads(meta, model, batch)
    _, want, _ = loop_meta_grads(model, *batch, 0.2, 2, huber)
    assert_rel_close(got, want, RTOL[torch.float64], "meta-grad")


@pytest.mark.parametrize("trace", ["1", "0"], ids=["traced", "untraced"])
def test_custom_module_whole_model_fallback(trace, monkeypatch):
    """A custom forward with a skip connection: traced, one graph step (its Linear layers batched,
    its code under vmap); untraced (FASTMETA_TRACE=0), the whole model through the vmap fallback."""
    monkeypatch.setenv("FASTMETA_TRACE", trace)
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(2, 8)
            self.b = nn.Linear(8, 1)

        def forward(self, x):
            return self.b(torch.sin(self.a(x))) + x[..., :1]

    model = Net().to(torch.float64)
    batch = regression_batch(3, 5, 5, 2, 1, torch.float64)
    meta = fastmeta.BatchedMAML(model, 0.1, 3)
    _, got, _ = meta_grads(meta, model, batch)
    _, want, _ = loop_meta_grads(model, *batch, 0.1, 3)
    assert_rel_close(got, want, RTOL[torch.float64], "meta-grad")
    if trace == "1":
        kinds = [s.kind for s in fastmeta.BatchedMAML(model, 0.1, 3, strict=True).program.steps]
        assert len(kinds) == 1 and kinds[0].startswith("graph(batched_linear x2, code(sin) under vmap"), kinds
    else:
        with pytest.raises(fastmeta.UnsupportedModule, match="custom forward"):
            fastmeta.BatchedMAML(model, 0.1, 3, strict=True)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("trace", ["1", "0"], ids=["traced", "untraced"])
def test_batch_norm_inside_the_vmap_fallback(first_order, trace, monkeypatch):
    """A custom module holding Conv2d -> BatchNorm2d (batch statistics) runs through the vmap
    fallback; its meta-gradient equals the loop's in both orders (torch.func's grad of a vmap gets the
    second order through BatchNorm wrong, benchmarks/RESULTS.md: the fallback vmaps the forward
    only and leaves the derivatives to autograd)."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 3, padding=1)
            self.bn = nn.BatchNorm2d(3, track_running_stats=False)

        def forward(self, x):
            return torch.tanh(self.bn(self.conv(x)))

    torch.manual_seed(0)
    model = nn.Sequential(Block(), nn.Flatten(), nn.Linear(3 * 5 * 5, 2)).to(torch.float64)
    with torch.no_grad():
        model[0].bn.weight.uniform_(0.5, 1.5)
        model[0].bn.bias.uniform_(-0.5, 0.5)
    g = torch.Generator().manual_seed(1)
    xs, xq = (torch.randn(3, n, 2, 5, 5, generator=g, dtype=torch.float64) for n in (4, 6))
    ys, yq = (torch.randn(3, n, 2, generator=g, dtype=torch.float64) for n in (4, 6))
    monkeypatch.setenv("FASTMETA_TRACE", trace)  # (traced: Block's modules are lowered one by one)
    meta = fastmeta.BatchedMAML(model, 0.3, 2, first_order=first_order)
    assert ("vmap(Block)" in fastmeta.explain(model)) == (trace == "0")
    _, got, _ = meta_grads(meta, model, (xs, ys, xq, yq))
    _, want, _ = loop_meta_grads(model, xs, ys, xq, yq, 0.3, 2, first_order=first_order)
    assert_rel_close(got, want, 1e-10, "meta-grad")


def test_frozen_and_unused_parameters():
    model = mlp((2, 9, 3))
    model[0].bias.requires_grad_(False)
    batch = regression_batch(2, 5, 5, 2, 3, torch.float64)
    meta = fastmeta.BatchedMAML(model, 0.1, 2)
    _, got, _ = meta_grads(meta, model, batch)
    _, want, _ = loop_meta_grads(model, *batch, 0.1, 2)
    assert_rel_close(got, want, RTOL[torch.float64], "meta-grad")
    P = meta.adapt(batch[0], batch[1])
    assert torch.equal(P["0.bias"][1], model[0].bias)  # frozen: not adapted


@pytest.mark.parametrize("backend", BACKENDS)
def test_adapt_and_predict_match_the_loss(backend):
    model = mlp((2, 11, 3), act=nn.ReLU)
    batch = regression_batch(3, 5, 4, 2, 3, torch.float64)
    with fastmeta.use_backend(backend):
        meta = fastmeta.BatchedMAML(model, 0.1, 3)
        P = meta.adapt(batch[0], batch[1])
        assert all(P[n].shape == (3, *p.shape) for n, p in model.named_parameters())
        pred = meta.predict(P, batch[2])
        per_task = ((pred - batch[3]) ** 2).flatten(1).mean(1)
        torch.testing.assert_close(per_task, meta.task_losses(*batch).detach(), rtol=1e-12, atol=1e-12)
        with torch.no_grad():  # evaluation: adapt still works, result carries no graph
            P2 = meta.adapt(batch[0], batch[1])
        assert not any(t.requires_grad for t in P2.values())
        torch.testing.assert_close(P2["0.weight"], P["0.weight"].detach())


def test_meta_training_reduces_loss():
    from fastmeta.harness import make_workload

    w = make_workload("sine", tasks=8, steps=2, dtype=torch.float64)
    meta = fastmeta.BatchedMAML(w.model, w.inner_lr, w.steps)
    opt = torch.optim.Adam(meta.parameters(), lr=1e-2)
    first = None
    for _ in range(40):
        opt.zero_grad()
        loss = meta(w.xs, w.ys, w.xq, w.yq)
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.7 * first


@pytest.mark.parametrize("backend", BACKENDS)
def test_repeated_calls_follow_attribute_changes(backend):
    """A second call with a batch of the same signature skips the checks (and on cpp takes the op
    directly); changes of inner_lr, inner_steps, first_order and of the parameters still count."""
    model = mlp((2, 13, 3), act=nn.ReLU, dtype=torch.float32)
    batch = regression_batch(19, 5, 4, 2, 3, torch.float32)
    with fastmeta.use_backend(backend):
        meta = fastmeta.BatchedMAML(model, 0.05, 2)
        for lr, steps, fo in [(0.05, 2, False), (0.05, 2, False), (0.1, 2, False), (0.1, 3, False),
                              (0.1, 3, True)]:
            meta.inner_lr, meta.inner_steps, meta.first_order = lr, steps, fo
            loss, got, _ = meta_grads(meta, model, batch)
            want_loss, want, _ = loop_meta_grads(model, *batch, lr, steps, "mse", fo)
            assert_rel_close([loss], [want_loss], RTOL[torch.float32], f"meta-loss {lr} {steps} {fo}")
            assert_rel_close(got, want, RTOL[torch.float32], f"meta-grad {lr} {steps} {fo}")
        assert (meta._direct is not None) == (backend == "cpp")
        with torch.no_grad():
            model[0].weight.mul_(1.5)
        model[2].weight = nn.Parameter(model[2].weight.detach() * 0.5)
        loss, got, _ = meta_grads(meta, model, batch)
        want_loss, want, _ = loop_meta_grads(model, *batch, 0.1, 3, "mse", True)
        assert_rel_close(got, want, RTOL[torch.float32], "meta-grad after the parameters changed")
        meta(*batch).backward()  # .backward() fills .grad with what autograd.grad returns
        assert_rel_close([p.grad for p in model.parameters()], want, RTOL[torch.float32], ".grad")


def _value_and_grad_vs_autograd(meta, batch, rtol):
    """value_and_grad against torch.autograd.grad of forward: same loss, one gradient per
    parameter of meta.parameters() (None where it does not require grad), not requiring grad."""
    params = list(meta.parameters())
    loss, grads = meta.value_and_grad(*batch)
    assert len(grads) == len(params)
    assert not loss.requires_grad and all(g is None or not g.requires_grad for g in grads)
    wanted = [p for p in params if p.requires_grad]
    want_loss = meta(*batch)
    want = torch.autograd.grad(want_loss, wanted, allow_unused=True, materialize_grads=True)
    assert [g is None for g in grads] == [not p.requires_grad for p in params]
    assert all(g.shape == p.shape for g, p in zip(grads, params) if g is not None)
    assert_rel_close([loss], [want_loss.detach()], rtol, "loss")
    assert_rel_close([g for g in grads if g is not None], list(want), rtol, "meta-grad")
    return loss, grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("case", ["mse", "cross_entropy", "meta_sgd", "frozen", "callable_loss", "tensor_lr"])
def test_value_and_grad_matches_autograd(backend, first_order, case):
    """value_and_grad gives forward's loss and the gradients autograd gives, on the fused op's
    fast path (mse, scalar lr), its other fused cases (cross-entropy, Meta-SGD's rates) and the
    unfused ones (a frozen parameter, a callable loss, a tensor inner_lr)."""
    dtype = torch.float64
    model = mlp((3, 37, 11, 4), act=nn.ReLU, dtype=dtype)
    batch = regression_batch(5, 6, 7, 3, 4, dtype)
    kw, lr = {}, 0.05
    if case == "cross_entropy":
        batch = classification_batch(5, 6, 7, 3, 4, dtype)
        kw["loss"] = "cross_entropy"
    elif case == "meta_sgd":
        kw["learn_inner_lr"] = True
    elif case == "frozen":
        model[2].bias.requires_grad_(False)
    elif case == "callable_loss":
        kw["loss"] = lambda pred, y: ((pred - y) ** 2).mean()
    elif case == "tensor_lr":
        lr = nn.Parameter(torch.tensor(0.05, dtype=dtype))
    with fastmeta.use_backend(backend):
        meta = fastmeta.BatchedMAML(model, lr, 3, first_order=first_order, **kw)
        for _ in range(2):  # the second call has the signature of the first (checks skipped)
            _value_and_grad_vs_autograd(meta, batch, RTOL[dtype])
        if backend == "cpp" and case == "mse":
            assert meta._direct_grad is not None  # the fast path ran
    if case == "meta_sgd":
        assert len(list(meta.parameters())) == 2 * len(list(model.parameters()))


@requires_cpp
def test_value_and_grad_follows_replaced_parameters():
    """value_and_grad's parameter walk sees a parameter replaced on its module, as parameters() does."""
    model = mlp((2, 13, 3), act=nn.ReLU, dtype=torch.float32)
    batch = regression_batch(19, 5, 4, 2, 3, torch.float32)
    meta = fastmeta.BatchedMAML(model, 0.05, 2)
    _value_and_grad_vs_autograd(meta, batch, RTOL[torch.float32])
    model[2].weight = nn.Parameter(model[2].weight.detach() * 0.5)
    _, grads = _value_and_grad_vs_autograd(meta, batch, RTOL[torch.float32])
    want_loss, want, _ = loop_meta_grads(model, *batch, 0.05, 2, "mse", False)
    assert_rel_close(grads, want, RTOL[torch.float32], "meta-grad vs the loop")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("first_order", [False, True])
def test_meta_sgd_repeated_calls_take_the_op_directly(backend, first_order):
    """Meta-SGD's rates (one a parameter entry) go to the fused op as they are: after the first
    call of a signature, forward and value_and_grad call it directly (cpp) with the rates in the
    parameters' order, and the loss, meta-gradients and rate gradients stay the per-task loop's
    when the rates are changed in place or replaced, and when a parameter is replaced."""
    model = mlp((2, 13, 7, 3), act=nn.Tanh, dtype=torch.float64)
    batch = regression_batch(5, 6, 4, 2, 3, torch.float64)
    gen = torch.Generator().manual_seed(1)
    with fastmeta.use_backend(backend):
        meta = fastmeta.BatchedMAML(model, 0.05, 2, first_order=first_order, learn_inner_lr=True)
        with torch.no_grad():  # distinct rates, so that a rate given to the wrong parameter shows
            for r in meta.lrs.values():
                r.uniform_(0.01, 0.1, generator=gen)

        def check(what):
            rates = {n: meta.lrs[meta._lr_key(n)] for n, _ in model.named_parameters()}
            want_loss, want, want_lr = loop_meta_grads(model, *batch, None, 2, "mse", first_order, lrs=rates)
            loss, grads = meta.value_and_grad(*batch)
            n = len(want)
            assert_rel_close([loss], [want_loss], RTOL[torch.float64], f"loss {what}")
            assert_rel_close(grads[:n], want, RTOL[torch.float64], f"meta-grad {what}")
            assert_rel_close(grads[n:], want_lr, RTOL[torch.float64], f"rate grads {what}")
            fwd = meta(*batch)
            got = torch.autograd.grad(fwd, list(meta.parameters()))
            assert_rel_close(list(got), want + want_lr, RTOL[torch.float64], f"forward's gradients {what}")

        check("first call")
        check("second call")
        assert (meta._direct_grad is not None) == (backend == "cpp")
        assert (meta._direct is not None) == (backend == "cpp")
        with torch.no_grad():
            meta.lrs[meta._lr_key("0.weight")].mul_(2.0)
        check("after a rate changed in place")
        meta.lrs[meta._lr_key("2.bias")] = nn.Parameter(torch.full((7,), 0.02, dtype=torch.float64))
        check("after a rate was replaced")
        model[4].weight = nn.Parameter(model[4].weight.detach() * 0.5)
        check("after a parameter was replaced")


@requires_cpp
@pytest.mark.parametrize("kind", [False, True, "per_layer_step"], ids=str)
def test_evaluation_runs_first_orders_pass(monkeypatch, kind):
    """Under no_grad a second-order module's fused calls want the loss alone: forward and
    task_losses run first order's pass (the same inner loop and query losses, no Hessian-vector
    products), giving grad mode's losses bit for bit on the CPU, detached."""
    model = mlp((2, 13, 3), act=nn.Tanh, dtype=torch.float32)
    batch = regression_batch(19, 5, 4, 2, 3, torch.float32)
    meta = fastmeta.BatchedMAML(model, 0.05, 3, learn_inner_lr=kind)
    seen = []
    for name in ("mlp_meta_loss", "mlp_inner_loop"):
        def spy(*a, _real=getattr(fastmeta.ops, name), _name=name, **k):
            seen.append((_name, a[10]))  # (first_order)
            return _real(*a, **k)
        monkeypatch.setattr(fastmeta.ops, name, spy)
    with fastmeta.use_backend("cpp"):
        want = meta(*batch).detach()
        want_tasks = meta.task_losses(*batch).detach()
        assert meta._last_fused and not meta.first_order
        if meta._direct_grad is not None:
            real = meta._direct_grad

            def direct(*a):
                seen.append(("direct", a[-1]))
                return real(*a)
            meta._direct_grad = direct
        if meta._direct_layer is not None:  # (the layer rates' call: no rate gradients either)
            real_layer = meta._direct_layer

            def layer(*a, rate_grads=True):
                seen.append(("layer", a[8] is True and rate_grads is False))
                return real_layer(*a, rate_grads=rate_grads)
            meta._direct_layer = layer
        seen.clear()
        with torch.no_grad():
            got = meta(*batch)
            got_tasks = meta.task_losses(*batch)
    assert seen and all(fo is True for _, fo in seen), seen
    assert not got.requires_grad and not got_tasks.requires_grad
    assert torch.equal(got, want) and torch.equal(got_tasks, want_tasks)


@requires_cpp
def test_cpu_bindings_and_when_they_are_not_taken():
    """On plain CPU tensors the repeated calls of value_and_grad and forward go to direct bindings
    of the kernel (no dispatcher), with the ops' results; under a dispatch mode or with a tensor
    subclass they go through fastmeta::mlp_meta_grad / ::mlp_meta_loss (which the mode sees), with
    the same results."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    class Sub(torch.Tensor):
        pass

    model = mlp((2, 13, 3), act=nn.ReLU, dtype=torch.float32)
    batch = regression_batch(19, 5, 4, 2, 3, torch.float32)
    meta = fastmeta.BatchedMAML(model, 0.05, 2, first_order=True)
    with fastmeta.use_backend("cpp"):
        meta.value_and_grad(*batch)
        loss, grads = meta.value_and_grad(*batch)  # checked: the binding
        want = torch.ops.fastmeta.mlp_meta_grad.default(*batch, [p.detach() for p in model.parameters()], [], 0.05,
                                                        2, [1, 0], 0.01, 0, True, False)
        assert torch.equal(loss, want[0])
        assert all(torch.equal(g, w) for g, w in zip(grads, want[1:]))
        assert len({g.data_ptr() for g in grads}) == len(grads)  # one tensor per parameter
        with Seen() as mode:
            loss2, grads2 = meta.value_and_grad(*batch)
        assert "fastmeta.mlp_meta_grad.default" in mode.ops
        assert torch.equal(loss2, loss) and all(torch.equal(a, b) for a, b in zip(grads2, grads))
        sub = [batch[0].as_subclass(Sub)] + list(batch[1:])
        loss3, _ = meta.value_and_grad(*sub)
        assert torch.equal(loss3.as_subclass(torch.Tensor), loss)
        # forward (loss + autograd) the same way: its binding, then the op under the mode
        params = list(model.parameters())
        fwd = meta(*batch)
        assert torch.equal(fwd.detach(), loss)
        assert all(torch.equal(g, w) for g, w in zip(torch.autograd.grad(fwd, params), grads))
        with Seen():
            fwd2 = meta(*batch)  # through the op (mlp_meta_loss decomposes above the mode's key)
        assert all(torch.equal(g, 2 * w) for g, w in zip(torch.autograd.grad(fwd2 * 2, params), grads))
    # the guard itself: plain tensors yes; a dispatch or torch function mode, a subclass no
    from torch.overrides import TorchFunctionMode
    from fastmeta.ops.mlp_inner_loop import _plain_call
    plain = list(model.parameters())
    assert _plain_call(*batch, plain)
    with Seen():
        assert not _plain_call(*batch, plain)
    with TorchFunctionMode():
        assert not _plain_call(*batch, plain)
    assert not _plain_call(batch[0].as_subclass(Sub), *batch[1:], plain)
    params = [p.detach() for p in model.parameters()]
    meta_xs = torch.empty(batch[0].shape, device="meta")
    for binding in (fastmeta._C._mlp_meta_grad_cpu_direct, fastmeta._C._mlp_meta_loss_cpu_direct):
        with pytest.raises(RuntimeError, match="xs must be a strided CPU tensor"):
            binding(meta_xs, *batch[1:], params, [], 0.05, 2, [1, 0], 0.01, 0, True)
        with pytest.raises(RuntimeError, match="every rate must be a strided CPU tensor"):
            binding(*batch, params, [torch.empty(p.shape, device="meta") for p in params], 0.0, 2, [1, 0], 0.01,
                    0, True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["mlp", "meta_sgd", "per_layer_step", "conv"])
def test_negated_views_are_their_values(backend, kind):
    """A batch of negated views (torch._neg_view: data -v, value v; a bit the dispatcher's fallback
    materializes before a kernel) gives the materialized batch's loss and meta-gradient, on every
    call: the checked first, the direct bindings and bound calls after it."""
    torch.manual_seed(0)
    if kind == "conv":
        model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2),
                              nn.Flatten(), nn.Linear(12, 2)).double()
        batch = (torch.randn(2, 3, 1, 4, 4, dtype=torch.float64), torch.randn(2, 3, 2, dtype=torch.float64),
                 torch.randn(2, 4, 1, 4, 4, dtype=torch.float64), torch.randn(2, 4, 2, dtype=torch.float64))
    else:
        model = mlp((2, 13, 3), act=nn.ReLU)
        batch = regression_batch(5, 6, 4, 2, 3, torch.float64)
    rates = {"meta_sgd": True, "per_layer_step": "per_layer_step"}.get(kind, False)
    meta = fastmeta.BatchedMAML(model, 0.05, 2, learn_inner_lr=rates)
    params = list(meta.parameters())
    neg = [torch._neg_view(-t) for t in batch]
    assert all(n.is_neg() and torch.equal(n, t) for n, t in zip(neg, batch))
    with fastmeta.use_backend(backend):
        want_loss, want = meta.value_and_grad(*batch)
        for _ in range(3):
            loss, grads = meta.value_and_grad(*neg)
            assert_rel_close([loss] + list(grads), [want_loss] + list(want), 1e-12, "value_and_grad")
        for _ in range(3):
            loss = meta(*neg)
            got = torch.autograd.grad(loss, params)
            assert_rel_close([loss.detach()] + list(got), [want_loss] + list(want), 1e-12, "forward")


def test_graphed_needs_a_batched_maml_and_cuda_tensors():
    model = mlp((2, 9, 3))
    batch = regression_batch(2, 5, 5, 2, 3, torch.float64)
    with pytest.raises(ValueError, match="CUDA graphs need CUDA tensors, xs is on cpu"):
        fastmeta.graphed(fastmeta.BatchedMAML(model, 0.1, 2), *batch)
    with pytest.raises(TypeError, match="BatchedMAML"):
        fastmeta.graphed(model, *batch)


def test_value_and_grad_bad_input_is_named():
    """value_and_grad checks the batch as forward does: the argument and its shape in the message."""
    meta = fastmeta.BatchedMAML(mlp((2, 9, 3)), 0.1, 2)
    xs, ys, xq, yq = regression_batch(3, 5, 4, 2, 3, torch.float64)
    with pytest.raises(ValueError, match=r"task dim T differs.*xq \(2, 4, 2\)"):
        meta.value_and_grad(xs, ys, xq[:2], yq[:2])
    with pytest.raises(TypeError, match="ys has dtype torch.float32"):
        meta.value_and_grad(xs, ys.float(), xq, yq)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_task_chunk_gives_the_same_meta_gradient(first_order, chunk):
    """task_chunk (memory for time): the meta-batch in chunks of tasks (the last one short), Meta-SGD
    rates included: forward + autograd.grad and value_and_grad equal the whole batch at once and the
    per-task loop; the chunked loss can be differentiated once, not twice."""
    model = conv_net(ch=3, classes=5)
    T = 5
    batch = (torch.randn(T, 4, 1, 16, 16, dtype=torch.float64), torch.randint(0, 5, (T, 4)),
             torch.randn(T, 3, 1, 16, 16, dtype=torch.float64), torch.randint(0, 5, (T, 3)))
    whole = fastmeta.BatchedMAML(model, 0.3, 2, first_order=first_order, loss="cross_entropy", learn_inner_lr=True)
    parts = fastmeta.BatchedMAML(model, 0.3, 2, first_order=first_order, loss="cross_entropy", learn_inner_lr=True,
                                 task_chunk=chunk)
    parts.lrs = whole.lrs
    want_loss, want, want_lr = meta_grads(whole, model, batch)
    got_loss, got, got_lr = meta_grads(parts, model, batch)
    assert_rel_close([got_loss], [want_loss], 1e-12, "loss")
    assert_rel_close(got + got_lr, want + want_lr, RTOL[torch.float64], "meta-grad")
    lrs = {n: whole.lrs[n.replace(".", "__")] for n, _ in model.named_parameters()}
    _, loop, _ = loop_meta_grads(model, *batch, None, 2, "cross_entropy", first_order, lrs=lrs)
    assert_rel_close(got, loop, RTOL[torch.float64], "meta-grad vs loop")
    vg_loss, vg = parts.value_and_grad(*batch)
    assert [id(p) for p in parts.parameters()] == [id(p) for p in whole.parameters()]
    want_all = torch.autograd.grad(whole(*batch), list(whole.parameters()))
    assert_rel_close([vg_loss] + vg, [want_loss, *want_all], RTOL[torch.float64], "value_and_grad")
    if chunk < T:
        loss = parts(*batch)
        (g,) = torch.autograd.grad(loss, [model[0].weight], create_graph=True)
        with pytest.raises(RuntimeError, match="twice|once_differentiable|does not require grad"):
            torch.autograd.grad(g.sum(), [model[0].weight])


def test_task_chunk_is_checked():
    for bad in (0, -1, 2.5, True, "2"):
        with pytest.raises(ValueError, match="task_chunk"):
            fastmeta.BatchedMAML(mlp((2, 9, 3)), 0.1, 2, task_chunk=bad)


def test_graphed_chunk_arithmetic():
    """What a chunked graphed step replays, run eagerly: value_and_grad of each chunk (the last one
    short) added with weight size / T gives the whole batch's loss and meta-gradient."""
    from fastmeta.graphs import accumulate, chunk_slices
    assert chunk_slices(5, None) == [(0, 5)] and chunk_slices(5, 5) == [(0, 5)] and chunk_slices(5, 8) == [(0, 5)]
    assert chunk_slices(5, 2) == [(0, 2), (2, 4), (4, 5)]
    model = conv_net(ch=3, classes=5)
    model[0].bias.requires_grad_(False)
    T = 5
    batch = (torch.randn(T, 4, 1, 16, 16, dtype=torch.float64), torch.randint(0, 5, (T, 4)),
             torch.randn(T, 3, 1, 16, 16, dtype=torch.float64), torch.randint(0, 5, (T, 3)))
    meta = fastmeta.BatchedMAML(model, 0.3, 1, loss="cross_entropy", learn_inner_lr=True)
    want_loss, want = meta.value_and_grad(*batch)
    loss = torch.zeros((), dtype=torch.float64)
    grads = [torch.zeros_like(p) if p.requires_grad else None for p in meta.parameters()]
    for start, stop in chunk_slices(T, 2):
        part_loss, part = meta.value_and_grad(*(t[start:stop] for t in batch))
        accumulate(loss, grads, part_loss, part, (stop - start) / T)
    assert grads[1] is None and want[1] is None
    keep = [i for i, g in enumerate(want) if g is not None]
    assert_rel_close([loss] + [grads[i] for i in keep], [want_loss] + [want[i] for i in keep],
                     RTOL[torch.float64], "chunked sum")


@pytest.mark.parametrize("backend", ["auto", pytest.param("cpp", marks=requires_cpp), "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_take_the_torch_ops(backend, dtype):
    """The kernels compute in float32 and float64; a bfloat16 or float16 model (MLP or conv) runs on
    the torch ops whatever the backend, with the torch backend's answer (it used to reach the fused
    MLP kernel and fail there with "not implemented for 'BFloat16'"), and so do MAML's update and
    inner_update called directly."""
    if backend == "triton":
        pytest.importorskip("triton")
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 1)).to(dtype)
    conv = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16, 2)).to(dtype)
    xs, ys = torch.randn(3, 5, 1, dtype=dtype), torch.randn(3, 5, 1, dtype=dtype)
    x, y = torch.randn(2, 3, 1, 4, 4, dtype=dtype), torch.randint(0, 2, (2, 3))
    for model, batch, loss in ((mlp, (xs, ys, xs, ys), "mse"), (conv, (x, y, x, y), "cross_entropy")):
        for first_order in (False, True):
            got = {}
            for b in (backend, "torch"):
                with fastmeta.use_backend(b):
                    meta = fastmeta.BatchedMAML(model, 0.1, 2, first_order=first_order, loss=loss)
                    value, grads = meta.value_and_grad(*batch)
                    by_autograd = torch.autograd.grad(meta(*batch), list(model.parameters()))
                got[b] = [value] + grads + list(by_autograd)
            for a, w in zip(got[backend], got["torch"]):
                assert a.dtype == dtype and torch.equal(a, w)
    with fastmeta.use_backend(backend):
        assert "step by step on the batched ops (the kernels compute in float32 and float64" in fastmeta.explain(mlp)
    learner = fastmeta.MAML(mlp, lr=0.1).clone()
    with fastmeta.use_backend(backend):
        learner.adapt(((learner(xs[0]) - ys[0]) ** 2).mean())
        updated = fastmeta.ops.inner_update(list(mlp.parameters()), [torch.ones_like(p) for p in mlp.parameters()], 0.5)
    assert all(p.dtype == dtype for p in learner.parameters())
    assert all(torch.equal(u, p - 0.5) for u, p in zip(updated, mlp.parameters()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_evaluation_under_inference_mode(backend):
    """torch.inference_mode (meta-test evaluation): forward, task_losses, value_and_grad, adapt and
    predict give what they give outside it (they ran autograd on inference tensors and failed),
    for an MLP (the fused kernel on cpp) and a conv net, with batches made inside or outside.
    Under torch.no_grad too, with no result requiring grad (the fused kernel's loss did, twice: the
    first call and the checked fast path)."""
    torch.manual_seed(0)
    images = (torch.randn(2, 3, 1, 16, 16, dtype=torch.float64), torch.randint(0, 5, (2, 3)),
              torch.randn(2, 4, 1, 16, 16, dtype=torch.float64), torch.randint(0, 5, (2, 4)))
    cases = ((mlp((1, 8, 1), act=nn.ReLU), regression_batch(3, 5, 4, 1, 1, torch.float64), "mse"),
             (conv_net(), images, "cross_entropy"))
    for model, batch, loss in cases:
        with fastmeta.use_backend(backend):
            meta = fastmeta.BatchedMAML(model, 0.1, 2, loss=loss)
            want = [meta(*batch).detach(), meta.task_losses(*batch).detach(), *meta.value_and_grad(*batch)[1],
                    meta.predict(meta.adapt(batch[0], batch[1]), batch[2]).detach()]
            for inside in (False, True):
                with torch.inference_mode():
                    b = tuple(t.clone() for t in batch) if inside else batch
                    got = [meta(*b), meta.task_losses(*b), *meta.value_and_grad(*b)[1],
                           meta.predict(meta.adapt(b[0], b[1]), b[2])]
                assert not any(t.requires_grad for t in got)
                assert_rel_close(got, want, 1e-12, "inference mode")
            fresh = fastmeta.BatchedMAML(model, 0.1, 2, loss=loss)
            for _ in range(2):
                with torch.no_grad():
                    got = [fresh(*batch), fresh.task_losses(*batch), fresh.predict(fresh.adapt(batch[0], batch[1]),
                                                                                     batch[2])]
                assert not any(t.requires_grad for t in got)
                assert_rel_close(got, [want[0], want[1], want[-1]], 1e-12, "no_grad")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("first_order", [False, True])
def test_a_module_used_twice(backend, first_order):
    """A layer applied twice in an nn.Sequential (tied weights): both applications run, with one
    parameter adapted once a step from the sum of both uses' gradients. (The program was built from
    named_children(), which lists such a module once: its second application was dropped and the
    loss and meta-gradient were silently wrong.) The oracle is the model written out by hand."""
    torch.manual_seed(0)
    shared = nn.Linear(6, 6).double()
    model = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), shared, nn.Tanh(), shared, nn.Linear(6, 1)).double()
    xs, ys, xq, yq = regression_batch(3, 5, 4, 2, 1, torch.float64)
    names = ["0.weight", "0.bias", "2.weight", "2.bias", "5.weight", "5.bias"]
    assert [n for n, _ in model.named_parameters()] == names

    def f(p, x):
        h = torch.tanh(x @ p[0].T + p[1])
        h = torch.tanh(h @ p[2].T + p[3])
        h = h @ p[2].T + p[3]
        return h @ p[4].T + p[5]

    params = list(model.parameters())
    total = 0.0
    for t in range(3):
        p = params
        for _ in range(2):
            g = torch.autograd.grad(((f(p, xs[t]) - ys[t]) ** 2).mean(), p, create_graph=not first_order)
            p = [a - 0.1 * b for a, b in zip(p, g)]
        total = total + ((f(p, xq[t]) - yq[t]) ** 2).mean() / 3
    want = torch.autograd.grad(total, params)
    with fastmeta.use_backend(backend):
        meta = fastmeta.BatchedMAML(model, 0.1, 2, first_order=first_order)
        value, got = meta.value_and_grad(xs, ys, xq, yq)
        assert "parameters are shared between layers" in fastmeta.explain(model)
    assert abs(value.item() - total.item()) <= 1e-12 * abs(total.item())
    assert_rel_close(got, list(want), RTOL[torch.float64], "meta-grad")


class _TwiceInside(nn.Module):
    """A custom forward (so the vmap fallback) over a module registered at two places."""

    def __init__(self):
        super().__init__()
        lin = nn.Linear(2, 2)
        self.body = nn.Sequential(lin, nn.Tanh(), lin)
        self.head = nn.Linear(2, 1)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))

    @staticmethod
    def by_hand(p, x):
        h = torch.tanh(x @ p["body.0.weight"].T + p["body.0.bias"])
        h = h @ p["body.0.weight"].T + p["body.0.bias"]
        return torch.tanh(h) @ p["head.weight"].T + p["head.bias"]


class _SharedWeight(nn.Module):
    """A custom forward over two modules that hold one Parameter (mid.weight is dec.weight)."""

    def __init__(self):
        super().__init__()
        self.enc, self.dec, self.mid, self.head = nn.Linear(2, 3), nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 1)
        self.mid.weight = self.dec.weight

    def forward(self, x):
        return self.head(torch.tanh(self.mid(torch.tanh(self.dec(torch.tanh(self.enc(x)))))))

    @staticmethod
    def by_hand(p, x):
        h = torch.tanh(x @ p["enc.weight"].T + p["enc.bias"])
        h = torch.tanh(h @ p["dec.weight"].T + p["dec.bias"])
        h = torch.tanh(h @ p["dec.weight"].T + p["mid.bias"])
        return h @ p["head.weight"].T + p["head.bias"]


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("make", [_TwiceInside, _SharedWeight], ids=["module-twice", "shared-parameter"])
@pytest.mark.parametrize("trace", ["1", "0"], ids=["traced", "untraced"])
def test_tied_weights_through_the_vmap_fallback(make, first_order, trace, monkeypatch):
    """Tied weights inside a model that runs through torch.func's vmap: a module registered at two
    places raised (functional_call got one value per path, two tensors under vmap), and
    functional_call given one path per parameter left a tensor of the call in the model in place of
    its Parameter. The loss and meta-gradient now equal the model written out by hand, and the
    model keeps its Parameters; the loop oracle of these tests runs the model the same way."""
    torch.manual_seed(0)
    model = make().double()
    before = {n: p for n, p in model.named_parameters(remove_duplicate=False)}
    xs, ys, xq, yq = regression_batch(3, 5, 4, 2, 1, torch.float64)
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    total = 0.0
    for t in range(3):
        p = dict(zip(names, params))
        for _ in range(2):
            g = torch.autograd.grad(((make.by_hand(p, xs[t]) - ys[t]) ** 2).mean(), list(p.values()),
                                    create_graph=not first_order)
            p = {n: a - 0.1 * b for (n, a), b in zip(p.items(), g)}
        total = total + ((make.by_hand(p, xq[t]) - yq[t]) ** 2).mean() / 3
    want = torch.autograd.grad(total, params)

    def intact(where):
        now = dict(model.named_parameters(remove_duplicate=False))
        assert now.keys() == before.keys(), where
        for n, p in before.items():
            assert now[n] is p, f"{where}: {n} is no longer the model's Parameter"

    oracle = loop_meta_grads(model, xs, ys, xq, yq, 0.1, 2, first_order=first_order)
    intact("after the loop oracle")
    assert abs(oracle[0].item() - total.item()) <= 1e-12 * abs(total.item())
    assert_rel_close(oracle[1], list(want), RTOL[torch.float64], "loop oracle")
    monkeypatch.setenv("FASTMETA_TRACE", trace)
    meta = fastmeta.BatchedMAML(model, 0.1, 2, first_order=first_order)
    assert bool(meta.program.fallbacks) == (trace == "0")  # (traced: the modules lowered one by one)
    for call in range(2):  # the second call skips the checks
        loss = meta(xs, ys, xq, yq)
        intact(f"after call {call}")
        got = torch.autograd.grad(loss, params)
        assert abs(loss.item() - total.item()) <= 1e-12 * abs(total.item())
        assert_rel_close(list(got), list(want), RTOL[torch.float64], "meta-grad")
    value, got = meta.value_and_grad(xs, ys, xq, yq)
    intact("after value_and_grad")
    assert_rel_close(list(got), list(want), RTOL[torch.float64], "value_and_grad")


class _Doubled(nn.Linear):
    def forward(self, x):
        return 2.0 * super().forward(x)


def _hooked(where):
    model = mlp((2, 8, 1), act=nn.Tanh)
    target = model if where == "model" else model[0]
    target.register_forward_hook(lambda mod, inputs, out: out * 3.0 + 0.5)
    return model


def _pre_hooked():
    model = mlp((2, 8, 1), act=nn.Tanh)
    model[1].register_forward_pre_hook(lambda mod, inputs: (inputs[0] * 0.5,))  # on the activation
    return model


def _weight_norm():
    model = mlp((2, 8, 1), act=nn.Tanh)
    nn.utils.parametrizations.weight_norm(model[0])
    return model


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case,reason", [
    (lambda: nn.Sequential(_Doubled(2, 8), nn.Tanh(), nn.Linear(8, 1)).double(), "overrides Linear.forward"),
    (lambda: _hooked("layer"), "Linear has forward hooks"),
    (lambda: _hooked("model"), "Sequential has forward hooks"),
    (_pre_hooked, "Tanh has forward hooks"),
    (_weight_norm, "has parametrizations"),
], ids=["subclass", "layer-hook", "model-hook", "pre-hook", "weight-norm"])
def test_modules_whose_call_is_not_their_class_forward(backend, case, reason, monkeypatch):
    """A subclass with its own forward, a module (or the Sequential) with forward hooks, a weight
    computed by a parametrization: lowered as the base class they ran another function than the
    model's (the hooks and the subclass's forward were ignored, a parametrized weight raised a
    KeyError); they now run through the vmap fallback, as their own calls would, and equal the
    per-task loop. explain and strict lowering say why."""
    if reason.startswith("overrides"):  # (traced by default: tests/test_traced_forward.py)
        monkeypatch.setenv("FASTMETA_TRACE", "0")
    torch.manual_seed(0)
    model = case()
    batch = regression_batch(3, 5, 4, 2, 1, torch.float64)
    _, want, _ = loop_meta_grads(model, *batch, 0.1, 2, "mse", False)
    with fastmeta.use_backend(backend):
        _, got = fastmeta.BatchedMAML(model, 0.1, 2).value_and_grad(*batch)
    assert_rel_close(got, want, RTOL[torch.float64], "meta-grad")
    assert reason in fastmeta.explain(model)
    with pytest.raises(fastmeta.UnsupportedModule, match=reason):
        fastmeta.BatchedMAML(model, 0.1, 2, strict=True)


def test_a_new_batched_maml_sees_hooks_registered_since_the_last():
    """The planner's cache keys on the model's structure, hooks and module classes included: a
    BatchedMAML built after a hook is registered (or a parametrization) runs it, though the model
    was lowered before without it."""
    torch.manual_seed(0)
    model = mlp((2, 8, 1), act=nn.Tanh)
    batch = regression_batch(3, 5, 4, 2, 1, torch.float64)
    fastmeta.BatchedMAML(model, 0.1, 2).value_and_grad(*batch)
    model[0].register_forward_hook(lambda mod, inputs, out: out * 3.0)
    _, want, _ = loop_meta_grads(model, *batch, 0.1, 2, "mse", False)
    _, got = fastmeta.BatchedMAML(model, 0.1, 2).value_and_grad(*batch)
    assert_rel_close(got, want, RTOL[torch.float64], "meta-grad after a hook")
    nn.utils.parametrizations.weight_norm(model[2])
    assert "has parametrizations" in fastmeta.explain(model)


@pytest.mark.parametrize("model_kind", ["mlp", "conv"])
def test_copies_and_pickles_run_their_own_modules(model_kind):
    """copy.deepcopy and torch.save / torch.load of a BatchedMAML: the copy runs its own model's
    modules. Before, the copy kept the original's program, whose steps read the original modules:
    the copy switched to eval() still normalized with batch statistics, its running statistics
    went to the original's buffers, and torch.save failed on the program's local functions."""
    import copy
    import io
    torch.manual_seed(0)
    if model_kind == "mlp":
        model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 3)).double()
        xs, xq = torch.randn(3, 5, 2, dtype=torch.float64), torch.randn(3, 6, 2, dtype=torch.float64)
    else:
        model = conv_net(ch=2, classes=3, track=True)
        xs, xq = torch.randn(3, 5, 1, 16, 16, dtype=torch.float64), torch.randn(3, 6, 1, 16, 16, dtype=torch.float64)
    ys, yq = torch.randint(0, 3, (3, 5)), torch.randint(0, 3, (3, 6))
    meta = fastmeta.BatchedMAML(model, 0.1, 2, loss="cross_entropy", learn_inner_lr=True)
    want_loss, want = meta.value_and_grad(xs, ys, xq, yq)
    buf = io.BytesIO()
    torch.save(meta, buf)
    buf.seek(0)
    for other in (copy.deepcopy(meta), torch.load(buf, weights_only=False)):
        loss, grads = other.value_and_grad(xs, ys, xq, yq)
        torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=0)
        for a, b in zip(grads, want):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
        if model_kind == "conv":
            before = [b.clone() for b in model.buffers()]
            other.model.eval()  # the copy's BatchNorm now uses its running statistics, the original's not
            fresh = fastmeta.BatchedMAML(other.model, 0.1, 2, loss="cross_entropy", learn_inner_lr=True)
            fresh.load_state_dict(other.state_dict())
            torch.testing.assert_close(other(xs, ys, xq, yq), fresh(xs, ys, xq, yq), rtol=1e-12, atol=0)
            other.model.train()
            other(xs, ys, xq, yq)
            assert all(torch.equal(a, b) for a, b in zip(model.buffers(), before))


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpp", marks=requires_cpp)])
@pytest.mark.parametrize("model_kind", ["mlp", "conv"])
def test_parameters_frozen_after_construction_are_not_adapted(backend, model_kind):
    """requires_grad is read again at each call: a body frozen after the BatchedMAML was built (ANIL)
    is no longer adapted in the inner loop, as in a module built after the freezing; unfrozen, it is
    adapted again. Before, the set adapted was the one at construction (a silently other loss)."""
    torch.manual_seed(0)
    if model_kind == "mlp":
        model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 3)).double()
        xs, xq = torch.randn(3, 5, 2, dtype=torch.float64), torch.randn(3, 6, 2, dtype=torch.float64)
        body = model[0]
    else:
        model = conv_net(ch=2, classes=3)
        xs, xq = torch.randn(3, 5, 1, 16, 16, dtype=torch.float64), torch.randn(3, 6, 1, 16, 16, dtype=torch.float64)
        body = model[0]
    ys, yq = torch.randint(0, 3, (3, 5)), torch.randint(0, 3, (3, 6))
    batch = (xs, ys, xq, yq)
    with fastmeta.use_backend(backend):
        meta = fastmeta.BatchedMAML(model, 0.5, 2, loss="cross_entropy")
        before = meta.value_and_grad(*batch)
        body.requires_grad_(False)
        got_loss, got = meta.value_and_grad(*batch)
        want_loss, want = fastmeta.BatchedMAML(model, 0.5, 2, loss="cross_entropy").value_and_grad(*batch)
        torch.testing.assert_close(got_loss, want_loss, rtol=1e-12, atol=0)
        torch.testing.assert_close(meta(*batch), want_loss, rtol=1e-12, atol=0)
        assert [g is None for g in got] == [g is None for g in want] == [not p.requires_grad for p in model.parameters()]
        for a, b in zip(got, want):
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
        body.requires_grad_(True)
        again_loss, again = meta.value_and_grad(*batch)
        torch.testing.assert_close(again_loss, before[0], rtol=1e-12, atol=0)
    body.requires_grad_(False)
    sgd = fastmeta.BatchedMAML(model, 0.5, 1, loss="cross_entropy", learn_inner_lr=True)
    sgd(*batch)
    body.requires_grad_(True)  # (no learned rate was made for it)
    with pytest.raises(ValueError, match="no learned rate"):
        sgd(*batch)
    body.requires_grad_(True)


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpp", marks=requires_cpp)])
def test_structure_changed_after_construction_is_read_again(backend):
    """A module replaced (a new head), a forward hook or a parametrization added after the
    BatchedMAML was built and called: its next call runs the model as it is now, as a new
    BatchedMAML does, and value_and_grad's gradients are the new parameters'. Before, the old program
    and the old parameter walk ran on (the fused path with the replaced head's weights: a silently
    other loss, and gradients for parameters the model no longer has)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    xs, xq = torch.randn(3, 5, 2, dtype=torch.float64), torch.randn(3, 6, 2, dtype=torch.float64)
    batch = (xs, torch.randint(0, 3, (3, 5)), xq, torch.randint(0, 3, (3, 6)))
    with fastmeta.use_backend(backend):
        meta = fastmeta.BatchedMAML(model, 0.5, 2, loss="cross_entropy")
        for _ in range(2):  # (the second call takes the checked fast path)
            meta.value_and_grad(*batch)
            meta(*batch)

        def check(what):
            fresh = fastmeta.BatchedMAML(model, 0.5, 2, loss="cross_entropy")
            want_loss, want = fresh.value_and_grad(*batch)
            for call in range(2):
                loss, grads = meta.value_and_grad(*batch)
                torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=0, msg=what)
                torch.testing.assert_close(meta(*batch), want_loss, rtol=1e-12, atol=0, msg=what)
                assert len(grads) == len(list(meta.parameters()))
                for a, b in zip(grads, want):
                    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=what)

        model[2] = nn.Linear(8, 3).double()
        check("a new head")
        model[1].register_forward_hook(lambda mod, inputs, out: out * 2.0)
        check("a forward hook")
        nn.utils.parametrizations.weight_norm(model[0])
        check("a parametrization")


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpp", marks=requires_cpp)])
def test_hooks_removed_global_and_backward(backend):
    """A forward hook removed after a call: the next call lowers the model again (the module
    leaves the vmap path; before, removing a handle went unseen). A global module forward hook
    runs as in the loop (every module through vmap while one is registered). A module backward
    hook, which the loop runs in each inner step's gradient and which neither the batched ops nor
    vmap run, raises instead of giving the loop-without-hooks' answer; so does a global one."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    batch = (torch.randn(3, 5, 2, dtype=torch.float64), torch.randint(0, 3, (3, 5)),
             torch.randn(3, 6, 2, dtype=torch.float64), torch.randint(0, 3, (3, 6)))

    def check(meta, what):
        want_loss, want, _ = loop_meta_grads(model, *batch, 0.5, 2, "cross_entropy")
        loss, grads = meta.value_and_grad(*batch)
        torch.testing.assert_close(loss, want_loss, rtol=1e-10, atol=0, msg=what)
        assert_rel_close(grads, want, 1e-9, what)

    with fastmeta.use_backend(backend):
        meta = fastmeta.BatchedMAML(model, 0.5, 2, loss="cross_entropy")
        handle = model[1].register_forward_hook(lambda mod, inputs, out: out * 2.0)
        check(meta, "a forward hook")
        assert meta.program.fallbacks
        handle.remove()
        check(meta, "the hook removed")
        assert not meta.program.fallbacks

        scale = torch.nn.modules.module.register_module_forward_hook(
            lambda mod, inputs, out: out * 1.5 if isinstance(mod, nn.Linear) else None)
        try:
            check(meta, "a global forward hook")
            assert "global module hooks" in fastmeta.explain(model)
        finally:
            scale.remove()
        check(meta, "the global hook removed")
        assert not meta.program.fallbacks

        handle = model[2].register_full_backward_hook(lambda mod, gin, gout: (gin[0] * 3.0,))
        with pytest.raises(TypeError, match=r"module\(s\) \['2'\] of Sequential have backward hooks"):
            meta.value_and_grad(*batch)
        with pytest.raises(TypeError, match="backward hooks"):
            fastmeta.BatchedMAML(model, 0.5, 2, loss="cross_entropy")
        text = fastmeta.explain(model)  # says why instead of raising
        assert "BatchedMAML raises UnsupportedModule" in text and "['2'] of Sequential" in text, text
        handle.remove()
        check(meta, "the backward hook removed")
        hook = torch.nn.modules.module.register_module_full_backward_hook(lambda mod, gin, gout: None)
        try:
            with pytest.raises(TypeError, match="global module backward hooks"):
                meta(*batch)
        finally:
            hook.remove()
        check(meta, "the global backward hook removed")


def test_dropout_is_lowered():
    """nn.Dropout runs as a batched op, not through vmap: in eval mode (identity) and at p=0 the
    meta-gradient is the loop's, and an MLP with one runs the fused MLP op there (not while it
    drops; train() / eval() switch between the two at the next call); in training mode each task
    draws its own mask (one draw over all tasks), scaled by 1/(1-p); checkpoint_steps' recomputed
    steps draw the masks of their first run, so its meta-gradient equals the plain step's under
    the same seed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3)).double()
    batch = (torch.randn(3, 4, 2, dtype=torch.float64), torch.randint(0, 3, (3, 4)),
             torch.randn(3, 5, 2, dtype=torch.float64), torch.randint(0, 3, (3, 5)))
    assert "-> dropout" in fastmeta.explain(model)
    meta = fastmeta.BatchedMAML(model, 0.5, 2, loss="cross_entropy")
    assert not meta.program.fallbacks and meta.program.random
    fused_ok = has_cpp()  # the fused MLP op runs where no Dropout drops (cpp backend on the CPU)
    for what in ("eval", "p=0", "training", "eval again"):
        if what.startswith("eval"):
            model.eval()
        else:
            model.train()
            model[2].p = 0.0 if what == "p=0" else 0.3
        drops = what == "training"
        with patch.object(fastmeta.ops, "mlp_meta_grad", wraps=fastmeta.ops.mlp_meta_grad) as spy:
            for call in range(2):  # the second call, of a checked signature, takes the fast path
                torch.manual_seed(1)
                loss, grads = meta.value_and_grad(*batch)
                if drops:
                    continue
                want_loss, want, _ = loop_meta_grads(model, *batch, 0.5, 2, "cross_entropy")
                torch.testing.assert_close(loss, want_loss, rtol=1e-10, atol=0, msg=what)
                assert_rel_close(grads, want, 1e-9, what)
        assert meta._last_fused == (fused_ok and not drops), what
        assert (spy.call_count > 0) == (fused_ok and not drops), what
    if fused_ok:
        text = fastmeta.explain(model)
        assert "fused mlp_inner_loop" in text and "while a Dropout drops" in text, text
    model.train()  # masks drawn: one seed, one meta-gradient; another seed, another
    torch.manual_seed(1)
    first = meta.value_and_grad(*batch)[1]
    torch.manual_seed(1)
    assert_rel_close(meta.value_and_grad(*batch)[1], first, 1e-12, "same seed")
    torch.manual_seed(2)
    assert not torch.allclose(meta.value_and_grad(*batch)[1][0], first[0])

    model.train()
    model[2].p = 0.5
    hidden = torch.rand(4, 50, 16, dtype=torch.float64) + 0.5
    with torch.no_grad():
        dropped = fastmeta.BatchedMAML(nn.Sequential(model[2]), 0.5, 0).predict({}, hidden)
    kept = dropped != 0
    torch.testing.assert_close(dropped[kept], 2 * hidden[kept])
    assert 0.4 < float(kept.double().mean()) < 0.6
    assert not torch.equal(kept[0], kept[1])  # each task its own mask

    model[2].p = 0.3
    results = []
    for checkpoint_steps in (False, True):
        m = fastmeta.BatchedMAML(model, 0.5, 2, loss="cross_entropy", checkpoint_steps=checkpoint_steps)
        torch.manual_seed(5)
        loss = m(*batch)
        results.append([loss.detach()] + list(torch.autograd.grad(loss, list(model.parameters()))))
    assert_rel_close(results[1], results[0], 1e-12, "checkpoint_steps with dropout")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_autocast_runs_in_the_model_dtype(backend, kind):
    """Under torch.autocast every call computes in the model's dtype, as outside it: the fused
    kernels compute in float32 whatever autocast asks, and on the torch backend a conv net raised
    (autocast's bfloat16 activations met the float32 meta-parameters in batched_conv2d). The
    caller's autocast is back on after each call."""
    torch.manual_seed(0)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(4, 7), nn.ReLU(), nn.Linear(7, 3))
        shape = (4,)
    else:
        model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3, track_running_stats=False), nn.ReLU(),
                              nn.MaxPool2d(2), nn.Flatten(), nn.Linear(3 * 16, 3))
        shape = (2, 8, 8)
    batch = (torch.randn(3, 5, *shape), torch.randint(0, 3, (3, 5)), torch.randn(3, 6, *shape),
             torch.randint(0, 3, (3, 6)))
    params = list(model.parameters())

    def run(meta, autocast):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):  # the forward passes
            loss = meta(*batch)
            value, grads = meta.value_and_grad(*batch)
            pred = meta.predict(meta.adapt(batch[0], batch[1]), batch[2])
            assert torch.is_autocast_enabled("cpu") == autocast
        # (the backward outside autocast, as PyTorch's AMP recipe has it)
        return [loss.detach()] + list(torch.autograd.grad(loss, params)) + [value] + list(grads) + [pred.detach()]

    with fastmeta.use_backend(backend):
        meta = fastmeta.BatchedMAML(model, 0.1, 2, loss="cross_entropy")
        want, got = run(meta, False), run(meta, True)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype == torch.float32
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kw", [{}, {"checkpoint_steps": True}, {"task_chunk": 2}], ids=["plain", "ck", "chunk"])
def test_a_fully_frozen_model(kw):
    """No parameter requires grad: with inner steps, every call raises a ValueError that says why
    (a raw "inputs argument to grad() cannot be empty" before); with inner_steps=0 the loss is
    the query loss of the model as it is, and value_and_grad gives no gradients."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 7), nn.ReLU(), nn.Linear(7, 3)).requires_grad_(False)
    xs, ys, xq, yq = classification_batch(3, 5, 6, 4, 3, torch.float32)
    meta = fastmeta.BatchedMAML(model, 0.1, 2, loss="cross_entropy", **kw)
    for call in (lambda: meta(xs, ys, xq, yq), lambda: meta.value_and_grad(xs, ys, xq, yq),
                 lambda: meta.adapt(xs, ys)):
        with pytest.raises(ValueError, match="no parameter of the model requires grad"):
            call()
    want = torch.stack([torch.nn.functional.cross_entropy(model(xq[t]), yq[t]) for t in range(3)]).mean()
    meta = fastmeta.BatchedMAML(model, 0.1, 0, loss="cross_entropy", **kw)
    torch.testing.assert_close(meta(xs, ys, xq, yq), want)
    value, grads = meta.value_and_grad(xs, ys, xq, yq)
    torch.testing.assert_close(value, want)
    assert grads == [None] * 4


@requires_cpp
@pytest.mark.parametrize("first_order", [False, True])
def test_few_tasks_of_a_wide_mlp_take_the_batched_ops_on_auto(first_order):
    """On the CPU the fused kernel pays for a whole group of SIMD lanes (tasks): one task of a
    384-wide MLP with 25 rows a pass runs the batched torch ops under auto (several times faster
    there, benchmarks/RESULTS.md), the kernel where cpp is asked for, both with the loop's
    meta-gradient. A small MLP, or a full group of tasks, keeps the kernel; fastmeta.tune times
    the kernel as cpp and finds torch the same kernels as auto."""
    from fastmeta.ops.mlp_inner_loop import cpu_kernel_slower, cpu_lanes
    lanes = cpu_lanes(torch.float32)
    assert lanes in (8, 16) and cpu_lanes(torch.float64) == lanes // 2
    wide = (32, 384, 384, 5)
    assert cpu_kernel_slower(1, 25, 25, wide, 5, first_order, torch.float32)
    assert cpu_kernel_slower(1, 25, 25, wide, 5, first_order, torch.float64)
    assert not cpu_kernel_slower(lanes, 25, 25, wide, 5, first_order, torch.float32)  # a full group
    assert not cpu_kernel_slower(lanes + 1, 25, 25, wide, 5, first_order, torch.float32)
    assert not cpu_kernel_slower(1, 10, 10, (1, 40, 40, 1), 5, first_order, torch.float32)  # the sine MLP
    assert not cpu_kernel_slower(1, 25, 25, (32, 64, 64, 5), 5, first_order, torch.float32)

    torch.manual_seed(0)
    model = mlp(wide, nn.ReLU, torch.float32)
    batch = classification_batch(1, 25, 25, 32, 5, torch.float32)
    meta = fastmeta.BatchedMAML(model, 0.1, 2, first_order=first_order, loss="cross_entropy")
    assert "fills a small part of its" in fastmeta.explain(model)
    _, want, _ = loop_meta_grads(model, *batch, 0.1, 2, "cross_entropy", first_order)
    for backend, fused in (("auto", False), ("cpp", True), ("torch", False)):
        with fastmeta.use_backend(backend):
            _, got = meta.value_and_grad(*batch)
        assert meta._last_fused is fused, backend
        assert_rel_close(got, list(want), RTOL[torch.float32], backend)
    meta.backend = "cpp"  # a module's own request keeps the kernel too
    meta(*batch)
    assert meta._last_fused is True
    meta.backend = None
    small = fastmeta.BatchedMAML(mlp((32, 64, 64, 5), nn.ReLU, torch.float32), 0.1, 2, first_order=first_order,
                                 loss="cross_entropy")
    small.value_and_grad(*batch)
    assert small._last_fused is True

    # a setting assigned between two calls on one batch reaches the choice: a T where the orders'
    # choices differ (the ops' fixed cost per pass weighs more in first order)
    mid = (32, 256, 256, 5)
    T = next(t for t in range(1, lanes + 1) if cpu_kernel_slower(t, 25, 25, mid, 2, False, torch.float32)
             != cpu_kernel_slower(t, 25, 25, mid, 2, True, torch.float32))
    other = fastmeta.BatchedMAML(mlp(mid, nn.ReLU, torch.float32), 0.1, 2, first_order=first_order,
                                 loss="cross_entropy")
    pair = classification_batch(T, 25, 25, 32, 5, torch.float32)
    for fo in (first_order, not first_order):
        other.first_order = fo
        other.value_and_grad(*pair)
        assert other._last_fused is not cpu_kernel_slower(T, 25, 25, mid, 2, fo, torch.float32), (T, fo)

    result = fastmeta.tune(meta, *batch, backends=["auto", "cpp", "torch"], reps=1, warmup=0, per_op=False)
    notes = {name: (ms, note) for name, ms, note in result.rows}
    assert notes["auto"][1] == "torch ops only" and notes["cpp"][0] is not None
    assert notes["torch"][1] == "runs the same kernels as 'auto'"


@pytest.mark.parametrize("backend", ["torch"] + (["cpp"] if has_cpp() else []))
def test_mlp_after_a_flatten_runs_the_fused_kernel(backend):
    """An MLP on images (nn.Flatten first, or x.view(x.size(0), -1) or x.view(-1, D) in a forward)
    takes the fused MLP kernel, its inputs flattened before it (the program's Flatten is then the
    identity): before, 'Flatten is not part of an MLP' sent it to the batched ops, and x.view(-1,
    D) ran as code. x.view(-1, D) of a sequence's tokens (a task's [N, L, D] as N * L rows) too. forward, value_and_grad,
    task_losses, adapt / predict and reptile_grad against the loop and the batched ops, Meta-SGD
    too."""
    from fastmeta import plan

    class Viewed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(16, 12), nn.Linear(12, 3)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x.view(x.size(0), -1))))

    class Rows(nn.Module):  # x.view(-1, D): a sample's values (an image), or a sequence's tokens
        def __init__(self, width):
            super().__init__()
            self.width, self.a, self.b = width, nn.Linear(width, 12), nn.Linear(12, 3)

        def forward(self, x):
            return self.b(F.relu(self.a(x.view(-1, self.width))))

    g = torch.Generator().manual_seed(0)
    images = (torch.randn(3, 4, 1, 4, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (3, 4), generator=g),
              torch.randn(3, 5, 1, 4, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (3, 5), generator=g))
    tokens = (torch.randn(3, 4, 2, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (3, 8), generator=g),
              torch.randn(3, 5, 2, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (3, 10), generator=g))
    torch.manual_seed(0)
    for model, batch in ((nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3)).double(), images),
                         (Viewed().double(), images), (Rows(16).double(), images), (Rows(8).double(), tokens)):
        assert plan.lower(model).mlp is not None and plan.lower(model).mlp.flatten_input
        for meta_sgd in (False, True):
            meta = fastmeta.BatchedMAML(model, 0.3, 2, loss="cross_entropy", learn_inner_lr=meta_sgd, backend=backend)
            ops = fastmeta.BatchedMAML(model, 0.3, 2, loss="cross_entropy", learn_inner_lr=meta_sgd, backend="torch")
            ops.load_state_dict(meta.state_dict())
            loss, grads = meta.value_and_grad(*batch)
            assert meta._last_fused == (backend == "cpp")  # (the fused kernel ran)
            want_loss, want = ops.value_and_grad(*batch)
            assert abs(loss.item() - want_loss.item()) < 1e-12
            assert_grads_close(grads, want)
            torch.testing.assert_close(meta.task_losses(*batch), ops.task_losses(*batch), rtol=1e-12, atol=1e-12)
            assert_grads_close(torch.autograd.grad(meta(*batch), list(meta.parameters())), want)
            P, Q = meta.adapt(*batch[:2]), ops.adapt(*batch[:2])
            torch.testing.assert_close(meta.predict(P, batch[2]), ops.predict(Q, batch[2]), rtol=1e-12, atol=1e-12)
            assert_grads_close(meta.reptile_grad(*batch[:2])[1], ops.reptile_grad(*batch[:2])[1])
        want_loss, want, _ = loop_meta_grads(model, *batch, 0.3, 2, "cross_entropy")
        meta = fastmeta.BatchedMAML(model, 0.3, 2, loss="cross_entropy", backend=backend)
        loss, grads = meta.value_and_grad(*batch)
        assert abs(loss.item() - want_loss.item()) < 1e-12
        assert_grads_close(grads, want)
