"""Triton: the whole MAML inner loop of an MLP, one program per task, with the exact meta-gradient.

Same math and output contract as csrc/mlp_inner_loop.cpp (see fastmeta/ops/mlp_inner_loop.py):
for task t, S steps theta_{s+1} = theta_s - lr (.) grad L_sup(theta_s), the query loss at theta_S,
and a reverse pass v_s = v_{s+1} - H_s (lr (.) v_{s+1}) whose Hessian-vector products are computed in
closed form (Pearlmutter's R-operator, forward-over-reverse on the stored activations of step s).

Layout: every layer is padded to one square tile, W_l [DP, DP] and b_l [DP] (DP a power of two >= 16,
at least the widest layer), and a batch of rows to BK (>= 16). Padding is masked to zero after every
activation, so padded rows and columns never reach a gradient. Each task owns a slice of a global
scratch buffer: in second order the parameters, gradients and activations of every step; in first
order two parameter sets, one step's activations and one gradient (scratch_slots), or every step's
as second order where the query losses after earlier steps count (WEIGHTED).

Rates may be per step (LR_PER_STEP: step s's at s PP), and with step weights (WEIGHTED, MAML++'s
multi-step loss) the task's loss is sum_s w_s L_query(theta_s): the reverse pass adds
w_s grad L_query(theta_s) to v at each step s >= 1 (first order without the Hessian terms).

    x  [BK, DP]  --W_l [DP, DP], b_l-->  z_l = a_{l-1} W_l^T + b_l,   a_l = act_l(z_l)
    backward:   dz_l = act'(z_l) da_l,   gW_l = dz_l^T a_{l-1},   da_{l-1} = dz_l W_l
    R-forward:  Rz_l = Ra_{l-1} W_l^T + a_{l-1} dW_l^T + db_l,   Ra_l = act'(z_l) Rz_l
    R-backward: Rdz_l = act''(z_l) Rz_l da_l + act'(z_l) Rda_l,
                hW_l = Rdz_l^T a_{l-1} + dz_l^T Ra_{l-1},   Rda_{l-1} = Rdz_l W_l + dz_l dW_l

All products are tl.dot with input_precision='ieee' (no TF32), so float32 results match the
reference to rounding.
"""
import triton
import triton.language as tl

from ._consts import device_constant


@triton.jit
def _gelu_tanh_parts(z):
    """t = tanh(u), 1 + t and 1 - t^2 for u = sqrt(2 / pi) (z + 0.044715 z^3) (GELU's tanh form,
    PyTorch's approximate='tanh'), from e = exp(-2|u|): no cancellation where |t| is near 1."""
    u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
    e = tl.exp(-2.0 * tl.abs(u))
    inv = 1.0 / (1.0 + e)
    t = tl.where(u >= 0, (1.0 - e) * inv, (e - 1.0) * inv)
    one_plus_t = tl.where(u >= 0, 2.0, 2.0 * e) * inv
    return t, one_plus_t, 4.0 * e * inv * inv


@triton.jit
def _act_fwd(z, code, slope):
    """act(z) for code 0 none, 1 relu, 2 leaky relu, 3 tanh, 4 sigmoid, 5 gelu, 6 gelu (tanh form),
    7 silu."""
    sig = tl.sigmoid(z)
    th = 2.0 * tl.sigmoid(2.0 * z) - 1.0
    out = tl.where(code == 1, tl.where(z <= 0, 0.0, z), z)  # relu(NaN) = NaN (tl.maximum may drop it)
    out = tl.where(code == 2, tl.where(z > 0, z, slope * z), out)
    out = tl.where(code == 3, th, out)
    out = tl.where(code == 4, sig, out)
    if code >= 5:
        out = tl.where(code == 5, 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476)), z * sig)
        _, one_plus_t, _ = _gelu_tanh_parts(z)
        out = tl.where(code == 6, 0.5 * z * one_plus_t, out)
    return out


