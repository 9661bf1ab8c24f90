"""The planner: lowers an ``nn.Module`` into a batched per-task program.

A program maps per-task parameters P (name -> [T, *shape], at step 0 broadcast views of the
meta-parameters) and a batch x [T, N, ...] to the model's output [T, N, ...], using fastmeta's
batched ops. (Nested) ``nn.Sequential``s of Linear, Conv1d, Conv2d, BatchNorm1d/2d, LayerNorm,
GroupNorm, the elementwise activations (ReLU, LeakyReLU, Tanh, Sigmoid, GELU, SiLU, ELU, Softplus,
Mish, Hardswish, ..., and PReLU with its per-task slopes), Softmax / LogSoftmax with a dim, the
max / average pools (1d, 2d, adaptive), Flatten, Dropout and Identity are lowered module by module;
a Linear followed by ReLU, LeakyReLU, Tanh or Sigmoid becomes one fused ``batched_linear``
(Dropout in training mode draws one mask over all tasks, each task's part of it an independent
draw, as a loop's per-task draws are). A Conv1d
runs as a Conv2d of height 1; GroupNorm runs as one ``F.group_norm`` over all tasks' channels
(each task's channels a whole number of groups, its affine weights per task), LayerNorm as
``F.layer_norm`` and a per-task affine.
A module is lowered only where calling it runs its class's own forward: a module with forward
hooks or with parametrizations (weight norm) is not, nor is any module while global module hooks
are registered, and neither is a Sequential with them. A module with its own forward (the model,
or a module in it; a subclass of a lowered class that overrides forward too) is traced with
torch.fx into the modules and code it runs (fastmeta/_forward.py), whose modules are lowered as
a Sequential's children (a stretch of it that is not a chain: one graph step of its runs of
modules and the code between them); where it cannot be traced, it runs as a whole as below.
Module backward hooks raise (neither the batched ops nor vmap run them). Any other module runs
through a ``torch.func`` vmap of ``functional_call`` over the task dim (exact, but slower and
heavier), as its own call would; where vmap has no batching rule for one of its ops (an LSTM's),
task by task, as the per-task loop calls it. A module used at several places of a Sequential
(tied weights) runs at each; in a vmap fallback each module attribute that holds a parameter is
given the per-task one once (``parameter_slots``), so tied and shared parameters run as in the
loop and the model keeps its own. ``explain(model)`` says which path each module takes and why;
``lower(model, strict=True)`` raises instead of falling back.

BatchNorm uses per-task (transductive) batch statistics when the module is in training mode or
keeps no running statistics, as MAML does; in eval mode with running statistics it uses those.
Within ``running_stats(program)`` (BatchedMAML's calls) a BatchNorm in training mode with running
statistics has them updated as the per-task loop's forward passes would update them: task by task,
each task's passes (inner steps, then the query) in order, with the module's momentum (or its
cumulative average), ``num_batches_tracked`` counting every pass.

An MLP (Linear layers with bias, separated by at most one of ReLU / LeakyReLU / Tanh / Sigmoid /
GELU / SiLU, and Identity or Dropout modules, all parameters trainable and unshared) is also
recorded as an ``MLPSpec``, which lets BatchedMAML run the whole inner loop as one ``mlp_inner_loop`` op (with a
Dropout, only while it drops nothing: in eval mode or at p=0).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import threading
import weakref
from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import _checks, ops
from .backend import get_backend, use_backend
from .ops._layout import per_sample_2d

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# On a CPU, a conv program's pass whose input has at most this many elements a task runs all tasks at
# once (Program.task_chunk): Omniglot's 5-image support sets (3920), not its 75-image query sets
CPU_SMALL_PASS = 16384
# The kinds of the steps a BatchNorm module lowers to
BN_KINDS = ("batched_batch_norm", "bn_relu_pool")
_ACT_MODULES = {nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid"}
# Parameter-free modules that act on each element alone: run on [T, N, ...] as they are
_ELEMENTWISE = (nn.GELU, nn.SiLU, nn.ELU, nn.CELU, nn.SELU, nn.Softplus, nn.Mish, nn.Hardswish, nn.Hardsigmoid,
                nn.Hardtanh, nn.LogSigmoid, nn.Softsign, nn.Tanhshrink, nn.Softshrink, nn.Hardshrink, nn.Threshold)
# Parameter-free modules that act on each sample and channel alone ([B, C, ...] in, [B, C, ...] out)
_PER_CHANNEL = (nn.MaxPool1d, nn.AvgPool1d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d,
                nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
# The classes lowered module by module: a subclass is lowered as its base only where it keeps the
# base's forward
_LOWERED = (nn.Sequential, nn.Linear, nn.Conv1d, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.InstanceNorm1d,
            nn.InstanceNorm2d, nn.LayerNorm, nn.Embedding,
            nn.GroupNorm, nn.PReLU, nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.Softmax, nn.LogSoftmax, nn.Identity,
            nn.Flatten, nn.Dropout) + _ELEMENTWISE + _PER_CHANNEL


def global_hooks() -> int:
    """How many global module hooks (forward, forward-pre, backward, backward-pre) are registered:
    each runs at every module call, so none of the batched lowerings may replace a call while any
    is (nn.modules.module.register_module_forward_hook and the like)."""
    from torch.nn.modules import module as _m

    return (len(_m._global_forward_hooks) + len(_m._global_forward_pre_hooks) + len(_m._global_backward_hooks)
            + len(_m._global_backward_pre_hooks))


def hook_count(m: nn.Module) -> int:
    """m's own forward, forward-pre, backward and backward-pre hooks."""
    return len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) + len(m._backward_pre_hooks)


# classes declared (lower_as) to compute what a lowered base class computes: class -> base
_AS_BASE: dict = {}


def lower_as(cls: type, base: type) -> None:
    """Declares that modules of class ``cls``, a subclass of ``base`` (one of the modules fastmeta
    lowers: nn.BatchNorm2d, nn.Conv2d, nn.Linear, ...) with a forward of its own, compute what
    ``base``'s forward computes, called as ``module(x)`` or with their forward's defaults
    (``module(x, params=None)``), and change the module's state as it does (BatchNorm's running
    statistics): the planner then lowers them as ``base`` (MetaModule libraries' MetaBatchNorm2d,
    whose forward torch.fx cannot trace, onto the fused BatchNorm -> ReLU -> MaxPool2d op). fastmeta
    cannot check the declaration: a class that computes otherwise gets base's answers. Declare it
    before building a BatchedMAML of such a model; ``lower_as(cls, None)`` withdraws it."""
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise TypeError(f"lower_as: cls must be an nn.Module class, got {cls!r}")
    if base is None:
        _AS_BASE.pop(cls, None)
        return
    lowered = [c for c in _LOWERED if c is not nn.Sequential]
    if base not in lowered:
        raise ValueError(f"lower_as: base must be one of the classes fastmeta lowers "
                         f"({', '.join(c.__name__ for c in lowered)}), got {getattr(base, '__name__', base)!r}")
    if not issubclass(cls, base):
        raise ValueError(f"lower_as: {cls.__name__} is not a subclass of {base.__name__}")
    _AS_BASE[cls] = base


class RowsOf(nn.Flatten):
    """A traced forward's ``x.view(-1, D)`` (``x.reshape(-1, D)``): each task's input as rows of D,
    a flatten of each sample where a sample holds D values (an MLP on images), else rows of several
    samples (a sequence's tokens), as the view makes them."""

    def __init__(self, width: int):
        super().__init__(1, -1)
        self.width = width


def _not_plain(m: nn.Module) -> str | None:
    """None if calling m runs exactly its lowered class's forward, else why not: a subclass with its
    own forward, forward hooks (they change what the module returns), global module hooks (they
    run at every module's call), parametrizations (weight norm and the like compute the weight the
    module uses from other parameters)."""
    base = _AS_BASE.get(type(m)) or next((c for c in _LOWERED if isinstance(m, c)), None)
    if base is not None and type(m).forward is not base.forward and _AS_BASE.get(type(m)) is not base:
        return f"{type(m).__name__} overrides {base.__name__}.forward"
    return hooked(m)


