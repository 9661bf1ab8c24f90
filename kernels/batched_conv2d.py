"""Triton: per-task 2-d convolution (stride 1) as an implicit GEMM with the task as a batch dim,
and its weight gradient.

    conv:   y[t, n, o, i, j]    = sum_{c, a, b} w[t, o, c, a, b] x[t, n, c, i + a - P, j + b - P]
    wgrad:  gw[t, o, c, a, b]   = sum_{n, i, j} gy[t, n, o, i, j] x[t, n, c, i + a - P, j + b - P]

x [T, N, C, H, W], w [T, O, C, KH, KW] (stride 0 over T for weights shared by all tasks), zero
padding P on each side (the same in both dims here: P = (ph, pw)), stride 1, no dilation.

conv: grid (T, cdiv(N*HO*WO, BLOCK_M), cdiv(O, BLOCK_O)); a program's rows are output pixels
(n, i, j), its columns output channels, and the reduction runs over (c, a, b) in BLOCK_K steps,
gathering the input patch of each (row, k) pair with a masked load (the zero padding). wgrad: grid
(T, cdiv(O, BLOCK_O), cdiv(C*KH*KW, BLOCK_K)); the reduction runs over the output pixels. Both
accumulate with tl.dot(input_precision='ieee') (no TF32) in float32, or float64 for float64 inputs;
for float32, FASTMETA_CONV_PRECISION=tf32x3 (or precision='tf32x3') runs each product as
three TF32 tensor-core products of the operands' high and low parts instead (see _mma).

The reduction index k runs over (c, a, b) in one of two orders (constexpr TAPS):
- flat (TAPS=False): k = c * KH * KW + a * KW + b in blocks of BLOCK_K, for layers with few input
  channels (an image's 1 or 3): each block mixes taps, so every element of the gathered patch
  computes its own tap, image position and padding mask;
- tap-major (TAPS=True, C >= 16): block kb is tap (a, b) = divmod(kb // CB, KW) and channels
  [(kb % CB) BLOCK_K, ...) (CB = cdiv(C, BLOCK_K) channel blocks a tap): the image position and the
  padding mask are per row (pixel) and the channel offset per column, so the patch's addresses are
  one add an element, as implicit-GEMM convolutions with many channels are usually written.

The two are enough for any derivative order (fastmeta/ops/batched_conv2d.py): the input gradient of
conv is conv of gy with the flipped, transposed weights and padding K-1-P, and the derivatives of
wgrad are conv again.
"""
import os

import triton
import triton.language as tl


@triton.jit
def _tap(rk, KH: tl.constexpr, KW: tl.constexpr):
    """Reduction index k = (c, a, b) of a KH x KW kernel: input channel c, kernel row a, column b."""
    ab = rk % (KH * KW)
    return rk // (KH * KW), ab // KW, ab % KW


@triton.jit
def _pixel(rm, HO, WO):
    """Output pixel m = (n, i, j) of an N x HO x WO output: image n, row i, column j."""
    rest = rm % (HO * WO)
    return rm // (HO * WO), rest // WO, rest % WO


@triton.jit
def _patch(x_ptr, n, oi, oj, row_ok, c, a, b, k_ok, H, W, sx_n, sx_c, sx_h, sx_w, PH: tl.constexpr,
           PW: tl.constexpr):
    """The implicit-GEMM tile [rows, k] of one task's input x_ptr: for output pixel (n, oi, oj) and
    tap (c, a, b), x[n, c, oi + a - PH, oj + b - PW], zero outside the image (the padding)."""
    hi = oi[:, None] + a[None, :] - PH
    wj = oj[:, None] + b[None, :] - PW
    mask = row_ok[:, None] & k_ok[None, :] & (hi >= 0) & (hi < H) & (wj >= 0) & (wj < W)
    return tl.load(x_ptr + n[:, None].to(tl.int64) * sx_n + c[None, :] * sx_c + hi * sx_h + wj * sx_w,
                   mask=mask, other=0.0)


@triton.jit
def _mma(acc, a, b, X3: tl.constexpr):
    """acc + a @ b: float32 products on the FMA units (input_precision 'ieee'), or with X3 as three
    TF32 tensor-core products of each operand's high and low parts ('tf32x3': the low parts'
    product is what it drops, ~2^-22 of each product against float32's 2^-24); float64: 'ieee'."""
    if X3:
        return acc + tl.dot(a, b, input_precision="tf32x3")
    return acc + tl.dot(a, b, input_precision="ieee")


