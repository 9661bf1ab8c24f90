"""Triton: per-task BatchNorm (batch statistics) -> ReLU -> MaxPool2d(2) and its backward, the same
contract as the C++ op (csrc/bn_relu_pool.cpp):

    x [T, N, C, H, W] contiguous, weight/bias [T, C]; per task t and channel c over (N, H, W):
    mean, var (biased), invstd = 1 / sqrt(var + eps), z = (x - mean) invstd w + b,
    y = the max of each 2x2 window (stride 2, floor) of relu(z)  [T, N, C, H/2, W/2],
    idx = the window position (0..3, row-major) of its first maximum (uint8).
    backward: g_z = gy at (window, idx) where y > 0, else 0; dbias = sum g_z, dweight = sum g_z xhat,
    dx = w invstd (g_z - dbias / M - xhat dweight / M), M = N H W.

One program per (task, channel): the forward makes two passes over the channel's elements for
the statistics (mean, then the centred variance) and one over its output windows; the backward one
over the windows (the two sums) and one over the input elements (each reads its window's gradient
and index: a gather, no scatter). Accumulation in float32 for float32 inputs (block sums), float64
for float64.
"""
import triton
import triton.language as tl


@triton.jit
def _window(m, P, Wo):
    """Window m of a channel's N x Ho x Wo windows (P = Ho Wo): its image n (int64), its position q
    in the pooled plane, and its row i and column j there."""
    q = m % P
    return (m // P).to(tl.int64), q, q // Wo, q % Wo


@triton.jit
def _bn_relu_pool_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, idx_ptr, mean_ptr, invstd_ptr,
                             N, C, H, W, Ho, Wo, eps,
                             BLOCK: tl.constexpr, F64: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # t * C + c
    t = pid // C
    c = pid % C
    acc_t = tl.float64 if F64 else tl.float32
    HW = H * W
    M = N * HW
    base = x_ptr + (t * N * C + c) * HW  # element (n, h, w) at base + n * C * HW + h * W + w
    r = tl.arange(0, BLOCK)
    total = tl.zeros((BLOCK,), dtype=acc_t)
    m0 = 0
    while m0 < M:
        m = m0 + r
        n = m // HW
        v = tl.load(base + n.to(tl.int64) * C * HW + m % HW, mask=m < M, other=0.0)
        total += v.to(acc_t)
        m0 += BLOCK
    mean = tl.sum(total, axis=0) / M
    sq = tl.zeros((BLOCK,), dtype=acc_t)
    m0 = 0
    while m0 < M:
        m = m0 + r
        n = m // HW
        v = tl.load(base + n.to(tl.int64) * C * HW + m % HW, mask=m < M, other=0.0).to(acc_t)
        d = tl.where(m < M, v - mean, 0.0)
        sq += d * d
        m0 += BLOCK
    var = tl.sum(sq, axis=0) / M
    invstd = 1.0 / tl.sqrt(var + eps)
    tl.store(mean_ptr + pid, mean)
    tl.store(invstd_ptr + pid, invstd)
    wv = tl.load(w_ptr + pid).to(acc_t)
    bv = tl.load(b_ptr + pid).to(acc_t)
    scale = wv * invstd
    shift = bv - mean * scale
    P = Ho * Wo
    MO = N * P
    obase = (t * N * C + c) * P  # window (n, i, j) at obase + n * C * P + i * Wo + j
    m0 = 0
    while m0 < MO:
        m = m0 + r
        ok = m < MO
        n, q, i, j = _window(m, P, Wo)
        p0 = base + n * C * HW + (2 * i) * W + 2 * j
        z0 = tl.load(p0, mask=ok, other=0.0).to(acc_t) * scale + shift
        z1 = tl.load(p0 + 1, mask=ok, other=0.0).to(acc_t) * scale + shift
        z2 = tl.load(p0 + W, mask=ok, other=0.0).to(acc_t) * scale + shift
        z3 = tl.load(p0 + W + 1, mask=ok, other=0.0).to(acc_t) * scale + shift
        # the first maximum in row-major order, as max_pool2d picks it ("not <=" lets a NaN win)
        u = ~(z1 <= z0)
        best = tl.where(u, z1, z0)
        k = tl.where(u, 1, 0)
        u = ~(z2 <= best)
        best = tl.where(u, z2, best)
        k = tl.where(u, 2, k)
        u = ~(z3 <= best)
        best = tl.where(u, z3, best)
        k = tl.where(u, 3, k)
        y = tl.where(~(best <= 0.0), best, 0.0)
        off = obase + n * C * P + q
        tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=ok)
        tl.store(idx_ptr + off, k.to(tl.uint8), mask=ok)
        m0 += BLOCK