@triton.jit
def _act_d1(z, a, code, slope):
    """act'(z), from z and a = act(z)."""
    d = tl.where(code == 1, tl.where(z <= 0, 0.0, 1.0), 1.0)  # 1 at NaN, as PyTorch's ReLU derivative
    d = tl.where(code == 2, tl.where(z > 0, 1.0, slope), d)
    d = tl.where(code == 3, 1.0 - a * a, d)
    d = tl.where(code == 4, a * (1.0 - a), d)
    if code >= 5:
        sig = tl.sigmoid(z)
        d = tl.where(code == 5, 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
                     + z * 0.3989422804014327 * tl.exp(-0.5 * z * z), sig * (1.0 + z * (1.0 - sig)))
        _, one_plus_t, sech2 = _gelu_tanh_parts(z)
        du = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * z * z)
        d = tl.where(code == 6, 0.5 * one_plus_t + 0.5 * z * sech2 * du, d)
    return d


@triton.jit
def _act_d2(z, a, code):
    """act''(z), from z and a = act(z) (zero for the piecewise-linear activations)."""
    d = tl.where(code == 3, -2.0 * a * (1.0 - a * a), 0.0)
    d = tl.where(code == 4, a * (1.0 - a) * (1.0 - 2.0 * a), d)
    if code >= 5:
        sig = tl.sigmoid(z)
        d = tl.where(code == 5, 0.3989422804014327 * tl.exp(-0.5 * z * z) * (2.0 - z * z),
                     sig * (1.0 - sig) * (2.0 + z * (1.0 - 2.0 * sig)))
        t, _, sech2 = _gelu_tanh_parts(z)
        du = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * z * z)
        ddu = 0.7978845608028654 * 6.0 * 0.044715 * z
        d = tl.where(code == 6, sech2 * (du + 0.5 * z * (ddu - 2.0 * t * du * du)), d)
    return d


@triton.jit
def _dot(a, b):
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _forward(th_ptr, x, act_ptr, rows, cols, dims_ptr, n_rows, slope, L: tl.constexpr, DP: tl.constexpr,
             BK: tl.constexpr):
    """Forward through L layers at parameters th_ptr; stores z_l, a_l to act_ptr [4, L, BK, DP]
    (slots: z, a, da, dz). Returns a_L."""
    a = x
    wr = tl.arange(0, DP)
    for l in tl.static_range(L):
        W = tl.load(th_ptr + l * (DP * DP + DP) + wr[:, None] * DP + wr[None, :])
        b = tl.load(th_ptr + l * (DP * DP + DP) + DP * DP + wr)
        z = _dot(a, tl.trans(W)) + b[None, :]
        code = tl.load(dims_ptr + 2 * (L + 1) + l)
        dout = tl.load(dims_ptr + l + 1)
        keep = (rows[:, None] < n_rows) & (cols[None, :] < dout)
        a = tl.where(keep, _act_fwd(z, code, slope), 0.0)
        z = tl.where(keep, z, 0.0)
        tl.store(act_ptr + (0 * L + l) * BK * DP + rows[:, None] * DP + cols[None, :], z)
        tl.store(act_ptr + (1 * L + l) * BK * DP + rows[:, None] * DP + cols[None, :], a)
    return a


@triton.jit
def _loss_grad(aL, y_ptr, rows, cols, n_rows, dout, LOSS: tl.constexpr, DP: tl.constexpr):
    """(per-row-summed loss [BK], dloss/da_L [BK, DP]) for mse (mean over rows*dout) or
    cross-entropy (mean over rows); y_ptr: targets [n_rows, dout] or labels [n_rows]."""
    rmask = rows < n_rows
    keep = rmask[:, None] & (cols[None, :] < dout)
    if LOSS == 0:
        y = tl.load(y_ptr + rows[:, None] * dout + cols[None, :], mask=keep, other=0.0)
        diff = tl.where(keep, aL - y, 0.0)
        scale = 1.0 / (n_rows * dout).to(aL.dtype)
        return tl.sum(diff * diff, axis=1) * scale, 2.0 * diff * scale
    label = tl.load(y_ptr + rows, mask=rmask, other=0)
    logits = tl.where(keep, aL, float("-inf"))
    m = tl.max(logits, axis=1)
    m = tl.where(rmask, m, 0.0)
    e = tl.where(keep, tl.exp(logits - m[:, None]), 0.0)
    ssum = tl.sum(e, axis=1)
    ssum = tl.where(rmask, ssum, 1.0)
    p = e / ssum[:, None]
    onehot = tl.where(cols[None, :] == label[:, None], 1.0, 0.0)
    picked = tl.sum(tl.where(keep, aL * onehot, 0.0), axis=1)
    inv_n = 1.0 / n_rows.to(aL.dtype)
    loss = tl.where(rmask, tl.log(ssum) + m - picked, 0.0) * inv_n
    return loss, tl.where(keep, (p - onehot) * inv_n, 0.0)


