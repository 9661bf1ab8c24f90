"""A module's own forward, traced (torch.fx) into the modules and code it runs, so that the planner
lowers the modules one by one as it lowers a Sequential's.

The trace calls PyTorch's modules and modules with hooks as a whole and traces through custom
modules. The forward is then cut where it is one value (the only value later nodes use, as
between two modules of a chain) into entries (path, what) applied one after the other:
- a module call;
- the forward's own code between module calls: one step that runs it under ``torch.func.vmap``
  over the task dim, so that it sees one task's tensors as the per-task loop's forward does;
  where that code is only an activation (F.relu, torch.tanh, x.sigmoid(), F.leaky_relu, F.gelu,
  F.silu), a pool (F.max_pool2d, F.avg_pool2d), a flatten of each sample (``x.view(x.size(0),
  -1)``, ``torch.flatten(x, 1)``), F.linear / F.conv2d on the model's own Parameters or
  F.batch_norm on its own weight, bias and running statistics (Parameters that do not require grad,
  or buffers: updated as the loop's passes update them), it stands for the module that computes
  the same (holding those tensors), so that the batched and fused
  ops (Linear with its activation, BatchNorm -> ReLU -> MaxPool2d(2), the whole-MLP inner loop)
  see it;
- a stretch between two cuts that holds modules but is not one module call (skip connections, a
  value used twice, as a ResNet block up to its sum): one graph step that runs its runs of modules
  (lowered as chains) and its stretches of code (under vmap, with as many inputs and outputs as
  they have) in the forward's order.

Arguments after the input that have a plain default (``forward(x, vars=None)``) are traced at it,
as ``model(x)`` runs, and a module called with its forward's defaults (``module(x, params=None)``)
counts as ``module(x)``. A custom module inside the forward whose own forward torch.fx cannot
trace is called whole (the planner runs it through the vmap fallback) and the rest is traced. A
forward with other inputs or several outputs, one that torch.fx cannot trace (control flow on
tensor values or shapes), one that computes a tensor from other than its input, parameters and
buffers (torch.fx would keep its value of the trace) and one that carries a size across a module
call (vmap returns tensors only) runs through the vmap fallback as before. The trace runs the
forward's Python once: branches on the modules' attributes (training mode and flags) are taken as
they stand, and the planner traces again when any such attribute changes; a forward that changes
module attributes as it runs (a counter, a kept activation) is not traced, the trace's changes
undone, and code under torch.no_grad (whose grad mode torch.fx does not record) is not traced: a
submodule with such a forward is called whole.
"""
from __future__ import annotations

import dataclasses
import inspect
import operator
import weakref

import torch
from torch import fx, nn

from . import plan

F = nn.functional

# function (or tensor method name) -> (module class, {keyword: default} of the arguments after the input)
_ACTIVATIONS = {
    F.relu: (nn.ReLU, {"inplace": False}), torch.relu: (nn.ReLU, {}), "relu": (nn.ReLU, {}),
    torch.relu_: (nn.ReLU, {"+inplace": True}), "relu_": (nn.ReLU, {"+inplace": True}),
    torch.tanh: (nn.Tanh, {}), F.tanh: (nn.Tanh, {}), "tanh": (nn.Tanh, {}),
    torch.sigmoid: (nn.Sigmoid, {}), F.sigmoid: (nn.Sigmoid, {}), "sigmoid": (nn.Sigmoid, {}),
    F.leaky_relu: (nn.LeakyReLU, {"negative_slope": 0.01, "inplace": False}),
    F.gelu: (nn.GELU, {"approximate": "none"}),
    F.silu: (nn.SiLU, {"inplace": False}),
}
# names of functions and methods that draw random numbers: a stretch of code with one is not
# computed once for several passes (plan.Program.invariant_prefix)
_RANDOM = ("dropout", "rand", "bernoulli", "multinomial", "normal", "uniform", "random", "exponential", "geometric",
           "cauchy", "poisson")


@dataclasses.dataclass
class Synthetic:
    """A module that stands for a function of a traced forward (F.relu -> nn.ReLU())."""
    module: nn.Module


class _Failed(Exception):
    pass


class _GradMode(Exception):
    pass


