"""Triton: per-task linear layer with the bias and activation fused into the GEMM's epilogue.

    y[t] = act(x[t] @ W[t]^T + b[t])      x [T, N, I], W [T, O, I] (or [O, I] shared: stride 0 over T),
                                          b [T, O] / [O] / none  ->  y [T, N, O]

Grid (T, cdiv(N, BLOCK_N), cdiv(O, BLOCK_O)); each program accumulates a [BLOCK_N, BLOCK_O] tile over
I in BLOCK_I steps with tl.dot (input_precision='ieee': no TF32) and applies bias and activation
before its one store. The backward (fastmeta/ops/batched_linear.py) is written with differentiable
torch ops on the saved output, so second order composes.
"""
import triton
import triton.language as tl

from ._consts import device_constant


@triton.jit
def _batched_linear_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, slope_ptr,
    N, O,
    sx_t, sx_n, sx_i, sw_t, sw_o, sw_i, sb_t, sb_o,
    I: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ro = tl.program_id(2) * BLOCK_O + tl.arange(0, BLOCK_O)
    ri = tl.arange(0, BLOCK_I)
    acc = tl.zeros((BLOCK_N, BLOCK_O), dtype=tl.float32 if x_ptr.dtype.element_ty != tl.float64 else tl.float64)
    for i0 in range(0, I, BLOCK_I):
        xi = i0 + ri
        xt = tl.load(x_ptr + t * sx_t + rn[:, None] * sx_n + xi[None, :] * sx_i,
                     mask=(rn[:, None] < N) & (xi[None, :] < I), other=0.0)
        wt = tl.load(w_ptr + t * sw_t + ro[None, :] * sw_o + xi[:, None] * sw_i,
                     mask=(ro[None, :] < O) & (xi[:, None] < I), other=0.0)
        acc += tl.dot(xt, wt, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(b_ptr + t * sb_t + ro * sb_o, mask=ro < O, other=0.0)[None, :]
    if ACT == 1:
        acc = tl.where(acc <= 0, 0.0, acc)  # relu(NaN) = NaN (tl.maximum may drop it)
    elif ACT == 2:
        slope = tl.load(slope_ptr)
        acc = tl.where(acc > 0, acc, slope * acc)
    elif ACT == 3:
        acc = 2.0 * tl.sigmoid(2.0 * acc) - 1.0
    elif ACT == 4:
        acc = tl.sigmoid(acc)
    tl.store(y_ptr + t * N * O + rn[:, None] * O + ro[None, :], acc, mask=(rn[:, None] < N) & (ro[None, :] < O))


def batched_linear_fwd(x, W, b, act_code, negative_slope):
    """Launcher: y [T, N, O] (contiguous) for x [T, N, I], W [T, O, I] or [O, I], b [T, O], [O] or None."""
    import torch

    T, N, I = x.shape
    O = W.shape[-2]
    y = torch.empty(T, N, O, device=x.device, dtype=x.dtype)
    sw = (W.stride(0), W.stride(1), W.stride(2)) if W.dim() == 3 else (0, W.stride(0), W.stride(1))
    if b is None:
        sb, bptr = (0, 0), y
    else:
        sb, bptr = ((b.stride(0), b.stride(1)) if b.dim() == 2 else (0, b.stride(0))), b
    slope = device_constant((float(negative_slope),), x.dtype, str(x.device))
    BLOCK_N = max(16, min(64, triton.next_power_of_2(N)))
    BLOCK_O = max(16, min(64, triton.next_power_of_2(O)))
    BLOCK_I = max(16, min(32, triton.next_power_of_2(I)))
    grid = (T, triton.cdiv(N, BLOCK_N), triton.cdiv(O, BLOCK_O))
    _batched_linear_fwd_kernel[grid](
        x, W, bptr, y, slope, N, O, x.stride(0), x.stride(1), x.stride(2), *sw, *sb,
        I=I, HAS_BIAS=b is not None, ACT=act_code, BLOCK_N=BLOCK_N, BLOCK_O=BLOCK_O, BLOCK_I=BLOCK_I)
    return y
