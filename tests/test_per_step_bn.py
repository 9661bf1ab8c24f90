"""BatchedMAML(per_step_bn=True): MAML++'s per-step BatchNorm (Antoniou et al. 2019): each BatchNorm
module has a weight, a bias and running statistics for each inner step (the support pass of step s
and the query loss after it use row s, the last query the last row), meta-learned and not adapted.
Checked against a per-task loop that calls the model with those rows (float64, 1e-10): the loss,
the meta-gradient of the model, the tables and the learned rates, and the running statistics, on
every path (the torch and cpp backends, both orders, checkpoint_steps, task_chunk, recompute,
the multi-step loss), in eval mode, and the errors."""
import copy
import pickle

import pytest
import torch
from torch import nn

import fastmeta
from conftest import assert_grads_close, conv2_net, has_cpp, loop_meta_grads

BACKENDS = ["torch"] + (["cpp"] if has_cpp() else [])


def _conv_batch(T=3):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(T, 5, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (T, 5), generator=g),
            torch.randn(T, 6, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (T, 6), generator=g))


def _bn_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 2)).double()


def _mlp_batch(T=3):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(T, 6, 3, generator=g, dtype=torch.float64), torch.randn(T, 6, 2, generator=g, dtype=torch.float64),
            torch.randn(T, 7, 3, generator=g, dtype=torch.float64), torch.randn(T, 7, 2, generator=g, dtype=torch.float64))