class _Tracer(fx.Tracer):
    """Traces through Sequentials and custom modules; calls every other module as a whole, and so
    a custom module whose own forward it cannot trace (its nodes of the attempt removed), so that
    the rest of the forward is still traced (the planner runs that module through the vmap
    fallback and says why). Buffers are traced as values (code on them runs at each call,
    reading them as they are then)."""

    proxy_buffer_attributes = True

    def __init__(self):
        super().__init__()
        self._whole, self._proxies = set(), None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return id(m) in self._whole or not (plan.plain_sequential(m) or plan.traceable(m))

    def create_proxy(self, kind, target, args, kwargs, *rest, **kw):
        # torch.fx records no grad mode: code under torch.no_grad (inference_mode, set_grad_enabled)
        # would be traced as differentiable. Such a module is called whole (the vmap fallback runs
        # its forward as it is), such a forward not traced.
        if not torch.is_grad_enabled() or torch.is_inference_mode_enabled():
            raise _GradMode("it turns gradients off (torch.no_grad or the like) for part of its code, which a "
                            "trace would not keep")
        return super().create_proxy(kind, target, args, kwargs, *rest, **kw)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        self._proxies = parameter_proxy_cache  # (the trace's cache of proxies of parameters and buffers)
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def call_module(self, m, forward, args, kwargs):
        if self.is_leaf_module(m, ""):
            return super().call_module(m, forward, args, kwargs)
        graph = self.graph
        mark, stack, calls, stowed = graph._root.prev, self.module_stack.copy(), dict(self.num_calls), dict(
            self.tensor_attrs)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            # undone: the attempt's nodes (last first), the proxies cached for them, the module
            # stack and call counts, the constants it stowed on the root
            made = []
            n = mark.next
            while n is not graph._root:
                made.append(n)
                n = n.next
            for n in reversed(made):
                graph.erase_node(n)
            made = set(made)
            if self._proxies is not None:
                for k in [k for k, v in self._proxies.items() if v.node in made]:
                    del self._proxies[k]
            self.module_stack.clear()
            self.module_stack.update(stack)
            self.num_calls = calls
            for t, name in list(self.tensor_attrs.items()):
                if t not in stowed:
                    del self.tensor_attrs[t]
                    if hasattr(self.root, name):
                        delattr(self.root, name)
            self._whole.add(id(m))
            return super().call_module(m, forward, args, kwargs)


def _name(n: fx.Node) -> str:
    t = n.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


def _args(n: fx.Node, cur: fx.Node, defaults: dict):
    """n's arguments after the input cur, by keyword (with defaults), or None where its first
    argument is not cur or it has others."""
    if not n.args or n.args[0] is not cur or len(n.args) - 1 > len(defaults):
        return None
    got = dict(defaults)
    got.update(zip(defaults, n.args[1:]))
    if set(n.kwargs) - set(defaults):
        return None
    got.update(n.kwargs)
    return got


def _parameter(root: nn.Module, a):
    """The Parameter of root that get_attr node a reads, or None (a buffer, another value)."""
    if not isinstance(a, fx.Node) or a.op != "get_attr":
        return None
    try:
        return root.get_parameter(a.target)
    except AttributeError:
        return None


class _BatchNorm(nn.BatchNorm2d):
    """F.batch_norm of a traced forward as a module: per-channel BatchNorm over dim 1 of an input of
    any rank (the planner's BatchNorm2d steps, and its fused BatchNorm -> ReLU -> MaxPool2d where
    the input is 4-D), holding the forward's own weight, bias and running statistics."""

    any_rank = True  # (the planner's input check: F.batch_norm takes any rank from 2)

    # the running statistics are the root's tensors, read by name at each use: a conversion of the
    # model (.double(), .to(device)) replaces its buffers, and the module must not keep the old ones
    @property
    def running_mean(self):
        return self._statistic(0)

    @property
    def running_var(self):
        return self._statistic(1)

    def _statistic(self, i: int):
        held = self.__dict__.get("_held")
        if held is None:  # (in BatchNorm's __init__, before they are set: none)
            raise AttributeError("running statistics not set")
        root, names = held
        return None if names is None else _attr(root(), names[i])

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"F.batch_norm: expected an input of at least 2 dims, got {tuple(input.shape)}")


