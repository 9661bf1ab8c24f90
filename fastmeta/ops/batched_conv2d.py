"""``batched_conv2d``: Conv2d with per-task weights.

    x [T, N, C, H, W], weight [T, O, C/groups, kh, kw] or [O, C/groups, kh, kw] (shared),
    bias [T, O] or [O] or None  ->  [T, N, O, H', W']

Backends:
- ``torch``: the reference, one grouped convolution with the task folded into the channels
  (groups * T groups), which PyTorch differentiates twice. Its double backward computes the
  weight part of the input gradient's derivative one group (task) at a time, as a convolution
  whose kernel is the whole image.
- ``cpp`` (CPU) / ``cuda`` (CUDA): fastmeta::batched_conv2d, fastmeta::batched_conv2d_input_grad,
  fastmeta::batched_conv2d_weight_grad and fastmeta::batched_conv2d_backward (csrc/batched_conv2d.cpp):
  the grouped convolution and its two gradients, each one ATen call (oneDNN / cuDNN), any stride,
  padding, dilation and groups; or each one ATen call a task, which on CUDA the first call of each
  shape weighs against the grouped call by timing both (README: FASTMETA_CONV_AUTOTUNE).
- ``triton`` (kernels/batched_conv2d.py; stride 1, no dilation, groups 1, padding at most kernel
  size - 1, other configurations take the torch backend): an implicit GEMM per task and its weight
  gradient, fastmeta::batched_conv2d_triton and fastmeta::conv_wgrad_triton; the input gradient is
  the convolution of gy with the flipped, transposed weights.

Precision (the cpp, cuda and triton backends; float32): ``ieee`` (default) computes each product in
float32; ``tf32x3`` as three TF32 products of the operands' high and low parts (set_conv_precision,
FASTMETA_CONV_PRECISION; README).

The fused backends share one set of autograd Functions (_Conv, _InputGrad, _WeightGrad) written
with three primitives (conv, input gradient, weight gradient): the derivatives of each are the
others (the input gradient is linear in gy and w, its derivatives are conv and the weight
gradient; the weight gradient's are the input gradient and conv), so every derivative order stays
on the backend's kernels.
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys

import torch
import torch.nn.functional as F

from .. import _checks
from ..backend import register_op, requested, select, why_unavailable

IMPLEMENTED = ("torch", "cpp", "cuda", "triton")
# cpp first on the CPU: as fast as the torch ops on Omniglot, 7% faster on mini-ImageNet (PyTorch's
# double backward also computes the unneeded image gradient of the first convolution), measured
# in one run (benchmarks/RESULTS.md). cuda first on CUDA: second-order meta-steps on an H200 with the
# cuda ops (and bn_relu_pool's) against the torch ops, Omniglot T=32 56.6 vs 65.3 ms, mini-ImageNet
# T=32 277 vs 899 ms; triton (42.9 / 530 ms) where fastmeta._C has no CUDA kernels
AUTO = {"cpu": ("cpp", "torch"), "cuda": ("cuda", "triton", "torch")}
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


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _out_size(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


@functools.cache
def _register_aten():
    def conv_fake(x, w, b, stride, padding, dilation, groups):
        T, N, C, H, W = x.shape
        O, kh, kw = w.shape[1], w.shape[3], w.shape[4]
        Ho = _out_size(H, kh, stride[0], padding[0], dilation[0])
        Wo = _out_size(W, kw, stride[-1], padding[-1], dilation[-1])
        # the kernel's layout: a task-major view of a sample-major buffer
        return x.new_empty(N, T, O, Ho, Wo).transpose(0, 1)

    def input_grad_fake(gy, w, x_size, stride, padding, dilation, groups):
        T, N, C, H, W = x_size
        return gy.new_empty(N, T, C, H, W).transpose(0, 1)

    def weight_grad_fake(x, gy, w_size, stride, padding, dilation, groups):
        return x.new_empty(w_size)

    def backward_fake(gy, x, w, stride, padding, dilation, groups, mask):
        T, O = w.shape[:2]
        return (input_grad_fake(gy, w, x.shape, stride, padding, dilation, groups) if mask[0] else gy.new_empty(0),
                gy.new_empty(w.shape) if mask[1] else gy.new_empty(0),
                gy.new_empty(T, O) if mask[2] else gy.new_empty(0))

    torch.library.register_fake("fastmeta::batched_conv2d")(conv_fake)
    torch.library.register_fake("fastmeta::batched_conv2d_input_grad")(input_grad_fake)
    torch.library.register_fake("fastmeta::batched_conv2d_weight_grad")(weight_grad_fake)
    torch.library.register_fake("fastmeta::batched_conv2d_backward")(backward_fake)


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


class _AtenPrims:
    """The cpp / cuda primitives: fastmeta._C's grouped-convolution ops (weights always [T, ...])."""

    __slots__ = ("geom",)

    def __init__(self, stride, padding, dilation, groups):
        _register_aten()
        self.geom = (list(_pair(stride)), list(_pair(padding)), list(_pair(dilation)), int(groups))

    def conv(self, x, w, b):
        return torch.ops.fastmeta.batched_conv2d(x, w, b, *self.geom)

    def input_grad(self, gy, w, x_size):
        return torch.ops.fastmeta.batched_conv2d_input_grad(gy, w, list(x_size), *self.geom)

    def weight_grad(self, x, gy, w_size):
        return torch.ops.fastmeta.batched_conv2d_weight_grad(x, gy, list(w_size), *self.geom)

    def all_grads(self, gy, x, w, mask):
        """(gx, gw, gb) in one call; None where mask (3 bools) leaves one out."""
        grads = torch.ops.fastmeta.batched_conv2d_backward(gy, x, w, *self.geom, list(mask))
        return tuple(g if m else None for g, m in zip(grads, mask))


