"""Randomly drawn models against the per-task loop: conv nets with every Conv2d setting the planner
lowers (kernel size, stride, padding, dilation, groups, bias), BatchNorm with and without affine
weights or running statistics, each activation, max / average pooling, through BatchedMAML on the
torch and cpp backends (first and second order, MAML and Meta-SGD); and MLPs of random depth,
widths, activations and loss through the fused kernel against its reference. The draws are fixed
by their seeds, so a failure names a reproducible case."""
import math
import random

import pytest
import torch
from torch import nn

import fastmeta
from fastmeta import ops
from conftest import assert_rel_close, has_cpp, loop_meta_grads, make_mlp_batch

BACKENDS = ["torch"] + (["cpp"] if has_cpp() else [])
ACTIVATIONS = [nn.ReLU, lambda: nn.LeakyReLU(0.1), nn.Tanh, nn.Sigmoid, nn.Identity]


def _out(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def random_conv_case(seed):
    """(model, batch, inner_lr, steps, first_order, rates or None, description), float64."""
    rnd = random.Random(seed)
    torch.manual_seed(seed)
    C, H = rnd.choice([1, 2, 3]), rnd.choice([5, 6, 7, 8, 9])
    W = rnd.choice([H, H + 1, 5])
    layers, desc, c, h, w = [], [], C, H, W
    for _ in range(rnd.randint(1, 3)):
        co, k, s = rnd.choice([2, 3, 4, 6]), rnd.choice([1, 2, 3]), rnd.choice([1, 1, 2])
        p, d = rnd.choice([0, 1, 2]), rnd.choice([1, 1, 2])
        g = rnd.choice([1, 1, math.gcd(c, co)])
        if _out(h, k, s, p, d) < 1 or _out(w, k, s, p, d) < 1:
            break
        layers.append(nn.Conv2d(c, co, k, stride=s, padding=p, dilation=d, groups=g, bias=rnd.random() < 0.7))
        desc.append(f"Conv2d({c}, {co}, {k}, stride={s}, padding={p}, dilation={d}, groups={g})")
        c, h, w = co, _out(h, k, s, p, d), _out(w, k, s, p, d)
        if rnd.random() < 0.6:
            layers.append(nn.BatchNorm2d(c, affine=rnd.random() < 0.8, track_running_stats=rnd.random() < 0.5))
            desc.append(repr(layers[-1]))
        layers.append(rnd.choice(ACTIVATIONS)())
        desc.append(repr(layers[-1]))
        r = rnd.random()
        if r < 0.4 and min(h, w) >= 2:
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        elif r < 0.55 and min(h, w) >= 3:
            layers.append(nn.MaxPool2d(3, stride=1, padding=1))
        elif r < 0.7 and min(h, w) >= 2:
            layers.append(nn.AvgPool2d(2))
            h, w = h // 2, w // 2
        else:
            continue
        desc.append(repr(layers[-1]))
    ways = rnd.choice([2, 3, 5])
    model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(c * h * w, ways)).double()
    # the order, the steps and Meta-SGD by the seed, so that a dozen draws cover each
    T, K, Q = rnd.choice([1, 2, 3]), rnd.choice([2, 3, 5]), rnd.choice([2, 4, 6])
    S, first_order, lr = (0 if seed % 8 == 5 else 1 + seed % 2), seed % 4 >= 2, rnd.choice([0.1, 0.4])
    rates = None
    if seed % 3 == 0:
        rates = {n: lr * (0.5 + torch.rand_like(p)) for n, p in model.named_parameters()}
    batch = (torch.randn(T, K, C, H, W, dtype=torch.float64), torch.randint(0, ways, (T, K)),
             torch.randn(T, Q, C, H, W, dtype=torch.float64), torch.randint(0, ways, (T, Q)))
    desc.append(f"input {C}x{H}x{W}, T={T} K={K} Q={Q} S={S} first_order={first_order} "
                f"meta_sgd={rates is not None}")
    return model, batch, lr, S, first_order, rates, "; ".join(desc)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", range(16))
def test_random_conv_net(seed, backend):
    model, batch, lr, steps, first_order, rates, desc = random_conv_case(seed)
    lrs = None if rates is None else {n: r.clone().requires_grad_() for n, r in rates.items()}
    want_loss, want, want_lr = loop_meta_grads(model, *batch, lr, steps, "cross_entropy", first_order, lrs=lrs)
    with fastmeta.use_backend(backend):
        meta = fastmeta.BatchedMAML(model, lr, steps, first_order=first_order, loss="cross_entropy",
                                    learn_inner_lr=rates is not None)
        if rates is not None:
            with torch.no_grad():
                for n, r in rates.items():
                    meta.lrs[n.replace(".", "__")].copy_(r)
        loss, grads = meta.value_and_grad(*batch)
        by_autograd = torch.autograd.grad(meta(*batch), list(meta.parameters()), allow_unused=True)
    named = dict(zip([n for n, _ in meta.named_parameters()], grads))
    names = [n for n, _ in model.named_parameters()]
    got = [named[f"model.{n}"] for n in names]
    assert abs(loss.item() - want_loss.item()) <= 1e-10 * abs(want_loss.item()), desc
    assert_rel_close(got, want, 1e-8, f"meta-grad of {desc}")
    assert_rel_close([g if g is not None else torch.zeros_like(w) for g, w in zip(by_autograd, grads)], grads,
                     1e-10, f"autograd vs value_and_grad of {desc}")
    if rates is not None:
        assert_rel_close([named[f"lrs.{n.replace('.', '__')}"] for n in names], want_lr, 1e-8,
                         f"rate grad of {desc}")