@triton.jit
def _backward(th_ptr, x, act_ptr, g_ptr, da, rows, cols, dims_ptr, n_rows, slope, L: tl.constexpr,
              DP: tl.constexpr, BK: tl.constexpr):
    """Backward from da = dloss/da_L: stores da_l, dz_l to act_ptr and the gradient to g_ptr."""
    wr = tl.arange(0, DP)
    for i in tl.static_range(L):
        l = L - 1 - i
        base = act_ptr + rows[:, None] * DP + cols[None, :]
        z = tl.load(base + (0 * L + l) * BK * DP)
        a = tl.load(base + (1 * L + l) * BK * DP)
        code = tl.load(dims_ptr + 2 * (L + 1) + l)
        dz = _act_d1(z, a, code, slope) * da
        tl.store(base + (2 * L + l) * BK * DP, da)
        tl.store(base + (3 * L + l) * BK * DP, dz)
        if l == 0:
            a_prev = x
        else:
            a_prev = tl.load(base + (1 * L + l - 1) * BK * DP)
        gW = _dot(tl.trans(dz), a_prev)
        gb = tl.sum(dz, axis=0)
        tl.store(g_ptr + l * (DP * DP + DP) + wr[:, None] * DP + wr[None, :], gW)
        tl.store(g_ptr + l * (DP * DP + DP) + DP * DP + wr, gb)
        if l > 0:
            W = tl.load(th_ptr + l * (DP * DP + DP) + wr[:, None] * DP + wr[None, :])
            dprev = tl.load(dims_ptr + l)
            keep = (rows[:, None] < n_rows) & (cols[None, :] < dprev)
            da = tl.where(keep, _dot(dz, W), 0.0)


