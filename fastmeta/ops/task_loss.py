"""Per-task losses: ``mse`` and ``cross_entropy``, each returning one loss per task, [T].

    mse(pred [T, ...], target [T, ...])          = mean over all non-task elements of (pred - target)^2
    cross_entropy(logits [T, N, C], labels [T, N]) = mean over N of -log softmax(logits)[label]

Their gradients and Hessian-vector products come from autograd on these references (twice
differentiable). Backends: ``torch``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _checks
from ..backend import register_op, select

IMPLEMENTED = ("torch",)
AUTO = {"cpu": ("torch",), "cuda": ("torch",)}
register_op("cross_entropy", IMPLEMENTED, AUTO)
register_op("mse", IMPLEMENTED, AUTO)


def mse_ref(pred, target):
    return (pred - target).pow(2).flatten(1).mean(1)


def cross_entropy_ref(logits, labels):
    T, N, C = logits.shape
    return F.cross_entropy(logits.reshape(T * N, C), labels.reshape(T * N), reduction="none").view(T, N).mean(1)


def mse(pred, target):
    """Per-task mean squared error, [T]."""
    _checks.tensor("pred", pred, min_dim=1)
    _checks.tensor("target", target, min_dim=1)
    if pred.shape != target.shape:
        raise ValueError(f"mse: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    _checks.floating("target", target)
    _checks.same_device_dtype([("pred", pred), ("target", target)])
    select("mse", pred.device.type)
    return mse_ref(pred, target)


def cross_entropy(logits, labels):
    """Per-task mean cross-entropy of logits [T, N, C] against integer labels [T, N], [T]."""
    _checks.tensor("logits", logits, dim=3)
    _checks.tensor("labels", labels, dim=2)
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"cross_entropy: labels must be integer class indices, got dtype {labels.dtype}")
    if tuple(labels.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"cross_entropy: labels {tuple(labels.shape)} must be [T, N] = "
                         f"{tuple(logits.shape[:2])} for logits {tuple(logits.shape)}")
    if labels.device != logits.device:
        raise ValueError(f"cross_entropy: labels on {labels.device} but logits on {logits.device}")
    select("cross_entropy", logits.device.type)
    return cross_entropy_ref(logits, labels.long())
