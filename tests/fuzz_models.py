"""Random conv nets and MLPs, and BatchedMAML's variants on them, each against its reference, seed
after seed: the draws and checks of tests/test_random_models.py (which runs 16 fixed seeds of the
conv and mlp kinds in CI), as a longer campaign.

    python tests/fuzz_models.py [--seeds 16:2000] [--seconds 600] [--kinds conv,variants,mlp]
                                [--kinds triton-conv,triton-mlp]

Kinds:
  conv      random conv nets through BatchedMAML (backends torch and cpp) against the
            per-task loop: loss, meta-gradient, Meta-SGD rates' gradients, autograd = value_and_grad;
  variants  the same nets with a random choice of learned rates (Meta-SGD, per layer, per layer and
            step), per-step BatchNorm, the multi-step loss and a head-only inner loop, on a random
            backend with random memory switches (task_chunk, recompute, checkpoint_steps), against
            the torch backend without switches;
  mlp       random MLPs on the fused kernel against its reference;
  mlp-modules
            those MLPs as nn.Sequential models through BatchedMAML on the cpp backend (value_and_grad
            and forward called three times: checked, then bound to the kernel), with a fixed rate,
            Meta-SGD's, or MAML++'s per layer or per layer and step (with the multi-step loss),
            against the per-task loop;
  modules, modules-variants
            conv and variants on random nets of the other lowered modules (Conv1d, GroupNorm,
            InstanceNorm, LayerNorm, the 1d and adaptive pools, every elementwise activation,
            LogSoftmax);
  traced, traced-modules
            conv on those nets (conv's and modules') rewritten as custom modules whose forwards call
            them in turn, with activations as functions (F.relu, torch.tanh, x.sigmoid(), ...),
            Flatten as x.view(x.size(0), -1) and the like, BatchNorm as F.batch_norm on its tensors,
            extra code between the modules and skip connections (x + f(x)) around some, some
            modules called as module(x, params=None) or behind a rank check torch.fx cannot
            trace (called whole): the planner traces the forwards (torch.fx);
  triton-conv, triton-mlp
            conv and mlp on the Triton kernels (backend triton; without a GPU in the interpreter,
            TRITON_INTERPRET=1 as the tests set it: slow, so not in the default kinds).

A draw can sit where the meta-loss is not differentiable: a max-pooling window whose entries tie,
a ReLU input at 0 (a BatchNorm channel whose entries are all equal normalizes to 0, its rounding
noise amplified by 1/sqrt(eps)). There the answer depends on rounding, and two correct
implementations differ. Each mismatch is therefore checked: if the reference's own answer moves by
more than 1e-6 when one parameter moves by 1e-12, the draw is reported as such a point ("tie or
kink"), not as a failure; so is a draw whose reference is not finite (an inner loop that overflows
gives inf or nan by the order of its operations: "diverged"). Exit status 1 if any other mismatch.
"""
from __future__ import annotations

import argparse
import functools
import math
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# conftest first: it sets TRITON_INTERPRET
from conftest import assert_rel_close, has_cpp, loop_meta_grads, make_mlp_batch  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import fastmeta  # noqa: E402
from fastmeta import ops  # noqa: E402
from fastmeta.backend import why_unavailable  # noqa: E402


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


# the activations beyond ACTIVATIONS: elementwise (PReLU with its per-task slope)
MORE_ACTIVATIONS = [nn.GELU, lambda: nn.GELU(approximate="tanh"), nn.SiLU, lambda: nn.ELU(0.7), lambda: nn.CELU(0.5),
                    nn.SELU, lambda: nn.Softplus(beta=2.0), nn.Mish, nn.Hardswish, nn.Hardsigmoid,
                    lambda: nn.Hardtanh(-0.5, 2.0), nn.ReLU6, nn.LogSigmoid, nn.Softsign, nn.Tanhshrink,
                    lambda: nn.Softshrink(0.1), lambda: nn.Hardshrink(0.1), lambda: nn.PReLU(init=0.2)]