@triton.jit
def _tap_patch(xb, n, oi, oj, row_ok, a, b, c, c_ok, H, W, sx_n, sx_c, sx_h, sx_w, PH: tl.constexpr,
               PW: tl.constexpr):
    """The tile [rows, channels] of x at one tap (a, b): x[n, c, oi + a - PH, oj + b - PW] for output
    pixels (n, oi, oj) and channels c, zero outside the image; position and mask once a row."""
    hi = oi + a - PH
    wj = oj + b - PW
    ok = row_ok & (hi >= 0) & (hi < H) & (wj >= 0) & (wj < W)
    roff = n.to(tl.int64) * sx_n + hi * sx_h + wj * sx_w
    return tl.load(xb + roff[:, None] + c[None, :] * sx_c, mask=ok[:, None] & c_ok[None, :], other=0.0)


@triton.jit
def _gy_tile(gb, m0, m_end, ro, O, HO, WO, sg_n, sg_o, sg_h, sg_w, BLOCK_M: tl.constexpr):
    """gy^T [BLOCK_O, BLOCK_M] over output pixels [m0, m0 + BLOCK_M) (below m_end), and the pixels'
    indices rm and (n, oi, oj)."""
    rm = m0 + tl.arange(0, BLOCK_M)
    n, oi, oj = _pixel(rm, HO, WO)
    gt = tl.load(gb + n[None, :].to(tl.int64) * sg_n + ro[:, None] * sg_o + oi[None, :] * sg_h + oj[None, :] * sg_w,
                 mask=(ro[:, None] < O) & (rm[None, :] < m_end), other=0.0)
    return gt, rm, n, oi, oj


@triton.jit
def _conv_fwd_tap_step(acc, kb, CB, xb, wb, n, oi, oj, row_ok, ro, C, O, H, W, sx_n, sx_c, sx_h, sx_w, sw_o, sw_c,
                       sw_h, sw_w, KW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, BLOCK_K: tl.constexpr,
                       X3: tl.constexpr):
    """acc + the product of the patch tile and the weight tile of tap-major block kb."""
    tap = kb // CB
    a = tap // KW
    b = tap - a * KW
    c = (kb - tap * CB) * BLOCK_K + tl.arange(0, BLOCK_K)
    c_ok = c < C
    xt = _tap_patch(xb, n, oi, oj, row_ok, a, b, c, c_ok, H, W, sx_n, sx_c, sx_h, sx_w, PH, PW)
    wt = tl.load(wb + ro[None, :] * sw_o + c[:, None] * sw_c + a * sw_h + b * sw_w,
                 mask=(ro[None, :] < O) & c_ok[:, None], other=0.0)
    return _mma(acc, xt, wt, X3)


@triton.jit
def _conv_fwd_step(acc, k0, xb, wb, n, oi, oj, row_ok, ro, K, O, H, W, sx_n, sx_c, sx_h, sx_w, sw_o, sw_c, sw_h, sw_w,
                   KH: tl.constexpr, KW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, BLOCK_K: tl.constexpr,
                   X3: tl.constexpr):
    """acc + the product of the patch tile and the weight tile of taps [k0, k0 + BLOCK_K)."""
    rk = k0 + tl.arange(0, BLOCK_K)
    c, a, b = _tap(rk, KH, KW)
    xt = _patch(xb, n, oi, oj, row_ok, c, a, b, rk < K, H, W, sx_n, sx_c, sx_h, sx_w, PH, PW)
    wt = tl.load(wb + ro[None, :] * sw_o + c[:, None] * sw_c + a[:, None] * sw_h + b[:, None] * sw_w,
                 mask=(ro[None, :] < O) & (rk[:, None] < K), other=0.0)
    return _mma(acc, xt, wt, X3)


@triton.jit
def _conv_wgrad_step(acc, m0, m_end, xb, gb, ro, c, a, b, k_ok, O, H, W, HO, WO, sx_n, sx_c, sx_h, sx_w,
                     sg_n, sg_o, sg_h, sg_w, PH: tl.constexpr, PW: tl.constexpr, BLOCK_M: tl.constexpr,
                     X3: tl.constexpr, TAPS: tl.constexpr):
    """acc + gy^T x over output pixels [m0, m0 + BLOCK_M) (below m_end) for the columns' taps:
    flat, (c, a, b) a column (vectors); tap-major, one tap (a, b) and channels c."""
    gt, rm, n, oi, oj = _gy_tile(gb, m0, m_end, ro, O, HO, WO, sg_n, sg_o, sg_h, sg_w, BLOCK_M)
    if TAPS:
        xt = _tap_patch(xb, n, oi, oj, rm < m_end, a, b, c, k_ok, H, W, sx_n, sx_c, sx_h, sx_w, PH, PW)
    else:
        xt = _patch(xb, n, oi, oj, rm < m_end, c, a, b, k_ok, H, W, sx_n, sx_c, sx_h, sx_w, PH, PW)
    return _mma(acc, gt, xt, X3)