@triton.jit
def _hvp(th_ptr, u_ptr, h_ptr, x, act_ptr, r_ptr, rows, cols, dims_ptr, n_rows, slope, LOSS: tl.constexpr,
         L: tl.constexpr, DP: tl.constexpr, BK: tl.constexpr):
    """h = H u at th (activations of that step in act_ptr); r_ptr: scratch [2, L, BK, DP] (Rz, Ra)."""
    wr = tl.arange(0, DP)
    base = rows[:, None] * DP + cols[None, :]
    ra = tl.zeros((BK, DP), dtype=x.dtype)
    for l in tl.static_range(L):  # R-forward
        lo = l * (DP * DP + DP)
        W = tl.load(th_ptr + lo + wr[:, None] * DP + wr[None, :])
        dW = tl.load(u_ptr + lo + wr[:, None] * DP + wr[None, :])
        db = tl.load(u_ptr + lo + DP * DP + wr)
        if l == 0:
            a_prev = x
        else:
            a_prev = tl.load(act_ptr + (1 * L + l - 1) * BK * DP + base)
        rz = _dot(a_prev, tl.trans(dW)) + db[None, :]
        if l > 0:
            rz += _dot(ra, tl.trans(W))
        z = tl.load(act_ptr + (0 * L + l) * BK * DP + base)
        a = tl.load(act_ptr + (1 * L + l) * BK * DP + base)
        code = tl.load(dims_ptr + 2 * (L + 1) + l)
        dout = tl.load(dims_ptr + l + 1)
        keep = (rows[:, None] < n_rows) & (cols[None, :] < dout)
        rz = tl.where(keep, rz, 0.0)
        ra = tl.where(keep, _act_d1(z, a, code, slope) * rz, 0.0)
        tl.store(r_ptr + (0 * L + l) * BK * DP + base, rz)
        tl.store(r_ptr + (1 * L + l) * BK * DP + base, ra)
    tl.debug_barrier()
    dL = tl.load(dims_ptr + L)
    keepL = (rows[:, None] < n_rows) & (cols[None, :] < dL)
    if LOSS == 0:
        rda = tl.where(keepL, ra * (2.0 / (n_rows * dL).to(ra.dtype)), 0.0)
    else:
        aL = tl.load(act_ptr + (1 * L + L - 1) * BK * DP + base)
        logits = tl.where(keepL, aL, float("-inf"))
        m = tl.where(rows < n_rows, tl.max(logits, axis=1), 0.0)
        e = tl.where(keepL, tl.exp(logits - m[:, None]), 0.0)
        ssum = tl.where(rows < n_rows, tl.sum(e, axis=1), 1.0)
        p = e / ssum[:, None]
        pr = tl.sum(p * ra, axis=1)
        rda = tl.where(keepL, p * (ra - pr[:, None]) * (1.0 / n_rows.to(ra.dtype)), 0.0)
    for i in tl.static_range(L):  # R-backward
        l = L - 1 - i
        lo = l * (DP * DP + DP)
        z = tl.load(act_ptr + (0 * L + l) * BK * DP + base)
        a = tl.load(act_ptr + (1 * L + l) * BK * DP + base)
        da = tl.load(act_ptr + (2 * L + l) * BK * DP + base)
        dz = tl.load(act_ptr + (3 * L + l) * BK * DP + base)
        rz = tl.load(r_ptr + (0 * L + l) * BK * DP + base)
        code = tl.load(dims_ptr + 2 * (L + 1) + l)
        rdz = _act_d2(z, a, code) * rz * da + _act_d1(z, a, code, slope) * rda
        if l == 0:
            a_prev = x
        else:
            a_prev = tl.load(act_ptr + (1 * L + l - 1) * BK * DP + base)
        hW = _dot(tl.trans(rdz), a_prev)
        if l > 0:
            ra_prev = tl.load(r_ptr + (1 * L + l - 1) * BK * DP + base)
            hW += _dot(tl.trans(dz), ra_prev)
        tl.store(h_ptr + lo + wr[:, None] * DP + wr[None, :], hW)
        tl.store(h_ptr + lo + DP * DP + wr, tl.sum(rdz, axis=0))
        if l > 0:
            W = tl.load(th_ptr + lo + wr[:, None] * DP + wr[None, :])
            dW = tl.load(u_ptr + lo + wr[:, None] * DP + wr[None, :])
            dprev = tl.load(dims_ptr + l)
            keep = (rows[:, None] < n_rows) & (cols[None, :] < dprev)
            rda = tl.where(keep, _dot(rdz, W) + _dot(dz, dW), 0.0)