def random_module_case(seed):
    """A random net of the modules lowered beyond conv4 / MLP (Conv1d, GroupNorm, InstanceNorm, LayerNorm,
    the 1d and adaptive pools, every elementwise activation, LogSoftmax) with the same tuple as
    random_conv_case: (model, batch, inner_lr, steps, first_order, rates or None, description)."""
    rnd = random.Random(seed * 31 + 7)
    torch.manual_seed(seed)
    family, first_order = rnd.choice(["conv2d", "conv1d", "mlp"]), rnd.random() < 0.4
    # (PyTorch has no second derivative of hardsigmoid: a second-order loop through it raises)
    acts = ACTIVATIONS + [a for a in MORE_ACTIVATIONS if first_order or a is not nn.Hardsigmoid]
    layers, desc = [], []
    if family == "mlp":
        d = rnd.choice([2, 3, 5])
        shape, c = (d,), d
        for _ in range(rnd.randint(1, 3)):
            o = rnd.choice([3, 8, 13])
            layers.append(nn.Linear(c, o))
            c = o
            r = rnd.random()
            if r < 0.4:
                layers.append(nn.LayerNorm(o, elementwise_affine=rnd.random() < 0.8, bias=rnd.random() < 0.8))
            elif r < 0.6:
                layers.append(nn.GroupNorm(rnd.choice([g for g in (1, 2, 3) if o % g == 0]), o,
                                           affine=rnd.random() < 0.8))
            layers.append(rnd.choice(acts)())
        flat = c
    else:
        two = family == "conv2d"
        C, L = rnd.choice([1, 2, 3]), rnd.choice([6, 7, 9])
        shape = (C, L, rnd.choice([L, 5])) if two else (C, rnd.choice([9, 12, 17]))
        c, size = C, list(shape[1:])
        for _ in range(rnd.randint(1, 2)):
            co, k, p = rnd.choice([2, 4, 6]), rnd.choice([1, 2, 3]), rnd.choice([0, 1])
            g = rnd.choice([1, 1, math.gcd(c, co)])
            if any(n + 2 * p - k + 1 < 1 for n in size):
                break
            layers.append((nn.Conv2d if two else nn.Conv1d)(c, co, k, padding=p, groups=g, bias=rnd.random() < 0.7))
            c, size = co, [n + 2 * p - k + 1 for n in size]
            r = rnd.random()
            if r < 0.45:
                layers.append(nn.GroupNorm(rnd.choice([q for q in (1, 2, co) if co % q == 0]), co,
                                           affine=rnd.random() < 0.8))
            elif r < 0.6 and math.prod(size) > 1:
                layers.append((nn.InstanceNorm2d if two else nn.InstanceNorm1d)(co, affine=rnd.random() < 0.8))
            layers.append(rnd.choice(acts)())
            if min(size) >= 2 and rnd.random() < 0.5:
                layers.append(rnd.choice([nn.MaxPool2d, nn.AvgPool2d] if two else [nn.MaxPool1d, nn.AvgPool1d])(2))
                size = [n // 2 for n in size]
        if two:
            out = (rnd.choice([1, 2]), rnd.choice([1, 3]))
            layers.append(rnd.choice([nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d])(out))
        else:
            out = (rnd.choice([1, 2, 4]),)
            layers.append(rnd.choice([nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d])(out[0]))
        layers.append(nn.Flatten())
        flat = c * math.prod(out)
    ways = rnd.choice([2, 3, 5])
    layers.append(nn.Linear(flat, ways))
    if rnd.random() < 0.2:
        layers.append(nn.LogSoftmax(dim=-1 if rnd.random() < 0.5 else 1))
    model = nn.Sequential(*layers).double()
    with torch.no_grad():  # norm weights away from their 1 / 0 start
        for m in model.modules():
            if isinstance(m, (nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm1d, nn.InstanceNorm2d)):
                for p in m.parameters():
                    p.add_(0.3 * torch.randn_like(p))
    T, K, Q = rnd.choice([1, 2, 3]), rnd.choice([2, 3, 5]), rnd.choice([2, 4, 6])
    S, lr = rnd.choice([0, 1, 2]), rnd.choice([0.1, 0.4])
    rates = None
    if rnd.random() < 0.3:
        rates = {n: lr * (0.5 + torch.rand_like(p)) for n, p in model.named_parameters()}
    batch = (torch.randn(T, K, *shape, dtype=torch.float64), torch.randint(0, ways, (T, K)),
             torch.randn(T, Q, *shape, dtype=torch.float64), torch.randint(0, ways, (T, Q)))
    desc = f"{model!r}".replace("\n", " ") + (f"; input {'x'.join(map(str, shape))}, T={T} K={K} Q={Q} S={S} "
                                               f"first_order={first_order} meta_sgd={rates is not None}")
    return model, batch, lr, S, first_order, rates, " ".join(desc.split())


class Chain(nn.Module):
    """A custom forward applying its parts in turn: modules (its children), functions, and functions
    of a module's Parameters (a (function, module) pair: the module is held, not called)."""

    def __init__(self, parts):
        super().__init__()
        self.mods = nn.ModuleList([p for p in parts if isinstance(p, nn.Module)])
        self.held = nn.ModuleList([p[1] for p in parts if isinstance(p, tuple)])
        self.order, k = [], 0
        for p in parts:
            if isinstance(p, nn.Module):
                self.order.append(k)
                k += 1
            else:
                self.order.append(p[0] if isinstance(p, tuple) else p)

    def forward(self, x):
        for p in self.order:
            if not isinstance(p, int):
                x = p(x)
            elif isinstance(self.mods[p], WithParams):
                x = self.mods[p](x, params=None)
            else:
                x = self.mods[p](x)
        return x


class WithParams(nn.Module):
    """f called as MetaModule libraries call their modules: forward(x, params=None)."""

    def __init__(self, f):
        super().__init__()
        self.f = f

    def forward(self, x, params=None):
        return self.f(x) if params is None else torch.func.functional_call(self.f, params, (x,))


class Checked(nn.Module):
    """f behind a check of its input's rank: control flow that torch.fx cannot trace, so the
    planner calls this module whole (through the vmap fallback) and traces the rest."""

    def __init__(self, f):
        super().__init__()
        self.f = f

    def forward(self, x):
        if x.dim() < 1:
            raise ValueError(f"expected a batch, got {tuple(x.shape)}")
        return self.f(x)


class Residual(nn.Module):
    """x + f(x) for a module f that keeps its input's shape: a forward that is not a chain."""

    def __init__(self, f):
        super().__init__()
        self.f = f

    def forward(self, x):
        return x + self.f(x)


def _as_function(m, rnd):
    """A function computing what parameter-free module m does, written as model code does, or m."""
    F = nn.functional
    if type(m) is nn.ReLU:
        return rnd.choice([F.relu, torch.relu, lambda x: x.relu()])
    if type(m) is nn.Tanh:
        return rnd.choice([torch.tanh, lambda x: x.tanh()])
    if type(m) is nn.Sigmoid:
        return rnd.choice([torch.sigmoid, lambda x: x.sigmoid()])
    if type(m) is nn.LeakyReLU:
        return lambda x, s=m.negative_slope: F.leaky_relu(x, s)
    if type(m) is nn.GELU:
        return lambda x, a=m.approximate: F.gelu(x, approximate=a)
    if type(m) is nn.SiLU:
        return F.silu
    if type(m) is nn.Linear:  # functional code on the module's Parameters
        return (lambda x, m=m: F.linear(x, m.weight, m.bias)), m
    if type(m) is nn.Conv2d and m.padding_mode == "zeros":
        return (lambda x, m=m: F.conv2d(x, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups)), m
    if type(m) in (nn.BatchNorm1d, nn.BatchNorm2d) and m.momentum is not None:  # on the module's tensors
        return (lambda x, m=m: F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias,
                                            m.training or m.running_mean is None, m.momentum, m.eps)), m
    if type(m) is nn.MaxPool2d:
        return lambda x, m=m: F.max_pool2d(x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)
    if type(m) is nn.Flatten and m.start_dim == 1 and m.end_dim == -1:
        return rnd.choice([lambda x: x.view(x.size(0), -1), lambda x: x.reshape(x.shape[0], -1),
                           lambda x: torch.flatten(x, 1), lambda x: x.flatten(1)])
    return m


