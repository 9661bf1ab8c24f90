"""``mlp_inner_loop``: the whole MAML inner loop of an MLP for T tasks, and its meta-gradient.

    losses = mlp_inner_loop(xs, ys, xq, yq, params, lr, steps, activations, negative_slope,
                            loss, first_order)                                   -> [T]

xs [T, K, I], xq [T, Q, I]; ys, yq [T, K, O] float (loss='mse') or [T, K] integer labels
(loss='cross_entropy'); params = [W_1 [d_1, d_0], b_1 [d_1], ..., W_L, b_L] (the meta-parameters,
shared by all tasks); lr a real number, one tensor per parameter of its shape (Meta-SGD), or one
per parameter and step, [S, *shape] (step s's rates in row s: MAML++'s per-step rates);
activations[l] in (None, 'relu', 'leaky_relu', 'tanh', 'sigmoid', 'gelu', 'gelu_tanh', 'silu')
after layer l ('gelu_tanh': GELU's tanh form, approximate='tanh').

For each task: S steps theta_{s+1} = theta_s - lr_s * grad L_support(theta_s) from the
meta-parameters, then the query loss L_query(theta_S), returned per task; with step_weights
(w_1..w_S, MAML++'s multi-step loss) the task's loss is sum_s w_s L_query(theta_s) instead (a step
of weight 0 is not evaluated). Backward gives the exact meta-gradient d loss / d theta_0 (second
order, or first order) and d loss / d lr.

Per-step rates and step_weights run on every backend (``cuda`` for at most CUDA_MAX_WEIGHTED_STEPS
steps with step_weights: beyond, the auto choice takes the reference and a ``cuda`` request raises).

The ``cpp`` backend (csrc/mlp_inner_loop.cpp), the ``cuda`` backend (csrc/cuda/mlp_inner_loop.cu,
one thread block per task) and the ``triton`` backend (kernels/mlp_inner_loop.py, one program per task) return the meta-gradient directly from one call (reverse pass over the steps
with closed-form Hessian-vector products); they are therefore differentiable once only. The reference, ``mlp_inner_loop_ref``, unrolls the loop with autograd
and is differentiable to any order. The kernels differentiate the parameters and rates, not the
data: a call whose xs, ys, xq or yq requires grad (with grad mode on) runs the reference.
"""
from __future__ import annotations

import functools
import math
import numbers
import os

import torch

from .. import _checks
from ..backend import register_op, requested, select
from .batched_linear import ACTIVATIONS, batched_linear_ref
from .task_loss import cross_entropy_ref, mse_ref

IMPLEMENTED = ("torch", "cpp", "cuda", "triton")
# on CUDA the C++ kernel is ~3x faster than the Triton one and holds ~5x less workspace
# (H100, benchmarks/RESULTS.md; measured with the CUDA kernel before its shared-memory rewrite)
AUTO = {"cpu": ("cpp", "torch"), "cuda": ("cuda", "triton", "torch")}
register_op("mlp_inner_loop", IMPLEMENTED, AUTO)
# the backends that run per-step rates and step_weights (MAML++); the CUDA kernel holds the weights
# of at most CUDA_MAX_WEIGHTED_STEPS steps in its arguments (csrc/cuda/kernels.cuh kMaxWeightedSteps)
STEP_BACKENDS = ("torch", "cpp", "cuda", "triton")
CUDA_MAX_WEIGHTED_STEPS = 64


def runs_step_settings(backend: str, steps: int, per_step_rates: bool, step_weights) -> bool:
    """Whether the backend's kernel runs a call with these per-step rates / step weights."""
    if not per_step_rates and step_weights is None:
        return True
    if backend not in STEP_BACKENDS:
        return False
    return not (backend == "cuda" and step_weights is not None and steps > CUDA_MAX_WEIGHTED_STEPS)
_ACT_CODE = {None: 0, "relu": 1, "leaky_relu": 2, "tanh": 3, "sigmoid": 4, "gelu": 5, "gelu_tanh": 6, "silu": 7}
_LOSS_CODE = {"mse": 0, "cross_entropy": 1}


