"""Shared fixtures: seeding, tolerances, the naive per-task oracle, comparison with a report."""
import contextlib
import glob
import os

os.environ.setdefault("FASTMETA_POISON", "1")  # C++ outputs start as NaN: unwritten elements fail
if not glob.glob("/dev/nvidia[0-9]*"):
    # no GPU: Triton kernels run in the interpreter (must be set before triton is imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
import torch.nn.functional as F

# Relative tolerances of a meta-gradient against the per-task autograd loop. float64: the two
# compute the same sums in different orders, so only rounding differs (~1e-15 per op); float32:
# S steps of second-order products amplify rounding to ~1e-6..1e-5.
RTOL = {torch.float64: 1e-10, torch.float32: 1e-4}


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(1234)
    yield


def rel_err(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def assert_rel_close(got, want, rtol, what=""):
    """Per-tensor relative (Frobenius) error check with a report of where and how much.

    A tensor whose true value is (near) zero, e.g. the gradient of a conv bias that BatchNorm
    cancels, has no meaningful relative error: its error is measured against 1e-2 of the norm of
    the whole list instead."""
    assert len(got) == len(want), f"{what}: {len(got)} tensors vs {len(want)}"
    total = float(torch.sqrt(sum((w.double() ** 2).sum() for w in want)))
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape, f"{what}[{i}]: shape {tuple(g.shape)} vs {tuple(w.shape)}"
        assert torch.isfinite(g).all(), f"{what}[{i}]: non-finite values at {(~torch.isfinite(g)).nonzero()[:5].tolist()}"
        scale = max(float(w.double().norm()), 1e-2 * total, 1e-30)
        err = float((g.double() - w.double()).norm()) / scale
        if err > rtol:
            idx = (g - w).abs().argmax()
            raise AssertionError(f"{what}[{i}] {tuple(g.shape)}: relative error {err:.3e} > {rtol:.0e}; "
                                 f"worst at flat index {int(idx)}: {float(g.flatten()[idx])!r} vs "
                                 f"{float(w.flatten()[idx])!r}")


def make_mlp_batch(widths, T, K, Q, loss, dtype, device="cpu"):
    """Meta-parameters [W_1, b_1, ...] of an MLP with these widths and a batch (xs, ys, xq, yq) of T
    tasks (K support, Q query rows; MSE targets or class labels)."""
    params = []
    for i in range(len(widths) - 1):
        params += [(torch.randn(widths[i + 1], widths[i], dtype=dtype) / widths[i] ** 0.5).to(device).requires_grad_(),
                   (0.1 * torch.randn(widths[i + 1], dtype=dtype)).to(device).requires_grad_()]
    xs = torch.randn(T, K, widths[0], dtype=dtype).to(device)
    xq = torch.randn(T, Q, widths[0], dtype=dtype).to(device)
    if loss == "mse":
        ys = torch.randn(T, K, widths[-1], dtype=dtype).to(device)
        yq = torch.randn(T, Q, widths[-1], dtype=dtype).to(device)
    else:
        ys, yq = torch.randint(0, widths[-1], (T, K)).to(device), torch.randint(0, widths[-1], (T, Q)).to(device)
    return params, (xs, ys, xq, yq)


def task_loss(kind, pred, target):
    if kind == "mse":
        return F.mse_loss(pred, target)
    if kind == "cross_entropy":
        return F.cross_entropy(pred, target)
    return kind(pred, target)


def loop_meta_grads(model, xs, ys, xq, yq, lr, steps, loss="mse", first_order=False, lrs=None, adapted=None,
                    per_step=False, step_weights=None, at_step=None, extra=()):
    """The oracle: a naive per-task loop with autograd.grad(create_graph=True).

    lr: a number (or tensor), or lrs: dict name -> per-parameter rate (Meta-SGD), or one rate a
    step (per_step: lrs[name][step]).
    adapted: the names of the parameters the inner steps adapt (default: all that require grad).
    step_weights: a task's loss is sum_s w_s * its query loss after step s (computed right after the
    step's update where w_s != 0, and after the last step), as MAML++'s multi-step loss.
    at_step(p, s) -> (params, buffers or None): what the forward passes of step s (its support
    pass, the query after it; the last query: s = steps - 1) run with (per-step BatchNorm); extra:
    more tensors whose gradients are returned after the rates'.
    Returns (meta-loss, grads of the model params that require grad, grads of lrs or None[, grads
    of extra])."""
    from fastmeta.plan import call_with, slot_names

    named = dict(model.named_parameters())
    learned = [n for n, p in named.items() if p.requires_grad]
    adapt = learned if adapted is None else [n for n in learned if n in adapted]
    slots = slot_names(model)  # functional_call over each module attribute once (tied modules)
    T = xs.shape[0]
    total = 0.0
    def run(p, x, s):
        if at_step is None:
            return call_with(model, p, (x,), names=slots)
        params, buffers = at_step(p, s)
        return call_with(model, params, (x,), buffers=buffers, names=slots)

    for t in range(T):
        p = dict(named)
        for step in range(steps):
            l = task_loss(loss, run(p, xs[t], step), ys[t])
            g = torch.autograd.grad(l, [p[n] for n in adapt], create_graph=not first_order,
                                    retain_graph=True, allow_unused=True)
            for n, gi in zip(adapt, g):
                if gi is None:
                    continue
                rate = (lrs[n][step] if per_step else lrs[n]) if lrs is not None else lr
                p[n] = p[n] - rate * gi
            if step_weights is not None and step + 1 < steps and step_weights[step] != 0:
                total = total + step_weights[step] * task_loss(loss, run(p, xq[t], step), yq[t])
        last = task_loss(loss, run(p, xq[t], max(steps - 1, 0)), yq[t])
        total = total + (last if step_weights is None else step_weights[-1] * last)
    meta = total / T
    rates = list(lrs.values()) if lrs is not None else []
    inputs = [named[n] for n in learned] + rates + list(extra)
    g = torch.autograd.grad(meta, inputs, allow_unused=True)
    g = [torch.zeros_like(i) if gi is None else gi for i, gi in zip(inputs, g)]
    out = meta.detach(), g[: len(learned)], (g[len(learned):len(learned) + len(rates)] if lrs is not None else None)
    return out + (g[len(learned) + len(rates):],) if extra else out


def load_example(name: str):
    """examples/<name>.py as a module (the examples are scripts, not a package)."""
    import importlib.util
    path = os.path.join(os.path.dirname(__file__), "..", "examples", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def has_cpp():
    from fastmeta.backend import why_unavailable
    return why_unavailable("cpp", "cpu") is None


requires_cpp = pytest.mark.skipif(not has_cpp(), reason="fastmeta._C not built")


def small_conv_net(dtype, in_channels: int, blocks: int, head_in: int):
    """A conv4-style net for the tests: `blocks` Conv2d(3x3, 4 channels) -> BatchNorm2d (batch
    statistics) -> ReLU -> MaxPool2d(2) blocks and a linear head of head_in features to 5 classes."""
    from torch import nn
    torch.manual_seed(0)
    layers, c = [], in_channels
    for _ in range(blocks):
        layers += [nn.Conv2d(c, 4, 3, padding=1), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU(),
                   nn.MaxPool2d(2)]
        c = 4
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(head_in, 5)).to(dtype)


@contextlib.contextmanager
def counted_steps(model):
    """Within it, the calls of each step of model's (cached) program are counted: yields the dict
    step index -> calls. The counting program is dropped from the cache on leaving."""
    from fastmeta import plan
    calls = {}
    for i, step in enumerate(plan.lower(model).steps):
        def counted(x, P, i=i, run=step.run):
            calls[i] = calls.get(i, 0) + 1
            return run(x, P)
        step.run = counted
    try:
        yield calls
    finally:
        plan._cache.pop(model, None)


def conv2_net(track=False):
    """Two conv blocks (1 -> 4 -> 4 channels, BatchNorm with or without running statistics) and a
    linear head of 16 features to 3 classes (8 x 8 images), float64: ANIL's and MAML++'s tests."""
    from torch import nn
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4, track_running_stats=track), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4, track_running_stats=track), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16, 3)).double()


