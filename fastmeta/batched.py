"""BatchedMAML: a whole meta-batch of tasks in one call.

    meta = fastmeta.BatchedMAML(model, inner_lr=0.01, inner_steps=5)
    loss = meta(xs, ys, xq, yq)        # xs [T, K, ...], ys [T, K, ...], xq [T, Q, ...], yq [T, Q, ...]
    loss.backward()                    # model.parameters() get the exact meta-gradient
    opt.step()

The loss is the mean over tasks of each task's query loss after ``inner_steps`` SGD steps on its
support set, every step starting from the meta-parameters (MAML, Finn et al. 2017). Second order
unless ``first_order``. ``learn_inner_lr=True`` learns one inner learning rate per parameter entry
(Meta-SGD, Li et al. 2017), registered as parameters of this module; ``'per_layer'`` one a
parameter tensor, ``'per_layer_step'`` one a parameter tensor and inner step (MAML++, Antoniou et
al. 2019), whose multi-step loss ``step_loss_weights`` and per-step BatchNorm ``per_step_bn``
give too.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import math
import numbers
import threading
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from . import _checks, ops, plan
from ._phases import phase, ranges_on
from .backend import _request, get_backend, requested, select, use_backend
from .ops.mlp_inner_loop import cpu_kernel_slower, refuse_second_derivative

_LOSSES = ("mse", "cross_entropy")

# The cross-entropy labels of the public call in progress (this thread), to be range-checked by
# the call's first loss, where the number of classes is known: one check (one device sync) a call.
_pending = threading.local()


@contextlib.contextmanager
def _labels_to_check(meta, named):
    old = getattr(_pending, "labels", None)
    _pending.labels = list(named) if meta.loss == "cross_entropy" and not _checks.labels_skipped() else []
    try:
        yield
    finally:
        _pending.labels = old


def _map_tensors(f, x):
    """f applied to every tensor in x (a tensor, or tuples, lists and dicts of them)."""
    if isinstance(x, torch.Tensor):
        return f(x)
    if isinstance(x, (tuple, list)):
        return type(x)(_map_tensors(f, v) for v in x)
    if isinstance(x, dict):
        return {k: _map_tensors(f, v) for k, v in x.items()}
    return x


def _plain(t):
    """t, or a normal clone of it if it is an inference tensor (made under torch.inference_mode)."""
    return t.clone() if t.is_inference() else t


_AUTOCAST_DEVICES = ("cpu", "cuda")
_NO_BINDINGS: dict = {}  # (read-only: value_and_grad and forward look a method up in it)
# where BatchedMAML keeps its bindings of the kernel's calls (_bind_direct_call) in its __dict__: a
# dict {"value_and_grad": ..., "forward": ...}, changed in place (its entry is left out of the
# bindings' own snapshots of the __dict__)
_BOUND_KEY = "_bound_calls"
# one call per BatchedMAML call (~0.2 us; the public per-device test is ~0.4 us a device)
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None) or (
    lambda: any(torch.is_autocast_enabled(d) for d in _AUTOCAST_DEVICES))


def _module_backend(method):
    """Runs a BatchedMAML method on the module's ``backend`` while the global request is auto.

    Under torch.inference_mode (evaluation) the method runs outside it, under no_grad: adaptation
    takes gradients, which inference mode rules out for every tensor it makes. Inference-tensor
    arguments are cloned into normal ones and the results come back detached.

    Under torch.compile the method runs as it is, outside the compiled graph (a graph break): its
    work is fastmeta's kernels already, and a graph that torch.compile compiles is differentiable
    once only, so the second-order inner loop could not run inside one.

    Under torch.autocast the method runs with autocast off, in the model's dtype: the fused kernels
    compute in float32 / float64 whatever autocast asks, and the batched ops would otherwise mix
    autocast's half-precision outputs with the meta-parameters' dtype."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        if torch.compiler.is_compiling():  # (decorating at import would import torch._dynamo: ~2 s)
            return torch.compiler.disable(run)(self, *args, **kwargs)
        autocast = _any_autocast() and [d for d in _AUTOCAST_DEVICES if torch.is_autocast_enabled(d)]
        if autocast:
            with contextlib.ExitStack() as stack:
                for d in autocast:
                    stack.enter_context(torch.autocast(d, enabled=False))
                return run(self, *args, **kwargs)
        if torch.is_inference_mode_enabled():
            with torch.inference_mode(False), torch.no_grad():
                out = run(self, *_map_tensors(_plain, args), **_map_tensors(_plain, kwargs))
                return _map_tensors(torch.Tensor.detach, out)
        self._check_structure()
        b = self.backend
        if b is not None and get_backend() == "auto":
            with use_backend(b):
                return method(self, *args, **kwargs)
        return method(self, *args, **kwargs)
    return run


def _check_inner_lr(lr):
    """A fixed inner rate: a finite number or a one-element floating tensor (learnable or not)."""
    _checks.lr_value("inner_lr", lr)
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError(f"inner_lr: a tensor inner_lr must have one element, got shape "
                         f"{tuple(lr.shape)} (use learn_inner_lr=True for per-parameter rates)")


class _FirstLayer(NamedTuple):
    """What a model's first Linear / Conv2d layer takes (BatchedMAML._check_input_width): its path,
    whether it is a Conv2d, the input width or channels it takes, its weight, and the _parameters
    dict and key that hold the weight (a weight replaced there is read again)."""
    path: str
    conv: bool
    takes: int
    weight: torch.Tensor
    holder: dict
    key: str


class _Setting:
    """A BatchedMAML setting: a plain value in the instance dict (under a leading underscore),
    checked by check(name, value), which returns the value kept, whenever it is assigned."""

    def __init__(self, check):
        self.check = check

    def __set_name__(self, owner, name):
        self.name, self.key = name, "_" + name

    def __get__(self, obj, owner=None):
        return self if obj is None else obj.__dict__[self.key]

    def __set__(self, obj, value):
        obj.__dict__[self.key] = self.check(self.name, value)


def _steps(name, steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {type(steps).__name__}")
    if steps < 0:
        raise ValueError(f"{name}: must be >= 0, got {steps}")
    return int(steps)


def _loss(name, loss):
    if not (callable(loss) or (isinstance(loss, str) and loss in _LOSSES)):
        raise ValueError(f"{name}: expected one of {_LOSSES} or a callable, got {loss!r}")
    return loss


def _inner_params(model: nn.Module, inner_params):
    """BatchedMAML's inner_params as kept: None (every parameter), ('names', prefixes) or
    ('callable', f); checked against the model's parameter names now."""
    if inner_params is None:
        return None
    names = [n for n, _ in model.named_parameters()]
    if not names:
        raise ValueError(f"inner_params: the model ({type(model).__name__}) has no parameters to select from")
    if callable(inner_params) and not isinstance(inner_params, nn.Module):
        try:
            chosen = [n for n in names if inner_params(n)]
        except Exception as e:
            raise TypeError(f"inner_params: the callable must take a parameter name (str) and return True or "
                            f"False; on {names[0]!r} it raised {type(e).__name__}: {e}") from e
        if not chosen:
            raise ValueError(f"inner_params: the callable selects none of the model's parameters {names}")
        return ("callable", inner_params)
    single = isinstance(inner_params, (str, nn.Module, torch.Tensor))
    items = [inner_params] if single else inner_params
    try:
        items = list(items)
    except TypeError:
        raise TypeError(f"inner_params: expected None, a parameter or module name, a module or parameter of the "
                        f"model, a list of those (e.g. model.head.parameters()), or a callable name -> bool, got "
                        f"{type(inner_params).__name__}") from None
    if not items:
        raise ValueError("inner_params: an empty list selects no parameter (None adapts every parameter)")
    paths = {}
    for path, m in model.named_modules():
        paths.setdefault(id(m), path)
    canon = {id(p): n for n, p in model.named_parameters()}
    prefixes = []
    for it in items:
        if isinstance(it, nn.Module):
            if id(it) not in paths:
                raise ValueError(f"inner_params: a {type(it).__name__} that is not a module of the model")
            path = paths[id(it)]
            prefixes.append(path)
            # a parameter it shares with an earlier module goes by that module's name
            prefixes.extend(canon[id(p)] for p in it.parameters() if not _under(canon[id(p)], path))
            if not any(True for _ in it.parameters()):
                raise ValueError(f"inner_params: module {path or '<model>'!r} ({type(it).__name__}) has no parameters")
        elif isinstance(it, torch.Tensor):
            if id(it) not in canon:
                raise ValueError(f"inner_params: a tensor {tuple(it.shape)} that is not a parameter of the model")
            prefixes.append(canon[id(it)])
        elif isinstance(it, str):
            if not any(_under(n, it) for n in names):
                raise ValueError(f"inner_params: {it!r} names no parameter or module of the model; its parameters "
                                 f"are {names}")
            prefixes.append(it)
        else:
            raise TypeError(f"inner_params: expected parameter or module names (str), modules or parameters, got "
                            f"{type(it).__name__}")
    return ("names", tuple(dict.fromkeys(prefixes)))


def _under(name: str, prefix: str) -> bool:
    """Whether parameter ``name`` is ``prefix`` itself or in the module of that path ('' is the model)."""
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


class _StepBatchNorms(nn.Module):
    """BatchedMAML(per_step_bn=True)'s tables: for each BatchNorm module its program runs (key: the
    module's path), a weight and a bias [S, C] where the module has them (meta-learned, not adapted)
    and running statistics [S, C], [S, C], [S] where it tracks them, one row an inner step, made
    from the module's own."""

    def __init__(self, model: nn.Module, program, steps: int):
        super().__init__()
        self.steps = steps
        self.weight, self.bias = nn.ParameterDict(), nn.ParameterDict()
        params = dict(model.named_parameters())
        for key, bn, w, b in self._modules_of(program):
            if key in self.weight or key in self.bias or hasattr(self, f"mean__{key}"):
                continue  # (a module run at several places: one table)
            for table, name in ((self.weight, w), (self.bias, b)):
                if name is not None:  # (a frozen weight or bias: a frozen table)
                    p = params[name]
                    table[key] = nn.Parameter(p.detach().unsqueeze(0).repeat(steps, *([1] * p.dim())),
                                              requires_grad=p.requires_grad)
            if bn.track_running_stats and bn.running_mean is not None:
                for part, buf in (("mean", bn.running_mean), ("var", bn.running_var), ("count", bn.num_batches_tracked)):
                    self.register_buffer(f"{part}__{key}", buf.detach().unsqueeze(0).repeat(steps, *([1] * buf.dim())))

    @staticmethod
    def _modules_of(program):
        """(key, module, weight name, bias name) of each BatchNorm step of the program; a module run
        at several places (tied) has one key, its first place's."""
        keys = {}
        for step in program.steps:
            if step.kind in plan.BN_KINDS:
                spec = step.spec
                key = keys.setdefault(id(spec["module"]), step.path.replace(".", "__"))
                yield key, spec["module"], spec["w"], spec["b"]

    def at_step(self, program, P: dict, step: int, tables: dict | None = None):
        """(P with each module's weight and bias of that step, the step_statistics context)."""
        P = dict(P)
        stats = {}
        for key, bn, w, b in self._modules_of(program):
            for table, name, kind in ((self.weight, w, "weight"), (self.bias, b, "bias")):
                if name is not None and key in table:
                    t = tables.get(f"step_bn.{kind}.{key}", table[key]) if tables else table[key]
                    P[name] = t[step].unsqueeze(0).expand(P[name].shape[0], *t.shape[1:])
            if hasattr(self, f"mean__{key}"):
                stats[id(bn)] = plan.StepStatistics(bn, getattr(self, f"mean__{key}"), getattr(self, f"var__{key}"),
                                                    getattr(self, f"count__{key}"))
        return P, plan.step_statistics(stats, step)

    def extra_repr(self) -> str:
        return f"steps={self.steps}"


_LR_KINDS = ("per_element", "per_layer", "per_layer_step")


def _lr_kind(learn_inner_lr):
    """learn_inner_lr as kept: None (a fixed inner_lr), 'per_element' (True, Meta-SGD), 'per_layer'
    or 'per_layer_step'."""
    if learn_inner_lr is None:
        return None
    if isinstance(learn_inner_lr, str):
        if learn_inner_lr in _LR_KINDS:
            return learn_inner_lr
    else:
        try:  # True / False (numpy's too), or 1 / 0
            return "per_element" if _flag01("learn_inner_lr", learn_inner_lr) else None
        except TypeError:
            pass
    raise ValueError(f"learn_inner_lr: expected False, True (one rate a parameter entry, Meta-SGD), "
                     f"'per_layer' or 'per_layer_step', got {learn_inner_lr!r}")


def _step_weights(name, weights):
    """step_loss_weights as kept: None, or a tuple of finite floats (one a step, at least one)."""
    if weights is None:
        return None
    if isinstance(weights, torch.Tensor):
        if weights.dim() != 1 or weights.is_complex():
            raise ValueError(f"{name}: expected a 1-d tensor or a sequence of numbers, one a step, got a tensor "
                             f"of shape {tuple(weights.shape)}")
        weights = weights.detach().cpu().tolist()
    if isinstance(weights, (str, bytes)) or not hasattr(weights, "__iter__"):
        raise TypeError(f"{name}: expected None or a sequence of numbers, one a step, got {type(weights).__name__}")
    out = []
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w):
            raise ValueError(f"{name}: entry {i} must be a finite number, got {w!r}")
        out.append(float(w))
    if not out:
        raise ValueError(f"{name}: empty; give one weight a step (or None for the last step's query loss alone)")
    return tuple(out)