# Where BatchedMAML's auto choice leaves the fused CPU kernel for the batched torch ops. The kernel
# runs tasks in SIMD lanes, one group of `lanes` tasks at a time (16 float32 lanes with AVX-512, 8
# with AVX2), so a meta-batch that fills few of one group's lanes pays for all of them, while the
# batched torch ops (per-task matrix products on every core) pay per task. Per pass over N rows of
# a task (S support steps of K rows, then the query's Q), with w = sum_l d_{l-1} d_l the weights:
#   fused kernel  ~ lanes * N * w * FUSED        (one group: every lane's products)
#   torch ops     ~ T * w * (1 + ROWS * N) + PASS
# (weight-sized ops per task, their products, and the ops' fixed cost per pass), in units of one
# weight-sized torch op of one task, by order (second, first): fitted to value_and_grad on 32-h-h-5
# MLPs (h 64 to 512, K = Q = 10 and 25, T 1 to 16) on a 2-core Xeon with AVX-512 at two threads (at
# one, every torch choice was right too; more cores are not measured); the AVX2 machine's
# timings give the same ratio of kernel to ops per lane (benchmarks/RESULTS.md, "Few tasks of a
# wide MLP"). The torch ops are taken where they are expected MARGIN times faster, and never for
# more than one group of tasks: with its lanes full the kernel was the faster in every shape
# measured but one (0.87x, 512 wide with 75 rows).
_COST = {False: (0.03, 0.0065, 1.6e5), True: (0.03, 0.012, 2.75e5)}  # first_order -> FUSED, ROWS, PASS
_TORCH_MARGIN = 1.5


def cpu_lanes(dtype) -> int:
    """The fused CPU kernel's tasks a group (one a SIMD lane) for dtype (float32 or float64)."""
    from .. import _C
    return int(_C._mlp_lanes(dtype.itemsize))


def cpu_kernel_slower(T: int, K: int, Q: int, widths, steps: int, first_order: bool, dtype) -> bool:
    """Whether the fused CPU kernel is expected to be clearly slower (1.5x) than the batched torch
    ops for T tasks of K support and Q query rows, an MLP of these widths (d_0, ..., d_L), ``steps``
    inner steps of this order: a meta-batch that fills a small part of one group of SIMD lanes, of
    an MLP whose weights are large (the cost model above)."""
    lanes = cpu_lanes(dtype)
    if T > lanes:
        return False
    fused_c, rows_c, pass_c = _COST[bool(first_order)]
    w = sum(a * b for a, b in zip(widths[:-1], widths[1:]))
    rows = [K] * steps + [Q]
    fused = sum(lanes * n * w * fused_c for n in rows)
    ops = sum(T * w * (1 + rows_c * n) + pass_c for n in rows)
    return fused > _TORCH_MARGIN * ops


def _mlp(x, params, activations, negative_slope):
    for l, act in enumerate(activations):
        x = batched_linear_ref(x, params[2 * l], params[2 * l + 1], act, negative_slope)
    return x


def mlp_inner_loop_ref(xs, ys, xq, yq, params, lr, steps, activations, negative_slope=0.01,
                       loss="mse", first_order=False, step_weights=None):
    """Pure-PyTorch reference: the inner loop unrolled under autograd. Returns the query losses [T]
    (with step_weights, sum_s w_s L_query(theta_s))."""
    loss_fn = mse_ref if loss == "mse" else cross_entropy_ref
    per_step = rates_per_step(params, lr)
    total_loss = None
    T = xs.shape[0]
    grad_on = torch.is_grad_enabled()
    with torch.enable_grad():
        # (under no_grad, a view of a parameter says requires_grad but has no graph: the steps'
        # gradients start from a detached copy there, and the losses come back detached)
        theta = [p.unsqueeze(0).expand(T, *p.shape) for p in params]
        if not grad_on:
            theta = [t.detach() for t in theta]
        if not first_order:  # the steps differentiate theta even where the caller's params do not need it
            theta = [t if t.requires_grad else t.detach().requires_grad_() for t in theta]
        for s in range(steps):
            if first_order:
                probe = [t.detach().requires_grad_() for t in theta]
                total = loss_fn(_mlp(xs, probe, activations, negative_slope), ys).sum()
                grads = torch.autograd.grad(total, probe)
            else:
                total = loss_fn(_mlp(xs, theta, activations, negative_slope), ys).sum()
                grads = torch.autograd.grad(total, theta, create_graph=True)
            if isinstance(lr, (list, tuple)):
                theta = [t - (l[s] if per_step else l) * g for t, l, g in zip(theta, lr, grads)]
            else:
                theta = [t - lr * g for t, g in zip(theta, grads)]
            w = step_weights[s] if step_weights is not None and s < steps - 1 else 0.0
            if w != 0.0:  # the multi-step loss: the query loss after step s + 1
                term = w * loss_fn(_mlp(xq, theta, activations, negative_slope), yq)
                total_loss = term if total_loss is None else total_loss + term
        w = 1.0 if step_weights is None else step_weights[-1]
        if w != 0.0:
            out = loss_fn(_mlp(xq, theta, activations, negative_slope), yq)
            out = out if step_weights is None else w * out
            total_loss = out if total_loss is None else total_loss + out
        if total_loss is None:  # every weight 0: a zero loss (zero gradients)
            total_loss = xq.new_zeros(xq.shape[0]) + 0 * sum(t.sum() for t in theta)
    return total_loss if grad_on else total_loss.detach()