# F.batch_norm's arguments after the input, with their defaults
_BATCH_NORM_ARGS = {"running_mean": None, "running_var": None, "weight": None, "bias": None, "training": False,
                    "momentum": 0.1, "eps": 1e-5}


def _batch_norm(n: fx.Node, cur: fx.Node, root: nn.Module):
    """For F.batch_norm of cur with weight, bias and running statistics that are root's own (or
    None) and plain settings: a BatchNorm module holding those same tensors, else None."""
    a = _args(n, cur, _BATCH_NORM_ARGS)
    if a is None or type(a["training"]) is not bool or type(a["momentum"]) not in (int, float) \
            or type(a["eps"]) not in (int, float):
        return None
    w, b = _parameter(root, a["weight"]), _parameter(root, a["bias"])
    if (a["weight"] is not None and w is None) or (a["bias"] is not None and b is None):
        return None
    stats, names = [], []
    for key in ("running_mean", "running_var"):
        v = a[key]
        if v is None:
            stats.append(None)
            continue
        if not isinstance(v, fx.Node) or v.op != "get_attr":
            return None
        t = _attr(root, v.target)
        # (statistics that require grad: the loop's in-place update of them fails)
        if not isinstance(t, torch.Tensor) or t.requires_grad or t.dim() != 1:
            return None
        stats.append(t)
        names.append(v.target)
    if (stats[0] is None) != (stats[1] is None) or (stats[0] is None and not a["training"]):
        return None
    sizes = {t.shape[0] for t in (w, b, *stats) if t is not None and t.dim() == 1}
    if len(sizes) != 1 or any(t is not None and t.dim() != 1 for t in (w, b)):
        return None
    m = _BatchNorm(sizes.pop(), eps=float(a["eps"]), momentum=float(a["momentum"]), affine=False,
                   track_running_stats=False, device="meta")
    m.weight, m.bias = w, b  # (the model's own Parameters, or None)
    # (the model's own tensors, by name: the planner updates them in place, as the loop's passes)
    m.__dict__["_held"] = (weakref.ref(root), names if stats[0] is not None else None)
    if stats[0] is not None:
        m.track_running_stats = True
        m.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long, device=stats[0].device))
    return m.train(a["training"])


