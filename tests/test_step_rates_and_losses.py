"""MAML++'s inner-loop settings in BatchedMAML (Antoniou et al. 2019): learned rates per parameter
tensor (learn_inner_lr='per_layer') and per parameter tensor and inner step ('per_layer_step',
LSLR), and the multi-step loss (step_loss_weights: the query losses after every inner step,
weighted). Checked against a per-task loop (float64, 1e-10) on every path: the batched ops on each
backend, the fused MLP kernel where it runs, checkpoint_steps, task_chunk, recompute, inner_params;
the BatchNorm running statistics as the loop's passes update them; the errors."""
import copy
import importlib
import pickle

import pytest
import torch
from torch import nn

import fastmeta
from conftest import assert_grads_close, conv2_net, counted_steps, has_cpp, loop_meta_grads

BACKENDS = ["torch"] + (["cpp"] if has_cpp() else [])
KINDS = [False, True, "per_layer", "per_layer_step"]


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 7), nn.Tanh(), nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 2)).double()


def _mlp_batch(T=3):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(T, 4, 3, generator=g, dtype=torch.float64), torch.randn(T, 4, 2, generator=g, dtype=torch.float64),
            torch.randn(T, 5, 3, generator=g, dtype=torch.float64), torch.randn(T, 5, 2, generator=g, dtype=torch.float64))


_conv = conv2_net


def _conv_batch(T=3):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(T, 5, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (T, 5), generator=g),
            torch.randn(T, 6, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (T, 6), generator=g))


def _spread_rates(meta):
    """Learned rates that differ from entry to entry and step to step (0.02 .. 0.2)."""
    if meta.lrs is not None:
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for r in meta.lrs.values():
                r.copy_(0.02 + 0.18 * torch.rand(r.shape, generator=g, dtype=r.dtype))


