"""``inner_update``: theta'_i = theta_i - lr_i * g_i over a list of tensors in one call.

params[i] may be a meta-parameter of shape S_i or a per-task tensor [T, *S_i] (at step 0 a
broadcast view); grads[i] has the output's shape (broadcast of params[i] and itself). lr is a real
number, one tensor (a learnable scalar), or a sequence of tensors, one per parameter, each
broadcastable to its parameter (Meta-SGD).

Backward (differentiable again, so second-order MAML composes):
    d_theta_i = d_theta'_i (summed to theta_i's shape),  d_g_i = -lr_i * d_theta'_i,
    d_lr_i = -sum(g_i * d_theta'_i) (summed to lr_i's shape).

Backends: ``torch`` (torch._foreach ops, autograd-native), ``cpp`` / ``cuda`` (fastmeta._C, one call
and on CUDA one launch for all tensors) and ``triton`` (kernels/inner_update.py, one launch for all
tensors); fastmeta._C's ops carry their autograd in C++, the Triton op gets it from a Function, each
backward in differentiable ops.
"""
from __future__ import annotations

import functools
import math
import numbers
from typing import Sequence

import torch

from .. import _checks
from ..backend import register_op, select

IMPLEMENTED = ("torch", "cpp", "cuda", "triton")
# torch's foreach measured faster than cpp on CPU (benchmarks/RESULTS.md); on CUDA, torch's foreach
# is multi-tensor too and stays first until benchmarks/bench_ops.py has measured the cuda kernel.
AUTO = {"cpu": ("torch", "cpp"), "cuda": ("torch", "cuda", "triton")}
register_op("inner_update", IMPLEMENTED, AUTO)


def inner_update_ref(params, grads, lr):
    """Pure-PyTorch reference: [p - lr * g] (differentiable twice)."""
    if isinstance(lr, (list, tuple)):
        return [p - l * g for p, g, l in zip(params, grads, lr)]
    return [p - lr * g for p, g in zip(params, grads)]


def _check(params, grads, lr):
    if not isinstance(params, (list, tuple)) or not isinstance(grads, (list, tuple)):
        raise TypeError("inner_update: params and grads must be lists of tensors, got "
                        f"{type(params).__name__} and {type(grads).__name__}")
    if len(params) != len(grads):
        raise ValueError(f"inner_update: params has {len(params)} tensors but grads has {len(grads)}")
    for i, (p, g) in enumerate(zip(params, grads)):
        _checks.tensor(f"params[{i}]", p)
        _checks.tensor(f"grads[{i}]", g)
        try:
            shape = torch.broadcast_shapes(p.shape, g.shape)
        except RuntimeError:
            raise ValueError(f"inner_update: params[{i}] {tuple(p.shape)} and grads[{i}] "
                             f"{tuple(g.shape)} do not broadcast") from None
        if tuple(shape) != tuple(g.shape):
            raise ValueError(f"inner_update: grads[{i}] {tuple(g.shape)} must have the output shape "
                             f"{tuple(shape)} (params[{i}] is {tuple(p.shape)})")
        if p.device != g.device or p.dtype != g.dtype:
            raise ValueError(f"inner_update: params[{i}] ({p.dtype}, {p.device}) and grads[{i}] "
                             f"({g.dtype}, {g.device}) differ in dtype or device")
    if isinstance(lr, (list, tuple)):
        if len(lr) != len(params):
            raise ValueError(f"inner_update: lr has {len(lr)} tensors but params has {len(params)}")
        for i, (l, g) in enumerate(zip(lr, grads)):
            _checks.lr_value(f"lr[{i}]", l)
            if isinstance(l, torch.Tensor):
                try:
                    ok = tuple(torch.broadcast_shapes(l.shape, g.shape)) == tuple(g.shape)
                except RuntimeError:
                    ok = False
                if not ok:
                    raise ValueError(f"inner_update: lr[{i}] {tuple(l.shape)} does not broadcast to "
                                     f"grads[{i}] {tuple(g.shape)}")
    else:
        _checks.lr_value("lr", lr)
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError(f"inner_update: a single lr tensor must have one element, got shape "
                             f"{tuple(lr.shape)} (pass a list for per-parameter rates)")


def _torch_impl(params, grads, lr):
    if isinstance(lr, float):  # one foreach call, autograd-native (twice differentiable)
        return list(torch._foreach_add(params, grads, alpha=-lr))
    if isinstance(lr, torch.Tensor):  # foreach's Tensor-scalar overload has no autograd for lr
        lr = [lr] * len(grads)
    lr = [l if isinstance(l, torch.Tensor) else torch.tensor(float(l), dtype=g.dtype, device=g.device)
          for l, g in zip(lr, grads)]
    return list(torch._foreach_sub(params, torch._foreach_mul(grads, lr)))


# ---- C++ op: fake kernels for torch.compile (its autograd is in C++) -----------------------------
@functools.cache
def _register_cpp():
    @torch.library.register_fake("fastmeta::inner_update_scalar")
    def _(params, grads, lr):
        return [torch.empty_like(g, memory_format=torch.contiguous_format) for g in grads]

    @torch.library.register_fake("fastmeta::inner_update_tensor")
    def _(params, grads, lrs):
        return [torch.empty_like(g, memory_format=torch.contiguous_format) for g in grads]