def traced(draw):
    """``draw`` with its Sequential rewritten as Chain modules (custom forwards; a module's call kept
    or, where parameter-free, written as its function; now and then code between the modules that
    scales and shifts each value), the same tuple with the rates keyed by the new names."""
    def rewritten(seed):
        model, batch, lr, steps, first_order, rates, desc = draw(seed)
        rnd = random.Random(seed * 17 + 3)
        parts, x = [], batch[0][0]
        for m in model:
            with torch.no_grad():
                y = m(x)
            if isinstance(m, nn.Module) and any(True for _ in m.parameters()) and y.shape == x.shape and (
                    rnd.random() < 0.3):
                m = Residual(m)  # (a skip connection around it)
            part = _as_function(m, rnd) if rnd.random() < 0.6 else m
            if isinstance(part, nn.Module) and rnd.random() < 0.25:
                part = rnd.choice([WithParams, Checked])(part)
            parts.append(part)
            if rnd.random() < 0.15:
                parts.append(lambda x, a=rnd.choice([0.5, 1.5]), b=rnd.choice([-0.25, 0.3]): x * a + b)
            x = y
        cuts = (sorted(rnd.sample(range(1, len(parts)), min(len(parts) - 1, rnd.randint(0, 2))))
                if len(parts) > 1 else [])
        groups = [parts[i:j] for i, j in zip([0] + cuts, cuts + [len(parts)])]
        outer = Chain([Chain(g) if rnd.random() < 0.7 else nn.Sequential(*g) if all(
            isinstance(p, nn.Module) for p in g) else Chain(g) for g in groups])
        if rates is not None:  # (keyed by the new names, in the new model's parameter order)
            params = dict(model.named_parameters())
            by_id = {id(params[n]): r for n, r in rates.items()}
            rates = {n: by_id[id(p)] for n, p in outer.named_parameters()}
        return outer, batch, lr, steps, first_order, rates, f"traced forward of {desc}"
    return rewritten


