"""Drop-in replacements for learn2learn 0.2.0's ``algorithms.MAML`` and ``algorithms.MetaSGD``.

Same constructor signatures, methods and semantics:

    maml = fastmeta.MAML(model, lr=0.5, first_order=False)
    for task in tasks:
        learner = maml.clone()             # a differentiable copy sharing the graph with model
        learner.adapt(loss(learner(xs), ys))
        loss(learner(xq), yq).backward()   # meta-gradient lands in model's parameters' .grad

``clone()`` copies the module structure with every parameter replaced by ``p.clone()`` (so 2nd-order
meta-gradients reach the original parameters); a parameter shared by several submodules stays
shared; buffers are shared with the original unless they require grad (then cloned). ``adapt()``
takes the gradient of ``loss`` w.r.t. all parameters (only those requiring grad with
``allow_nograd``; unused ones allowed with ``allow_unused``) and replaces each parameter ``p`` by
``p - lr * g``, for all of them in one call of the ``inner_update`` op. Parameters whose gradient is
None are left as they are. Attributes not found on the wrapper are looked up on the wrapped module.

A learner whose module is an MLP (an nn.Sequential of nn.Linear layers with biases, each followed
by at most one ReLU, LeakyReLU, Tanh or Sigmoid, no module hooks) runs its forward as one op,
ops.mlp_forward (C++, csrc/mlp_forward.cpp, where fastmeta._C is built and the backend request is not
'torch'): its backward is one node that gives every parameter's gradient, and that node's own
derivative (second-order MAML's outer backward) is computed in closed form, where autograd would
record each layer's ops and their backward formulas one by one. The values and derivatives are
the module's (to rounding; to any order); under no_grad or inference_mode (an evaluation) the op
runs without its graph. A conv net that BatchedMAML lowers without a vmap fallback (Conv2d first;
BatchNorm -> ReLU -> MaxPool2d(2) blocks, Linear heads and the like; no Dropout) runs its forward,
where grad mode is on, on a batch of images as BatchedMAML's program of the original model on one
task: the blocks as the fused op whose second-order derivative is closed-form, BatchNorm's running
statistics updated as the module's call updates them. Any other module, or such a module called
with anything but one plain float32 / float64 tensor of its dtype and device (and, for an MLP, its
width; for a conv net, a batch [N, C, H, W]), or whose clone differs from the original in its
modules, modes or settings, is called as it is.

torch.compile: compile the meta-training step (clone, adapt, the query loss), not the model. Inside
it a second-order learner's forward runs outside the compiled graph (a graph break), since a graph
that torch.compile compiles is differentiable once only. A model given as ``torch.compile(model)``
is taken as the module it wraps (the same parameters): clones replace its parameters, which the
compiled wrapper cannot take.
"""
from __future__ import annotations

import weakref

import torch
from torch import nn

from . import _checks, ops, plan
from ._phases import phase
from .backend import get_backend
from .plan import uncompiled


class BaseLearner(nn.Module):
    """Wraps ``module``; unknown attributes are forwarded to it."""

    def __init__(self, module: nn.Module | None = None):
        super().__init__()
        self.module = module

    def __getattr__(self, attr):
        try:
            return super().__getattr__(attr)
        except AttributeError:
            return getattr(self.__dict__["_modules"]["module"], attr)

    def forward(self, *args, **kwargs):
        if torch.compiler.is_compiling() and not getattr(self, "first_order", True):
            # inside torch.compile: a second-order learner's forward runs outside the compiled graph,
            # whose backward is differentiable once only, so that adapt() can differentiate it twice
            return torch.compiler.disable(self.module)(*args, **kwargs)
        if len(args) == 1 and not kwargs:
            module = self.__dict__["_modules"]["module"]
            layers = _mlp_layers(module, args[0])
            if layers is not None:  # (also under no_grad / inference_mode: an evaluation's forward)
                return ops.mlp_forward(args[0], *layers)
            program = _conv_program(self.__dict__.get("_root"), module, args[0]) if torch.is_grad_enabled() else None
            if program is not None:
                params = dict(module.named_parameters())
                with plan.running_stats(program):
                    return program({n: params[n].unsqueeze(0) for n in program.names}, args[0].unsqueeze(0))[0]
        return self.module(*args, **kwargs)