@triton.jit
def _conv_fwd_kernel(
    x_ptr, w_ptr, y_ptr,
    N, C, H, W, O, HO, WO,
    sx_t, sx_n, sx_c, sx_h, sx_w,
    sw_t, sw_o, sw_c, sw_h, sw_w,
    KH: tl.constexpr, KW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr, F64: tl.constexpr,
    PIPELINE: tl.constexpr, TAPS: tl.constexpr = False, X3: tl.constexpr = False,
):
    t = tl.program_id(0).to(tl.int64)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    ro = tl.program_id(2) * BLOCK_O + tl.arange(0, BLOCK_O)
    M = N * HO * WO
    K = C * KH * KW
    n, oi, oj = _pixel(rm, HO, WO)
    acc = tl.zeros((BLOCK_M, BLOCK_O), dtype=tl.float64 if F64 else tl.float32)
    xb = x_ptr + t * sx_t
    wb = w_ptr + t * sw_t
    if TAPS:  # tap-major blocks (see the module docstring)
        CB = tl.cdiv(C, BLOCK_K)
        if PIPELINE:
            for kb in range(0, KH * KW * CB):
                acc = _conv_fwd_tap_step(acc, kb, CB, xb, wb, n, oi, oj, rm < M, ro, C, O, H, W, sx_n, sx_c, sx_h,
                                         sx_w, sw_o, sw_c, sw_h, sw_w, KW, PH, PW, BLOCK_K, X3)
        else:
            kb = 0
            while kb < KH * KW * CB:
                acc = _conv_fwd_tap_step(acc, kb, CB, xb, wb, n, oi, oj, rm < M, ro, C, O, H, W, sx_n, sx_c, sx_h,
                                         sx_w, sw_o, sw_c, sw_h, sw_w, KW, PH, PW, BLOCK_K, X3)
                kb += 1
    elif PIPELINE:  # compiled: a for loop, which Triton software-pipelines
        for k0 in range(0, K, BLOCK_K):
            acc = _conv_fwd_step(acc, k0, xb, wb, n, oi, oj, rm < M, ro, K, O, H, W, sx_n, sx_c, sx_h, sx_w,
                                 sw_o, sw_c, sw_h, sw_w, KH, KW, PH, PW, BLOCK_K, X3)
    else:  # the interpreter cannot range() over a value computed in the kernel
        k0 = 0
        while k0 < K:
            acc = _conv_fwd_step(acc, k0, xb, wb, n, oi, oj, rm < M, ro, K, O, H, W, sx_n, sx_c, sx_h, sx_w,
                                 sw_o, sw_c, sw_h, sw_w, KH, KW, PH, PW, BLOCK_K, X3)
            k0 += BLOCK_K
    # y [T, N, O, HO, WO] contiguous
    yoff = (t * N * O + n[:, None].to(tl.int64) * O + ro[None, :]) * (HO * WO) + oi[:, None] * WO + oj[:, None]
    tl.store(y_ptr + yoff, acc, mask=(rm[:, None] < M) & (ro[None, :] < O))