def _rates(meta, rates):
    if rates is not None:
        with torch.no_grad():
            for n, r in rates.items():
                meta.lrs[n.replace(".", "__")].copy_(r)


def _grads(meta, batch, backend):
    """value_and_grad's (loss, grads) and autograd.grad of the forward, None filled with zeros: the
    third calls of each (the first checks the batch, the second is checked and, on the CPU MLP
    kernel, binds the call that the third takes), checked against the first calls' (1e-12)."""
    params = list(meta.parameters())
    fill = lambda gs: [g if g is not None else torch.zeros_like(p) for g, p in zip(gs, params)]  # noqa: E731
    calls = []
    with fastmeta.use_backend(backend):
        for _ in range(3):
            loss, grads = meta.value_and_grad(*batch)
            by_autograd = torch.autograd.grad(meta(*batch), params, allow_unused=True)
            calls.append([loss.detach().view(1)] + fill(grads) + fill(by_autograd))
    assert_rel_close(calls[2], calls[0], 1e-12, "third calls vs first calls")
    return loss.detach(), fill(grads), fill(by_autograd)


def _check_against_loop(meta, model, batch, backend, rates, reference):
    """meta's (rates, where learned, set to ``rates``) loss (1e-10), meta-gradient and rates'
    gradients (1e-8) against reference()'s [loss, the model's gradients, the rates'], and
    autograd.grad of its forward against its value_and_grad (1e-10)."""
    _rates(meta, rates)
    loss, grads, by_autograd = _grads(meta, batch, backend)
    named = dict(zip([n for n, _ in meta.named_parameters()], grads))
    want = reference()
    names = [n for n, _ in model.named_parameters()]
    assert abs(loss.item() - want[0].item()) <= 1e-10 * abs(want[0].item()), "loss"
    assert_rel_close([named[f"model.{n}"] for n in names], want[1:1 + len(names)], 1e-8, "meta-grad")
    if rates is not None:
        assert_rel_close([named[f"lrs.{n.replace('.', '__')}"] for n in names], want[1 + len(names):], 1e-8,
                         "rate grad")
    assert_rel_close(by_autograd, grads, 1e-10, "autograd vs value_and_grad")


