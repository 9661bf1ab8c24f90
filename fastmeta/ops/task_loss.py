"""Per-task losses: ``mse`` and ``cross_entropy``, each returning one loss per task, [T].

    mse(pred [T, ...], target [T, ...])          = mean over all non-task elements of (pred - target)^2
    cross_entropy(logits [T, N, C], labels [T, N]) = mean over N of -log softmax(logits)[label]
                                                   (labels in [0, C), checked)

Backends: ``torch`` (autograd on these references, twice differentiable) and ``triton``
(kernels/task_loss.py: loss and gradient in one pass, registered as fastmeta::mse_triton /
fastmeta::cross_entropy_triton; backward uses the kernel's gradient, or differentiable torch ops
when a graph of the backward is wanted, so second order composes).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .. import _checks
from ..backend import register_op, select

IMPLEMENTED = ("torch", "triton")
# triton stays second on CUDA until the GPU benchmark has measured it
AUTO = {"cpu": ("torch",), "cuda": ("torch", "triton")}
register_op("cross_entropy", IMPLEMENTED, AUTO)
register_op("mse", IMPLEMENTED, AUTO)


def mse_ref(pred, target):
    return (pred - target).pow(2).flatten(1).mean(1)


def cross_entropy_ref(logits, labels):
    T, N, C = logits.shape
    return F.cross_entropy(logits.reshape(T * N, C), labels.reshape(T * N), reduction="none").view(T, N).mean(1)


@functools.cache
def _register_triton():
    from ..kernels.task_loss import cross_entropy_fwd, mse_fwd

    @torch.library.custom_op("fastmeta::mse_triton", mutates_args=())
    def _mse(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return mse_fwd(pred, target)

    @_mse.register_fake
    def _(pred, target):
        return pred.new_empty(pred.shape[0]), torch.empty_like(pred, memory_format=torch.contiguous_format)

    @torch.library.custom_op("fastmeta::cross_entropy_triton", mutates_args=())
    def _ce(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return cross_entropy_fwd(logits, labels)

    @_ce.register_fake
    def _(logits, labels):
        return logits.new_empty(logits.shape[0]), torch.empty_like(logits, memory_format=torch.contiguous_format)


def _per_task(go, like):
    return go.view(-1, *([1] * (like.dim() - 1)))


class _TritonMSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred, target):
        loss, grad = torch.ops.fastmeta.mse_triton(pred, target)
        ctx.save_for_backward(pred, target, grad)
        return loss

    @staticmethod
    def backward(ctx, go):
        pred, target, grad = ctx.saved_tensors
        if torch.is_grad_enabled():  # a graph of this backward is wanted: differentiable ops
            grad = 2 * (pred - target) / pred[0].numel()
        g = _per_task(go, pred) * grad
        return g, -g if ctx.needs_input_grad[1] else None


class _TritonCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels):
        loss, grad = torch.ops.fastmeta.cross_entropy_triton(logits, labels)
        ctx.save_for_backward(logits, labels, grad)
        return loss

    @staticmethod
    def backward(ctx, go):
        logits, labels, grad = ctx.saved_tensors
        if torch.is_grad_enabled():
            onehot = F.one_hot(labels.long(), logits.shape[-1]).to(logits.dtype)
            grad = (torch.softmax(logits, -1) - onehot) / logits.shape[1]
        return _per_task(go, logits) * grad, None


def mse(pred, target):
    """Per-task mean squared error, [T]."""
    _checks.tensor("pred", pred, min_dim=1)
    _checks.tensor("target", target, min_dim=1)
    if pred.shape != target.shape:
        raise ValueError(f"mse: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    _checks.floating("target", target)
    _checks.same_device_dtype([("pred", pred), ("target", target)])
    if select("mse", pred.device.type) == "triton" and pred.dtype in _checks.KERNEL_DTYPES:
        _register_triton()
        return _TritonMSE.apply(pred, target)
    return mse_ref(pred, target)


def cross_entropy(logits, labels):
    """Per-task mean cross-entropy of logits [T, N, C] against integer labels [T, N], [T].

    Labels are class indices in [0, C), checked on their values (a device sync on CUDA; skipped
    within ``fastmeta._checks.labels_checked()``): F.cross_entropy's ignore_index has no
    counterpart here."""
    _checks.tensor("logits", logits, dim=3)
    _checks.tensor("labels", labels, dim=2)
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"cross_entropy: labels must be integer class indices, got dtype {labels.dtype}")
    if tuple(labels.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"cross_entropy: labels {tuple(labels.shape)} must be [T, N] = "
                         f"{tuple(logits.shape[:2])} for logits {tuple(logits.shape)}")
    if labels.device != logits.device:
        raise ValueError(f"cross_entropy: labels on {labels.device} but logits on {logits.device}")
    _checks.labels_in_range([("labels", labels)], logits.shape[-1], "cross_entropy")
    if select("cross_entropy", logits.device.type) == "triton" and logits.dtype in _checks.KERNEL_DTYPES:
        _register_triton()
        return _TritonCrossEntropy.apply(logits, labels.long())
    return cross_entropy_ref(logits, labels.long())