def _layer(n: fx.Node, cur: fx.Node, root: nn.Module):
    """For F.linear / F.conv2d of cur with weights that are parameters of root: a Linear / Conv2d
    holding those same Parameters (so the planner lowers it as it lowers that module); for
    F.batch_norm, a BatchNorm (_batch_norm); else None."""
    if n.op == "call_function" and n.target is F.batch_norm:
        return _batch_norm(n, cur, root)
    if n.op != "call_function" or n.target not in (F.linear, F.conv2d):
        return None
    spec = {"weight": None, "bias": None} if n.target is F.linear else {
        "weight": None, "bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
    a = _args(n, cur, spec)
    if a is None:
        return None
    w, b = _parameter(root, a["weight"]), _parameter(root, a["bias"])
    if w is None or (a["bias"] is not None and b is None):
        return None
    if n.target is F.linear:
        if w.dim() != 2:
            return None
        m = nn.Linear(1, 1, bias=b is not None, device="meta")
        m.in_features, m.out_features = w.shape[1], w.shape[0]
    else:
        geom = {k: a[k] for k in ("stride", "padding", "dilation", "groups")}
        plain = lambda v: type(v) in (int, str) or (type(v) in (tuple, list) and all(type(e) is int for e in v))  # noqa
        if w.dim() != 4 or not all(plain(v) for v in geom.values()):
            return None
        geom = {k: tuple(v) if type(v) is list else v for k, v in geom.items()}
        try:
            m = nn.Conv2d(w.shape[1] * geom["groups"], w.shape[0], tuple(w.shape[2:]), bias=b is not None,
                          device="meta", **geom)
        except (ValueError, TypeError):
            return None
    m.weight = w  # (the model's own Parameters: their canonical names are the planner's)
    if b is not None:
        m.bias = b
    return m


_LAYERS = (nn.Linear, nn.Conv2d, _BatchNorm)
_POOLS = {F.max_pool2d: (nn.MaxPool2d, {"kernel_size": None, "stride": None, "padding": 0, "dilation": 1,
                                         "ceil_mode": False, "return_indices": False}),
          F.avg_pool2d: (nn.AvgPool2d, {"kernel_size": None, "stride": None, "padding": 0, "ceil_mode": False,
                                         "count_include_pad": True, "divisor_override": None})}


def _as_module(region: list, cur: fx.Node, root: nn.Module | None = None):
    """The module that computes what the code in region does to cur, or None."""
    if len(region) == 1:
        n = region[0]
        if root is not None:
            layer = _layer(n, cur, root)
            if layer is not None:
                return layer
        if n.op == "call_function" and n.target in _POOLS:
            cls, defaults = _POOLS[n.target]
            a = _args(n, cur, defaults)
            plain = lambda v: type(v) in (int, bool, type(None)) or (  # noqa: E731
                type(v) in (tuple, list) and all(type(e) is int for e in v))
            if a is not None and a["kernel_size"] is not None and all(plain(v) for v in a.values()) \
                    and not a.get("return_indices"):
                return cls(**{k: tuple(v) if type(v) is list else v for k, v in a.items()})
            return None
        key = n.target if n.op == "call_method" else n.target if n.op == "call_function" else None
        try:
            hit = _ACTIVATIONS.get(key)
        except TypeError:  # (an unhashable target)
            hit = None
        if hit is not None:
            cls, defaults = hit
            a = _args(n, cur, {k: v for k, v in defaults.items() if not k.startswith("+")})
            if a is None or any(type(v) not in (bool, int, float, str) for v in a.values()):
                return None
            a.update((k[1:], v) for k, v in defaults.items() if k.startswith("+"))  # (the in-place forms)
            if cls is nn.GELU and a["approximate"] not in ("none", "tanh"):
                return None
            return cls(**a)  # (in place as the function was: as the module with inplace=True runs)
        if (n.op == "call_function" and n.target is torch.flatten) or (n.op == "call_method" and n.target == "flatten"):
            a = _args(n, cur, {"start_dim": 0, "end_dim": -1})
            if a is not None and all(type(v) is int for v in a.values()):
                return _flatten(a["start_dim"], a["end_dim"])
        # x.view(-1, D), x.reshape(-1, D) with D a number: each task's rows of D (plan.RowsOf)
        if n.op == "call_method" and n.target in ("view", "reshape") and not n.kwargs and n.args[:1] == (cur,):
            dims = _view_dims(n)
            if len(dims) == 2 and type(dims[0]) is int and dims[0] == -1 and type(dims[1]) is int and dims[1] > 0:
                return plan.RowsOf(dims[1])
        return None
    # x.view(x.size(0), -1), x.reshape(x.shape[0], -1), x.view((x.size(0), -1))
    *size, n = region
    if n.op != "call_method" or n.target not in ("view", "reshape") or n.kwargs or not size:
        return None
    dims = _view_dims(n)
    if n.args[0] is not cur or len(dims) != 2 or dims[1] != -1 or dims[0] is not size[-1]:
        return None
    if len(size) == 1:
        s = size[0]
        ok = (s.op == "call_method" and s.target == "size" and s.args in ((cur, 0),) and not s.kwargs)
    elif len(size) == 2:
        g, s = size
        ok = (g.op == "call_function" and g.target is getattr and g.args == (cur, "shape")
              and s.op == "call_function" and s.target is operator.getitem and s.args == (g, 0))
    else:
        ok = False
    return _flatten(1, -1) if ok else None


def _view_dims(n: fx.Node) -> tuple:
    """The sizes a view / reshape node asks for, given as x.view(a, b) or x.view((a, b))."""
    return tuple(n.args[1]) if len(n.args) == 2 and type(n.args[1]) in (tuple, list) else tuple(n.args[1:])


def _flatten(start: int, end: int):
    m = nn.Flatten(start, end)
    return m if plan._flatten_dims(m, "") is not None else None


def _code_step(region: list, inputs: list, outputs: list, root: nn.Module, path: str, canon: dict,
               packed: bool = False) -> plan.Step:
    """One step running the code of region on each task's values (torch.func.vmap over the task dim):
    run(x, P) -> its output (one input, one output), or with packed, run(tuple of the inputs' values,
    P) -> tuple of the outputs' values."""
    from torch.func import vmap

    for n in region:  # (vmap would update a copy of them, or raise)
        if n.op == "call_function" and n.target is F.batch_norm:
            a = _args(n, n.args[0], _BATCH_NORM_ARGS) if n.args else None
            if a is None or (a["training"] is not False and a["running_mean"] is not None):
                raise _Failed(f"{n.name} updates running statistics in code that does not stand for one BatchNorm")
    params, live = [], {}  # parameters: per-task inputs of the vmap; buffers and tensor attributes: read at each call
    owner = weakref.ref(root)  # (the planner's cache keeps the step while root lives, not root)
    for a in dict.fromkeys(a for n in region for a in n.all_input_nodes if a.op == "get_attr"):
        try:
            p = root.get_parameter(a.target)
        except AttributeError:
            p = None
        if p is not None:
            params.append((a, canon[id(p)]))
        else:
            live[a] = lambda t=a.target: _attr(owner(), t)

    def code(values, *pvalues):
        env = dict(zip(inputs, values))
        env.update(zip((a for a, _ in params), pvalues))
        env.update((a, get()) for a, get in live.items())
        for n in region:
            args = fx.node.map_arg(n.args, env.__getitem__)
            kwargs = fx.node.map_arg(n.kwargs, env.__getitem__)
            if n.op == "call_function":
                env[n] = n.target(*args, **kwargs)
            else:  # call_method
                env[n] = getattr(args[0], n.target)(*args[1:], **kwargs)
        return tuple(env[o] for o in outputs)

    one = not packed
    if one and (len(inputs) != 1 or len(outputs) != 1):
        raise ValueError(f"_code_step: {len(inputs)} inputs and {len(outputs)} outputs need packed=True")

    def run(x, P):
        got = vmap(code, randomness="different")((x,) if one else x, *(P[c] for _, c in params))
        return got[0] if one else got

    names = list(dict.fromkeys(_name(n) for n in region))
    random = any(_draws(n) for n in region)
    return plan.Step(path, f"code({', '.join(names)}) under vmap", run, params=frozenset(c for _, c in params),
                     synthetic=True, random=random)


_DROPOUTS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout)