def conv_case(seed, backend=None, draw=random_conv_case):
    """(model, check(), reference(), description) for a random conv net (``draw``'s) on ``backend``
    (default: cpp, torch where it is not built), or None where that backend cannot run here."""
    backend = backend or ("cpp" if has_cpp() else "torch")
    if why_unavailable(backend, "cpu") is not None:
        return None
    model, batch, lr, steps, first_order, rates, desc = draw(seed)

    def reference():
        lrs = None if rates is None else {n: r.clone().requires_grad_() for n, r in rates.items()}
        loss, grads, lr_grads = loop_meta_grads(model, *batch, lr, steps, "cross_entropy", first_order, lrs=lrs)
        return [loss.detach().view(1)] + [g.detach() for g in grads + list(lr_grads or [])]

    def check():
        meta = fastmeta.BatchedMAML(model, lr, steps, first_order=first_order, loss="cross_entropy",
                                    learn_inner_lr=rates is not None)
        _check_against_loop(meta, model, batch, backend, rates, reference)
    return model, check, reference, f"{desc}; backend {backend}"


def variants_case(seed, draw=random_conv_case):
    model, batch, lr, steps, first_order, _, desc = draw(seed)
    rnd = random.Random(seed * 13 + 5)
    T = batch[0].shape[0]
    opts = {"learn_inner_lr": rnd.choice([False, True, "per_layer", "per_layer_step"])}
    if steps > 0 and rnd.random() < 0.4 and any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        opts["per_step_bn"] = True
    if steps > 1 and rnd.random() < 0.4:
        opts["step_loss_weights"] = [rnd.random() for _ in range(steps)]
    head = f"{max(i for i, m in enumerate(model) if any(True for _ in m.parameters()))}."  # the last Linear
    if rnd.random() < 0.3:
        opts["inner_params"] = lambda name: name.startswith(head)
    switches = {}
    if T > 1 and rnd.random() < 0.4:
        switches["task_chunk"] = rnd.randint(1, T - 1)
    if rnd.random() < 0.4:
        switches["recompute"] = True
    if not first_order and steps > 0 and rnd.random() < 0.4:
        switches["checkpoint_steps"] = True
    backend = rnd.choice(["torch", "cpp"] if has_cpp() else ["torch"])

    def build(**kw):
        meta = fastmeta.BatchedMAML(model, lr, steps, first_order=first_order, loss="cross_entropy", **opts, **kw)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # learned rates spread around the inner rate
            for p in (meta.lrs.parameters() if getattr(meta, "lrs", None) is not None else ()):
                p.mul_(0.5 + torch.rand(p.shape, generator=g, dtype=p.dtype))
        return meta

    def reference():
        loss, grads, _ = _grads(build(), batch, "torch")
        return [loss.view(1)] + grads

    def check():
        loss, grads, by_autograd = _grads(build(**switches), batch, backend)
        want = reference()
        assert abs(loss.item() - want[0].item()) <= 1e-9 * abs(want[0].item()), "loss"
        assert_rel_close(grads, want[1:], 1e-7, "meta-grad")
        assert_rel_close(by_autograd, grads, 1e-9, "autograd vs value_and_grad")
    shown = {k: ("head" if callable(v) else v) for k, v in opts.items()}
    return model, check, reference, f"{desc}; {shown} {switches} on {backend}"


