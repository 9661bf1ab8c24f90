"""Layout helper shared by the ops and the planner."""
from __future__ import annotations


def per_sample_2d(x, fn):
    """fn, an op on [B, C, H, W] that treats each sample and channel alone (pooling), applied to
    x [T, N, C, H, W]. The task-inner layout that batched_conv2d and batched_batch_norm return
    ([N, T, C, H, W] in memory) is kept as it is, without a copy."""
    T, N = x.shape[:2]
    if x.transpose(0, 1).is_contiguous():
        y = fn(x.transpose(0, 1).reshape(N, -1, *x.shape[3:]))
        return y.view(N, T, x.shape[2], *y.shape[2:]).transpose(0, 1)
    y = fn(x.reshape(T * N, *x.shape[2:]))
    return y.view(T, N, *y.shape[1:])
