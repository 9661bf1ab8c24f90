"""``inner_update``: theta'_i = theta_i - lr_i * g_i over a list of tensors in one call.

params[i] may be a meta-parameter of shape S_i or a per-task tensor [T, *S_i] (at step 0 a
broadcast view); grads[i] has the output's shape (broadcast of params[i] and itself). lr is a real
number, one tensor (a learnable scalar), or a sequence of tensors, one per parameter, each
broadcastable to its parameter (Meta-SGD).

Backward (differentiable again, so second-order MAML composes):
    d_theta_i = d_theta'_i (summed to theta_i's shape),  d_g_i = -lr_i * d_theta'_i,
    d_lr_i = -sum(g_i * d_theta'_i) (summed to lr_i's shape).

Backends: ``torch`` (two torch._foreach calls), ``cpp`` (fastmeta._C, one call for all tensors).
"""
from __future__ import annotations

import numbers
from typing import Sequence

import torch

from .. import _checks
from ..backend import register_op, select

IMPLEMENTED = ("torch", "cpp")
AUTO = {"cpu": ("cpp", "torch"), "cuda": ("torch",)}
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
    if isinstance(lr, torch.Tensor):  # foreach's Tensor-scalar overload has no autograd for lr
        lr = [lr] * len(grads)
    if isinstance(lr, (list, tuple)):
        lr = [l if isinstance(l, torch.Tensor) else torch.tensor(float(l), dtype=g.dtype, device=g.device)
              for l, g in zip(lr, grads)]
        return list(torch._foreach_sub(params, torch._foreach_mul(grads, lr)))
    return list(torch._foreach_sub(params, torch._foreach_mul(grads, lr)))


# ---- C++ op registration (fake kernels and autograd for fastmeta::inner_update_*) -------------
_registered = False


def _register_cpp():
    global _registered
    if _registered:
        return
    _registered = True

    @torch.library.register_fake("fastmeta::inner_update_scalar")
    def _(params, grads, lr):
        return [torch.empty_like(g, memory_format=torch.contiguous_format) for g in grads]

    @torch.library.register_fake("fastmeta::inner_update_tensor")
    def _(params, grads, lrs):
        return [torch.empty_like(g, memory_format=torch.contiguous_format) for g in grads]

    def setup_scalar(ctx, inputs, output):
        params, grads, lr = inputs
        ctx.lr = lr
        ctx.shapes = [p.shape for p in params]

    def backward_scalar(ctx, grad_outs):
        dp = [None if go is None else go.sum_to_size(s) for go, s in zip(grad_outs, ctx.shapes)]
        dg = [None if go is None else go * (-ctx.lr) for go in grad_outs]
        return dp, dg, None

    def setup_tensor(ctx, inputs, output):
        params, grads, lrs = inputs
        ctx.shapes = [p.shape for p in params]
        ctx.save_for_backward(*grads, *lrs)
        ctx.n = len(grads)

    def backward_tensor(ctx, grad_outs):
        saved = ctx.saved_tensors
        grads, lrs = saved[: ctx.n], saved[ctx.n:]
        dp, dg, dl = [], [], []
        for go, s, g, l in zip(grad_outs, ctx.shapes, grads, lrs):
            if go is None:
                dp.append(None), dg.append(None), dl.append(None)
                continue
            dp.append(go.sum_to_size(s))
            dg.append(-(l * go))
            dl.append(-(g * go).sum_to_size(l.shape))
        return dp, dg, dl

    torch.library.register_autograd("fastmeta::inner_update_scalar", backward_scalar,
                                    setup_context=setup_scalar)
    torch.library.register_autograd("fastmeta::inner_update_tensor", backward_tensor,
                                    setup_context=setup_tensor)


def _cpp_impl(params, grads, lr):
    _register_cpp()
    if isinstance(lr, (list, tuple)):
        lrs = [l if isinstance(l, torch.Tensor) else torch.tensor(float(l), dtype=g.dtype)
               for l, g in zip(lr, grads)]
        return list(torch.ops.fastmeta.inner_update_tensor(list(params), list(grads), lrs))
    if isinstance(lr, torch.Tensor):
        lrs = [lr.reshape(())] * len(grads)
        return list(torch.ops.fastmeta.inner_update_tensor(list(params), list(grads), lrs))
    return list(torch.ops.fastmeta.inner_update_scalar(list(params), list(grads), float(lr)))


def inner_update(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], lr) -> list:
    """theta' = theta - lr * g for every tensor, in one op call (see module docstring)."""
    _check(params, grads, lr)
    if len(params) == 0:
        return []
    if isinstance(lr, numbers.Real) and not isinstance(lr, bool):
        lr = float(lr)
    backend = select("inner_update", grads[0].device.type)
    if backend == "cpp":
        return _cpp_impl(params, grads, lr)
    return _torch_impl(params, grads, lr)
