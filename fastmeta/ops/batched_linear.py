"""``batched_linear``: per-task linear layer with the activation fused.

    y[t] = act(x[t] @ W[t]^T + b[t])     x [T, N, I], W [T, O, I] or [O, I], b [T, O] or [O] or None
    -> [T, N, O]

A weight without the task dim is shared by all tasks (step 0 of an inner loop). act is one of
None, 'relu', 'leaky_relu', 'tanh', 'sigmoid'. Backward is autograd of the reference (differentiable
twice). Backends: ``torch``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _checks
from ..backend import register_op, select

IMPLEMENTED = ("torch",)
AUTO = {"cpu": ("torch",), "cuda": ("torch",)}
register_op("batched_linear", IMPLEMENTED, AUTO)
ACTIVATIONS = (None, "relu", "leaky_relu", "tanh", "sigmoid")


def apply_activation(y, activation, negative_slope=0.01):
    if activation is None:
        return y
    if activation == "relu":
        return torch.relu(y)
    if activation == "leaky_relu":
        return F.leaky_relu(y, negative_slope)
    if activation == "tanh":
        return torch.tanh(y)
    if activation == "sigmoid":
        return torch.sigmoid(y)
    raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")


def batched_linear_ref(x, W, b=None, activation=None, negative_slope=0.01):
    """Pure-PyTorch reference."""
    y = torch.matmul(x, W.transpose(-1, -2))
    if b is not None:
        y = y + b.unsqueeze(-2)
    return apply_activation(y, activation, negative_slope)


def _check(x, W, b, activation):
    _checks.tensor("x", x, dim=3)
    _checks.tensor("W", W)
    T, N, I = x.shape
    if W.dim() == 3:
        if W.shape[0] != T or W.shape[2] != I:
            raise ValueError(f"batched_linear: W {tuple(W.shape)} does not match x {tuple(x.shape)} "
                             f"(expected [T={T}, O, I={I}])")
    elif W.dim() == 2:
        if W.shape[1] != I:
            raise ValueError(f"batched_linear: W {tuple(W.shape)} does not match x {tuple(x.shape)} "
                             f"(expected [O, I={I}])")
    else:
        raise ValueError(f"batched_linear: W must be [T, O, I] or [O, I], got {tuple(W.shape)}")
    O = W.shape[-2]
    if b is not None:
        _checks.tensor("b", b)
        if tuple(b.shape) not in ((T, O), (O,)):
            raise ValueError(f"batched_linear: b {tuple(b.shape)} must be [T={T}, O={O}] or [O={O}]")
    _checks.same_device_dtype([("x", x), ("W", W)] + ([("b", b)] if b is not None else []))
    if activation not in ACTIVATIONS:
        raise ValueError(f"batched_linear: activation must be one of {ACTIVATIONS}, got {activation!r}")


def batched_linear(x, W, b=None, activation=None, negative_slope=0.01):
    """Per-task linear + activation (see module docstring)."""
    _check(x, W, b, activation)
    select("batched_linear", x.device.type)
    return batched_linear_ref(x, W, b, activation, negative_slope)