_MLP_ACTS = {nn.ReLU: 1, nn.LeakyReLU: 2, nn.Tanh: 3, nn.Sigmoid: 4}


def _mlp_layers(module, x):
    """(params, activation codes, negative slope) where calling ``module`` on ``x`` is an MLP that
    ops.mlp_forward computes (the drop-in learners' forward): an nn.Sequential of nn.Linear layers
    with biases, each followed by at most one ReLU, LeakyReLU (one slope for all), Tanh or Sigmoid
    (these classes exactly: a subclass or a parametrized module has its own forward), no module
    hooks, and x a plain float32 / float64 tensor of the first layer's dtype, device and width in a
    plain call (_plain_call); else None (the module is called). Read at every call (~4-8 us for
    the sine MLP): hooks, children and parameters may change between calls."""
    if type(module) is not nn.Sequential or _hooks(module) or not _plain_call(x) or not x.dim():
        return None
    params, acts, slope = [], [], None
    width = x.shape[-1]
    for m in module._modules.values():
        kind = type(m)
        if kind is nn.Linear:
            p = m._parameters
            w, b = p["weight"], p["bias"]
            if (b is None or _hooks(m) or type(w) not in _PLAIN or type(b) not in _PLAIN or w.dtype != x.dtype
                    or w.device != x.device or w.dim() != 2 or w.shape[1] != width):
                return None
            params += (w, b)
            acts.append(0)
            width = w.shape[0]
        elif kind in _MLP_ACTS:
            if not acts or acts[-1] or _hooks(m):
                return None
            if kind is nn.LeakyReLU:
                if slope is not None and slope != m.negative_slope:
                    return None
                slope = m.negative_slope
            acts[-1] = _MLP_ACTS[kind]
        else:
            return None
    if not acts:
        return None
    return params, acts, 0.01 if slope is None else float(slope)


def _plain_call(x) -> bool:
    """Whether x is a plain float32 / float64 tensor and nothing that changes what a module call
    does is in effect: global module hooks, torch function or dispatch modes, functorch transforms,
    compilation, autocast."""
    return (type(x) is torch.Tensor and x.dtype in _FLOATS and not plan.global_hooks() and _checks.dispatch_plain()
            and not _autocast_on(x.device.type))


def _hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


_FLOATS = (torch.float32, torch.float64)
_PLAIN = (torch.Tensor, nn.Parameter)
_VALUES = (bool, int, float, str, type(None))


def _conv_program(root, module, x):
    """BatchedMAML's program of the learners' original model ``root`` (plan.lower, cached in
    _PROGRAMS) where calling ``module`` (root or a clone of it) on the batch of images ``x`` [N, C,
    H, W] may run as that program on one task: a model whose lowering starts with a Conv2d (of x's
    dtype and device) and holds no vmap fallback and no random draw (Dropout), no module hooks and
    no buffer that requires grad, whose modules, their classes, training modes and plain
    attributes, parameter names and buffers are root's, in a plain call (_plain_call) without a
    'torch' backend request; else None (the module is called). Its BatchNorm -> ReLU -> MaxPool2d(2)
    blocks then run as the fused op whose second-order derivative is closed-form, and BatchNorm's
    running statistics (root's buffers, which clones share) are updated as the module's call
    updates them."""
    if root is None or not _plain_call(x) or x.dim() != 4 or get_backend() == "torch":
        return None
    root_key = _layout(root)
    if root_key is None:
        return None
    known = _PROGRAMS.get(root)
    lowering = (root_key, tuple(plan._AS_BASE.items()), plan.tracing_on())  # (what plan.lower's result depends on)
    if known is not None and known[0] == lowering:  # (root as it was lowered: its program, or None)
        program = known[1]
    else:
        try:
            program = plan.lower(root)
        except Exception:  # (whatever the planner refuses is the module's to run)
            program = None
        if program is not None and (program.fallbacks or program.random or not program.steps
                                    or program.steps[0].kind != "batched_conv2d"
                                    or any(b.requires_grad for b in root.buffers())):
            program = None
        _PROGRAMS[root] = (lowering, program)
    if program is None or (module is not root and _layout(module) != root_key):
        return None
    path, _, name = program.steps[0].spec["w"].rpartition(".")  # (the module's call raises on another dtype)
    w = module.get_submodule(path)._parameters.get(name)
    if type(w) not in _PLAIN or w.dtype != x.dtype or w.device != x.device:
        return None
    return program