def _flip_t(w):
    """The weights of the input gradient: [.., O, C, KH, KW] -> [.., C, O, KH, KW] flipped in space."""
    return w.transpose(-4, -3).flip(-2, -1)


class _TritonPrims:
    """The triton primitives (stride 1, no dilation, groups 1); a weight may be [O, C, KH, KW],
    shared by all tasks, whose weight gradient is then summed over the tasks."""

    __slots__ = ("pad",)

    def __init__(self, padding):
        _register_triton()
        self.pad = _pair(padding)

    def conv(self, x, w, b=None):
        y = torch.ops.fastmeta.batched_conv2d_triton(x, w, *self.pad)
        return y if b is None else y + b[:, None, :, None, None]

    def input_grad(self, gy, w, x_size):
        (ph, pw), (kh, kw) = self.pad, w.shape[-2:]
        return torch.ops.fastmeta.batched_conv2d_triton(gy, _flip_t(w), kh - 1 - ph, kw - 1 - pw)

    def weight_grad(self, x, gy, w_size):
        gw = torch.ops.fastmeta.conv_wgrad_triton(x, gy, w_size[-2], w_size[-1], *self.pad)
        return gw.sum(0) if len(w_size) == 4 else gw

    def all_grads(self, gy, x, w, mask):
        return (self.input_grad(gy, w, x.shape) if mask[0] else None,
                self.weight_grad(x, gy, w.shape) if mask[1] else None,
                gy.sum((1, 3, 4)) if mask[2] else None)


class _Conv(torch.autograd.Function):
    """y = conv(x, w) + b with a backend's primitives; b [T, O] or None."""

    @staticmethod
    def forward(ctx, x, w, b, prims):
        ctx.save_for_backward(x, w)
        ctx.prims = prims
        # (the cpp/cuda kernels return a [T, N, O, H, W] view of their [N, T*O, H, W] output: as a
        # view made inside a Function it could not be changed in place, as ReLU(inplace=True) does;
        # detached, it is the same memory without the view's record)
        return prims.conv(x, w, b).detach()

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        p, need = ctx.prims, ctx.needs_input_grad[:3]
        if not torch.is_grad_enabled():  # no graph of the backward: one call for all three
            return p.all_grads(gy, x, w, need) + (None,)
        gx = _InputGrad.apply(gy, w, x.shape, p) if need[0] else None
        gw = _WeightGrad.apply(x, gy, w.shape, p) if need[1] else None
        gb = gy.sum((1, 3, 4)) if need[2] else None
        return gx, gw, gb, None


class _InputGrad(torch.autograd.Function):
    """gx = the input gradient of conv(., w) for the output gradient gy (linear in gy and in w)."""

    @staticmethod
    def forward(ctx, gy, w, x_size, prims):
        ctx.save_for_backward(gy, w)
        ctx.prims = prims
        return prims.input_grad(gy, w, x_size)

    @staticmethod
    def backward(ctx, ggx):
        gy, w = ctx.saved_tensors
        p = ctx.prims
        # <ggx, gx(gy, w)> = <conv(ggx, w), gy>: d/dgy = conv(ggx, w), d/dw = weight_grad(ggx, gy)
        ggy = _Conv.apply(ggx, w, None, p) if ctx.needs_input_grad[0] else None
        gw = _WeightGrad.apply(ggx, gy, w.shape, p) if ctx.needs_input_grad[1] else None
        return ggy, gw, None, None


