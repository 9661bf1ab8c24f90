"""The one timing harness behind ``python -m fastmeta.bench``, the pytest-benchmark suites in
benchmarks/ and ``python -m fastmeta.profile``: workloads, providers and a synchronizing timer.

A provider turns a workload into ``step() -> list[Tensor]``: one meta-iteration (inner loops of all
tasks, query losses, meta-gradient), returning the meta-gradient of the model's parameters (the
mean over tasks of each task's query-loss gradient). Providers:

  fastmeta[-<backend>]  BatchedMAML (backend auto or forced)
  maml[-<backend>]      fastmeta.MAML driven like learn2learn (clone/adapt per task); an MLP's
                        forward is ops.mlp_forward, a conv net's the BatchedMAML program on one task
                        (maml-torch: the layers as torch ops / the module's call)
  maml_pertensor        the same loop with learn2learn's per-tensor Python update step and the
                        module's own call as the forward
  metasgd[-<backend>]   fastmeta.MetaSGD in the same loop (every rate starts at the inner lr, so
                        its meta-gradient of the model's parameters is the loop's)
  loop                  the naive per-task loop with autograd.grad(create_graph=True)
  l2l, higher           learn2learn / higher loops, when installed
  vmap                  torch.func vmap over tasks of grad(task's query loss after grad-based
                        inner steps), then the mean of the per-task meta-gradients
  compile               torch.compile(vmap(grad)) of the same function
  vmap_graph            the vmap meta-step captured in a CUDA graph (CUDA only)
  vmap_gv, compile_gv, vmap_graph_gv
                        the other way round, grad of the vmapped mean query loss (functorch's MAML
                        example's order: autograd outside the vmap): through BatchNorm in training
                        mode its second-order meta-gradient is wrong (see _vmap_meta_grad_fn)
  fastmeta_tuned        BatchedMAML after fastmeta.tune (value_and_grad on the backends it chose)
  fastmeta_vg_rc, fastmeta_graph_rc
                        value_and_grad / graphed with BatchedMAML(recompute=True)
  fastmeta_vg_ck, fastmeta_graph_ck (and _rc_ck)
                        the same with BatchedMAML(checkpoint_steps=True) (and recompute=True)
"""
from __future__ import annotations

import contextlib
import functools
import dataclasses
import importlib.util
import os
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ._phases import phase


# ---------------------------------------------------------------------------------------------
# Workloads (Finn et al. 2017 shapes)
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Workload:
    name: str
    model: nn.Module
    xs: torch.Tensor
    ys: torch.Tensor
    xq: torch.Tensor
    yq: torch.Tensor
    inner_lr: float
    steps: int
    loss: str

    @property
    def tasks(self):
        return self.xs.shape[0]

    def loss_fn(self, pred, target):
        if self.loss == "mse":
            return F.mse_loss(pred, target)
        return F.cross_entropy(pred, target)


def sine_mlp(hidden=40):
    return nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 1))


def conv4(in_ch, channels, ways, image):
    blocks, c = [], in_ch
    for _ in range(4):
        blocks += [nn.Conv2d(c, channels, 3, padding=1), nn.BatchNorm2d(channels, track_running_stats=False),
                   nn.ReLU(), nn.MaxPool2d(2)]
        c = channels
    side = image
    for _ in range(4):
        side //= 2
    return nn.Sequential(*blocks, nn.Flatten(), nn.Linear(channels * side * side, ways))


def sine_tasks(T: int, generator: torch.Generator, K: int = 10, Q: int = 10):
    """T sine regression tasks (Finn et al. 2017): amplitude in [0.1, 5], phase in [0, pi],
    x uniform in [-5, 5]; returns xs [T, K, 1], ys, xq [T, Q, 1], yq."""
    amp = torch.rand(T, 1, 1, generator=generator) * 4.9 + 0.1
    phase = torch.rand(T, 1, 1, generator=generator) * torch.pi
    xs = torch.rand(T, K, 1, generator=generator) * 10 - 5
    xq = torch.rand(T, Q, 1, generator=generator) * 10 - 5
    return xs, amp * torch.sin(xs - phase), xq, amp * torch.sin(xq - phase)


