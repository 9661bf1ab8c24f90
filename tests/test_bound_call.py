"""The bindings of BatchedMAML.value_and_grad's and forward's CPU kernel calls
(csrc/bound_call.cpp): made by a checked call, taken by the next calls that see the same module,
model, parameters and batch shapes, and refused (the checked path runs and binds again) after any
change of them, or where a mode, a transform, a profiler or another backend is in effect."""
import copy
import gc
import io
import weakref

import pytest
import torch
from torch import nn

import fastmeta
from fastmeta.batched import _BOUND_KEY, BatchedMAML
from conftest import assert_rel_close, loop_meta_grads, requires_cpp

pytestmark = requires_cpp
RTOL = 1e-10


def mlp(widths=(2, 13, 3), act=nn.ReLU):
    layers = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(act())
    return nn.Sequential(*layers).double()


def batch_of(T=5, K=4, Q=3, din=2, dout=3):
    return (torch.randn(T, K, din, dtype=torch.float64), torch.randn(T, K, dout, dtype=torch.float64),
            torch.randn(T, Q, din, dtype=torch.float64), torch.randn(T, Q, dout, dtype=torch.float64))


METHODS = ["value_and_grad", "forward"]


@pytest.fixture
def checked_calls(monkeypatch):
    """The number of value_and_grad and forward calls that took the checked path (the binding
    refused or absent)."""
    count, depth = [0], [0]
    for name in ("_value_and_grad", "_forward"):
        def counted(self, *args, _inner=getattr(BatchedMAML, name)):
            count[0] += depth[0] == 0  # (value_and_grad's generic path calls forward: one call)
            depth[0] += 1
            try:
                return _inner(self, *args)
            finally:
                depth[0] -= 1
        monkeypatch.setattr(BatchedMAML, name, counted)
    return count


def step(meta, batch, method="value_and_grad"):
    """(loss, grads) by value_and_grad, or by forward and torch.autograd.grad (None where a
    parameter does not require grad)."""
    if method == "value_and_grad":
        return meta.value_and_grad(*batch)
    loss = meta(*batch)
    params = list(meta.parameters())
    wanted = [p for p in params if p.requires_grad]
    grads = iter(torch.autograd.grad(loss, wanted))
    return loss.detach(), [next(grads) if p.requires_grad else None for p in params]


def assert_matches_loop(meta, model, batch, what, method="value_and_grad"):
    loss, grads = step(meta, batch, method)
    want_loss, want, _ = loop_meta_grads(model, *batch, meta.inner_lr, meta.inner_steps, "mse", meta.first_order)
    got = [g for g, p in zip(grads, model.parameters()) if p.requires_grad]
    assert all(g is None for g, p in zip(grads, model.parameters()) if not p.requires_grad), what
    assert_rel_close([loss], [want_loss], RTOL, f"{what}: meta-loss")
    assert_rel_close(got, want, RTOL, f"{what}: meta-gradient")
    return loss, grads


def bound_module(batch, model=None, method="value_and_grad", **kw):
    model = mlp() if model is None else model
    meta = fastmeta.BatchedMAML(model, 0.1, 2, **kw)
    for _ in range(2):  # the first call checks, the second is checked and binds
        step(meta, batch, method)
    assert method in meta.__dict__.get(_BOUND_KEY, {}), "a checked CPU kernel call makes a binding"
    return meta, model


def binding(meta, method="value_and_grad"):
    return meta.__dict__[_BOUND_KEY][method][0]


