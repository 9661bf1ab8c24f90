"""BatchedMAML(inner_params=...): the inner loop adapts only the selected parameters (ANIL: the head;
BOIL: the body), the others are shared by the tasks and still meta-learned, with their effect on
the inner steps in the second-order meta-gradient. Checked against a per-task loop that adapts the
same parameters, on every path (the batched ops on each backend, recompute, checkpoint_steps,
task_chunk, Meta-SGD), with the leading layers that read no adapted parameter made once a call,
and the BatchNorm running statistics as the loop's passes update them."""
import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import fastmeta
from fastmeta import plan
from conftest import assert_grads_close, conv2_net, counted_steps, has_cpp, loop_meta_grads

BACKENDS = ["torch"] + (["cpp"] if has_cpp() else [])


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)).double()


_conv = conv2_net


def _batch(image: bool, T=3):
    g = torch.Generator().manual_seed(1)
    shape = (1, 8, 8) if image else (2,)
    xs = torch.randn(T, 5, *shape, generator=g, dtype=torch.float64)
    xq = torch.randn(T, 6, *shape, generator=g, dtype=torch.float64)
    return xs, torch.randint(0, 3, (T, 5), generator=g), xq, torch.randint(0, 3, (T, 6), generator=g)


def _check(model, batch, inner_params, adapted, first_order, backend, steps=2, learn=False, **settings):
    meta = fastmeta.BatchedMAML(model, 0.3, steps, first_order=first_order, loss="cross_entropy",
                                inner_params=inner_params, learn_inner_lr=learn, **settings)
    assert meta._adapt_names == adapted
    with fastmeta.use_backend(backend):
        loss, grads = meta.value_and_grad(*batch)
        again = meta(*batch)
        grads2 = torch.autograd.grad(again, list(meta.parameters()))
    lrs = {n: meta.lrs[meta._lr_key(n)] for n in adapted} if learn else None
    want_loss, want, want_lr = loop_meta_grads(model, *batch, 0.3, steps, loss="cross_entropy",
                                               first_order=first_order, lrs=lrs, adapted=set(adapted))
    want = list(want) + (list(want_lr) if learn else [])
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(again.detach(), want_loss, rtol=1e-12, atol=1e-12)
    assert_grads_close(grads, want)
    assert_grads_close(grads2, want)
    assert not meta._last_fused  # the fused MLP kernel adapts every parameter: not taken
    return meta


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("first_order", [False, True])
def test_mlp_head_body_and_middle(backend, first_order):
    model, batch = _mlp(), _batch(False)
    _check(model, batch, "4", ["4.weight", "4.bias"], first_order, backend)  # ANIL
    _check(model, batch, model[4], ["4.weight", "4.bias"], first_order, backend, learn=True)
    _check(model, batch, lambda n: not n.startswith("4."), ["0.weight", "0.bias", "2.weight", "2.bias"],
           first_order, backend, steps=3)  # BOIL
    _check(model, batch, ["2.weight", "0"], ["0.weight", "0.bias", "2.weight"], first_order, backend)
    _check(model, batch, model[4].parameters(), ["4.weight", "4.bias"], first_order, backend)
    _check(model, batch, model[0].bias, ["0.bias"], first_order, backend)
    _check(model, batch, "2", ["2.weight", "2.bias"], first_order, backend, checkpoint_steps=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("settings", [{}, {"recompute": True}, {"checkpoint_steps": True}, {"task_chunk": 2}],
                         ids=["plain", "recompute", "checkpoint_steps", "task_chunk"])
def test_conv_anil_and_partial_bodies(backend, first_order, settings):
    model, batch = _conv(), _batch(True)
    _check(model, batch, "9", ["9.weight", "9.bias"], first_order, backend, **settings)
    _check(model, batch, [model[4], model[5], "9"], ["4.weight", "4.bias", "5.weight", "5.bias", "9.weight",
                                                      "9.bias"], first_order, backend, learn=True, **settings)
    _check(model, batch, ["0", "1"], ["0.weight", "0.bias", "1.weight", "1.bias"], first_order, backend, **settings)


def test_the_invariant_prefix_runs_once_a_call(monkeypatch):
    """The body before the first adapted layer runs once on the support set and once on the query
    (not once an inner step); the layers from there on once a step, then on the query."""
    monkeypatch.setenv("FASTMETA_CPU_TASK_CHUNK", "1")
    model, batch = _conv(), _batch(True)
    with counted_steps(model) as calls:
        meta = fastmeta.BatchedMAML(model, 0.3, 4, loss="cross_entropy", inner_params="9")
        # (steps: conv, bn_relu_pool, conv, bn_relu_pool, flatten, linear)
        assert plan.lower(model).invariant_prefix(set(meta._adapt_names)) == 5
        with fastmeta.use_backend("torch"):
            meta(*batch).backward()
        chunks = 3  # (FASTMETA_CPU_TASK_CHUNK=1: a task at a time)
        assert calls[0] == calls[4] == 2 * chunks
        assert calls[5] == 5 * chunks
        calls.clear()
        full = fastmeta.BatchedMAML(model, 0.3, 4, loss="cross_entropy")
        with fastmeta.use_backend("torch"):
            full(*batch)
        assert calls[0] == calls[5] == 5 * chunks


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("kind", ["conv4", "bn1d"])
def test_running_statistics_as_the_loop_updates_them(first_order, kind):
    """A body with BatchNorm tracking running statistics, made once a call for all the inner steps,
    still updates them as the loop's passes do: once a step, then on the query."""
    torch.manual_seed(0)
    if kind == "conv4":
        model = _conv(track=True)
        image = True
    else:
        model = nn.Sequential(nn.Linear(2, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).double()
        image = False
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.fill_(0.3)
                m.running_var.fill_(2.0)
    head = [n for n, _ in model.named_parameters()][-2:]
    ref = copy.deepcopy(model)
    batch = _batch(image)
    fastmeta.BatchedMAML(model, 0.1, 3, first_order=first_order, loss="cross_entropy",
                         inner_params=head)(*batch)
    xs, ys, xq, yq = batch
    P = dict(ref.named_parameters())
    for t in range(xs.shape[0]):
        p = dict(P)
        for _ in range(3):
            loss = F.cross_entropy(functional_call(ref, p, (xs[t],)), ys[t])
            g = torch.autograd.grad(loss, [p[n] for n in head], create_graph=not first_order)
            p.update({n: p[n] - 0.1 * d for n, d in zip(head, g)})
        functional_call(ref, p, (xq[t],))
    for (name, a), (_, b) in zip(model.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")


def test_the_fused_mlp_kernel_runs_where_every_parameter_is_selected():
    if not has_cpp():
        pytest.skip("fastmeta._C not built")
    model, batch = _mlp(), _batch(False)
    meta = fastmeta.BatchedMAML(model, 0.3, 2, loss="cross_entropy", inner_params=["0", "2", "4"])
    with fastmeta.use_backend("cpp"):
        meta.value_and_grad(*batch)
    assert meta._last_fused


def test_adapt_predict_copies_and_repr():
    model, batch = _conv(), _batch(True)
    meta = fastmeta.BatchedMAML(model, 0.3, 2, loss="cross_entropy", inner_params="9")
    P = meta.adapt(*batch[:2])
    for n, p in model.named_parameters():
        if n.startswith("9."):
            assert not torch.equal(P[n][0], p)
        else:
            assert torch.equal(P[n], p.expand_as(P[n]))
    torch.testing.assert_close(F.cross_entropy(meta.predict(P, batch[2]).flatten(0, 1), batch[3].flatten()),
                               meta(*batch), rtol=1e-12, atol=0)
    assert "inner_params=['9']" in repr(meta)
    for other in (copy.deepcopy(meta), pickle.loads(pickle.dumps(meta))):
        assert other._adapt_names == ["9.weight", "9.bias"]
        torch.testing.assert_close(other(*batch), meta(*batch), rtol=1e-12, atol=0)
    text = fastmeta.explain(meta)
    assert "inner_params" in text and "9.weight" in text and "once a call" in text


def test_frozen_parameters_are_neither_adapted_nor_meta_learned():
    model, batch = _mlp(), _batch(False)
    model[2].weight.requires_grad_(False)
    meta = fastmeta.BatchedMAML(model, 0.3, 2, loss="cross_entropy", inner_params=["2", "4"])
    assert meta._adapt_names == ["2.bias", "4.weight", "4.bias"]
    _, grads = meta.value_and_grad(*batch)
    assert [g is None for g in grads] == [False, False, True, False, False, False]
    model[4].requires_grad_(False)
    model[2].bias.requires_grad_(False)
    with pytest.raises(ValueError, match="none of the parameters inner_params selects requires grad"):
        meta(*batch)


def test_bad_selections_name_the_argument():
    model = _mlp()
    cases = [
        ("head", ValueError, "'head' names no parameter or module of the model; its parameters are"),
        (["4", "5"], ValueError, "'5' names no parameter"),
        ([], ValueError, "an empty list"),
        (nn.Linear(2, 2), ValueError, "a Linear that is not a module of the model"),
        (model[1], ValueError, "module '1' \\(Tanh\\) has no parameters"),
        (3, TypeError, "expected None, a parameter or module name"),
        ([3], TypeError, "expected parameter or module names \\(str\\), modules or parameters, got int"),
        (nn.Parameter(torch.zeros(2)), ValueError, "a tensor \\(2,\\) that is not a parameter of the model"),
        (lambda n: False, ValueError, "the callable selects none of the model's parameters"),
        (lambda n, m: True, TypeError, "the callable must take a parameter name"),
    ]
    for value, kind, match in cases:
        with pytest.raises(kind, match=f"inner_params: {match}"):
            fastmeta.BatchedMAML(model, 0.3, 2, inner_params=value)
    with pytest.raises(ValueError, match="inner_params: the model \\(Sequential\\) has no parameters"):
        fastmeta.BatchedMAML(nn.Sequential(nn.Tanh()), 0.3, 0, inner_params=lambda n: True)


def test_cpu_passes_of_small_inputs_run_all_tasks_at_once():
    """On a CPU a conv program runs a pass of a small input per task (a few-shot support set) over
    all tasks at once, and one of a large input (a query set) a task at a time."""
    model = _conv()
    T, big = 3, plan.CPU_SMALL_PASS // 64 + 1  # (8 x 8 images: 64 elements an image)
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(T, 5, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (T, 5), generator=g),
             torch.randn(T, big, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (T, big), generator=g))
    with counted_steps(model) as calls:
        meta = fastmeta.BatchedMAML(model, 0.3, 2, loss="cross_entropy")
        with fastmeta.use_backend("torch"):
            loss = meta(*batch)
        assert calls[0] == 2 + T  # two support passes at once, the query's a task at a time
    want, _, _ = loop_meta_grads(model, *batch, 0.3, 2, loss="cross_entropy")
    torch.testing.assert_close(loss.detach(), want, rtol=1e-12, atol=1e-12)