class _WeightGrad(torch.autograd.Function):
    """gw = the weight gradient of conv(x, .) for the output gradient gy (linear in x and in gy)."""

    @staticmethod
    def forward(ctx, x, gy, w_size, prims):
        # gy is read back only for x's derivative: where x needs none (a network's input images, in
        # every inner step of second-order MAML), the first layer's output gradient, the largest
        # tensor of the step, is not kept alive for the outer backward
        ctx.save_for_backward(x, gy if ctx.needs_input_grad[0] else None)
        ctx.prims = prims
        return prims.weight_grad(x, gy, w_size)

    @staticmethod
    def backward(ctx, ggw):
        x, gy = ctx.saved_tensors
        p = ctx.prims
        # <ggw, gw(x, gy)> = <conv(x, ggw), gy>: d/dx = input_grad(gy, ggw), d/dgy = conv(x, ggw)
        gx = _InputGrad.apply(gy, ggw, x.shape, p) if ctx.needs_input_grad[0] else None
        ggy = _Conv.apply(x, ggw, None, p) if ctx.needs_input_grad[1] else None
        return gx, ggy, None, None


CONV_PRECISIONS = ("ieee", "tf32x3")


def get_conv_precision() -> str:
    """The float32 convolutions' precision: FASTMETA_CONV_PRECISION, read by the kernels at each call
    (unset or empty: 'ieee')."""
    v = os.environ.get("FASTMETA_CONV_PRECISION", "") or "ieee"
    if v not in CONV_PRECISIONS:
        raise ValueError(f"FASTMETA_CONV_PRECISION: expected one of {', '.join(CONV_PRECISIONS)}, got {v!r}")
    return v


def set_conv_precision(precision: str) -> None:
    """How the cpp, cuda and triton backends compute float32 convolutions from now on, process-wide
    (FASTMETA_CONV_PRECISION; a backward pass reads it when it runs): 'ieee' (default) each product
    in float32; 'tf32x3' each product as three TF32 tensor-core products of the operands' high and
    low parts, hi*hi' + hi*lo' + lo*hi', dropping only lo*lo' (~2^-22 of each product; float32
    rounds at 2^-24). On CUDA, cuDNN (fastmeta._C's ops) and the Triton kernels then run on tensor
    cores; on a CPU the same three products run in float32 (3x the work: a test of the arithmetic).
    float64 and the torch backend are not affected."""
    if precision not in CONV_PRECISIONS:
        raise ValueError(f"set_conv_precision: expected one of {', '.join(CONV_PRECISIONS)}, got {precision!r}")
    os.environ["FASTMETA_CONV_PRECISION"] = precision


@contextlib.contextmanager
def use_conv_precision(precision: str):
    """set_conv_precision inside the block (forward and backward passes run there), the previous
    setting restored after."""
    old = os.environ.get("FASTMETA_CONV_PRECISION")
    set_conv_precision(precision)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("FASTMETA_CONV_PRECISION", None)
        else:
            os.environ["FASTMETA_CONV_PRECISION"] = old


def autotune_on(device_type: str) -> bool:
    """FASTMETA_CONV_AUTOTUNE (read each call, as fastmeta._C reads it): unset or empty, on for CUDA
    tensors and off for CPU ones; '1' on, '0' off."""
    v = os.environ.get("FASTMETA_CONV_AUTOTUNE", "")
    if v == "":
        return device_type == "cuda"
    if v not in ("0", "1"):
        raise ValueError(f"FASTMETA_CONV_AUTOTUNE must be 0 or 1, got {v!r}")
    return v == "1"


# The dtypes whose convolutions may take the triton primitives under the autotune: float32 (in float64
# the Triton kernels compile for tens of seconds a shape, and cuDNN's double-precision kernels are
# the ones a float64 user wants to compare against anyway)
_TUNED_DTYPES = (torch.float32,)
# key -> "aten" or "triton" (the tuned primitives' choices), and one line a choice for reports
_CHOSEN: dict = {}
_CHOICE_LINES: list = []


def backend_choices() -> list:
    """The choices of the tuned primitives so far, one line each: 'primitive shapes | cuda ms |
    triton ms | choice' (fastmeta._C._conv_autotune_choices has those between its two forms)."""
    return list(_CHOICE_LINES)


def clear_backend_choices() -> None:
    """Forgets the tuned primitives' choices (the next call of each shape times again)."""
    _CHOSEN.clear()
    _CHOICE_LINES.clear()