@triton.jit(do_not_specialize=["K", "Q", "S"])  # runtime values: a new K, Q or S needs no new compile
def _mlp_inner_loop_kernel(
    xs_ptr, ys_ptr, xq_ptr, yq_ptr,   # [T, K, I], [T, K, D] or [T, K], [T, Q, I], [T, Q, D] or [T, Q]
    theta0_ptr, lr_ptr, hyper_ptr,    # padded meta-parameters [PP]; padded rates [PP] ([S, PP]); [lr, slope]
    w_ptr,                            # step weights [S] (WEIGHTED: w_s of L_query(theta_s) at s - 1)
    dims_ptr,                         # int32 [2 (L + 1) + L]: widths, (unused), activation codes
    scratch_ptr,                      # [T, SCRATCH] per-task workspace
    loss_ptr, dtheta_ptr, dlr_ptr,    # [T], [T, PP], [T, PP] ([T, S, PP] with LR_PER_STEP)
                                      # (ADAPT: support losses at theta_0 [T], theta_S [T, PP])
    K, Q, S, SCRATCH,                 # rows, inner steps, workspace elements per task
    L: tl.constexpr, DP: tl.constexpr, BK: tl.constexpr, LOSS: tl.constexpr,
    PER_PARAM_LR: tl.constexpr, FIRST_ORDER: tl.constexpr, NEED_LR_GRAD: tl.constexpr,
    PP: tl.constexpr, BLOCK_P: tl.constexpr, LR_PER_STEP: tl.constexpr, WEIGHTED: tl.constexpr,
    ADAPT: tl.constexpr = False,
):
    t = tl.program_id(0).to(tl.int64)
    lr_scalar = tl.load(hyper_ptr)   # in the data's dtype (a float argument would be float32)
    slope = tl.load(hyper_ptr + 1)
    rows = tl.arange(0, BK)
    cols = tl.arange(0, DP)
    din = tl.load(dims_ptr)
    dout = tl.load(dims_ptr + L)
    # slots (scratch_slots): second order keeps every step's parameters, gradients and activations
    # for the reverse pass; first order two parameter sets (ping-pong), one step's activations and
    # one gradient (every step's only for the learned rates' gradient), then the query's
    n_theta, n_grads, n_acts = scratch_slots(S, FIRST_ORDER and not WEIGHTED, NEED_LR_GRAD)
    n_sets = S if LR_PER_STEP else 1   # rate (gradient) sets
    dlr_t = dlr_ptr + t * n_sets * PP
    ws = scratch_ptr + t * SCRATCH
    theta = ws                                  # [n_theta, PP]
    grads = theta + n_theta * PP                # [n_grads, PP]
    acts = grads + n_grads * PP                 # [n_acts, 4, L, BK, DP]  (the last slot: the query)
    rbuf = acts + n_acts * 4 * L * BK * DP      # [2, L, BK, DP]
    vbuf = rbuf + 2 * L * BK * DP               # v, u, h: [3, PP]
    ubuf = vbuf + PP
    hbuf = ubuf + PP
    offs = tl.arange(0, BLOCK_P)
    for p0 in range(0, PP, BLOCK_P):
        m = p0 + offs < PP
        tl.store(theta + p0 + offs, tl.load(theta0_ptr + p0 + offs, mask=m), mask=m)
    xmask = (rows[:, None] < K) & (cols[None, :] < din)
    x = tl.load(xs_ptr + t * K * din + rows[:, None] * din + cols[None, :], mask=xmask, other=0.0)
    if LOSS == 0:
        y_s = ys_ptr + t * K * dout
        y_q = yq_ptr + t * Q * dout
    else:
        y_s = ys_ptr + t * K
        y_q = yq_ptr + t * Q
    s = 0
    while s < S:  # S is a runtime value (the interpreter cannot range() over one)
        th = theta + (s % n_theta) * PP
        nxt = theta + ((s + 1) % n_theta) * PP
        act = acts + (s % (n_acts - 1)) * 4 * L * BK * DP
        gs = grads + (s % n_grads) * PP
        aL = _forward(th, x, act, rows, cols, dims_ptr, K, slope, L, DP, BK)
        tl.debug_barrier()
        ls, da = _loss_grad(aL, y_s, rows, cols, K, dout, LOSS, DP)
        if ADAPT:  # (the inner loop alone: the support loss at theta_0 is one of its results)
            if s == 0:
                tl.store(loss_ptr + t, tl.sum(ls, axis=0))
        _backward(th, x, act, gs, da, rows, cols, dims_ptr, K, slope, L, DP, BK)
        tl.debug_barrier()
        for p0 in range(0, PP, BLOCK_P):
            m = p0 + offs < PP
            g = tl.load(gs + p0 + offs, mask=m, other=0.0)
            if PER_PARAM_LR:
                rate = tl.load(lr_ptr + (s * PP if LR_PER_STEP else 0) + p0 + offs, mask=m, other=0.0)
            else:
                rate = lr_scalar
            tl.store(nxt + p0 + offs, tl.load(th + p0 + offs, mask=m) - rate * g, mask=m)
        tl.debug_barrier()
        s += 1
    thS = theta + (S % n_theta) * PP
    if ADAPT:  # theta_S, and (no steps) the support loss at theta_0 = theta_S
        if S == 0:
            aL = _forward(thS, x, acts, rows, cols, dims_ptr, K, slope, L, DP, BK)
            tl.debug_barrier()
            ls, _ = _loss_grad(aL, y_s, rows, cols, K, dout, LOSS, DP)
            tl.store(loss_ptr + t, tl.sum(ls, axis=0))
        for p0 in range(0, PP, BLOCK_P):
            m = p0 + offs < PP
            tl.store(dtheta_ptr + t * PP + p0 + offs, tl.load(thS + p0 + offs, mask=m, other=0.0), mask=m)
        return
    qact = acts + (n_acts - 1) * 4 * L * BK * DP
    xqmask = (rows[:, None] < Q) & (cols[None, :] < din)
    xq = tl.load(xq_ptr + t * Q * din + rows[:, None] * din + cols[None, :], mask=xqmask, other=0.0)
    wS = 1.0
    if WEIGHTED:
        wS = tl.load(w_ptr + S - 1)
    if wS != 0.0:
        aL = _forward(thS, xq, qact, rows, cols, dims_ptr, Q, slope, L, DP, BK)
        tl.debug_barrier()
        lq, da = _loss_grad(aL, y_q, rows, cols, Q, dout, LOSS, DP)
        if WEIGHTED:
            lq = lq * wS
            da = da * wS
        tl.store(loss_ptr + t, tl.sum(lq, axis=0))
        _backward(thS, xq, qact, vbuf, da, rows, cols, dims_ptr, Q, slope, L, DP, BK)
    else:  # a weight of 0: the query loss at theta_S is not evaluated (v_S = 0)
        tl.store(loss_ptr + t, tl.sum(tl.zeros((BLOCK_P,), dtype=x.dtype), axis=0))
        for p0 in range(0, PP, BLOCK_P):
            m = p0 + offs < PP
            tl.store(vbuf + p0 + offs, tl.zeros((BLOCK_P,), dtype=x.dtype), mask=m)
    tl.debug_barrier()
    if NEED_LR_GRAD:
        k = 0
        while k < n_sets:
            for p0 in range(0, PP, BLOCK_P):
                m = p0 + offs < PP
                tl.store(dlr_t + k * PP + p0 + offs, tl.zeros((BLOCK_P,), dtype=x.dtype), mask=m)
            k += 1
    s = S - 1
    while s >= 0:
        for p0 in range(0, PP, BLOCK_P):
            m = p0 + offs < PP
            v = tl.load(vbuf + p0 + offs, mask=m, other=0.0)
            dlr_s = dlr_t + (s * PP if LR_PER_STEP else 0)
            if NEED_LR_GRAD:
                g = tl.load(grads + (s % n_grads) * PP + p0 + offs, mask=m, other=0.0)
                acc = tl.load(dlr_s + p0 + offs, mask=m, other=0.0)
                tl.store(dlr_s + p0 + offs, acc - g * v, mask=m)
            if PER_PARAM_LR:
                rate = tl.load(lr_ptr + (s * PP if LR_PER_STEP else 0) + p0 + offs, mask=m, other=0.0)
            else:
                rate = lr_scalar
            tl.store(ubuf + p0 + offs, rate * v, mask=m)
        tl.debug_barrier()
        if not FIRST_ORDER:
            _hvp(theta + s * PP, ubuf, hbuf, x, acts + s * 4 * L * BK * DP, rbuf, rows, cols, dims_ptr, K,
                 slope, LOSS, L, DP, BK)
            tl.debug_barrier()
            for p0 in range(0, PP, BLOCK_P):
                m = p0 + offs < PP
                v = tl.load(vbuf + p0 + offs, mask=m, other=0.0)
                h = tl.load(hbuf + p0 + offs, mask=m, other=0.0)
                tl.store(vbuf + p0 + offs, v - h, mask=m)
            tl.debug_barrier()
        if WEIGHTED:  # the multi-step loss: v_s += w_s grad L_query(theta_s), its loss added
            w_step = tl.where(s > 0, tl.load(w_ptr + tl.maximum(s - 1, 0)), 0.0)
            if w_step != 0.0:
                aL = _forward(theta + s * PP, xq, qact, rows, cols, dims_ptr, Q, slope, L, DP, BK)
                tl.debug_barrier()
                lq, da = _loss_grad(aL, y_q, rows, cols, Q, dout, LOSS, DP)
                tl.store(loss_ptr + t, tl.load(loss_ptr + t) + tl.sum(lq * w_step, axis=0))
                _backward(theta + s * PP, xq, qact, hbuf, da * w_step, rows, cols, dims_ptr, Q, slope, L, DP, BK)
                tl.debug_barrier()
                for p0 in range(0, PP, BLOCK_P):
                    m = p0 + offs < PP
                    v = tl.load(vbuf + p0 + offs, mask=m, other=0.0)
                    h = tl.load(hbuf + p0 + offs, mask=m, other=0.0)
                    tl.store(vbuf + p0 + offs, v + h, mask=m)
                tl.debug_barrier()
        s -= 1
    for p0 in range(0, PP, BLOCK_P):
        m = p0 + offs < PP
        tl.store(dtheta_ptr + t * PP + p0 + offs, tl.load(vbuf + p0 + offs, mask=m, other=0.0), mask=m)