@functools.cache
def _register_triton():
    from ..kernels.inner_update import inner_update_fwd

    @torch.library.custom_op("fastmeta::inner_update_triton", mutates_args=())
    def _op(params: list[torch.Tensor], grads: list[torch.Tensor], lrs: list[torch.Tensor],
            lr: float) -> list[torch.Tensor]:
        return inner_update_fwd(params, grads, lr, lrs)

    @_op.register_fake
    def _(params, grads, lrs, lr):
        return [torch.empty_like(g, memory_format=torch.contiguous_format) for g in grads]


class _TritonInnerUpdate(torch.autograd.Function):
    """theta' = theta - lr * g by fastmeta::inner_update_triton; the backward of fastmeta._C's ops
    (csrc/inner_update.cpp) in differentiable torch ops: d_theta = d_out (summed to theta's shape),
    d_g = -lr * d_out, d_lr = -sum(g * d_out)."""

    @staticmethod
    def forward(ctx, n, lr, *tensors):
        params, grads, lrs = list(tensors[:n]), list(tensors[n:2 * n]), list(tensors[2 * n:])
        outs = torch.ops.fastmeta.inner_update_triton(params, grads, lrs, lr)
        if lrs:
            ctx.save_for_backward(*grads, *lrs)
        ctx.n, ctx.lr, ctx.has_lrs = n, lr, bool(lrs)
        ctx.shapes = [p.shape for p in params]
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grad_outs):
        n = ctx.n
        dp = [None if go is None else go.sum_to_size(s) for go, s in zip(grad_outs, ctx.shapes)]
        if not ctx.has_lrs:
            dg = [None if go is None else go * (-ctx.lr) for go in grad_outs]
            return (None, None, *dp, *dg)
        saved = ctx.saved_tensors
        grads, lrs = saved[:n], saved[n:]
        dg = [None if go is None else -(l * go) for go, l in zip(grad_outs, lrs)]
        dl = [None if go is None else -(g * go).sum_to_size(l.shape) for go, g, l in zip(grad_outs, grads, lrs)]
        return (None, None, *dp, *dg, *dl)


def _cpp_impl(params, grads, lr, triton_kernel=False):
    """fastmeta._C's ops, which carry their autograd in C++ (csrc/inner_update.cpp), or the Triton
    op under _TritonInnerUpdate."""
    if triton_kernel:
        _register_triton()
    else:
        _register_cpp()
    n = len(grads)
    if isinstance(lr, (list, tuple)):
        lrs = [l if isinstance(l, torch.Tensor) else torch.tensor(float(l), dtype=g.dtype, device=g.device)
               for l, g in zip(lr, grads)]
    elif isinstance(lr, torch.Tensor):
        lrs = [lr.reshape(())] * n
    elif triton_kernel:
        return list(_TritonInnerUpdate.apply(n, float(lr), *params, *grads))
    else:
        return torch.ops.fastmeta.inner_update_scalar(list(params), list(grads), float(lr))
    if triton_kernel:
        return list(_TritonInnerUpdate.apply(n, 0.0, *params, *grads, *lrs))
    return torch.ops.fastmeta.inner_update_tensor(list(params), list(grads), lrs)


def _fast_check(params, grads, lr) -> bool:
    """The cheap checks of every call; False sends the call to the full check (which raises)."""
    if not isinstance(params, (list, tuple)) or not isinstance(grads, (list, tuple)) or len(params) != len(grads):
        return False
    for p, g in zip(params, grads):
        if not isinstance(p, torch.Tensor) or not isinstance(g, torch.Tensor):
            return False
        if p.shape != g.shape:
            if p.dim() > g.dim() or tuple(p.shape) != tuple(g.shape[g.dim() - p.dim():]):
                return False
        if p.dtype != g.dtype or p.device != g.device:
            return False
    if isinstance(lr, float):
        return math.isfinite(lr)
    if isinstance(lr, (list, tuple)):  # per-parameter rates (Meta-SGD): each of its gradient's shape or one value
        if len(lr) != len(grads):
            return False
        for l, g in zip(lr, grads):
            if not isinstance(l, torch.Tensor) or not l.is_floating_point() or (l.shape != g.shape and l.dim()):
                return False
        return True
    return isinstance(lr, torch.Tensor) and lr.numel() == 1 and lr.is_floating_point()


def inner_update(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], lr) -> list:
    """theta' = theta - lr * g for every tensor, in one op call (see module docstring)."""
    if isinstance(lr, numbers.Real) and not isinstance(lr, bool):
        lr = float(lr)
    if not _fast_check(params, grads, lr):
        _check(params, grads, lr)
    if len(params) == 0:
        return []
    backend = select("inner_update", grads[0].device.type)
    if backend in ("cuda", "triton") and grads[0].is_cuda and torch.cuda.is_current_stream_capturing():
        # captured into a CUDA graph (fastmeta.graphed): the fused kernel's host-side tables would be
        # read again at every replay; the per-tensor torch ops are graph-safe (and a replay has no
        # launch cost to save)
        return _torch_impl(params, grads, lr)
    if backend in ("cpp", "cuda", "triton") and all(g.dtype in _checks.KERNEL_DTYPES for g in grads):
        # fastmeta::inner_update_* has a CPU and a CUDA kernel (float32, float64; other dtypes, such
        # as bfloat16 and float16, take the torch ops)
        return _cpp_impl(params, grads, lr, triton_kernel=backend == "triton")
    return _torch_impl(params, grads, lr)