@pytest.mark.parametrize("method", METHODS)
def test_binding_is_taken_with_the_kernels_results(method, checked_calls):
    batch = batch_of()
    meta, model = bound_module(batch, method=method)
    before = checked_calls[0]
    loss, grads = assert_matches_loop(meta, model, batch, "bound call", method)
    loss2, grads2 = step(meta, batch, method)
    assert checked_calls[0] == before, "the bound calls skip the checked path"
    assert isinstance(grads, list) and len(grads) == len(list(meta.parameters()))
    assert loss.dim() == 0 and not loss.requires_grad and not any(g.requires_grad for g in grads)
    assert torch.equal(loss, loss2) and all(torch.equal(a, b) for a, b in zip(grads, grads2))
    want = torch.ops.fastmeta.mlp_meta_grad.default(*batch, [p.detach() for p in model.parameters()], [], 0.1, 2,
                                                    [1, 0], 0.01, 0, False, False)
    assert torch.equal(loss, want[0]) and all(torch.equal(g, w) for g, w in zip(grads, want[1:]))
    if method == "forward":  # the loss with its C++ autograd node; a second backward through it refuses
        out = meta(*batch)
        assert out.requires_grad and out.grad_fn is not None
        with pytest.raises(RuntimeError, match="differentiable once only"):
            torch.autograd.grad(out, list(meta.parameters()), create_graph=True)
        assert checked_calls[0] == before
    other = batch_of()  # new tensors of the same shapes: still bound
    assert_matches_loop(meta, model, other, "another batch of the same shapes", method)
    strided = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in other]  # (not contiguous)
    assert not strided[0].is_contiguous()
    assert_matches_loop(meta, model, strided, "the same shapes, other strides", method)
    assert checked_calls[0] == before


def test_both_bindings_together(checked_calls):
    """value_and_grad and forward alternating on one module each keep their binding."""
    batch = batch_of()
    meta, model = bound_module(batch)
    for _ in range(2):  # (forward's first calls add its parameter walk to the module: value_and_grad binds again)
        for method in ("forward", "forward", "value_and_grad"):
            step(meta, batch, method)
    before = checked_calls[0]
    for i in range(3):
        for method in METHODS:
            assert_matches_loop(meta, model, batch, f"{method} {i}", method)
    assert checked_calls[0] == before


def _swap_last_layer(meta, model, batch):
    model[2] = nn.Linear(13, 3).double()


def _resize_first_layer(meta, model, batch):
    with torch.no_grad():
        model[0].weight.data = torch.randn(20, 2, dtype=torch.float64) / 2
        model[0].bias.data = torch.randn(20, dtype=torch.float64) / 10
        model[2].weight.data = torch.randn(3, 20, dtype=torch.float64) / 5