def hooked(m: nn.Module) -> str | None:
    """Why calling m runs more than its forward (forward hooks, global module hooks,
    parametrizations), or None."""
    from torch.nn.utils import parametrize

    if m._forward_hooks or m._forward_pre_hooks:
        return f"{type(m).__name__} has forward hooks"
    if global_hooks():
        return "global module hooks are registered (torch.nn.modules.module.register_module_*_hook)"
    if parametrize.is_parametrized(m):
        return f"{type(m).__name__} has parametrizations"
    return None


def plain_sequential(m: nn.Module) -> bool:
    """An nn.Sequential (or subclass) that runs Sequential's own forward and nothing more."""
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward and hooked(m) is None


def tracing_on() -> bool:
    """Whether custom forwards are traced (torch.fx) into batched steps; FASTMETA_TRACE=0 runs each
    such module through the vmap fallback instead."""
    return os.environ.get("FASTMETA_TRACE", "1").strip() != "0"


def traceable(m: nn.Module) -> bool:
    """Whether m's forward is the user's own code (not one of PyTorch's modules' forwards) and
    calling m runs just that forward, so that torch.fx's trace of it may replace the call."""
    if not tracing_on() or hooked(m) is not None or plain_sequential(m) or type(m) in _AS_BASE:
        return False
    owner = next(c for c in type(m).__mro__ if "forward" in c.__dict__)
    return not owner.__module__.startswith(("torch.nn.", "torch.ao.nn."))


# ---- BatchNorm running statistics ---------------------------------------------------------------
# .passes: one entry a program call (pass), a list of its chunks of tasks in order, each a dict
# {id(bn): [bn, means, variances]} with one [T', C] record a use of bn (a module at two places: two)
_stats = threading.local()


def _tracks(bn) -> bool:
    """Whether a forward pass of bn updates its running statistics (training mode, tracked)."""
    return bn.training and bn.track_running_stats and bn.running_mean is not None


def _recording() -> bool:
    # (not inside a backward pass: a recomputation there, checkpointing's, is no forward pass of the loop's)
    return getattr(_stats, "passes", None) is not None and torch._C._current_graph_task_id() == -1


class StepStatistics:
    """A BatchNorm module's running statistics for each inner step (BatchedMAML(per_step_bn=True)):
    buffers mean and var [S, C] and count [S]; view(s) is the module-like object (running_mean,
    running_var, num_batches_tracked, momentum) of step s, read and updated in place."""

    def __init__(self, bn, mean, var, count):
        self.bn, self.mean, self.var, self.count = bn, mean, var, count

    def view(self, step: int):
        return _StepView(self.mean[step], self.var[step], self.count[step], self.bn.momentum)


@dataclasses.dataclass
class _StepView:
    running_mean: torch.Tensor
    running_var: torch.Tensor
    num_batches_tracked: torch.Tensor
    momentum: float | None


@contextlib.contextmanager
def step_statistics(tables: dict, step: int):
    """Within it, the BatchNorm modules of ``tables`` (id(module) -> StepStatistics) normalize in
    eval mode with, and record their batch statistics into, their running statistics of inner
    step ``step``."""
    old = getattr(_stats, "step", None)
    _stats.step = (tables, step)
    try:
        yield
    finally:
        _stats.step = old


def _statistics_of(bn):
    """(key, object) of bn's running statistics now: bn's own, or within step_statistics those of
    the step (one key a step, the view made once a recorded block)."""
    current = getattr(_stats, "step", None)
    if current is None or id(bn) not in current[0]:
        return id(bn), bn
    tables, step = current
    return (id(bn), step), tables[id(bn)].view(step)


def _record(bn, mean, var):
    """This pass's batch statistics of bn per task: mean and unbiased variance [T', C] (one chunk of
    tasks; a pass's chunks come in task order); per step within step_statistics."""
    key, target = _statistics_of(bn)
    entry = _stats.passes[-1][-1].setdefault(key, [target, [], []])
    entry[1].append(mean)
    entry[2].append(var)


def last_pass():
    """Where passes are recorded (running_stats): the pass recorded last, else None."""
    return _stats.passes[-1] if _recording() and _stats.passes else None


def repeat_pass(recorded):
    """Where passes are recorded: ``recorded`` (last_pass()'s) recorded once more, now, for a pass
    whose output was made once and stands for another of the loop's passes here (BatchedMAML's
    invariant prefix on the support set at each inner step after the first, on the query set
    at each query loss after the first)."""
    if recorded is not None and _recording():
        _stats.passes.append(recorded)


def mark() -> int | None:
    """Where passes are recorded: how many are so far (for reorder), else None."""
    return len(_stats.passes) if _recording() else None


def reorder(start: int | None, order: list):
    """Where passes are recorded: the passes recorded since mark() gave ``start`` put in ``order``
    (their indices counted from start): passes made in another order than the loop's."""
    if start is None or not _recording():
        return
    recorded = _stats.passes[start:]
    if sorted(order) != list(range(len(recorded))):
        raise AssertionError(f"reorder: {order} is not an order of the {len(recorded)} passes recorded")
    _stats.passes[start:] = [recorded[i] for i in order]


@contextlib.contextmanager
def running_stats(program):
    """Within it, the program's BatchNorm modules that track running statistics (training mode)
    record each pass's per-task batch statistics; on leaving (without an error) their running
    statistics are updated as a per-task loop would have: every task's passes in turn, in order."""
    if getattr(_stats, "passes", None) is not None or not any(_tracks(bn) for bn in program.batch_norms):
        yield
        return
    _stats.passes = []
    try:
        yield
        passes = _stats.passes
    finally:
        _stats.passes = None
    _update_running_stats(passes)


@contextlib.contextmanager
def kept_running_stats(program, extra=()):
    """Within it the program's BatchNorm running statistics (and the buffers ``extra``: a
    BatchedMAML's per-step ones) may change; on leaving they are as before (for calls that are not
    the user's passes: fastmeta.tune's timings, graphed's warmup)."""
    saved = [(b, b.detach().clone()) for bn in program.batch_norms
             for b in (bn.running_mean, bn.running_var, bn.num_batches_tracked) if b is not None]
    saved += [(b, b.detach().clone()) for b in extra]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)


def _update_running_stats(passes):
    by_bn = {}  # id -> [bn, [per pass: means [T, uses, C]], [variances likewise]]
    for chunks in passes:
        for key in {k: None for chunk in chunks for k in chunk}:
            bn = next(chunk[key][0] for chunk in chunks if key in chunk)
            entry = by_bn.setdefault(key, [bn, [], []])
            for i in (1, 2):
                entry[i].append(torch.cat([torch.stack(chunk[key][i], 1) for chunk in chunks if key in chunk]))
    with torch.no_grad():
        for bn, means, variances in by_bn.values():
            # the loop's order: task by task, each task's passes in turn, each pass's uses in turn
            C = bn.running_mean.shape[0]
            seq_mean = torch.stack(means, 1).reshape(-1, C).to(bn.running_mean.dtype)
            seq_var = torch.stack(variances, 1).reshape(-1, C).to(bn.running_var.dtype)
            n = seq_mean.shape[0]
            if bn.momentum is None:  # cumulative average over every pass so far
                before = bn.num_batches_tracked.to(seq_mean.dtype)
                total = before + n
                bn.running_mean.copy_((bn.running_mean * before + seq_mean.sum(0)) / total)
                bn.running_var.copy_((bn.running_var * before + seq_var.sum(0)) / total)
            else:  # r <- (1 - m) r + m x, n times: (1 - m)^n r + sum_k m (1 - m)^(n - 1 - k) x_k
                m = float(bn.momentum)
                w = m * (1 - m) ** torch.arange(n - 1, -1, -1, dtype=seq_mean.dtype, device=seq_mean.device)
                keep = (1 - m) ** n
                bn.running_mean.copy_(bn.running_mean * keep + w @ seq_mean)
                bn.running_var.copy_(bn.running_var * keep + w @ seq_var)
            bn.num_batches_tracked.add_(n)


class UnsupportedModule(TypeError):
    """Raised by strict lowering when a module has no batched lowering, and by any lowering for a
    model whose gradients a backward hook changes."""