def _draws(n: fx.Node) -> bool:
    """Whether node n may draw random numbers (a dropout only while it drops: training, p > 0)."""
    if n.op == "call_function" and n.target in _DROPOUTS and n.args:
        a = _args(n, n.args[0], {"p": 0.5, "training": True, "inplace": False})
        if a is not None and type(a["p"]) in (int, float) and type(a["training"]) is bool:
            return a["training"] and a["p"] > 0
    return any(r in _name(n).lower() for r in _RANDOM)


def _attr(root: nn.Module, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def forward_entries(root: nn.Module, prefix: str, canon: dict, strict: bool = False):
    """(entries, None) for root's forward as a chain, paths under prefix (or one graph step where it
    is not a chain); else (None, why not)."""
    kind = type(root).__name__
    try:
        sig = inspect.signature(root.forward)
    except (TypeError, ValueError):
        return None, f"{kind}.forward has no signature to trace"
    args = list(sig.parameters.values())
    # one input; other arguments only with a default (None, a flag, a number: model(x) takes it)
    if not args or args[0].kind not in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD) \
            or args[0].default is not inspect.Parameter.empty or any(
                a.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
                or a.default is inspect.Parameter.empty or type(a.default) not in plan._PLAIN for a in args[1:]):
        return None, f"{kind}.forward takes other arguments than one input ({', '.join(sig.parameters)})"
    concrete = {a.name: a.default for a in args[1:]}
    before = set(vars(root))
    state = [(m, dict(vars(m))) for m in root.modules()]
    tracer = _Tracer()
    try:
        with torch.inference_mode(False), torch.enable_grad():  # (see _Tracer.create_proxy)
            graph = tracer.trace(root, concrete_args=concrete or None)
    except Exception as e:  # (what torch.fx cannot trace: control flow on tensor values and the like)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        graph, failed = None, f"torch.fx cannot trace {kind}.forward ({type(e).__name__}: {msg[:160]})"
    finally:
        # tensors the forward captured are kept by the tracer as attributes of root: moved out of it
        stowed = set(tracer.tensor_attrs.values()) if hasattr(tracer, "tensor_attrs") else set()
        constants = {k: vars(root).pop(k) for k in set(vars(root)) - before if k in stowed}
        # what the forward's own code assigned to the modules' attributes as it ran (a counter, a
        # kept activation, a cache): put back as it was, and the forward not traced, since traced
        # it would run once (and the planner would trace it again at every call, its attributes
        # having changed)
        written = _undo_writes(state)
    if written:
        return None, (f"{kind}.forward changes module attributes as it runs ({', '.join(written[:4])}"
                      f"{', ...' if len(written) > 4 else ''}): traced, that code would run once")
    if graph is None:
        return None, failed
    if constants:
        # a tensor the trace computed from other than the input, parameters and buffers (a tensor
        # attribute's function, a global tensor): its value of now would stand for it at every call
        return None, (f"{kind}.forward computes a tensor from other than its input, parameters and buffers "
                      f"(torch.fx would keep its value of now: {', '.join(sorted(constants))})")
    try:
        _drop_defaults(graph)
        return _chain(graph, root, prefix, canon, strict), None
    except _Failed as e:
        return None, f"{kind}.forward cannot run as batched steps ({e})"


