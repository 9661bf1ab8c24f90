"""Triton: the multi-tensor inner-loop update, all parameter tensors of all tasks in one launch.

    out_i[j] = p_i[j % pp_i] - lr_i[j % lp_i] * g_i[j]        (j < n_i, every tensor i)

The host writes a table of tensors (addresses of out, p, g, lr; n, p's period, lr's period) and a
table of chunks (tensor, first element); program c updates chunk c. Periods let a meta-parameter
broadcast over tasks (step 0) and per-parameter rates (Meta-SGD) be read in place. The rate is
always read from memory (a one-element tensor for a plain number), so nothing syncs with the host.
"""
import triton
import triton.language as tl

CHUNK = 16384


@triton.jit
def _inner_update_kernel(table_ptr, chunks_ptr, ref_ptr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    c = tl.program_id(0)
    ti = tl.load(chunks_ptr + 2 * c)
    start = tl.load(chunks_ptr + 2 * c + 1)
    row = table_ptr + ti * 7
    ptr_ty = tl.pointer_type(ref_ptr.dtype.element_ty)
    out = tl.load(row).to(ptr_ty, bitcast=True)
    p = tl.load(row + 1).to(ptr_ty, bitcast=True)
    g = tl.load(row + 2).to(ptr_ty, bitcast=True)
    lr = tl.load(row + 3).to(ptr_ty, bitcast=True)
    n = tl.load(row + 4)
    pp = tl.load(row + 5)
    lp = tl.load(row + 6)
    for off in range(0, CHUNK, BLOCK):
        j = start + off + tl.arange(0, BLOCK)
        m = j < n
        pv = tl.load(p + j % pp, mask=m, other=0.0)
        gv = tl.load(g + j, mask=m, other=0.0)
        lv = tl.load(lr + j % lp, mask=m, other=0.0)
        tl.store(out + j, pv - lv * gv, mask=m)


def _periodic(t, shape, n):
    """(contiguous base, period) with t.expand(shape).flatten()[j] == base.flatten()[j % period]."""
    v = t.expand(shape)
    while v.dim() > 0 and (v.stride(0) == 0 or v.size(0) == 1):
        v = v[0]
    base = v.contiguous()
    return base, max(base.numel(), 1) if v.dim() < len(shape) else n


def inner_update_fwd(params, grads, lr, lrs):
    """Launcher: one launch for all tensors. lr: a number (used when lrs is empty) or lrs: one rate
    tensor per parameter (broadcastable to its gradient)."""
    import torch

    outs, keep, table, chunks = [], [], [], []
    dev, dt = grads[0].device, grads[0].dtype
    scalar = torch.full((1,), float(lr), device=dev, dtype=dt) if not lrs else None
    for i, (p, g) in enumerate(zip(params, grads)):
        g = g.contiguous()
        n = g.numel()
        out = torch.empty_like(g)
        pb, pp = _periodic(p, g.shape, n)
        if lrs:
            lb, lp = _periodic(lrs[i].to(dt), g.shape, n)
        else:
            lb, lp = scalar, 1
        keep += [g, pb, lb]
        table.append([out.data_ptr(), pb.data_ptr(), g.data_ptr(), lb.data_ptr(), n, pp, lp])
        chunks += [[i, s] for s in range(0, n, CHUNK)]
        outs.append(out)
    if chunks:
        tab = torch.tensor(table, dtype=torch.int64).to(dev, non_blocking=True)
        chk = torch.tensor(chunks, dtype=torch.int64).to(dev, non_blocking=True)
        _inner_update_kernel[(len(chunks),)](tab, chk, outs[0], CHUNK=CHUNK, BLOCK=1024)
    del keep  # the inputs stay alive until here; the launch is ordered on the stream
    return outs