def _no_backward_hooks(model: nn.Module) -> None:
    """Raises for module backward hooks (register_full_backward_hook and the like, the model's own
    or global ones): they change the gradients of the inner steps and of the meta-gradient where a
    per-task loop calls the module, and neither the batched ops nor torch.func's vmap fallback,
    which calls the module under a functional transform, runs them; the result would silently
    differ from the loop's."""
    from torch.nn.modules import module as _m

    hooked = [name or "<model>" for name, m in model.named_modules() if m._backward_hooks or m._backward_pre_hooks]
    if hooked or _m._global_backward_hooks or _m._global_backward_pre_hooks:
        where = (f"module(s) {hooked} of {type(model).__name__} have backward hooks" if hooked
                 else "global module backward hooks are registered")
        raise UnsupportedModule(
            f"fastmeta's batched lowering: {where}, which change the gradients of a per-task loop; "
            "BatchedMAML cannot run them (neither its batched ops nor torch.func's vmap do). Remove the hooks, or "
            "use fastmeta.MAML / MetaSGD, which call the modules task by task as a loop does")


@dataclasses.dataclass
class Step:
    path: str                    # dotted module path ('' for the whole model)
    kind: str                    # what it lowers to, for explain()
    run: Callable                # (x, P) -> x
    fallback: str | None = None  # reason when this step is a vmap fallback
    spec: dict | None = None     # conv / bn_relu_pool steps: their parameter names and settings
    params: frozenset = frozenset()  # the canonical names of the parameters it reads
    synthetic: bool = False      # code of a traced forward, not a module (path names its graph nodes)
    random: bool = False         # may draw random numbers (a traced forward's dropout and the like)


@dataclasses.dataclass
class MLPSpec:
    param_names: list            # [W_1, b_1, ..., W_L, b_L] canonical names
    activations: list            # per layer
    negative_slope: float
    dropouts: tuple = ()         # its nn.Dropout modules: the fused op runs only while none drops
    # a Flatten of each sample first (-1), or a traced x.view(-1, D) (D): the fused op takes the
    # inputs flattened, or as each task's rows of D; 0: none
    flatten_input: int = 0

    def dropping(self) -> bool:
        """Whether a Dropout of the MLP draws masks now (training mode and p > 0): the fused op,
        which has no masks, then does not run."""
        return any(d.training and d.p > 0 for d in self.dropouts)