# original model -> ((its _layout, lower_as declarations, tracing) when lowered, its program or None
# where the learners call it): plan.lower's own check of a model's structure costs ~70 us a call
_PROGRAMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def describe_forward(model: nn.Module) -> str:
    """How a learner of ``model`` (fastmeta.MAML / MetaSGD) runs its forward on a plain batch of the
    model's dtype (fastmeta.explain)."""
    from .backend import select

    model = uncompiled(model)
    first = next((m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))), None)
    p = next(model.parameters(), None)
    if first is None or p is None or p.dtype not in _FLOATS:
        return "the module's call"
    if isinstance(first, nn.Linear) and _mlp_layers(model, torch.empty(1, first.in_features, dtype=p.dtype,
                                                                       device=p.device)) is not None:
        be = select("mlp_forward", p.device.type)
        if be == "torch":
            return "the layers as torch ops (ops.mlp_forward, backend torch)"
        said = (f"ops.mlp_forward (backend {be}): one op, its backward one node giving every gradient, its "
                "second-order product in closed form")
        if be == "cpp" and p.device.type == "cpu":  # (the op's small-MLP loops: csrc/mlp_forward.cpp)
            from . import _C
            macs = sum(m.weight.numel() for m in model if isinstance(m, nn.Linear))
            rows = max(_C._mlp_forward_small_macs(), 0) // macs
            said += (f"; as plain loops on batches of up to {rows} rows, through ATen's calls above" if rows else
                     "; through ATen's calls")
        return said
    if isinstance(first, nn.Conv2d):
        x = torch.empty(1, first.in_channels, 1, 1, dtype=p.dtype, device=p.device)
        if _conv_program(model, model, x) is not None:
            return "on a batch of images [N, C, H, W], BatchedMAML's program of the model on one task (the steps above)"
    return "the module's call"


def _layout(module):
    """Each module's class, children, parameter names, buffers (by identity) and plain attributes
    (training mode, settings), or None where a module has hooks."""
    key = []
    for m in module.modules():
        if _hooks(m):
            return None
        key.append((type(m), tuple(m._modules), tuple(m._parameters), tuple((k, id(b)) for k, b in m._buffers.items()),
                    tuple((k, v) for k, v in m.__dict__.items() if type(v) in _VALUES)))
    return tuple(key)


def _autocast_on(device_type: str) -> bool:
    return torch.is_autocast_enabled(device_type) if device_type in ("cpu", "cuda") else True


def clone_module(module, memo: dict | None = None):
    """A copy of ``module`` whose parameters are differentiable clones of the original ones.

    Tensors shared by several places (parameters, grad-requiring buffers) stay shared in the copy;
    buffers that do not require grad are the original tensors.
    """
    if memo is None:
        memo = {}
    if not isinstance(module, nn.Module):
        return module
    if id(module) in memo:
        return memo[id(module)]
    # (the copy's state is filled in as a dict: nn.Module.__setattr__ costs ~2 us an attribute)
    state = module.__dict__.copy()
    params = state["_parameters"] = module._parameters.copy()
    buffers = state["_buffers"] = module._buffers.copy()
    children = state["_modules"] = module._modules.copy()
    clone = module.__new__(type(module))
    object.__setattr__(clone, "__dict__", state)
    memo[id(module)] = clone
    for key, p in params.items():
        if p is not None:
            if id(p) not in memo:
                memo[id(p)] = p.clone()
            params[key] = memo[id(p)]
    for key, b in buffers.items():
        if b is not None and b.requires_grad:
            if id(b) not in memo:
                memo[id(b)] = b.clone()
            buffers[key] = memo[id(b)]
    for key, m in children.items():
        children[key] = clone_module(m, memo)
    if _flattens(clone):
        clone = clone._apply(lambda x: x)
    return clone


