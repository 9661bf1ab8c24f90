"""Triton: per-task BatchNorm (batch statistics) -> ReLU -> MaxPool2d(2) and its backward, the same
contract as the C++ op (csrc/bn_relu_pool.cpp):

    x [T, N, C, H, W] with contiguous H x W planes, task-major (contiguous) or task-inner ([N, T, C,
    H, W] in memory, as batched_conv2d returns it; y, idx, gy and dx in x's layout: plane (t, n, c)
    at t ST + n SN + c planes), weight/bias [T, C]; per task t and channel c over (N, H, W):
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
def _saved_stats(pid, mean_ptr, invstd_ptr, w_ptr, acc_t: tl.constexpr):
    """Program pid's saved statistics and weight (mean, invstd, w) in the accumulation type."""
    return (tl.load(mean_ptr + pid).to(acc_t), tl.load(invstd_ptr + pid).to(acc_t),
            tl.load(w_ptr + pid).to(acc_t))


@triton.jit
def _channel(pid, C, N, H, W, Ho, Wo, ST):
    """Program pid's channel (t, c = pid // C, pid % C): its plane and pooled-plane sizes HW, P, its
    element and window counts M, MO, and the offsets of its first element in x and in y."""
    base = ((pid // C) * ST + pid % C)
    HW = H * W
    P = Ho * Wo
    return HW, P, N * HW, N * P, base * HW, base * P


@triton.jit
def _maxima(m, MO, P, Wo, W, HW, SN, base, obase, idx_ptr, y_ptr):
    """Windows m of a channel: in range (ok), passing the ReLU (live: y > 0), their offset in y, idx
    and gy, and the offset in x of the element each took its maximum at."""
    ok = m < MO
    n, q, i, j = _window(m, P, Wo)
    off = obase + n * SN * P + q
    k = tl.load(idx_ptr + off, mask=ok, other=0).to(tl.int32)
    live = ok & (tl.load(y_ptr + off, mask=ok, other=0.0) > 0)
    return ok, live, off, base + n * SN * HW + (2 * i + k // 2) * W + 2 * j + k % 2


@triton.jit
def _elements(m, M, HW, W, Ho, Wo, P, SN, base, obase, idx_ptr, y_ptr):
    """Elements m of a channel: in range (ok), their offset in x, their window's offset in y, idx and
    gy, and whether each is its window's maximum there and passes the ReLU (mine)."""
    ok = m < M
    n = (m // HW).to(tl.int64)
    e = m % HW
    h = e // W
    w = e % W
    inside = ok & (h // 2 < Ho) & (w // 2 < Wo)
    ooff = obase + n * SN * P + (h // 2) * Wo + w // 2
    k = tl.load(idx_ptr + ooff, mask=inside, other=0).to(tl.int32)
    yv = tl.load(y_ptr + ooff, mask=inside, other=0.0)
    return ok, base + n * SN * HW + e, ooff, inside & (k == (h % 2) * 2 + (w % 2)) & (yv > 0)


@triton.jit
def _bn_relu_pool_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, idx_ptr, mean_ptr, invstd_ptr,
                             N, C, H, W, Ho, Wo, ST, SN, eps,
                             BLOCK: tl.constexpr, F64: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # t * C + c
    acc_t = tl.float64 if F64 else tl.float32
    HW, P, M, MO, xb, obase = _channel(pid, C, N, H, W, Ho, Wo, ST)
    base = x_ptr + xb  # element (n, h, w) at base + n * SN * HW + h * W + w
    r = tl.arange(0, BLOCK)
    total = tl.zeros((BLOCK,), dtype=acc_t)
    m0 = 0
    while m0 < M:
        m = m0 + r
        n = m // HW
        v = tl.load(base + n.to(tl.int64) * SN * HW + m % HW, mask=m < M, other=0.0)
        total += v.to(acc_t)
        m0 += BLOCK
    mean = tl.sum(total, axis=0) / M
    sq = tl.zeros((BLOCK,), dtype=acc_t)
    m0 = 0
    while m0 < M:
        m = m0 + r
        n = m // HW
        v = tl.load(base + n.to(tl.int64) * SN * HW + m % HW, mask=m < M, other=0.0).to(acc_t)
        d = tl.where(m < M, v - mean, 0.0)
        sq += d * d
        m0 += BLOCK
    var = tl.sum(sq, axis=0) / M
    invstd = 1.0 / tl.sqrt(var + eps)
    tl.store(mean_ptr + pid, mean)
    tl.store(invstd_ptr + pid, invstd)
    wv = tl.load(w_ptr + pid).to(acc_t)
    bv = tl.load(b_ptr + pid).to(acc_t)
    # z = (x - mean) (w invstd) + b, as the reference: exact where x is the mean
    scale = wv * invstd
    # window (n, i, j) at obase + n * SN * P + i * Wo + j
    m0 = 0
    while m0 < MO:
        m = m0 + r
        ok = m < MO
        n, q, i, j = _window(m, P, Wo)
        p0 = base + n * SN * HW + (2 * i) * W + 2 * j
        z0 = (tl.load(p0, mask=ok, other=0.0).to(acc_t) - mean) * scale + bv
        z1 = (tl.load(p0 + 1, mask=ok, other=0.0).to(acc_t) - mean) * scale + bv
        z2 = (tl.load(p0 + W, mask=ok, other=0.0).to(acc_t) - mean) * scale + bv
        z3 = (tl.load(p0 + W + 1, mask=ok, other=0.0).to(acc_t) - mean) * scale + bv
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
        off = obase + n * SN * P + q
        tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=ok)
        tl.store(idx_ptr + off, k.to(tl.uint8), mask=ok)
        m0 += BLOCK


@triton.jit
def _bn_relu_pool_bwd_kernel(gy_ptr, x_ptr, w_ptr, idx_ptr, y_ptr, mean_ptr, invstd_ptr,
                             dx_ptr, dw_ptr, db_ptr,
                             N, C, H, W, Ho, Wo, ST, SN,
                             BLOCK: tl.constexpr, F64: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    acc_t = tl.float64 if F64 else tl.float32
    HW, P, M, MO, base, obase = _channel(pid, C, N, H, W, Ho, Wo, ST)
    mean, invstd, wv = _saved_stats(pid, mean_ptr, invstd_ptr, w_ptr, acc_t)
    r = tl.arange(0, BLOCK)
    sg = tl.zeros((BLOCK,), dtype=acc_t)
    sgx = tl.zeros((BLOCK,), dtype=acc_t)
    m0 = 0
    while m0 < MO:  # over the windows: sum g_z, sum g_z (x - mean)
        ok, live, off, xa = _maxima(m0 + r, MO, P, Wo, W, HW, SN, base, obase, idx_ptr, y_ptr)
        g = tl.where(live, tl.load(gy_ptr + off, mask=ok, other=0.0).to(acc_t), 0.0)
        xv = tl.load(x_ptr + xa, mask=ok, other=0.0)
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
        ok, xoff, ooff, mine = _elements(m0 + r, M, HW, W, Ho, Wo, P, SN, base, obase, idx_ptr, y_ptr)
        g = tl.where(mine, tl.load(gy_ptr + ooff, mask=mine, other=0.0).to(acc_t), 0.0)
        xhat = (tl.load(x_ptr + xoff, mask=ok, other=0.0).to(acc_t) - mean) * invstd
        dx = wi * (g - dbias / M - xhat * dweight / M)
        tl.store(dx_ptr + xoff, dx.to(dx_ptr.dtype.element_ty), mask=ok)
        m0 += BLOCK


def _block(M):
    return max(64, min(1024, triton.next_power_of_2(max(int(M), 1))))


def _plane_strides(x):
    """(ST, SN): the strides of x's task and sample dims in planes (the channel's is 1)."""
    T, N, C = x.shape[:3]
    return (C, T * C) if not x.is_contiguous() else (N * C, C)  # not contiguous: task-inner


def _like(x, h, w, dtype):
    """An empty [T, N, C, h, w] tensor in x's layout."""
    import torch

    T, N, C = x.shape[:3]
    if not x.is_contiguous():
        return torch.empty(N, T, C, h, w, device=x.device, dtype=dtype).transpose(0, 1)
    return torch.empty(T, N, C, h, w, device=x.device, dtype=dtype)


def bn_relu_pool_fwd(x, weight, bias, eps):
    """(y, idx, mean, invstd) for x [T, N, C, H, W] task-major (contiguous) or task-inner (y, idx
    in x's layout), weight/bias [T, C] contiguous."""
    import torch

    T, N, C, H, W = x.shape
    Ho, Wo = H // 2, W // 2
    y, idx = _like(x, Ho, Wo, x.dtype), _like(x, Ho, Wo, torch.uint8)
    mean = torch.empty(T, C, device=x.device, dtype=x.dtype)
    invstd = torch.empty(T, C, device=x.device, dtype=x.dtype)
    _bn_relu_pool_fwd_kernel[(T * C,)](x, weight, bias, y, idx, mean, invstd, N, C, H, W, Ho, Wo,
                                       *_plane_strides(x), float(eps),
                                       BLOCK=_block(N * H * W), F64=x.dtype == torch.float64)
    return y, idx, mean, invstd


def bn_relu_pool_bwd(gy, x, weight, idx, y, mean, invstd):
    """(dx, dweight, dbias); gy, x, idx and y in one layout (the forward's; dx in it too), the rest
    contiguous."""
    import torch

    T, N, C, H, W = x.shape
    Ho, Wo = H // 2, W // 2
    dx = _like(x, H, W, x.dtype)
    dw = torch.empty(T, C, device=x.device, dtype=x.dtype)
    db = torch.empty(T, C, device=x.device, dtype=x.dtype)
    _bn_relu_pool_bwd_kernel[(T * C,)](gy, x, weight, idx, y, mean, invstd, dx, dw, db, N, C, H, W, Ho, Wo,
                                       *_plane_strides(x),
                                       BLOCK=_block(N * H * W), F64=x.dtype == torch.float64)
    return dx, dw, db


@triton.jit
def _bn_relu_pool_dbwd_kernel(ggx_ptr, ggw_ptr, ggb_ptr, gy_ptr, x_ptr, w_ptr, idx_ptr, y_ptr, mean_ptr, invstd_ptr,
                              ggy_ptr, gx_ptr, gw_ptr,
                              N, C, H, W, Ho, Wo, ST, SN,
                              HAS_GGX: tl.constexpr, BLOCK: tl.constexpr, F64: tl.constexpr):
    """The double backward (csrc/bn_relu_pool.cpp has the formulas): the derivatives of (dx, dweight,
    dbias) w.r.t. (gy, x, weight) contracted with their cotangents (ggx, ggw, ggb). One pass for the
    sums (S1, S2 over the elements, A, B, S3 over the windows), one over the elements for g_x (each
    element reading its window) and one over the windows for g_gy."""
    pid = tl.program_id(0).to(tl.int64)
    acc_t = tl.float64 if F64 else tl.float32
    HW, P, M, MO, base, obase = _channel(pid, C, N, H, W, Ho, Wo, ST)
    mean, s, wv = _saved_stats(pid, mean_ptr, invstd_ptr, w_ptr, acc_t)
    r = tl.arange(0, BLOCK)
    s1 = tl.zeros((BLOCK,), dtype=acc_t)
    s2 = tl.zeros((BLOCK,), dtype=acc_t)
    if HAS_GGX:
        m0 = 0
        while m0 < M:
            m = m0 + r
            ok = m < M
            off = base + (m // HW).to(tl.int64) * SN * HW + m % HW
            q = tl.load(ggx_ptr + off, mask=ok, other=0.0).to(acc_t)
            s1 += q
            s2 += q * (tl.load(x_ptr + off, mask=ok, other=0.0).to(acc_t) - mean)
            m0 += BLOCK
    sa = tl.zeros((BLOCK,), dtype=acc_t)
    sb = tl.zeros((BLOCK,), dtype=acc_t)
    s3 = tl.zeros((BLOCK,), dtype=acc_t)
    m0 = 0
    while m0 < MO:
        ok, live, off, xa = _maxima(m0 + r, MO, P, Wo, W, HW, SN, base, obase, idx_ptr, y_ptr)
        g = tl.where(live, tl.load(gy_ptr + off, mask=ok, other=0.0).to(acc_t), 0.0)
        sa += g
        sb += g * (tl.load(x_ptr + xa, mask=live, other=0.0).to(acc_t) - mean)
        if HAS_GGX:
            s3 += g * tl.load(ggx_ptr + xa, mask=live, other=0.0).to(acc_t)
        m0 += BLOCK
    S1 = tl.sum(s1, axis=0)
    S2 = tl.sum(s2, axis=0) * s
    A = tl.sum(sa, axis=0)
    B = tl.sum(sb, axis=0) * s
    S3 = tl.sum(s3, axis=0)
    gw = tl.load(ggw_ptr + pid).to(acc_t)
    gb = tl.load(ggb_ptr + pid).to(acc_t)
    tl.store(gw_ptr + pid, s * (S3 - A * S1 / M - B * S2 / M))
    K = -wv * s * B / M
    Pc = gw - wv * s * S2 / M
    Gs = wv * S3 - wv * (A * S1 + B * S2) / M
    c0 = -s * (Pc * A + K * S1) / M
    c1 = -(s * (Pc * B + K * S2) + s * s * Gs) / M
    m0 = 0
    while m0 < M:  # g_x = s K ggx + c0 + c1 xhat, and s P g at a window's maximum
        ok, xoff, ooff, mine = _elements(m0 + r, M, HW, W, Ho, Wo, P, SN, base, obase, idx_ptr, y_ptr)
        g = tl.where(mine, tl.load(gy_ptr + ooff, mask=mine, other=0.0).to(acc_t), 0.0)
        xhat = (tl.load(x_ptr + xoff, mask=ok, other=0.0).to(acc_t) - mean) * s
        v = c0 + c1 * xhat + s * Pc * g
        if HAS_GGX:
            v += s * K * tl.load(ggx_ptr + xoff, mask=ok, other=0.0).to(acc_t)
        tl.store(gx_ptr + xoff, v.to(gx_ptr.dtype.element_ty), mask=ok)
        m0 += BLOCK
    m0 = 0
    while m0 < MO:  # g_gy = ggb + ggw xhat + w s (ggx - S1 / M - xhat S2 / M) at the maximum, where y > 0
        ok, live, off, xa = _maxima(m0 + r, MO, P, Wo, W, HW, SN, base, obase, idx_ptr, y_ptr)
        xhat = (tl.load(x_ptr + xa, mask=live, other=0.0).to(acc_t) - mean) * s
        v = gb - wv * s * S1 / M + (gw - wv * s * S2 / M) * xhat
        if HAS_GGX:
            v += wv * s * tl.load(ggx_ptr + xa, mask=live, other=0.0).to(acc_t)
        tl.store(ggy_ptr + off, tl.where(live, v, 0.0).to(ggy_ptr.dtype.element_ty), mask=ok)
        m0 += BLOCK


def bn_relu_pool_dbwd(ggx, ggw, ggb, gy, x, weight, idx, y, mean, invstd):
    """(g_gy, g_x, g_weight); ggx (or None: zero), gy, x, idx and y in one layout (the forward's; the
    outputs in it too), the rest contiguous."""
    import torch

    T, N, C, H, W = x.shape
    Ho, Wo = H // 2, W // 2
    g_gy, g_x = _like(x, Ho, Wo, x.dtype), _like(x, H, W, x.dtype)
    g_w = torch.empty(T, C, device=x.device, dtype=x.dtype)
    _bn_relu_pool_dbwd_kernel[(T * C,)](x if ggx is None else ggx, ggw, ggb, gy, x, weight, idx, y, mean, invstd,
                                        g_gy, g_x, g_w, N, C, H, W, Ho, Wo, *_plane_strides(x),
                                        HAS_GGX=ggx is not None, BLOCK=_block(N * H * W),
                                        F64=x.dtype == torch.float64)
    return g_gy, g_x, g_w