def random_mlp_case(seed):
    rnd = random.Random(seed)
    torch.manual_seed(seed)
    L = rnd.randint(1, 4)
    widths = [rnd.choice([1, 2, 3, 5, 8, 17, 33, 40, 65])] + [rnd.choice([1, 2, 3, 7, 9, 16, 37, 40, 63, 100])
                                                               for _ in range(L)]
    loss = rnd.choice(["mse", "cross_entropy"])
    if loss == "cross_entropy" and widths[-1] < 2:
        widths[-1] = 5
    acts = [rnd.choice(["relu", "leaky_relu", "tanh", "sigmoid", None]) for _ in range(L)]
    T, K, Q, S = rnd.choice([rnd.randint(1, 9), rnd.randint(17, 33)]), rnd.randint(1, 12), rnd.randint(1, 12), \
        rnd.randint(1, 4)
    first_order, slope, lr = rnd.random() < 0.5, rnd.choice([0.01, 0.2, -0.3, 0.0]), rnd.choice([0.01, 0.1])
    params, batch = make_mlp_batch(widths, T, K, Q, loss, torch.float64)
    if rnd.random() < 0.4:
        lr = [(torch.rand_like(p) + 0.5).mul_(lr).requires_grad_() for p in params]
    desc = f"widths={widths} acts={acts} loss={loss} T={T} K={K} Q={Q} S={S} first_order={first_order} " \
           f"slope={slope} meta_sgd={isinstance(lr, list)}"
    return params, batch, lr, S, acts, slope, loss, first_order, desc


@pytest.mark.skipif(not has_cpp(), reason="fastmeta._C not built")
@pytest.mark.parametrize("seed", range(16))
def test_random_mlp_fused(seed):
    params, batch, lr, steps, acts, slope, loss, first_order, desc = random_mlp_case(seed)
    wrt = params + (lr if isinstance(lr, list) else [])
    out = {}
    for backend in ("torch", "cpp"):
        with fastmeta.use_backend(backend):
            losses = ops.mlp_inner_loop(*batch, params, lr, steps, acts, slope, loss, first_order)
        weights = torch.randn(losses.shape[0], dtype=losses.dtype, generator=torch.Generator().manual_seed(seed))
        out[backend] = (losses.detach(), torch.autograd.grad((losses * weights).sum(), wrt))
    assert_rel_close([out["cpp"][0]], [out["torch"][0]], 1e-10, f"losses of {desc}")
    assert_rel_close(list(out["cpp"][1]), list(out["torch"][1]), 1e-8, f"meta-grad of {desc}")


def test_fuzz_driver_tells_a_tie_from_a_failure(monkeypatch, capsys):
    """tests/fuzz_models.py (the longer campaign): passes on good draws; a mismatch is a failure
    where the reference is stable under a 1e-12 move of a parameter, and reported as a tie or kink
    where it is not (seed 8828: a BatchNorm channel of equal entries, normalized to rounding noise
    that decides a ReLU and a max)."""
    import fuzz_models
    assert fuzz_models.main(["--seeds", "16:20", "--kinds", "conv,variants,mlp"]) == 0
    if fuzz_models.why_unavailable("triton", "cpu") is None:  # (the interpreter, as the tests run it)
        assert fuzz_models.main(["--seeds", "1:2", "--kinds", "triton-conv,triton-mlp"]) == 0
        assert "2 passed" in capsys.readouterr().out
    model, _, reference, _ = fuzz_models.conv_case(16)
    assert fuzz_models.moves_under_perturbation(model, reference) is None
    model, _, reference, _ = fuzz_models.conv_case(8828)
    assert "the reference moves by" in fuzz_models.moves_under_perturbation(model, reference)
    assert fuzz_models.verdict(model, reference)[0] == "tie or kink"
    model, _, reference, _ = fuzz_models.conv_case(16)
    assert fuzz_models.verdict(model, reference)[0] == "failed"
    if has_cpp():  # a linear MLP whose Meta-SGD inner loop overflows to inf and nan
        model, _, reference, _ = fuzz_models.mlp_case(27339)
        assert fuzz_models.verdict(model, reference)[0] == "diverged"
    real = fastmeta.BatchedMAML.value_and_grad

    def off(self, *a, **k):  # a meta-gradient 1e-6 off
        loss, grads = real(self, *a, **k)
        return loss, [None if g is None else g * (1 + 1e-6) for g in grads]
    monkeypatch.setattr(fastmeta.BatchedMAML, "value_and_grad", off)
    capsys.readouterr()
    assert fuzz_models.main(["--seeds", "8828:8829", "--kinds", "conv"]) == 0
    assert "tie or kink: conv seed 8828" in capsys.readouterr().out
    assert fuzz_models.main(["--seeds", "16:17", "--kinds", "conv"]) == 1
    out = capsys.readouterr().out
    assert "failed: conv seed 16" in out and "the reference is stable there" in out