def autotune_choices() -> dict:
    """What the convolutions' autotune chose so far in this process: 'forms', fastmeta._C's (one
    grouped ATen call or a call a task: 'op shapes | grouped ms | per task ms | choice'), and
    'backends', the tuned primitives' ('primitive shapes | cuda ms | triton ms | choice')."""
    try:
        from .. import _C
        forms = list(_C._conv_autotune_choices())
    except (ImportError, AttributeError):
        forms = []
    return {"forms": forms, "backends": backend_choices()}


def clear_autotune_choices() -> None:
    """Forgets every choice of the convolutions' autotune (the next call of each shape times again)."""
    clear_backend_choices()
    try:
        from .. import _C
        _C._conv_autotune_clear()
    except (ImportError, AttributeError):
        pass


def tunes_backends(device_type: str, dtype) -> bool:
    """Whether convolutions of this device and dtype weigh fastmeta._C's primitives against the
    triton ones (_TunedPrims): auto requested, a tuned dtype, the autotune on, triton usable."""
    return (dtype in _TUNED_DTYPES and requested("batched_conv2d") == "auto" and autotune_on(device_type)
            and why_unavailable("triton", device_type) is None)


def _time_call(fn, device):
    """(ms a call, the last call's result) of fn: one call to warm (a Triton kernel compiles in it),
    then three timed, with CUDA events on the current stream (by the clock on a CPU); each timed
    call drops the last result before it runs. None inside a CUDA graph capture (nothing runs)."""
    import time
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            return None
        out = fn()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(3):
            out = None
            out = fn()
        stop.record()
        stop.synchronize()
        return start.elapsed_time(stop) / 3, out
    out = fn()
    t0 = time.perf_counter()
    for _ in range(3):
        out = None
        out = fn()
    return (time.perf_counter() - t0) * 1e3 / 3, out


def _describe(tensors):
    return ", ".join("None" if t is None else "x".join(map(str, t.shape)) for t in tensors)


class _TunedPrims:
    """Under auto, in float32 (_TUNED_DTYPES), where both run (CUDA; a CPU under TRITON_INTERPRET=1
    with FASTMETA_CONV_AUTOTUNE=1): each primitive call takes the aten primitives (fastmeta._C's ops:
    cuDNN / oneDNN, grouped or a call a task by their own timing) or the triton ones, whichever was
    the faster for its shapes, strides, dtype and geometry, timed on that key's first call outside
    a graph capture (_time_call) and kept for the process. Both compute the same values up to
    rounding, so derivatives of any order may mix them. A triton call that fails while timed
    (a compilation error, out of memory) leaves the aten one chosen and says why in
    backend_choices()."""

    __slots__ = ("aten", "triton", "key")

    def __init__(self, stride, padding, dilation, groups):
        self.aten = _AtenPrims(stride, padding, dilation, groups)
        self.triton = _TritonPrims(padding)
        self.key = tuple(tuple(g) if isinstance(g, list) else g for g in self.aten.geom)

    def conv(self, x, w, b):
        return self._run("conv", (x, w, b), (), lambda p: p.conv(x, w, b))

    def input_grad(self, gy, w, x_size):
        return self._run("input grad", (gy, w), tuple(x_size), lambda p: p.input_grad(gy, w, x_size))

    def weight_grad(self, x, gy, w_size):
        return self._run("weight grad", (x, gy), tuple(w_size), lambda p: p.weight_grad(x, gy, w_size))

    def all_grads(self, gy, x, w, mask):
        return self._run("backward", (gy, x, w), tuple(mask), lambda p: p.all_grads(gy, x, w, mask))

    def _run(self, name, tensors, extra, fn):
        key = (name, self.key, extra, tensors[0].device, tensors[0].dtype,
               os.environ.get("FASTMETA_CONV_PRECISION", ""),
               *(None if t is None else (t.shape, t.stride()) for t in tensors))
        pick = _CHOSEN.get(key)
        if pick is not None:
            return fn(self.triton if pick == "triton" else self.aten)
        if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
                or torch._C._are_functorch_transforms_active()):
            return fn(self.aten)  # (traced, under a dispatch mode or a transform: nothing is timed)
        device = tensors[0].device
        timed = _time_call(lambda: fn(self.aten), device)
        if timed is None:  # inside a graph capture
            return fn(self.aten)
        aten_ms, out = timed
        out = None
        failed = ""
        try:
            triton_ms, out = _time_call(lambda: fn(self.triton), device)
        except Exception as e:  # the aten primitives stay; the reason is reported
            triton_ms, out, failed = float("inf"), None, f" (failed: {type(e).__name__}: {str(e)[:200]})"
        pick = "triton" if triton_ms < aten_ms else "aten"
        if pick == "aten":
            out = fn(self.aten)
        _CHOSEN[key] = pick
        aten = "cuda" if device.type == "cuda" else "cpp"
        line = (f"{name} {_describe(tensors)} | {aten} {aten_ms:.4f} ms | triton {triton_ms:.4f} ms{failed} | "
                f"{aten if pick == 'aten' else 'triton'}")
        _CHOICE_LINES.append(line)
        if os.environ.get("FASTMETA_CONV_AUTOTUNE_LOG") == "1":
            print(f"fastmeta: batched_conv2d backend autotune ({device}, {str(tensors[0].dtype)[6:]}): {line}",
                  file=sys.stderr, flush=True)
        return out