def _flattens(module) -> bool:
    """hasattr(module, "flatten_parameters") (an RNN's), without nn.Module.__getattr__'s ~1 us miss."""
    name = "flatten_parameters"
    return (hasattr(type(module), name) or name in module.__dict__ or name in module._parameters
            or name in module._buffers or name in module._modules)


def _replace_params(module: nn.Module, new: dict, seen: set) -> None:
    """Swaps every parameter tensor t of the module tree for new[id(t)] where present."""
    if id(module) in seen:
        return
    seen.add(id(module))
    for key, p in module._parameters.items():
        if p is not None and id(p) in new:
            module._parameters[key] = new[id(p)]
    for m in module._modules.values():
        if m is not None:
            _replace_params(m, new, seen)
    if _flattens(module):
        module._apply(lambda x: x)


def update_module(module: nn.Module, params: list, grads: list, lr) -> nn.Module:
    """In the module tree, replaces each parameter p with a gradient g by p - lr * g (one op call).

    lr: a number or tensor for all parameters, or a list with one rate per parameter (Meta-SGD).
    """
    idx = [i for i, g in enumerate(grads) if g is not None]
    if not idx:
        return module
    per_param = isinstance(lr, (list, tuple))
    updated = ops.inner_update([params[i] for i in idx], [grads[i] for i in idx],
                               [lr[i] for i in idx] if per_param else lr)
    _replace_params(module, {id(params[i]): u for i, u in zip(idx, updated)}, set())
    return module


def _gradients(loss, module, second_order, allow_unused, allow_nograd, who):
    params = list(module.parameters())
    if allow_nograd:
        diff = [p for p in params if p.requires_grad]
        got = torch.autograd.grad(loss, diff, retain_graph=second_order, create_graph=second_order,
                                  allow_unused=allow_unused) if diff else []
        it = iter(got)
        return params, [next(it) if p.requires_grad else None for p in params]
    frozen = [i for i, p in enumerate(params) if not p.requires_grad]
    if frozen:
        raise RuntimeError(f"{who}.adapt: parameter(s) at position(s) {frozen} do not require grad; "
                           "pass allow_nograd=True to leave them unadapted")
    try:
        grads = torch.autograd.grad(loss, params, retain_graph=second_order, create_graph=second_order,
                                    allow_unused=allow_unused)
    except RuntimeError as e:
        hint = (" (maybe pass allow_unused=True and/or allow_nograd=True)"
                if "not have been used" in str(e) or "does not require grad" in str(e) else "")
        raise RuntimeError(f"{who}.adapt: {e}{hint}") from e
    return params, list(grads)


class MAML(BaseLearner):
    """learn2learn-compatible MAML (Finn et al. 2017): ``clone()`` then ``adapt(loss)``.

    Args:
        model: the module to meta-learn.
        lr: the inner (fast-adaptation) learning rate, a number or a tensor.
        first_order: use the first-order approximation in adapt().
        allow_unused: allow parameters that the loss does not use (default: allow_nograd).
        allow_nograd: leave parameters with requires_grad=False unadapted instead of raising.
    """

    def __init__(self, model: nn.Module, lr, first_order: bool = False, allow_unused=None,
                 allow_nograd: bool = False):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        model = uncompiled(model)  # torch.compile(model): the module it wraps, whose clones take new parameters
        super().__init__(model)
        self.__dict__["_root"] = model  # (not a submodule: the model whose lowering clones share)
        _checks.lr_value("lr", lr)
        self.lr = lr
        self.first_order = first_order
        self.allow_nograd = allow_nograd
        self.allow_unused = allow_nograd if allow_unused is None else allow_unused

    def adapt(self, loss, first_order=None, allow_unused=None, allow_nograd=None):
        """One inner SGD step on ``loss``, in place on this learner's module."""
        first_order = self.first_order if first_order is None else first_order
        allow_unused = self.allow_unused if allow_unused is None else allow_unused
        allow_nograd = self.allow_nograd if allow_nograd is None else allow_nograd
        _checks.tensor("loss", loss)
        if loss.numel() != 1:
            raise ValueError(f"loss: expected a scalar, got shape {tuple(loss.shape)}")
        with phase("inner_backward"):
            params, grads = _gradients(loss, self.module, not first_order, allow_unused, allow_nograd, "MAML")
        with phase("update"):
            self.module = update_module(self.module, params, grads, self.lr)

    def clone(self, first_order=None, allow_unused=None, allow_nograd=None):
        """A MAML learner around a differentiable copy of the module (see clone_module)."""
        new = MAML(clone_module(self.module), lr=self.lr,
                   first_order=self.first_order if first_order is None else first_order,
                   allow_unused=self.allow_unused if allow_unused is None else allow_unused,
                   allow_nograd=self.allow_nograd if allow_nograd is None else allow_nograd)
        new.__dict__["_root"] = self.__dict__.get("_root")
        return new