def _same(a, b) -> bool:
    return a is b or (type(a) is type(b) and type(a) in plan._PLAIN and a == b)


def _undo_writes(state: list) -> list:
    """For (module, its vars before) pairs: the names of the attributes changed, added or removed
    since (module.attr), each put back as it was."""
    written = []
    for m, old in state:
        now = vars(m)
        for k in [k for k in set(now) | set(old) if k not in old or k not in now or not _same(now[k], old[k])]:
            written.append(f"{type(m).__name__}.{k}")
            if k in old:
                now[k] = old[k]
            else:
                del now[k]
    return sorted(written)


def _drop_defaults(graph: fx.Graph) -> None:
    """Removes the placeholders of the arguments traced at their defaults (concrete_args) and the
    checks torch.fx adds on them; an argument the forward uses otherwise fails the trace."""
    asserts = (torch.fx._symbolic_trace._assert_is_none, torch._assert, operator.eq)
    for ph in [n for n in graph.nodes if n.op == "placeholder"][1:]:
        seen, todo = [], list(ph.users)
        while todo:
            u = todo.pop()
            if u.op != "call_function" or u.target not in asserts:
                raise _Failed(f"it uses its argument {ph.target} (traced at its default) in {u.name}")
            seen.append(u)
            todo.extend(u.users)
        for u in sorted(set(seen), key=lambda n: -list(graph.nodes).index(n)):
            graph.erase_node(u)
        graph.erase_node(ph)


def _cuts(ph: fx.Node, order: list) -> list:
    """The positions i of order (the forward's nodes in order) after which order[i] is the only value
    a later node uses: where the forward is one value, as between two modules of a chain."""
    end = len(order)
    pos = {n: i for i, n in enumerate(order)}
    last = {n: max((end if u.op == "output" else pos.get(u, -1) for u in n.users), default=-1) for n in [ph] + order}
    live, cuts = {ph} if last[ph] >= 0 else set(), []
    for i, n in enumerate(order):
        live.add(n)
        live = {m for m in live if last[m] > i}
        if live == {n}:
            cuts.append(i)
    return cuts