@triton.jit
def scratch_slots(S, FIRST_ORDER: tl.constexpr, NEED_LR_GRAD: tl.constexpr):
    """(parameter sets, gradients, activation slots incl. the query's) a task's workspace holds."""
    if FIRST_ORDER:
        return 2, (S if NEED_LR_GRAD else 1), 2
    return S + 1, S, S + 1


def scratch_elems(S, first_order, need_lr_grad, PP, L, BK, DP):
    """Workspace elements a task needs (as scratch_slots lays them out)."""
    if first_order:
        n_theta, n_grads, n_acts = 2, (S if need_lr_grad else 1), 2
    else:
        n_theta, n_grads, n_acts = S + 1, S, S + 1
    return (n_theta + n_grads) * PP + n_acts * 4 * L * BK * DP + 2 * L * BK * DP + 3 * PP


def _warps(dtype):
    """Warps per program: the fewest register spills on sm_90 by ptxas -v (DP=64, three layers):
    float32 968 bytes a thread with 8 warps against 5516 with 4; float64 9644 with 4 against 56776
    with 8."""
    import torch
    return 8 if dtype == torch.float32 else 4


def mlp_adapt_fwd(xs, ys, params, lrs, lr, steps, acts, negative_slope, loss):
    """Host launcher of the inner loop alone, with fastmeta::mlp_adapt's contract: returns
    [theta_S [T, P] (each task's parameters after the steps, flattened in turn), the support losses
    at the meta-parameters [T]]."""
    return mlp_inner_loop_fwd(xs, ys, xs, ys, params, lrs, lr, steps, acts, negative_slope, loss, True, False,
                              adapt=True)