CHANGES = {
    "inner_lr": lambda meta, model, batch: setattr(meta, "inner_lr", 0.25),
    "inner_steps": lambda meta, model, batch: setattr(meta, "inner_steps", 3),
    "first_order": lambda meta, model, batch: setattr(meta, "first_order", True),
    "parameter replaced": lambda meta, model, batch: setattr(model[2], "weight",
                                                             nn.Parameter(model[2].weight.detach() * 0.5)),
    "parameter data resized": _resize_first_layer,
    "requires_grad off": lambda meta, model, batch: model[0].bias.requires_grad_(False),
    "module swapped": _swap_last_layer,
    "forward hook": lambda meta, model, batch: model[0].register_forward_hook(lambda m, i, o: 2 * o),
    "support size": lambda meta, model, batch: batch.__setitem__(slice(0, 2), batch_of(K=6)[:2]),
    "task count": lambda meta, model, batch: batch.__setitem__(slice(0, 4), batch_of(T=2)),
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("change", list(CHANGES))
def test_binding_follows_changes(change, method, checked_calls):
    """After each change the checked path runs (the binding refuses) with the right results, and
    where the fused kernel still applies a new binding is made and taken."""
    batch = list(batch_of())
    meta, model = bound_module(batch, method=method)
    CHANGES[change](meta, model, batch)
    before = checked_calls[0]
    assert_matches_loop(meta, model, batch, f"after {change}", method)
    assert checked_calls[0] == before + 1, "the binding refuses the changed call"
    assert_matches_loop(meta, model, batch, f"after {change}, call 2", method)  # (checked: binds)
    before = checked_calls[0]
    assert_matches_loop(meta, model, batch, f"after {change}, call 3", method)
    # (a hook takes the model off the fused kernel; a frozen parameter off its direct call)
    if change not in ("forward hook", "requires_grad off"):
        assert checked_calls[0] == before, "bound again"


@pytest.mark.parametrize("method", METHODS)
def test_binding_is_not_taken_under_another_backend_or_a_profiler(method, checked_calls):
    batch = batch_of()
    meta, model = bound_module(batch, method=method)
    before = checked_calls[0]
    with fastmeta.use_backend("torch"):
        assert_matches_loop(meta, model, batch, "torch backend", method)
    assert checked_calls[0] == before + 1
    with torch.profiler.profile() as prof:
        step(meta, batch, method)
    assert any("fastmeta.fused_inner_loop" in e.name for e in prof.events()), "the phase is recorded"
    assert checked_calls[0] == before + 2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert_matches_loop(meta, model, batch, "under autocast (off for the call)", method)
    assert checked_calls[0] == before + 3
    with torch.inference_mode():
        loss = meta.value_and_grad(*batch)[0] if method == "value_and_grad" else meta(*batch)
    assert not loss.is_inference() and not loss.requires_grad
    step(meta, batch, method)
    assert checked_calls[0] == before + 4, "taken again once nothing is in effect"
    if method == "forward":  # without grad mode: the loss alone (first order's pass), no binding taken
        with torch.no_grad():
            loss = meta(*batch)
        assert loss.grad_fn is None and checked_calls[0] == before + 5
        assert torch.allclose(loss, step(meta, batch, method)[0], rtol=1e-12)
        assert checked_calls[0] == before + 5


def test_binding_refuses_modes_transforms_and_other_tensors():
    """The binding itself: None under a dispatch or torch function mode, inference mode, a functorch
    transform (whose wrapped tensors have the bound shapes), for a subclass, a batch that requires
    grad or of another dtype or shape."""
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    class Sub(torch.Tensor):
        pass

    batch = batch_of()
    meta, _ = bound_module(batch)
    d = meta.__dict__
    call = binding(meta)
    assert call(d, *batch) is not None
    with Mode():
        assert call(d, *batch) is None
    with TorchFunctionMode():
        assert call(d, *batch) is None
    with torch.inference_mode():
        assert call(d, *batch) is None
    seen = []

    def probe(xs):
        seen.append(call(d, xs, *batch[1:]))
        return xs.sum()
    torch.func.vmap(probe)(torch.stack([batch[0], batch[0]]))
    assert seen == [None]
    leaked = []  # a transform's wrapper kept past it: no transform in effect, a wrapper tensor still

    def leak(xs):
        leaked.append(xs)
        return xs.sum()
    torch.func.vmap(leak)(torch.stack([batch[0], batch[0]]))
    assert call(d, leaked[0], *batch[1:]) is None
    xs, ys, xq, yq = batch
    for args in ([xs.as_subclass(Sub), ys, xq, yq], [xs, ys, xq.requires_grad_(True), yq],
                 [xs.float(), ys, xq.detach(), yq], [xs[:, :2], ys[:, :2], xq.detach(), yq], [xs, ys, xq.detach()]):
        if len(args) < 4:
            with pytest.raises(TypeError):
                call(d, *args)
        else:
            assert call(d, *args) is None
    assert call({}, xs, ys, xq.detach(), yq) is None, "another module's dict"
    assert call(d, xs, ys, xq.detach(), yq) is not None
    for _ in range(2):
        meta(xs, ys, xq.detach(), yq)
    loss_call = binding(meta, "forward")
    assert loss_call(d, xs, ys, xq.detach(), yq).grad_fn is not None
    with torch.no_grad():
        assert loss_call(d, xs, ys, xq.detach(), yq) is None, "forward without grad mode takes another path"


def test_bound_module_copies_pickles_and_is_freed():
    batch = batch_of()
    meta, model = bound_module(batch)
    bound_module(batch, model=None)  # (another module)
    for _ in range(2):
        meta(*batch)
    assert set(meta.__dict__[_BOUND_KEY]) == {"value_and_grad", "forward"}
    want = meta.value_and_grad(*batch)
    twin = copy.deepcopy(meta)
    assert twin.__dict__.get(_BOUND_KEY) is None
    for _ in range(3):
        got = twin.value_and_grad(*batch)
        assert torch.equal(got[0], want[0]) and all(torch.equal(a, b) for a, b in zip(got[1], want[1]))
    buf = io.BytesIO()
    torch.save(meta, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert torch.equal(loaded.value_and_grad(*batch)[0], want[0])
    del twin, loaded
    refs = [weakref.ref(meta), weakref.ref(model)]  # (the model: held in the module's __dict__)
    gc.disable()
    try:
        del meta, model
        assert [r() for r in refs] == [None, None], \
            "the binding makes no reference cycle: the module and its model are freed at once"
    finally:
        gc.enable()


def assert_meta_sgd_matches_loop(meta, model, batch, what, method):
    """(loss, grads) of meta (learned rates: learn_inner_lr=True, 'per_layer' or 'per_layer_step',
    step_loss_weights) against the loop with its rates: the model's parameters' and the rates'
    gradients (None for one that does not require grad)."""
    loss, grads = step(meta, batch, method)
    names = [n for n, _ in model.named_parameters()]
    rates = {n: meta.lrs[n.replace(".", "__")].detach().clone().requires_grad_() for n in names}
    want_loss, want, want_lr = loop_meta_grads(model, *batch, None, meta.inner_steps, "mse", meta.first_order,
                                               lrs=rates, per_step=meta._lr_kind == "per_layer_step",
                                               step_weights=meta.step_loss_weights)
    params = list(meta.parameters())
    assert len(grads) == len(params) == 2 * len(names)
    got = [g for g, p in zip(grads, params) if p.requires_grad]
    wanted = [w for w, p in zip(list(want) + list(want_lr), params) if p.requires_grad]
    assert all(g is None for g, p in zip(grads, params) if not p.requires_grad), what
    assert_rel_close([loss], [want_loss], RTOL, f"{what}: meta-loss")
    assert_rel_close(got, wanted, RTOL, f"{what}: meta-gradient and rate gradients")


@pytest.mark.parametrize("method", METHODS)
def test_meta_sgd_binding(method, checked_calls):
    """Meta-SGD's rates (learn_inner_lr=True) bound with the parameters: rates changed in place
    are read, a rate swapped or frozen refuses the binding."""
    batch = batch_of()
    model = mlp()
    meta = fastmeta.BatchedMAML(model, 0.1, 2, learn_inner_lr=True)
    for _ in range(2):
        step(meta, batch, method)
    assert method in meta.__dict__.get(_BOUND_KEY, {})
    before = checked_calls[0]
    assert_meta_sgd_matches_loop(meta, model, batch, "bound", method)
    with torch.no_grad():  # (an optimizer's step: in place)
        meta.lrs["0__weight"].mul_(1.5)
        model[0].weight.add_(0.1)
    assert_meta_sgd_matches_loop(meta, model, batch, "rates and weights changed in place", method)
    assert checked_calls[0] == before
    meta.lrs["2__bias"] = nn.Parameter(torch.full_like(model[2].bias, 0.3))
    assert_meta_sgd_matches_loop(meta, model, batch, "a rate swapped", method)
    assert checked_calls[0] == before + 1
    assert_meta_sgd_matches_loop(meta, model, batch, "a rate swapped, call 2", method)
    before = checked_calls[0]
    assert_meta_sgd_matches_loop(meta, model, batch, "a rate swapped, call 3", method)
    assert checked_calls[0] == before, "bound again"
    meta.lrs["0__bias"].requires_grad_(False)
    assert_meta_sgd_matches_loop(meta, model, batch, "a rate frozen", method)
    assert checked_calls[0] == before + 1


@pytest.mark.parametrize("kind, weights", [("per_layer", None), ("per_layer_step", None),
                                           ("per_layer_step", (0.2, 0.3, 0.5))])
def test_layer_rates_binding(kind, weights, checked_calls):
    """value_and_grad with MAML++'s rates (one a layer tensor, or a tensor and step, with the
    multi-step loss) bound: rates changed in place are read; a setting or a frozen rate refuses."""
    batch = batch_of()
    model = mlp()
    meta = fastmeta.BatchedMAML(model, 0.1, 3, learn_inner_lr=kind, step_loss_weights=weights)
    for _ in range(2):
        step(meta, batch)
    assert "value_and_grad" in meta.__dict__.get(_BOUND_KEY, {})
    before = checked_calls[0]
    assert_meta_sgd_matches_loop(meta, model, batch, "bound", "value_and_grad")
    with torch.no_grad():
        meta.lrs["2__weight"].mul_(0.5)
    assert_meta_sgd_matches_loop(meta, model, batch, "a rate changed in place", "value_and_grad")
    assert checked_calls[0] == before
    meta.first_order = True
    assert_meta_sgd_matches_loop(meta, model, batch, "first order", "value_and_grad")
    assert checked_calls[0] == before + 1
    meta.lrs["0__weight"].requires_grad_(False)
    assert_meta_sgd_matches_loop(meta, model, batch, "a rate frozen", "value_and_grad")
    assert checked_calls[0] == before + 2
