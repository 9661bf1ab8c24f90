"""``batched_conv2d``: Conv2d with per-task weights.

    x [T, N, C, H, W], weight [T, O, C/groups, kh, kw] or [O, C/groups, kh, kw] (shared),
    bias [T, O] or [O] or None  ->  [T, N, O, H', W']

The torch backend runs one grouped convolution with the task folded into the channels
(groups * T groups), which PyTorch differentiates twice. The triton backend (kernels/batched_conv2d.py,
stride 1, no dilation, groups 1, padding at most kernel size - 1; other configurations take the
torch backend) runs an implicit GEMM per task and its weight gradient, registered as
fastmeta::batched_conv2d_triton and fastmeta::conv_wgrad_triton; every derivative is written with
those two again (the input gradient of conv is conv of gy with the flipped, transposed weights,
the derivatives of wgrad are convs), so derivatives of any order stay on the kernels.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .. import _checks
from ..backend import register_op, select

IMPLEMENTED = ("torch", "triton")
# triton stays second on CUDA until a GPU run has measured it against cuDNN's grouped convolution
AUTO = {"cpu": ("torch",), "cuda": ("torch", "triton")}
register_op("batched_conv2d", IMPLEMENTED, AUTO)


def batched_conv2d_ref(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    T, N, C, H, W = x.shape
    if weight.dim() == 4:
        weight = weight.unsqueeze(0).expand(T, *weight.shape)
    O = weight.shape[1]
    xf = x.transpose(0, 1).reshape(N, T * C, H, W)
    wf = weight.reshape(T * O, *weight.shape[2:])
    bf = None
    if bias is not None:
        bf = (bias if bias.dim() == 2 else bias.unsqueeze(0).expand(T, O)).reshape(T * O)
    y = F.conv2d(xf, wf, bf, stride, padding, dilation, groups * T)
    return y.view(N, T, O, *y.shape[2:]).transpose(0, 1)


@functools.cache
def _register_triton():
    from ..kernels.batched_conv2d import conv_fwd, conv_wgrad

    @torch.library.custom_op("fastmeta::batched_conv2d_triton", mutates_args=())
    def _conv(x: torch.Tensor, w: torch.Tensor, ph: int, pw: int) -> torch.Tensor:
        return conv_fwd(x, w, (ph, pw))

    @_conv.register_fake
    def _(x, w, ph, pw):
        T, N, C, H, W = x.shape
        return x.new_empty(T, N, w.shape[-4], H + 2 * ph - w.shape[-2] + 1, W + 2 * pw - w.shape[-1] + 1)

    @torch.library.custom_op("fastmeta::conv_wgrad_triton", mutates_args=())
    def _wgrad(x: torch.Tensor, gy: torch.Tensor, kh: int, kw: int, ph: int, pw: int) -> torch.Tensor:
        return conv_wgrad(x, gy, (kh, kw), (ph, pw))

    @_wgrad.register_fake
    def _(x, gy, kh, kw, ph, pw):
        return x.new_empty(x.shape[0], gy.shape[2], x.shape[2], kh, kw)


def _flip_t(w):
    """The weights of the input gradient: [.., O, C, KH, KW] -> [.., C, O, KH, KW] flipped in space."""
    return w.transpose(-4, -3).flip(-2, -1)


class _TritonConv(torch.autograd.Function):
    """y = conv(x, w) with padding (ph, pw); w [T, O, C, KH, KW] or [O, C, KH, KW] (shared)."""

    @staticmethod
    def forward(ctx, x, w, ph, pw):
        ctx.save_for_backward(x, w)
        ctx.pad = (ph, pw)
        return torch.ops.fastmeta.batched_conv2d_triton(x, w, ph, pw)

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        (ph, pw), (kh, kw) = ctx.pad, w.shape[-2:]
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = _TritonConv.apply(gy, _flip_t(w), kh - 1 - ph, kw - 1 - pw)
        if ctx.needs_input_grad[1]:
            gw = _TritonWGrad.apply(x, gy, kh, kw, ph, pw)
            if w.dim() == 4:
                gw = gw.sum(0)
        return gx, gw, None, None


class _TritonWGrad(torch.autograd.Function):
    """gw[t] = the weight gradient of conv at x[t] for the output gradient gy[t]: [T, O, C, KH, KW]."""

    @staticmethod
    def forward(ctx, x, gy, kh, kw, ph, pw):
        ctx.save_for_backward(x, gy)
        ctx.geom = (kh, kw, ph, pw)
        return torch.ops.fastmeta.conv_wgrad_triton(x, gy, kh, kw, ph, pw)

    @staticmethod
    def backward(ctx, ggw):
        x, gy = ctx.saved_tensors
        kh, kw, ph, pw = ctx.geom
        gx = ggy = None
        if ctx.needs_input_grad[0]:
            gx = _TritonConv.apply(gy, _flip_t(ggw), kh - 1 - ph, kw - 1 - pw)
        if ctx.needs_input_grad[1]:
            ggy = _TritonConv.apply(x, ggw, ph, pw)
        return gx, ggy, None, None, None, None


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _triton_supports(weight, stride, padding, dilation, groups):
    """The triton kernels' configurations: stride 1, no dilation, groups 1, integer padding of at
    most kernel size - 1 (the input gradient's padding kernel - 1 - padding is then >= 0)."""
    if isinstance(padding, str) or _pair(stride) != (1, 1) or _pair(dilation) != (1, 1) or groups != 1:
        return False
    ph, pw = _pair(padding)
    return 0 <= ph <= weight.shape[-2] - 1 and 0 <= pw <= weight.shape[-1] - 1


def batched_conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """Per-task Conv2d (see module docstring)."""
    _checks.tensor("x", x, dim=5)
    _checks.tensor("weight", weight)
    T, C = x.shape[0], x.shape[2]
    if weight.dim() not in (4, 5) or (weight.dim() == 5 and weight.shape[0] != T):
        raise ValueError(f"batched_conv2d: weight {tuple(weight.shape)} must be [T={T}, O, C/g, kh, kw] "
                         f"or [O, C/g, kh, kw] for x {tuple(x.shape)}")
    if weight.shape[-3] * groups != C:
        raise ValueError(f"batched_conv2d: weight {tuple(weight.shape)} with groups={groups} expects "
                         f"{weight.shape[-3] * groups} input channels, x {tuple(x.shape)} has {C}")
    O = weight.shape[-4]
    if bias is not None and tuple(bias.shape) not in ((T, O), (O,)):
        raise ValueError(f"batched_conv2d: bias {tuple(bias.shape)} must be [T={T}, O={O}] or [O={O}]")
    _checks.same_device_dtype([("x", x), ("weight", weight)] + ([("bias", bias)] if bias is not None else []))
    backend = select("batched_conv2d", x.device.type)
    if backend == "triton" and _triton_supports(weight, stride, padding, dilation, groups):
        _register_triton()
        y = _TritonConv.apply(x, weight, *_pair(padding))
        if bias is not None:
            y = y + (bias if bias.dim() == 2 else bias.unsqueeze(0))[:, None, :, None, None]
        return y
    return batched_conv2d_ref(x, weight, bias, stride, padding, dilation, groups)