def mlp_case(seed, backend="cpp"):
    if why_unavailable(backend, "cpu") is not None:
        return None
    params, batch, lr, steps, acts, slope, loss, first_order, desc = random_mlp_case(seed)

    def run(backend):
        wrt = params + (lr if isinstance(lr, list) else [])
        with fastmeta.use_backend(backend):
            losses = ops.mlp_inner_loop(*batch, params, lr, steps, acts, slope, loss, first_order)
        w = torch.randn(losses.shape[0], dtype=losses.dtype, generator=torch.Generator().manual_seed(seed))
        return [losses.detach()] + list(torch.autograd.grad((losses * w).sum(), wrt))

    def check():
        got, want = run(backend), run("torch")
        assert_rel_close(got[:1], want[:1], 1e-10, "losses")
        assert_rel_close(got[1:], want[1:], 1e-8, "meta-grad")
    return _Tensors(params), check, lambda: run("torch"), f"{desc}; backend {backend}"


_ACT_MODULES = {"relu": lambda slope: nn.ReLU(), "leaky_relu": nn.LeakyReLU, "tanh": lambda slope: nn.Tanh(),
                "sigmoid": lambda slope: nn.Sigmoid()}


def mlp_module_case(seed, backend="cpp"):
    """mlp's draw as an nn.Sequential through BatchedMAML (its rates, where the draw has them, as
    learned Meta-SGD rates) against the per-task loop on that model."""
    if why_unavailable(backend, "cpu") is not None:
        return None
    params, batch, lr, steps, acts, slope, loss, first_order, desc = random_mlp_case(seed)
    layers = []
    for l, act in enumerate(acts):
        W, b = params[2 * l].detach(), params[2 * l + 1].detach()
        lin = nn.Linear(W.shape[1], W.shape[0]).double()
        with torch.no_grad():
            lin.weight.copy_(W)
            lin.bias.copy_(b)
        layers += [lin] + ([_ACT_MODULES[act](slope)] if act is not None else [])
    model = nn.Sequential(*layers)
    names = [n for n, _ in model.named_parameters()]
    # learned rates where the draw has them: Meta-SGD's (its per-entry rates), or by the seed one a
    # parameter tensor or one a tensor and step (MAML++'s, with its multi-step loss on odd seeds)
    kind = ("per_element", "per_layer", "per_layer_step")[seed % 3] if isinstance(lr, list) else None
    rates, weights = None, None
    if kind == "per_element":
        rates = dict(zip(names, (r.detach() for r in lr)))
    elif kind == "per_layer":
        rates = {n: r.detach().mean() for n, r in zip(names, lr)}
    elif kind == "per_layer_step":
        rates = {n: r.detach().flatten()[:1].repeat(steps) * torch.linspace(1.2, 0.8, steps, dtype=r.dtype)
                 for n, r in zip(names, lr)}
        weights = [0.5 + 0.1 * s for s in range(steps)] if seed % 2 else None
    lr0 = 0.05 if rates is not None else lr

    def reference():
        lrs = None if rates is None else {n: r.clone().requires_grad_() for n, r in rates.items()}
        out_loss, grads, lr_grads = loop_meta_grads(model, *batch, lr0, steps, loss, first_order, lrs=lrs,
                                                    per_step=kind == "per_layer_step", step_weights=weights)
        return [out_loss.detach().view(1)] + [g.detach() for g in grads + list(lr_grads or [])]

    def check():
        meta = fastmeta.BatchedMAML(model, lr0, steps, first_order=first_order, loss=loss,
                                    learn_inner_lr={None: False, "per_element": True}.get(kind, kind),
                                    step_loss_weights=weights)
        _check_against_loop(meta, model, batch, backend, rates, reference)
    return model, check, reference, f"{desc}; as modules, rates {kind}, step weights {weights}; backend {backend}"


class _Tensors:
    """named_parameters() over a list of tensors, for the perturbation check."""

    def __init__(self, tensors):
        self.tensors = tensors

    def named_parameters(self):
        return [(f"p{i}", t) for i, t in enumerate(self.tensors)]


