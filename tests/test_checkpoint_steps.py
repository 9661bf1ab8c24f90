"""BatchedMAML(checkpoint_steps=True): the inner loop without a graph, each step's graph recomputed
in the outer backward. The meta-gradient (and the rates' gradient) against the per-task loop, with
the other memory options, through adapt(), with a vmap fallback that draws random numbers; what
the graph keeps; the argument and the once-differentiable result."""
import gc
import weakref

import pytest
import torch
from torch import nn

import fastmeta
from conftest import assert_rel_close, loop_meta_grads, small_conv_net


def _conv_batch(T=3, K=4, Q=5, side=8, seed=3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(T, K, 3, side, side, generator=g, dtype=torch.float64),
            torch.randint(0, 5, (T, K), generator=g),
            torch.randn(T, Q, 3, side, side, generator=g, dtype=torch.float64),
            torch.randint(0, 5, (T, Q), generator=g))


def _mlp_batch(T=3, K=6, Q=7, seed=4):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(T, n, d, generator=g, dtype=torch.float64) for n, d in ((K, 2), (K, 3), (Q, 2), (Q, 3)))


def _rates(meta, model):
    return {n: meta.lrs[n.replace(".", "__")] for n, _ in model.named_parameters()} if meta.lrs is not None else None


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("meta_sgd", [False, True])
def test_conv_net_matches_the_loop(backend, steps, meta_sgd):
    """Second order on a two-block conv net (cross-entropy): meta-gradient and Meta-SGD rates'
    gradient equal the per-task loop's (float64), on the torch ops and on fastmeta._C's."""
    if backend == "cpp":
        from fastmeta.backend import why_unavailable
        if why_unavailable("cpp", "cpu"):
            pytest.skip("fastmeta._C not built")
    model = small_conv_net(torch.float64, 3, 2, 4 * 2 * 2)
    batch = _conv_batch()
    meta = fastmeta.BatchedMAML(model, 0.3, steps, loss="cross_entropy", learn_inner_lr=meta_sgd,
                                checkpoint_steps=True)
    assert "checkpoint_steps=True" in repr(meta) and "checkpoint_steps=True" in fastmeta.explain(model)
    rates = _rates(meta, model)
    wrt = list(model.parameters()) + (list(rates.values()) if rates else [])
    with fastmeta.use_backend(backend):
        got = torch.autograd.grad(meta(*batch), wrt)
    loss, want, want_lr = loop_meta_grads(model, *batch, 0.3, steps, "cross_entropy", lrs=rates)
    n = len(list(model.parameters()))
    assert_rel_close(list(got[:n]), list(want), 1e-10, "meta-gradient")
    if meta_sgd:
        assert_rel_close(list(got[n:]), list(want_lr), 1e-10, "rates' gradient")


@pytest.mark.parametrize("options", [dict(task_chunk=2), dict(recompute=True), dict(task_chunk=1, recompute=True)])
def test_composes_with_the_other_memory_options(options):
    """With task_chunk (each chunk's steps recomputed in its own backward) and recompute (the
    first block's convolution recomputed within each recomputed step): value_and_grad equals the
    loop's meta-gradient."""
    from fastmeta.backend import why_unavailable
    if options.get("recompute") and why_unavailable("cpp", "cpu"):
        pytest.skip("recompute needs fastmeta._C's ops")
    model = small_conv_net(torch.float64, 3, 2, 4 * 2 * 2)
    batch = _conv_batch(T=3)
    meta = fastmeta.BatchedMAML(model, 0.3, 2, loss="cross_entropy", checkpoint_steps=True, **options)
    loss, got = meta.value_and_grad(*batch)
    want_loss, want, _ = loop_meta_grads(model, *batch, 0.3, 2, "cross_entropy")
    assert_rel_close([loss], [want_loss], 1e-12, "meta-loss")
    assert_rel_close(list(got), list(want), 1e-10, "meta-gradient")


def test_learned_scalar_rate_and_frozen_parameter():
    """A tensor inner_lr that requires grad gets its gradient; a frozen parameter is not adapted
    and gets none; MSE on an MLP through the torch ops (the fused kernel keeps no graph and ignores
    the option, so the torch backend is asked for)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 9), nn.Tanh(), nn.Linear(9, 3)).double()
    model[0].bias.requires_grad_(False)
    batch = _mlp_batch()
    lr = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    wrt = [p for p in model.parameters() if p.requires_grad]
    got = {}
    for ck in (False, True):
        meta = fastmeta.BatchedMAML(model, lr, 3, checkpoint_steps=ck, backend="torch")
        got[ck] = torch.autograd.grad(meta(*batch), wrt + [lr])
    assert_rel_close(list(got[True]), list(got[False]), 1e-12, "meta-gradient and lr gradient")
    _, want, _ = loop_meta_grads(model, *batch, lr, 3, "mse")
    assert_rel_close(list(got[True][:-1]), list(want), 1e-10, "meta-gradient vs loop")
    assert got[True][-1].abs() > 0


def test_adapt_and_predict():
    """adapt() under checkpoint_steps returns parameters whose graph reaches the meta-parameters
    through the recomputing node: a query loss on predict() backpropagates to the same meta-gradient."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    xs, ys, xq, yq = _mlp_batch()
    got = {}
    for ck in (False, True):
        meta = fastmeta.BatchedMAML(model, 0.1, 2, checkpoint_steps=ck, backend="torch")
        P = meta.adapt(xs, ys)
        loss = ((meta.predict(P, xq) - yq) ** 2).mean()
        got[ck] = torch.autograd.grad(loss, list(model.parameters()))
    assert_rel_close(list(got[True]), list(got[False]), 1e-12, "meta-gradient through adapt()")


