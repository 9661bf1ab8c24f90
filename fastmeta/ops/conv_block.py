"""``conv_bn_relu_pool``: a conv4 block (per-task Conv2d -> BatchNorm with batch statistics -> ReLU
-> MaxPool2d(2)) on input that needs no gradient (a network's images), keeping the convolution's
output for no backward: each backward recomputes it from the images.

    x [T, N, C, H, W] (no gradient), weight [T, O, C/g, kh, kw] or [O, C/g, kh, kw], bias [T, O], [O]
    or None, conv geometry; bn_weight, bn_bias [T, O], [O] or None  ->  [T, N, O, H' // 2, W' // 2]

The same values and derivatives as batched_conv2d followed by bn_relu_pool. What differs is what
the autograd graph keeps: there, the convolution's output z (for mini-ImageNet's first block 25
images x 32 x 84 x 84 a task and inner step, the largest tensor of the step) lives until the outer
backward, kept by bn_relu_pool's forward and again by the differentiable backward that a
create_graph=True inner step builds. Here both keep the images and the (small) parameters instead,
and recompute z = conv(x, weight, bias) where they need it: once in each inner step's backward,
once in the outer backward of each step's backward and of the query pass. The backward's derivative
is closed form (the conv primitives and bn_relu_pool's double-backward kernel), so second-order MAML
composes; a third derivative differentiates the reference ops' backward of the block.

It runs on the fused backends of both ops (batched_conv2d: cpp, cuda or triton; bn_relu_pool: cpp,
cuda or triton); where either is the torch reference, or x needs a gradient, the call is the two
ops one after the other. BatchedMAML(recompute=True) lowers a network's first block onto it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .batched_batch_norm import batched_batch_norm
from .batched_conv2d import batched_conv2d, batched_conv2d_ref, check_args, fused_prims, output_size
from .bn_relu_pool import (_kernels, _pool_at, append_stats, bn_relu_pool, bn_relu_pool_ref, check_affine,
                           fused_backend, per_task)


class _Block(torch.autograd.Function):
    """y = bn_relu_pool(conv(x, w, b), g, beta) keeping x, w, b and the pooling's outputs, not z."""

    @staticmethod
    def forward(ctx, x, w, b, g, beta, eps, geom, prims, kernels, stats):
        z = prims.conv(x, w, b)
        y, idx, mean, invstd = kernels[0](z, g, beta, eps)
        if stats is not None:
            append_stats(stats, z.shape, mean, invstd, eps)
        del z
        ctx.save_for_backward(x, w, b, g, beta, idx, y, mean, invstd)
        ctx.eps, ctx.geom, ctx.prims, ctx.kernels = eps, geom, prims, kernels
        return y

    @staticmethod
    def backward(ctx, gy):
        x, w, b, g, beta, idx, y, mean, invstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True: the backward as a differentiable op
            gw, gb, gg, gbeta = _BlockBackward.apply(gy, x, w, b, g, beta, idx, y, mean, invstd, ctx.eps, ctx.geom,
                                                     ctx.prims, ctx.kernels)
        else:
            gw, gb, gg, gbeta = _block_backward(gy, x, w, b, g, idx, y, mean, invstd, ctx.prims, ctx.kernels)
        return (None, gw if need[1] else None, gb if need[2] else None, gg if need[3] else None,
                gbeta if need[4] else None, None, None, None, None, None)


def _block_backward(gy, x, w, b, g, idx, y, mean, invstd, prims, kernels):
    """(dw, db, dg, dbeta) of the block for the output gradient gy, z recomputed."""
    z = prims.conv(x, w, b)
    dz, dg, dbeta = kernels[1](gy, z, g, idx, y, mean, invstd)
    return prims.weight_grad(x, dz, w.shape), (None if b is None else dz.sum((1, 3, 4))), dg, dbeta