@triton.jit
def _conv_wgrad_kernel(
    x_ptr, g_ptr, gw_ptr,
    N, C, H, W, O, HO, WO,
    sx_t, sx_n, sx_c, sx_h, sx_w,
    sg_t, sg_n, sg_o, sg_h, sg_w,
    M_PER, SPLIT,
    KH: tl.constexpr, KW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, F64: tl.constexpr,
    PIPELINE: tl.constexpr, TAPS: tl.constexpr = False, X3: tl.constexpr = False,
):
    # program (t * SPLIT + s, o-block, k-block) sums output pixels [s M_PER, (s + 1) M_PER) into
    # its slice s of gw [T, SPLIT, O, K] (SPLIT > 1: the caller adds the slices); tap-major k-block
    # kb: tap kb // CB, channels (kb % CB) BLOCK_K + [0, BLOCK_K)
    ts = tl.program_id(0).to(tl.int64)
    t = ts // SPLIT
    ro = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    M = N * HO * WO
    m_end = tl.minimum((ts % SPLIT + 1) * M_PER, M)
    K = C * KH * KW
    acc = tl.zeros((BLOCK_O, BLOCK_K), dtype=tl.float64 if F64 else tl.float32)
    m_start = (ts % SPLIT) * M_PER
    xb = x_ptr + t * sx_t
    gb = g_ptr + t * sg_t
    if TAPS:  # the columns: channels c of tap (a, b)
        CB = tl.cdiv(C, BLOCK_K)
        kb = tl.program_id(2)
        tap = kb // CB
        a = tap // KW
        b = tap - a * KW
        c = (kb - tap * CB) * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = c < C
        col = c * (KH * KW) + tap  # the columns' k = (c, a, b)
    else:  # the columns: k = (c, a, b) of a block of the flat order
        col = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
        c, a, b = _tap(col, KH, KW)
        k_ok = col < K
    if PIPELINE:  # compiled: a for loop, which Triton software-pipelines
        for m0 in range(m_start, m_end, BLOCK_M):
            acc = _conv_wgrad_step(acc, m0, m_end, xb, gb, ro, c, a, b, k_ok, O, H, W, HO, WO, sx_n, sx_c, sx_h, sx_w,
                                   sg_n, sg_o, sg_h, sg_w, PH, PW, BLOCK_M, X3, TAPS)
    else:  # the interpreter cannot range() over a value computed in the kernel
        m0 = m_start
        while m0 < m_end:
            acc = _conv_wgrad_step(acc, m0, m_end, xb, gb, ro, c, a, b, k_ok, O, H, W, HO, WO, sx_n, sx_c, sx_h, sx_w,
                                   sg_n, sg_o, sg_h, sg_w, PH, PW, BLOCK_M, X3, TAPS)
            m0 += BLOCK_M
    # gw [T, SPLIT, O, C, KH, KW] contiguous = [T * SPLIT, O, K]
    tl.store(gw_ptr + (ts * O + ro[:, None]) * K + col[None, :], acc, mask=(ro[:, None] < O) & k_ok[None, :])


def _strides5(t, T):
    """Strides of a [T, ...] 5-d tensor, or of a 4-d tensor shared by all T tasks (stride 0)."""
    return tuple(t.stride()) if t.dim() == 5 else (0,) + tuple(t.stride())


# Launch configurations: the largest tiles, warps and pipeline stages. Chosen so that ptxas reports
# no register spills on sm_90 for float32 and float64 (tests/test_triton_compile.py checks it): the
# per-element index math of the patch gather is what fills the registers (with 4 warps the weight
# gradient's 64x64x32 tile spilled ~2 KB per thread).
FWD = dict(BLOCK_M=64, BLOCK_O=64, BLOCK_K=32, num_warps=8, num_stages=3)
WGRAD = dict(BLOCK_O=64, BLOCK_K=64, BLOCK_M=16, num_warps=8, num_stages=3)