def _triton_supports(weight, stride, padding, dilation, groups):
    """The triton kernels' configurations: stride 1, no dilation, groups 1, integer padding of at
    most kernel size - 1 (the input gradient's padding kernel - 1 - padding is then >= 0)."""
    if isinstance(padding, str) or _pair(stride) != (1, 1) or _pair(dilation) != (1, 1) or groups != 1:
        return False
    ph, pw = _pair(padding)
    return 0 <= ph <= weight.shape[-2] - 1 and 0 <= pw <= weight.shape[-1] - 1


def check_args(x, weight, bias, groups, op="batched_conv2d"):
    """batched_conv2d's argument checks (ValueError / TypeError naming the argument and the shapes);
    returns (T, O)."""
    _checks.tensor("x", x, dim=5)
    _checks.tensor("weight", weight)
    T, C = x.shape[0], x.shape[2]
    if weight.dim() not in (4, 5) or (weight.dim() == 5 and weight.shape[0] != T):
        raise ValueError(f"{op}: weight {tuple(weight.shape)} must be [T={T}, O, C/g, kh, kw] "
                         f"or [O, C/g, kh, kw] for x {tuple(x.shape)}")
    if weight.shape[-3] * groups != C:
        raise ValueError(f"{op}: weight {tuple(weight.shape)} with groups={groups} expects "
                         f"{weight.shape[-3] * groups} input channels, x {tuple(x.shape)} has {C}")
    O = weight.shape[-4]
    if bias is not None and tuple(bias.shape) not in ((T, O), (O,)):
        raise ValueError(f"{op}: bias {tuple(bias.shape)} must be [T={T}, O={O}] or [O={O}]")
    _checks.same_device_dtype([("x", x), ("weight", weight)] + ([("bias", bias)] if bias is not None else []))
    return T, O


def output_size(x, weight, stride, padding, dilation):
    """(H', W') of a batched_conv2d of x with these settings (integer padding)."""
    s, p, d = _pair(stride), _pair(padding), _pair(dilation)
    return tuple(_out_size(x.shape[3 + i], weight.shape[-2 + i], s[i], p[i], d[i]) for i in range(2))


def batched_conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """Per-task Conv2d (see module docstring)."""
    T, O = check_args(x, weight, bias, groups)
    fused = fused_prims(x, weight, stride, padding, dilation, groups)
    if fused is None:
        return batched_conv2d_ref(x, weight, bias, stride, padding, dilation, groups)
    prims, w = fused
    b = None if bias is None else (bias if bias.dim() == 2 else bias.unsqueeze(0).expand(T, O))
    return _Conv.apply(x, w, b, prims)


def fused_prims(x, weight, stride=1, padding=0, dilation=1, groups=1):
    """(primitives, weight as the primitives take it) of the backend a batched_conv2d call of these
    arguments takes, or None where that is the torch reference (checked arguments)."""
    device_type = x.device.type
    backend = select("batched_conv2d", device_type)
    if (backend == "triton" and x.dtype in _checks.KERNEL_DTYPES
            and _triton_supports(weight, stride, padding, dilation, groups)):
        return _TritonPrims(padding), weight
    if backend in ("cpp", "cuda") and not isinstance(padding, str) and x.numel() > 0:
        T = x.shape[0]
        w = weight if weight.dim() == 5 else weight.unsqueeze(0).expand(T, *weight.shape)
        if tunes_backends(device_type, x.dtype) and _triton_supports(weight, stride, padding, dilation, groups):
            return _TunedPrims(stride, padding, dilation, groups), w
        return _AtenPrims(stride, padding, dilation, groups), w
    return None