class _BlockBackward(torch.autograd.Function):
    """The block's backward (gy, w, b, g) -> (dw, db, dg, dbeta) as an op whose derivative is closed
    form: with dz = bn_relu_pool's input gradient at z = conv(x, w, b), dw = wgrad(x, dz) and
    db = sum(dz) are linear in dz, so their cotangents reach dz as conv(x, g_dw) + g_db; the
    double-backward kernel takes that and the cotangents of dg, dbeta to gy, z and g; z's part
    reaches w and b through the convolution's weight gradient (dbeta does not depend on beta, nor
    anything on beta but through the ReLU's mask, whose derivative is zero). A derivative taken with
    a graph (third order) differentiates the reference ops' backward of the block instead, in
    partial derivatives (torch.func.vjp)."""

    @staticmethod
    def forward(ctx, gy, x, w, b, g, beta, idx, y, mean, invstd, eps, geom, prims, kernels):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(gy, x, w, b, g, beta, idx, y, mean, invstd)
        ctx.eps, ctx.geom, ctx.prims, ctx.kernels = eps, geom, prims, kernels
        return _block_backward(gy, x, w, b, g, idx, y, mean, invstd, prims, kernels)

    @staticmethod
    def backward(ctx, g_dw, g_db, g_dg, g_dbeta):
        gy, x, w, b, g, beta, idx, y, mean, invstd = ctx.saved_tensors
        prims, dbwd = ctx.prims, ctx.kernels[2]
        need = ctx.needs_input_grad
        none = (None,) * 9
        cots = (g_dw, g_db, g_dg, g_dbeta)
        if all(c is None for c in cots):
            return (None,) * 5 + none
        if torch.is_grad_enabled():  # third order: the reference's backward, differentiated
            out = _reference_block_vjp(gy, x, w, b, g, beta, idx, ctx.eps, ctx.geom, cots)
            return tuple(o if n else None for o, n in zip(out, need[:5])) + none
        z = prims.conv(x, w, b)
        g_dz = None if g_dw is None else prims.conv(x, g_dw, None)
        if g_db is not None:
            db = g_db[:, None, :, None, None]
            g_dz = torch.empty_like(z).copy_(db.expand(z.shape)) if g_dz is None else g_dz + db
        T, C = mean.shape
        g_gy, g_z, g_g = dbwd(g_dz, mean.new_zeros(T, C) if g_dg is None else g_dg,
                              mean.new_zeros(T, C) if g_dbeta is None else g_dbeta, gy, z, g, idx, y, mean, invstd)
        g_w = prims.weight_grad(x, g_z, w.shape) if need[2] else None
        g_b = g_z.sum((1, 3, 4)) if b is not None and need[3] else None
        return (g_gy if need[0] else None, None, g_w, g_b, g_g if need[4] else None) + none


def _reference_block_vjp(gy, x, w, b, g, beta, idx, eps, geom, cots):
    """(g_gy, None, g_w, g_b, g_g): the partial derivatives in (gy, w, b, g) of <cots, (dw, db, dg,
    dbeta)>, the block's backward written with the reference ops (torch.func.vjp of a function that
    is itself a vjp; torch.autograd.grad would also follow gy's own dependence on w, b and g)."""
    def block_backward(gy_, w_, g_, *b_):
        def fwd(w2, g2, beta2, *b2):
            z = batched_conv2d_ref(x, w2, b2[0] if b2 else None, *geom)
            return _pool_at(F.relu(batched_batch_norm(z, g2, beta2, eps)), idx)
        _, vjp = torch.func.vjp(fwd, w_, g_, beta, *b_)
        dw, dg, dbeta, *db = vjp(gy_)
        return (dw, dg, dbeta, *db)
    primals = (gy, w, g) + ((b,) if b is not None else ())
    _, vjp = torch.func.vjp(block_backward, *primals)
    g_dw, g_db, g_dg, g_dbeta = cots
    zero = torch.zeros_like
    c = (zero(w) if g_dw is None else g_dw, zero(g) if g_dg is None else g_dg,
         zero(beta) if g_dbeta is None else g_dbeta) + ((zero(b) if g_db is None else g_db,) if b is not None else ())
    g_gy, g_w, g_g, *g_b = vjp(c)
    return g_gy, None, g_w, g_b[0] if g_b else None, g_g


def conv_bn_relu_pool_ref(x, weight, bias, stride, padding, dilation, groups, bn_weight, bn_bias, eps=1e-5,
                          batch_stats=None):
    """The reference: batched_conv2d_ref, then bn_relu_pool_ref (batch_stats as there)."""
    return bn_relu_pool_ref(batched_conv2d_ref(x, weight, bias, stride, padding, dilation, groups),
                            bn_weight, bn_bias, eps, batch_stats)


def conv_bn_relu_pool(x, weight, bias, stride, padding, dilation, groups, bn_weight, bn_bias, eps=1e-5, *,
                      batch_stats=None):
    """batched_conv2d then bn_relu_pool, the convolution's output recomputed in the backward passes
    instead of kept (see the module docstring). batch_stats: None, or a list to which the call
    appends (mean, var) [T, O], each task's batch mean and unbiased variance of the convolution's
    output per channel, from the statistics the kernel normalized with (as bn_relu_pool's)."""
    if batch_stats is not None and not isinstance(batch_stats, list):
        raise ValueError(f"conv_bn_relu_pool: batch_stats must be a list, got {type(batch_stats).__name__}")
    T, O = check_args(x, weight, bias, groups, op="conv_bn_relu_pool")
    if not isinstance(padding, str):
        check_affine(x, (T, x.shape[1], O) + output_size(x, weight, stride, padding, dilation), bn_weight, bn_bias,
                     op="conv_bn_relu_pool", what="the convolution's output")
    fused = None if x.requires_grad else fused_prims(x, weight, stride, padding, dilation, groups)
    backend = fused_backend(x)
    if fused is None or backend is None:
        return bn_relu_pool(batched_conv2d(x, weight, bias, stride, padding, dilation, groups), bn_weight, bn_bias,
                            eps, batch_stats=batch_stats)
    prims, w = fused
    b = None if bias is None else (bias if bias.dim() == 2 else bias.unsqueeze(0).expand(T, O))
    return _Block.apply(x, w, b, per_task(x, bn_weight, 1.0, T, O), per_task(x, bn_bias, 0.0, T, O),
                        float(eps), (stride, padding, dilation, groups), prims, _kernels(backend), batch_stats)