@dataclasses.dataclass
class Program:
    steps: list
    names: list                  # canonical parameter names, model.named_parameters() order
    mlp: MLPSpec | None
    mlp_reason: str              # why the fused MLP path does or does not apply
    batch_norms: list = dataclasses.field(default_factory=list)  # every BatchNorm module run by it

    def __call__(self, P: dict, x: torch.Tensor, recompute: bool = False, later_blocks: bool = False,
                 start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The model on x [T, ...] with the parameters P. recompute: a conv block on input that
        needs no gradient (the first one) runs as ops.conv_bn_relu_pool, its convolution's output
        recomputed in the backward passes instead of kept (BatchedMAML(recompute=True)).
        later_blocks (with recompute): each later conv block (input that needs a gradient) keeps
        only its input; its convolution's output, BatchNorm statistics and pooling indices are
        recomputed from it in the backward (torch.utils.checkpoint, correct to any order).
        start, stop: only steps[start:stop] (x is then steps[start - 1]'s output)."""
        if _recording():
            _stats.passes.append([])  # this pass's BatchNorm statistics (running_stats)
        chunk = self.task_chunk(x)
        if chunk is None or chunk >= x.shape[0]:
            return self._run(P, x, recompute, later_blocks, start, stop)
        T = x.shape[0]
        # split, not slices: the backward of a split is one node that joins the chunks' gradients
        # into one [T, ...] tensor, where each slice's backward allocates a zero [T, ...] of its own
        parts = {n: torch.split(v, chunk) for n, v in P.items() if v.dim() and v.shape[0] == T}
        outs = [self._run({n: (parts[n][k] if n in parts else v) for n, v in P.items()}, xk, recompute, later_blocks,
                          start, stop)
                for k, xk in enumerate(torch.split(x, chunk))]
        return torch.cat(outs)

    def _run(self, P: dict, x: torch.Tensor, recompute: bool = False, later_blocks: bool = False,
             start: int = 0, stop: int | None = None) -> torch.Tensor:
        if _recording():
            _stats.passes[-1].append({})  # a chunk of tasks, in task order
        end = len(self.steps) if stop is None else stop
        if not recompute:
            for step in self.steps[start:end]:
                x = step.run(x, P)
            return x
        steps, i = self.steps, start
        # (the checkpointed blocks read P again in the backward: a copy, so that a caller's later
        # change of its dict, such as the next inner step's parameters, does not reach them)
        P = dict(P)
        while i < end:
            if i + 1 < end and self.recomputable(i) and not x.requires_grad:
                conv, bn = steps[i].spec, steps[i + 1].spec
                made = [] if _recording() and _tracks(bn["module"]) else None  # (from the same kernel)
                get = lambda name: P[name] if name else None  # noqa: E731
                x = ops.conv_bn_relu_pool(x, P[conv["w"]], get(conv["b"]), conv["stride"], conv["padding"],
                                          conv["dilation"], conv["groups"], get(bn["w"]), get(bn["b"]), bn["eps"],
                                          batch_stats=made)
                if made:
                    _record(bn["module"], *made[0])
                i += 2
            elif i + 1 < end and later_blocks and self.recomputable(i) and x.requires_grad and torch.is_grad_enabled():
                # the recomputation in the backward runs on the backends this forward ran (the
                # backward may come after a use_backend block or a module's backend has ended)
                def block(x, conv=steps[i], tail=steps[i + 1], backend=get_backend()):
                    with use_backend(backend):
                        return tail.run(conv.run(x, P), P)
                x = checkpoint(block, x, use_reentrant=False, preserve_rng_state=False)
                i += 2
            else:
                x = steps[i].run(x, P)
                i += 1
        return x

    def recomputable(self, i: int = 0) -> bool:
        """Whether steps i, i + 1 are a convolution and a BatchNorm (batch statistics) -> ReLU ->
        MaxPool2d(2) that ops.conv_bn_relu_pool can run together."""
        steps = self.steps
        return (i + 1 < len(steps) and steps[i].kind == "batched_conv2d" and steps[i + 1].kind == "bn_relu_pool"
                and steps[i + 1].spec["batch_stats"]())

    def task_chunk(self, x: torch.Tensor):
        """Tasks per pass through the program, or None for all at once. On a CPU, conv programs run
        a task at a time where a task's input is large (a query set): each task's activations
        then stay in cache from one op to the next (all tasks at once stream every activation
        through DRAM and run ~20% slower); a pass whose input has at most CPU_SMALL_PASS elements a
        task (a few-shot support set) runs all tasks at once, where one op call a task would cost
        more than the cache saves (benchmarks/RESULTS.md). FASTMETA_CPU_TASK_CHUNK sets the
        chunk size for every pass."""
        if x.device.type != "cpu" or not self.has_conv:
            return None
        v = os.environ.get("FASTMETA_CPU_TASK_CHUNK")
        if v:
            return max(1, int(v))
        return None if x[0].numel() <= CPU_SMALL_PASS else 1

    def invariant_prefix(self, adapted, batch_norm: bool = True) -> int:
        """How many leading steps give the same output at every inner step: those that read no
        adapted parameter (names in ``adapted``) and draw no random numbers (no Dropout, no vmap
        fallback, which may hold one); with batch_norm False, no BatchNorm either (per-step
        BatchNorm: each step has its own). Their output on the support set can be made once a call."""
        for i, s in enumerate(self.steps):
            if s.fallback or s.random or s.kind == "dropout" or s.params & adapted:
                return i
            if not batch_norm and s.kind in BN_KINDS:
                return i
        return len(self.steps)

    def lowered_batch_norms(self) -> list:
        """The BatchNorm modules that run as batched steps (not inside a vmap fallback), in order."""
        return [s.spec["module"] for s in self.steps if s.kind in BN_KINDS]

    @property
    def has_conv(self):
        return any(s.kind == "batched_conv2d" or (s.kind.startswith("graph(") and s.spec["has_conv"])
                   for s in self.steps)

    @property
    def fallbacks(self):
        return [s for s in self.steps if s.fallback]

    @property
    def random(self) -> bool:
        """Whether a pass may draw random numbers (a Dropout, or a vmap fallback, which may hold one):
        a pass recomputed in a backward must then draw what its first run drew."""
        return bool(self.fallbacks) or any(s.random or s.kind == "dropout" for s in self.steps)


def _canonical_names(model: nn.Module) -> dict:
    """id(parameter) -> its first name in model.named_parameters() (shared ones map to one name)."""
    return {id(p): n for n, p in model.named_parameters()}


def parameter_slots(module: nn.Module) -> dict:
    """path -> parameter for each module attribute that holds a parameter, each module once however
    many paths reach it: the keys under which ``torch.func.functional_call(module, ...,
    tie_weights=False)`` replaces every parameter exactly once. A module registered at two paths
    (``nn.Sequential(lin, act, lin)``) has one slot, reached by the first path; two modules that
    share a Parameter have one slot each, both to be given the same value.

    functional_call with all of named_parameters(remove_duplicate=False) raises under vmap (the two
    paths' values of one tied parameter are two tensors there), and with named_parameters()'s names
    and tie_weights=True it swaps such a module's attribute twice and restores it once, leaving the
    caller's tensor in the model (torch 2.13)."""
    return {(f"{mp}.{n}" if mp else n): p for mp, m in module.named_modules() for n, p in m._parameters.items()
            if p is not None}


def call_with(module: nn.Module, params: dict, args: tuple, buffers: dict | None = None, names: dict | None = None):
    """module(*args) with ``params`` (keyed by ``named_parameters()``' names; a shared parameter
    under its first name) in place of its parameters, and ``buffers`` (keyed by path) in place of
    those, through functional_call over parameter_slots' keys. names: slot path -> parameter name,
    from ``slot_names(module)``, if at hand."""
    from torch.func import functional_call

    names = slot_names(module) if names is None else names
    sub = {slot: params[n] for slot, n in names.items()}
    return functional_call(module, (sub, buffers) if buffers is not None else sub, args, tie_weights=False)


def slot_names(module: nn.Module) -> dict:
    """parameter_slots' path -> the name of its parameter in ``module.named_parameters()``."""
    canon = _canonical_names(module)
    return {slot: canon[id(p)] for slot, p in parameter_slots(module).items()}


def _as_held(v: torch.Tensor, p: torch.Tensor) -> bool:
    """Whether per-task value v [T, ...] is parameter p itself for every task (p expanded)."""
    return v.dim() > 0 and v.stride(0) == 0 and v.data_ptr() == p.data_ptr() and v.shape[1:] == p.shape \
        and v.stride()[1:] == p.stride()


def _vmap_step(module: nn.Module, path: str, canon: dict, reason: str) -> Step:
    from torch.func import functional_call, vmap

    # each attribute holding a parameter once (see parameter_slots), keyed for functional_call
    rel = {n: canon[id(p)] for n, p in parameter_slots(module).items()}
    norms = [(n + "." if n else "", m) for n, m in module.named_modules() if isinstance(m, _BATCH_NORMS)]
    unbatched = []  # the reason once vmap has no batching rule for an op of the module

    def call(params, xt):
        return functional_call(module, params, (xt,), tie_weights=False)

    slots = parameter_slots(module)

    def run(x, P):
        # a frozen parameter that every task holds as it is (not a per-step table's) is left to the
        # module: changed in place by the forward (statistics that F.batch_norm updates), vmap
        # raises instead of updating a per-task copy that is then dropped
        sub = {n: P[c] for n, c in rel.items() if slots[n].requires_grad or not _as_held(P[c], slots[n])}
        live = [(pre, bn) for pre, bn in norms if _tracks(bn)]
        if not live:
            if not unbatched:
                try:
                    return vmap(call, randomness="different")(sub, x)
                except RuntimeError as e:
                    if "Batching rule not implemented" not in str(e):
                        raise
                    unbatched.append(str(e).splitlines()[0])
            # an op vmap cannot batch (aten::lstm and the like): the module task by task, as the
            # per-task loop calls it, the outputs stacked
            outs = [call({n: v[t] for n, v in sub.items()}, _task(x, t)) for t in range(_tasks(x))]
            return torch.utils._pytree.tree_map(lambda *ts: torch.stack(ts), *outs)
        # BatchNorm in training mode with running statistics: each task updates a copy of them
        # (a batched buffer, which vmap allows), from which this pass's statistics are read back
        T = x.shape[0]
        copies, counts = {}, {}
        for pre, bn in live:
            copies[pre + "running_mean"] = bn.running_mean.detach().expand(T, -1).clone()
            copies[pre + "running_var"] = bn.running_var.detach().expand(T, -1).clone()
            # (a cumulative average reads the count as a number: one count for all tasks)
            if bn.momentum is None:
                counts[pre + "num_batches_tracked"] = bn.num_batches_tracked.clone()
            else:
                copies[pre + "num_batches_tracked"] = bn.num_batches_tracked.expand(T).clone()

        def one(params, buffers, xt):
            return functional_call(module, (params, {**buffers, **counts}), (xt,), tie_weights=False)
        out = vmap(one, randomness="different")(sub, copies, x)
        if _recording():
            for pre, bn in live:
                stats = []
                for key, r0 in (("running_mean", bn.running_mean), ("running_var", bn.running_var)):
                    got = copies[pre + key]  # (1 - m) r0 + m x, or r0 + (x - r0) / (count + 1)
                    if bn.momentum is None:
                        stats.append(r0 + (got - r0) * (bn.num_batches_tracked + 1).to(got.dtype))
                    else:
                        stats.append((got - (1 - bn.momentum) * r0) / bn.momentum)
                _record(bn, *stats)
        return out

    return Step(path, f"vmap({type(module).__name__})", run, fallback=reason)


def _tasks(x) -> int:
    """The task count of a value [T, ...] (or a tuple or list of them, as a module may return)."""
    return torch.utils._pytree.tree_leaves(x)[0].shape[0]


def _task(x, t: int):
    """Task t's part of a value [T, ...] (or of each tensor of a tuple or list of them)."""
    return torch.utils._pytree.tree_map(lambda v: v[t], x)


def _flatten_dims(m: nn.Flatten, path: str):
    if m.start_dim == 0 or (m.start_dim < 0 and m.end_dim >= 0):
        return None
    start = m.start_dim + 1 if m.start_dim > 0 else m.start_dim
    end = m.end_dim + 1 if m.end_dim >= 0 else m.end_dim
    return start, end


def _lower_leaf(m: nn.Module, path: str, canon: dict, nxt: nn.Module | None):
    """(Step, consumed_next) for a leaf module, or (None, reason) when it has no lowering."""
    name = lambda p: canon[id(p)]  # noqa: E731
    if isinstance(m, nn.Linear):
        act, slope, consumed = None, 0.01, False
        if nxt is not None and type(nxt) in _ACT_MODULES:
            act, consumed = _ACT_MODULES[type(nxt)], True
            slope = getattr(nxt, "negative_slope", 0.01)
        w, b = name(m.weight), (name(m.bias) if m.bias is not None else None)

        def run(x, P, w=w, b=b, act=act, slope=slope):
            shape = x.shape
            y = ops.batched_linear(x.reshape(shape[0], -1, shape[-1]), P[w], P[b] if b else None, act, slope)
            return y.reshape(*shape[:-1], y.shape[-1])
        return Step(path, "batched_linear" + (f"+{act}" if act else ""), run), consumed
    if isinstance(m, nn.Conv2d):
        if m.padding_mode != "zeros":
            return None, f"Conv2d padding_mode={m.padding_mode!r} (only 'zeros' is lowered)"
        w, b = name(m.weight), (name(m.bias) if m.bias is not None else None)

        def run(x, P, m=m, w=w, b=b):
            return ops.batched_conv2d(x, P[w], P[b] if b else None, m.stride, m.padding, m.dilation, m.groups)
        return Step(path, "batched_conv2d", run, spec=dict(w=w, b=b, stride=m.stride, padding=m.padding,
                                                           dilation=m.dilation, groups=m.groups)), False
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        w = name(m.weight) if m.weight is not None else None
        b = name(m.bias) if m.bias is not None else None

        def run(x, P, m=m, w=w, b=b):
            _check_bn_input(m, x, path)
            use_running = (not m.training) and m.track_running_stats and m.running_mean is not None
            stats = _statistics_of(m)[1] if use_running else None
            made = [] if not use_running and _recording() and _tracks(m) else None  # (from the same kernel)
            y = ops.batched_batch_norm(x, P[w] if w else None, P[b] if b else None, m.eps,
                                       stats.running_mean if use_running else None,
                                       stats.running_var if use_running else None, batch_stats=made)
            if made:
                _record(m, *made[0])
            return y
        return Step(path, "batched_batch_norm", run, spec=dict(module=m, w=w, b=b)), False
    if isinstance(m, nn.Conv1d):  # as a Conv2d over [C, 1, L]
        if m.padding_mode != "zeros":
            return None, f"Conv1d padding_mode={m.padding_mode!r} (only 'zeros' is lowered)"
        w, b = name(m.weight), (name(m.bias) if m.bias is not None else None)
        pad = m.padding if isinstance(m.padding, str) else (0, m.padding[0])

        def run(x, P, m=m, w=w, b=b, pad=pad):
            if x.dim() != 4:
                raise ValueError(f"Conv1d at {path!r}: expected input [T, N, C, L], got {tuple(x.shape)}")
            y = ops.batched_conv2d(x.unsqueeze(-2), P[w].unsqueeze(-2), P[b] if b else None, (1, m.stride[0]),
                                   pad, (1, m.dilation[0]), m.groups)
            return y.squeeze(-2)
        return Step(path, "batched_conv2d (1d)", run), False
    if isinstance(m, nn.LayerNorm):
        shape = tuple(m.normalized_shape)
        w = name(m.weight) if m.weight is not None else None
        b = name(m.bias) if m.bias is not None else None

        def run(x, P, m=m, w=w, b=b, shape=shape):
            if x.dim() < 2 + len(shape) or tuple(x.shape[x.dim() - len(shape):]) != shape:
                raise ValueError(f"LayerNorm at {path!r}: expected input [T, N, ..., {', '.join(map(str, shape))}], "
                                 f"got {tuple(x.shape)}")
            y = torch.nn.functional.layer_norm(x, shape, None, None, m.eps)
            return _per_task_affine(y, P[w] if w else None, P[b] if b else None)
        return Step(path, "layer_norm", run), False
    if isinstance(m, (nn.InstanceNorm1d, nn.InstanceNorm2d)):  # GroupNorm with a group a channel
        if m.track_running_stats:
            return None, f"{type(m).__name__}(track_running_stats=True) (running statistics) is not lowered"
        w = name(m.weight) if m.weight is not None else None
        b = name(m.bias) if m.bias is not None else None
        rank = 3 if isinstance(m, nn.InstanceNorm1d) else 4

        def run(x, P, m=m, w=w, b=b, rank=rank):
            kind, C = type(m).__name__, x.shape[2] if x.dim() > 2 else None
            want = "[T, N, C, L]" if rank == 3 else "[T, N, C, H, W]"
            if x.dim() - 1 != rank or (m.affine and C != m.num_features):
                raise ValueError(f"{kind} at {path!r}: expected input {want}"
                                 f"{f' with C={m.num_features}' if m.affine else ''}, got {tuple(x.shape)}")
            if math.prod(x.shape[3:]) == 1:
                raise ValueError(f"{kind} at {path!r}: expected more than 1 spatial element, got input "
                                 f"{tuple(x.shape)}")
            return _group_norm(x, C, m.eps, P[w] if w else None, P[b] if b else None)
        return Step(path, "instance_norm", run), False
    if isinstance(m, nn.GroupNorm):
        w = name(m.weight) if m.weight is not None else None
        b = name(m.bias) if m.bias is not None else None

        def run(x, P, m=m, w=w, b=b):
            if x.dim() < 3 or x.shape[2] != m.num_channels:
                raise ValueError(f"GroupNorm at {path!r}: expected input [T, N, C={m.num_channels}, ...], "
                                 f"got {tuple(x.shape)}")
            return _group_norm(x, m.num_groups, m.eps, P[w] if w else None, P[b] if b else None)
        return Step(path, "group_norm", run), False
    if isinstance(m, nn.Embedding):  # each task's rows of its own table: W[t][x[t]]
        if m.max_norm is not None or m.scale_grad_by_freq or m.sparse:
            return None, "Embedding with max_norm, scale_grad_by_freq or sparse is not lowered"
        w = name(m.weight)

        def run(x, P, m=m, w=w):
            if x.dtype not in (torch.int32, torch.int64) or x.dim() < 2:
                raise ValueError(f"Embedding at {path!r}: expected integer indices [T, N, ...], got {tuple(x.shape)} "
                                 f"of {x.dtype}")
            table = P[w]
            # (checked on a CPU only: on CUDA, as F.embedding, without the device sync it costs)
            if x.device.type == "cpu" and x.numel() and (int(x.min()) < 0 or int(x.max()) >= m.num_embeddings):
                raise IndexError(f"Embedding at {path!r}: indices must be in [0, {m.num_embeddings}), got "
                                 f"[{int(x.min())}, {int(x.max())}]")
            # F.embedding of the tasks' tables as one [T * V, D] table, each task's ids offset to its own
            T, V = x.shape[0], m.num_embeddings
            offset = torch.arange(0, T * V, V, device=x.device, dtype=x.dtype).view(T, *(1,) * (x.dim() - 1))
            rows = torch.nn.functional.embedding(x + offset, table.reshape(T * V, -1))
            if m.padding_idx is not None:  # (its row read as it is, with no gradient, as F.embedding's)
                rows = torch.where((x == m.padding_idx).unsqueeze(-1), rows.detach(), rows)
            return rows
        return Step(path, "embedding", run), False
    if isinstance(m, nn.PReLU):  # x where x > 0, else a x: per-task slopes a [T, 1] or [T, C] (channel dim 1)
        w = name(m.weight)

        def run(x, P, w=w, n=m.num_parameters):
            a = P[w]
            if n > 1 and (x.dim() < 3 or x.shape[2] != n):
                raise ValueError(f"PReLU at {path!r}: {n} slopes need input [T, N, C={n}, ...], got {tuple(x.shape)}")
            view = (a.shape[0], 1, n) + (1,) * (x.dim() - 3) if n > 1 else (a.shape[0],) + (1,) * (x.dim() - 1)
            return torch.where(x > 0, x, a.reshape(view) * x)
        return Step(path, "prelu", run), False
    if type(m) in _ACT_MODULES or isinstance(m, (nn.Identity,) + _ELEMENTWISE):
        return Step(path, type(m).__name__, lambda x, P, m=m: m(x)), False
    if isinstance(m, (nn.Softmax, nn.LogSoftmax)):
        if m.dim is None:
            return None, f"{type(m).__name__}(dim=None) picks its dim from the input's rank"
        dim = m.dim + 1 if m.dim >= 0 else m.dim  # (a sample's dim d is dim d + 1 of [T, N, ...])
        fn = torch.softmax if isinstance(m, nn.Softmax) else torch.log_softmax
        return Step(path, type(m).__name__, lambda x, P, dim=dim, fn=fn: fn(x, dim)), False
    if isinstance(m, _PER_CHANNEL):
        if getattr(m, "return_indices", False):
            return None, f"{type(m).__name__}(return_indices=True)"

        return Step(path, type(m).__name__, lambda x, P, m=m: per_sample_2d(x, m)), False
    if isinstance(m, nn.Dropout):
        # elementwise, so one draw over [T, N, ...] is each task's own draw over [N, ...]; never in
        # place (the input may be an activation a backward reads)
        return Step(path, "dropout", lambda x, P, m=m: torch.nn.functional.dropout(x, m.p, m.training)), False
    if isinstance(m, RowsOf):  # each task's x.view(-1, D): its rows of D, as one reshape of [T, ...]
        return Step(path, "flatten", lambda x, P, d=m.width: x.reshape(x.shape[0], -1, d)), False
    if isinstance(m, nn.Flatten):
        dims = _flatten_dims(m, path)
        if dims is None:
            return None, f"Flatten(start_dim={m.start_dim}, end_dim={m.end_dim}) would mix samples"
        return Step(path, "flatten", lambda x, P, d=dims: x.flatten(*d)), False
    return None, f"{type(m).__name__} has no batched lowering"


def _per_task_affine(y, w, b):
    """y * w + b with per-task w, b [T, *shape] over y's trailing dims ([T, N, ..., *shape])."""
    if w is None and b is None:
        return y
    ref = w if w is not None else b
    view = (ref.shape[0],) + (1,) * (y.dim() - ref.dim()) + tuple(ref.shape[1:])
    if w is not None and b is not None:
        return torch.addcmul(b.view(view), y, w.view(view))
    return y * w.view(view) if w is not None else y + b.view(view)


def _group_norm(x, groups, eps, w=None, b=None):
    """F.group_norm of x [T, N, C, ...] with per-task affine weights w, b [T, C] (or None), each
    sample alone: run on [N, T * C, ...] with T * groups groups (each task's channels a whole number
    of groups) and the weights as [T * C], so that PyTorch's kernel applies them. The task-inner
    layout that the batched ops return ([N, T, C, ...] in memory) is taken without a copy and
    returned."""
    T, N = x.shape[:2]
    flat = lambda t: None if t is None else t.reshape(-1)  # noqa: E731
    y = torch.nn.functional.group_norm(x.transpose(0, 1).reshape(N, -1, *x.shape[3:]), T * groups, flat(w), flat(b),
                                       eps)
    return y.view(N, T, *x.shape[2:]).transpose(0, 1)


def _check_bn_input(bn, x, path: str) -> None:
    """A BatchNorm step's input [T, N, C, ...] against what the module takes (BatchNorm1d a task's
    [N, C] or [N, C, L], BatchNorm2d [N, C, H, W], F.batch_norm's any rank from 2) and, with batch
    statistics, more than one value a channel: as the module's own forward checks, with its path."""
    rank = x.dim() - 1
    kind = type(bn).__name__
    if getattr(bn, "any_rank", False):
        ok, want = rank >= 2, "[T, N, C, ...]"
    elif isinstance(bn, nn.BatchNorm2d):
        ok, want = rank == 4, "[T, N, C, H, W]"
    else:
        ok, want = rank in (2, 3), "[T, N, C] or [T, N, C, L]"
    if not ok:
        raise ValueError(f"{kind} at {path!r}: expected input {want} (a task's {rank}-D batch is not what {kind} "
                         f"takes), got {tuple(x.shape)}")
    if (bn.training or not bn.track_running_stats or bn.running_mean is None) and x.shape[1] * math.prod(
            x.shape[3:]) == 1:
        raise ValueError(f"{kind} at {path!r}: expected more than 1 value per channel with batch statistics, got "
                         f"input {tuple(x.shape)} (one sample of size 1 a task)")


def _is_bn_relu_pool(mods: list) -> bool:
    """BatchNorm2d -> ReLU -> MaxPool2d(2) (stride 2, no padding), the tail of a conv4 block."""
    if len(mods) < 3:
        return False
    bn, act, pool = mods[:3]
    pair = lambda v, want: v == want or v == (want, want)  # noqa: E731
    return (isinstance(bn, nn.BatchNorm2d) and type(act) is nn.ReLU and type(pool) is nn.MaxPool2d
            and pair(pool.kernel_size, 2) and pair(pool.stride, 2) and pair(pool.padding, 0)
            and pair(pool.dilation, 1) and not pool.ceil_mode and not pool.return_indices)


def _bn_relu_pool_step(mods: list, path: str, canon: dict) -> Step:
    """One step for BatchNorm2d -> ReLU -> MaxPool2d(2): the fused bn_relu_pool op when the
    BatchNorm uses batch statistics, else the three steps one after the other (eval mode with
    running statistics)."""
    bn = mods[0]
    parts = [_lower_leaf(m, path, canon, None)[0] for m in mods]
    w = canon[id(bn.weight)] if bn.weight is not None else None
    b = canon[id(bn.bias)] if bn.bias is not None else None

    def batch_stats():
        return bn.training or not bn.track_running_stats or bn.running_mean is None

    def run(x, P):
        _check_bn_input(bn, x, path)
        if not batch_stats():
            for part in parts:
                x = part.run(x, P)
            return x
        made = [] if _recording() and _tracks(bn) else None  # this pass's statistics, from the kernel's
        y = ops.bn_relu_pool(x, P[w] if w else None, P[b] if b else None, bn.eps, batch_stats=made)
        if made:
            _record(bn, *made[0])
        return y
    return Step(path, "bn_relu_pool", run, spec=dict(w=w, b=b, eps=bn.eps, batch_stats=batch_stats, module=bn))


def _lower_seq(seq: nn.Sequential, prefix: str, canon: dict, strict: bool, steps: list, leaves: list):
    # every entry, as nn.Sequential.forward runs them (named_children() lists a module used twice
    # once only, which would drop its second application)
    _lower_entries([(f"{prefix}{k}", m) for k, m in seq._modules.items() if m is not None], canon, strict, steps,
                   leaves)


def _lower_entries(mods: list, canon: dict, strict: bool, steps: list, leaves: list):
    """Lowers a chain of entries (path, module) applied one after the other, as a Sequential's
    children or a traced forward's modules (where an entry may also be a ready Step: the
    forward's own code between modules, or a module that stands for a function such as F.relu,
    marked by _forward.Synthetic)."""
    from ._forward import Synthetic

    def module_at(j):
        m = mods[j][1] if j < len(mods) else None
        return m.module if isinstance(m, Synthetic) else m if isinstance(m, nn.Module) else None

    i = 0
    while i < len(mods):
        path, m = mods[i]
        if isinstance(m, Step):
            steps.append(m)
            i += 1
            continue
        synthetic = isinstance(m, Synthetic)
        m = module_at(i)
        why = _not_plain(m)
        if traceable(m):  # the module's own forward: traced into the modules and code it runs
            from ._forward import forward_entries
            entries, reason = forward_entries(m, path + "." if path else "", canon, strict)
            if entries is None:
                why = reason
            else:
                _lower_entries(entries, canon, strict, steps, leaves)
                i += 1
                continue
        if why is not None:  # run as a whole through the vmap fallback, as its own call would
            if strict:
                raise UnsupportedModule(f"strict lowering: module {path!r} ({type(m).__name__}): {why}")
            steps.append(_vmap_step(m, path, canon, why))
            leaves.append(m)
            i += 1
            continue
        if isinstance(m, nn.Sequential):
            _lower_seq(m, path + "." if path else "", canon, strict, steps, leaves)
            i += 1
            continue
        group = [module_at(j) for j in range(i, min(i + 3, len(mods)))]
        if (None not in group and _is_bn_relu_pool(group)
                and all(_not_plain(mod) is None for mod in group[1:])):
            step = _bn_relu_pool_step(group, path, canon)
            if synthetic:  # (F.batch_norm's module: the model's Parameters it holds)
                step.synthetic = True
                step.params = frozenset(canon[id(p)] for p in m.parameters())
            steps.append(step)
            leaves.extend(group)
            i += 3
            continue
        nxt = module_at(i + 1)
        if nxt is not None and _not_plain(nxt) is not None:
            nxt = None  # (not fused into this step: it runs as its own call would)
        step, extra = _lower_leaf(m, path, canon, nxt)
        if step is None:
            if strict:
                raise UnsupportedModule(f"strict lowering: module {path!r} ({type(m).__name__}): {extra}")
            step = _vmap_step(m, path, canon, extra)
            extra = False
        step.synthetic = synthetic
        if synthetic:  # (a module standing for F.linear and the like: the model's Parameters it holds)
            step.params = frozenset(canon[id(p)] for mod in (m, nxt if extra else None) if mod is not None
                                    for p in mod.parameters())
        steps.append(step)
        leaves.append(m)
        if extra:
            leaves.append(nxt)
        i += 2 if extra else 1


def _mlp_activation(m: nn.Module) -> str | None:
    """The fused MLP kernel's name of activation module m, or None where it has none."""
    if type(m) in _ACT_MODULES:
        return _ACT_MODULES[type(m)]
    if type(m) is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(m.approximate)
    return "silu" if type(m) is nn.SiLU else None


def _mlp_spec(model: nn.Module, leaves: list, steps: list, canon: dict):
    if any(s.fallback for s in steps):
        return None, "a module falls back to vmap"
    code = [s for s in steps if s.synthetic and s.kind.startswith(("code(", "graph("))]
    if code:
        return None, f"its forward runs code between the modules ({code[0].kind})"
    names, acts, slopes, dropouts = [], [], set(), []
    first = leaves[0] if leaves else None
    flatten_input = (first.width if isinstance(first, RowsOf) else
                     -1 if isinstance(first, nn.Flatten) and _flatten_dims(first, "") == (2, -1) else 0)
    for m in leaves[1:] if flatten_input else leaves:
        if isinstance(m, nn.Linear):
            if m.bias is None:
                return None, "a Linear layer has no bias"
            names += [canon[id(m.weight)], canon[id(m.bias)]]
            acts.append(None)
        elif _mlp_activation(m) is not None:
            if not acts or acts[-1] is not None:
                return None, "an activation does not directly follow a Linear layer"
            acts[-1] = _mlp_activation(m)
            if isinstance(m, nn.LeakyReLU):
                slopes.add(float(m.negative_slope))
        elif isinstance(m, nn.Identity):
            continue
        elif isinstance(m, nn.Dropout):  # the identity in eval mode or at p=0 (checked at each call)
            dropouts.append(m)
        else:
            return None, f"{type(m).__name__} is not part of an MLP"
    if not names:
        return None, "no Linear layer"
    params = dict(model.named_parameters())
    if len(set(names)) != len(names) or len(names) != len(params):
        return None, "parameters are shared between layers"
    if any(not params[n].requires_grad for n in names):
        return None, "some parameters do not require grad"
    if len(slopes) > 1:
        return None, "LeakyReLU layers use different negative slopes"
    return (MLPSpec(names, acts, slopes.pop() if slopes else 0.01, tuple(dropouts), flatten_input),
            "MLP of Linear layers" + (" after a Flatten of each sample" if flatten_input else ""))


_cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def uncompiled(model):
    """The module that ``torch.compile(module)`` wrapped (its OptimizedModule's ``_orig_mod``), else
    ``model``. fastmeta runs a module with per-task or cloned parameters, which a compiled wrapper's
    graph does not take; the original module has the same parameters and computes the same."""
    while type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
        model = model._orig_mod
    return model


def _structure(model: nn.Module) -> tuple:
    """What a program depends on: each module's class (a parametrization changes it), hooks (its
    own forward and backward ones, and how many global ones there are) and entries (a module at
    several places counted at each), and the parameters."""
    return (tuple((id(m), type(m), tuple(m._forward_hooks), tuple(m._forward_pre_hooks), tuple(m._backward_hooks),
                   tuple(m._backward_pre_hooks), tuple(map(id, m._modules.values()))) for m in model.modules()),
            tuple(id(p) for p in model.parameters()), global_hooks())


def lower(model: nn.Module, strict: bool = False) -> Program:
    """The batched program of ``model``, cached per module while its structure (modules, their
    classes, entries and forward hooks, parameters) stays the same."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    model = uncompiled(model)
    _no_backward_hooks(model)
    key = (strict, _structure(model), tracing_on(), tuple(_AS_BASE.items()))
    hit = _cache.get(model)
    if hit is not None and hit[0] == key and (not hit[2] or hit[3] == _attributes(model, hit[2])):
        return hit[1]
    canon = _canonical_names(model)
    steps, leaves = [], []
    plain = _not_plain(model)
    entries = why = None
    if isinstance(model, nn.Sequential) and plain is None:
        entries = [(k, m) for k, m in model._modules.items() if m is not None]
    elif traceable(model):  # the forward traced into the modules and code it runs
        from ._forward import forward_entries
        entries, why = forward_entries(model, "", canon, strict)
    if entries is not None:
        _lower_entries(entries, canon, strict, steps, leaves)
    else:
        step, reason = None, why or plain or (f"{type(model).__name__} has a custom forward (only nn.Sequential "
                                              "containers are lowered module by module; FASTMETA_TRACE=0)")
        if not list(model.children()) and plain is None:
            step, reason = _lower_leaf(model, "", canon, None)
        if step is None:
            if strict:
                raise UnsupportedModule(f"strict lowering: model ({type(model).__name__}): {reason}")
            step = _vmap_step(model, "", canon, reason)
        else:
            leaves.append(model)
        steps.append(step)
    for s in steps:
        if not s.synthetic:
            module = model.get_submodule(s.path) if s.path else model
            s.params = frozenset(canon[id(p)] for p in module.parameters())
    mlp, why = _mlp_spec(model, leaves, steps, canon)
    # (with the modules that stand for a traced forward's F.batch_norm, holding its tensors)
    norms = [m for m in list(model.modules()) + leaves if isinstance(m, _BATCH_NORMS)]
    norms += [m for s in steps if s.spec and "batch_norms" in s.spec for m in s.spec["batch_norms"]]
    norms = list({id(m): m for m in norms}.values())
    prog = Program(steps, list(canon.values()), mlp, why, norms)
    # a traced forward ran its Python code once, with the attributes of now (training mode, flags
    # it may branch on): lowered again when any changes
    # (weak references: the cache's value must not hold its key, the model, alive)
    # (none where the model runs whole through the vmap fallback: its forward runs at every call)
    traced = [weakref.ref(m) for m in model.modules() if traceable(m)] if entries is not None else []
    _cache[model] = (key, prog, traced, _attributes(model, traced) if traced else None)
    return prog


_PLAIN = (bool, int, float, str, type(None))


def _attributes(model: nn.Module, traced: list) -> tuple:
    """The plain-valued attributes (numbers, strings, flags, tuples of them) of the modules whose
    forward was traced, and every module's training mode."""
    return (tuple(tuple((k, v) for k, v in vars(m).items()
                        if type(v) in _PLAIN or (type(v) is tuple and all(type(e) in _PLAIN for e in v)))
                  for m in (r() for r in traced) if m is not None),
            tuple(m.training for m in model.modules()))


def explain(model: nn.Module) -> str:
    """A human-readable account of how fastmeta runs ``model`` (or a BatchedMAML's model, with what
    its inner loop adapts): each module's path and why."""
    from .backend import BackendUnavailable, requested, select
    from .batched import BatchedMAML

    adapted = meta = None
    if isinstance(model, BatchedMAML):
        meta, model = model, model.model
        meta._check_structure()
        meta._sync_trainable()
        adapted = list(meta._adapt_names)
    try:
        prog = lower(model)
    except UnsupportedModule as e:  # backward hooks: no plan runs the model as a loop would
        return (f"fastmeta plan for {type(uncompiled(model)).__name__}: none, BatchedMAML raises "
                f"UnsupportedModule:\n  {e}")
    lines = [f"fastmeta plan for {type(model).__name__}:"]
    if uncompiled(model) is not model:
        model = uncompiled(model)
        lines = [f"fastmeta plan for {type(model).__name__} (the module inside torch.compile's wrapper: "
                 "fastmeta runs it with per-task parameters, its own kernels in place of the compiled graph):"]
    for s in prog.steps:
        where = s.path or "<model>"
        if s.fallback:
            lines.append(f"  {where:<24} -> {s.kind}  [torch.func fallback: {s.fallback}]")
        else:
            lines.append(f"  {where:<24} -> {s.kind}")
    if prog.has_conv:
        lines.append(f"  on CPU: tasks pass through the conv program one at a time (activations stay in cache), "
                     f"all at once where a task's input is small (at most {CPU_SMALL_PASS} elements: a few-shot "
                     "support set)")
    def backend_of(op):  # what the op runs on for the model's device and dtype
        try:
            p = next(model.parameters())
            be = select(op, p.device.type)
        except (StopIteration, BackendUnavailable) as e:
            return f"unavailable ({e})"
        # (fastmeta._C's convolution ops call ATen's, which take any dtype; the other kernels do not)
        aten = op == "batched_conv2d" and be in ("cpp", "cuda")
        if be != "torch" and not aten and p.dtype not in _checks.KERNEL_DTYPES:
            return f"torch: the kernels compute in float32 and float64, the model is {str(p.dtype)[6:]}"
        return be
    if prog.has_conv:
        be = backend_of("batched_conv2d")
        tuned = ""
        if be in ("cpp", "cuda"):
            from .ops.batched_conv2d import autotune_on, tunes_backends
            p0 = next(model.parameters())
            if autotune_on(p0.device.type):
                tuned = "; timed shape by shape (FASTMETA_CONV_AUTOTUNE): one grouped call or a call a task"
                if tunes_backends(p0.device.type, p0.dtype):
                    tuned += ", or triton's kernels where faster"
        from .ops.batched_conv2d import get_conv_precision
        p0 = next(model.parameters(), None)
        if get_conv_precision() == "tf32x3" and p0 is not None and p0.dtype == torch.float32:
            tuned += ("; float32 products as three TF32 products (set_conv_precision('tf32x3'))" if be != "torch"
                      else "; set_conv_precision('tf32x3') does not apply to the torch backend")
        lines.append(f"  batched_conv2d: the convolutions of all tasks' weights at once (backend {be}{tuned})")
    if any(s.kind == "bn_relu_pool" for s in prog.steps):
        be = backend_of("bn_relu_pool")
        closed = ", its second-order derivative in closed form" if be in ("cpp", "cuda", "triton") else ""
        lines.append(f"  bn_relu_pool: BatchNorm2d (batch statistics) -> ReLU -> MaxPool2d(2) as one op "
                     f"(backend {be}{closed})")
    tracked = [bn for bn in prog.batch_norms if _tracks(bn)]
    if tracked:
        lines.append(f"  BatchNorm running statistics ({len(tracked)} module(s) in training mode with "
                     "track_running_stats): updated by each call as the per-task loop's passes would update them")
    if prog.recomputable(0):
        lines.append("  BatchedMAML(recompute=True): the first block as one op (conv_bn_relu_pool) whose "
                     "convolution output is recomputed in each backward instead of kept; where the inner "
                     "steps' graphs are not kept, the query's later blocks keep only their inputs too")
    partial = adapted is not None and len(adapted) != len(prog.names)
    if adapted is not None:
        shared = [n for n, p in model.named_parameters() if p.requires_grad and n not in adapted]
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        lines.append(f"  inner loop adapts: {', '.join(adapted) or 'nothing'}"
                     + (" (inner_params)" if meta._inner is not None else ""))
        if shared:
            lines.append(f"  shared by the tasks, meta-learned: {', '.join(shared)} (their effect on the inner "
                         "steps is in the second-order meta-gradient)")
        if frozen:
            lines.append(f"  frozen (requires_grad=False), neither adapted nor meta-learned: {', '.join(frozen)}")
        kind = meta._lr_kind
        if kind is not None:
            lines.append("  inner rates: learned, " + {
                "per_element": "one a parameter entry (Meta-SGD)",
                "per_layer": "one a parameter tensor (learn_inner_lr='per_layer')",
                "per_layer_step": "one a parameter tensor and inner step (learn_inner_lr='per_layer_step')"}[kind])
        if meta.step_bn is not None:
            paths = list(dict.fromkeys(s.path for s in prog.steps if s.kind in BN_KINDS))
            lines.append(f"  per-step BatchNorm (per_step_bn): {', '.join(paths)} run each inner step's passes (and "
                         "the query loss after it) with that step's weight, bias and running statistics "
                         "(meta-learned, not adapted; the modules' own are not read)")
        weights = meta.step_loss_weights
        if weights is not None:
            lines.append(f"  meta-loss: the query losses after each inner step weighted by step_loss_weights "
                         f"{list(weights)} (a step of weight 0 is not evaluated)")
        # (the fused kernel adapts every parameter; per-step rates and the multi-step loss run on
        # some of its kernels: ops.runs_step_settings)
        from .ops.mlp_inner_loop import CUDA_MAX_WEIGHTED_STEPS, STEP_BACKENDS, runs_step_settings
        be = backend_of("mlp_inner_loop")
        on_steps = (not be.isidentifier()  # (a reason: the batched ops run it whatever the settings)
                    or runs_step_settings(be, meta.inner_steps, kind == "per_layer_step", weights))
        unfused = ("here some are not adapted" if partial else None if on_steps else
                   f"its {be} kernel has the same rates at every step" if be not in STEP_BACKENDS and
                   kind == "per_layer_step" else
                   f"its {be} kernel makes the last step's query loss only" if be not in STEP_BACKENDS else
                   f"its {be} kernel holds the step weights of at most {CUDA_MAX_WEIGHTED_STEPS} steps, here "
                   f"{meta.inner_steps}")
        k = prog.invariant_prefix(set(adapted), batch_norm=meta.step_bn is None)
        if 0 < k and meta.inner_steps > 0 and (unfused or prog.mlp is None):  # (else the fused kernel runs)
            paths = ", ".join(s.path or "<model>" for s in prog.steps[:k])
            lines.append(f"  {paths}: read no adapted parameter, run once a call on the support set (not once "
                         "an inner step)"
                         + ("; in second order under checkpoint_steps, once a step" if meta.checkpoint_steps else "")
                         + ("; once on the query set for all the step losses" if weights is not None else ""))
    else:
        unfused = None
    if prog.mlp is not None and unfused:
        lines.append(f"  whole inner loop: step by step on the batched ops (the fused mlp_inner_loop op adapts every "
                     f"parameter; per-step rates and the multi-step loss run on its {', '.join(STEP_BACKENDS)} "
                     f"backends; {unfused})")
    elif prog.mlp is not None and backend_of("mlp_inner_loop").startswith("torch:"):
        lines.append(f"  whole inner loop: step by step on the batched ops ({backend_of('mlp_inner_loop')[7:]})")
    elif prog.mlp is not None and backend_of("mlp_inner_loop") == "torch":  # (the op's reference is the same)
        lines.append("  whole inner loop: step by step on the batched ops (backend torch)")
    elif prog.mlp is not None:
        be = backend_of("mlp_inner_loop")
        few = ""
        if be == "cpp" and requested("mlp_inner_loop") == "auto":
            from .ops.mlp_inner_loop import cpu_lanes
            p = next(model.parameters())
            few = (f"; a meta-batch that fills a small part of its {cpu_lanes(p.dtype)} SIMD lanes (tasks) "
                   "and whose weights are large, where the batched ops are expected 1.5x faster, takes them "
                   "instead (BatchedMAML(backend='cpp') keeps the kernel)")
        lines.append(f"  whole inner loop: fused mlp_inner_loop op (backend {be}) for "
                     "loss 'mse' or 'cross_entropy'"
                     + (", with each step's rates" if meta is not None and meta._lr_kind == "per_layer_step" else "")
                     + (", the multi-step loss" if meta is not None and meta.step_loss_weights is not None else "")
                     + ("; while a Dropout drops (training mode, p > 0), step by step on the batched ops"
                        if prog.mlp.dropouts else "") + few)
    else:
        lines.append(f"  whole inner loop: step by step ({prog.mlp_reason})")
        lines.append("  memory: BatchedMAML keeps every task's autograd graph until the backward; "
                     "BatchedMAML(task_chunk=N) keeps N tasks' at a time, BatchedMAML(checkpoint_steps=True) "
                     "one inner step's graph at a time, recomputed in the backward (same result)")
    if meta is None:
        from .maml import describe_forward
        lines.append(f"  fastmeta.MAML / MetaSGD learners' forward: {describe_forward(model)}")
    lines.append("  backends: the auto choice above; fastmeta.tune(meta, xs, ys, xq, yq) times them (and per-op "
                 "mixes) on this device and keeps the fastest for that BatchedMAML")
    return "\n".join(lines)