def make_workload(name: str, tasks: int | None = None, steps: int | None = None, device="cpu",
                  dtype=torch.float32, seed: int = 0, hidden: int = 40) -> Workload:
    """sine (1-40-40-1, K=Q=10, T=25, S=5, lr 0.01), omniglot (conv4 64ch 1x28x28 5-way 1-shot,
    15 query/class, T=32, S=1, lr 0.4) or miniimagenet (conv4 32ch 3x84x84 5-way 5-shot, 15 query,
    T=32, S=5, lr 0.01). Data are random draws of the right shapes (sine: real sine tasks)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if name == "sine":
        T, S = tasks or 25, 5 if steps is None else steps
        xs, ys, xq, yq = sine_tasks(T, g)
        model, lr, loss = sine_mlp(hidden), 0.01, "mse"
    elif name in ("omniglot", "miniimagenet"):
        if name == "omniglot":
            T, S, C, side, ch, shots, lr = tasks or 32, 1 if steps is None else steps, 1, 28, 64, 1, 0.4
        else:
            T, S, C, side, ch, shots, lr = tasks or 32, 5 if steps is None else steps, 3, 84, 32, 5, 0.01
        ways, query = 5, 15
        xs = torch.randn(T, ways * shots, C, side, side, generator=g)
        xq = torch.randn(T, ways * query, C, side, side, generator=g)
        ys = torch.arange(ways).repeat_interleave(shots).expand(T, -1).contiguous()
        yq = torch.arange(ways).repeat_interleave(query).expand(T, -1).contiguous()
        model, loss = conv4(C, ch, ways, side), "cross_entropy"
    else:
        raise ValueError(f"workload: expected 'sine', 'omniglot' or 'miniimagenet', got {name!r}")
    model = model.to(device=device, dtype=dtype)
    cast = lambda t: t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)  # noqa: E731
    return Workload(name, model, cast(xs), cast(ys), cast(xq), cast(yq), lr, S, loss)


# ---------------------------------------------------------------------------------------------
# Providers
# ---------------------------------------------------------------------------------------------
def _params(w: Workload):
    """The meta-parameters: the model's parameters that require grad (not, say, running statistics
    held as Parameters), whose meta-gradients every provider returns in this order."""
    return [p for p in w.model.parameters() if p.requires_grad]


def _names(w: Workload):
    return [n for n, p in w.model.named_parameters() if p.requires_grad]


def _fastmeta(w: Workload, first_order: bool, backend: str | None = None, task_chunk: int | None = None):
    import fastmeta

    meta = fastmeta.BatchedMAML(w.model, w.inner_lr, w.steps, first_order=first_order, loss=w.loss,
                                task_chunk=task_chunk)
    params = _params(w)

    def step():
        with fastmeta.use_backend(backend):
            loss = meta(w.xs, w.ys, w.xq, w.yq)
            with phase("outer_backward"):
                return list(torch.autograd.grad(loss, params))
    return step


def _fastmeta_vg(w: Workload, first_order: bool, backend: str | None = None, task_chunk: int | None = None,
                 recompute: bool = False, checkpoint_steps: bool = False):
    """BatchedMAML.value_and_grad: the loss and the meta-gradient as values (no autograd graph
    where the fused op runs)."""
    import fastmeta

    meta = fastmeta.BatchedMAML(w.model, w.inner_lr, w.steps, first_order=first_order, loss=w.loss,
                                task_chunk=task_chunk, recompute=recompute, checkpoint_steps=checkpoint_steps)

    learned = [p.requires_grad for p in meta.parameters()]

    def step():
        with fastmeta.use_backend(backend):
            grads = meta.value_and_grad(w.xs, w.ys, w.xq, w.yq)[1]
        return [g for g, keep in zip(grads, learned) if keep]
    return step


def _fastmeta_graph(w: Workload, first_order: bool, backend: str | None = None, task_chunk: int | None = None,
                    recompute: bool = False, checkpoint_steps: bool = False):
    """fastmeta.graphed: BatchedMAML.value_and_grad captured in one CUDA graph, replayed per step."""
    import fastmeta

    if w.xs.device.type != "cuda":
        raise RuntimeError("fastmeta_graph needs CUDA tensors")
    with fastmeta.use_backend(backend):
        meta = fastmeta.BatchedMAML(w.model, w.inner_lr, w.steps, first_order=first_order, loss=w.loss,
                                    task_chunk=task_chunk, recompute=recompute, checkpoint_steps=checkpoint_steps)
        graphed = fastmeta.graphed(meta, w.xs, w.ys, w.xq, w.yq)

    def step():
        with fastmeta.use_backend(backend):
            return graphed(w.xs, w.ys, w.xq, w.yq)[1]
    return step


def _fastmeta_tuned(w: Workload, first_order: bool, backend: str | None = None, task_chunk: int | None = None):
    """fastmeta.tune at set-up (its table on stderr; its time counts in the first call), then
    value_and_grad on what it chose; with a -BACKEND suffix, the candidates are auto and that backend."""
    import sys

    import fastmeta

    meta = fastmeta.BatchedMAML(w.model, w.inner_lr, w.steps, first_order=first_order, loss=w.loss,
                                task_chunk=task_chunk)
    result = fastmeta.tune(meta, w.xs, w.ys, w.xq, w.yq, backends=None if backend is None else ["auto", backend],
                           reps=3, warmup=2)
    print(f"fastmeta_tuned ({w.name}, {'first' if first_order else 'second'} order, T={w.tasks}):\n{result}",
          file=sys.stderr)

    def step():
        return meta.value_and_grad(w.xs, w.ys, w.xq, w.yq)[1]
    return step


def _accumulate(total, grads):
    return list(grads) if total is None else [a.add_(b) for a, b in zip(total, grads)]


def _loop(w: Workload, first_order: bool):
    """The naive loop: task by task, S differentiable SGD steps, the query loss, and its backward
    (the task's meta-gradient, summed over tasks), as learn2learn's examples write it: memory holds
    one task's graph at a time."""
    from .plan import call_with, slot_names

    names = _names(w)
    params = _params(w)
    # (a module at two places of the model: its parameters replaced once; the frozen ones left to it)
    slots = {slot: n for slot, n in slot_names(w.model).items() if n in set(names)}

    def step():
        total = None
        for t in range(w.tasks):
            p = dict(zip(names, params))
            for _ in range(w.steps):
                with phase("inner_forward"):
                    loss = w.loss_fn(call_with(w.model, p, (w.xs[t],), names=slots), w.ys[t])
                with phase("inner_backward"):
                    g = torch.autograd.grad(loss, list(p.values()), create_graph=not first_order)
                with phase("update"):
                    p = {n: v - w.inner_lr * gi for (n, v), gi in zip(p.items(), g)}
            with phase("query_forward"):
                query = w.loss_fn(call_with(w.model, p, (w.xq[t],), names=slots), w.yq[t]) / w.tasks
            with phase("outer_backward"):
                total = _accumulate(total, torch.autograd.grad(query, params))
        return total
    return step


def _maml(w: Workload, first_order: bool, backend: str | None = None, meta_sgd: bool = False):
    import fastmeta

    learner = fastmeta.MetaSGD if meta_sgd else fastmeta.MAML
    maml = learner(w.model, lr=w.inner_lr, first_order=first_order)
    step = _clone_adapt_loop(w, maml)
    if backend is None:
        return step

    def on_backend():
        with fastmeta.use_backend(backend):
            return step()
    return on_backend


def _maml_pertensor(w: Workload, first_order: bool):
    """fastmeta.MAML's clone/adapt loop with learn2learn 0.2.0's update step instead of the fused
    op: one Python-level ``p + (-lr * g)`` per parameter tensor (what l2l's maml_update does), and
    the module's own call as the forward (not ops.mlp_forward)."""
    import fastmeta
    from fastmeta import maml as fm

    class PerTensorMAML(fastmeta.MAML):
        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

        def adapt(self, loss, first_order=None, allow_unused=None, allow_nograd=None):
            fo = self.first_order if first_order is None else first_order
            params = list(self.module.parameters())
            grads = torch.autograd.grad(loss, params, retain_graph=not fo, create_graph=not fo)
            new = {id(p): p + (-self.lr * g) for p, g in zip(params, grads)}
            fm._replace_params(self.module, new, set())

        def clone(self, first_order=None, allow_unused=None, allow_nograd=None):
            return PerTensorMAML(fm.clone_module(self.module), lr=self.lr,
                                 first_order=self.first_order if first_order is None else first_order)

    return _clone_adapt_loop(w, PerTensorMAML(w.model, lr=w.inner_lr, first_order=first_order))


def _l2l(w: Workload, first_order: bool):
    import learn2learn as l2l

    return _clone_adapt_loop(w, l2l.algorithms.MAML(w.model, lr=w.inner_lr, first_order=first_order))


def _clone_adapt_loop(w: Workload, maml):
    """learn2learn's pattern: clone, adapt S times, the query loss's backward per task."""
    params = _params(w)

    def step():
        total = None
        for t in range(w.tasks):
            learner = maml.clone()
            for _ in range(w.steps):
                with phase("inner_forward"):
                    loss = w.loss_fn(learner(w.xs[t]), w.ys[t])
                learner.adapt(loss)  # its gradient and update phases are marked inside fastmeta.MAML
            with phase("query_forward"):
                query = w.loss_fn(learner(w.xq[t]), w.yq[t]) / w.tasks
            with phase("outer_backward"):
                total = _accumulate(total, torch.autograd.grad(query, params))
        return total
    return step


def _higher(w: Workload, first_order: bool):
    import higher

    params = _params(w)
    opt = torch.optim.SGD(w.model.parameters(), lr=w.inner_lr)

    def step():
        total = None
        for t in range(w.tasks):
            with higher.innerloop_ctx(w.model, opt, copy_initial_weights=False) as (fmodel, diffopt):
                for _ in range(w.steps):  # first order: the inner gradients are detached
                    diffopt.step(w.loss_fn(fmodel(w.xs[t]), w.ys[t]),
                                 grad_callback=(lambda gs: [g.detach() for g in gs]) if first_order else None)
                query = w.loss_fn(fmodel(w.xq[t]), w.yq[t]) / w.tasks
                total = _accumulate(total, torch.autograd.grad(query, params))
        return total
    return step


def _vmap_meta_grad_fn(w: Workload, first_order: bool, grad_outside: bool = False):
    """A pure function params -> meta-gradient, built from torch.func transforms: vmap over the
    tasks of grad of a task's query loss (its inner steps themselves grad-based), then the mean over
    tasks; with grad_outside, grad of the mean of the vmapped query losses instead.

    Both give the same meta-gradient in exact arithmetic, but with grad outside the vmap a
    second-order meta-gradient through F.batch_norm in training mode comes out wrong (torch 2.13:
    Omniglot's conv4, T=8, float64, 3.6e-2 from the per-task loop, whose answer finite differences
    confirm; the conv weights' gradient through BatchNorm's input; torch.compile of it as well, and
    the same with autograd outside the vmap): the batching of batch_norm's backward
    (pytorch/functorch#534). Per-task grads inside the vmap are right (1e-15 in float64)."""
    from torch.func import grad, vmap

    from .plan import call_with, slot_names

    model = w.model
    buffers = dict(model.named_buffers())
    slots = slot_names(model)

    def loss_at(p, x, y):
        return w.loss_fn(call_with(model, p, (x,), buffers, names=slots), y)

    def task_loss(p, xs, ys, xq, yq):
        for _ in range(w.steps):
            probe = {n: v.detach() for n, v in p.items()} if first_order else p
            g = grad(loss_at)(probe, xs, ys)
            p = {n: p[n] - w.inner_lr * g[n] for n in p}
        return loss_at(p, xq, yq)

    if grad_outside:
        def meta_loss(p, xs, ys, xq, yq):
            return vmap(task_loss, in_dims=(None, 0, 0, 0, 0), randomness="different")(p, xs, ys, xq, yq).mean()
        return grad(meta_loss)

    per_task = vmap(grad(task_loss), in_dims=(None, 0, 0, 0, 0), randomness="different")

    def meta_grad(p, xs, ys, xq, yq):
        return {n: g.mean(0) for n, g in per_task(p, xs, ys, xq, yq).items()}
    return meta_grad


def _functional_step(w: Workload, fn):
    """step() calling fn(params, batch) -> {name: meta-gradient} on detached meta-parameters."""
    names = _names(w)
    p = {n: v.detach() for n, v in w.model.named_parameters()}

    def step():
        g = fn(p, w.xs, w.ys, w.xq, w.yq)
        return [g[n] for n in names]
    return step


def _vmap(w: Workload, first_order: bool, grad_outside: bool = False):
    return _functional_step(w, _vmap_meta_grad_fn(w, first_order, grad_outside))


def _compile(w: Workload, first_order: bool, grad_outside: bool = False):
    return _functional_step(w, torch.compile(_vmap_meta_grad_fn(w, first_order, grad_outside)))


def _vmap_graph(w: Workload, first_order: bool, grad_outside: bool = False):
    if w.xs.device.type != "cuda":
        raise RuntimeError("vmap_graph needs CUDA tensors")
    fn = _vmap_meta_grad_fn(w, first_order, grad_outside)
    names = _names(w)
    p = {n: v.detach().clone() for n, v in w.model.named_parameters()}
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn(p, w.xs, w.ys, w.xq, w.yq)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(p, w.xs, w.ys, w.xq, w.yq)

    def step():
        graph.replay()
        return [out[n] for n in names]
    return step


PROVIDERS: dict[str, Callable] = {
    "fastmeta": _fastmeta, "fastmeta_vg": _fastmeta_vg, "fastmeta_graph": _fastmeta_graph, "maml": _maml,
    "maml_pertensor": _maml_pertensor, "metasgd": functools.partial(_maml, meta_sgd=True), "loop": _loop,
    "l2l": _l2l,
    "higher": _higher,
    "vmap": _vmap, "compile": _compile, "vmap_graph": _vmap_graph, "fastmeta_tuned": _fastmeta_tuned,
    "vmap_gv": functools.partial(_vmap, grad_outside=True),
    "compile_gv": functools.partial(_compile, grad_outside=True),
    "vmap_graph_gv": functools.partial(_vmap_graph, grad_outside=True),
    # BatchedMAML(recompute=True): the first conv block recomputes its convolution's output
    "fastmeta_vg_rc": functools.partial(_fastmeta_vg, recompute=True),
    "fastmeta_graph_rc": functools.partial(_fastmeta_graph, recompute=True),
    # BatchedMAML(checkpoint_steps=True): the outer backward recomputes each inner step's graph
    "fastmeta_vg_ck": functools.partial(_fastmeta_vg, checkpoint_steps=True),
    "fastmeta_graph_ck": functools.partial(_fastmeta_graph, checkpoint_steps=True),
    "fastmeta_vg_rc_ck": functools.partial(_fastmeta_vg, recompute=True, checkpoint_steps=True),
    "fastmeta_graph_rc_ck": functools.partial(_fastmeta_graph, recompute=True, checkpoint_steps=True),
}


def default_providers(workload: str, device: str) -> list:
    """Providers compared by default (see default_skip for rows that a CPU leaves out)."""
    if device == "cuda":
        vg = ["fastmeta_vg"] if workload == "sine" else []  # elsewhere it is autograd.grad of forward
        return ["fastmeta"] + vg + ["fastmeta_graph", "fastmeta-torch", "fastmeta-triton", "fastmeta-cuda",
                                    "fastmeta_tuned", "maml", "loop", "vmap", "vmap_graph", "compile", "l2l", "higher"]
    if workload == "sine":
        return ["fastmeta", "fastmeta_vg", "fastmeta-cpp", "fastmeta-torch", "maml", "maml_pertensor", "loop", "vmap",
                "compile", "l2l", "higher"]
    if workload == "miniimagenet":  # and its memory-lean setting (recompute + checkpoint_steps)
        return ["fastmeta", "fastmeta_vg_rc_ck", "loop", "vmap", "compile"]
    return ["fastmeta", "maml", "loop", "vmap", "compile"]  # (maml: the drop-in learner, its program of one task)


# fastmeta's own providers: each takes an "@N" suffix (BatchedMAML's task_chunk=N) and a "-BACKEND"
# suffix, in that order (e.g. fastmeta_vg@4-cuda)
_LEARNERS = ("maml", "metasgd")  # the drop-in learners' providers (a backend suffix, no @N)
_FASTMETA = ("fastmeta", "fastmeta_vg", "fastmeta_graph", "fastmeta_tuned", "fastmeta_vg_rc", "fastmeta_graph_rc",
             "fastmeta_vg_ck", "fastmeta_graph_ck", "fastmeta_vg_rc_ck", "fastmeta_graph_rc_ck")


# fastmeta's providers also take a final "+tf32x3" suffix: their float32 convolutions as three TF32
# products of the operands' high and low parts (FASTMETA_CONV_PRECISION=tf32x3 while the row is built
# and while each step runs), e.g. fastmeta_graph@8-cuda+tf32x3
_PRECISION_SUFFIX = "+tf32x3"


def _split_precision(name: str):
    """(name without the precision suffix, FASTMETA_CONV_PRECISION value or None)."""
    if name.endswith(_PRECISION_SUFFIX):
        return name[:-len(_PRECISION_SUFFIX)], "tf32x3"
    return name, None


@contextlib.contextmanager
def conv_precision(value):
    """fastmeta.use_conv_precision(value) inside (nothing changed for None)."""
    if value is None:
        yield
        return
    from .ops.batched_conv2d import use_conv_precision
    with use_conv_precision(value):
        yield


def _split(name: str):
    """(provider, task_chunk or None, backend or None) of a provider name (its precision suffix
    removed: _split_precision)."""
    name, precision = _split_precision(name)
    if precision is not None and name.partition("-")[0].partition("@")[0] not in _FASTMETA:
        raise ValueError(f"provider {name + _PRECISION_SUFFIX!r}: the {_PRECISION_SUFFIX} suffix is for "
                         f"{', '.join(_FASTMETA)}")
    head, _, backend = name.partition("-")
    base, at, chunk = head.partition("@")
    if at and (base not in _FASTMETA or not chunk.isdigit() or int(chunk) < 1):
        raise ValueError(f"provider {name!r}: an @N suffix (N >= 1 tasks a chunk) is for {', '.join(_FASTMETA)}")
    return base, (int(chunk) if at else None), (backend or None)
# providers whose CPU step runs the fused C++ kernel (its per-thread workspace counts in peak memory)
_FUSED_CPU = ("fastmeta", "fastmeta-cpp", "fastmeta_vg", "fastmeta_vg-cpp")


def default_skip(provider: str, workload: str, device: str) -> str | None:
    """Why a default row is not run on this device (an explicit --providers list runs it anyway)."""
    if device == "cpu" and workload != "sine" and provider in ("compile", "compile_gv"):
        return "torch.compile of conv4 MAML takes over 10 minutes to compile on a 2-core CPU"
    if device == "cpu" and workload == "miniimagenet" and provider in ("vmap", "vmap_gv"):
        return "torch.func vmap of mini-ImageNet MAML holds ~100x the loop's memory (112 GB at T=32 on a GPU)"
    return None


def provider_available(name: str, device: str) -> str | None:
    """None if provider ``name`` can run on ``device``, else why not."""
    try:
        base = _split(name)[0]
    except ValueError as e:
        return str(e)
    if base not in PROVIDERS:
        return f"unknown provider {name!r}"
    if base == "l2l" and importlib.util.find_spec("learn2learn") is None:
        return "learn2learn not installed"
    if base == "higher" and importlib.util.find_spec("higher") is None:
        return "higher not installed"
    graphed = ("vmap_graph", "vmap_graph_gv", "fastmeta_graph", "fastmeta_graph_rc", "fastmeta_graph_ck",
               "fastmeta_graph_rc_ck")
    if base in graphed and device != "cuda":
        return "CUDA graphs need a GPU"
    backend = _split(name)[2]
    if (base in _FASTMETA or base in _LEARNERS) and backend is not None:
        from .backend import why_unavailable
        return why_unavailable(backend, device)
    return None


def make_step(name: str, w: Workload, first_order: bool):
    base, chunk, backend = _split(name)
    if base in _LEARNERS:
        return PROVIDERS[base](w, first_order, backend)
    if base not in _FASTMETA:
        return PROVIDERS[base](w, first_order)
    precision = _split_precision(name)[1]
    with conv_precision(precision):
        step = PROVIDERS[base](w, first_order, backend, chunk)
    if precision is None:
        return step

    def with_precision():
        with conv_precision(precision):
            return step()
    return with_precision


def precision_settings(tf32: bool = False, cudnn_benchmark: bool = False) -> str:
    """The GPU math settings every timing tool runs under (bench, profile, the GPU probes), so that
    a profile looks at the kernels the bench timed: TF32 off for matmuls and cuDNN convolutions
    unless asked for (PyTorch's default lets cuDNN use TF32, whose convolutions are other kernels
    and ~2x faster than float32's), cuDNN's algorithm search on only when asked for. Returns a
    short description for a report's header."""
    torch.backends.cuda.matmul.allow_tf32 = bool(tf32)
    torch.backends.cudnn.allow_tf32 = bool(tf32)
    torch.backends.cudnn.benchmark = bool(cudnn_benchmark)
    return f"TF32 {'on' if tf32 else 'off'}" + (", cudnn.benchmark on" if cudnn_benchmark else "")


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------
def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_step(step, device="cpu", warmup: int = 2, reps: int = 10, max_seconds: float = 10.0,
              min_seconds: float = 1.0, max_reps: int = 2000):
    """Median and all wall times (ms) of step(), synchronized on CUDA. At least ``reps`` timed
    calls (fewer only when they overrun max_seconds, with 3 at least); a step that is fast keeps
    being timed up to min_seconds of calls (max_reps at most), so the median of a sub-millisecond
    step rests on hundreds of samples rather than a handful."""
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    start = time.perf_counter()
    budget_end = start + max_seconds
    for i in range(max_reps):
        t0 = time.perf_counter()
        step()
        _sync(device)
        t1 = time.perf_counter()
        times.append((t1 - t0) * 1e3)
        if i + 1 >= reps and t1 - start >= min_seconds:
            break
        if t1 > budget_end and i >= 2:
            break
    return statistics.median(times), times


def time_interleaved(steps: dict, device="cpu", seconds: float = 1.0, min_calls: int = 10,
                     max_seconds: float = 10.0, batch_seconds: float = 0.05, max_calls: int = 2000) -> dict:
    """Median and all wall times (ms) of each step of ``steps`` (name -> step), timed in rounds:
    each round runs every step for about batch_seconds of back-to-back calls (one at least), the
    order rotated from round to round, until each step has had ``seconds`` of calls and min_calls
    calls, or max_seconds of calls (3 calls at least), or max_calls calls. A drift of the machine's
    speed during the run (other work on a shared machine, clock changes) then falls on every step
    alike instead of on the rows that happened to run during it, so the ratios between them are
    those of one moment. Returns name -> (median, times, error): a step that raises leaves the
    rounds (median None, error its exception's type and first line) and the others go on."""
    names = list(steps)
    per_call, errors = {}, {}

    def fail(n, e):
        first = str(e).splitlines()[0][:200] if str(e) else ""
        errors[n] = f"{type(e).__name__}: {first}"

    for n in names:  # warm and size each batch from one call
        try:
            steps[n]()
            _sync(device)
            t0 = time.perf_counter()
            steps[n]()
            _sync(device)
        except Exception as e:  # reported with the row, never hidden
            fail(n, e)
            continue
        per_call[n] = max(time.perf_counter() - t0, 1e-6)
    batch = {n: max(1, int(batch_seconds / t)) for n, t in per_call.items()}
    times = {n: [] for n in names}
    spent = dict.fromkeys(names, 0.0)

    def more(n):
        c = len(times[n])
        if n in errors or c >= max_calls or (spent[n] >= max_seconds and c >= 3):
            return False
        return spent[n] < seconds or c < min_calls

    rnd = 0
    while True:
        todo = [n for n in names if more(n)]
        if not todo:
            break
        k = rnd % len(todo)
        for n in todo[k:] + todo[:k]:
            step = steps[n]
            for _ in range(batch[n]):
                if not more(n):
                    break
                t0 = time.perf_counter()
                try:
                    step()
                    _sync(device)
                except Exception as e:
                    fail(n, e)
                    break
                dt = time.perf_counter() - t0
                times[n].append(dt * 1e3)
                spent[n] += dt
        rnd += 1
    return {n: (None if n in errors else statistics.median(times[n]), times[n], errors.get(n)) for n in names}


def max_rel_err(got, want) -> float:
    """Largest per-tensor relative error; a tensor whose true value is (near) zero (e.g. a conv
    bias cancelled by BatchNorm) is measured against 1e-2 of the whole gradient's norm instead.
    Pairs with a None (a parameter without a gradient) are skipped."""
    pairs = [(g, w) for g, w in zip(got, want) if g is not None and w is not None]
    total = float(torch.sqrt(sum((w.double() ** 2).sum() for _, w in pairs)))
    errs = [0.0]
    for g, w in pairs:
        scale = max(float(w.double().norm()), 1e-2 * total, 1e-30)
        errs.append(float((g.double() - w.double()).norm()) / scale)
    return max(errs)


@contextlib.contextmanager
def _quiet_stderr():
    """Silences file descriptor 2 (where the profiler library logs its start and stop)."""
    import sys
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def cpu_peak_mb(step, fused: bool = False) -> float | None:
    """Peak CPU memory of one step(): tensors allocated by ops (seen by torch.profiler), plus, for
    a step that runs the fused C++ kernel, the workspaces it keeps per thread."""
    from torch.profiler import ProfilerActivity, profile

    from .profile import Profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()  # (it ran before; the profiler's own start/stop lines on fd 2 are dropped)
    peak = Profile._cpu_peak_mb_of(prof)
    if not peak:  # no allocation seen (e.g. torch.compile's generated code): not measured
        return None
    if fused:
        try:
            from . import _C
            peak += _C.workspace_bytes() / 2**20
        except ImportError:
            pass
    return peak


def step_peak_mb(step, device: str) -> float:
    """Peak memory (MB) of one step() above what was allocated before it: on CUDA the caching
    allocator's peak, on a CPU the profiler's (cpu_peak_mb; 0 where it sees no allocation)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    peak = cpu_peak_mb(step)
    return 0.0 if peak is None else peak


@dataclasses.dataclass
class Result:
    workload: str
    order: str
    provider: str
    tasks: int
    steps: int
    median_ms: float | None
    first_call_ms: float | None
    peak_mem_mb: float | None
    reps: int
    error: str | None = None
    max_rel_err: float | None = None
    interleaved: bool = False  # median from time_interleaved (rounds with the group's other rows)


def run_one(name: str, w: Workload, first_order: bool, reps=10, warmup=2, max_seconds=10.0,
            reference=None, min_seconds=1.0, keep: dict | None = None) -> tuple[Result, list | None]:
    """Builds and times one provider; first_call_ms includes compilation (torch.compile, JIT).
    keep: where given, the built step is stored there under the provider's name (for a timing
    that interleaves it with other rows', time_interleaved)."""
    device = w.xs.device.type
    order = "first" if first_order else "second"
    try:
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base_mem = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        step = make_step(name, w, first_order)
        grads = step()
        _sync(device)
        first = (time.perf_counter() - t0) * 1e3
        med, times = time_step(step, device, warmup=max(warmup - 1, 0), reps=reps, max_seconds=max_seconds,
                               min_seconds=min_seconds)
        peak = None
        if device == "cuda":
            peak = (torch.cuda.max_memory_allocated() - base_mem) / 2**20
        else:
            peak = cpu_peak_mb(step, fused=name in _FUSED_CPU and w.name == "sine")
        err = None if reference is None else max_rel_err(grads, reference)
        if keep is not None:
            keep[name] = step
        return Result(w.name, order, name, w.tasks, w.steps, med, first, peak, len(times), None, err), grads
    except Exception as e:  # reported in the table, never hidden
        return Result(w.name, order, name, w.tasks, w.steps, None, None, None, 0,
                      f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"), None
