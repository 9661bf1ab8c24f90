"""BatchNorm running statistics under BatchedMAML: a BatchNorm in training mode that tracks them has
them updated as the per-task loop's forward passes update them (task by task, each task's inner
steps then its query), on every path: the fused bn_relu_pool, the plain batched BatchNorm, the
recomputed first block, the checkpointed steps, task chunks, and the vmap fallback; with a momentum
or the cumulative average; F.batch_norm in a traced forward, on its own tensors, too. Before, they were left as they were, so that a model switched to eval()
after meta-training normalized with its initial statistics."""
import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import fastmeta

from conftest import requires_cpp


class _Custom(nn.Module):
    """Not a Sequential: its forward traced into its modules; with FASTMETA_TRACE=0 (kind
    "custom-untraced") it runs through the vmap fallback as a whole."""

    def __init__(self, momentum):
        super().__init__()
        self.c = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4, momentum=momentum)
        self.o = nn.Linear(64, 3)

    def forward(self, x):
        return self.o(torch.relu(self.bn(self.c(x))).flatten(1))


class _Functional(nn.Module):
    """BatchNorm as MAML reference code writes it: F.batch_norm on running statistics held as
    Parameters that do not require grad (kind "functional") or as buffers ("functional-buffers",
    normalizing with them in eval mode), F.conv2d / F.linear on a ParameterList, an in-place
    F.relu; traced, it runs the fused bn_relu_pool."""

    def __init__(self, momentum, buffers=False):
        super().__init__()
        self.vars = nn.ParameterList([nn.Parameter(torch.randn(4, 1, 3, 3) * 0.5), nn.Parameter(torch.zeros(4)),
                                      nn.Parameter(1 + 0.3 * torch.randn(4)), nn.Parameter(0.1 * torch.randn(4)),
                                      nn.Parameter(torch.randn(3, 16) * 0.3), nn.Parameter(torch.zeros(3))])
        stats = [torch.zeros(4), torch.ones(4)]
        if buffers:
            self.register_buffer("mean", stats[0])
            self.register_buffer("var", stats[1])
        else:
            self.vars_bn = nn.ParameterList([nn.Parameter(t, requires_grad=False) for t in stats])
        self.momentum, self.in_buffers = momentum, buffers

    def statistics(self):
        return (self.mean, self.var) if self.in_buffers else tuple(self.vars_bn)

    def forward(self, x, vars=None, bn_training=True):
        v = self.vars if vars is None else vars
        x = F.conv2d(x, v[0], v[1], padding=1)
        x = F.batch_norm(x, *self.statistics(), v[2], v[3], training=self.training if self.in_buffers else bn_training,
                         momentum=self.momentum)
        x = F.max_pool2d(F.relu(x, inplace=True), 2)
        return F.linear(x.view(x.size(0), -1), v[4], v[5])


def _net(kind, momentum):
    if kind.startswith("functional"):
        return _Functional(momentum, buffers=kind == "functional-buffers").double()
    if kind == "conv4":  # bn_relu_pool
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4, momentum=momentum), nn.ReLU(),
                             nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4, momentum=momentum),
                             nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4, 3)).double()
    if kind == "bn1d":  # the plain batched BatchNorm
        return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8, momentum=momentum), nn.Tanh(),
                             nn.Linear(8, 3)).double()
    return _Custom(momentum).double()


def _batch(T=3):
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(T, 5, 1, 4, 4, generator=g, dtype=torch.float64) + 1
    xq = torch.randn(T, 6, 1, 4, 4, generator=g, dtype=torch.float64) * 2
    return xs, torch.randint(0, 3, (T, 5), generator=g), xq, torch.randint(0, 3, (T, 6), generator=g)


def _start(model):
    """Running statistics other than the defaults, so that their weight in the update shows."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.fill_(0.3)
                m.running_var.fill_(2.0)
                m.num_batches_tracked.fill_(4)
            if isinstance(m, _Functional):
                m.statistics()[0].fill_(0.3)
                m.statistics()[1].fill_(2.0)
    return model


def _loop(model, xs, ys, xq, yq, steps, first_order, query=True):
    """The per-task loop: its forward passes update the model's running statistics (a functional
    model's frozen Parameters too, which it leaves to the model)."""
    P = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for t in range(xs.shape[0]):
        p = P
        for _ in range(steps):
            loss = F.cross_entropy(functional_call(model, p, (xs[t],)), ys[t])
            g = torch.autograd.grad(loss, list(p.values()), create_graph=not first_order)
            p = {k: v - 0.1 * d for (k, v), d in zip(p.items(), g)}
        if query:
            functional_call(model, p, (xq[t],))


