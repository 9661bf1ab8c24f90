"""``batched_conv2d``: Conv2d with per-task weights.

    x [T, N, C, H, W], weight [T, O, C/groups, kh, kw] or [O, C/groups, kh, kw] (shared),
    bias [T, O] or [O] or None  ->  [T, N, O, H', W']

The torch backend runs one grouped convolution with the task folded into the channels
(groups * T groups), which PyTorch differentiates twice. Backends: ``torch``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _checks
from ..backend import register_op, select

IMPLEMENTED = ("torch",)
AUTO = {"cpu": ("torch",), "cuda": ("torch",)}
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
    select("batched_conv2d", x.device.type)
    return batched_conv2d_ref(x, weight, bias, stride, padding, dilation, groups)
