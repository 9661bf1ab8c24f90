"""Models with their own forward (as meta-learning code writes them: a sine MLP calling F.relu, a
conv net with x.view(x.size(0), -1) before its head, blocks of custom modules): the planner traces
the forward (torch.fx) into its modules and the code between them, lowers the modules as a
Sequential's, and runs the code under vmap over the tasks. Each model's loss and meta-gradient
equal the per-task loop's, which calls the model's own forward (float64; both orders, MAML and
Meta-SGD); what is not a chain, or cannot be traced, runs through the vmap fallback as before and
explain says why."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmeta
from fastmeta import plan
from conftest import assert_meta_sgd_case_matches_loop, assert_rel_close, has_cpp, loop_meta_grads

BACKENDS = ["torch"] + (["cpp"] if has_cpp() else [])


class SineModel(nn.Module):  # learn2learn's sine example model
    def __init__(self, dim=16, act=F.relu):
        super().__init__()
        self.hidden1, self.hidden2, self.hidden3 = nn.Linear(1, dim), nn.Linear(dim, dim), nn.Linear(dim, 1)
        self.act = act

    def forward(self, x):
        x = self.act(self.hidden1(x))
        x = self.act(self.hidden2(x))
        return self.hidden3(x)


class MethodMLP(nn.Module):  # tensor methods, torch functions and keyword arguments
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.d, self.e = nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        x = self.a(x).tanh()
        x = F.leaky_relu(self.b(x), negative_slope=0.2)
        x = torch.sigmoid(self.c(x))
        x = F.gelu(self.d(x), approximate="tanh")
        return self.e(x)


class ConvNet(nn.Module):  # features as a Sequential, flattened by hand before the head
    def __init__(self, channels=4):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(2, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Linear(channels, 3)

    def forward(self, x):
        x = self.features(x)
        x = x.view(x.size(0), -1)
        return self.classifier(x)


class Block(nn.Module):  # a conv block as custom code calling F.relu
    def __init__(self, cin, cout):
        super().__init__()
        self.conv, self.bn, self.pool = nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.MaxPool2d(2)

    def forward(self, x):
        return self.pool(F.relu(self.bn(self.conv(x))))


class BlockNet(nn.Module):  # custom blocks, a learned scale used by the forward's own code, mean pooling
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(Block(2, 4), Block(4, 4))
        self.scale = nn.Parameter(torch.tensor([1.3]))
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        x = self.features(x)
        x = x.mean(dim=[2, 3]) * self.scale
        return self.head(x.reshape(x.shape[0], -1))


class Reshaping(nn.Sequential):  # a Sequential subclass whose forward reshapes its input first
    def forward(self, x):
        return super().forward(x.view(-1, 2, 7, 7))


class ResBlock(nn.Module):  # a ResNet block: two convolutions, a 1x1 shortcut, the sum, then pooling
    def __init__(self, cin, cout):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout)
        self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.pool = nn.MaxPool2d(2)

    def forward(self, x):
        out = F.leaky_relu(self.bn1(self.conv1(x)), 0.1)
        out = self.bn2(self.conv2(out))
        out += self.short(x)
        return self.pool(F.relu(out))


class ResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer1, self.layer2 = ResBlock(2, 4), ResBlock(4, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        x = self.layer2(self.layer1(x))
        return self.head(x.mean(dim=(2, 3)))


class SkipMLP(nn.Module):  # a value used twice: the input's skip connection, a gate of two branches
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = nn.Linear(3, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        g = torch.sigmoid(self.c(h)) * self.b(h) + h
        return self.d(torch.cat([g[..., :4], F.silu(g[..., 4:])], dim=-1)) + x[..., :1]


def _reshaping():
    return Reshaping(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 5 * 5, 3))


MODELS = {
    "sine_relu": ("mlp1", lambda: SineModel()),
    "sine_tanh": ("mlp1", lambda: SineModel(act=torch.tanh)),
    "sine_relu_inplace": ("mlp1", lambda: SineModel(act=lambda x: F.relu(x, inplace=True))),
    "methods": ("mlp3", MethodMLP),
    "convnet": ("conv", ConvNet),
    "blocknet": ("conv", BlockNet),
    "reshaping": ("flat", _reshaping),
    "resnet": ("conv", ResNet),
    "functional_conv": ("conv", lambda: Learner()),
    "functional_mlp": ("mlp1", lambda: FunctionalMLP()),
    "functional_bn": ("conv", lambda: FunctionalBN()),
    "functional_bn_pool": ("conv", lambda: FunctionalBN(pool=True)),
    "skip_mlp": ("mlp3", SkipMLP),
}


def _model(name):
    torch.manual_seed(1)
    model = MODELS[name][1]().double()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 1 and "weight" in n:
                p.add_(0.3 * torch.randn_like(p))
    return model


def _batch(kind, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = {"mlp1": (1,), "mlp3": (3,), "conv": (2, 5, 5), "flat": (2 * 7 * 7,)}[kind]
    xs = torch.randn(T, 4, *shape, generator=g, dtype=torch.float64)
    xq = torch.randn(T, 5, *shape, generator=g, dtype=torch.float64)
    if kind.startswith("mlp"):
        out = 1 if kind == "mlp1" else 2
        ys = torch.randn(T, 4, out, generator=g, dtype=torch.float64)
        yq = torch.randn(T, 5, out, generator=g, dtype=torch.float64)
        return "mse", (xs, ys, xq, yq)
    ys, yq = torch.randint(0, 3, (T, 4), generator=g), torch.randint(0, 3, (T, 5), generator=g)
    return "cross_entropy", (xs, ys, xq, yq)


def _check(model, loss, batch, backend, combos, lr=0.3, steps=2, **kw):
    g = torch.Generator().manual_seed(2)
    for first_order, meta_sgd in combos:
        assert_meta_sgd_case_matches_loop(model, batch, lr, steps, loss, backend, first_order, meta_sgd, g,
                                          f"first_order={first_order} meta_sgd={meta_sgd} backend={backend}", **kw)


ALL = [(f, m) for f in (False, True) for m in (False, True)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(MODELS))
def test_traced_model_exact(name, backend):
    model = _model(name)
    prog = plan.lower(model, strict=True)  # no vmap fallback
    assert not prog.fallbacks
    loss, batch = _batch(MODELS[name][0], 3)
    _check(model, loss, batch, backend, ALL)


def test_traced_mlps_take_the_fused_kernel():
    """F.relu / torch.tanh / x.tanh() / F.leaky_relu / torch.sigmoid / F.gelu between Linear layers
    stand for their modules, so the whole inner loop runs as one mlp_inner_loop op."""
    want = {"sine_relu": ["relu", "relu", None], "sine_tanh": ["tanh", "tanh", None],
            "sine_relu_inplace": ["relu", "relu", None],
            "methods": ["tanh", "leaky_relu", "sigmoid", "gelu_tanh", None]}
    for name, acts in want.items():
        model = _model(name)
        prog = plan.lower(model)
        assert prog.mlp is not None, (name, prog.mlp_reason)
        assert prog.mlp.activations == acts, name
        assert "fused mlp_inner_loop" in fastmeta.explain(model), name
    assert plan.lower(_model("methods")).mlp.negative_slope == 0.2


def test_graph_forward_lowers_its_modules():
    """A forward that is not a chain (ResNet blocks, skip connections) is cut where it is one value
    (between the blocks); each stretch that is not a chain is one graph step: its runs of modules
    lowered as chains, its code between them under vmap."""
    prog = plan.lower(_model("resnet"))
    kinds = [s.kind.split("(")[0] for s in prog.steps]
    assert kinds == ["graph", "ReLU", "MaxPool2d", "graph", "ReLU", "MaxPool2d", "code", "batched_linear"], kinds
    assert [s.path for s in prog.steps][::3] == ["layer1_conv1..add()", "layer2_conv1..add_1()", "mean()"]
    for step in prog.steps[::3][:2]:
        kind = step.kind
        assert ("batched_conv2d x3" in kind and "batched_batch_norm x3" in kind and "code(add) under vmap" in kind
                and "vmap(" not in kind.replace("under vmap", "")), kind
        assert not step.random and len(step.params) == 10
    # (ANIL: the blocks read no adapted parameter, so they run once on the support set)
    assert prog.invariant_prefix({"head.weight", "head.bias"}) == 7
    assert prog.mlp is None
    with pytest.raises(ValueError, match="per_step_bn: BatchNorm2d, .* graph step"):
        fastmeta.BatchedMAML(_model("resnet"), 0.1, 2, per_step_bn=True)


def test_traced_conv_net_lowers_its_blocks():
    text = fastmeta.explain(_model("convnet"))
    assert text.count("bn_relu_pool") >= 2 and "flatten" in text and "vmap(" not in text
    prog = plan.lower(_model("blocknet"))
    kinds = [s.kind for s in prog.steps]
    assert kinds[:4] == ["batched_conv2d", "bn_relu_pool", "batched_conv2d", "bn_relu_pool"], kinds
    code = [s for s in prog.steps if s.kind.startswith("code(")]
    assert len(code) == 1 and code[0].params == {"scale"} and not code[0].random
    assert prog.mlp is None and "runs code between the modules" in prog.mlp_reason


class SizeAcross(nn.Module):  # a size taken before a module call and used after it
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(2, 1)

    def forward(self, x):
        n = x.size(0)
        return self.a(x).view(n, -1)


class RankBranch(nn.Module):  # control flow on the input's rank: torch.fx cannot trace it, vmap runs it
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(2, 1)

    def forward(self, x):
        return self.a(x) if x.dim() == 2 else self.a(x.flatten(0, -2))


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(2, 1)

    def forward(self, x, scale):
        return self.a(x) * scale


@pytest.mark.parametrize("make,why", [(SizeAcross, "cannot run as batched steps (size, a size, is used across"),
                                      (RankBranch, "torch.fx cannot trace RankBranch.forward")])
def test_untraced_forward_falls_back_exactly(make, why):
    torch.manual_seed(0)
    model = make().double()
    text = fastmeta.explain(model)
    assert why in text and "vmap(" in text, text
    with pytest.raises(fastmeta.UnsupportedModule, match="strict lowering"):
        plan.lower(model, strict=True)
    g = torch.Generator().manual_seed(3)
    batch = tuple(torch.randn(3, n, d, generator=g, dtype=torch.float64) for n, d in ((4, 2), (4, 1), (5, 2), (5, 1)))
    _check(model, "mse", batch, "torch", [(False, False), (True, False)])


def test_second_input_without_default_is_not_traced():
    text = fastmeta.explain(TwoInputs())
    assert "TwoInputs.forward takes other arguments than one input (x, scale)" in text and "vmap(TwoInputs)" in text


class Learner(nn.Module):
    """Functional code as MAML reference implementations write it: a list of Parameters, F.conv2d /
    F.linear on them, a forward(x, vars=None, bn_training=True) called as model(x)."""

    def __init__(self):
        super().__init__()
        self.vars = nn.ParameterList([nn.Parameter(torch.randn(4, 2, 3, 3) * 0.3), nn.Parameter(torch.zeros(4)),
                                      nn.Parameter(torch.randn(3, 4) * 0.3), nn.Parameter(torch.zeros(3))])

    def forward(self, x, vars=None, bn_training=True):
        if vars is None:
            vars = self.vars
        x = F.conv2d(x, vars[0], vars[1], stride=1, padding=1)
        x = F.max_pool2d(F.relu(x), 2)
        return F.linear(x.mean(dim=(2, 3)), vars[2], vars[3])


class FunctionalBN(nn.Module):
    """BatchNorm as MAML reference code writes it (conv -> in-place ReLU -> BatchNorm, or BatchNorm
    -> ReLU -> max pool): F.batch_norm with running statistics held as Parameters that do not
    require grad, weights in a ParameterList; each F.batch_norm stands for a BatchNorm2d."""

    def __init__(self, pool=False):
        super().__init__()
        self.pool = pool
        self.vars = nn.ParameterList([nn.Parameter(torch.randn(4, 2, 3, 3) * 0.3), nn.Parameter(torch.zeros(4)),
                                      nn.Parameter(torch.ones(4)), nn.Parameter(torch.zeros(4)),
                                      nn.Parameter(torch.randn(4, 4, 3, 3) * 0.3), nn.Parameter(torch.zeros(4)),
                                      nn.Parameter(torch.ones(4)), nn.Parameter(torch.zeros(4)),
                                      nn.Parameter(torch.randn(3, 4 if pool else 16) * 0.3),
                                      nn.Parameter(torch.zeros(3))])
        self.vars_bn = nn.ParameterList([nn.Parameter(t, requires_grad=False)
                                         for _ in range(2) for t in (torch.zeros(4), torch.ones(4))])

    def forward(self, x, vars=None, bn_training=True):
        v = self.vars if vars is None else vars
        for i, (stride, pad) in enumerate([(1, 1), (1, 1) if self.pool else (2, 0)]):
            x = F.conv2d(x, v[4 * i], v[4 * i + 1], stride=stride, padding=pad)
            if self.pool:
                x = F.batch_norm(x, self.vars_bn[2 * i], self.vars_bn[2 * i + 1], weight=v[4 * i + 2],
                                 bias=v[4 * i + 3], training=bn_training)
                x = F.max_pool2d(F.relu(x, inplace=True), 2, 2, 0)
            else:
                x = F.relu(x, inplace=True)
                x = F.batch_norm(x, self.vars_bn[2 * i], self.vars_bn[2 * i + 1], weight=v[4 * i + 2],
                                 bias=v[4 * i + 3], training=bn_training)
        return F.linear(x.view(x.size(0), -1), v[8], v[9])


class FunctionalMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.randn(16, 1)), nn.Parameter(torch.zeros(16))
        self.w2, self.b2 = nn.Parameter(torch.randn(1, 16) * 0.3), nn.Parameter(torch.zeros(1))

    def forward(self, x, params=None):
        return F.linear(torch.tanh(F.linear(x, self.w1, self.b1)), self.w2, self.b2)


def test_functional_layers_are_lowered():
    """F.linear / F.conv2d on the model's Parameters stand for Linear / Conv2d holding them (batched
    ops; a functional MLP runs the fused kernel), F.max_pool2d for MaxPool2d; arguments with
    defaults are traced at them, as model(x) runs."""
    kinds = [s.kind for s in plan.lower(Learner()).steps]
    assert kinds == ["batched_conv2d", "ReLU", "MaxPool2d", "code(mean) under vmap", "batched_linear"], kinds
    prog = plan.lower(FunctionalMLP())
    assert [s.kind for s in prog.steps] == ["batched_linear+tanh", "batched_linear"]
    assert prog.mlp is not None and prog.mlp.param_names == ["w1", "b1", "w2", "b2"]
    # (a step's parameters are the model's: a head-only inner loop keeps the first layer invariant)
    assert prog.steps[0].params == {"w1", "b1"} and prog.invariant_prefix({"w2", "b2"}) == 1


def test_functional_batch_norm_is_lowered():
    """F.batch_norm on the model's own weight, bias and running statistics stands for a BatchNorm2d
    holding them: the fused bn_relu_pool where ReLU and a 2x2 max pool follow, the batched BatchNorm
    elsewhere; the planner updates those very tensors (test_running_stats checks the values)."""
    model = _model("functional_bn_pool")
    prog = plan.lower(model, strict=True)
    kinds = [s.kind for s in prog.steps]
    assert kinds == ["batched_conv2d", "bn_relu_pool", "batched_conv2d", "bn_relu_pool", "flatten",
                     "batched_linear"], kinds
    held = {id(t) for bn in prog.batch_norms for t in (bn.running_mean, bn.running_var)}
    assert held == {id(t) for t in model.vars_bn}
    assert "running statistics (2 module(s)" in fastmeta.explain(model)
    kinds = [s.kind for s in plan.lower(_model("functional_bn"), strict=True).steps]
    assert kinds.count("batched_batch_norm") == 2 and kinds.count("ReLU") == 2, kinds


class EvalBN(nn.Module):
    """F.batch_norm on buffers with training=self.training: in eval mode it normalizes with them."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(2, 4, 3, padding=1), nn.Linear(4, 3)
        self.w, self.b = nn.Parameter(1 + 0.3 * torch.randn(4)), nn.Parameter(0.1 * torch.randn(4))
        self.register_buffer("mean", 0.1 * torch.randn(4))
        self.register_buffer("var", 1 + torch.rand(4))

    def forward(self, x):
        x = F.batch_norm(self.conv(x), self.mean, self.var, self.w, self.b, training=self.training, eps=1e-3)
        return self.head(F.relu(x).mean(dim=(2, 3)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_batch_norm_in_eval_mode(backend):
    model = EvalBN().double().eval()
    prog = plan.lower(model, strict=True)
    (bn,) = prog.batch_norms
    assert not bn.training and bn.eps == 1e-3 and bn.running_mean is model.mean
    before = model.mean.clone()
    loss, batch = _batch("conv", 3)
    _check(model, loss, batch, backend, [(False, False), (True, True)])
    assert torch.equal(model.mean, before)  # (eval mode: no update)
    model.train()
    assert plan.lower(model).batch_norms[0].training  # (traced again at the new mode)
    _check(model, loss, batch, backend, [(False, True)])


class ScaledBN(nn.Module):
    """F.batch_norm with a weight computed in the forward: code, not a BatchNorm, that updates
    running statistics, which vmap cannot carry back to the model."""

    def __init__(self, held_as_parameters):
        super().__init__()
        self.conv, self.head = nn.Conv2d(2, 4, 3, padding=1), nn.Linear(4, 3)
        self.w = nn.Parameter(torch.ones(4))
        if held_as_parameters:
            self.mean, self.var = nn.Parameter(torch.zeros(4), requires_grad=False), nn.Parameter(
                torch.ones(4), requires_grad=False)
        else:
            self.register_buffer("mean", torch.zeros(4))
            self.register_buffer("var", torch.ones(4))

    def forward(self, x):
        x = F.batch_norm(self.conv(x), self.mean, self.var, self.w * 2, None, training=True)
        return self.head(x.mean(dim=(2, 3)))


@pytest.mark.parametrize("held_as_parameters", [False, True])
@pytest.mark.parametrize("trace", ["1", "0"])
def test_batch_norm_statistics_vmap_cannot_update_raise(held_as_parameters, trace, monkeypatch):
    """Not traced into a BatchNorm, such a forward runs through the vmap fallback, which raises on
    the in-place update of the model's statistics (held as buffers, or as frozen Parameters, which
    the fallback leaves to the model for that reason) rather than updating a copy and dropping it."""
    monkeypatch.setenv("FASTMETA_TRACE", trace)
    model = ScaledBN(held_as_parameters).double()
    if trace == "1":
        assert "updates running statistics in code" in fastmeta.explain(model)
    loss, batch = _batch("conv", 2)
    with pytest.raises(RuntimeError, match="running_mean"):
        fastmeta.BatchedMAML(model, 0.1, 1, loss=loss)(*batch)


class Switch(nn.Module):
    """A forward that branches on a flag and on the training mode."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(2, 6), nn.Linear(6, 1)
        self.smooth = True

    def forward(self, x):
        h = self.a(x)
        h = torch.tanh(h) if self.smooth else F.relu(h)
        if self.training:
            h = h * 0.5
        return self.b(h)


def test_trace_follows_the_attributes_it_branched_on():
    torch.manual_seed(0)
    model = Switch().double()
    g = torch.Generator().manual_seed(3)
    batch = tuple(torch.randn(3, n, d, generator=g, dtype=torch.float64) for n, d in ((4, 2), (4, 1), (5, 2), (5, 1)))
    seen = set()
    for smooth, training in ((True, True), (False, True), (False, False), (True, True)):
        model.smooth = smooth
        model.train(training)
        prog = plan.lower(model)
        kinds = [s.kind for s in prog.steps]
        assert ("batched_linear+tanh" in kinds) == smooth, kinds
        assert any(k.startswith("code(mul") for k in kinds) == training, kinds
        seen.add(id(prog))
        _check(model, "mse", batch, "torch", [(False, False)])
    assert len(seen) >= 3


class Captured(nn.Module):
    """A forward that reads a tensor it does not hold as a parameter or buffer, a buffer, and a
    submodule with a forward hook (called as a whole, in the vmap fallback)."""

    def __init__(self, shift):
        super().__init__()
        self.shift = shift
        self.a, self.b, self.c = nn.Linear(2, 6), nn.Linear(6, 6), nn.Linear(6, 1)
        self.register_buffer("gain", torch.tensor(0.7, dtype=torch.float64))
        self.b.register_forward_hook(lambda m, inp, out: out * 2)

    def forward(self, x):
        h = torch.tanh(self.a(x)) + self.shift * self.gain
        return self.c(torch.tanh(self.b(h)))


def test_captured_tensors_buffers_and_hooked_modules():
    torch.manual_seed(0)
    model = Captured(torch.linspace(-1, 1, 6, dtype=torch.float64)).double()
    attrs = set(vars(model))
    prog = plan.lower(model)
    assert set(vars(model)) == attrs  # (the trace's constants are not left in the model)
    kinds = [s.kind for s in prog.steps]
    assert "vmap(Linear)" in kinds and any(k.startswith("code(") for k in kinds), kinds
    g = torch.Generator().manual_seed(3)
    batch = tuple(torch.randn(3, n, d, generator=g, dtype=torch.float64) for n, d in ((4, 2), (4, 1), (5, 2), (5, 1)))
    _check(model, "mse", batch, "torch", [(False, False), (False, True)])
    with torch.no_grad():
        model.gain.fill_(-0.2)  # read at each call, not at the trace
    _check(model, "mse", batch, "torch", [(False, False)])
    model.shift = torch.linspace(1, -1, 6, dtype=torch.float64)  # a new tensor attribute: read at each call too
    _check(model, "mse", batch, "torch", [(False, False)])


class Computed(nn.Module):
    """A forward that computes a tensor from a tensor attribute alone: torch.fx would keep that
    result's value of the trace, so the model is not traced."""

    def __init__(self):
        super().__init__()
        self.shift = torch.ones(3, dtype=torch.float64)
        self.a = nn.Linear(2, 3)

    def forward(self, x):
        return self.a(x) + self.shift * 2


def test_computed_constant_is_not_traced():
    model = Computed().double()
    attrs = set(vars(model))
    text = fastmeta.explain(model)
    assert "computes a tensor from other than its input" in text and "vmap(Computed)" in text, text
    assert set(vars(model)) == attrs
    model.shift = torch.zeros(3, dtype=torch.float64)
    x = torch.randn(2, 4, 2, dtype=torch.float64)
    P = {n: p.expand(2, *p.shape) for n, p in model.named_parameters()}
    assert torch.allclose(plan.lower(model)(P, x), model(x))


class Dropping(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(2, 6), nn.Linear(6, 1)

    def forward(self, x):
        return self.b(F.dropout(torch.tanh(self.a(x)), 0.5, self.training))


def test_random_code_is_marked_and_drawn_per_task():
    torch.manual_seed(0)
    model = Dropping().double()
    prog = plan.lower(model)
    code = [s for s in prog.steps if s.kind.startswith("code(")]
    assert len(code) == 1 and code[0].random and prog.random
    assert prog.invariant_prefix(set()) == 1  # (the draw is not made once for several passes)
    x = torch.ones(4, 3, 6, dtype=torch.float64)
    out = code[0].run(x, {})
    masks = (out != 0).reshape(4, -1)
    assert len({tuple(m.tolist()) for m in masks}) > 1  # each task its own draw
    model.eval()
    assert not any(s.random for s in plan.lower(model).steps)


def test_trace_switch(monkeypatch):
    model = _model("sine_relu")
    assert plan.lower(model).mlp is not None
    monkeypatch.setenv("FASTMETA_TRACE", "0")
    prog = plan.lower(model)
    assert prog.fallbacks and "custom forward" in prog.fallbacks[0].fallback


def test_traced_programs_do_not_keep_their_models():
    """The planner's cache holds a program while its model lives: a traced model (its code reading
    a buffer and a tensor attribute) is freed when its last reference goes."""
    import gc
    import weakref

    model = Captured(torch.ones(6, dtype=torch.float64)).double()
    plan.lower(model)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_graph_model_head_only_inner_loop(backend):
    """ANIL on the ResNet: only the head adapts, so the blocks (graph steps) run once on the support
    set; the meta-gradient of every parameter (the blocks' through the second-order terms) equals
    the loop's."""
    model = _model("resnet")
    loss, batch = _batch("conv", 3)
    head = {"head.weight", "head.bias"}
    for first_order in (False, True):
        want_loss, want, _ = loop_meta_grads(model, *batch, 0.3, 2, loss, first_order, adapted=head)
        with fastmeta.use_backend(backend):
            meta = fastmeta.BatchedMAML(model, 0.3, 2, first_order=first_order, loss=loss,
                                        inner_params=lambda n: n in head)
            got_loss, grads = meta.value_and_grad(*batch)
        assert abs(got_loss.item() - want_loss.item()) <= 1e-10 * abs(want_loss.item())
        assert_rel_close(list(grads), want, 1e-9, f"meta-grad, first_order={first_order}")


def test_graph_step_keeps_a_hooked_module_whole():
    """A module with a forward hook inside a stretch that is not a chain runs as its own call
    (the vmap fallback); strict lowering names it."""
    model = _model("resnet")
    model.layer1.bn2.register_forward_hook(lambda m, inp, out: out * 0.5)
    prog = plan.lower(model)
    assert "vmap(BatchNorm2d)" in prog.steps[0].kind
    with pytest.raises(fastmeta.UnsupportedModule, match="layer1.bn2.*forward hooks"):
        plan.lower(model, strict=True)
    loss, batch = _batch("conv", 2)
    _check(model, loss, batch, "torch", [(False, False)])


class Recurrent(nn.Module):
    """An LSTM, which torch.func's vmap cannot batch (no batching rule for aten::lstm), then code on
    its output tuple and a head."""

    def __init__(self):
        super().__init__()
        self.lstm, self.fc = nn.LSTM(3, 8, batch_first=True), nn.Linear(8, 2)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.fc(torch.tanh(out[:, -1]))


def test_module_vmap_cannot_batch_runs_task_by_task():
    """The LSTM's fallback step runs it task by task (as the loop calls it) once vmap reports an op
    without a batching rule; the rest is lowered as usual; loss and meta-gradient equal the loop's."""
    torch.manual_seed(0)
    model = Recurrent().double()
    kinds = [s.kind for s in plan.lower(model).steps]
    assert kinds[0] == "vmap(LSTM)" and kinds[-1] == "batched_linear", kinds
    g = torch.Generator().manual_seed(3)
    batch = tuple(torch.randn(3, n, *d, generator=g, dtype=torch.float64)
                  for n, d in ((4, (5, 3)), (4, (2,)), (6, (5, 3)), (6, (2,))))
    _check(model, "mse", batch, "torch", [(False, False), (True, True)])


def test_copies_and_pickles_of_a_traced_model():
    """deepcopy and torch.save / torch.load of a BatchedMAML over a traced model (a ResNet: graph
    steps, code steps): the copy traces its own model and computes the same loss; a change to the
    copy's Parameters reaches the copy only."""
    import copy
    import io

    model = _model("resnet")
    loss, batch = _batch("conv", 2)
    meta = fastmeta.BatchedMAML(model, 0.1, 1, loss=loss)
    want = meta(*batch).item()
    twin = copy.deepcopy(meta)
    buf = io.BytesIO()
    torch.save(meta, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for other in (twin, loaded):
        assert other(*batch).item() == pytest.approx(want, rel=1e-12, abs=0)
        with torch.no_grad():
            other.model.head.weight.mul_(2.0)
        assert other(*batch).item() != pytest.approx(want, rel=1e-6, abs=0)
    assert meta(*batch).item() == pytest.approx(want, rel=1e-12, abs=0)


class Reordered(nn.Module):
    """An MLP whose layers are registered in another order than its forward calls them, two of them
    of one shape: the fused kernel takes its parameters in call order, the learned rates follow."""

    def __init__(self):
        super().__init__()
        self.c, self.b, self.a, self.d = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 1)

    def forward(self, x):
        return self.d(torch.tanh(self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))))


@pytest.mark.parametrize("backend", BACKENDS)
def test_learned_rates_follow_layers_called_in_another_order(backend):
    torch.manual_seed(0)
    model = Reordered().double()
    prog = plan.lower(model)
    assert prog.mlp.param_names[:2] == ["a.weight", "a.bias"] and prog.names[:2] == ["c.weight", "c.bias"]
    g = torch.Generator().manual_seed(1)
    batch = tuple(torch.randn(3, n, d, generator=g, dtype=torch.float64) for n, d in ((4, 6), (4, 1), (5, 6), (5, 1)))
    assert_meta_sgd_case_matches_loop(model, batch, 0.1, 2, "mse", backend, False, True, g, "Meta-SGD")
    # the other rate kinds, adapt and reptile_grad: the fused kernel (cpp) against the batched ops (torch)
    for kind in ("per_layer", "per_layer_step"):
        got = {}
        for be in ("torch", backend):
            torch.manual_seed(2)
            meta = fastmeta.BatchedMAML(model, 0.1, 2, learn_inner_lr=kind)
            with torch.no_grad():
                for i, r in enumerate(meta.lrs.parameters()):
                    r.mul_(0.5 + 0.1 * i)  # (a different rate each layer)
            with fastmeta.use_backend(be):
                got[be] = [meta.value_and_grad(*batch)[1], meta.adapt(batch[0], batch[1]),
                           meta.reptile_grad(batch[0], batch[1])[1]]
        want, have = got["torch"], got[backend]
        assert_rel_close(have[0], want[0], 1e-9, f"{kind} meta-grad")
        assert_rel_close([have[1][n].detach() for n in prog.names], [want[1][n].detach() for n in prog.names], 1e-10,
                         f"{kind} adapt")
        assert_rel_close([t for t in have[2] if t is not None], [t for t in want[2] if t is not None], 1e-10,
                         f"{kind} reptile")


def _as_modules(functional):
    """FunctionalBN(pool=True)'s network as modules, with copies of its weights and statistics."""
    v, s = functional.vars, functional.vars_bn
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Flatten(), nn.Linear(4, 3)).double()
    with torch.no_grad():
        for i, (conv, bn) in enumerate([(net[0], net[1]), (net[4], net[5])]):
            for dst, src in ((conv.weight, v[4 * i]), (conv.bias, v[4 * i + 1]), (bn.weight, v[4 * i + 2]),
                             (bn.bias, v[4 * i + 3]), (bn.running_mean, s[2 * i]), (bn.running_var, s[2 * i + 1])):
                dst.copy_(src)
        net[9].weight.copy_(v[8])
        net[9].bias.copy_(v[9])
    return net


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_batch_norm_with_per_step_tables(backend):
    """MAML++'s per-step BatchNorm (per_step_bn) on F.batch_norm: the same loss, meta-gradient and
    step statistics as the same network of modules (test_per_step_bn checks that against the loop)."""
    functional = _model("functional_bn_pool")
    modules = _as_modules(functional)
    loss, batch = _batch("conv", 3)
    got, want = [], []
    unread = {"model.vars.2", "model.vars.3", "model.vars.6", "model.vars.7", "model.1.weight", "model.1.bias",
              "model.5.weight", "model.5.bias"}  # (the BatchNorms' own weights: the tables stand for them)
    for model, out in ((functional, got), (modules, want)):
        meta = fastmeta.BatchedMAML(model, 0.2, 2, loss=loss, per_step_bn=True, learn_inner_lr="per_layer_step",
                                    backend=backend)
        with torch.no_grad():
            for p in meta.step_bn.parameters():
                p.add_(0.1 * torch.arange(p.numel(), dtype=p.dtype).reshape(p.shape).cos())
        value, grads = meta.value_and_grad(*batch)
        names = [n for n, _ in meta.named_parameters()]
        out += [value, [g for n, g in zip(names, grads) if g is not None and n not in unread],
                list(meta.step_bn.buffers())]
    assert abs(got[0].item() - want[0].item()) <= 1e-12
    assert len(got[1]) == len(want[1]) == 6 + 4 + 6  # (weights and biases, tables, rates)
    assert_rel_close(got[1], want[1], 1e-10, "meta-gradient")
    assert len(got[2]) == len(want[2]) == 6
    for a, b in zip(got[2], want[2]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


class ParamsModule(nn.Module):
    """Modules in the style of MetaModule libraries: forward(input, params=None), parameters taken
    from params where given, else from named_parameters()."""

    def sub(self, params, key):
        return None if params is None else {k[len(key) + 1:]: v for k, v in params.items() if k.startswith(key + ".")}


class ParamsSequential(nn.Sequential, ParamsModule):
    def forward(self, x, params=None):
        for name, m in self._modules.items():
            x = m(x, params=self.sub(params, name)) if isinstance(m, ParamsModule) else m(x)
        return x


class ParamsConv2d(nn.Conv2d, ParamsModule):
    def forward(self, x, params=None):
        params = dict(self.named_parameters()) if params is None else params
        return self._conv_forward(x, params["weight"], params.get("bias"))


class ParamsLinear(nn.Linear, ParamsModule):
    def forward(self, x, params=None):
        params = dict(self.named_parameters()) if params is None else params
        return F.linear(x, params["weight"], params.get("bias"))


class ParamsBatchNorm2d(nn.BatchNorm2d, ParamsModule):
    """Checks its input's rank and counts its batches in the forward: torch.fx cannot trace it."""

    def forward(self, x, params=None):
        self._check_input_dim(x)
        params = dict(self.named_parameters()) if params is None else params
        if self.training and self.track_running_stats:
            self.num_batches_tracked += 1
        return F.batch_norm(x, self.running_mean, self.running_var, params.get("weight"), params.get("bias"),
                            self.training or not self.track_running_stats, self.momentum, self.eps)


class ParamsConvNet(ParamsModule):
    def __init__(self, track):
        super().__init__()
        blocks = [ParamsSequential(ParamsConv2d(c, 4, 3, padding=1), ParamsBatchNorm2d(4, track_running_stats=track),
                                   nn.ReLU(), nn.MaxPool2d(2)) for c in (2, 4)]
        self.features, self.classifier = ParamsSequential(*blocks), ParamsLinear(4, 3)

    def forward(self, x, params=None):
        x = self.features(x, params=self.sub(params, "features"))
        x = x.view((x.size(0), -1))
        return self.classifier(x, params=self.sub(params, "classifier"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("track", [False, True])
def test_a_module_fx_cannot_trace_runs_whole_inside_a_traced_forward(track, backend):
    """A custom module that torch.fx cannot trace (a rank check, an in-place count) no longer sends
    the whole model to the vmap fallback: it runs there alone (explain says why), and the rest is
    traced and lowered: modules called as module(x, params=None) (their forward's defaults) as
    module(x), x.view((x.size(0), -1)) as a flatten. Exact against the loop, running statistics
    too (the loop's forward updates them)."""
    torch.manual_seed(0)
    model = ParamsConvNet(track).double()
    prog = plan.lower(model)
    kinds = [s.kind for s in prog.steps]
    assert kinds == ["batched_conv2d", "vmap(ParamsBatchNorm2d)", "ReLU", "MaxPool2d"] * 2 + [
        "flatten", "batched_linear"], kinds
    assert "torch.fx cannot trace ParamsBatchNorm2d.forward" in fastmeta.explain(model)
    loss, batch = _batch("conv", 3)
    reference = copy.deepcopy(model)
    _check(model, loss, batch, backend, ALL)
    model = copy.deepcopy(reference)
    with fastmeta.use_backend(backend):
        fastmeta.BatchedMAML(model, 0.3, 2, loss=loss)(*batch)
    loop_meta_grads(reference, *batch, 0.3, 2, loss)  # (its passes update the statistics as the model's)
    for (name, a), b in zip(model.named_buffers(), reference.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")


class CalledWithParams(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = ParamsBatchNorm2d(2)

    def forward(self, x):
        return self.bn(x, params={"weight": self.bn.weight * 2, "bias": self.bn.bias}).mean(dim=(2, 3))


def test_a_module_called_with_other_arguments_than_its_defaults_is_not_traced():
    text = fastmeta.explain(CalledWithParams())
    assert "module bn is called with other than one input" in text and "vmap(CalledWithParams)" in text, text


class Keeping(nn.Module):
    """A forward that counts its calls and keeps its hidden activation."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(2, 8), nn.Linear(8, 1)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        self.hidden = torch.tanh(self.a(x))
        return self.b(self.hidden)


def test_a_forward_that_changes_module_attributes_is_not_traced():
    """Traced, its Python would run once (and the changed attributes made the planner trace it again
    at every call, 140x a traced call's time). It is not traced (explain says why), the trace's own
    writes are undone (no torch.fx value is left on the module), and it runs exactly through the
    vmap fallback, its program cached."""
    torch.manual_seed(0)
    model = Keeping().double()
    prog = plan.lower(model)
    assert model.calls == 0 and not hasattr(model, "hidden")
    assert [s.kind for s in prog.steps] == ["vmap(Keeping)"]
    assert "Keeping.forward changes module attributes as it runs (Keeping.calls, Keeping.hidden)" in (
        fastmeta.explain(model))
    g = torch.Generator().manual_seed(3)
    batch = tuple(torch.randn(3, n, d, generator=g, dtype=torch.float64) for n, d in ((4, 2), (4, 1), (5, 2), (5, 1)))
    _check(model, "mse", batch, "torch", [(False, False), (True, True)])
    assert model.calls > 0 and plan.lower(model) is prog  # (the forward's own changes are not traced again)


class NoGradRoot(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(2, 6), nn.Linear(6, 1)

    def forward(self, x):
        with torch.no_grad():
            h = torch.tanh(self.a(x))
        return self.b(h)


class FrozenFeatures(nn.Module):  # a feature extractor run without gradients
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(2, 6)

    def forward(self, x):
        with torch.no_grad():
            return torch.tanh(self.a(x))


class NoGradInside(nn.Module):
    def __init__(self):
        super().__init__()
        self.features, self.head = FrozenFeatures(), nn.Linear(6, 1)

    def forward(self, x):
        return self.head(F.relu(self.features(x)))


def test_code_without_gradients_is_not_traced():
    """torch.fx records no grad mode: traced, code under torch.no_grad would be differentiated (a
    silent wrong meta-gradient: the fused MLP kernel ran through the frozen layer). Such a forward
    is not traced, and a submodule whose forward has it runs whole through the vmap fallback, the
    rest traced; both exact against the loop (its no_grad block gets no gradient)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    batch = tuple(torch.randn(3, n, d, generator=g, dtype=torch.float64) for n, d in ((4, 2), (4, 1), (5, 2), (5, 1)))
    root = NoGradRoot().double()
    assert "it turns gradients off (torch.no_grad or the like)" in fastmeta.explain(root)
    assert [s.kind for s in plan.lower(root).steps] == ["vmap(NoGradRoot)"]
    _check(root, "mse", batch, "torch", [(False, False), (True, False)])
    inside = NoGradInside().double()
    assert [s.kind for s in plan.lower(inside).steps] == ["vmap(FrozenFeatures)", "ReLU", "batched_linear"]
    for backend in BACKENDS:
        _check(inside, "mse", batch, backend, [(False, False), (True, True)])


@pytest.mark.parametrize("backend", BACKENDS)
def test_lower_as_declares_a_module_class_its_base(backend):
    """fastmeta.lower_as(ParamsBatchNorm2d, nn.BatchNorm2d): a MetaModule-style BatchNorm, which
    torch.fx cannot trace and which otherwise runs alone through the vmap fallback, is lowered as a
    BatchNorm2d (the fused bn_relu_pool with the ReLU and pool after it): exact against the loop,
    running statistics too; withdrawn, the vmap fallback again. Bad declarations raise."""
    torch.manual_seed(0)
    model = ParamsConvNet(track=True).double()
    reference = copy.deepcopy(model)
    fastmeta.lower_as(ParamsBatchNorm2d, nn.BatchNorm2d)
    try:
        kinds = [s.kind for s in plan.lower(model, strict=True).steps]
        assert kinds == ["batched_conv2d", "bn_relu_pool"] * 2 + ["flatten", "batched_linear"], kinds
        loss, batch = _batch("conv", 3)
        _check(copy.deepcopy(model), loss, batch, backend, ALL)
        with fastmeta.use_backend(backend):
            fastmeta.BatchedMAML(model, 0.3, 2, loss=loss)(*batch)
        loop_meta_grads(reference, *batch, 0.3, 2, loss)
        for (name, a), b in zip(model.named_buffers(), reference.buffers()):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")
    finally:
        fastmeta.lower_as(ParamsBatchNorm2d, None)
    assert "vmap(ParamsBatchNorm2d)" in [s.kind for s in plan.lower(model).steps]
    with pytest.raises(ValueError, match="ParamsLinear is not a subclass of Conv2d"):
        fastmeta.lower_as(ParamsLinear, nn.Conv2d)
    with pytest.raises(ValueError, match="base must be one of the classes fastmeta lowers"):
        fastmeta.lower_as(ParamsLinear, nn.Module)
    with pytest.raises(TypeError, match="cls must be an nn.Module class"):
        fastmeta.lower_as(ParamsLinear(2, 2), nn.Linear)