def _assert_same_buffers(got, want):
    """The buffers, and the Parameters that hold running statistics (a functional model's)."""
    state = lambda m: [(n, t) for n, t in m.state_dict(keep_vars=True).items()  # noqa: E731
                       if not isinstance(t, nn.Parameter) or not t.requires_grad]
    assert [n for n, _ in state(got)] == [n for n, _ in state(want)]
    for (name, a), (_, b) in zip(state(got), state(want)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")


CASES = [  # (model, momentum, steps, first order, backend, options)
    ("conv4", 0.1, 2, False, "torch", {}),
    ("conv4", None, 1, True, "torch", dict(recompute=True)),
    pytest.param("conv4", 0.1, 2, False, "cpp", dict(recompute=True), marks=requires_cpp),
    pytest.param("conv4", 0.3, 2, False, "cpp", dict(checkpoint_steps=True), marks=requires_cpp),
    pytest.param("conv4", None, 2, True, "cpp", dict(task_chunk=2), marks=requires_cpp),
    ("bn1d", 0.1, 1, False, "torch", {}),
    ("bn1d", None, 2, True, "torch", dict(task_chunk=1)),
    ("custom", 0.1, 2, False, "torch", {}),
    ("custom", None, 1, True, "torch", {}),
    ("custom-untraced", 0.1, 2, False, "torch", {}),
    ("custom-untraced", None, 1, True, "torch", {}),
    ("conv4", 0.1, 0, False, "torch", {}),
    ("functional", 0.1, 2, False, "torch", {}),
    ("functional-buffers", 0.3, 1, True, "torch", dict(task_chunk=2)),
    pytest.param("functional", 0.2, 2, False, "cpp", dict(checkpoint_steps=True), marks=requires_cpp),
    pytest.param("functional-buffers", 0.1, 2, False, "cpp", dict(recompute=True), marks=requires_cpp),
]


@pytest.mark.parametrize("kind,momentum,steps,first_order,backend,options", CASES)
@pytest.mark.parametrize("call", ["forward", "value_and_grad"])
def test_running_stats_follow_the_loop(kind, momentum, steps, first_order, backend, options, call, monkeypatch):
    if kind.endswith("untraced"):
        monkeypatch.setenv("FASTMETA_TRACE", "0")
    xs, ys, xq, yq = _batch()
    torch.manual_seed(0)
    model = _start(_net(kind, momentum))
    reference = copy.deepcopy(model)
    _loop(reference, xs, ys, xq, yq, steps, first_order)
    meta = fastmeta.BatchedMAML(model, 0.1, steps, first_order=first_order, loss="cross_entropy", backend=backend,
                                **options)
    if call == "forward":
        meta(xs, ys, xq, yq).backward()  # (a recomputing backward does not count as a pass)
    else:
        meta.value_and_grad(xs, ys, xq, yq)
    _assert_same_buffers(model, reference)


@pytest.mark.parametrize("kind", ["conv4", "custom", "custom-untraced", "functional"])
def test_adapt_and_predict_update_as_their_passes(kind, monkeypatch):
    """adapt: the inner steps' passes; predict: one pass; each call's passes task by task."""
    if kind.endswith("untraced"):
        monkeypatch.setenv("FASTMETA_TRACE", "0")
    xs, ys, xq, yq = _batch()
    torch.manual_seed(0)
    model = _start(_net(kind, 0.2))
    reference = copy.deepcopy(model)
    meta = fastmeta.BatchedMAML(model, 0.1, 2, loss="cross_entropy")
    params = meta.adapt(xs, ys)
    _loop(reference, xs, ys, xq, yq, 2, False, query=False)
    _assert_same_buffers(model, reference)
    with torch.no_grad():  # the loop's passes update under no_grad too
        meta.predict(params, xq)
    learned = {n for n, p in reference.named_parameters() if p.requires_grad}  # (not the statistics held as ones)
    for t in range(xq.shape[0]):
        functional_call(reference, {n: p[t] for n, p in params.items() if n in learned}, (xq[t],))
    _assert_same_buffers(model, reference)


def test_eval_mode_and_untracked_statistics_are_left_alone():
    xs, ys, xq, yq = _batch()
    model = _start(_net("conv4", 0.1))
    meta = fastmeta.BatchedMAML(model, 0.1, 1, loss="cross_entropy")
    before = copy.deepcopy(model)
    model.eval()
    meta(xs, ys, xq, yq)
    _assert_same_buffers(model, before)
    untracked = _net("conv4", 0.1)
    for m in untracked.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.track_running_stats = False
    fastmeta.BatchedMAML(untracked, 0.1, 1, loss="cross_entropy")(xs, ys, xq, yq)
    assert all(m.num_batches_tracked.item() == 0 for m in untracked.modules() if isinstance(m, nn.BatchNorm2d))


def test_a_failed_call_updates_nothing():
    xs, ys, xq, yq = _batch()
    model = _start(_net("conv4", 0.1))
    before = copy.deepcopy(model)
    meta = fastmeta.BatchedMAML(model, 0.1, 1, loss="cross_entropy")
    with pytest.raises(ValueError, match="labels outside"):
        meta(xs, ys, xq, yq + 3)  # the query's labels fail after the support pass
    _assert_same_buffers(model, before)


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpp", marks=requires_cpp)])
def test_recomputed_later_blocks_run_on_the_forward_backend(backend):
    """recompute=True in first order keeps only the later conv blocks' inputs and recomputes them in
    the backward: on the backend of the forward, also where the backward comes after the module's
    backend (or a use_backend block) has ended. Before, a BatchedMAML(backend='torch') recomputed on
    the auto choice and torch.utils.checkpoint failed on the different saved tensors."""
    xs, ys, xq, yq = _batch()
    for track, (first_order, steps) in itertools.product([False, True], [(True, 1), (False, 0)]):
        model = _net("conv4", 0.1)
        if not track:
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.track_running_stats = False
        params = list(model.parameters())
        plain = fastmeta.BatchedMAML(model, 0.1, steps, first_order=first_order, loss="cross_entropy",
                                     backend=backend)
        want = torch.autograd.grad(plain(xs, ys, xq, yq), params)
        meta = fastmeta.BatchedMAML(model, 0.1, steps, first_order=first_order, loss="cross_entropy",
                                    backend=backend, recompute=True)
        got = torch.autograd.grad(meta(xs, ys, xq, yq), params)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_tune_leaves_running_stats_as_they_were():
    """fastmeta.tune's timed steps are not passes of the user's: the statistics come back unchanged."""
    xs, ys, xq, yq = _batch()
    model = _start(_net("conv4", 0.1))
    before = copy.deepcopy(model)
    meta = fastmeta.BatchedMAML(model, 0.1, 1, loss="cross_entropy")
    fastmeta.tune(meta, xs, ys, xq, yq, reps=1, warmup=0, per_op=False)
    _assert_same_buffers(model, before)
    meta(xs, ys, xq, yq)
    assert int(model[1].num_batches_tracked) == 4 + 3 * 2


def test_explain_says_which_statistics_are_updated():
    model = _net("conv4", 0.1)
    assert "running statistics (2 module(s)" in fastmeta.explain(model)
    model.eval()
    assert "running statistics" not in fastmeta.explain(model)


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpp", marks=requires_cpp)])
def test_a_batch_norm_used_twice(backend):
    """A BatchNorm at two places of the model updates its statistics at each use, in the order of
    the uses within each task's pass; the reference is fastmeta.MAML's per-task loop, whose clones
    share the buffers and call the module as the model does."""
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(8, momentum=0.2)
    model = _start(nn.Sequential(nn.Flatten(), nn.Linear(16, 8), bn, nn.Tanh(), nn.Linear(8, 8), bn, nn.Tanh(),
                                 nn.Linear(8, 3)).double())
    reference = copy.deepcopy(model)
    xs, ys, xq, yq = _batch()
    maml = fastmeta.MAML(reference, lr=0.1)
    for t in range(xs.shape[0]):
        learner = maml.clone()
        for _ in range(2):
            learner.adapt(F.cross_entropy(learner(xs[t]), ys[t]))
        learner(xq[t])
    meta = fastmeta.BatchedMAML(model, 0.1, 2, loss="cross_entropy", backend=backend)
    meta(xs, ys, xq, yq)
    _assert_same_buffers(model, reference)
    assert int(bn.num_batches_tracked) == 4 + 3 * 3 * 2


@pytest.mark.parametrize("kind", ["functional", "functional-buffers"])
def test_functional_statistics_follow_a_conversion_of_the_model(kind):
    """model.double() (as .to(device)) replaces a model's buffers: a traced F.batch_norm reads its
    statistics from the model at each use, so the next call updates the new ones, as the loop's."""
    xs, ys, xq, yq = _batch()
    torch.manual_seed(0)
    model = _start(_net(kind, 0.2)).float()
    reference = copy.deepcopy(model)
    meta = fastmeta.BatchedMAML(model, 0.1, 1, loss="cross_entropy")
    single = [t.float() if t.is_floating_point() else t for t in (xs, ys, xq, yq)]
    meta(*single)
    _loop(reference, *single, 1, False)
    model.double()
    reference.double()
    meta(xs, ys, xq, yq)
    _loop(reference, xs, ys, xq, yq, 1, False)
    assert model.statistics()[0].dtype == torch.float64
    for a, b in zip(model.statistics(), reference.statistics()):  # (float32's rounding of the first call)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
