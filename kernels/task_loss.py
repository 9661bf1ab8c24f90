"""Triton: per-task losses with their gradient in the same pass.

    mse:           loss[t] = mean_j (pred[t, j] - target[t, j])^2,   grad = 2 (pred - target) / M
    cross-entropy: loss[t] = mean_n (logsumexp(z[t, n]) - z[t, n, y]),  grad = (softmax(z) - onehot) / N

One program per task; the gradient is written while the loss is reduced, so a first-order use
(autograd without create_graph) costs no second pass. fastmeta/ops/task_loss.py uses the saved
gradient then, and differentiable torch ops when a graph of the backward is wanted.
"""
import triton
import triton.language as tl


@triton.jit
def _mse_fwd_kernel(pred_ptr, target_ptr, loss_ptr, grad_ptr, M: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), dtype=pred_ptr.dtype.element_ty)
    inv = 1.0 / tl.full((), M, dtype=pred_ptr.dtype.element_ty)
    for j0 in range(0, M, BLOCK):
        j = j0 + offs
        m = j < M
        d = tl.load(pred_ptr + t * M + j, mask=m, other=0.0) - tl.load(target_ptr + t * M + j, mask=m, other=0.0)
        acc += d * d
        tl.store(grad_ptr + t * M + j, 2.0 * d * inv, mask=m)
    tl.store(loss_ptr + t, tl.sum(acc, axis=0) * inv)


@triton.jit
def _ce_fwd_kernel(z_ptr, y_ptr, loss_ptr, grad_ptr, C, N: tl.constexpr, BLOCK_C: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    cm = cols < C
    inv = 1.0 / tl.full((), N, dtype=z_ptr.dtype.element_ty)
    total = tl.zeros((BLOCK_C,), dtype=z_ptr.dtype.element_ty)
    for n in range(0, N):
        row = z_ptr + (t * N + n) * C
        z = tl.load(row + cols, mask=cm, other=float("-inf"))
        label = tl.load(y_ptr + t * N + n)
        mx = tl.max(z, axis=0)
        e = tl.where(cm, tl.exp(z - mx), 0.0)
        s = tl.sum(e, axis=0)
        onehot = tl.where(cols == label, 1.0, 0.0)
        tl.store(grad_ptr + (t * N + n) * C + cols, (e / s - onehot) * inv, mask=cm)
        picked = tl.sum(tl.where(cols == label, z, 0.0), axis=0)
        total += tl.where(cols == 0, tl.log(s) + mx - picked, 0.0)
    tl.store(loss_ptr + t, tl.sum(total, axis=0) * inv)


def mse_fwd(pred, target):
    """(loss [T], grad like pred) for pred, target [T, ...]."""
    import torch

    T = pred.shape[0]
    M = pred[0].numel()
    p, q = pred.contiguous(), target.contiguous()
    loss = torch.empty(T, device=pred.device, dtype=pred.dtype)
    grad = torch.empty_like(p)
    _mse_fwd_kernel[(T,)](p, q, loss, grad, M=M, BLOCK=min(1024, max(16, triton.next_power_of_2(M))))
    return loss, grad


def cross_entropy_fwd(logits, labels):
    """(loss [T], grad like logits) for logits [T, N, C] and integer labels [T, N]."""
    import torch

    T, N, C = logits.shape
    z, y = logits.contiguous(), labels.contiguous().long()
    loss = torch.empty(T, device=logits.device, dtype=logits.dtype)
    grad = torch.empty_like(z)
    _ce_fwd_kernel[(T,)](z, y, loss, grad, C, N=N, BLOCK_C=max(16, triton.next_power_of_2(C)))
    return loss, grad