def mlp_inner_loop_fwd(xs, ys, xq, yq, params, lrs, lr, steps, acts, negative_slope, loss, first_order,
                       need_lr_grad, step_weights=None, adapt=False):
    """Host launcher with the C++ op's contract: returns [loss [T], dtheta [T, P], dlr [T or 0, the
    rates' entries]] (rates [steps, *shape] are per step; step_weights: the multi-step loss); with
    adapt (mlp_adapt_fwd) the inner loop alone."""
    import torch

    T, K, I = xs.shape
    Q = xq.shape[1]
    L = len(params) // 2
    widths = [I] + [params[2 * l].shape[0] for l in range(L)]
    DP = max(16, triton.next_power_of_2(max(widths)))
    BK = max(16, triton.next_power_of_2(max(K, Q)))
    LS = DP * DP + DP
    PP = L * LS
    dev, dt = xs.device, xs.dtype

    def pad(flat_list):  # [W_1, b_1, ...] -> padded [PP]
        out = torch.zeros(L, LS, device=dev, dtype=dt)
        for l in range(L):
            W, b = flat_list[2 * l], flat_list[2 * l + 1]
            o, i = W.shape
            out[l, : DP * DP].view(DP, DP)[:o, :i] = W
            out[l, DP * DP: DP * DP + o] = b
        return out.reshape(-1)

    def unpad(buf):  # [n, PP] -> [n, P] in the C++ op's flat order
        n = buf.shape[0]
        buf = buf.view(n, L, LS)
        parts = []
        for l in range(L):
            o, i = params[2 * l].shape
            parts.append(buf[:, l, : DP * DP].reshape(n, DP, DP)[:, :o, :i].reshape(n, o * i))
            parts.append(buf[:, l, DP * DP: DP * DP + o])
        return torch.cat(parts, dim=1)

    per_step = bool(lrs) and lrs[0].dim() == params[0].dim() + 1
    sets = steps if per_step else 1
    weighted = bool(step_weights)
    theta0 = pad([p.detach() for p in params])
    if per_step and steps > 0:  # [S, PP]: step s's rates padded
        lr_buf = torch.stack([pad([l.detach()[s] for l in lrs]) for s in range(steps)]).reshape(-1)
    elif per_step:  # (no steps: no rate is read)
        lr_buf = theta0
    else:
        lr_buf = pad([l.detach() for l in lrs]) if lrs else theta0  # unused unless PER_PARAM_LR
    hyper = device_constant((float(lr), float(negative_slope)), dt, str(dev))
    weights = device_constant(tuple(float(w) for w in step_weights), dt, str(dev)) if weighted else hyper
    dims = device_constant(tuple(int(v) for v in widths + [0] * (L + 1) + list(acts)), torch.int32, str(dev))
    scratch_per_task = scratch_elems(steps, bool(first_order) and not weighted, bool(need_lr_grad), PP, L, BK, DP)
    scratch = torch.empty(T, scratch_per_task, device=dev, dtype=dt)
    loss_out = torch.empty(T, device=dev, dtype=dt)
    dtheta = torch.empty(T, PP, device=dev, dtype=dt)
    dlr = torch.empty(T * sets if need_lr_grad else 1, PP, device=dev, dtype=dt)
    _mlp_inner_loop_kernel[(T,)](
        xs.contiguous(), ys.contiguous(), xq.contiguous(), yq.contiguous(), theta0, lr_buf, hyper, weights, dims,
        scratch, loss_out, dtheta, dlr, K, Q, steps, scratch_per_task,
        L=L, DP=DP, BK=BK, LOSS=loss, PER_PARAM_LR=bool(lrs), FIRST_ORDER=bool(first_order),
        NEED_LR_GRAD=bool(need_lr_grad), PP=PP, BLOCK_P=1024, LR_PER_STEP=per_step, WEIGHTED=weighted,
        ADAPT=bool(adapt), num_warps=_warps(dt))
    if adapt:
        return [unpad(dtheta), loss_out]
    if not need_lr_grad:
        dlr_out = dtheta.new_empty(0, sum(r.numel() for r in lrs) if lrs else sum(p.numel() for p in params))
    elif per_step:  # [T, S, PP] -> each rate's [S, n] in turn (the op's order)
        by_step = unpad(dlr).view(T, steps, sum(p.numel() for p in params))  # (rows t * S + s)
        dlr_out = torch.cat([part.reshape(T, steps * p.numel())
                             for part, p in zip(by_step.split([p.numel() for p in params], dim=2), params)], 1)
    else:
        dlr_out = unpad(dlr)
    return [loss_out, unpad(dtheta), dlr_out]