def _check(model, batch, loss, steps, kind, weights, first_order, backend, inner_params=None, **settings):
    meta = fastmeta.BatchedMAML(model, 0.1, steps, first_order=first_order, loss=loss, learn_inner_lr=kind,
                                step_loss_weights=weights, inner_params=inner_params, **settings)
    _spread_rates(meta)
    with fastmeta.use_backend(backend):
        value, grads = meta.value_and_grad(*batch)
        again = meta(*batch)
        grads2 = torch.autograd.grad(again, list(meta.parameters()))
        value3, grads3 = meta.value_and_grad(*batch)  # (a checked signature: the direct calls)
    names = meta._adapt_names
    lrs = {n: meta.lrs[meta._lr_key(n)] for n in names} if meta.lrs is not None else None
    want_loss, want, want_lr = loop_meta_grads(model, *batch, 0.1, steps, loss=loss, first_order=first_order,
                                               lrs=lrs, adapted=set(names), per_step=kind == "per_layer_step",
                                               step_weights=weights)
    want = list(want) + (list(want_lr) if lrs is not None else [])
    torch.testing.assert_close(value, want_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(again.detach(), want_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(value3, want_loss, rtol=1e-12, atol=1e-12)
    assert_grads_close(grads, want)
    assert_grads_close(grads2, want)
    assert_grads_close(grads3, want)
    return meta


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
@pytest.mark.parametrize("kind", KINDS, ids=str)
@pytest.mark.parametrize("settings", [{}, {"checkpoint_steps": True}, {"task_chunk": 2}],
                         ids=["plain", "checkpoint_steps", "task_chunk"])
def test_mlp_rates_and_step_losses_against_the_loop(backend, first_order, kind, settings):
    model, batch = _mlp(), _mlp_batch()
    for weights in (None, [0.2, 0.0, 0.8], (0.1, 0.3, 0.6)):
        meta = _check(model, batch, "mse", 3, kind, weights, first_order, backend, **settings)
        # the fused kernel (which keeps no graph: task_chunk is not needed there) runs every kind of
        # rate and the multi-step loss on the cpp backend
        assert meta._last_fused == (backend == "cpp")
    # a step of weight 0 is not evaluated; weights (0, .., 0, 1) are MAML's loss
    _check(model, batch, "mse", 3, kind, [0.0, 0.0, 1.0], first_order, backend, **settings)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
@pytest.mark.parametrize("settings", [{}, {"recompute": True}, {"checkpoint_steps": True}, {"task_chunk": 2}],
                         ids=["plain", "recompute", "checkpoint_steps", "task_chunk"])
@pytest.mark.parametrize("chunk", ["", "1"], ids=["cpu_default", "a_task_at_a_time"])
def test_conv_maml_plus_plus_against_the_loop(backend, first_order, settings, chunk, monkeypatch):
    """The conv4 shape of MAML++: per-layer per-step rates and the multi-step loss, all parameters
    adapted, or the head only (its body once a call on each set); the CPU's passes of these small
    inputs all tasks at once, or a task at a time."""
    monkeypatch.setenv("FASTMETA_CPU_TASK_CHUNK", chunk)
    model, batch = _conv(), _conv_batch()
    _check(model, batch, "cross_entropy", 3, "per_layer_step", [0.2, 0.3, 0.5], first_order, backend, **settings)
    _check(model, batch, "cross_entropy", 3, "per_layer", [0.5, 0.0, 0.5], first_order, backend, inner_params="9",
           **settings)
    _check(model, batch, "cross_entropy", 2, True, [0.25, 0.75], first_order, backend, inner_params=["4", "9"],
           **settings)


@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
@pytest.mark.parametrize("settings", [{}, {"checkpoint_steps": True}, {"task_chunk": 2}],
                         ids=["plain", "checkpoint_steps", "task_chunk"])
@pytest.mark.parametrize("head_only", [False, True], ids=["all", "head"])
def test_running_statistics_with_step_losses_as_the_loop_updates_them(first_order, settings, head_only):
    """With the multi-step loss the loop's passes of a task interleave: the support set at step s,
    the query after it, the support set at step s + 1 ... BatchNorm running statistics (momentum
    and cumulative average) are updated in that order, also where a body is made once a call on
    each set and where checkpoint_steps makes the support passes first."""
    model = _conv(track=True)
    model[5].momentum = None  # a cumulative average
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.fill_(0.3)
                m.running_var.fill_(2.0)
    ref = copy.deepcopy(model)
    batch = _conv_batch()
    weights = [0.2, 0.0, 0.3, 0.5]
    inner = "9" if head_only else None
    meta = fastmeta.BatchedMAML(model, 0.1, 4, first_order=first_order, loss="cross_entropy",
                                learn_inner_lr="per_layer_step", step_loss_weights=weights, inner_params=inner,
                                **settings)
    loss = meta(*batch)
    names = meta._adapt_names
    lrs = {n: meta.lrs[meta._lr_key(n)] for n in names}
    want, _, _ = loop_meta_grads(ref, *batch, 0.1, 4, loss="cross_entropy", first_order=first_order, lrs=lrs,
                                 adapted=set(names), per_step=True, step_weights=weights)
    torch.testing.assert_close(loss.detach(), want, rtol=1e-12, atol=1e-12)
    for (name, a), (_, b) in zip(model.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")


def test_the_body_runs_once_on_each_set_for_all_the_step_losses(monkeypatch):
    """ANIL with the multi-step loss: the body before the adapted head runs once on the support set
    and once on the query set a call, the head once a step on each."""
    monkeypatch.setenv("FASTMETA_CPU_TASK_CHUNK", "1")
    model, batch = _conv(), _conv_batch()
    with counted_steps(model) as calls:
        meta = fastmeta.BatchedMAML(model, 0.3, 4, loss="cross_entropy", inner_params="9",
                                    step_loss_weights=[0.1, 0.2, 0.3, 0.4])
        with fastmeta.use_backend("torch"):
            meta(*batch).backward()
        chunks = 3  # (FASTMETA_CPU_TASK_CHUNK=1: a task at a time)
        assert calls[0] == calls[4] == 2 * chunks
        assert calls[5] == (4 + 4) * chunks  # 4 support steps, 4 query losses


@pytest.mark.skipif(not has_cpp(), reason="fastmeta._C not built")
@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
def test_per_layer_rates_run_on_the_fused_kernel(first_order):
    """One rate a parameter tensor goes to the fused MLP kernel as its per-entry rates; the rates'
    gradients come back summed to their own shape (value_and_grad straight from the kernel)."""
    model, batch = _mlp(), _mlp_batch()
    meta = _check(model, batch, "mse", 3, "per_layer", None, first_order, "cpp")
    assert meta._last_fused
    assert meta._direct_layer is not None  # (the rates expanded and summed back in fastmeta._C)
    assert all(r.shape == () for r in meta.lrs.values())
    assert "one a parameter tensor" in fastmeta.explain(meta)


@pytest.mark.skipif(not has_cpp(), reason="fastmeta._C not built")
@pytest.mark.parametrize("kind, shape", [("per_layer", (1,)), ("per_layer_step", ()), ("per_layer_step", (1,))],
                         ids=["per_layer-[1]", "per_layer_step-[]", "per_layer_step-[1]"])
def test_a_rate_replaced_by_one_of_another_shape_raises(kind, shape):
    """value_and_grad's direct call (the rates expanded in fastmeta._C) checks each rate's shape
    against its kind on every call: a rate replaced after a checked call raises, naming it."""
    model, batch = _mlp(), _mlp_batch()
    meta = fastmeta.BatchedMAML(model, 0.1, 2, learn_inner_lr=kind)
    with fastmeta.use_backend("cpp"):
        meta.value_and_grad(*batch)
        meta.value_and_grad(*batch)
        assert meta._direct_layer is not None
        meta.lrs[meta._lr_key("2.weight")] = nn.Parameter(torch.full(shape, 0.1, dtype=torch.float64))
        want = r"rates\[2\] \[1\] must be \[\] \(one rate a tensor\)" if kind == "per_layer" else \
            rf"rates\[2\] \[{shape[0] if shape else ''}\] must be \[S\] with S >= steps=2"
        with pytest.raises(RuntimeError, match=want):
            meta.value_and_grad(*batch)


@pytest.mark.skipif(not has_cpp(), reason="fastmeta._C not built")
@pytest.mark.parametrize("kind", ["per_layer", "per_layer_step", True], ids=str)
@pytest.mark.parametrize("weights", [None, [0.3, 0.7]], ids=["last", "weighted"])
def test_direct_calls_with_rates_as_autograd_and_value_and_grad_see_them(kind, weights):
    """The checked calls with learned rates (fastmeta._C's direct calls): forward's loss scales its
    gradients by the incoming one, refuses a second derivative as the fused op does, comes back
    detached under no_grad; a rate frozen after the first calls gets no gradient from
    value_and_grad (None) and the others stay the loop's."""
    model, batch = _mlp(), _mlp_batch()
    meta = fastmeta.BatchedMAML(model, 0.1, 2, learn_inner_lr=kind, step_loss_weights=weights)
    _spread_rates(meta)
    names = meta._adapt_names
    with fastmeta.use_backend("cpp"):
        meta.value_and_grad(*batch)
        meta.value_and_grad(*batch)
        assert (meta._direct_layer is not None) == (kind != True)  # noqa: E712
        assert (meta._direct_grad is not None) == (kind == True and weights is None)  # noqa: E712
        lrs = {n: meta.lrs[meta._lr_key(n)] for n in names}
        want_loss, want, want_lr = loop_meta_grads(model, *batch, 0.1, 2, lrs=lrs, per_step=kind == "per_layer_step",
                                                   step_weights=weights)
        params = list(meta.parameters())
        loss = meta(*batch)
        torch.testing.assert_close(loss.detach(), want_loss, rtol=1e-12, atol=1e-12)
        assert_grads_close(torch.autograd.grad(3.0 * loss, params), [3.0 * g for g in list(want) + list(want_lr)])
        with pytest.raises(RuntimeError, match="differentiable once only"):
            g = torch.autograd.grad(meta(*batch), params, create_graph=True)
            torch.autograd.grad(sum(x.sum() for x in g), params)
        with torch.no_grad():
            quiet = meta(*batch)
        assert not quiet.requires_grad
        torch.testing.assert_close(quiet, want_loss, rtol=1e-12, atol=1e-12)
        frozen = meta.lrs[meta._lr_key(names[1])]
        frozen.requires_grad_(False)
        value, grads = meta.value_and_grad(*batch)
        assert [g is None for g in grads] == [p is frozen for p in params]
        every = list(want) + list(want_lr)
        assert_grads_close([g for g in grads if g is not None], [w for p, w in zip(params, every) if p is not frozen])
        meta(*batch).backward()
        assert frozen.grad is None
        assert_grads_close([p.grad for p in params if p is not frozen], [w for p, w in zip(params, every)
                                                                          if p is not frozen])


def test_step_weights_can_change_between_calls():
    """step_loss_weights may be set at any call (MAML++ anneals them): the loss follows, on the
    fused kernel where it runs, and None gives back MAML's loss."""
    model, batch = _mlp(), _mlp_batch()
    meta = fastmeta.BatchedMAML(model, 0.1, 3)
    plain = meta(*batch).detach()
    for epoch in (0, 3, 10):
        meta.step_loss_weights = fastmeta.step_loss_schedule(3, epoch, 10)
        want, _, _ = loop_meta_grads(model, *batch, 0.1, 3, step_weights=meta.step_loss_weights)
        torch.testing.assert_close(meta(*batch).detach(), want, rtol=1e-12, atol=1e-12)
        assert meta._last_fused == has_cpp()
    meta.step_loss_weights = torch.tensor([0.0, 0.0, 1.0])
    assert meta.step_loss_weights == (0.0, 0.0, 1.0)
    torch.testing.assert_close(meta(*batch).detach(), plain, rtol=1e-12, atol=1e-12)
    meta.step_loss_weights = None
    torch.testing.assert_close(meta(*batch).detach(), plain, rtol=0, atol=0)
    assert meta._last_fused == has_cpp()


def test_evaluation_and_adapt_with_step_rates():
    """Under no_grad / inference_mode the weighted loss comes back detached, equal to grad mode's;
    adapt() takes each step's learned rates."""
    model, batch = _mlp(), _mlp_batch()
    meta = fastmeta.BatchedMAML(model, 0.1, 2, learn_inner_lr="per_layer_step", step_loss_weights=[0.4, 0.6])
    _spread_rates(meta)
    want = meta(*batch).detach()
    with torch.no_grad():
        got = meta(*batch)
    assert not got.requires_grad
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    with torch.inference_mode():
        torch.testing.assert_close(meta(*batch), want, rtol=1e-12, atol=1e-12)
    xs, ys = batch[:2]
    P = meta.adapt(xs, ys)
    named = dict(model.named_parameters())
    theta = {n: p.unsqueeze(0).expand(xs.shape[0], *p.shape) for n, p in named.items()}
    for step in range(2):
        loss = torch.nn.functional.mse_loss(torch.func.vmap(
            lambda p, x: torch.func.functional_call(model, p, (x,)))(theta, xs), ys, reduction="none")
        g = torch.autograd.grad(loss.mean((1, 2)).sum(), list(theta.values()), create_graph=True)
        theta = {n: t - meta.lrs[meta._lr_key(n)][step] * d for (n, t), d in zip(theta.items(), g)}
    for n in named:
        torch.testing.assert_close(P[n], theta[n], rtol=1e-12, atol=1e-12)


def test_copies_pickles_repr_and_explain():
    model, batch = _conv(), _conv_batch()
    meta = fastmeta.BatchedMAML(model, 0.1, 2, loss="cross_entropy", learn_inner_lr="per_layer_step",
                                step_loss_weights=[0.3, 0.7], inner_params="9")
    _spread_rates(meta)
    want = meta(*batch).detach()
    for other in (copy.deepcopy(meta), pickle.loads(pickle.dumps(meta))):
        assert other.step_loss_weights == (0.3, 0.7) and other._lr_kind == "per_layer_step"
        torch.testing.assert_close(other(*batch).detach(), want, rtol=0, atol=0)
    text = repr(meta)
    assert "learned per_layer_step" in text and "step_loss_weights=[0.3, 0.7]" in text
    text = fastmeta.explain(meta)
    assert "one a parameter tensor and inner step" in text
    assert "weighted by step_loss_weights [0.3, 0.7]" in text
    assert "once on the query set for all the step losses" in text
    mlp = fastmeta.BatchedMAML(_mlp(), 0.1, 2, learn_inner_lr="per_layer_step", step_loss_weights=[0.3, 0.7])
    if has_cpp():
        assert "fused mlp_inner_loop op (backend cpp)" in fastmeta.explain(mlp)
        assert "with each step's rates, the multi-step loss" in fastmeta.explain(mlp)
    with fastmeta.use_backend({"mlp_inner_loop": "torch"}):
        assert "step by step on the batched ops (backend torch)" in fastmeta.explain(mlp)
    # the rate shapes: per entry, one, one a step
    shapes = {k: fastmeta.BatchedMAML(_mlp(), 0.1, 4, learn_inner_lr=k).lrs["0__weight"].shape
              for k in (True, "per_layer", "per_layer_step")}
    assert shapes == {True: (7, 3), "per_layer": (), "per_layer_step": (4,)}


def test_step_loss_schedule():
    S = 5
    assert fastmeta.step_loss_schedule(S, 0, 10) == pytest.approx([0.2] * 5)
    w = fastmeta.step_loss_schedule(S, 5, 10)
    assert w == pytest.approx([0.1] * 4 + [0.6])
    for epoch in (0, 1, 2.5, 10, 50):
        w = fastmeta.step_loss_schedule(S, epoch, 10)
        assert sum(w) == pytest.approx(1.0) and min(w) >= 0.03 / S - 1e-15
    assert fastmeta.step_loss_schedule(S, 50, 10) == pytest.approx([0.006] * 4 + [0.976])
    assert fastmeta.step_loss_schedule(1, 3, 10) == [1.0]
    for bad in (dict(inner_steps=0), dict(epoch=-1), dict(anneal_epochs=0), dict(floor=2.0), dict(epoch=float("nan"))):
        args = dict(inner_steps=S, epoch=1, anneal_epochs=10) | bad
        with pytest.raises(ValueError, match=next(iter(bad))):
            fastmeta.step_loss_schedule(**args)


def test_bad_settings_name_the_argument():
    model, batch = _mlp(), _mlp_batch()
    assert fastmeta.BatchedMAML(model, 0.1, 2, learn_inner_lr=1)._lr_kind == "per_element"  # (as True)
    assert fastmeta.BatchedMAML(model, 0.1, 2, learn_inner_lr=0).lrs is None
    for bad in ("per_step", 2, "True", 0.5):
        with pytest.raises(ValueError, match="learn_inner_lr"):
            fastmeta.BatchedMAML(model, 0.1, 2, learn_inner_lr=bad)
    for bad, err in (("abc", TypeError), (3, TypeError), ([], ValueError), ([0.5, float("nan")], ValueError),
                     ([0.5, True], ValueError), (torch.ones(2, 2), ValueError)):
        with pytest.raises(err, match="step_loss_weights"):
            fastmeta.BatchedMAML(model, 0.1, 2, step_loss_weights=bad)
    meta = fastmeta.BatchedMAML(model, 0.1, 2, step_loss_weights=[0.5, 0.5])
    with pytest.raises(TypeError, match="step_loss_weights"):
        meta.step_loss_weights = "x"
    assert meta.step_loss_weights == (0.5, 0.5)  # a rejected value leaves the setting as it was
    meta.inner_steps = 3
    with pytest.raises(ValueError, match=r"step_loss_weights has 2 weights but inner_steps=3"):
        meta(*batch)
    with pytest.raises(ValueError, match=r"step_loss_weights has 2 weights but inner_steps=3"):
        meta.value_and_grad(*batch)
    meta.adapt(*batch[:2])  # (adapt makes no query loss: the weights are not read)
    meta.step_loss_weights = None
    meta(*batch)
    # per_layer_step: rates for the steps it was built with; fewer steps take the first ones
    meta = fastmeta.BatchedMAML(model, 0.1, 2, learn_inner_lr="per_layer_step")
    meta.inner_steps = 3
    with pytest.raises(ValueError, match=r"inner_steps=3 but the learned rates have 2 steps"):
        meta(*batch)
    with pytest.raises(ValueError, match=r"inner_steps=3 but the learned rates have 2 steps"):
        meta.adapt(*batch[:2])
    meta.inner_steps = 1
    lrs = {n: meta.lrs[meta._lr_key(n)] for n in meta._adapt_names}
    want, want_g, want_lr = loop_meta_grads(model, *batch, 0.1, 1, lrs=lrs, per_step=True)
    torch.testing.assert_close(meta(*batch).detach(), want, rtol=1e-12, atol=1e-12)
    value, grads = meta.value_and_grad(*batch)  # (the second step's rates get a zero gradient)
    torch.testing.assert_close(value, want, rtol=1e-12, atol=1e-12)
    assert all(g.shape == (2,) and g[1] == 0 for g in grads[len(want_g):])
    assert_grads_close(grads, list(want_g) + list(want_lr))


@pytest.mark.skipif(not has_cpp(), reason="needs fastmeta._C (the cpp backend)")
def test_a_kernel_without_step_settings_leaves_them_to_the_batched_ops(monkeypatch):
    """Where the fused op's backend does not run per-step rates or the multi-step loss
    (ops.runs_step_settings: the cuda kernel for more than 64 weighted steps), BatchedMAML takes the
    batched ops, exact all the same, and explain says why (here the cpp kernel stands for such a one)."""
    mod = importlib.import_module("fastmeta.ops.mlp_inner_loop")
    monkeypatch.setattr(mod, "STEP_BACKENDS", ("torch",))
    model, batch = _mlp(), _mlp_batch()
    for kind, weights, why in ((False, [0.5, 0.5], "its cpp kernel makes the last step's query loss only"),
                               ("per_layer_step", None, "its cpp kernel has the same rates at every step")):
        meta = _check(model, batch, "mse", 2, kind, weights, False, "cpp")
        assert not meta._last_fused
        assert why in fastmeta.explain(meta)
    meta = _check(model, batch, "mse", 2, "per_layer", None, False, "cpp")  # (the kernel runs these)
    assert meta._last_fused


def test_derivative_order_annealing_switches_between_calls():
    """MAML++'s derivative-order annealing: first_order set between calls, each call exact to its
    order's loop (per-step rates and the multi-step loss on)."""
    model, batch = _conv(), _conv_batch()
    meta = fastmeta.BatchedMAML(model, 0.1, 2, first_order=True, loss="cross_entropy",
                                learn_inner_lr="per_layer_step", step_loss_weights=[0.4, 0.6])
    _spread_rates(meta)
    lrs = {n: meta.lrs[meta._lr_key(n)] for n in meta._adapt_names}
    for first_order in (True, False, True):
        meta.first_order = first_order
        _, grads = meta.value_and_grad(*batch)
        _, want, want_lr = loop_meta_grads(model, *batch, 0.1, 2, loss="cross_entropy", first_order=first_order,
                                           lrs=lrs, per_step=True, step_weights=[0.4, 0.6])
        assert_grads_close(grads, list(want) + list(want_lr))