@triton.jit
def _bn_relu_pool_bwd_kernel(gy_ptr, x_ptr, w_ptr, idx_ptr, y_ptr, mean_ptr, invstd_ptr,
                             dx_ptr, dw_ptr, db_ptr,
                             N, C, H, W, Ho, Wo,
                             BLOCK: tl.constexpr, F64: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    t = pid // C
    c = pid % C
    acc_t = tl.float64 if F64 else tl.float32
    HW = H * W
    M = N * HW
    P = Ho * Wo
    MO = N * P
    base = (t * N * C + c) * HW
    obase = (t * N * C + c) * P
    mean = tl.load(mean_ptr + pid).to(acc_t)
    invstd = tl.load(invstd_ptr + pid).to(acc_t)
    wv = tl.load(w_ptr + pid).to(acc_t)
    r = tl.arange(0, BLOCK)
    sg = tl.zeros((BLOCK,), dtype=acc_t)
    sgx = tl.zeros((BLOCK,), dtype=acc_t)
    m0 = 0
    while m0 < MO:  # over the windows: sum g_z, sum g_z (x - mean)
        m = m0 + r
        ok = m < MO
        n, q, i, j = _window(m, P, Wo)
        off = obase + n * C * P + q
        k = tl.load(idx_ptr + off, mask=ok, other=0).to(tl.int32)
        yv = tl.load(y_ptr + off, mask=ok, other=0.0)
        g = tl.where(ok & (yv > 0), tl.load(gy_ptr + off, mask=ok, other=0.0).to(acc_t), 0.0)
        xv = tl.load(x_ptr + base + n * C * HW + (2 * i + k // 2) * W + 2 * j + k % 2, mask=ok, other=0.0)
        sg += g
        sgx += g * (xv.to(acc_t) - mean)
        m0 += BLOCK
    dbias = tl.sum(sg, axis=0)
    dweight = tl.sum(sgx, axis=0) * invstd
    tl.store(db_ptr + pid, dbias)
    tl.store(dw_ptr + pid, dweight)
    wi = wv * invstd
    m0 = 0
    while m0 < M:  # over the input elements: each reads its window's gradient
        m = m0 + r
        ok = m < M
        n = (m // HW).to(tl.int64)
        e = m % HW
        h = e // W
        w = e % W
        i = h // 2
        j = w // 2
        inside = ok & (i < Ho) & (j < Wo)
        ooff = obase + n * C * P + i * Wo + j
        k = tl.load(idx_ptr + ooff, mask=inside, other=0).to(tl.int32)
        yv = tl.load(y_ptr + ooff, mask=inside, other=0.0)
        mine = inside & (k == (h % 2) * 2 + (w % 2)) & (yv > 0)
        g = tl.where(mine, tl.load(gy_ptr + ooff, mask=inside, other=0.0).to(acc_t), 0.0)
        xoff = base + n * C * HW + e
        xhat = (tl.load(x_ptr + xoff, mask=ok, other=0.0).to(acc_t) - mean) * invstd
        dx = wi * (g - dbias / M - xhat * dweight / M)
        tl.store(dx_ptr + xoff, dx.to(dx_ptr.dtype.element_ty), mask=ok)
        m0 += BLOCK


def _block(M):
    return max(64, min(1024, triton.next_power_of_2(max(int(M), 1))))


def bn_relu_pool_fwd(x, weight, bias, eps):
    """(y, idx, mean, invstd) for x [T, N, C, H, W] contiguous, weight/bias [T, C] contiguous."""
    import torch

    T, N, C, H, W = x.shape
    Ho, Wo = H // 2, W // 2
    y = torch.empty(T, N, C, Ho, Wo, device=x.device, dtype=x.dtype)
    idx = torch.empty(T, N, C, Ho, Wo, device=x.device, dtype=torch.uint8)
    mean = torch.empty(T, C, device=x.device, dtype=x.dtype)
    invstd = torch.empty(T, C, device=x.device, dtype=x.dtype)
    _bn_relu_pool_fwd_kernel[(T * C,)](x, weight, bias, y, idx, mean, invstd, N, C, H, W, Ho, Wo, float(eps),
                                       BLOCK=_block(N * H * W), F64=x.dtype == torch.float64)
    return y, idx, mean, invstd


def bn_relu_pool_bwd(gy, x, weight, idx, y, mean, invstd):
    """(dx, dweight, dbias); every tensor contiguous, as the forward returned or took them."""
    import torch

    T, N, C, H, W = x.shape
    Ho, Wo = H // 2, W // 2
    dx = torch.empty_like(x)
    dw = torch.empty(T, C, device=x.device, dtype=x.dtype)
    db = torch.empty(T, C, device=x.device, dtype=x.dtype)
    _bn_relu_pool_bwd_kernel[(T * C,)](gy, x, weight, idx, y, mean, invstd, dx, dw, db, N, C, H, W, Ho, Wo,
                                       BLOCK=_block(N * H * W), F64=x.dtype == torch.float64)
    return dx, dw, db