def test_random_fallback_module_draws_the_same_numbers_again():
    """A module without a batched lowering (here AlphaDropout, run through vmap with random draws
    per task): the recomputed steps draw what the first run drew (the generator's state is kept a
    step and restored around each recomputation, and left as it was after the backward; the lowered
    Dropout: tests/test_batched_maml.py)."""
    model = nn.Sequential(nn.Linear(2, 16), nn.AlphaDropout(0.3), nn.Tanh(), nn.Linear(16, 3)).double()
    batch = _mlp_batch()
    got, after = {}, {}
    for ck in (False, True):
        meta = fastmeta.BatchedMAML(model, 0.1, 2, checkpoint_steps=ck, backend="torch")
        assert meta.program.fallbacks
        torch.manual_seed(7)
        got[ck] = torch.autograd.grad(meta(*batch), list(model.parameters()))
        after[ck] = torch.rand(3)
    assert_rel_close(list(got[True]), list(got[False]), 1e-12, "meta-gradient with dropout")
    assert torch.equal(after[True], after[False])


def test_keeps_less_for_the_outer_backward():
    """What the meta-loss's graph holds for the outer backward (each storage once): with
    checkpoint_steps only the query's graph and the steps' parameters, under 30% of what the S
    steps' graphs hold without it (three steps on a two-block conv net: 7x less)."""
    model = small_conv_net(torch.float32, 3, 2, 4 * 4 * 4).float()
    xs, ys, xq, yq = (t.float() if t.is_floating_point() else t for t in _conv_batch(T=2, K=10, Q=5, side=16))

    def saved_bytes(ck):
        packed = []  # the saved tensors still alive once the loss is built are the graph's

        def pack(t):
            packed.append(weakref.ref(t))
            return t
        meta = fastmeta.BatchedMAML(model, 0.1, 3, loss="cross_entropy", checkpoint_steps=ck, backend="torch")
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = meta(xs, ys, xq, yq)
        gc.collect()
        alive = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in (r() for r in packed)
                 if t is not None}
        del loss
        return sum(alive.values())

    plain, ck = saved_bytes(False), saved_bytes(True)
    assert ck < 0.3 * plain, (ck, plain)


def test_once_differentiable_and_checked_argument():
    model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    meta = fastmeta.BatchedMAML(model, 0.1, 2, checkpoint_steps=True, backend="torch")
    with pytest.raises(RuntimeError, match=r"checkpoint_steps=True\): the meta-loss is differentiable once"):
        torch.autograd.grad(meta(*_mlp_batch()), list(model.parameters()), create_graph=True)
    with pytest.raises(TypeError, match="checkpoint_steps: expected True or False, got 'yes'"):
        fastmeta.BatchedMAML(model, 0.1, 1, checkpoint_steps="yes")


def test_first_order_and_fused_kernel_are_unchanged():
    """First order keeps no graph across steps anyway: the option changes nothing there, nor on
    the fused MLP kernel (cpp), whose meta-gradient comes from the kernel."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    batch = _mlp_batch()
    for first_order in (True, False):
        got = {}
        for ck in (False, True):
            meta = fastmeta.BatchedMAML(model, 0.1, 2, first_order=first_order, checkpoint_steps=ck)
            got[ck] = meta.value_and_grad(*batch)[1]
        assert_rel_close(list(got[True]), list(got[False]), 1e-12, f"first_order={first_order}")


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_recomputation_runs_the_forwards_kernels(backend):
    """The backward recomputes the steps on the backend the forward ran on (the module's, here),
    though it runs after the forward returned, outside the module's backend request."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from fastmeta.backend import why_unavailable
    if why_unavailable(backend, "cpu"):
        pytest.skip(f"{backend} unavailable")

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(func.name())
            return func(*args, **(kwargs or {}))

    model = small_conv_net(torch.float64, 3, 2, 4 * 2 * 2)
    meta = fastmeta.BatchedMAML(model, 0.3, 2, loss="cross_entropy", checkpoint_steps=True, backend=backend)
    loss = meta(*_conv_batch())
    seen = Ops()
    with seen:
        torch.autograd.grad(loss, list(model.parameters()))
    ours = {n for n in seen.names if n.startswith("fastmeta::")}
    if backend == "torch":
        assert not ours, ours
    else:
        assert any("conv" in n for n in ours), seen.names


def test_callable_loss():
    """A callable loss (run per task through vmap) recomputes like the built-in ones."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    batch = _mlp_batch()

    def huber(pred, target):
        return torch.nn.functional.smooth_l1_loss(pred, target)

    got = {}
    for ck in (False, True):
        meta = fastmeta.BatchedMAML(model, 0.2, 3, loss=huber, checkpoint_steps=ck, backend="torch")
        got[ck] = torch.autograd.grad(meta(*batch), list(model.parameters()))
    assert_rel_close(list(got[True]), list(got[False]), 1e-12, "meta-gradient with a callable loss")


def test_parameters_changed_before_the_backward_raise():
    """The backward recomputes the steps from the parameters: one changed in place after the
    forward raises (as autograd does for a tensor it saved) instead of giving a wrong gradient."""
    model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    meta = fastmeta.BatchedMAML(model, 0.1, 2, checkpoint_steps=True, backend="torch")
    loss = meta(*_mlp_batch())
    with torch.no_grad():
        model[0].weight.add_(0.1)
    with pytest.raises(RuntimeError, match=r"parameter\(s\) \['0.weight'\] were modified in place"):
        torch.autograd.grad(loss, list(model.parameters()))
