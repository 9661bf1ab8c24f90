"""``batched_linear``: per-task linear layer with the activation fused.

    y[t] = act(x[t] @ W[t]^T + b[t])     x [T, N, I], W [T, O, I] or [O, I], b [T, O] or [O] or None
    -> [T, N, O]

A weight without the task dim is shared by all tasks (step 0 of an inner loop). act is one of
None, 'relu', 'leaky_relu', 'tanh', 'sigmoid', 'gelu', 'gelu_tanh' (GELU's tanh form), 'silu'.
Backends: ``torch`` (autograd of the reference, differentiable twice) and ``triton``
(kernels/batched_linear.py, for the first five: the GEMM with bias and activation fused in its
epilogue, registered as fastmeta::batched_linear_triton; its backward uses
differentiable torch ops on the saved output, so second order composes).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .. import _checks
from ..backend import register_op, select

IMPLEMENTED = ("torch", "triton")
# triton stays second on CUDA until the GPU benchmark has measured it against cuBLAS + epilogue ops
AUTO = {"cpu": ("torch",), "cuda": ("torch", "triton")}
register_op("batched_linear", IMPLEMENTED, AUTO)
ACTIVATIONS = (None, "relu", "leaky_relu", "tanh", "sigmoid", "gelu", "gelu_tanh", "silu")


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
    if activation == "gelu":
        return F.gelu(y)
    if activation == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    if activation == "silu":
        return F.silu(y)
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


_CODES = {None: 0, "relu": 1, "leaky_relu": 2, "tanh": 3, "sigmoid": 4}
@functools.cache
def _register_triton():
    from ..kernels.batched_linear import batched_linear_fwd

    @torch.library.custom_op("fastmeta::batched_linear_triton", mutates_args=())
    def _op(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None, act: int, negative_slope: float) -> torch.Tensor:
        return batched_linear_fwd(x, W, b, act, negative_slope)

    @_op.register_fake
    def _(x, W, b, act, negative_slope):
        return x.new_empty(x.shape[0], x.shape[1], W.shape[-2])


def _act_grad(y, activation, negative_slope):
    """act'(z) from y = act(z), with differentiable torch ops (for slope > 0, y > 0 iff z > 0)."""
    if activation is None:
        return None
    if activation == "relu":
        return (~(y <= 0)).to(y.dtype)  # 1 at NaN, as torch.relu's derivative
    if activation == "leaky_relu":
        return torch.where(y > 0, torch.ones_like(y), torch.full_like(y, negative_slope))
    if activation == "tanh":
        return 1 - y * y
    return y * (1 - y)


class _TritonBatchedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W, b, activation, negative_slope):
        _register_triton()
        y = torch.ops.fastmeta.batched_linear_triton(x, W, b, _CODES[activation], float(negative_slope))
        ctx.save_for_backward(x, W, y)
        ctx.activation, ctx.slope, ctx.has_b = activation, negative_slope, b is not None
        ctx.b_shape = None if b is None else b.shape
        return y

    @staticmethod
    def backward(ctx, gy):
        x, W, y = ctx.saved_tensors
        d = _act_grad(y, ctx.activation, ctx.slope)
        dz = gy if d is None else gy * d
        dx = torch.matmul(dz, W)  # W [T, O, I] or [O, I]
        dW = torch.matmul(dz.transpose(-1, -2), x)
        if W.dim() == 2:
            dW = dW.sum(0)
        db = None
        if ctx.has_b:
            db = dz.sum(1)
            if len(ctx.b_shape) == 1:
                db = db.sum(0)
        return dx, dW, db, None, None


def batched_linear(x, W, b=None, activation=None, negative_slope=0.01):
    """Per-task linear + activation (see module docstring)."""
    _check(x, W, b, activation)
    backend = select("batched_linear", x.device.type)
    if (backend == "triton" and activation in _CODES and not (activation == "leaky_relu" and negative_slope <= 0)
            and x.dtype in _checks.KERNEL_DTYPES):
        return _TritonBatchedLinear.apply(x, W, b, activation, negative_slope)
    return batched_linear_ref(x, W, b, activation, negative_slope)
