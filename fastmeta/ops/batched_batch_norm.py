"""``batched_batch_norm``: BatchNorm with per-task (transductive) batch statistics.

    x [T, N, C, *spatial]; weight, bias [T, C] or [C] or None
    y[t] = (x[t] - mean_t) / sqrt(var_t + eps) * weight[t] + bias[t]

with mean_t, var_t (biased) over task t's own batch and spatial dims, per channel: what a
BatchNorm layer in training mode computes when one task's batch passes through it, as in MAML
(Finn et al. 2017). With running_mean/running_var given, those are used instead (eval mode).
Backends: ``torch``: one native ``F.batch_norm`` over the tasks folded into the channels,
[N, T*C, *spatial] (free when x comes from batched_conv2d, whose output is laid out that way);
PyTorch differentiates it twice. The reference composes the formula from elementwise ops.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _checks
from ..backend import register_op, select

IMPLEMENTED = ("torch",)
AUTO = {"cpu": ("torch",), "cuda": ("torch",)}
register_op("batched_batch_norm", IMPLEMENTED, AUTO)


def batched_batch_norm_ref(x, weight=None, bias=None, eps=1e-5, running_mean=None, running_var=None):
    T, N, C = x.shape[:3]
    bshape = (T, 1, C) + (1,) * (x.dim() - 3)
    if running_mean is not None:
        mean = running_mean.view(1, 1, C, *([1] * (x.dim() - 3)))
        var = running_var.view(1, 1, C, *([1] * (x.dim() - 3)))
    else:
        dims = (1,) + tuple(range(3, x.dim()))
        mean = x.mean(dim=dims, keepdim=True)
        var = (x - mean).pow(2).mean(dim=dims, keepdim=True)
    y = (x - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * (weight if weight.dim() == 2 else weight.expand(T, C)).reshape(bshape)
    if bias is not None:
        y = y + (bias if bias.dim() == 2 else bias.expand(T, C)).reshape(bshape)
    return y


def batched_batch_norm(x, weight=None, bias=None, eps=1e-5, running_mean=None, running_var=None, *,
                       batch_stats=None):
    """Per-task BatchNorm (see module docstring). batch_stats: None, or a list to which the call
    appends (mean, var) [T, C], each task's batch mean and unbiased variance per channel, made by
    the same kernel (for running statistics; batch statistics only)."""
    _checks.tensor("x", x, min_dim=3)
    T, C = x.shape[0], x.shape[2]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and tuple(p.shape) not in ((T, C), (C,)):
            raise ValueError(f"batched_batch_norm: {name} {tuple(p.shape)} must be [T={T}, C={C}] or "
                             f"[C={C}] for x {tuple(x.shape)}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("batched_batch_norm: give both running_mean and running_var, or neither")
    if batch_stats is not None and (not isinstance(batch_stats, list) or running_mean is not None):
        raise ValueError(f"batched_batch_norm: batch_stats must be a list (got {type(batch_stats).__name__}) and "
                         "needs batch statistics (no running_mean / running_var)")
    select("batched_batch_norm", x.device.type)
    return _torch_impl(x, weight, bias, eps, running_mean, running_var, batch_stats)


def _torch_impl(x, weight, bias, eps, running_mean, running_var, batch_stats=None):
    T, N, C = x.shape[:3]
    spatial = x.shape[3:]
    xf = x.transpose(0, 1).reshape(N, T * C, *spatial)  # a view when x is task-inner already
    def fold(p):
        return None if p is None else (p if p.dim() == 2 else p.expand(T, C)).reshape(T * C)
    rm = None if running_mean is None else running_mean.repeat(T)
    rv = None if running_var is None else running_var.repeat(T)
    momentum = 0.1
    if running_mean is None:
        # a training-mode update with momentum 1 leaves the batch's own statistics in rm, rv (for
        # batch_stats; made on every call, so that a recomputation that does not ask for them, as
        # a checkpointed pass in the backward, saves the same tensors as the first run)
        rm, rv = x.new_zeros(T * C), x.new_ones(T * C)
        momentum = 1.0
    y = F.batch_norm(xf, rm, rv, fold(weight), fold(bias), training=running_mean is None, momentum=momentum, eps=eps)
    if batch_stats is not None:
        batch_stats.append((rm.view(T, C), rv.view(T, C)))
    return y.view(N, T, C, *spatial).transpose(0, 1)