class MetaSGD(BaseLearner):
    """learn2learn-compatible Meta-SGD (Li et al. 2017): MAML with a learned rate per parameter entry.

    Args:
        model: the module to meta-learn.
        lr: initial value of every learned rate.
        first_order: use the first-order approximation in adapt().
        lrs: the rates to use (one tensor per parameter); default: new parameters filled with lr.
    """

    def __init__(self, model: nn.Module, lr=1.0, first_order: bool = False, lrs=None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        model = uncompiled(model)  # torch.compile(model): the module it wraps, whose clones take new parameters
        super().__init__(model)
        self.__dict__["_root"] = model  # (not a submodule: the model whose lowering clones share)
        _checks.lr_value("lr", lr)
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError(f"lr: the initial value of every rate, a number or a one-element tensor, got shape "
                             f"{tuple(lr.shape)} (pass lrs for rates of other shapes)")
        if lrs is None:
            lrs = nn.ParameterList([nn.Parameter(torch.ones_like(p) * lr) for p in model.parameters()])
        else:
            params = list(model.parameters())
            if len(lrs) != len(params):
                raise ValueError(f"lrs: {len(lrs)} rates for {len(params)} parameters")
            for i, (l, p) in enumerate(zip(lrs, params)):
                if not isinstance(l, torch.Tensor):
                    raise TypeError(f"lrs[{i}]: expected a tensor, got {type(l).__name__}")
                try:
                    torch.broadcast_shapes(l.shape, p.shape)
                except RuntimeError:
                    raise ValueError(f"lrs[{i}] {tuple(l.shape)} does not broadcast to parameter "
                                     f"{tuple(p.shape)}") from None
        self.lrs = lrs
        self.first_order = first_order

    def clone(self, first_order=None, allow_unused=None, allow_nograd=None):
        """A MetaSGD learner around a differentiable copy of the module and of the rates."""
        # (built as __init__ builds it, without checking the rates again: they are this learner's,
        # checked when it was made; the checks cost ~80 us for six rates)
        new = MetaSGD.__new__(MetaSGD)
        BaseLearner.__init__(new, clone_module(self.module))
        new.__dict__["_root"] = self.__dict__.get("_root")
        new.lrs = [l.clone() for l in self.lrs]
        new.first_order = self.first_order if first_order is None else first_order
        return new

    def adapt(self, loss, first_order=None, allow_unused=None, allow_nograd=None):
        """One inner step theta <- theta - lrs * grad(loss), in place on this learner's module."""
        first_order = self.first_order if first_order is None else first_order
        _checks.tensor("loss", loss)
        if loss.numel() != 1:
            raise ValueError(f"loss: expected a scalar, got shape {tuple(loss.shape)}")
        with phase("inner_backward"):
            params, grads = _gradients(loss, self.module, not first_order, bool(allow_unused),
                                       bool(allow_nograd), "MetaSGD")
        with phase("update"):
            self.module = update_module(self.module, params, grads, list(self.lrs))
