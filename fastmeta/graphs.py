"""``fastmeta.graphed``: a BatchedMAML meta-step captured in one CUDA graph.

    step = fastmeta.graphed(meta, xs, ys, xq, yq)   # warms up, then captures meta.value_and_grad
    for xs, ys, xq, yq in batches:                  # batches of the captured shapes and dtypes
        loss, grads = step(xs, ys, xq, yq)          # copies the batch in, replays the graph
        for p, g in zip(meta.parameters(), grads):
            p.grad = g
        opt.step()                                  # updates the parameters in place

A replay issues the whole meta-step (every kernel of the inner loops, the query losses and the
meta-gradient) with one launch, so a step costs its kernels' time and no host time per op: what
capturing a vmap meta-step in a CUDA graph does for stock PyTorch, for fastmeta's own step.

What a graph fixes at capture, and what breaks it:
- the batch's shapes, dtypes and device: another batch shape raises (capture another step for it);
- the parameters' storage: optimizers update in place, which the next replay reads; a parameter
  replaced by another tensor (``module.weight = nn.Parameter(...)``, ``load_state_dict(assign=True)``)
  raises, as does a change of inner_lr, inner_steps, first_order, step_loss_weights (the multi-step
  loss's weights are constants of the graph: capture a step for each), the backend or a module's
  training mode (``model.train()`` / ``model.eval()``: BatchNorm's statistics, Dropout);
- the outputs: ``loss`` and ``grads`` are the graph's own buffers, overwritten by the next replay
  (clone them to keep them); parameters that do not require grad have None.
Cross-entropy labels are range-checked on the host before each replay (one sync); check_finite
(which syncs inside the step) cannot be captured.

With ``BatchedMAML(task_chunk=N)`` the graph is one chunk's step (N tasks; a second graph for a
shorter last chunk), replayed chunk by chunk with the chunk's batch copied in and its loss and
gradient added, weighted by its share of the tasks, into the step's outputs inside the graph: the
memory of one chunk's step, no host time per op, and one small graph instead of T/N copies of it.
"""
from __future__ import annotations

import contextlib

import torch

from . import _checks
from .backend import get_backend
from .batched import accumulate, chunk_slices


