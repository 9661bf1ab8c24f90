"""fastmeta.MAML / MetaSGD on a conv net: a learner's forward runs BatchedMAML's program of the
original model on one task (its BatchNorm -> ReLU -> MaxPool2d(2) blocks on the fused op whose
second-order derivative is closed-form) where the module's call computes the same; meta-gradients
and BatchNorm running statistics as the module's own calls give them, and every case left to the
module."""
import copy
import pickle

import pytest
import torch
from torch import nn

import fastmeta
from fastmeta import maml as M
from conftest import assert_rel_close, loop_meta_grads


def conv_net(dtype=torch.float64, momentum=0.1):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3, momentum=momentum), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5, momentum=momentum),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(5, 4)).to(dtype)


def batch(dtype=torch.float64, T=2):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(T, 6, 1, 7, 7, dtype=dtype, generator=g), torch.randint(0, 4, (T, 6), generator=g),
            torch.randn(T, 5, 1, 7, 7, dtype=dtype, generator=g), torch.randint(0, 4, (T, 5), generator=g))


def drive(cls, model, b, steps, first_order, backend="auto"):
    xs, ys, xq, yq = b
    ce = nn.functional.cross_entropy
    with fastmeta.use_backend(backend):
        maml = cls(model, lr=0.1, first_order=first_order)
        total = 0.0
        for t in range(xs.shape[0]):
            learner = maml.clone()
            assert (M._conv_program(learner._root, learner.module, xs[t]) is not None) == (backend != "torch")
            for _ in range(steps):
                learner.adapt(ce(learner(xs[t]), ys[t]))
            total = total + ce(learner(xq[t]), yq[t])
        extra = list(maml.lrs) if cls is fastmeta.MetaSGD else []
        return torch.autograd.grad(total / xs.shape[0], list(model.parameters()) + extra)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_maml_on_the_program_matches_the_loop_and_the_running_statistics(first_order, momentum):
    b = batch()
    models = [conv_net(momentum=momentum) for _ in range(3)]
    got = drive(fastmeta.MAML, models[0], b, 2, first_order)
    ref = drive(fastmeta.MAML, models[1], b, 2, first_order, backend="torch")  # the module's own calls
    _, want, _ = loop_meta_grads(models[2], *b, 0.1, 2, "cross_entropy", first_order)
    assert_rel_close(list(got), want, 1e-10, "meta-gradient vs the loop")
    assert_rel_close(list(got), list(ref), 1e-10, "meta-gradient vs the module's calls")
    for (name, a), r in zip(models[0].named_buffers(), models[1].buffers()):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12, msg=lambda m: f"{name}: {m}")  # noqa: B023
    assert int(models[0][1].num_batches_tracked) == 2 * (2 + 1)  # each task's support passes and query


@pytest.mark.parametrize("first_order", [False, True])
def test_metasgd_on_the_program(first_order):
    b = batch()
    got = drive(fastmeta.MetaSGD, conv_net(), b, 2, first_order)
    ref = drive(fastmeta.MetaSGD, conv_net(), b, 2, first_order, backend="torch")
    assert_rel_close(list(got), list(ref), 1e-10, "MetaSGD meta-gradient and rates' gradient")


def test_eval_mode_and_a_changed_model():
    """A model put in eval mode runs its program for eval mode (BatchNorm on running statistics);
    a clone whose mode differs from the original's, or a model whose modules were replaced, is
    called as it is or lowered again."""
    x = batch()[0][0]
    model = conv_net()
    maml = fastmeta.MAML(model, lr=0.1)
    model.eval()
    learner = maml.clone()
    assert M._conv_program(learner._root, learner.module, x) is not None
    torch.testing.assert_close(learner(x), learner.module(x), rtol=1e-12, atol=1e-12)
    model.train()
    learner = maml.clone()
    learner.module[1].eval()  # the clone's BatchNorm only
    assert M._conv_program(learner._root, learner.module, x) is None
    model[2] = nn.Tanh()  # the original changed: lowered again, and run
    learner = maml.clone()
    program = M._conv_program(learner._root, learner.module, x)
    assert program is not None and any(s.kind != "bn_relu_pool" for s in program.steps[:3])
    with fastmeta.use_backend("torch"):
        want = maml.clone()(x)
    torch.testing.assert_close(learner(x), want, rtol=1e-12, atol=1e-12)