def _compiled():
    """Whether the kernels compile (a GPU) rather than run in the Triton interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") != "1"


def _block(n, lo, hi):
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


# Input channels from which the reduction runs tap-major (a channel block of 16 at least is then
# mostly real channels; an image's 1 or 3 channels stay in the flat order).
TAPS_MIN_CHANNELS = 16


PRECISIONS = ("ieee", "tf32x3")


def _x3(precision, dtype):
    """Whether float32 products run as 'tf32x3' (precision None: FASTMETA_CONV_PRECISION,
    default 'ieee'); float64 always on the FMA units."""
    import torch

    if precision is None:
        precision = os.environ.get("FASTMETA_CONV_PRECISION", "ieee") or "ieee"
        where = "FASTMETA_CONV_PRECISION"
    else:
        where = "precision"
    if precision not in PRECISIONS:
        raise ValueError(f"{where}: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision == "tf32x3" and dtype == torch.float32


def _k_blocks(C, KH, KW, most, taps):
    """(taps, BLOCK_K, number of k-blocks) of a reduction over C x KH x KW; taps None: by C."""
    if taps is None:
        taps = C >= TAPS_MIN_CHANNELS
    if taps:
        bk = _block(C, 16, most)
        return True, bk, KH * KW * triton.cdiv(C, bk)
    bk = _block(C * KH * KW, 16, most)
    return False, bk, triton.cdiv(C * KH * KW, bk)


def conv_fwd(x, w, padding, taps=None, precision=None):
    """y [T, N, O, HO, WO] (contiguous) for x [T, N, C, H, W], w [T, O, C, KH, KW] or [O, C, KH, KW].
    taps: the reduction's order (module docstring); None: tap-major from TAPS_MIN_CHANNELS channels.
    precision: 'ieee' or 'tf32x3' for float32 (see _mma); None: FASTMETA_CONV_PRECISION or
    'ieee'."""
    import torch

    x3 = _x3(precision, x.dtype)
    T, N, C, H, W = x.shape
    O, KH, KW = w.shape[-4], w.shape[-2], w.shape[-1]
    PH, PW = padding
    HO, WO = H + 2 * PH - KH + 1, W + 2 * PW - KW + 1
    y = torch.empty(T, N, O, HO, WO, device=x.device, dtype=x.dtype)
    if y.numel() == 0:
        return y
    M = N * HO * WO
    BLOCK_M, BLOCK_O = _block(M, 16, FWD["BLOCK_M"]), _block(O, 16, FWD["BLOCK_O"])
    taps, BLOCK_K, _ = _k_blocks(C, KH, KW, FWD["BLOCK_K"], taps)
    grid = (T, triton.cdiv(M, BLOCK_M), triton.cdiv(O, BLOCK_O))
    _conv_fwd_kernel[grid](
        x, w, y, N, C, H, W, O, HO, WO, *_strides5(x, T), *_strides5(w, T),
        KH=KH, KW=KW, PH=PH, PW=PW, BLOCK_M=BLOCK_M, BLOCK_O=BLOCK_O, BLOCK_K=BLOCK_K,
        F64=x.dtype == torch.float64, PIPELINE=_compiled(), TAPS=taps, X3=x3, num_warps=FWD["num_warps"],
        num_stages=FWD["num_stages"])
    return y


def conv_wgrad(x, gy, kernel_size, padding, split=None, taps=None, precision=None):
    """gw [T, O, C, KH, KW] (contiguous) for x [T, N, C, H, W] and gy [T, N, O, HO, WO].

    split: how many programs share one task's reduction over the output pixels (their partial sums
    then added by one torch sum); default: enough to give the GPU ~1024 programs, each with at
    least 4 blocks of pixels (a layer with few channels has few (o, k) tiles and long reductions).
    taps, precision: as conv_fwd's."""
    import torch

    x3 = _x3(precision, x.dtype)
    T, N, C, H, W = x.shape
    O, HO, WO = gy.shape[2], gy.shape[3], gy.shape[4]
    KH, KW = kernel_size
    PH, PW = padding
    M = N * HO * WO
    if M == 0:
        return torch.zeros(T, O, C, KH, KW, device=x.device, dtype=x.dtype)
    BLOCK_O, BLOCK_M = _block(O, 16, WGRAD["BLOCK_O"]), _block(M, 16, WGRAD["BLOCK_M"])
    taps, BLOCK_K, k_blocks = _k_blocks(C, KH, KW, WGRAD["BLOCK_K"], taps)
    tiles = T * triton.cdiv(O, BLOCK_O) * k_blocks
    m_blocks = triton.cdiv(M, BLOCK_M)
    if split is None:
        split = max(1, min(1024 // tiles, m_blocks // 4))
    split = max(1, min(int(split), m_blocks))
    m_per = triton.cdiv(m_blocks, split) * BLOCK_M
    split = triton.cdiv(M, m_per)  # no empty slices
    gw = torch.empty(T, split, O, C, KH, KW, device=x.device, dtype=x.dtype)
    grid = (T * split, triton.cdiv(O, BLOCK_O), k_blocks)
    _conv_wgrad_kernel[grid](
        x, gy, gw, N, C, H, W, O, HO, WO, *_strides5(x, T), *_strides5(gy, T), m_per, split,
        KH=KH, KW=KW, PH=PH, PW=PW, BLOCK_O=BLOCK_O, BLOCK_K=BLOCK_K, BLOCK_M=BLOCK_M,
        F64=x.dtype == torch.float64, PIPELINE=_compiled(), TAPS=taps, X3=x3, num_warps=WGRAD["num_warps"],
        num_stages=WGRAD["num_stages"])
    return gw[:, 0] if split == 1 else gw.sum(1)