def verdict(model, reference) -> tuple[str, str]:
    """What a mismatch on this draw is: ('diverged', why) where the reference's own answer is not
    finite (its inner loop overflowed: inf and nan then differ by the order of the operations),
    ('tie or kink', why) where it moves under a 1e-12 move of one parameter, else ('failed', ...)."""
    if not all(bool(torch.isfinite(t).all()) for t in reference()):
        return "diverged", "the reference is not finite (its inner loop overflowed)"
    why = moves_under_perturbation(model, reference)
    return ("tie or kink", why) if why else ("failed", "the reference is stable there")


def moves_under_perturbation(model, reference, step=1e-12, bound=1e-6) -> str | None:
    """Whether reference()'s answer moves by more than ``bound`` (relative to each tensor's largest
    entry and 1e-3 of the whole answer's) when one parameter entry moves by ``step``: how far, and
    where, or None."""
    base = [t.detach().clone() for t in reference()]
    total = max(float(torch.cat([t.flatten() for t in base]).abs().max()), 1e-30)
    worst = (0.0, None)
    for name, p in model.named_parameters():
        flat = p.detach().view(-1)
        for k in range(min(flat.numel(), 4)):
            for sign in (1, -1):
                with torch.no_grad():
                    flat[k] += sign * step
                try:
                    moved = reference()
                finally:
                    with torch.no_grad():
                        flat[k] -= sign * step
                for a, b in zip(moved, base):
                    d = float((a - b).abs().max()) / max(float(b.abs().max()), 1e-3 * total)
                    if d > worst[0]:
                        worst = (d, f"{name}[{k}] {'+' if sign > 0 else '-'}{step:g}")
    return f"the reference moves by {worst[0]:.1e} under {worst[1]}" if worst[0] > bound else None


KINDS = {"conv": conv_case, "variants": variants_case, "mlp": mlp_case, "mlp-modules": mlp_module_case,
         "modules": functools.partial(conv_case, draw=random_module_case),
         "modules-variants": functools.partial(variants_case, draw=random_module_case),
         "traced": functools.partial(conv_case, draw=traced(random_conv_case)),
         "traced-modules": functools.partial(conv_case, draw=traced(random_module_case)),
         "triton-conv": functools.partial(conv_case, backend="triton"),
         "triton-mlp": functools.partial(mlp_case, backend="triton")}
DEFAULT_KINDS = ("conv", "variants", "mlp", "modules", "modules-variants", "traced", "traced-modules")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="16:2000", help="A:B, the seeds A to B-1")
    ap.add_argument("--seconds", type=float, default=600.0, help="stop after this long")
    ap.add_argument("--kinds", default=",".join(DEFAULT_KINDS), help="comma list of " + ", ".join(KINDS))
    args = ap.parse_args(argv)
    lo, _, hi = args.seeds.partition(":")
    kinds = args.kinds.split(",")
    for k in kinds:
        if k not in KINDS:
            ap.error(f"--kinds: unknown kind {k!r} (known: {', '.join(KINDS)})")
    start, counts = time.time(), {"passed": 0, "tie or kink": 0, "diverged": 0, "failed": 0}
    last = None
    for seed in range(int(lo), int(hi)):
        for kind in kinds:
            case = KINDS[kind](seed)
            if case is None:
                continue
            model, check, reference, desc = case
            try:
                check()
                counts["passed"] += 1
            except AssertionError as e:
                what, why = verdict(model, reference)
                counts[what] += 1
                first = str(e).splitlines()[0][:300]
                print(f"{what}: {kind} seed {seed}: {first}; {why}; {desc}", flush=True)
            except Exception as e:  # an error where the reference runs: a failure, and the campaign goes on
                counts["failed"] += 1
                first = str(e).splitlines()[0][:300] if str(e) else ""
                print(f"failed: {kind} seed {seed}: raised {type(e).__name__}: {first}; {desc}", flush=True)
        last = seed
        if time.time() - start > args.seconds:
            break
    print(f"seeds {lo}..{last}: " + ", ".join(f"{v} {k}" for k, v in counts.items())
          + f" ({time.time() - start:.0f} s)", flush=True)
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
