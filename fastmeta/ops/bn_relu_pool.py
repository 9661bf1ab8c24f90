"""``bn_relu_pool``: per-task BatchNorm (batch statistics) -> ReLU -> MaxPool2d(2), the tail of a
conv4 block, as one op.

    x [T, N, C, H, W]; weight, bias [T, C] or [C] or None  ->  [T, N, C, H // 2, W // 2]

The reference composes batched_batch_norm (training-mode statistics of each task's own batch),
relu and max_pool2d(2); PyTorch differentiates it twice. Backend ``cpp``: fastmeta::bn_relu_pool
(csrc/bn_relu_pool.cpp), one pass over the activations forward and one backward, float32/64 on CPU.
Backend ``cuda``: the same fastmeta::bn_relu_pool ops on CUDA tensors (csrc/cuda/bn_relu_pool.cu), one
thread block per (task, channel). Backend ``triton``: fastmeta::bn_relu_pool_triton
(kernels/bn_relu_pool.py), the same contract, one program per (task, channel).
Its backward runs the backward kernel. Where a graph of the backward is wanted (the create_graph=True
inner steps of second-order MAML), the backward is an op of its own whose derivative is a
closed-form double-backward kernel (fastmeta::bn_relu_pool_double_backward and its Triton twin,
two passes over the activations); a derivative of that (third order) recomputes through
differentiable torch ops, reading each window at the position the forward chose. The planner
lowers BatchNorm2d -> ReLU -> MaxPool2d(2) onto this op (BatchNorm with batch statistics; eval mode
with running statistics keeps the three separate steps).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .. import _checks
from ..backend import register_op, select
from ._layout import per_sample_2d
from .batched_batch_norm import batched_batch_norm

IMPLEMENTED = ("torch", "cpp", "cuda", "triton")
# cuda first on CUDA: in fastmeta.tune's per-op comparison on an H200 (Omniglot T=32, second order,
# triton convolutions) the block took 43.3 ms a meta-step with the cuda kernels, 43.9 with the
# Triton ones and 52.0 with the torch ops (benchmarks/RESULTS.md)
AUTO = {"cpu": ("cpp", "torch"), "cuda": ("cuda", "triton", "torch")}
register_op("bn_relu_pool", IMPLEMENTED, AUTO)


def bn_relu_pool_ref(x, weight=None, bias=None, eps=1e-5, batch_stats=None):
    """The reference: batched_batch_norm (batch statistics), relu, max_pool2d(2) per sample."""
    return per_sample_2d(F.relu(batched_batch_norm(x, weight, bias, eps, batch_stats=batch_stats)),
                         lambda b: F.max_pool2d(b, 2))


def _pool_at(r, idx):
    """The 2x2 windows of r [T, N, C, H, W] read at the positions idx [T, N, C, H/2, W/2] (0..3,
    row-major) that the forward chose: the recomputed backward routes the gradient where the fused
    forward took its maximum, even where float32 rounding would make max_pool2d pick another
    element of a near-tie. One gather on the flattened planes (no copy of the windows)."""
    T, N, C, H, W = r.shape
    Ho, Wo = idx.shape[-2:]
    rows = torch.arange(Ho, device=r.device).mul_(2 * W).view(Ho, 1)
    cols = torch.arange(Wo, device=r.device).mul_(2).view(1, Wo)
    k = idx.long()
    pos = (rows + cols) + (k // 2) * W + (k % 2)  # window position 0..3 -> offset 0, 1, W, W + 1
    return r.flatten(3).gather(-1, pos.flatten(3)).view(T, N, C, Ho, Wo)


def task_inner(x) -> bool:
    """Whether x [T, N, C, H, W] is task-inner ([N, T, C, H, W] in memory, as batched_conv2d
    returns it) and not also contiguous. The kernels take x in either layout as it is (any other is
    copied to contiguous) and write y, idx and dx in x's layout (csrc/common.h)."""
    return x.dim() == 5 and not x.is_contiguous() and x.transpose(0, 1).is_contiguous()


def _empty_like_layout(x, *shape, dtype=None):
    """An empty [T, N, C, *shape] tensor in the layout the kernels give x's outputs."""
    T, N, C = x.shape[:3]
    if task_inner(x):
        return x.new_empty(N, T, C, *shape, dtype=dtype).transpose(0, 1)
    return x.new_empty(T, N, C, *shape, dtype=dtype)