def rates_per_step(params, lr) -> bool:
    """Whether lr is one rate tensor per parameter and step ([S, *shape] each)."""
    return isinstance(lr, (list, tuple)) and len(lr) > 0 and lr[0].dim() == params[0].dim() + 1


def check_labels(ys, yq, C, op="mlp_inner_loop"):
    """Cross-entropy labels must lie in [0, C): checked on the values (one device sync); yq None:
    the support set's only."""
    _checks.labels_in_range([("ys", ys)] + ([("yq", yq)] if yq is not None else []), C, op)


@functools.cache
def _register_cpp():
    @torch.library.register_fake("fastmeta::mlp_inner_loop")
    def _(xs, ys, xq, yq, params, lrs, lr, steps, acts, negative_slope, loss, first_order, need_lr_grad,
          step_weights=()):
        T, P = xs.shape[0], sum(p.numel() for p in params)
        Plr = sum(r.numel() for r in lrs) if lrs else P
        return [xs.new_empty(T), xs.new_empty(T, P), xs.new_empty(T if need_lr_grad else 0, Plr)]


    @torch.library.register_fake("fastmeta::mlp_adapt")
    def _(xs, ys, params, lrs, lr, steps, acts, negative_slope, loss):
        return [xs.new_empty(xs.shape[0], sum(p.numel() for p in params)), xs.new_empty(xs.shape[0])]


    @torch.library.register_fake("fastmeta::mlp_meta_grad")
    def _(xs, ys, xq, yq, params, lrs, lr, steps, acts, negative_slope, loss, first_order, need_lr_grad,
          step_weights=()):
        like = list(params) + (list(lrs) if need_lr_grad else [])
        if xs.device.type == "cpu" and os.environ.get("FASTMETA_META_GRAD_ROWS") != "1":
            # the CPU kernel's reduction writes one tensor per parameter
            return [xs.new_empty(())] + [xs.new_empty(p.shape) for p in like]
        # reduced from per-task rows (CUDA; csrc/mlp_meta_loss.cpp from_rows): views of one buffer
        flat = xs.new_empty(sum(p.numel() for p in like))
        return [xs.new_empty(())] + [g.view(p.shape) for g, p in zip(flat.split([p.numel() for p in like]), like)]


@functools.cache
def _register_triton():
    """fastmeta::mlp_inner_loop_triton: the Triton kernel as a torch.library custom op with a fake."""
    from ..kernels.mlp_inner_loop import mlp_inner_loop_fwd

    @torch.library.custom_op("fastmeta::mlp_inner_loop_triton", mutates_args=())
    def _op(xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor, params: list[torch.Tensor],
            lrs: list[torch.Tensor], lr: float, steps: int, acts: list[int], negative_slope: float, loss: int,
            first_order: bool, need_lr_grad: bool, step_weights: list[float] | None = None) -> list[torch.Tensor]:
        return mlp_inner_loop_fwd(xs, ys, xq, yq, params, lrs, lr, steps, acts, negative_slope, loss,
                                  first_order, need_lr_grad, step_weights)

    @_op.register_fake
    def _(xs, ys, xq, yq, params, lrs, lr, steps, acts, negative_slope, loss, first_order, need_lr_grad,
          step_weights=None):
        T, P = xs.shape[0], sum(p.numel() for p in params)
        Plr = sum(r.numel() for r in lrs) if lrs else P
        return [xs.new_empty(T), xs.new_empty(T, P), xs.new_empty(T if need_lr_grad else 0, Plr)]


@functools.cache
def _register_triton_adapt():
    """fastmeta::mlp_adapt_triton: the Triton kernel's inner loop alone (mlp_adapt) as a custom op."""
    from ..kernels.mlp_inner_loop import mlp_adapt_fwd

    @torch.library.custom_op("fastmeta::mlp_adapt_triton", mutates_args=())
    def _op(xs: torch.Tensor, ys: torch.Tensor, params: list[torch.Tensor], lrs: list[torch.Tensor], lr: float,
            steps: int, acts: list[int], negative_slope: float, loss: int) -> list[torch.Tensor]:
        return mlp_adapt_fwd(xs, ys, params, lrs, lr, steps, acts, negative_slope, loss)

    @_op.register_fake
    def _(xs, ys, params, lrs, lr, steps, acts, negative_slope, loss):
        T = xs.shape[0]
        return [xs.new_empty(T, sum(p.numel() for p in params)), xs.new_empty(T)]
    return torch.ops.fastmeta.mlp_adapt_triton


def _kernel(backend):
    if backend in ("cpp", "cuda"):  # fastmeta::mlp_inner_loop has a CPU and a CUDA kernel
        _register_cpp()
        return torch.ops.fastmeta.mlp_inner_loop
    _register_triton()
    return torch.ops.fastmeta.mlp_inner_loop_triton