def _chain(graph: fx.Graph, root: nn.Module, prefix: str, canon: dict, strict: bool) -> list:
    """The forward as entries one after the other, cut where it is one value: a module call alone,
    the code between module calls (one step; an activation or flatten its module), or, where a
    stretch between two cuts holds modules that are not one chain (skip connections), one graph
    step for that stretch."""
    nodes = list(graph.nodes)
    (cur,) = [n for n in nodes if n.op == "placeholder"]
    (output,) = [n for n in nodes if n.op == "output"]
    order = [n for n in nodes if n.op not in ("placeholder", "get_attr", "output")]
    result = output.args[0]
    if not isinstance(result, fx.Node):
        raise _Failed("it returns other than one value")
    if not order and result is cur:
        return []
    if not order or order[-1] is not result:
        raise _Failed(f"it returns {result.name}, not the value it computes last")
    entries, region = [], []

    def only_used_by(v: fx.Node, users) -> None:
        extra = [u for u in v.users if u not in users]
        if extra:
            raise _Failed(f"{v.name} is used again by {extra[0].name}")

    def close():
        nonlocal cur
        # a leading activation (or flatten) of the value stands for its module; the code after it
        # is a step of its own
        while len(region) > 1 and set(cur.users) == {region[0]}:
            mod = _as_module(region[:1], cur, root)
            if mod is None:
                break
            entries.append((f"{prefix}{region[0].name}()", Synthetic(mod)))
            cur = region.pop(0)
        if not region:
            return
        inside = set(region)
        outer = {a for n in region for a in n.all_input_nodes if a not in inside and a.op != "get_attr"}
        if outer != {cur}:
            raise _Failed(f"{', '.join(sorted(a.name for a in outer - {cur})) or 'nothing'} enters the code of "
                          f"{region[0].name} besides {cur.name}" if outer - {cur} else
                          f"the code of {region[0].name} does not use {cur.name}")
        only_used_by(cur, inside)
        leaving = [n for n in region if any(u not in inside for u in n.users)]
        if len(leaving) != 1:
            raise _Failed(f"the code of {region[0].name} passes {len(leaving)} values on")
        out = leaving[0]
        mod = _as_module(region, cur, root)
        names = "+".join(n.name for n in region)
        if mod is not None:
            entries.append((f"{prefix}{names}()", Synthetic(mod)))
        else:
            entries.append((f"{prefix}{names}()", _code_step(list(region), [cur], [out], root, f"{prefix}{names}()",
                                                             canon)))
        region.clear()
        cur = out

    start, prev = 0, cur  # prev: the value the segment starts from (cur: the pending region's input)
    for c in _cuts(cur, order):
        seg, out = order[start:c + 1], order[c]
        start = c + 1
        alone = _as_module(seg, prev, root) if len(seg) == 1 and seg[0].op != "call_module" else None
        prev = out
        if alone is not None and not region:  # a function standing for a module, as F.linear, F.relu
            entries.append((f"{prefix}{seg[0].name}()", Synthetic(alone)))
            cur = out
            continue
        if all(n.op != "call_module" for n in seg) and (alone is None or not isinstance(alone, _LAYERS)):
            region.extend(seg)  # code: one step with the code before it
            continue
        close()
        n = seg[0]
        if alone is not None:
            entries.append((f"{prefix}{n.name}()", Synthetic(alone)))
        elif len(seg) == 1 and n.args[:1] == (cur,) and _as_called(n, root):
            entries.append((prefix + n.target, root.get_submodule(n.target)))
        else:
            if len(seg) == 1:
                raise _Failed(f"module {n.target} is called with other inputs than {cur.name}")
            step = _graph_step(seg, cur, out, root, prefix, canon, strict)
            entries.append((step.path, step))
        cur = out
    close()
    return entries