def _fwd_fake(x, weight, bias, eps):
    T, N, C, H, W = x.shape
    y = _empty_like_layout(x, H // 2, W // 2)
    return y, _empty_like_layout(x, H // 2, W // 2, dtype=torch.uint8), x.new_empty(T, C), x.new_empty(T, C)


def _bwd_fake(gy, x, weight, idx, y, mean, invstd):
    return _empty_like_layout(x, *x.shape[3:]), weight.new_empty(weight.shape), weight.new_empty(weight.shape)


def _dbwd_fake(ggx, ggw, ggb, gy, x, weight, idx, y, mean, invstd):
    return (_empty_like_layout(x, *y.shape[3:]), _empty_like_layout(x, *x.shape[3:]),
            x.new_empty(x.shape[0], x.shape[2]))


@functools.cache
def _register_cpp():
    torch.library.register_fake("fastmeta::bn_relu_pool")(_fwd_fake)
    torch.library.register_fake("fastmeta::bn_relu_pool_backward")(_bwd_fake)
    torch.library.register_fake("fastmeta::bn_relu_pool_double_backward")(_dbwd_fake)


def _in_layout(t, inner):
    """t [T, N, C, h, w] contiguous in the task-inner layout if inner, else task-major."""
    return t.transpose(0, 1).contiguous().transpose(0, 1) if inner else t.contiguous()


@functools.cache
def _register_triton():
    from ..kernels.bn_relu_pool import bn_relu_pool_bwd, bn_relu_pool_dbwd, bn_relu_pool_fwd

    @torch.library.custom_op("fastmeta::bn_relu_pool_triton", mutates_args=())
    def _fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
             eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return bn_relu_pool_fwd(_in_layout(x, task_inner(x)), weight.contiguous(), bias.contiguous(), eps)

    _fwd.register_fake(_fwd_fake)

    @torch.library.custom_op("fastmeta::bn_relu_pool_backward_triton", mutates_args=())
    def _bwd(gy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, idx: torch.Tensor, y: torch.Tensor,
             mean: torch.Tensor, invstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        inner = task_inner(x)
        return bn_relu_pool_bwd(*(_in_layout(t, inner) for t in (gy, x)), weight.contiguous(),
                                *(_in_layout(t, inner) for t in (idx, y)), mean.contiguous(), invstd.contiguous())

    _bwd.register_fake(_bwd_fake)

    @torch.library.custom_op("fastmeta::bn_relu_pool_double_backward_triton", mutates_args=())
    def _dbwd(ggx: torch.Tensor | None, ggw: torch.Tensor, ggb: torch.Tensor, gy: torch.Tensor, x: torch.Tensor,
              weight: torch.Tensor, idx: torch.Tensor, y: torch.Tensor, mean: torch.Tensor,
              invstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        inner = task_inner(x)
        return bn_relu_pool_dbwd(None if ggx is None else _in_layout(ggx, inner), ggw.contiguous(), ggb.contiguous(),
                                 *(_in_layout(t, inner) for t in (gy, x)), weight.contiguous(),
                                 *(_in_layout(t, inner) for t in (idx, y)), mean.contiguous(), invstd.contiguous())

    _dbwd.register_fake(_dbwd_fake)


def _kernels(backend):
    """(forward, backward, double backward) ops of the fused backend: C++ (cpp, and cuda: the same
    ops' CUDA kernels) or Triton (triton)."""
    ops = torch.ops.fastmeta
    if backend == "triton":
        _register_triton()
        return ops.bn_relu_pool_triton, ops.bn_relu_pool_backward_triton, ops.bn_relu_pool_double_backward_triton
    _register_cpp()
    return ops.bn_relu_pool, ops.bn_relu_pool_backward, ops.bn_relu_pool_double_backward


def _reference_backward_fn(gy, x, weight, bias, idx, eps):
    """(dx, dweight, dbias): the reference's backward for the output gradient gy at the forward's
    windows idx, as a function of (gy, x, weight, bias) that torch.func can differentiate."""
    _, vjp = torch.func.vjp(lambda a, w, b: _pool_at(F.relu(batched_batch_norm(a, w, b, eps)), idx), x, weight, bias)
    return vjp(gy)


def append_stats(stats: list, shape, mean, invstd, eps: float) -> None:
    """Appends (mean, unbiased variance) [T, C] to stats, from the kernel's mean and invstd =
    1 / sqrt(var + eps) of its input of shape [T, N, C, H, W]."""
    n = shape[1] * shape[3] * shape[4]
    stats.append((mean.detach().clone(), (invstd.detach().pow(-2) - eps) * (n / max(n - 1, 1))))


class _BNReLUPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, backend, stats=None):
        fwd, ctx.bwd, ctx.dbwd = _kernels(backend)
        y, idx, mean, invstd = fwd(x, weight, bias, eps)
        if stats is not None:
            append_stats(stats, x.shape, mean, invstd, eps)
        ctx.save_for_backward(x, weight, bias, idx, y, mean, invstd)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, gy):
        x, weight, bias, idx, y, mean, invstd = ctx.saved_tensors
        need = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph=True: a differentiable backward
            grads = _BNReLUPoolBackward.apply(gy, x, weight, bias, idx, y, mean, invstd, ctx.eps, ctx.bwd, ctx.dbwd)
        else:
            grads = ctx.bwd(gy, x, weight, idx, y, mean, invstd)
        return tuple(g if n else None for g, n in zip(grads, need)) + (None, None, None)


class _BNReLUPoolBackward(torch.autograd.Function):
    """bn_relu_pool's backward (gy, x, weight) -> (dx, dweight, dbias) as a differentiable op: its
    derivative is the closed-form double-backward kernel; one taken with a graph (third order)
    recomputes through the reference."""

    @staticmethod
    def forward(ctx, gy, x, weight, bias, idx, y, mean, invstd, eps, bwd, dbwd):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(gy, x, weight, bias, idx, y, mean, invstd)
        ctx.eps, ctx.dbwd = eps, dbwd
        return bwd(gy, x, weight, idx, y, mean, invstd)

    @staticmethod
    def backward(ctx, ggx, ggw, ggb):
        gy, x, weight, bias, idx, y, mean, invstd = ctx.saved_tensors
        need = ctx.needs_input_grad[:3]
        none = (None,) * 8
        if ggx is None and ggw is None and ggb is None:
            return (None,) * 3 + none
        if torch.is_grad_enabled():  # third order: through the reference, with a graph
            # partial derivatives in (gy, x, weight) of the reference backward, by torch.func.vjp:
            # torch.autograd.grad would also follow gy's own dependence on x and weight (gy is a
            # function of the forward's output in any loss) and count those paths twice
            _, vjp = torch.func.vjp(lambda *a: _reference_backward_fn(*a, idx, ctx.eps), gy, x, weight, bias)
            cots = tuple(torch.zeros_like(t) if g is None else g for g, t in zip((ggx, ggw, ggb), (x, weight, bias)))
            g_gy, g_x, g_w, _ = vjp(cots)
            return (g_gy if need[0] else None, g_x if need[1] else None, g_w if need[2] else None) + none
        T, C = mean.shape
        ggw = mean.new_zeros(T, C) if ggw is None else ggw
        ggb = mean.new_zeros(T, C) if ggb is None else ggb
        g_gy, g_x, g_w = ctx.dbwd(ggx, ggw, ggb, gy, x, weight, idx, y, mean, invstd)
        return (g_gy if need[0] else None, g_x if need[1] else None, g_w if need[2] else None) + none


def bn_relu_pool(x, weight=None, bias=None, eps=1e-5, *, batch_stats=None):
    """Per-task BatchNorm -> ReLU -> MaxPool2d(2) (see module docstring). batch_stats: None, or a
    list to which the call appends (mean, var) [T, C], each task's batch mean and unbiased variance
    per channel, from the statistics the kernel normalized with (for running statistics)."""
    _checks.tensor("x", x, dim=5)
    T, N, C, H, W = x.shape
    check_affine(x, tuple(x.shape), weight, bias)
    if batch_stats is not None and not isinstance(batch_stats, list):
        raise ValueError(f"bn_relu_pool: batch_stats must be a list, got {type(batch_stats).__name__}")
    backend = fused_backend(x)
    if backend is None:
        return bn_relu_pool_ref(x, weight, bias, eps, batch_stats)
    return _BNReLUPool.apply(x, per_task(x, weight, 1.0, T, C), per_task(x, bias, 0.0, T, C), float(eps), backend,
                             batch_stats)


def check_affine(like, shape, weight, bias, op="bn_relu_pool", what="x"):
    """bn_relu_pool's checks of weight and bias against its input's shape [T, N, C, H, W] (like:
    a tensor of the input's device and dtype)."""
    T, N, C, H, W = shape
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and tuple(p.shape) not in ((T, C), (C,)):
            raise ValueError(f"{op}: {name} {tuple(p.shape)} must be [T={T}, C={C}] or [C={C}] for {what} "
                             f"{tuple(shape)}")
    _checks.same_device_dtype([("x", like)] + [(n, p) for n, p in (("weight", weight), ("bias", bias)) if p is not None])
    if H < 2 or W < 2:
        raise ValueError(f"{op}: {what} {tuple(shape)} is smaller than the 2x2 pooling window")


def fused_backend(x):
    """The fused backend a bn_relu_pool call on x takes, or None where that is the reference."""
    backend = select("bn_relu_pool", x.device.type)
    if backend not in ("cpp", "cuda", "triton") or x.dtype not in _checks.KERNEL_DTYPES or x.numel() == 0:
        return None
    return backend


def per_task(like, p, fill, T, C):
    """A weight or bias as the kernels take it, [T, C]: p as it is, [C] expanded, or None filled
    (a new tensor with like's dtype and device)."""
    if p is None:
        return like.new_full((T, C), fill)
    return p if p.dim() == 2 else p.expand(T, C)