def _bn_paths(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _spread(meta):
    """Rows that differ from step to step: tables, running statistics, learned rates."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in meta.step_bn.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        for name, b in meta.step_bn.named_buffers():
            if name.startswith("mean"):
                b.add_(0.2 * torch.randn(b.shape, generator=g, dtype=b.dtype))
            elif name.startswith("var"):
                b.mul_(1 + torch.rand(b.shape, generator=g, dtype=b.dtype))
            else:
                b.copy_(torch.arange(b.shape[0]) + 3)
        if meta.lrs is not None:
            for r in meta.lrs.values():
                r.copy_(0.02 + 0.18 * torch.rand(r.shape, generator=g, dtype=r.dtype))


def _reference(meta, model):
    """(a copy of the model, its at_step for loop_meta_grads, the tables as leaves, the statistics'
    copies): the loop runs step s with each BatchNorm's row s."""
    ref = copy.deepcopy(model)
    tables = {k: p.detach().clone().requires_grad_() for k, p in meta.step_bn.named_parameters()}
    stats = {k: b.detach().clone() for k, b in meta.step_bn.named_buffers()}
    paths = _bn_paths(model)

    def at_step(p, s):
        p = dict(p)
        buffers = {}
        for path in paths:
            key = path.replace(".", "__")
            for kind in ("weight", "bias"):
                if f"{kind}.{key}" in tables:
                    p[f"{path}.{kind}"] = tables[f"{kind}.{key}"][s]
            if f"mean__{key}" in stats:
                buffers.update({f"{path}.running_mean": stats[f"mean__{key}"][s],
                                f"{path}.running_var": stats[f"var__{key}"][s],
                                f"{path}.num_batches_tracked": stats[f"count__{key}"][s]})
        return p, buffers
    return ref, at_step, tables, stats


def _check(model, batch, loss, steps, first_order, backend, kind=False, weights=None, **settings):
    meta = fastmeta.BatchedMAML(model, 0.1, steps, first_order=first_order, loss=loss, per_step_bn=True,
                                learn_inner_lr=kind, step_loss_weights=weights, **settings)
    _spread(meta)
    ref, at_step, tables, stats = _reference(meta, model)
    with fastmeta.use_backend(backend):
        value, grads = meta.value_and_grad(*batch)
    names = meta._adapt_names
    lrs = ({n: meta.lrs[meta._lr_key(n)].detach().clone().requires_grad_() for n in names}
           if meta.lrs is not None else None)
    want_loss, want, want_lr, want_tables = loop_meta_grads(
        ref, *batch, 0.1, steps, loss=loss, first_order=first_order, lrs=lrs, adapted=set(names),
        per_step=kind == "per_layer_step", step_weights=weights, at_step=at_step, extra=list(tables.values()))
    torch.testing.assert_close(value, want_loss, rtol=1e-12, atol=1e-12)
    # self.parameters(): the model's (its BatchNorms' own weights and biases unread: zero), the
    # tables, then the rates
    order = [n for n, _ in meta.named_parameters()]
    by_name = dict(zip([f"model.{n}" for n, p in model.named_parameters() if p.requires_grad], want))
    by_name.update(zip([f"step_bn.{k}" for k in tables], want_tables))
    if lrs is not None:
        by_name.update(zip([f"lrs.{meta._lr_key(n)}" for n in names], want_lr))
    assert_grads_close(grads, [by_name[n] for n in order])
    for name, b in meta.step_bn.named_buffers():  # each step's running statistics, as the loop's passes
        torch.testing.assert_close(b, stats[name], rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")
    return meta


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
@pytest.mark.parametrize("settings", [{}, {"checkpoint_steps": True}, {"task_chunk": 2}, {"recompute": True}],
                         ids=["plain", "checkpoint_steps", "task_chunk", "recompute"])
@pytest.mark.parametrize("chunk", ["", "1"], ids=["cpu_default", "a_task_at_a_time"])
def test_conv_against_the_loop(backend, first_order, settings, chunk, monkeypatch):
    monkeypatch.setenv("FASTMETA_CPU_TASK_CHUNK", chunk)
    model = conv2_net(track=True)
    model[5].momentum = None  # (a cumulative average: num_batches_tracked a step)
    batch = _conv_batch()
    meta = _check(model, batch, "cross_entropy", 3, first_order, backend, **settings)
    assert "1.weight" not in meta._adapt_names and "5.bias" not in meta._adapt_names  # (not read)
    _check(conv2_net(track=True), batch, "cross_entropy", 3, first_order, backend, kind="per_layer_step",
           weights=[0.2, 0.3, 0.5], **settings)  # MAML++: with LSLR and the multi-step loss
    _check(conv2_net(track=False), batch, "cross_entropy", 2, first_order, backend, weights=[0.5, 0.5],
           inner_params="9", **settings)  # no running statistics; the head adapted only


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
def test_batchnorm1d_mlp_against_the_loop(backend, first_order):
    _check(_bn_mlp(), _mlp_batch(), "mse", 3, first_order, backend)
    _check(_bn_mlp(), _mlp_batch(), "mse", 2, first_order, backend, kind=True, weights=[0.3, 0.7],
           checkpoint_steps=True)


def test_eval_mode_normalizes_with_each_steps_statistics():
    """In eval mode each pass normalizes with the running statistics of its step (predict: the last)."""
    model, batch = conv2_net(track=True), _conv_batch()
    meta = fastmeta.BatchedMAML(model, 0.1, 3, loss="cross_entropy", per_step_bn=True)
    _spread(meta)
    model.eval()
    ref, at_step, tables, stats = _reference(meta, model)
    want, *_ = loop_meta_grads(ref, *batch, 0.1, 3, loss="cross_entropy", adapted=set(meta._adapt_names),
                               at_step=at_step)
    torch.testing.assert_close(meta(*batch).detach(), want, rtol=1e-12, atol=1e-12)
    before = {k: b.clone() for k, b in meta.step_bn.named_buffers()}
    xs, ys, xq, yq = batch
    P = meta.adapt(xs, ys)
    out = meta.predict(P, xq)
    params, buffers = at_step({n: P[n][0] for n in P}, 2)
    from fastmeta.plan import call_with
    torch.testing.assert_close(out[0], call_with(ref, params, (xq[0],), buffers=buffers), rtol=1e-12, atol=1e-12)
    for k, b in meta.step_bn.named_buffers():  # (eval mode: nothing recorded)
        torch.testing.assert_close(b, before[k], rtol=0, atol=0)


def test_tables_copies_and_explain():
    model = conv2_net(track=True)
    meta = fastmeta.BatchedMAML(model, 0.1, 4, loss="cross_entropy", per_step_bn=True)
    shapes = {k: tuple(v.shape) for k, v in meta.step_bn.state_dict().items()}
    assert shapes["weight.1"] == shapes["bias.5"] == (4, 4)
    assert shapes["mean__1"] == shapes["var__5"] == (4, 4) and shapes["count__1"] == (4,)
    assert any(k.startswith("step_bn.weight") for k in meta.state_dict())
    batch = _conv_batch()
    _spread(meta)
    want = meta(*batch).detach()
    for other in (copy.deepcopy(meta), pickle.loads(pickle.dumps(meta))):
        torch.testing.assert_close(other(*batch).detach(), want, rtol=0, atol=0)
    assert "per_step_bn=True" in repr(meta)
    text = fastmeta.explain(meta)
    assert "per-step BatchNorm" in text and "1, 5" in text
    # the head adapted alone: only what comes before the first (per-step) BatchNorm runs once a call
    anil = fastmeta.BatchedMAML(conv2_net(), 0.1, 2, loss="cross_entropy", per_step_bn=True, inner_params="9")
    assert "\n  0: read no adapted parameter, run once a call" in fastmeta.explain(anil)
    # fewer steps take the first rows (none: the query with the first row); more raise
    meta.inner_steps = 2
    meta(*batch)
    meta.inner_steps = 0
    ref, at_step, _, _ = _reference(meta, model)
    want, *_ = loop_meta_grads(ref, *batch, 0.1, 0, loss="cross_entropy", adapted=set(meta._adapt_names),
                               at_step=at_step)
    torch.testing.assert_close(meta(*batch).detach(), want, rtol=1e-12, atol=1e-12)
    meta.inner_steps = 5
    with pytest.raises(ValueError, match=r"inner_steps=5 but the BatchNorm tables have 4 steps"):
        meta(*batch)
    frozen = conv2_net()
    frozen[1].weight.requires_grad_(False)  # a frozen weight: a frozen table
    meta = fastmeta.BatchedMAML(frozen, 0.1, 2, loss="cross_entropy", per_step_bn=True, checkpoint_steps=True)
    assert not meta.step_bn.weight["1"].requires_grad and meta.step_bn.bias["1"].requires_grad
    loss, grads = meta.value_and_grad(*batch)
    named = dict(zip([n for n, _ in meta.named_parameters()], grads))
    assert named["step_bn.weight.1"] is None and named["step_bn.bias.1"].abs().sum() > 0


def test_a_module_run_at_two_places_has_one_table():
    """A BatchNorm module used twice in the Sequential (tied) keeps one table, as the loop's module
    is one: both places read the same rows, and its meta-gradient sums both."""
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(6, track_running_stats=False)
    model = nn.Sequential(nn.Linear(3, 6), bn, nn.Tanh(), nn.Linear(6, 6), bn, nn.Tanh(), nn.Linear(6, 2)).double()
    meta = fastmeta.BatchedMAML(model, 0.1, 2, per_step_bn=True)
    assert list(meta.step_bn.weight.keys()) == ["1"]
    _check(model, _mlp_batch(), "mse", 2, False, "torch")


def test_tune_leaves_each_steps_statistics_as_they_were():
    """fastmeta.tune's timed calls are not the user's passes: the per-step running statistics (and
    the model's) are as before it."""
    model, batch = conv2_net(track=True), _conv_batch()
    meta = fastmeta.BatchedMAML(model, 0.1, 2, loss="cross_entropy", per_step_bn=True)
    before = {k: b.clone() for k, b in meta.step_bn.named_buffers()}
    fastmeta.tune(meta, *batch)
    for k, b in meta.step_bn.named_buffers():
        assert torch.equal(b, before[k]), k


def test_bad_uses_name_the_argument():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    with pytest.raises(ValueError, match="per_step_bn: the model .* has no BatchNorm"):
        fastmeta.BatchedMAML(plain, 0.1, 2, per_step_bn=True)
    with pytest.raises(ValueError, match="per_step_bn: needs inner_steps >= 1"):
        fastmeta.BatchedMAML(conv2_net(), 0.1, 0, per_step_bn=True)
    with pytest.raises(TypeError, match="per_step_bn"):
        fastmeta.BatchedMAML(conv2_net(), 0.1, 2, per_step_bn="yes")

    class Block(nn.Module):  # (a branch on the input's rank, which torch.fx cannot trace: the vmap fallback)
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(4)

        def forward(self, x):
            return self.bn(x) if x.dim() == 2 else x
    odd = nn.Sequential(nn.Linear(3, 4), Block(), nn.Linear(4, 2)).double()
    with pytest.raises(ValueError, match="per_step_bn: BatchNorm1d run inside a torch.func fallback"):
        fastmeta.BatchedMAML(odd, 0.1, 2, per_step_bn=True)