def _as_called(n: fx.Node, root: nn.Module) -> bool:
    """Whether call_module node n calls its module as module(x) would: its arguments after the
    input, if any, are the defaults of its forward's parameters (module(x, params=None))."""
    extra = list(n.args[1:]) + list(n.kwargs.items())
    if not extra:
        return True
    try:
        params = list(inspect.signature(root.get_submodule(n.target).forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return False
    by_name = {p.name: p for p in params}
    got = list(zip(params, n.args[1:])) + [(by_name.get(k), v) for k, v in n.kwargs.items()]
    return all(p is not None and p.default is not inspect.Parameter.empty and type(v) in plan._PLAIN
               and type(p.default) is type(v) and p.default == v for p, v in got)


# nodes whose value is a number or shape, not a tensor (vmap returns tensors only)
_SHAPES = ("size", "dim", "numel", "shape", "ndim", "ndimension")


def _is_shape(n: fx.Node) -> bool:
    if n.op == "call_method" and n.target in _SHAPES:
        return True
    if n.op == "call_function" and n.target is getattr and len(n.args) > 1 and n.args[1] in _SHAPES:
        return True
    return (n.op == "call_function" and n.target is operator.getitem and isinstance(n.args[0], fx.Node)
            and _is_shape(n.args[0]))


def _graph_step(nodes: list, ph: fx.Node, result: fx.Node, root: nn.Module, prefix: str, canon: dict,
                strict: bool) -> plan.Step:
    """One step for a forward that is a graph, not a chain (skip connections, values used twice):
    each run of modules one after the other (each value used by the next alone) is lowered as a
    chain, each stretch of the code between module calls runs under vmap over the tasks (its
    inputs and outputs as many as it has), in the forward's order."""
    units, run, region = [], None, []  # units: ("run", input, entries, last) / ("code", nodes)

    def close_run():
        nonlocal run
        if run is not None:
            units.append(("run",) + tuple(run))
            run = None

    def close_region():
        if region:
            units.append(("code", list(region)))
            region.clear()

    for n in nodes:
        mod, inp = None, None
        if n.op == "call_module":
            if not n.args or not isinstance(n.args[0], fx.Node) or not _as_called(n, root):
                raise _Failed(f"module {n.target} is called with other than one input")
            mod, inp = root.get_submodule(n.target), n.args[0]
            path = prefix + n.target
        elif n.args and isinstance(n.args[0], fx.Node):
            mod, inp = _as_module([n], n.args[0], root), n.args[0]
            mod = None if mod is None else Synthetic(mod)
            path = f"{prefix}{n.name}()"
        if mod is None:
            close_run()
            region.append(n)
            continue
        close_region()
        if run is not None and run[2] is inp and set(inp.users) == {n}:
            run[1].append((path, mod))
            run[2] = n
        else:
            close_run()
            run = [inp, [(path, mod)], n]
    close_run()
    close_region()

    schedule, params_all, random, kinds, leaves = [], set(), False, [], []
    for unit in units:
        if unit[0] == "run":
            _, inp, entries, last = unit
            steps = []
            plan._lower_entries(entries, canon, strict, steps, leaves)
            for st in steps:
                if not st.synthetic:
                    st.params = frozenset(canon[id(p)] for p in root.get_submodule(st.path[len(prefix):]).parameters())
                params_all |= st.params
                random = random or st.random or st.fallback is not None or st.kind == "dropout"
                kinds.append(st.kind)
            schedule.append(("run", inp, steps, last))
        else:
            region = unit[1]
            inside = set(region)
            inputs = list(dict.fromkeys(a for n in region for a in n.all_input_nodes
                                        if a not in inside and a.op != "get_attr"))
            outputs = [n for n in region if any(u not in inside for u in n.users)]
            shapes = [n.name for n in outputs if _is_shape(n)]
            if shapes:
                raise _Failed(f"{shapes[0]}, a size, is used across a module call")
            if not inputs or not outputs:
                raise _Failed(f"the code of {region[0].name} uses no value of the forward or passes none on")
            st = _code_step(region, inputs, outputs, root, "", canon, packed=True)
            params_all |= st.params
            random = random or st.random
            kinds.append(st.kind)
            schedule.append(("code", inputs, st, outputs))

    def run(x, P):
        env = {ph: x}
        for unit in schedule:
            if unit[0] == "run":
                _, inp, steps, last = unit
                v = env[inp]
                for st in steps:
                    v = st.run(v, P)
                env[last] = v
            else:
                _, inputs, st, outputs = unit
                env.update(zip(outputs, st.run(tuple(env[a] for a in inputs), P)))
        return env[result]

    counts = {}
    for k in kinds:
        counts[k] = counts.get(k, 0) + 1
    summary = ", ".join(f"{k} x{c}" if c > 1 else k for k, c in counts.items())
    return plan.Step(f"{prefix}{nodes[0].name}..{nodes[-1].name}()", f"graph({summary})", run,
                     params=frozenset(params_all), synthetic=True, random=random,
                     spec=dict(has_conv="batched_conv2d" in counts,
                               batch_norms=[m for m in leaves if isinstance(m, plan._BATCH_NORMS)]))