class GraphedStep:
    """See the module docstring; made by :func:`graphed`."""

    def __init__(self, meta, xs, ys, xq, yq, warmup: int = 3):
        from .batched import BatchedMAML
        if not isinstance(meta, BatchedMAML):
            raise TypeError(f"graphed: meta must be a fastmeta.BatchedMAML, got {type(meta).__name__}")
        batch = {"xs": xs, "ys": ys, "xq": xq, "yq": yq}
        for name, t in batch.items():
            _checks.tensor(name, t, min_dim=2)
            if t.device.type != "cuda":
                raise ValueError(f"graphed: CUDA graphs need CUDA tensors, {name} is on {t.device}")
        if meta.check_finite:
            raise ValueError("graphed: check_finite=True syncs with the host inside the step and cannot be "
                             "captured; construct the BatchedMAML with check_finite=False")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"graphed: warmup must be an int >= 1, got {warmup!r}")
        self.meta = meta
        self._shapes = {n: (t.shape, t.dtype, t.device) for n, t in batch.items()}
        meta._check_structure()
        self._program = meta.program
        self._params = list(meta.parameters())
        self._config = self._current_config()
        T = xs.shape[0]
        self._chunks = chunk_slices(T, meta.task_chunk)
        chunked = len(self._chunks) > 1
        # one graph a chunk size: statics [size, ...] and the step; chunked, the step's loss and
        # gradient are added to the outputs with the weight size / T, else they are the outputs
        if chunked:
            self.loss = torch.zeros((), dtype=xs.dtype, device=xs.device)
            self.grads = [torch.zeros_like(p) if p.requires_grad else None for p in self._params]
        self._graphs = {}
        # (the warmup calls are not the user's passes)
        with meta._kept_running_stats():
            self._capture(meta, batch, chunked, T, warmup)

    def _capture(self, meta, batch, chunked, T, warmup):
        pool = None
        for size in sorted({stop - start for start, stop in self._chunks}, reverse=True):
            static = {n: t[:size].detach().clone() for n, t in batch.items()}
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for i in range(warmup):  # autograd, the allocator and Triton compile outside the capture
                    # (the first checks the labels, which tells _check_labels the number of classes)
                    with contextlib.nullcontext() if i == 0 else _checks.labels_checked():
                        meta.value_and_grad(*static.values())
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool), _checks.labels_checked():
                loss, grads = meta.value_and_grad(*static.values())
                if chunked:
                    accumulate(self.loss, self.grads, loss, grads, size / T)
                else:
                    self.loss, self.grads = loss, grads
            pool = graph.pool()
            self._graphs[size] = (graph, static)

    def _current_config(self):
        m = self.meta
        return (m.inner_lr if not isinstance(m.inner_lr, torch.Tensor) else id(m.inner_lr), m.inner_steps,
                m.first_order, m.step_loss_weights, get_backend(), m.backend,
                tuple(p.requires_grad for p in m.parameters()),
                tuple(mod.training for mod in m.model.modules()))

    def _check_labels(self, batch):
        # (a call range-checks cross-entropy labels with a sync; inside the capture it is told not
        # to, so each replay's batch is checked here; the first warmup call checked the first)
        if self.meta.loss == "cross_entropy":
            C = _classes(self.meta) if self.meta.program.mlp is not None else self.meta._classes
            _checks.labels_in_range([("ys", batch["ys"]), ("yq", batch["yq"])], C, "graphed step")

    def __call__(self, xs, ys, xq, yq):
        batch = {"xs": xs, "ys": ys, "xq": xq, "yq": yq}
        for name, t in batch.items():
            shape, dtype, device = self._shapes[name]
            if not isinstance(t, torch.Tensor) or t.shape != shape or t.dtype != dtype or t.device != device:
                got = (f"{tuple(t.shape)} {t.dtype} on {t.device}" if isinstance(t, torch.Tensor)
                       else type(t).__name__)
                raise ValueError(f"graphed step: {name} is {got}, the step was captured for "
                                 f"{tuple(shape)} {dtype} on {device}; capture another step for it")
        self.meta._check_structure()
        if self.meta.program is not self._program:
            raise RuntimeError("graphed step: the model's structure changed since the capture (a module replaced, "
                               "a hook or a parametrization added); capture again")
        params = self.meta._param_list()
        if len(params) != len(self._params) or any(a is not b for a, b in zip(params, self._params)):
            raise RuntimeError("graphed step: the module's parameters were replaced since the capture (the "
                               "graph reads the captured tensors); update them in place or capture again")
        if self._current_config() != self._config:
            raise RuntimeError("graphed step: inner_lr, inner_steps, first_order, step_loss_weights, the backend, "
                               "which parameters require grad or a module's training mode (train() / eval(): "
                               "BatchNorm's statistics, Dropout) changed since the capture; capture again "
                               "(a step for each mode)")
        self._check_labels(batch)
        if len(self._chunks) > 1:
            torch._foreach_zero_([self.loss] + [g for g in self.grads if g is not None])
        for start, stop in self._chunks:
            graph, static = self._graphs[stop - start]
            # the batch in with one launch where the four tensors allow (ATen groups them by dtype)
            torch._foreach_copy_(list(static.values()), [t[start:stop] for t in batch.values()])
            graph.replay()
        return self.loss, self.grads


def _classes(meta):
    """The number of classes of the fused MLP: its last layer's output width."""
    spec = meta.program.mlp
    params = dict(meta.model.named_parameters())
    return params[spec.param_names[-2]].shape[0]


def graphed(meta, xs, ys, xq, yq, warmup: int = 3) -> GraphedStep:
    """Captures ``meta.value_and_grad`` for batches like (xs, ys, xq, yq) in one CUDA graph; see the
    module docstring."""
    return GraphedStep(meta, xs, ys, xq, yq, warmup)