def test_what_is_left_to_the_module():
    xs = batch()[0]
    x = xs[0]
    hooked = conv_net()
    hooked[4].register_forward_hook(lambda m, i, o: o * 2)
    dropout = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Dropout(0.5), nn.Flatten(), nn.Linear(75, 2)).double()
    grad_buffer = conv_net()
    grad_buffer[1].running_mean.requires_grad_()
    for model in (hooked, dropout, grad_buffer):
        learner = fastmeta.MAML(model, lr=0.1).clone()
        assert M._conv_program(learner._root, learner.module, x) is None
    learner = fastmeta.MAML(hooked, lr=0.1).clone()
    torch.testing.assert_close(learner(x), hooked(x))  # the hook ran
    learner = fastmeta.MAML(conv_net(), lr=0.1).clone()
    assert M._conv_program(learner._root, learner.module, x[0]) is None  # one unbatched image
    assert M._conv_program(learner._root, learner.module, x.float()) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert M._conv_program(learner._root, learner.module, x) is None
    with fastmeta.use_backend("torch"):
        assert M._conv_program(learner._root, learner.module, x) is None
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    try:
        assert M._conv_program(learner._root, learner.module, x) is None
    finally:
        handle.remove()
    with torch.no_grad():  # evaluation: the module's call
        torch.testing.assert_close(learner(x), learner.module(x))


def test_learners_still_copy_and_pickle():
    b = batch()
    maml = fastmeta.MAML(conv_net(), lr=0.1)
    for other in (copy.deepcopy(maml), pickle.loads(pickle.dumps(maml))):
        learner = other.clone()
        assert M._conv_program(learner._root, learner.module, b[0][0]) is not None
        learner.adapt(nn.functional.cross_entropy(learner(b[0][0]), b[1][0]))
        assert learner.__dict__["_root"] is other.module


def test_a_batch_that_requires_grad():
    """An input that requires grad (an adversarial or learned support set): its gradient through
    the inner step and the query, as the module's calls give it."""
    xs, ys = batch()[:2]
    out = []
    for backend in ("auto", "torch"):
        x = xs[0].clone().requires_grad_()
        model = conv_net()
        with fastmeta.use_backend(backend):
            learner = fastmeta.MAML(model, lr=0.1).clone()
            learner.adapt(nn.functional.cross_entropy(learner(x), ys[0]))
            query = nn.functional.cross_entropy(learner(x), ys[0])
        out.append(torch.autograd.grad(query, [x] + list(model.parameters())))
    assert_rel_close(list(out[0]), list(out[1]), 1e-10, "gradients with a batch that requires grad")


def test_explain_says_how_a_learner_runs_its_forward():
    said = fastmeta.explain(conv_net())
    assert "fastmeta.MAML / MetaSGD learners' forward: on a batch of images [N, C, H, W], BatchedMAML's program" in said
    with fastmeta.use_backend("torch"):
        assert "learners' forward: the module's call" in fastmeta.explain(conv_net())
    dropout = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Dropout(0.5), nn.Flatten(), nn.Linear(75, 2)).double()
    assert "learners' forward: the module's call" in fastmeta.explain(dropout)
    mlp = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    assert "learners' forward: ops.mlp_forward (backend cpp)" in fastmeta.explain(mlp)
    # (3 * 5 + 5 * 2 = 25 multiply-adds a row: the loops up to 2^17 // 25 rows)
    assert "as plain loops on batches of up to 5242 rows, through ATen's calls above" in fastmeta.explain(mlp)
    from fastmeta import _C
    before = _C._mlp_forward_small_macs(-1)
    try:
        assert "second-order product in closed form; through ATen's calls" in fastmeta.explain(mlp)
    finally:
        _C._mlp_forward_small_macs(before)
    gelu = nn.Sequential(nn.Linear(3, 5), nn.GELU(), nn.Linear(5, 2)).double()
    assert "learners' forward: the module's call" in fastmeta.explain(gelu)