def refuse_second_derivative(op: str):
    """In a fused op's backward: under create_graph=True (grad mode on) a derivative of the
    meta-gradient is wanted, which the kernels' closed-form meta-gradient cannot give."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"{op} returns the meta-gradient directly and is differentiable once only; use "
                           "fastmeta.use_backend('torch') for higher-order derivatives of the meta-loss")


class _FusedMLPInnerLoop(torch.autograd.Function):
    """Autograd of the fused ops (fastmeta::mlp_inner_loop, ::mlp_inner_loop_triton): they return the
    per-task meta-gradients with the losses, so backward is a weighted sum over tasks; it is
    differentiable once only."""

    @staticmethod
    def forward(ctx, kernel, xs, ys, xq, yq, lr, steps, acts, slope, loss, first_order, n, need_lr_grad,
                step_weights, *tensors):
        params, lrs = list(tensors[:n]), list(tensors[n:])
        extra = (step_weights,) if step_weights else ()
        outs = kernel(xs, ys, xq, yq, params, lrs, lr, steps, acts, slope, loss, first_order, need_lr_grad,
                      *extra)
        ctx.shapes = [p.shape for p in params]
        ctx.lr_shapes = [r.shape for r in lrs]
        ctx.n_lrs, ctx.need_lr_grad = len(lrs), need_lr_grad
        ctx.save_for_backward(outs[1], outs[2])
        return outs[0]

    @staticmethod
    def backward(ctx, go):
        refuse_second_derivative("fastmeta::mlp_inner_loop")
        dtheta, dlr = ctx.saved_tensors
        go = go.to(dtheta.dtype)

        def split(flat, shapes):  # sum_t go[t] * d[t], then one view per tensor
            total = torch.mv(flat.t(), go)
            return [g.view(s) for g, s in zip(torch.split(total, [math.prod(s) for s in shapes]), shapes)]
        grads = split(dtheta, ctx.shapes)
        if ctx.need_lr_grad:
            grads += split(dlr, ctx.lr_shapes)
        else:
            grads += [None] * ctx.n_lrs
        return (None,) * 14 + tuple(grads)


def check_args(xs, ys, xq, yq, params, lr, steps, activations, loss, step_weights=None, op="mlp_inner_loop"):
    """The checks of mlp_inner_loop's arguments (each error names the op, the argument and its shape)."""
    for name, t in (("xs", xs), ("xq", xq)):
        _checks.tensor(name, t, dim=3)
        _checks.floating(name, t)
    if loss not in _LOSS_CODE:
        raise ValueError(f"{op}: loss must be 'mse' or 'cross_entropy', got {loss!r}")
    T = xs.shape[0]
    for name, t in (("ys", ys), ("xq", xq), ("yq", yq)):
        _checks.tensor(name, t)
        if t.shape[0] != T:
            raise ValueError(f"{op}: {name} {tuple(t.shape)} has T={t.shape[0]} but xs "
                             f"{tuple(xs.shape)} has T={T}")
    if not isinstance(params, (list, tuple)) or len(params) == 0 or len(params) % 2:
        raise ValueError(f"{op}: params must be a list [W_1, b_1, ..., W_L, b_L]")
    if len(activations) != len(params) // 2:
        raise ValueError(f"{op}: {len(activations)} activations for {len(params) // 2} layers")
    for a in activations:
        if a not in ACTIVATIONS:
            raise ValueError(f"{op}: activation {a!r} not in {ACTIVATIONS}")
    if xq.shape[2] != xs.shape[2]:
        raise ValueError(f"{op}: xq {tuple(xq.shape)} and xs {tuple(xs.shape)} differ in features "
                         f"per sample")
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"{op}: steps must be an int >= 0, got {steps!r}")
    if steps > 0 and xs.shape[1] == 0:
        raise ValueError(f"{op}: xs {tuple(xs.shape)} has no support samples for {steps} steps")
    if xq.shape[1] == 0:
        raise ValueError(f"{op}: xq {tuple(xq.shape)} has no query samples")
    width = xs.shape[2]
    W0 = params[0] if params else None
    if isinstance(W0, torch.Tensor) and W0.dim() == 2 and W0.shape[1] != width:
        raise ValueError(f"{op}: xs {tuple(xs.shape)} and xq {tuple(xq.shape)} have {width} features a sample, "
                         f"but the first layer's W {tuple(W0.shape)} takes {W0.shape[1]}")
    for l in range(len(params) // 2):
        W, b = params[2 * l], params[2 * l + 1]
        if W.dim() != 2 or W.shape[1] != width or b.shape != (W.shape[0],):
            raise ValueError(f"{op}: layer {l} has W {tuple(W.shape)}, b {tuple(b.shape)}; "
                             f"expected W [O, {width}], b [O]")
        _checks.same_device_dtype([("xs", xs), (f"params[{2 * l}]", W), (f"params[{2 * l + 1}]", b)])
        width = W.shape[0]
    if loss == "mse":
        for name, y, x in (("ys", ys, xs), ("yq", yq, xq)):
            if tuple(y.shape) != (x.shape[0], x.shape[1], width):
                raise ValueError(f"{op}: {name} {tuple(y.shape)} must be "
                                 f"[T, {x.shape[1]}, {width}] for mse")
    else:
        for name, y, x in (("ys", ys, xs), ("yq", yq, xq)):
            if y.is_floating_point() or tuple(y.shape) != tuple(x.shape[:2]):
                raise ValueError(f"{op}: {name} {tuple(y.shape)} ({y.dtype}) must be integer "
                                 f"labels [T, {x.shape[1]}] for cross_entropy")
    if isinstance(lr, (list, tuple)):
        if not all(isinstance(l, torch.Tensor) for l in lr):
            raise TypeError(f"{op}: lr must be a real number or a list of tensors, got a list of "
                            f"{sorted({type(l).__name__ for l in lr})}")
        lead = (steps,) if rates_per_step(params, lr) else ()
        if len(lr) != len(params) or any(tuple(l.shape) != lead + tuple(p.shape) for l, p in zip(lr, params)):
            raise ValueError(f"{op}: per-parameter lr shapes {_checks.shapes(lr)} must equal the params' "
                             f"{_checks.shapes(params)}, or be [steps={steps}, *shape] each (one rate set a step)")
    elif not isinstance(lr, numbers.Real) or isinstance(lr, bool):
        raise TypeError(f"{op}: lr must be a real number or a list of tensors, got {type(lr).__name__}")
    if step_weights is not None:
        if (not isinstance(step_weights, (list, tuple))
                or not all(isinstance(w, numbers.Real) and not isinstance(w, bool) for w in step_weights)):
            raise TypeError(f"{op}: step_weights must be None or a list of real numbers, got "
                            f"{step_weights!r}")
        if len(step_weights) != steps or not all(math.isfinite(w) for w in step_weights):
            raise ValueError(f"{op}: step_weights must be one finite weight a step (steps={steps}), got "
                             f"{list(step_weights)}")


def _data_grad(xs, ys, xq, yq) -> bool:
    """Whether a gradient for the data is wanted: the fused kernels differentiate the parameters
    and rates only, so such a call takes the reference (differentiable in everything)."""
    return torch.is_grad_enabled() and (xs.requires_grad or ys.requires_grad or xq.requires_grad
                                        or yq.requires_grad)


def _reference_only(xs, ys, xq, yq) -> bool:
    """Whether a call takes the reference whatever the backend: a gradient for the data is wanted,
    or the dtype has no fused kernel (bfloat16, float16)."""
    return xs.dtype not in _checks.KERNEL_DTYPES or _data_grad(xs, ys, xq, yq)


def _weights(step_weights):
    """step_weights as the kernels take them: a list of floats (empty: the last step's loss only)."""
    return [] if step_weights is None else [float(w) for w in step_weights]


def _backend(xs, params, lr, step_weights) -> str:
    """The backend of a call: per-step rates and step_weights run on STEP_BACKENDS only (under the
    auto request the reference takes them elsewhere; another explicit request raises)."""
    backend = select("mlp_inner_loop", xs.device.type)
    steps = len(step_weights) if step_weights is not None else 0
    if runs_step_settings(backend, steps, rates_per_step(params, lr), step_weights):
        return backend
    if requested("mlp_inner_loop") == "auto":
        return "torch"
    raise ValueError(f"mlp_inner_loop: per-step rates (lr [steps, *shape]) and step_weights run on the backends "
                     f"{STEP_BACKENDS} (cuda: step_weights of at most {CUDA_MAX_WEIGHTED_STEPS} steps), not on the "
                     f"requested {backend!r}" + (f" for {steps} steps" if backend in STEP_BACKENDS else ""))


def mlp_inner_loop(xs, ys, xq, yq, params, lr, steps, activations, negative_slope=0.01,
                   loss="mse", first_order=False, step_weights=None, _checked=False):
    """Query losses [T] after the inner loop; backward is the exact meta-gradient (see module doc).

    _checked: the caller has checked arguments of these very shapes, dtypes and devices before."""
    if not _checked:
        check_args(xs, ys, xq, yq, params, lr, steps, activations, loss, step_weights)
    if loss == "cross_entropy":
        check_labels(ys, yq, params[-2].shape[0])
    backend = _backend(xs, params, lr, step_weights)
    if backend == "torch" or _reference_only(xs, ys, xq, yq):
        return mlp_inner_loop_ref(xs, ys, xq, yq, list(params), lr, steps, activations,
                                  negative_slope, loss, first_order, step_weights)
    lrs = list(lr) if isinstance(lr, (list, tuple)) else []
    need_lr_grad = any(l.requires_grad for l in lrs) and torch.is_grad_enabled()
    y_cast = (lambda y: y.long()) if loss == "cross_entropy" else (lambda y: y)
    return _FusedMLPInnerLoop.apply(
        _kernel(backend), xs, y_cast(ys), xq, y_cast(yq), float(lr) if not lrs else 0.0, steps,
        [_ACT_CODE[a] for a in activations], float(negative_slope), _LOSS_CODE[loss], bool(first_order),
        len(params), need_lr_grad, _weights(step_weights), *params, *lrs)


def mlp_meta_loss(xs, ys, xq, yq, params, lr, steps, activations, negative_slope=0.01, loss="mse",
                  first_order=False, step_weights=None, _checked=False):
    """The mean over tasks of mlp_inner_loop's query losses (a scalar). On the cpp / cuda backends
    one C++ op, fastmeta::mlp_meta_loss, whose autograd is in C++ too (no Python on the backward
    path); elsewhere mlp_inner_loop(...).mean()."""
    if not _checked:
        check_args(xs, ys, xq, yq, params, lr, steps, activations, loss, step_weights)
    backend = _backend(xs, params, lr, step_weights)
    if backend not in ("cpp", "cuda") or _reference_only(xs, ys, xq, yq):
        return mlp_inner_loop(xs, ys, xq, yq, params, lr, steps, activations, negative_slope, loss,
                              first_order, step_weights, _checked=True).mean()
    return torch.ops.fastmeta.mlp_meta_loss(*_op_args(xs, ys, xq, yq, params, lr, steps, activations,
                                                      negative_slope, loss, first_order),
                                            _weights(step_weights))


def _op_args(xs, ys, xq, yq, params, lr, steps, activations, negative_slope, loss, first_order):
    """The first 12 arguments of fastmeta::mlp_meta_loss and ::mlp_meta_grad: labels
    range-checked and int64 for cross-entropy, a scalar lr or the list of rates."""
    if loss == "cross_entropy":
        check_labels(ys, yq, params[-2].shape[0])
        ys, yq = ys.long(), yq.long()
    _register_cpp()
    lrs = list(lr) if isinstance(lr, (list, tuple)) else []
    return (xs, ys, xq, yq, list(params), lrs, float(lr) if not lrs else 0.0, steps,
            [_ACT_CODE[a] for a in activations], float(negative_slope), _LOSS_CODE[loss], bool(first_order))


def mlp_adapt_ref(xs, ys, params, lr, steps, activations, negative_slope=0.01, loss="mse"):
    """Pure-PyTorch reference of mlp_adapt: the first-order steps unrolled under autograd, values."""
    loss_fn = mse_ref if loss == "mse" else cross_entropy_ref
    per_step = rates_per_step(params, lr)
    T = xs.shape[0]
    theta = [p.detach().unsqueeze(0).expand(T, *p.shape) for p in params]
    first = None
    with torch.enable_grad():
        for s in range(max(steps, 1)):
            probe = [t.detach().requires_grad_() for t in theta]
            losses = loss_fn(_mlp(xs, probe, activations, negative_slope), ys)
            if first is None:
                first = losses.detach()
            if steps == 0:
                break
            grads = torch.autograd.grad(losses.sum(), probe)
            if isinstance(lr, (list, tuple)):
                theta = [t - (l[s] if per_step else l).detach() * g for t, l, g in zip(theta, lr, grads)]
            else:
                theta = [t - lr * g for t, g in zip(theta, grads)]
    return [t.detach() for t in theta], first


def mlp_adapt(xs, ys, params, lr, steps, activations, negative_slope=0.01, loss="mse", flat=False, _checked=False):
    """The inner loop alone, as values: (theta_S, losses) with theta_S one [T, *shape] tensor a
    parameter (each task's parameters after ``steps`` SGD steps on its (xs, ys) from the
    meta-parameters, with lr as mlp_inner_loop takes it) and losses [T] the support losses at the
    meta-parameters. Reptile's update, and adapted parameters for evaluation. The cpp and cuda
    backends run it in one call (fastmeta::mlp_adapt), the triton backend in one launch
    (fastmeta::mlp_adapt_triton); elsewhere the reference (no gradient flows either way).
    flat: theta_S as one [T, P] tensor (the parameters flattened in turn) instead."""
    if not _checked:  # (the support set stands in for the query set: its errors name xs and ys)
        check_args(xs, ys, xs, ys, params, lr, steps, activations, loss, op="mlp_adapt")
    if loss == "cross_entropy":
        check_labels(ys, None, params[-2].shape[0], "mlp_adapt")
    T = xs.shape[0]
    backend = select("mlp_inner_loop", xs.device.type)
    if backend not in ("cpp", "cuda", "triton") or xs.dtype not in _checks.KERNEL_DTYPES:
        thetas, losses = mlp_adapt_ref(xs, ys, list(params), lr, steps, activations, negative_slope, loss)
        return (torch.cat([t.reshape(T, -1) for t in thetas], 1) if flat else thetas), losses
    if backend == "triton":
        op = _register_triton_adapt()
    else:
        _register_cpp()
        op = torch.ops.fastmeta.mlp_adapt
    lrs = [r.detach() for r in lr] if isinstance(lr, (list, tuple)) else []
    theta, losses = op(
        xs.detach(), (ys.long() if loss == "cross_entropy" else ys).detach(), [p.detach() for p in params], lrs,
        float(lr) if not lrs else 0.0, steps, [_ACT_CODE[a] for a in activations], float(negative_slope),
        _LOSS_CODE[loss])
    if flat:
        return theta, losses
    return [t.view(T, *p.shape) for t, p in zip(theta.split([p.numel() for p in params], 1), params)], losses


def _direct_op(name, spec, loss, device_type):
    """(op, acts, slope, loss code) for the *_direct functions, or None where they do not apply: a
    backend other than cpp / cuda, or cross-entropy (its labels are range-checked on every call)."""
    if loss != "mse" or select("mlp_inner_loop", device_type) not in ("cpp", "cuda"):
        return None
    _register_cpp()
    return (getattr(torch.ops.fastmeta, name).default, [_ACT_CODE[a] for a in spec.activations],
            float(spec.negative_slope), _LOSS_CODE[loss])


def mlp_meta_loss_direct(spec, loss, device_type):
    """fastmeta::mlp_meta_loss bound to an MLP spec and a loss, for arguments already checked
    (BatchedMAML's repeated calls), or None where that does not apply (see _direct_op).
    The returned f(xs, ys, xq, yq, params, lrs, lr, steps, first_order) takes a scalar lr (lrs
    empty) or one rate a parameter entry (lrs, one a parameter; lr unused)."""
    bound = _direct_op("mlp_meta_loss", spec, loss, device_type)
    if bound is None:
        return None
    op, acts, slope, code = bound
    fast = _cpu_binding("_mlp_meta_loss_cpu_direct") if device_type == "cpu" else None

    def call(xs, ys, xq, yq, params, lrs, lr, steps, first_order):
        if fast is not None and _plain_call(xs, ys, xq, yq, params, lrs):
            return fast(xs, ys, xq, yq, params, lrs, lr, steps, acts, slope, code, first_order)
        return op(xs, ys, xq, yq, params, lrs, lr, steps, acts, slope, code, first_order)
    return call


def mlp_meta_grad(xs, ys, xq, yq, params, lr, steps, activations, negative_slope=0.01, loss="mse",
                  first_order=False, step_weights=None, _checked=False):
    """(loss, grads, lr_grads): mlp_meta_loss's value (detached) and its gradient with respect to
    each of params (and, with a list lr, each of the rates; else lr_grads is None), whether they
    require grad or not, as values. On the cpp / cuda backends fastmeta::mlp_meta_grad returns them
    from the kernel (no autograd graph); elsewhere torch.autograd.grad of mlp_meta_loss."""
    if not _checked:
        check_args(xs, ys, xq, yq, params, lr, steps, activations, loss, step_weights)
    lrs = list(lr) if isinstance(lr, (list, tuple)) else []
    n = len(params)
    if _backend(xs, params, lr, step_weights) not in ("cpp", "cuda") or xs.dtype not in _checks.KERNEL_DTYPES:
        wrt = [t.detach().requires_grad_() for t in list(params) + lrs]  # every tensor, as the kernel
        with torch.enable_grad():
            value = mlp_meta_loss(xs, ys, xq, yq, wrt[:n], wrt[n:] if lrs else lr, steps, activations,
                                  negative_slope, loss, first_order, step_weights, _checked=True)
            grads = torch.autograd.grad(value, wrt, allow_unused=True, materialize_grads=True)
        return value.detach(), list(grads[:n]), (list(grads[n:]) if lrs else None)
    out = torch.ops.fastmeta.mlp_meta_grad(*_op_args(xs, ys, xq, yq, params, lr, steps, activations,
                                                     negative_slope, loss, first_order), bool(lrs),
                                           _weights(step_weights))
    return out[0], out[1:1 + n], (out[1 + n:] if lrs else None)


def mlp_meta_grad_direct(spec, loss, device_type):
    """mlp_meta_grad bound to an MLP spec and a loss for arguments already checked, on the cpp /
    cuda backends with mse (as mlp_meta_loss_direct), else None. The returned
    f(xs, ys, xq, yq, params, lrs, lr, steps, first_order) gives (loss, grads): one gradient a
    parameter, then (with lrs) one a rate."""
    bound = _direct_op("mlp_meta_grad", spec, loss, device_type)
    if bound is None:
        return None
    op, acts, slope, code = bound
    fast = _cpu_binding("_mlp_meta_grad_cpu_direct") if device_type == "cpu" else None

    def call(xs, ys, xq, yq, params, lrs, lr, steps, first_order):
        if fast is not None and _plain_call(xs, ys, xq, yq, params, lrs):
            out = fast(xs, ys, xq, yq, params, lrs, lr, steps, acts, slope, code, first_order)
        else:
            out = op(xs, ys, xq, yq, params, lrs, lr, steps, acts, slope, code, first_order, bool(lrs))
        return out[0], out[1:]
    return call


def mlp_meta_grad_bound(spec, loss, own, own_key, dicts, params, lrs, batch, lr, steps, first_order, as_loss=False,
                        layer_rates=False, per_step=False, step_weights=None):
    """mlp_meta_grad_direct's CPU call (as_loss: mlp_meta_loss_direct's) for this batch's shapes,
    bound to what a module's checked call saw (fastmeta._C._BoundMetaGrad, csrc/bound_call.cpp):
    own, the module's __dict__ (own_key, where the module keeps its bindings, left out); dicts, its
    modules' _modules and _parameters dicts; the parameters, with the scalar lr (lrs empty), one
    rate a parameter (lrs, Meta-SGD's; lr unused) or, with layer_rates,
    mlp_meta_grad_layer_rates_direct's rates (one a tensor, or a tensor and step with per_step;
    step_weights), and the batch [xs, ys, xq, yq]. Returns (binding, keep) or None where no binding
    applies (not the CPU kernel, a build without it, tensors that are not plain ones). binding(own, xs, ys, xq, yq) gives (loss, grads: the
    parameters', then the rates') (as_loss: the loss with its autograd), or None where the module,
    its modules, parameters, rates, the batch's shapes or the dispatcher's state (as_loss: grad mode
    too) differ from then; keep holds the objects the binding points to and is to be kept with it."""
    make = _cpu_binding("_BoundMetaGrad")
    bound = _direct_op("mlp_meta_loss" if as_loss else "mlp_meta_grad", spec, loss, "cpu")
    if make is None or bound is None or any(t.device.type != "cpu" for t in batch) or \
            not _plain_call(*batch, params, lrs):
        return None
    from torch.utils.hooks import RemovableHandle
    _, acts, slope, code = bound
    keep = []
    return make(own, own_key, dicts, RemovableHandle, list(params), list(lrs), list(batch), float(lr), steps, acts,
                slope, code, bool(first_order), bool(as_loss), bool(layer_rates), bool(per_step),
                _weights(step_weights), keep), keep


def mlp_meta_grad_layer_rates_direct(spec, loss, device_type):
    """mlp_meta_grad bound as mlp_meta_grad_direct, for rates of one value a parameter tensor
    (rates[i] []) or a tensor and inner step (rates[i] [S0], S0 >= steps): fastmeta._C expands them
    to the op's rates and sums their gradients back (learn_inner_lr='per_layer' / 'per_layer_step').
    The returned f(xs, ys, xq, yq, params, rates, per_step, steps, first_order, step_weights,
    rate_grads=True) gives (loss, grads): one gradient a parameter, then (rate_grads) one a rate,
    shaped as it, or None where a
    dispatcher-level feature is in effect (_plain_call); the function is None where the direct
    calls do not apply (see _direct_op) or the build lacks the binding."""
    bound = _direct_op("mlp_meta_grad", spec, loss, device_type)
    fast = _cpu_binding("_mlp_meta_grad_layer_rates") if bound is not None else None
    if fast is None:
        return None
    _, acts, slope, code = bound

    def call(xs, ys, xq, yq, params, rates, per_step, steps, first_order, step_weights, rate_grads=True):
        if not _plain_call(xs, ys, xq, yq, params, rates):
            return None
        out = fast(xs, ys, xq, yq, params, rates, per_step, steps, acts, slope, code, first_order,
                   _weights(step_weights), rate_grads)
        return out[0], out[1:]
    return call


def _cpu_binding(name):
    """fastmeta._C.<name>: a direct binding of fastmeta::mlp_meta_grad / ::mlp_meta_loss (their
    CPU path without the dispatcher, or the layer rates' call; csrc/bindings.cpp), or None in a
    build without it."""
    from .. import _C
    return getattr(_C, name, None)


def _plain_call(xs, ys, xq, yq, params, lrs=()) -> bool:
    """Whether a call may skip the dispatcher: nothing that the dispatcher would route elsewhere is
    in effect (a torch function or dispatch mode, a functorch transform, compilation) and the
    tensors are plain (a subclass keeps its __torch_function__ through the op)."""
    if not _checks.dispatch_plain():
        return False
    if type(xs) is not torch.Tensor or type(ys) is not torch.Tensor or type(xq) is not torch.Tensor or \
            type(yq) is not torch.Tensor:
        return False
    for group in (params, lrs):  # (loops: a generator per call costs more than the checks)
        for t in group:
            if type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter:
                return False
    return True