def assert_grads_close(got, want, rtol=1e-10):
    """Each of got (a meta-gradient: tensors, none None) within rtol of the largest entry of want."""
    scale = max(w.abs().max().item() for w in want)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a is not None and a.shape == b.shape
        assert (a - b).abs().max().item() <= rtol * scale


def assert_meta_sgd_case_matches_loop(model, batch, lr, steps, loss, backend, first_order, meta_sgd, g, what, **kw):
    """BatchedMAML(model) on ``backend`` against the per-task loop (float64): the loss (1e-10), the
    meta-gradient and, with Meta-SGD (rates drawn from ``g`` around lr), the rates' gradients
    (1e-9), and autograd.grad of the forward against value_and_grad (1e-10)."""
    import fastmeta

    rates = None
    if meta_sgd:
        rates = {n: lr * (0.5 + torch.rand(p.shape, generator=g, dtype=p.dtype)) for n, p in model.named_parameters()
                 if p.requires_grad}
    lrs = None if rates is None else {n: r.clone().requires_grad_() for n, r in rates.items()}
    want_loss, want, want_lr = loop_meta_grads(model, *batch, lr, steps, loss, first_order, lrs=lrs)
    with fastmeta.use_backend(backend):
        meta = fastmeta.BatchedMAML(model, lr, steps, first_order=first_order, loss=loss, learn_inner_lr=meta_sgd,
                                    **kw)
        if rates is not None:
            with torch.no_grad():
                for n, r in rates.items():
                    meta.lrs[n.replace(".", "__")].copy_(r)
        got_loss, grads = meta.value_and_grad(*batch)
        learned = [p.requires_grad for p in meta.parameters()]
        learned_params = [p for p in meta.parameters() if p.requires_grad]
        by_autograd = torch.autograd.grad(meta(*batch), learned_params, allow_unused=True)  # (under no_grad: none)
        by_autograd = [torch.zeros_like(p) if g is None else g for g, p in zip(by_autograd, learned_params)]
    named = dict(zip([n for n, _ in meta.named_parameters()], grads))
    names = [n for n, p in model.named_parameters() if p.requires_grad]  # (not statistics held as Parameters)
    assert abs(got_loss.item() - want_loss.item()) <= 1e-10 * abs(want_loss.item()), what
    assert_rel_close([named[f"model.{n}"] for n in names], want, 1e-9, f"meta-grad of {what}")
    assert_rel_close(list(by_autograd), [g for g, keep in zip(grads, learned) if keep], 1e-10,
                     f"autograd vs value_and_grad of {what}")
    if rates is not None:
        assert_rel_close([named[f"lrs.{n.replace('.', '__')}"] for n in names], want_lr, 1e-9, f"rate grad of {what}")