def _chunk(name, chunk):
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, numbers.Integral) or chunk < 1):
        raise ValueError(f"{name}: expected None or an int >= 1, got {chunk!r}")
    return None if chunk is None else int(chunk)


def _flag(name, value) -> bool:
    """A True / False setting (numpy's bool too); anything else raises, naming it."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":  # (numpy.bool_)
        return bool(value)
    raise TypeError(f"{name}: expected True or False, got {value!r}")


def _flag01(name, value) -> bool:
    """_flag, also taking 0 and 1 (first_order and check_finite took any value's truth before)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value in (0, 1):
        return bool(value)
    return _flag(name, value)


class BatchedMAML(nn.Module):
    """MAML / Meta-SGD over a meta-batch with a leading task dim T (see module docstring).

    Args:
        model: the network; its parameters are the meta-parameters. Its structure (modules, their
            forward and backward hooks, global module hooks, parametrizations) is read into the
            program that every call runs, and read again at the next call where it changed (a
            module replaced, a hook or a parametrization added or removed). The inner loop
            adapts the parameters that require grad at each call (and that inner_params selects);
            one that does not require grad is neither adapted nor meta-learned. BatchNorm modules
            that track running statistics have them updated as the per-task loop would (see
            fastmeta.plan).
        inner_lr: inner-loop learning rate (a number, or a tensor, e.g. a learnable scalar).
        inner_steps: number of inner SGD steps (>= 0).
        first_order: drop the second-order terms (FO-MAML).
        loss: 'mse', 'cross_entropy', or a callable loss(pred, target) for one task's batch.
            cross_entropy's classes are the output's last dim, its labels the class indices of
            the other dims ([T, N], or [T, N, L] for outputs [T, N, L, C]: N * L samples a task).
        learn_inner_lr: learned inner rates, registered as this module's parameters (``lrs``) and
            initialised to inner_lr: True, one a parameter entry (Meta-SGD, Li et al. 2017);
            'per_layer', one a parameter tensor; 'per_layer_step', one a parameter tensor and
            inner step (MAML++'s LSLR, Antoniou et al. 2019: shape [inner_steps] each; a later
            inner_steps may be smaller, not larger). Only the adapted parameters have rates.
        step_loss_weights: None (the query loss after the last inner step), or one weight a step:
            each task's loss is then sum_s w_s * its query loss after step s (MAML++'s multi-step
            loss; ``fastmeta.step_loss_schedule`` gives its annealed weights). A step of weight 0
            is not evaluated. May be set before any call (e.g. each epoch); its length must be
            inner_steps. The layers that read no adapted parameter run once on the query set for
            all the steps' losses.
        per_step_bn: MAML++'s per-step BatchNorm: each BatchNorm module gets a weight, a bias and
            running statistics for each inner step ([inner_steps, C] in ``step_bn``, made from the
            module's own), meta-learned and not adapted; the support pass of step s and the query
            loss after it run with row s, the last query (and predict) with the last row. The
            modules' own weights and biases are then not read (their meta-gradient is zero).
        strict: raise if a module of ``model`` has no batched lowering instead of using vmap.
        check_finite: raise if a support loss becomes non-finite during adaptation (syncs).
        task_chunk: memory for time. forward / value_and_grad then take the meta-batch this many
            tasks at a time, each chunk's meta-gradient computed and its autograd graph freed
            before the next, so memory holds one chunk's graph (about ``task_chunk`` times a
            per-task loop's) instead of all T tasks'. The result is the same; forward's loss is
            then differentiable once (its backward gives the accumulated meta-gradient; a second
            derivative raises). The fused MLP kernel keeps no graph and ignores it.
        backend: this module's backend ('cpp', 'cuda', 'triton', 'torch', or a dict op -> backend;
            None or 'auto': the global choice). It applies while the global request (set_backend /
            use_backend / FASTMETA_BACKEND) is auto; an explicit request wins. ``fastmeta.tune``
            sets it to what it measured fastest for this module and batch shape.
        recompute: memory for time. A first block Conv2d -> BatchNorm2d -> ReLU -> MaxPool2d(2)
            (the largest activations of a conv net) runs as one op that keeps the input images
            instead of the convolution's output and recomputes that output in each backward
            (ops.conv_bn_relu_pool: one more convolution of the images a backward; mini-ImageNet's
            first convolution is a fifth of the network's multiply-adds). Where the inner steps'
            graphs are not kept (first order, checkpoint_steps) the query's graph is the largest,
            and its later conv blocks then keep only their inputs too (their convolution outputs,
            statistics and pooling indices recomputed in the backward: one more forward of those
            blocks on the query). Same result, to any order of derivative. Where the block's ops
            have no fused kernels here, it runs as usual.
        inner_params: which parameters the inner loop adapts (None: all). A parameter or module
            name (a module's path in ``model.named_parameters()``'s names, e.g. ``'4'`` or
            ``'head'``), a module or parameter of the model, a list or iterable of those (e.g.
            ``model.head.parameters()``), or a callable name -> bool. The
            others are shared by all tasks in the inner loop and still meta-learned: their
            meta-gradient includes, in second order, their effect on the inner steps (ANIL, Raghu
            et al. 2020: ``inner_params=model.head``; BOIL, Oh et al. 2021: the body). The leading
            layers that read no adapted parameter (a body before an adapted head) run once a call
            on the support set instead of once an inner step, as an ANIL loop computes the
            features once (their BatchNorm running statistics, where tracked, are still updated
            as the loop's passes would, once a step).
        checkpoint_steps: memory for time, second order. The inner loop keeps no autograd graph:
            each step's gradient is taken as in first order and the step's parameters kept (a few
            parameter-sized tensors a step); the outer backward then recomputes one step at a time,
            last to first, its graph (forward and differentiable backward at the kept parameters)
            and backpropagates through it (v_s = v_{s+1} - H_s (lr v_{s+1}), the same exact
            meta-gradient). Memory holds the query's graph or one step's, not all S steps'; time
            grows by a forward and a backward a step. The meta-loss is then differentiable once.
            First order and the fused MLP kernel keep no graph anyway and ignore it.
    """

    def __init__(self, model: nn.Module, inner_lr, inner_steps: int = 1, first_order: bool = False,
                 loss="mse", learn_inner_lr: bool = False, strict: bool = False,
                 check_finite: bool = False, task_chunk: int | None = None, backend: str | None = None,
                 recompute: bool = False, checkpoint_steps: bool = False, inner_params=None,
                 step_loss_weights=None, per_step_bn: bool = False):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        model = plan.uncompiled(model)  # torch.compile(model): the module it wraps (same parameters)
        _check_inner_lr(inner_lr)
        kind = _lr_kind(learn_inner_lr)
        self._inner = _inner_params(model, inner_params)
        self.backend = backend
        self.model = model
        # (each setting's property checks its value, here and at any later assignment)
        self.inner_steps, self.first_order, self.loss = inner_steps, first_order, loss
        self.task_chunk, self.recompute, self.checkpoint_steps = task_chunk, recompute, checkpoint_steps
        self.strict = bool(strict)
        self.check_finite = check_finite
        self.step_loss_weights = step_loss_weights
        self.program = plan.lower(model, strict=self.strict)
        self._stamp_structure()
        self.step_bn = self._step_batch_norms(per_step_bn)
        self._last_sig, self._last_fused, self._direct, self._direct_grad = None, False, None, None
        self._direct_layer = None
        self._classes = None  # the logits' width at the last label check (cross-entropy)
        params = dict(model.named_parameters())
        self._adapt_names = self._trainable_names()
        self._trainable = None  # requires_grad of the model's parameters when _adapt_names was read
        self._lr_kind = kind
        if kind is not None:
            lr0 = float(inner_lr) if not isinstance(inner_lr, torch.Tensor) else float(inner_lr.detach())

            def rate(p):  # a parameter's learned rate(s): per entry, one, or one an inner step
                shape = {"per_element": p.shape, "per_layer": (), "per_layer_step": (self.inner_steps,)}[kind]
                return nn.Parameter(torch.full(shape, lr0, dtype=p.dtype, device=p.device))
            # in the model's parameter order (a plain dict would be sorted by name)
            self.lrs = nn.ParameterDict(collections.OrderedDict(
                (self._lr_key(n), rate(params[n].detach())) for n in self._adapt_names))
            self.inner_lr = None
        else:
            self.lrs = None
            self.inner_lr = inner_lr

    # the program (closures over the model's modules) and what was derived from it are not state:
    # a copy or an unpickled module lowers its own model again, whose modules it must read (their
    # training flags, BatchNorm buffers), not the original's
    _DERIVED = ("program", "_direct", "_direct_grad", "_direct_layer", "_last_sig", "_walk", "_walk_model",
                "_walk_named", "_stamp", "_trainable", "_rate_index_cache", "_adapt_sig", "_input_rule", _BOUND_KEY)

    # settings: checked where they are set, in the constructor or later (meta.inner_steps = 10
    # for a longer adaptation at meta-test time, say), so that a bad value raises there and never
    # reaches a kernel
    inner_steps = _Setting(_steps)
    first_order = _Setting(_flag01)
    loss = _Setting(_loss)
    task_chunk = _Setting(_chunk)
    recompute = _Setting(_flag)
    checkpoint_steps = _Setting(_flag)
    check_finite = _Setting(_flag01)
    step_loss_weights = _Setting(_step_weights)

    def __getstate__(self):
        state = self.__dict__.copy()
        for key in self._DERIVED:
            state[key] = None
        return state

    def __setstate__(self, state):
        for name, attr in vars(BatchedMAML).items():  # (a module pickled when they were plain attributes)
            if isinstance(attr, _Setting) and name in state:
                state[attr.key] = state.pop(name)
        # (a module pickled before these settings existed)
        state.setdefault("_step_loss_weights", None)
        state.setdefault("_direct_layer", None)
        state.get("_modules", {}).setdefault("step_bn", None)
        state.setdefault("_lr_kind", "per_element" if state.get("_modules", {}).get("lrs") is not None else None)
        super().__setstate__(state)
        self.program = plan.lower(self.model, strict=self.strict)
        self._stamp_structure()

    # -- the model's structure, read again where it changed -------------------------------------
    def _stamp_structure(self):
        """What a module swapped in or out, a hook or a parametrization added or removed changes:
        each module's dict of children with its entries, PyTorch's count of hook handles made (an
        added hook), and the hooks of the modules that have some and the global ones (a removed
        hook)."""
        mods = list(self.model.modules())
        dicts = [m._modules for m in mods]
        hooked = [(m, n) for m, n in zip(mods, map(plan.hook_count, mods)) if n]
        self._stamp = ([(d, tuple(d.values())) for d in dicts if d], [d for d in dicts if not d], hooked,
                       plan.global_hooks())
        self._hook_id = RemovableHandle.next_id

    def _check_structure(self):
        """Lowers the model again where its structure changed since the last call (a module replaced,
        say a new head; a hook or a parametrization added or removed), as a new BatchedMAML would: the
        program, the parameter walk and the checked signature are then made afresh."""
        containers, leaves, hooked, n_global = self._stamp
        if RemovableHandle.next_id == self._hook_id and not any(leaves) and (  # (leaves: still no children)
                not hooked or all(plan.hook_count(m) == n for m, n in hooked)) and (  # (none removed)
                not n_global or plan.global_hooks() == n_global):
            for d, v in containers:
                if tuple(d.values()) != v:
                    break
            else:
                return
        program = plan.lower(self.model, strict=self.strict)  # (the same object where nothing changed)
        if program is not self.program:
            self.program = program
            for key in ("_walk", "_walk_model", "_walk_named"):
                self.__dict__.pop(key, None)
            self._last_sig = self._direct = self._direct_grad = self._direct_layer = self._trainable = None
            self.__dict__.pop("_adapt_sig", None)
        self._stamp_structure()

    @property
    def backend(self):
        """This module's backend request (None: the global one); see the constructor."""
        return self.__dict__["_backend"]

    @backend.setter
    def backend(self, name):
        req = _request(name)
        self.__dict__["_backend"] = None if req == "auto" else req

    # -- helpers --------------------------------------------------------------------------------
    @staticmethod
    def _lr_key(name: str) -> str:
        return name.replace(".", "__")

    def _lr_list(self):
        """The learned rates in the adapted parameters' order, or the scalar inner_lr."""
        if self.lrs is not None:
            # (ParameterDict's own lookup goes through Module.__getattr__, a cost per rate and call)
            rates = self.lrs._parameters
            return [rates[self._lr_key(n)] for n in self._adapt_names]
        return self.inner_lr

    def _step_lr(self, lr, step: int):
        """The rate of inner step ``step`` from _lr_list()'s (learn_inner_lr='per_layer_step': each
        parameter's entry for that step)."""
        if self._lr_kind == "per_layer_step":
            return [r[step] for r in lr]
        return lr

    def _step_batch_norms(self, per_step_bn):
        """The per-step BatchNorm tables (per_step_bn), or None."""
        if not _flag("per_step_bn", per_step_bn):
            return None
        prog = self.program
        if not prog.batch_norms:
            raise ValueError(f"per_step_bn: the model ({type(self.model).__name__}) has no BatchNorm module")
        lowered = {id(m) for m in prog.lowered_batch_norms()}
        inside = [type(m).__name__ for m in prog.batch_norms if id(m) not in lowered]
        if inside:
            raise ValueError(f"per_step_bn: {', '.join(inside)} run inside a torch.func fallback or a traced forward's "
                             "graph step (see fastmeta.explain), where a step's own weights and statistics cannot reach "
                             "them")
        if self.inner_steps < 1:
            raise ValueError(f"per_step_bn: needs inner_steps >= 1, got {self.inner_steps}")
        return _StepBatchNorms(self.model, prog, self.inner_steps)

    def _at_step(self, P: dict, step: int, tables: dict | None = None):
        """(P, context) for a pass of inner step ``step`` (its query loss too): with per_step_bn,
        each BatchNorm's weight and bias of that step in P and its running statistics of that step
        in the context; else P as it is."""
        if self.step_bn is None:
            return P, contextlib.nullcontext()
        # (inner_steps set to 0 after construction: the query runs with the first step's row)
        return self.step_bn.at_step(self.program, P, max(0, min(step, self.inner_steps - 1)), tables)

    def _kept_running_stats(self):
        """plan.kept_running_stats for this module's calls that are not the user's passes (tune's
        timings, graphed's warmup): the model's BatchNorm statistics and per_step_bn's."""
        return plan.kept_running_stats(self.program, self.step_bn.buffers() if self.step_bn is not None else ())

    def _step_weights(self):
        """step_loss_weights, checked against inner_steps (one weight a step), or None."""
        weights = self.step_loss_weights
        if weights is not None and len(weights) != self.inner_steps:
            raise ValueError(f"BatchedMAML: step_loss_weights has {len(weights)} weights but inner_steps="
                             f"{self.inner_steps}: one weight a step (the query loss after each step), or None "
                             "for the last step's alone")
        return weights

    def _check_rates(self):
        """inner_steps against the learned rates of 'per_layer_step' (one an inner step, made for the
        inner_steps at construction)."""
        S = self.inner_steps
        if self._lr_kind == "per_layer_step":
            have = min(r.shape[0] for r in self.lrs.values()) if len(self.lrs) else S
            if S > have:
                key, r = next(iter(self.lrs.items()))
                raise ValueError(f"BatchedMAML(learn_inner_lr='per_layer_step'): inner_steps={S} but the learned "
                                 f"rates have {have} steps (lrs[{key!r}] {tuple(r.shape)}); set inner_steps "
                                 f"<= {have} or build a BatchedMAML with {S} steps")
        if self.step_bn is not None and S > self.step_bn.steps:
            raise ValueError(f"BatchedMAML(per_step_bn=True): inner_steps={S} but the BatchNorm tables have "
                             f"{self.step_bn.steps} steps; set inner_steps <= {self.step_bn.steps} or build a "
                             f"BatchedMAML with {S} steps")

    def _selected(self, name: str) -> bool:
        """Whether inner_params selects the parameter of this (canonical) name."""
        if self._inner is None:
            return True
        kind, rule = self._inner
        if kind == "callable":
            return bool(rule(name))
        return any(_under(name, prefix) for prefix in rule)

    def _trainable_names(self) -> list:
        """The program's parameter names whose parameters require grad and that inner_params selects:
        those the inner loop adapts."""
        named = dict(self.model.named_parameters())
        # (per_step_bn: the BatchNorm modules' own weights and biases are not read; their tables are)
        table = getattr(self, "step_bn", None)
        unused = set() if table is None else {n for _, _, w, b in table._modules_of(self.program) for n in (w, b) if n}
        return [n for n in self.program.names if named[n].requires_grad and self._selected(n) and n not in unused]

    def _sync_trainable(self, model_params=None):
        """The adapted parameters are those that require grad: read again where that changed since
        the last call (a body frozen after the module was built, as ANIL does, is then no longer
        adapted in the inner loop). model_params: _param_list(model_only=True)'s, if at hand."""
        if model_params is None:
            model_params = self._param_list(model_only=True)
        flags = tuple([p.requires_grad for p in model_params])
        if flags == self._trainable:
            return
        names = self._trainable_names()
        if self.lrs is not None:
            missing = [n for n in names if self._lr_key(n) not in self.lrs]
            if missing:
                raise ValueError(f"BatchedMAML(learn_inner_lr=True): parameter(s) {missing} require grad but did "
                                 "not when this module was built, so they have no learned rate; build a new "
                                 "BatchedMAML")
        self._adapt_names, self._trainable, self._last_sig = names, flags, None
        self.__dict__.pop("_adapt_sig", None)

    def _param_list(self, model_only: bool = False) -> list:
        """list(self.parameters()) (with model_only, list(self.model.parameters())) by a walk over
        the modules listed at the first call (the walk of nn.Module.parameters() costs more than
        the fused op's own overhead on small models); a parameter replaced or added on one of those
        modules is seen, as in parameters()."""
        key = "_walk_model" if model_only else "_walk"
        mods = self.__dict__.get(key)
        if mods is None:
            root = self.model if model_only else self
            mods = self.__dict__[key] = [m._parameters for m in root.modules()]
        seen, out = set(), []
        for d in mods:
            for p in d.values():
                if p is not None and id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    def _meta_params(self) -> dict:
        """dict(self.model.named_parameters()), by a walk over the modules listed at the first call
        (as _param_list's): a parameter replaced or added on one of them is seen, a parameter held
        by two of them is named once, by its first name."""
        mods = self.__dict__.get("_walk_named")
        if mods is None:
            mods = self.__dict__["_walk_named"] = [(prefix + "." if prefix else "", m._parameters)
                                                   for prefix, m in self.model.named_modules()]
        seen, out = set(), {}
        for prefix, d in mods:
            for k, p in d.items():
                if p is not None and id(p) not in seen:
                    seen.add(id(p))
                    out[prefix + k] = p
        return out

    @property
    def _first_param(self):
        return next(iter(self.model.parameters()))

    def _task_loss(self, pred, target):
        if self.loss == "mse":
            return ops.mse(pred, target)
        if self.loss == "cross_entropy":
            T, C = pred.shape[0], pred.shape[-1]
            labels, positions = target.shape[1:], pred.shape[1:-1]
            if labels != positions and [d for d in labels if d != 1] != [d for d in positions if d != 1]:
                raise ValueError(f"BatchedMAML: cross_entropy labels {tuple(target.shape)} do not match the "
                                 f"model's output {tuple(pred.shape)}: expected {tuple(pred.shape[:-1])}, "
                                 "one class index an output position (the classes are its last dim)")
            pending = getattr(_pending, "labels", None)
            if pending:
                _checks.labels_in_range(pending, C, "BatchedMAML")
                self._classes = C
                pending.clear()
            with _checks.labels_checked():  # checked above, or by this call's first loss
                return ops.cross_entropy(pred.reshape(T, -1, C), target.reshape(T, -1))
        from torch.func import vmap
        out = vmap(self.loss)(pred, target)
        if out.dim() != 1:
            raise ValueError(f"loss: a callable loss must return a scalar per task, got shape "
                             f"{tuple(out.shape[1:])} per task")
        return out

    def _labels(self, y):
        """Cross-entropy labels [T, N, 1, ...] as [T, N] (a view), as every backend takes them."""
        if self.loss == "cross_entropy" and isinstance(y, torch.Tensor) and y.dim() > 2 and \
                all(d == 1 for d in y.shape[2:]):
            return y.view(y.shape[:2]) if y.is_contiguous() else y.reshape(y.shape[:2])
        return y

    def _check_batch(self, **named):
        items = [(k, v) for k, v in named.items() if v is not None]
        for k, v in items:
            _checks.tensor(k, v, min_dim=2)
        T = items[0][1].shape[0]
        if T == 0:
            raise ValueError(f"BatchedMAML: {items[0][0]} {tuple(items[0][1].shape)} has no tasks (T=0)")
        if any(v.shape[0] != T for _, v in items):
            desc = ", ".join(f"{k} {tuple(v.shape)}" for k, v in items)
            raise ValueError(f"BatchedMAML: the task dim T differs between {desc}")
        for a, b in (("xs", "ys"), ("xq", "yq")):
            if named.get(a) is not None and named.get(b) is not None and named[a].shape[1] != named[b].shape[1]:
                raise ValueError(f"BatchedMAML: {a} {tuple(named[a].shape)} and {b} "
                                 f"{tuple(named[b].shape)} differ in samples per task")
        if named.get("xs") is not None and named["xs"].shape[1] == 0 and self.inner_steps > 0:
            raise ValueError(f"BatchedMAML: xs {tuple(named['xs'].shape)} has no support samples for "
                             f"inner_steps={self.inner_steps}")
        if named.get("xq") is not None and named["xq"].shape[1] == 0:
            raise ValueError(f"BatchedMAML: xq {tuple(named['xq'].shape)} has no query samples")
        p = next(iter(self.model.parameters()), None)
        for k, v in items:
            is_target = k.startswith("y")
            if p is not None and v.device != p.device:
                raise ValueError(f"{k} is on {v.device} but the model's parameters are on {p.device}")
            if is_target and self.loss == "cross_entropy":
                if v.is_floating_point() or v.is_complex() or v.dtype == torch.bool:
                    raise TypeError(f"{k}: cross_entropy needs integer class labels, got dtype {v.dtype}")
            elif is_target and self.loss == "mse":
                if p is not None and v.dtype != p.dtype:
                    raise TypeError(f"{k} has dtype {v.dtype} but the model's parameters are {p.dtype}")
            elif not is_target and v.is_floating_point() and p is not None and v.dtype != p.dtype:
                raise TypeError(f"{k} has dtype {v.dtype} but the model's parameters are {p.dtype}")
        self._check_input_width(xs=named.get("xs"), xq=named.get("xq"))
        return T

    def _check_input_width(self, **inputs):
        """Where the model starts with a Linear or a Conv2d layer: the inputs' samples against what
        it takes (a Linear's width, a Conv2d's [C, H, W] with its channels), so that the error names
        them (the layer's own check names its weight). What the layer takes is read once a program
        and weight (adapt, predict and reptile_grad check every call)."""
        program, first = self.__dict__.get("_input_rule") or (None, None)
        if program is not self.program or (first is not None and first.holder.get(first.key) is not first.weight):
            first = self._first_layer_takes()
            self.__dict__["_input_rule"] = (self.program, first)
        if first is None:
            return
        n = first.takes
        bad = [(k, v) for k, v in inputs.items()
               if v is not None and ((v.dim() != 5 or v.shape[2] != n) if first.conv else v.shape[-1] != n)]
        if bad:
            desc = " and ".join(f"{k} {tuple(v.shape)}" for k, v in bad)
            want = (f"[T, N, {n}, H, W] inputs" if first.conv else
                    f"{n} features a sample, got {bad[0][1].shape[-1]}")
            raise ValueError(f"BatchedMAML: {desc}: the model's first layer {first.path!r} (weight "
                             f"{tuple(first.weight.shape)}) takes {want}")

    def _first_layer_takes(self):
        """_FirstLayer of the program's first step where it is a Linear or a Conv2d layer, else None."""
        steps = self.program.steps
        if not steps:
            return None
        first, params = steps[0], self._meta_params()
        if first.kind.startswith("batched_linear"):
            names = [n for n in first.params if n in params and params[n].dim() == 2]
            if len(names) != 1:
                return None
            name, conv = names[0], False
        elif first.kind == "batched_conv2d" and first.spec and first.spec.get("w") in params:
            name, conv = first.spec["w"], True
        else:
            return None
        w = params[name]
        holder, _, key = name.rpartition(".")
        takes = w.shape[1] * first.spec.get("groups", 1) if conv else w.shape[1]
        return _FirstLayer(first.path, conv, takes, w, self.model.get_submodule(holder)._parameters, key)

    # -- the inner loop -------------------------------------------------------------------------
    def _adapt(self, xs, ys, first_order: bool, create_graph: bool, after_step=None, first_losses=None):
        """The adapted parameters, name -> [T, ...]. after_step(step, P), where given, is called with
        the parameters after each inner step but the last (step = 0 .. inner_steps - 2: P holds
        theta_{step + 1}), in the order of the loop's passes (step_loss_weights' query losses).
        first_losses: a list the first step's per-task support losses are appended to (not under
        checkpoint_steps)."""
        self._check_rates()
        if self.inner_steps > 0 and not self._adapt_names:
            if self._inner is not None:
                raise ValueError(
                    f"BatchedMAML: none of the parameters inner_params selects requires grad, so its "
                    f"inner_steps={self.inner_steps} have nothing to adapt (the inner loop adapts the selected "
                    "parameters that require grad; for evaluation use torch.no_grad(), which still adapts)")
            raise ValueError(
                f"BatchedMAML: no parameter of the model requires grad, so its inner_steps={self.inner_steps} "
                "have nothing to adapt (the inner loop adapts the parameters that require grad: freeze a part "
                "of the model, not all of it, or choose the adapted ones with inner_params; for evaluation use "
                "torch.no_grad(), which still adapts)")
        if self.checkpoint_steps and create_graph and not first_order and self.inner_steps > 0:
            return self._adapt_checkpointed(xs, ys, after_step)
        T = xs.shape[0]
        P = self._broadcast(T)
        lr = self._lr_list()
        names = self._adapt_names
        # the leading steps that read no adapted parameter give the same output at every step:
        # made once (with a graph only where the steps' gradients are differentiated)
        start = (self.program.invariant_prefix(set(names), batch_norm=self.step_bn is None)
                 if self.inner_steps > 0 else 0)
        if start:
            with phase("inner_forward"), torch.set_grad_enabled(create_graph and not first_order):
                xs = self.program(P, xs, self.recompute, stop=start)
            prefix_pass = plan.last_pass()
        for step in range(self.inner_steps):
            if start and step:
                plan.repeat_pass(prefix_pass)  # BatchNorm running statistics: the loop's pass of this step
            if first_order or not create_graph:  # each step's gradient at detached parameters
                probe = dict(P)
                probe.update({n: P[n].detach().requires_grad_() for n in names})
                grads = self._support_grads(probe, xs, ys, create_graph=False, step=step, start=start,
                                            record=first_losses if step == 0 else None)
            else:
                grads = self._support_grads(P, xs, ys, create_graph=True, step=step, start=start,
                                            record=first_losses if step == 0 else None)
            with phase("update"):
                new = ops.inner_update([P[n] for n in names], grads, self._step_lr(lr, step))
                P.update(zip(names, new))
            if after_step is not None and step + 1 < self.inner_steps:
                after_step(step, P)
        return P

    def _broadcast(self, T: int, detach: bool = False) -> dict:
        """Each meta-parameter as every task's starting point: name -> [T, *shape] (a broadcast
        view; detached from the meta-parameter with detach)."""
        return {n: (p.detach() if detach else p).unsqueeze(0).expand(T, *p.shape)
                for n, p in self._meta_params().items()}

    def _check_support_losses(self, losses, step: int):
        if self.check_finite:
            bad = (~torch.isfinite(losses.detach())).nonzero().flatten().tolist()
            if bad:
                raise ValueError(f"BatchedMAML: non-finite support loss at inner step {step} for "
                                 f"task(s) {bad[:10]}{'...' if len(bad) > 10 else ''}")

    def _support_grads(self, P: dict, xs, ys, create_graph: bool, step: int, start: int = 0,
                       bn_tables: dict | None = None, record: list | None = None) -> list:
        """The support loss's gradient with respect to the adapted parameters P[n] (n in
        _adapt_names, leaves of the caller's), zeros for those it does not reach. start: xs is
        the output of the program's first ``start`` steps (program.invariant_prefix). bn_tables:
        per_step_bn's tables by name, where not the module's own (a recomputation's leaves).
        record: a list the per-task support losses (detached) are appended to."""
        names = self._adapt_names
        at, statistics = self._at_step(P, step, bn_tables)
        with phase("inner_forward"), statistics:
            losses = self._task_loss(self.program(at, xs, self.recompute, start=start), ys)
        self._check_support_losses(losses, step)
        if record is not None:
            record.append(losses.detach())
        with phase("inner_backward"):
            grads = torch.autograd.grad(losses.sum(), [P[n] for n in names], create_graph=create_graph,
                                        allow_unused=True)
        return [torch.zeros_like(P[n]) if g is None else g for n, g in zip(names, grads)]

    def _adapt_checkpointed(self, xs, ys, after_step=None) -> dict:
        """_adapt's result for checkpoint_steps (second order): the adapted parameters as outputs
        of _CheckpointedSteps, whose backward recomputes the steps one at a time. With after_step,
        the parameters after the steps it is called for are outputs too (_StepQueries.steps)."""
        T = xs.shape[0]
        meta = self._meta_params()
        lr = self._lr_list()
        lrs = lr if isinstance(lr, list) else ([lr] if isinstance(lr, torch.Tensor) else [])
        names = self._adapt_names
        # the meta-parameters the steps read but do not adapt (inner_params): their gradient through
        # the steps comes from the recomputation too
        adapted_set = set(names)
        shared = [n for n in self.program.names if n not in adapted_set and meta[n].requires_grad]
        if self.step_bn is not None:  # (per_step_bn's tables: read by the steps, meta-learned)
            meta.update((name, p) for name, p in self.step_bn.named_parameters(prefix="step_bn") if p.requires_grad)
            shared += [name for name, p in self.step_bn.named_parameters(prefix="step_bn") if p.requires_grad]
        S, n = self.inner_steps, len(names)
        kept = [] if after_step is None else after_step.steps(S)  # steps whose parameters are outputs too
        start = plan.mark()
        out = _CheckpointedSteps.apply(self, xs, ys, n, len(lrs), shared, tuple(kept),
                                       *[meta[name] for name in names], *lrs, *[meta[name] for name in shared])
        support = None if start is None else plan.mark() - start
        after = []  # the passes of each after_step call (BatchNorm running statistics)
        for k, step in enumerate(kept):
            P = self._broadcast(T)
            P.update(zip(names, out[n * (k + 1):n * (k + 2)]))
            before = plan.mark()
            after_step(step, P)
            after.append(None if before is None else range(before - start, plan.mark() - start))
        if support is not None and kept:
            # the steps' support passes all came first; the loop's order has the query pass after
            # step s between the support passes of steps s and s + 1
            queries = dict(zip(kept, after))
            order = []
            for step in range(support):
                order.append(step)
                order.extend(queries.get(step, ()))
            plan.reorder(start, order)
        P = self._broadcast(T)
        P.update(zip(names, out[:n]))
        return P

    def _fused_mlp_ok(self, xs=None, xq=None) -> bool:
        """Whether the fused MLP op runs this model; with xs and xq, for that batch: under the auto
        request on a CPU it leaves to the batched torch ops a meta-batch of few tasks of a wide MLP,
        which fills a small part of the kernel's SIMD lanes (ops.mlp_inner_loop.cpu_kernel_slower)."""
        spec = self.program.mlp
        if spec is None or self.loss not in _LOSSES or self.check_finite or spec.dropping():
            return False
        if isinstance(self.inner_lr, torch.Tensor):
            return False
        if len(self._adapt_names) != len(self.program.names):  # frozen parameters are not adapted
            return False
        p = next(iter(self.model.parameters()))
        if p.dtype not in _checks.KERNEL_DTYPES:  # bfloat16, float16: the batched ops
            return False
        # an explicitly requested backend that the op has but cannot run raises here, with the reason
        be = select("mlp_inner_loop", p.device.type)
        if be == "torch":
            return False
        # per-step rates and the multi-step loss: on the kernels that run them (ops.runs_step_settings)
        if not ops.runs_step_settings(be, self.inner_steps, self._lr_kind == "per_layer_step", self.step_loss_weights):
            return False
        if xs is None:
            return True
        if xs.dim() != 3 or xq.dim() != 3:
            return False
        if be == "cpp" and requested("mlp_inner_loop") == "auto":
            widths = [xs.shape[-1]] + [self.model.get_parameter(n).shape[0] for n in spec.param_names[::2]]
            return not cpu_kernel_slower(xs.shape[0], xs.shape[1], xq.shape[1], widths, self.inner_steps,
                                         self.first_order, p.dtype)
        return True

    def _signature(self, xs, ys, xq, yq, p=None):
        """What the argument checks and the fused-path choice depend on: shapes, dtypes and devices
        of the batch and of the parameters, the requested backend, inner_lr, loss, check_finite,
        whether the batch requires grad. A call with the signature of the last checked call skips
        the checks (they would pass again); the label range check of cross-entropy still runs.
        (inner_steps and first_order: the auto choice between the CPU kernel and the batched ops.)
        With a Dropout in the fused MLP, whether it drops (train() / eval(), p) is part of it."""
        p = self._first_param if p is None else p
        spec = self.program.mlp
        dropping = spec is not None and bool(spec.dropouts) and spec.dropping()
        d = self.__dict__  # (the settings' values, read past their descriptors: this runs every call)
        return (xs.shape, xs.dtype, xs.device, ys.shape, ys.dtype, xq.shape, xq.dtype, xq.device, yq.shape,
                yq.dtype, ys.device, yq.device, p.dtype, p.device, get_backend(), id(self.inner_lr),
                id(d["_loss"]), d["_check_finite"], dropping, d["_inner_steps"], d["_first_order"],
                d["_step_loss_weights"] is None,
                xs.requires_grad or ys.requires_grad or xq.requires_grad or yq.requires_grad)

    def _flat(self, x):
        """x [T, N, ...] as [T, N, D] where the fused MLP path's program flattens each sample first
        (or views each task's input as rows of D), so that the program's own step then leaves it as it
        is, on every path; else x."""
        spec = self.program.mlp
        if spec is None or not spec.flatten_input or not isinstance(x, torch.Tensor) or x.dim() < 3:
            return x
        if spec.flatten_input > 0:  # (x.view(-1, D) in the forward: each task's rows of D)
            return x.reshape(x.shape[0], -1, spec.flatten_input)
        return x.flatten(2) if x.dim() > 3 else x

    def _prepare(self, xs, ys, xq, yq, params=None):
        """(fused, checked): whether the fused MLP op runs, and whether this batch's signature was
        checked before (the checks then are skipped). params: _param_list()'s (the model's first,
        then the rates) or _param_list(model_only=True)'s, if at hand."""
        # (the model's parameters come first in either list)
        self._sync_trainable(None if params is None else params[:len(self.program.names)])
        p = params[0] if params else None
        try:
            sig = self._signature(xs, ys, xq, yq, p)
        except AttributeError:  # not tensors: the full check raises the right error
            sig = None
        if sig is not None and sig == self._last_sig:
            return self._last_fused, True
        self._last_sig = None
        if self.lrs is None:  # (it may have been assigned since the last call)
            _check_inner_lr(self.inner_lr)
        self._check_batch(xs=xs, ys=ys, xq=xq, yq=yq)
        # the fused MLP kernel differentiates the meta-parameters (and rates) only: a batch that
        # requires grad (a gradient for the data itself) takes the differentiable ops
        data_grad = xs.requires_grad or ys.requires_grad or xq.requires_grad or yq.requires_grad
        fused = not data_grad and self._fused_mlp_ok(xs, xq)
        if fused:  # the fused op's own checks, before calls of this signature skip them
            params, lr, spec = self._fused_args()
            ops.check_mlp_args(xs, ys, xq, yq, params, lr, self.inner_steps, spec.activations, self.loss,
                               self._step_weights())
        self._last_sig, self._last_fused = sig, fused
        self._direct = self._direct_grad = self._direct_layer = None
        if (fused and self._lr_kind in ("per_layer", "per_layer_step") and self._rates_follow_params()):
            # value_and_grad: the rates' expansion and their gradients' sums in one C++ call with the op
            self._direct_layer = ops.mlp_meta_grad_layer_rates_direct(self.program.mlp, self.loss, xs.device.type)
        if (fused and self.program.mlp.param_names == self.program.names and self.step_loss_weights is None
                and (self.lrs is None or (self._lr_kind == "per_element" and self._rates_follow_params()))):
            # the one C++ op with its C++ autograd (cpp / cuda backends): a call with this
            # signature goes straight to it (forward's and value_and_grad's fast paths), with the
            # scalar inner_lr or Meta-SGD's rates as they are
            self._direct = ops.mlp_meta_loss_direct(self.program.mlp, self.loss, xs.device.type)
            self._direct_grad = ops.mlp_meta_grad_direct(self.program.mlp, self.loss, xs.device.type)
        return fused, False

    def _rates_follow_params(self) -> bool:
        """Whether the learned rates follow the fused op's parameters: one a parameter, in their
        order (then self.parameters() lists the model's parameters and then their rates), each of
        its kind's shape: the parameter's (learn_inner_lr=True, the op's own form), [] ('per_layer')
        or [S0] ('per_layer_step')."""
        if (self.lrs is None or self._adapt_names != self.program.names
                or self.program.mlp.param_names != self.program.names):
            return False
        rates = self.lrs._parameters
        params = self._param_list(model_only=True)
        keys = [self._lr_key(n) for n in self._adapt_names]
        if list(rates) != keys or len(params) != len(keys) or any(rates[k] is None for k in keys):
            return False
        kind = self._lr_kind
        return all(rates[k].shape == p.shape if kind == "per_element" else
                   rates[k].dim() == (1 if kind == "per_layer_step" else 0) for k, p in zip(keys, params))

    def _fused_args(self, values: bool = False):
        """(params, lr, spec): the fused op's parameters (in its order), rates and MLP spec; the rates
        of learn_inner_lr='per_layer' (one a tensor) and 'per_layer_step' (one a tensor and step)
        expanded to the op's per-entry rates ([inner_steps, *shape] for the latter). values: the
        expanded rates are wanted as values only (value_and_grad, which sums their gradients back
        itself): made by one gather from the rates' stack instead of a differentiable copy each."""
        spec = self.program.mlp
        params = self._meta_params()
        lr = self._lr_list()
        if self._lr_kind in ("per_layer", "per_layer_step"):
            per_step = self._lr_kind == "per_layer_step"
            if per_step:  # [S0] made at construction, the first inner_steps used
                self._check_rates()
            S = self.inner_steps
            shapes = [params[n].shape for n in self._adapt_names]
            if values:
                # [S, n] (or [n]) rates -> [S, P] entries, each parameter's a column block: views of it
                stacked = torch.stack([r.detach()[:S] if per_step else r.detach() for r in lr], -1)
                flat = stacked.index_select(-1, self._rate_index(shapes, stacked.device))
                blocks = flat.split([math.prod(s) for s in shapes], -1)
                lr = [b.view(*((S,) if per_step else ()), *s) for b, s in zip(blocks, shapes)]
            elif per_step:
                lr = [r[:S].view(S, *(1,) * len(s)).expand(S, *s).contiguous() for r, s in zip(lr, shapes)]
            else:
                lr = [r.expand(s).contiguous() for r, s in zip(lr, shapes)]
        if isinstance(lr, list):  # the adapted parameters' order -> the op's (its layers' order)
            lr = [lr[i] for i in self._spec_order()]
        else:
            lr = float(lr)
        return [params[n] for n in spec.param_names], lr, spec

    def _spec_order(self) -> list:
        """For each of the fused op's parameters (spec.param_names: the order its layers run in), its
        index among the adapted parameters (the model's order): the same where a Sequential
        registers its layers in the order it calls them, a permutation where a traced forward calls
        them in another."""
        names, op = self._adapt_names, self.program.mlp.param_names
        if names == op:
            return list(range(len(op)))
        index = {n: i for i, n in enumerate(names)}
        return [index[n] for n in op]

    def _rate_index(self, shapes, device) -> torch.Tensor:
        """For each parameter entry (the parameters of these shapes in turn), its parameter's index:
        the gather that expands one rate a parameter to the entries (cached by shapes and device)."""
        key = (tuple(shapes), device)
        cached = self.__dict__.get("_rate_index_cache")
        if cached is None or cached[0] != key:
            sizes = torch.tensor([math.prod(s) for s in shapes])
            index = torch.repeat_interleave(torch.arange(len(shapes)), sizes).to(device)
            cached = self.__dict__["_rate_index_cache"] = (key, index)
        return cached[1]

    def _fused_rate_grads(self, glr) -> dict:
        """{id(rate): its gradient} from the fused op's rate gradients (shaped as _fused_args' rates):
        summed back over the entries (and, per step, into the steps the call ran) of learned rates
        that were expanded."""
        out = {}
        rates = self._lr_list()
        for r, g in zip([rates[i] for i in self._spec_order()], glr):
            if self._lr_kind == "per_layer_step":
                g = g.flatten(1).sum(1)
                if g.shape[0] < r.shape[0]:  # (inner_steps below the steps the rates were made for)
                    g = torch.cat([g, g.new_zeros(r.shape[0] - g.shape[0])])
            out[id(r)] = g if g.shape == r.shape else g.sum_to_size(r.shape)
        return out

    @_module_backend
    def task_losses(self, xs, ys, xq, yq) -> torch.Tensor:
        """Per-task query losses [T] after adaptation (differentiable w.r.t. the meta-parameters;
        under torch.no_grad the inner steps keep no graph and the losses come back detached)."""
        ys, yq = self._labels(ys), self._labels(yq)
        xs, xq = self._flat(xs), self._flat(xq)
        fused, checked = self._prepare(xs, ys, xq, yq)
        grad_on = torch.is_grad_enabled()
        with torch.enable_grad(), _labels_to_check(self, [("ys", ys), ("yq", yq)]):
            if fused:
                params, lr, spec = self._fused_args()
                with phase("fused_inner_loop"):
                    # (under no_grad the losses alone: first order's reverse pass, the same losses, is cheaper)
                    losses = ops.mlp_inner_loop(xs, ys, xq, yq, params, lr, self.inner_steps, spec.activations,
                                                spec.negative_slope, self.loss, self.first_order or not grad_on,
                                                self._step_weights(), _checked=checked)
                return losses if grad_on else losses.detach()
            with plan.running_stats(self.program):  # BatchNorm's, where tracked, as the loop updates them
                # where the steps' graphs are not kept (first order, checkpoint_steps) the query's is
                # the largest: under recompute its later blocks keep only their inputs too
                later = self.recompute and (self.first_order or self.checkpoint_steps)
                queries = None if self.step_loss_weights is None else _StepQueries(self, xq, yq, grad_on, later)
                P = self._adapt(xs, ys, self.first_order, create_graph=grad_on and not self.first_order,
                                after_step=queries)
                if queries is not None:
                    return queries.total(P)
                if not grad_on:  # (evaluation: the adapted parameters as values)
                    P = {n: t.detach() for n, t in P.items()}
                P, statistics = self._at_step(P, self.inner_steps - 1)
                with phase("query_forward"), torch.set_grad_enabled(grad_on), statistics:
                    return self._task_loss(self.program(P, xq, self.recompute, later_blocks=later), yq)

    def forward(self, xs, ys, xq, yq) -> torch.Tensor:
        """Mean query loss over the T tasks after adaptation; backward gives the meta-gradient.
        (Repeated calls on the CPU kernel go straight to it as value_and_grad's do.)"""
        out = self._bound_call("forward", xs, ys, xq, yq)
        return out if out is not None else self._forward(xs, ys, xq, yq)

    @_module_backend
    def _forward(self, xs, ys, xq, yq) -> torch.Tensor:
        batch = (xs, ys, xq, yq)
        params = self._param_list(model_only=True)
        ys, yq = self._labels(ys), self._labels(yq)
        xs, xq = self._flat(xs), self._flat(xq)
        fused, checked = self._prepare(xs, ys, xq, yq, params)
        # the fused op runs in grad mode (its torch form takes the inner steps' gradients); under
        # no_grad its loss comes back detached, as the other paths' does
        grad_on = torch.is_grad_enabled()
        if checked and self._direct_layer is not None:
            every = self._param_list()  # (the model's parameters, then their rates)
            n = len(self.program.names)
            if len(every) == 2 * n:
                # (under no_grad the loss alone: first order's pass, no rate gradients)
                with phase("fused_inner_loop"):
                    out = self._direct_layer(xs, ys, xq, yq, every[:n], every[n:], self._lr_kind == "per_layer_step",
                                             self.inner_steps, self.first_order or not grad_on, self._step_weights(),
                                             rate_grads=grad_on)
                if out is not None:
                    return _MetaLossWithGrads.apply(out, *every) if grad_on else out[0]
        if checked and self._direct is not None:
            rates = self._lr_list() if self.lrs is not None else []
            lr = 0.0 if rates else float(self.inner_lr)
            if not grad_on:  # (the loss alone, as values: first order's pass makes the same loss)
                with phase("fused_inner_loop"):
                    return self._direct_grad(xs, ys, xq, yq, params, rates, lr, self.inner_steps, True)[0]
            with phase("fused_inner_loop"):
                loss = self._direct(xs, ys, xq, yq, params, rates, lr, self.inner_steps, self.first_order)
            self._bind_direct_call("forward", batch, (xs, ys, xq, yq), params, rates)
            return loss
        if not fused:
            if self._chunked(xs):
                wanted = [p for p in self._param_list() if p.requires_grad]
                return _ChunkedMetaLoss.apply(self, xs, ys, xq, yq, *wanted)
            return self.task_losses(xs, ys, xq, yq).mean()
        params, lr, spec = self._fused_args()
        # (under no_grad the loss alone is wanted: first order's reverse pass, the same loss, is cheaper)
        with torch.enable_grad(), phase("fused_inner_loop"):
            loss = ops.mlp_meta_loss(xs, ys, xq, yq, params, lr, self.inner_steps, spec.activations,
                                     spec.negative_slope, self.loss, self.first_order or not grad_on,
                                     self._step_weights(), _checked=checked)
        return loss if grad_on else loss.detach()

    def value_and_grad(self, xs, ys, xq, yq) -> tuple[torch.Tensor, list]:
        """(loss, grads): forward's loss (detached) and its gradient with respect to each of
        ``self.parameters()`` in that order (None for one that does not require grad): the values
        ``torch.autograd.grad(self(xs, ys, xq, yq), params)`` gives, not differentiable further.

        Where the fused MLP op runs (cpp / cuda backends), the meta-gradient comes straight out of
        the kernel and no autograd graph is built, which saves the autograd engine's time per step:

            loss, grads = meta.value_and_grad(xs, ys, xq, yq)
            for p, g in zip(meta.parameters(), grads):
                p.grad = g
            opt.step()

        On the CPU kernel with a scalar inner_lr, a call whose batch has the shapes of the last
        checked call, on a module, model and parameters that nothing was changed or swapped in since,
        goes straight to the kernel (a binding made by that call compares them; _bind_direct_call).
        """
        out = self._bound_call("value_and_grad", xs, ys, xq, yq)
        return out if out is not None else self._value_and_grad(xs, ys, xq, yq)

    @_module_backend
    def _value_and_grad(self, xs, ys, xq, yq) -> tuple[torch.Tensor, list]:
        batch = (xs, ys, xq, yq)
        params = self._param_list()
        ys, yq = self._labels(ys), self._labels(yq)
        xs, xq = self._flat(xs), self._flat(xq)
        fused, checked = self._prepare(xs, ys, xq, yq, params)
        if checked and self._direct_layer is not None and len(params) == 2 * len(self.program.names):
            n = len(self.program.names)  # (the model's parameters, then their rates)
            with phase("fused_inner_loop"):
                out = self._direct_layer(xs, ys, xq, yq, params[:n], params[n:], self._lr_kind == "per_layer_step",
                                         self.inner_steps, self.first_order, self._step_weights())
            if out is not None:
                self._bind_direct_call("value_and_grad", batch, (xs, ys, xq, yq), params[:n], params[n:],
                                       layer_rates=True)
                return out[0], _wanted_only(params, out[1])
        if checked and self._direct_grad is not None:
            with phase("fused_inner_loop"):
                if self.lrs is None:
                    out = self._direct_grad(xs, ys, xq, yq, params, [], float(self.inner_lr), self.inner_steps,
                                            self.first_order)
                    self._bind_direct_call("value_and_grad", batch, (xs, ys, xq, yq), params, [])
                    return out
                n = len(self.program.names)  # (the model's parameters, then their rates)
                if len(params) == 2 * n:
                    value, grads = self._direct_grad(xs, ys, xq, yq, params[:n], params[n:], 0.0, self.inner_steps,
                                                     self.first_order)
                    self._bind_direct_call("value_and_grad", batch, (xs, ys, xq, yq), params[:n], params[n:])
                    return value, _wanted_only(params, grads)
        wanted = [p for p in params if p.requires_grad]
        if fused:
            fparams, lr, spec = self._fused_args(values=True)
            with phase("fused_inner_loop"):
                value, g, glr = ops.mlp_meta_grad(xs, ys, xq, yq, fparams, lr, self.inner_steps, spec.activations,
                                                  spec.negative_slope, self.loss, self.first_order,
                                                  self._step_weights(), _checked=checked)
            by_id = dict(zip(map(id, fparams), g))
            if glr is not None:  # (per_layer's and per_layer_step's rates were expanded)
                by_id.update(self._fused_rate_grads(glr))
            if all(id(p) in by_id for p in wanted):
                return value, [by_id.get(id(p)) if p.requires_grad else None for p in params]
        if not fused and self._chunked(xs):
            value, grads = self._chunked_value_and_grad(xs, ys, xq, yq, wanted)
            grads = iter(grads)
            return value, [next(grads) if p.requires_grad else None for p in params]
        with torch.enable_grad():
            value = self(xs, ys, xq, yq)
            grads = torch.autograd.grad(value, wanted, allow_unused=True, materialize_grads=True) if wanted else ()
            grads = iter(grads)
        return value.detach(), [next(grads) if p.requires_grad else None for p in params]

    def _bound_call(self, method, xs, ys, xq, yq):
        """The result of ``method``'s binding (_bind_direct_call) for this call, or None where there
        is none, where compilation, autocast, a profiler or another backend request is in effect, or
        where the binding refuses (then the checked path runs)."""
        d = self.__dict__
        bound = (d.get(_BOUND_KEY) or _NO_BINDINGS).get(method)
        if bound is None or get_backend() != bound[2] or torch.compiler.is_compiling() or _any_autocast() or \
                ranges_on():
            return None
        return bound[0](d, xs, ys, xq, yq)

    def _bind_direct_call(self, method, batch, given, params, rates, layer_rates=False):
        """After a checked call of value_and_grad or forward (method) that ran the direct CPU kernel
        call with the scalar inner_lr (rates empty), Meta-SGD's rates or (layer_rates,
        value_and_grad) the rates of learn_inner_lr='per_layer' / 'per_layer_step': binds that call
        to what it saw (ops.mlp_meta_grad_bound: this module's __dict__, every module's children and
        parameters, the parameters', rates' and batch's shapes), for the next calls to go straight
        to it. batch: the call's arguments; given: what the kernel was given (the binding passes the
        arguments on, so they must be the same objects). Not where a per-module backend, hooks, a
        tensor inner_lr or Dropout are in effect (each read on the checked path in ways the binding
        does not compare), nor for value_and_grad where a parameter or rate does not require grad
        (the binding returns every gradient, the checked path None for that one)."""
        d = self.__dict__
        backend = get_backend()
        _, _, hooked, n_global = d["_stamp"]
        spec = self.program.mlp
        if (any(a is not b for a, b in zip(batch, given)) or d["_backend"] is not None
                or not isinstance(backend, str) or hooked or n_global or spec.dropouts
                or (not rates and type(self.inner_lr) not in (float, int)) or torch.is_inference_mode_enabled()
                or (method == "value_and_grad" and not all(t.requires_grad for t in (*params, *rates)))):
            return
        bindings = d.get(_BOUND_KEY)
        if bindings is None:
            bindings = d[_BOUND_KEY] = {}
        bindings.pop(method, None)
        mods = list(self.modules())
        dicts = [m._modules for m in mods] + [m._parameters for m in mods]
        made = ops.mlp_meta_grad_bound(spec, self.loss, d, _BOUND_KEY, dicts, params, rates, batch,
                                       0.0 if rates else self.inner_lr, self.inner_steps, self.first_order,
                                       as_loss=method == "forward", layer_rates=layer_rates,
                                       per_step=layer_rates and self._lr_kind == "per_layer_step",
                                       step_weights=self._step_weights() if layer_rates else None)
        if made is not None:
            bindings[method] = (made[0], made[1], backend)

    def _chunked(self, xs) -> bool:
        return self.task_chunk is not None and xs.shape[0] > self.task_chunk

    def _chunked_value_and_grad(self, xs, ys, xq, yq, wanted):
        """The mean query loss and its gradient w.r.t. ``wanted``, task_chunk tasks at a time (each
        chunk's graph freed before the next): each chunk's mean loss and its gradient, weighted
        by the chunk's share of the tasks (what fastmeta.graphed's chunked replay sums too)."""
        T = xs.shape[0]
        total, grads = None, None
        for start, stop in chunk_slices(T, self.task_chunk):
            part = slice(start, stop)
            with torch.enable_grad():
                loss = self.task_losses(xs[part], ys[part], xq[part], yq[part]).mean()
                g = torch.autograd.grad(loss, wanted, allow_unused=True, materialize_grads=True) if wanted else ()
            if total is None:
                total, grads = torch.zeros_like(loss.detach()), [torch.zeros_like(x) for x in g]
            accumulate(total, grads, loss.detach(), g, (stop - start) / T)
        return total, grads

    @_module_backend
    def reptile_grad(self, xs, ys) -> tuple[torch.Tensor, list]:
        """Reptile (Nichol et al. 2018) on the meta-batch: (loss, grads), grads[i] for
        ``self.parameters()[i]``: theta - the mean over the tasks of theta after ``inner_steps`` SGD
        steps on each task's (xs, ys) (first order; with the module's rates, learned ones included,
        and settings), zero for a parameter the inner loop does not adapt (a rate, a parameter
        inner_params leaves out, per_step_bn's tables), None for one that does not require grad.
        loss: the mean support loss at the meta-parameters (the first step's). With
        ``torch.optim.SGD(meta.parameters(), lr=eps)``, ``p.grad = g`` and ``opt.step()`` is Reptile's
        update theta <- theta + eps (mean theta' - theta); another optimizer takes it as its gradient.

            loss, grads = meta.reptile_grad(xs, ys)
            for p, g in zip(meta.parameters(), grads):
                p.grad = g
            opt.step()
        """
        ys, xs = self._labels(ys), self._flat(xs)
        self._check_batch(xs=xs, ys=ys)
        if self.inner_steps < 1:
            raise ValueError(f"reptile_grad: needs inner_steps >= 1 (the update is the steps' mean displacement), "
                             f"got inner_steps={self.inner_steps}")
        self._sync_trainable()
        record = []  # (the first step's support losses: the loss at the meta-parameters)
        fused = self._fused_adapt(xs, ys, flat=True)
        if fused is not None:  # theta - the tasks' mean theta_S, from the flat [T, P] parameters
            theta, first, params = fused
            with torch.no_grad():
                step = (torch.cat([p.reshape(-1) for p in params]) - theta.mean(0)).split([p.numel() for p in params])
            by_id = {id(p): d.view(p.shape) for p, d in zip(params, step)}
            return first.mean(), [None if not p.requires_grad else by_id[id(p)] if id(p) in by_id
                                  else torch.zeros_like(p) for p in self._param_list()]
        with torch.enable_grad(), _labels_to_check(self, [("ys", ys)]), plan.running_stats(self.program):
            P = self._adapt(xs, ys, True, create_graph=False, first_losses=record)
        names = {id(p): n for n, p in self.model.named_parameters()}
        adapted = set(self._adapt_names)
        grads = []
        with torch.no_grad():
            for p in self._param_list():
                name = names.get(id(p))
                if not p.requires_grad:
                    grads.append(None)
                elif name in adapted:
                    grads.append(p - P[name].mean(0))
                else:
                    grads.append(torch.zeros_like(p))
        return record[0].mean(), grads

    @_module_backend
    def adapt(self, xs, ys, first_order: bool | None = None, create_graph: bool | None = None) -> dict:
        """Adapted per-task parameters, name -> [T, *shape] (non-adapted ones as broadcast views).

        create_graph (default: not first_order and grad mode on) keeps the graph so that a loss
        on the result can be backpropagated to the meta-parameters.
        """
        ys, xs = self._labels(ys), self._flat(xs)
        self._check_batch(xs=xs, ys=ys)
        self._sync_trainable()
        fo = self.first_order if first_order is None else bool(first_order)
        if create_graph is None:
            create_graph = (not fo) and torch.is_grad_enabled()
        grad_on = torch.is_grad_enabled()
        if not grad_on:  # values: the fused inner loop where it runs
            fused = self._fused_adapt(xs, ys)
            if fused is not None:
                return fused[0]
        with torch.enable_grad(), _labels_to_check(self, [("ys", ys)]), plan.running_stats(self.program):
            P = self._adapt(xs, ys, fo, create_graph)
        if not grad_on:
            P = {n: t.detach() for n, t in P.items()}
        return P

    def _fused_adapt(self, xs, ys, flat: bool = False):
        """(P, losses, params): the adapted parameters (values, name -> [T, *shape]; flat: one [T, P]
        tensor, the fused op's parameters in turn), the support losses at the meta-parameters [T] and
        the fused op's meta-parameters (in its order) from the fused inner loop (ops.mlp_adapt) where
        the fused MLP kernel runs this model on the cpp, cuda or triton backend; else None. The choice
        and the argument checks are made once a batch signature."""
        try:
            sig = self._signature(xs, ys, xs, ys)
        except AttributeError:  # (not tensors: the batch checks raise)
            return None
        known = self.__dict__.get("_adapt_sig")
        if known is None or known[0] != sig:
            backend = select("mlp_inner_loop", xs.device.type)
            ok = self._fused_mlp_ok(xs, xs) and backend in ("cpp", "cuda", "triton")
            known = self.__dict__["_adapt_sig"] = (sig, ok, False)
        if not known[1]:
            return None
        params, lr, spec = self._fused_args(values=True)
        theta, losses = ops.mlp_adapt(xs, ys, params, lr, self.inner_steps, spec.activations, spec.negative_slope,
                                      self.loss, flat=flat, _checked=known[2])
        self.__dict__["_adapt_sig"] = (sig, True, True)  # (its arguments passed the op's checks)
        return (theta if flat else dict(zip(spec.param_names, theta))), losses, params

    @_module_backend
    def predict(self, params: dict, x: torch.Tensor) -> torch.Tensor:
        """The model's output [T, N, ...] on x [T, N, ...] with per-task params from adapt()."""
        _checks.tensor("x", x, min_dim=2)
        if not isinstance(params, dict):
            raise TypeError(f"params: expected the dict returned by adapt(), got {type(params).__name__}")
        missing = [n for n in self.program.names if n not in params]
        if missing:
            raise ValueError(f"params: missing {missing}")
        for n in self.program.names:
            if params[n].shape[0] != x.shape[0]:
                raise ValueError(f"params[{n!r}] {tuple(params[n].shape)} has T={params[n].shape[0]} but "
                                 f"x {tuple(x.shape)} has T={x.shape[0]}")
        self._check_input_width(x=x)
        params, statistics = self._at_step(params, self.inner_steps - 1)
        with plan.running_stats(self.program), statistics:
            return self.program(params, x)

    def extra_repr(self) -> str:
        lr = (("learned" if self._lr_kind == "per_element" else f"learned {self._lr_kind}")
              if self.lrs is not None else self.inner_lr)
        return (f"inner_lr={lr}, inner_steps={self.inner_steps}, first_order={self.first_order}, "
                f"loss={self.loss if isinstance(self.loss, str) else 'callable'}"
                + (f", backend={self.backend!r}" if self.backend is not None else "")
                + (", recompute=True" if self.recompute else "")
                + (f", inner_params={list(self._inner[1]) if self._inner[0] == 'names' else 'callable'}"
                   if self._inner is not None else "")
                + (", checkpoint_steps=True" if self.checkpoint_steps else "")
                + (f", step_loss_weights={list(self.step_loss_weights)}" if self.step_loss_weights is not None
                   else "")
                + (", per_step_bn=True" if self.step_bn is not None else ""))


class _StepQueries:
    """step_loss_weights' per-task loss (the multi-step loss of MAML++, Antoniou et al. 2019):
    sum over the inner steps s of w_s times the query loss after step s, the query loss after a
    step whose weight is 0 left out (the last step's always made). Called by _adapt after each
    step but the last; total(P) adds the last step's. The leading steps of the model that read
    no adapted parameter (program.invariant_prefix) run once on the query set for all of them."""

    def __init__(self, meta, xq, yq, grad_on: bool, later: bool):
        self.meta, self.xq, self.yq, self.grad_on, self.later = meta, xq, yq, grad_on, later
        self.weights = meta._step_weights()
        adapted = set(meta._adapt_names)
        self.start = (meta.program.invariant_prefix(adapted, batch_norm=meta.step_bn is None)
                      if meta.inner_steps > 0 and adapted else 0)
        self.features, self.recorded, self.sum = None, None, None

    def steps(self, S: int) -> list:
        """The steps after which a query loss is made by __call__ (weight not 0, not the last)."""
        return [s for s in range(S - 1) if self.weights[s] != 0]

    def losses(self, P: dict, step: int) -> torch.Tensor:
        """The per-task query losses [T] at the parameters P after inner step ``step``."""
        meta = self.meta
        if not self.grad_on:  # (evaluation: the adapted parameters as values)
            P = {n: t.detach() for n, t in P.items()}
        P, statistics = meta._at_step(P, step)
        with phase("query_forward"), torch.set_grad_enabled(self.grad_on), statistics:
            x, start = self.xq, 0
            if self.start:
                if self.features is None:
                    self.features = meta.program(P, self.xq, meta.recompute, later_blocks=self.later,
                                                 stop=self.start)
                    self.recorded = plan.last_pass()
                else:
                    plan.repeat_pass(self.recorded)  # BatchNorm running statistics: the loop's pass
                x, start = self.features, self.start
            return meta._task_loss(meta.program(P, x, meta.recompute, later_blocks=self.later, start=start),
                                   self.yq)

    def __call__(self, step: int, P: dict):
        w = self.weights[step]
        if w != 0:
            part = self.losses(P, step) * w
            self.sum = part if self.sum is None else self.sum + part

    def total(self, P: dict) -> torch.Tensor:
        """The weighted sum, with the query losses at P (the last step's parameters)."""
        last = self.losses(P, self.meta.inner_steps - 1) * self.weights[-1]
        return last if self.sum is None else self.sum + last


def step_loss_schedule(inner_steps: int, epoch: float, anneal_epochs: float, floor: float = 0.03) -> list:
    """MAML++'s annealed multi-step loss weights (Antoniou et al. 2019) for BatchedMAML's
    step_loss_weights: at epoch 0 every step's query loss weighs 1 / S; each epoch moves
    1 / (S * anneal_epochs) of weight from every step but the last to the last, until the others
    reach floor / S (after ``anneal_epochs`` epochs), so that training ends on the last step's loss.
    The weights always sum to 1.

        meta.step_loss_weights = fastmeta.step_loss_schedule(meta.inner_steps, epoch, 10)
    """
    S = _steps("inner_steps", inner_steps)
    if S < 1:
        raise ValueError(f"step_loss_schedule: inner_steps must be >= 1, got {S}")
    for name, v in (("epoch", epoch), ("anneal_epochs", anneal_epochs), ("floor", floor)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0:
            raise ValueError(f"step_loss_schedule: {name} must be a finite number >= 0, got {v!r}")
    if anneal_epochs == 0:
        raise ValueError("step_loss_schedule: anneal_epochs must be > 0 (the epochs over which the weight moves "
                         "to the last step)")
    if floor > 1:
        raise ValueError(f"step_loss_schedule: floor must be at most 1 (a share of 1 / inner_steps), got {floor!r}")
    moved = min(float(epoch) / (S * float(anneal_epochs)), (1.0 - floor) / S)  # taken from each earlier step
    early = 1.0 / S - moved
    return [early] * (S - 1) + [1.0 - (S - 1) * early]


def chunk_slices(T: int, chunk: int | None) -> list:
    """(start, stop) of each chunk of task_chunk tasks (the last one shorter), or the whole batch."""
    if chunk is None or chunk >= T:
        return [(0, T)]
    return [(i, min(i + chunk, T)) for i in range(0, T, chunk)]


def accumulate(loss_out, grads_out, loss, grads, weight: float):
    """loss_out += weight * loss and grads_out[i] += weight * grads[i] (None where a parameter
    does not require grad), in place: the chunked step's sum over chunks."""
    loss_out.add_(loss, alpha=weight)
    pairs = [(o, g) for o, g in zip(grads_out, grads) if o is not None]
    if pairs:
        torch._foreach_add_([o for o, _ in pairs], [g for _, g in pairs], alpha=weight)


def _wanted_only(params, grads) -> list:
    """value_and_grad's gradients as it returns them: None for a parameter that does not require grad
    (the direct calls make one for every parameter and rate)."""
    return [g if p.requires_grad else None for p, g in zip(params, grads)]


class _MetaLossWithGrads(torch.autograd.Function):
    """The meta-loss of the fused op's call with layer rates (BatchedMAML's direct call: the loss
    and its gradients w.r.t. the parameters and the rates, as values) as a node of the autograd
    graph: backward hands out those gradients, scaled by the incoming one. As fastmeta::mlp_meta_loss,
    differentiable once only."""

    @staticmethod
    def forward(ctx, out, *inputs):
        value, grads = out
        ctx.grads = grads
        return value

    @staticmethod
    def backward(ctx, go):
        refuse_second_derivative("fastmeta::mlp_meta_loss")
        grads = ctx.grads
        if not (go.device.type == "cpu" and go.item() == 1.0):  # (loss.backward()'s seed: as they are)
            grads = [g * go for g in grads]
        return (None, *grads)


class _ChunkedMetaLoss(torch.autograd.Function):
    """forward's loss under task_chunk: computed with its meta-gradient chunk by chunk (no graph
    kept); backward scales that gradient by the incoming one."""

    @staticmethod
    def forward(ctx, meta, xs, ys, xq, yq, *params):
        value, grads = meta._chunked_value_and_grad(xs, ys, xq, yq, list(params))
        ctx.save_for_backward(*grads)
        return value

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        return (None,) * 5 + tuple(g * d for d in ctx.saved_tensors)


class _CheckpointedSteps(torch.autograd.Function):
    """BatchedMAML(checkpoint_steps=True)'s inner loop: forward runs the S steps without a graph
    (each gradient as in first order) and keeps each step's parameters theta_s; backward, given v =
    dL/dtheta_S, recomputes step s's graph at theta_s for s = S-1 .. 0 (the support loss and its
    differentiable gradient, then the update) and backpropagates v through it, one step's graph
    alive at a time. Inputs: the module, xs, ys, the number n of adapted parameters, the number m
    of rate tensors, the names of the shared parameters (read by the steps, not adapted), the
    steps k whose parameters theta_{k+1} are outputs too (step_loss_weights' query losses), then
    the n meta-parameters, the m rate tensors (Meta-SGD's, or a tensor inner_lr) and the shared
    parameters. Returns the n adapted parameters [T, ...] after the last step, then n after each
    of those steps; the backward adds the gradient given for theta_{k+1} to v where it gets there."""

    @staticmethod
    def forward(ctx, meta, xs, ys, n, m, shared_names, kept, *tensors):
        rate_tensors, shared = tensors[n:n + m], tensors[n + m:]
        T = xs.shape[0]
        names = meta._adapt_names
        fixed = meta._broadcast(T, detach=True)
        theta = [fixed[name] for name in names]
        lr = _CheckpointedSteps._rate(meta, [t.detach() for t in rate_tensors])
        history, rng, outs = [], [], {}
        keep_rng = meta.program.random  # (a Dropout, a vmap fallback)
        for step in range(meta.inner_steps):
            history.append(theta)
            rng.append(_rng_state(xs.device) if keep_rng else None)
            with torch.enable_grad():
                P = dict(fixed)
                P.update((name, t.detach().requires_grad_()) for name, t in zip(names, theta))
                grads = meta._support_grads(P, xs, ys, create_graph=False, step=step)
            with phase("update"):
                theta = ops.inner_update(theta, [g.detach() for g in grads], meta._step_lr(lr, step))
            if step in kept:
                outs[step] = theta
        ctx.meta, ctx.history, ctx.rng, ctx.n, ctx.m, ctx.shared_names = meta, history, rng, n, m, shared_names
        ctx.kept = kept
        ctx.backend = get_backend()  # the recomputation runs the kernels this forward ran
        # theta_0 (and the parameters the steps do not adapt) are read again by the backward
        # (but for running statistics held as Parameters, as a traced F.batch_norm may: updated after
        # the forward, and read by no training-mode pass)
        stats = {id(t) for bn in meta.program.batch_norms if plan._tracks(bn)
                 for t in (bn.running_mean, bn.running_var)}
        ctx.versions = {name: p._version for name, p in meta._meta_params().items() if id(p) not in stats}
        ctx.save_for_backward(xs, ys, *rate_tensors, *shared)
        return tuple(theta) + tuple(t for step in kept for t in outs[step])

    @staticmethod
    def backward(ctx, *v):
        if torch.is_grad_enabled():  # a backward with create_graph=True
            raise RuntimeError("BatchedMAML(checkpoint_steps=True): the meta-loss is differentiable once (its "
                               "backward recomputes the inner steps); for higher derivatives of it use "
                               "checkpoint_steps=False")
        meta, history, n, m = ctx.meta, ctx.history, ctx.n, ctx.m
        changed = [name for name, p in meta._meta_params().items()
                   if name in ctx.versions and ctx.versions[name] != p._version]
        if changed:
            raise RuntimeError(f"BatchedMAML(checkpoint_steps=True): parameter(s) {changed} were modified in place "
                               "between the forward and its backward, which recomputes the inner steps from "
                               "them; take the backward (or value_and_grad) before changing them")
        xs, ys, *saved = ctx.saved_tensors
        rate_tensors, shared = saved[:m], saved[m:]
        T = xs.shape[0]
        names = meta._adapt_names
        fixed = meta._broadcast(T, detach=True)
        # the shared parameters as leaves of the recomputed steps (broadcast over the tasks in each)
        shared_leaves = [p.detach().requires_grad_() for p in shared]
        given = {step: v[n * (k + 1):n * (k + 2)] for k, step in enumerate(ctx.kept)}  # dL/dtheta_{step+1}

        def add(v, extra):
            return [a if b is None else (b if a is None else a + b) for a, b in zip(v, extra)]
        v = list(v[:n])
        first = 7 + n  # needs_input_grad's index of the first rate tensor
        wanted = [i for i, r in enumerate(rate_tensors) if ctx.needs_input_grad[first + i]]
        rate_grads = [None] * len(rate_tensors)
        wanted_shared = [j for j in range(len(shared)) if ctx.needs_input_grad[first + m + j]]
        shared_grads = [None] * len(shared)
        for step in reversed(range(meta.inner_steps)):
            theta = history[step]
            if step in given:
                v = add(v, given[step])
            v = [torch.zeros_like(t) if g is None else g for g, t in zip(v, theta)]
            with torch.enable_grad(), use_backend(ctx.backend), _restored_rng(ctx.rng[step], xs.device):
                leaves = [t.detach().requires_grad_() for t in theta]
                P = dict(fixed)
                tables = {}  # (per_step_bn's, read as they are)
                for name, leaf in zip(ctx.shared_names, shared_leaves):
                    if name.startswith("step_bn."):
                        tables[name] = leaf
                    else:
                        P[name] = leaf.unsqueeze(0).expand(T, *leaf.shape)
                P.update(zip(names, leaves))
                grads = meta._support_grads(P, xs, ys, create_graph=True, step=step, bn_tables=tables or None)
                with phase("update"):
                    rate = meta._step_lr(_CheckpointedSteps._rate(meta, rate_tensors), step)
                    new = ops.inner_update(leaves, grads, rate)
                with phase("outer_backward"):
                    out = torch.autograd.grad(new, leaves + [rate_tensors[i] for i in wanted]
                                              + [shared_leaves[j] for j in wanted_shared],
                                              grad_outputs=v, allow_unused=True)
            v = list(out[:n])
            for i, g in zip(wanted, out[n:n + len(wanted)]):
                if g is not None:
                    rate_grads[i] = g if rate_grads[i] is None else rate_grads[i] + g
            for j, g in zip(wanted_shared, out[n + len(wanted):]):
                if g is not None:
                    shared_grads[j] = g if shared_grads[j] is None else shared_grads[j] + g
            history[step] = None  # this step's parameters are no longer needed
        # theta_0 is each meta-parameter broadcast over the T tasks
        grads = [None if g is None else g.sum(0) for g in v]
        return (None, None, None, None, None, None, None, *grads, *rate_grads, *shared_grads)

    @staticmethod
    def _rate(meta, rate_tensors):
        """The inner_update rate from the rate tensors given to apply: Meta-SGD's list, a tensor
        inner_lr, or the module's number (for a step: meta._step_lr)."""
        if meta.lrs is not None:
            return list(rate_tensors)
        return rate_tensors[0] if rate_tensors else meta.inner_lr


def _rng_state(device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


class _restored_rng:
    """Within it, the random number generators (CPU, and the CUDA device's) are as they were when
    `state` was taken (_rng_state), and outside as before: a recomputed step draws what its first
    run drew. A no-op for state None."""

    def __init__(self, state, device):
        self.state, self.device = state, device

    def __enter__(self):
        if self.state is None:
            return
        cuda = self.device.type == "cuda"
        self.fork = torch.random.fork_rng(devices=[self.device] if cuda else [], device_type=self.device.type)
        self.fork.__enter__()
        torch.set_rng_state(self.state[0])
        if cuda:
            torch.cuda.set_rng_state(self.state[1], self.device)

    def __exit__(self, *exc):
        if self.state is not None:
            self.fork.__exit__(*exc)
        return False
