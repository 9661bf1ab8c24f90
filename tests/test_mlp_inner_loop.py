"""The fused mlp_inner_loop op (cpp) against its reference, forward and meta-gradient."""
import pytest
import torch

import fastmeta
from fastmeta import ops
from conftest import RTOL, assert_rel_close, make_mlp_batch, requires_cpp

pytestmark = requires_cpp


def make(widths, T, K, Q, loss, dtype):
    return make_mlp_batch(widths, T, K, Q, loss, dtype, "cpu")


def both(params, batch, lr, steps, acts, loss, first_order, slope=0.01):
    lr_list = lr if isinstance(lr, list) else []
    out = {}
    for backend in ("torch", "cpp"):
        with fastmeta.use_backend(backend):
            losses = ops.mlp_inner_loop(*batch, params, lr, steps, acts, slope, loss, first_order)
        w = torch.randn(losses.shape[0], dtype=losses.dtype, generator=torch.Generator().manual_seed(0))
        g = torch.autograd.grad((losses * w).sum(), params + lr_list)
        out[backend] = (losses.detach(), list(g))
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("T", [1, 3, 25])
def test_sine_shapes(dtype, first_order, T):
    params, batch = make((1, 40, 37, 1), T, 10, 10, "mse", dtype)
    r = both(params, batch, 0.01, 5, ["relu", "relu", None], "mse", first_order)
    assert_rel_close([r["cpp"][0]], [r["torch"][0]], RTOL[dtype] / 10, "losses")
    assert_rel_close(r["cpp"][1], r["torch"][1], RTOL[dtype], "meta-grad")


@pytest.mark.parametrize("acts", [["tanh", "sigmoid", None], ["leaky_relu", "leaky_relu", "tanh"],
                                  [None, "sigmoid", "relu"], ["gelu", "silu", None], ["gelu_tanh", "relu", "gelu"]])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("first_order", [False, True])
def test_activations_and_losses(acts, loss, first_order):
    params, batch = make((3, 37, 11, 5), 3, 7, 9, loss, torch.float64)
    r = both(params, batch, 0.1, 3, acts, loss, first_order, slope=0.2)
    assert_rel_close([r["cpp"][0]], [r["torch"][0]], 1e-12, "losses")
    assert_rel_close(r["cpp"][1], r["torch"][1], RTOL[torch.float64], "meta-grad")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("first_order", [False, True])
def test_smooth_activations_meta_sgd(dtype, first_order):
    """The smooth activations, with Meta-SGD rates at odd widths and T=25, against the reference:
    GELU (exact and its tanh form) and SiLU, whose derivatives the kernel computes from the kept
    pre-activations, and tanh and sigmoid; in float32 their exp, tanh and erf run on whole
    registers of lanes (csrc/mlp_inner_loop.cpp VMath), in float64 per element."""
    params, batch = make((1, 40, 37, 1), 25, 10, 10, "mse", dtype)
    lrs = [torch.empty_like(p).uniform_(0.005, 0.02).requires_grad_() for p in params]
    for acts in (["gelu", "gelu", None], ["silu", "gelu_tanh", None], ["tanh", "sigmoid", None]):
        r = both(params, batch, lrs, 5, acts, "mse", first_order)
        assert_rel_close([r["cpp"][0]], [r["torch"][0]], RTOL[dtype] / 10, f"losses {acts}")
        assert_rel_close(r["cpp"][1], r["torch"][1], RTOL[dtype], f"meta-grad {acts}")


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("slope", [-0.3, 0.0])
def test_leaky_relu_of_any_slope(slope, first_order):
    """A leaky ReLU of negative slope keeps its pre-activations apart (a > 0 does not mean z > 0
    there; the kernel reads only z's sign); slope 0 is a ReLU. Both against the reference."""
    params, batch = make((3, 37, 11, 2), 5, 7, 6, "mse", torch.float64)
    r = both(params, batch, 0.1, 3, ["leaky_relu", "leaky_relu", None], "mse", first_order, slope=slope)
    assert_rel_close([r["cpp"][0]], [r["torch"][0]], 1e-12, "losses")
    assert_rel_close(r["cpp"][1], r["torch"][1], RTOL[torch.float64], "meta-grad")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("first_order", [False, True])
def test_meta_sgd_rates(dtype, first_order):
    params, batch = make((2, 37, 3), 3, 6, 5, "mse", dtype)
    lrs = [torch.empty_like(p).uniform_(0.01, 0.1).requires_grad_() for p in params]
    r = both(params, batch, lrs, 4, ["tanh", None], "mse", first_order)
    assert_rel_close(r["cpp"][1], r["torch"][1], RTOL[dtype], "meta-grad and lr-grad")


@pytest.mark.parametrize("acts", [["relu", "leaky_relu", None], [None, "relu", "tanh"], ["leaky_relu", "gelu", "relu"]])
@pytest.mark.parametrize("slope", [-0.3, 0.2])
def test_meta_sgd_rates_piecewise_layers(acts, slope):
    """Second order with Meta-SGD rates through stacks where a ReLU / leaky ReLU / linear layer's
    derivative is applied in the Hessian-vector product's product epilogues, next to layers whose
    second-derivative terms keep their own passes (float64, against the reference)."""
    params, batch = make((2, 37, 11, 3), 3, 6, 5, "mse", torch.float64)
    lrs = [torch.empty_like(p).uniform_(0.01, 0.1).requires_grad_() for p in params]
    r = both(params, batch, lrs, 3, acts, "mse", False, slope=slope)
    assert_rel_close([r["cpp"][0]], [r["torch"][0]], 1e-12, "losses")
    assert_rel_close(r["cpp"][1], r["torch"][1], RTOL[torch.float64], "meta-grad and lr-grad")


@pytest.fixture
def panel_bytes():
    """fastmeta._C._mlp_panel_bytes, restored afterwards."""
    from fastmeta import _C
    before = _C._mlp_panel_bytes()
    yield _C._mlp_panel_bytes
    _C._mlp_panel_bytes(before)


def _kernel(params, batch, lr, steps, acts, loss, first_order):
    lr_list = lr if isinstance(lr, list) else []
    with fastmeta.use_backend("cpp"):
        losses = ops.mlp_inner_loop(*batch, params, lr, steps, acts, 0.1, loss, first_order)
    return [losses.detach()] + list(torch.autograd.grad(losses.sum(), params + lr_list))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("case", ["mse", "cross_entropy", "rates"])
def test_column_panel_order(panel_bytes, dtype, first_order, case):
    """The products' column-panel order (wide layers, where a weight outgrows the cache) gives the
    row-block order's results bit for bit (the same blocks, each output summed in the same order),
    and the reference's: forced on every product here at odd sizes (row and column edges)."""
    loss = "cross_entropy" if case == "cross_entropy" else "mse"
    params, batch = make((3, 37, 29, 5), 11, 7, 10, loss, dtype)
    lr = [torch.empty_like(p).uniform_(0.01, 0.1).requires_grad_() for p in params] if case == "rates" else 0.1
    acts = ["leaky_relu", "tanh", None]
    panel_bytes(-1)
    rows = _kernel(params, batch, lr, 3, acts, loss, first_order)
    panel_bytes(0)
    panels = _kernel(params, batch, lr, 3, acts, loss, first_order)
    for a, b in zip(panels, rows):
        assert torch.equal(a, b)
    r = both(params, batch, lr, 3, acts, loss, first_order, slope=0.1)
    assert_rel_close(r["cpp"][1], r["torch"][1], RTOL[dtype], "meta-grad")


def test_column_panel_order_by_size(panel_bytes):
    """Under the default threshold (4 MB) a layer whose weight for one group of tasks exceeds it
    takes the panel order: a 371 x 371 float64 weight (4.4 MB in AVX2's 4 lanes, 8.8 MB in AVX-512's
    8) against the row-block order and the reference."""
    assert panel_bytes() == 4 << 20
    params, batch = make((2, 371, 371, 2), 3, 4, 5, "mse", torch.float64)
    wide = _kernel(params, batch, 0.05, 2, ["tanh", "tanh", None], "mse", False)
    panel_bytes(-1)
    rows = _kernel(params, batch, 0.05, 2, ["tanh", "tanh", None], "mse", False)
    for a, b in zip(wide, rows):
        assert torch.equal(a, b)
    r = both(params, batch, 0.05, 2, ["tanh", "tanh", None], "mse", False)
    assert_rel_close(r["cpp"][1], r["torch"][1], RTOL[torch.float64], "meta-grad")


def test_panel_threshold_from_the_environment():
    """FASTMETA_MLP_PANEL_BYTES sets the threshold at load; a value that is not an integer >= -1
    keeps the default (4 MB) instead of becoming 0 (every product in panel order)."""
    import os
    import subprocess
    import sys
    read = "import fastmeta._C as C; print(C._mlp_panel_bytes())"
    for value, want in [("123456", 123456), ("-1", -1), ("12MB", 4 << 20), ("-7", 4 << 20)]:
        env = dict(os.environ, FASTMETA_MLP_PANEL_BYTES=value)
        out = subprocess.run([sys.executable, "-c", read], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert int(out.stdout) == want, value


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("case", ["mse", "rates"])
def test_one_group_shares_its_products_among_threads(panel_bytes, first_order, case):
    """A meta-batch that fills one group of SIMD lanes runs on the calling thread, and its large
    products (here 40 x 131 x 64 lane FMAs) share their column panels among the threads: bit for bit
    the one-thread result (each output summed in the same order), in both loop orders, and the
    reference's."""
    params, batch = make((3, 64, 131, 2), 3, 40, 41, "mse", torch.float64)
    lr = [torch.empty_like(p).uniform_(0.01, 0.05).requires_grad_() for p in params] if case == "rates" else 0.02
    acts = ["tanh", "relu", None]
    threads = torch.get_num_threads()
    try:
        for order in (-1, 0):
            panel_bytes(order)
            torch.set_num_threads(1)
            one = _kernel(params, batch, lr, 2, acts, "mse", first_order)
            torch.set_num_threads(2)
            two = _kernel(params, batch, lr, 2, acts, "mse", first_order)
            for a, b in zip(two, one):
                assert torch.equal(a, b)
    finally:
        torch.set_num_threads(threads)
    r = both(params, batch, lr, 2, acts, "mse", first_order, slope=0.1)
    assert_rel_close(r["cpp"][1], r["torch"][1], RTOL[torch.float64], "meta-grad")


def test_zero_steps_and_single_layer():
    params, batch = make((4, 3), 2, 5, 5, "cross_entropy", torch.float64)
    for steps in (0, 2):
        r = both(params, batch, 0.5, steps, [None], "cross_entropy", False)
        assert_rel_close(r["cpp"][1], r["torch"][1], 1e-10, "meta-grad")


def test_once_differentiable_is_reported():
    params, batch = make((1, 5, 1), 2, 4, 4, "mse", torch.float64)
    with fastmeta.use_backend("cpp"):
        loss = ops.mlp_inner_loop(*batch, params, 0.1, 2, ["relu", None]).mean()
    g = torch.autograd.grad(loss, params, create_graph=False)
    assert all(t.shape == p.shape for t, p in zip(g, params))
    with fastmeta.use_backend("cpp"):
        loss = ops.mlp_inner_loop(*batch, params, 0.1, 2, ["relu", None]).mean()
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(loss, params, create_graph=True)


def test_bad_labels_raise():
    params, batch = make((2, 4, 3), 2, 4, 4, "cross_entropy", torch.float64)
    xs, ys, xq, yq = batch
    with pytest.raises(ValueError, match="labels outside"):
        ops.mlp_inner_loop(xs, ys + 3, xq, yq, params, 0.1, 1, ["relu", None], loss="cross_entropy")
    with pytest.raises(ValueError, match="T="):
        ops.mlp_inner_loop(xs, ys, xq[:1], yq[:1], params, 0.1, 1, ["relu", None], loss="cross_entropy")


def test_gradcheck_reference_twice_and_fused_once():
    from torch.autograd import gradcheck, gradgradcheck
    params, batch = make((2, 5, 2), 2, 4, 3, "mse", torch.float64)
    lrs = [torch.empty_like(p).uniform_(0.05, 0.2).requires_grad_() for p in params]
    n = len(params)

    def f(*ts):
        return ops.mlp_inner_loop(*batch, list(ts[:n]), list(ts[n:]), 2, ["tanh", None], loss="mse")
    with fastmeta.use_backend("torch"):
        assert gradcheck(f, params + lrs)
        assert gradgradcheck(f, params + lrs)
    with fastmeta.use_backend("cpp"):
        assert gradcheck(f, params + lrs)


@pytest.mark.parametrize("T", [5, 37])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("lr_kind", ["scalar", "learned", "frozen"])
@pytest.mark.parametrize("rows", ["0", "1"])
def test_meta_loss_op_reduces_over_groups_and_scales(T, dtype, lr_kind, rows, monkeypatch):
    """The task mean is reduced inside the CPU kernel over groups of tasks (padding lanes masked
    out), or from the per-task rows of mlp_inner_loop (the CUDA path, forced here with
    FASTMETA_META_GRAD_ROWS=1); backward scales it by the incoming gradient and accumulates."""
    monkeypatch.setenv("FASTMETA_META_GRAD_ROWS", rows)
    params, batch = make((2, 19, 3), T, 5, 4, "mse", dtype)
    if lr_kind == "scalar":
        lr, extra = 0.05, []
    else:
        lr = [torch.empty_like(p).uniform_(0.01, 0.1).requires_grad_(lr_kind == "learned") for p in params]
        extra = lr if lr_kind == "learned" else []
    outs = {}
    for backend in ("cpp", "torch"):
        with fastmeta.use_backend(backend):
            meta = ops.mlp_meta_loss(*batch, params, lr, 3, ["tanh", None])
        for t in params + extra:
            t.grad = torch.ones_like(t)  # backward accumulates onto what is there
        (2.5 * meta).backward()
        outs[backend] = (meta.detach(), [t.grad.clone() for t in params + extra])
        if lr_kind == "frozen":
            assert all(l.grad is None for l in lr)
    assert_rel_close([outs["cpp"][0]], [outs["torch"][0]], RTOL[dtype] / 10, "meta-loss")
    assert_rel_close(outs["cpp"][1], outs["torch"][1], RTOL[dtype], "2.5 * meta-grad + 1")


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_meta_loss_op_matches_mean_of_task_losses(loss):
    params, batch = make((3, 37, 4), 5, 6, 7, loss, torch.float64)
    lrs = [torch.empty_like(p).uniform_(0.01, 0.1).requires_grad_() for p in params]
    with fastmeta.use_backend("cpp"):
        got = ops.mlp_meta_loss(*batch, params, lrs, 3, ["sigmoid", None], loss=loss)
        g_got = torch.autograd.grad(got, params + lrs)
    with fastmeta.use_backend("torch"):
        want = ops.mlp_inner_loop(*batch, params, lrs, 3, ["sigmoid", None], loss=loss).mean()
        g_want = torch.autograd.grad(want, params + lrs)
    assert got.dim() == 0
    assert_rel_close([got.detach()], [want.detach()], 1e-12, "meta-loss")
    assert_rel_close(list(g_got), list(g_want), 1e-10, "meta-grad and lr-grad")
    with fastmeta.use_backend("cpp"):
        again = ops.mlp_meta_loss(*batch, params, lrs, 3, ["sigmoid", None], loss=loss)
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(again, params, create_graph=True)


@pytest.mark.parametrize("rows", ["0", "1"])
@pytest.mark.parametrize("lr_kind", ["scalar", "learned"])
@pytest.mark.parametrize("first_order", [False, True])
def test_meta_grad_op_returns_the_meta_gradient(rows, lr_kind, first_order, monkeypatch):
    """fastmeta::mlp_meta_grad (through ops.mlp_meta_grad): the mean query loss and one gradient
    per parameter (and per rate), equal to autograd's through the reference, without a graph;
    reduced in the kernel or (rows=1) from per-task rows as on CUDA."""
    monkeypatch.setenv("FASTMETA_META_GRAD_ROWS", rows)
    params, batch = make((3, 37, 2), 19, 5, 4, "mse", torch.float64)
    lr = 0.05 if lr_kind == "scalar" else [torch.empty_like(p).uniform_(0.01, 0.1).requires_grad_()
                                           for p in params]
    extra = lr if isinstance(lr, list) else []
    with fastmeta.use_backend("cpp"):
        loss, g, glr = ops.mlp_meta_grad(*batch, params, lr, 3, ["relu", None], first_order=first_order)
    with fastmeta.use_backend("torch"):
        want = ops.mlp_inner_loop(*batch, params, lr, 3, ["relu", None], first_order=first_order).mean()
        g_want = torch.autograd.grad(want, params + extra)
    assert loss.dim() == 0 and not loss.requires_grad and not any(t.requires_grad for t in g)
    assert [t.shape for t in g] == [p.shape for p in params]
    assert_rel_close([loss], [want.detach()], 1e-12, "meta-loss")
    assert_rel_close(list(g) + (list(glr) if extra else []), list(g_want), 1e-10, "meta-grad")
    assert (glr is None) == (lr_kind == "scalar")


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_meta_grad_gives_gradients_of_every_tensor(backend, loss):
    """ops.mlp_meta_grad on both paths (the op, and autograd.grad of mlp_meta_loss elsewhere): the
    gradient of every parameter and rate, also of those that do not require grad, equal between
    the paths and to autograd's through the reference."""
    params, batch = make((3, 37, 4), 6, 5, 7, loss, torch.float64)
    lrs = [torch.empty_like(p).uniform_(0.01, 0.1) for p in params]
    params[1].requires_grad_(False)  # a frozen bias
    ref_in = [t.detach().requires_grad_() for t in params + lrs]
    with fastmeta.use_backend("torch"):
        want_loss = ops.mlp_inner_loop(*batch, ref_in[:len(params)], ref_in[len(params):], 3,
                                       ["sigmoid", None], loss=loss).mean()
    want = torch.autograd.grad(want_loss, ref_in)
    with fastmeta.use_backend(backend):
        got_loss, g, glr = ops.mlp_meta_grad(*batch, params, lrs, 3, ["sigmoid", None], loss=loss)
    assert not got_loss.requires_grad and not any(t.requires_grad for t in list(g) + list(glr))
    assert_rel_close([got_loss], [want_loss.detach()], 1e-12, "meta-loss")
    assert_rel_close(list(g) + list(glr), list(want), 1e-10, "meta-grad and lr-grad")


def test_meta_grad_bad_input_is_named():
    params, batch = make((2, 9, 3), 3, 4, 5, "mse", torch.float64)
    xs, ys, xq, yq = batch
    with pytest.raises(ValueError, match="xq"):
        ops.mlp_meta_grad(xs, ys, xq[:2], yq[:2], params, 0.1, 2, ["tanh", None])
    with pytest.raises((ValueError, TypeError), match="lr"):
        ops.mlp_meta_grad(xs, ys, xq, yq, params, [torch.ones(3)], 2, ["tanh", None])
    c_params, c_batch = make((2, 9, 3), 3, 4, 5, "cross_entropy", torch.float64)
    with pytest.raises(ValueError, match="labels outside"):
        ops.mlp_meta_grad(c_batch[0], c_batch[1] + 3, *c_batch[2:], c_params, 0.1, 2, ["tanh", None],
                          loss="cross_entropy")


@pytest.mark.parametrize("rows", ["0", "1"])
def test_meta_grad_op_fake_kernel(rows, monkeypatch):
    """torch.library.opcheck of fastmeta::mlp_meta_grad: schema, fake kernel against the outputs
    (one tensor per parameter from the CPU kernel's reduction, views of one buffer from rows)."""
    monkeypatch.setenv("FASTMETA_META_GRAD_ROWS", rows)
    params, batch = make((2, 9, 3), 3, 4, 5, "mse", torch.float32)
    lrs = [torch.full_like(p, 0.1) for p in params]
    ops.mlp_meta_grad(*batch, params, 0.1, 2, ["tanh", None])  # registers the fake
    utils = ("test_schema", "test_faketensor")
    for lr_list, need in (([], False), (lrs, True)):
        torch.library.opcheck(torch.ops.fastmeta.mlp_meta_grad.default,
                              (*batch, params, lr_list, 0.1, 2, [3, 0], 0.01, 0, False, need), test_utils=utils)


@requires_cpp
def test_register_blocks_keep_their_accumulators_in_registers():
    """The AVX-512 register blocks of the CPU MLP kernel (gemm_block instantiations) never store a
    zmm register to the stack: a block whose accumulators the compiler could not keep in registers
    spills them on every k and runs 1.5x slower while giving the same numbers."""
    import re
    import shutil
    import subprocess

    import fastmeta._C

    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump (binutils) is not installed")
    asm = subprocess.run([objdump, "-d", "--no-show-raw-insn", "-C", fastmeta._C.__file__], check=True,
                         capture_output=True, text=True).stdout
    blocks, name = {}, None
    for line in asm.splitlines():
        head = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if head:
            name = head.group(1) if "gemm_block<" in head.group(1) else None
            if name:
                blocks[name] = []
        elif name:
            blocks[name].append(line)
    vec = {n: body for n, body in blocks.items() if any("%zmm" in ln and "vfmadd" in ln for ln in body)}
    if not vec:
        pytest.skip("fastmeta._C was built without AVX-512 (its generic register tiles have no zmm blocks)")
    spill = re.compile(r"vmov\w+\s+%zmm\d+,-?0x[0-9a-f]+\(%rsp\)")
    spilled = {n: sum(bool(spill.search(ln)) for ln in body) for n, body in vec.items()}
    assert not any(spilled.values()), {n: c for n, c in spilled.items() if c}


@requires_cpp
@pytest.mark.parametrize("first_order", [False, True])
def test_gradients_for_the_data(first_order):
    """A batch that requires grad gets its gradient (e.g. for an adversarial or learned support
    set): the fused kernels differentiate the parameters only, so BatchedMAML and the ops run the
    differentiable path for it, with the torch backend's answer; the C++ op refuses it rather than
    return none."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    batch = [torch.randn(3, 5, d, dtype=torch.float64) for d in (2, 3, 2, 3)]
    want = None
    for backend in ("torch", "cpp"):
        meta = fastmeta.BatchedMAML(model, 0.1, 2, first_order=first_order)
        data = [t.clone().requires_grad_() for t in batch]
        with fastmeta.use_backend(backend):
            meta(*batch)  # (a call of the same shapes without grad first: its signature is cached)
            for _ in range(2):  # (and the second call of a signature takes the fast path)
                got = torch.autograd.grad(meta(*data), data, allow_unused=True)
        if want is None:
            want = got
            continue
        for w, g in zip(want, got):
            assert (w is None) == (g is None)
            if w is not None:
                assert_rel_close([g], [w], 1e-10, "data gradient")
    assert (want[0] is None) == first_order  # first order keeps no gradient through the support set
    assert want[2] is not None and want[3] is not None
    params = [p.detach() for p in model.parameters()]
    data = [t.clone().requires_grad_() for t in batch]
    for fn in (ops.mlp_inner_loop, ops.mlp_meta_loss):
        got = {}
        for backend in ("torch", "cpp"):
            with fastmeta.use_backend(backend):
                out = fn(*data, params, 0.1, 2, ["tanh", None], first_order=first_order).sum()
                got[backend] = torch.autograd.grad(out, data, allow_unused=True)
        assert [g is None for g in got["cpp"]] == [g is None for g in got["torch"]]
        assert_rel_close([g for g in got["cpp"] if g is not None], [g for g in got["torch"] if g is not None],
                         1e-10, f"{fn.__name__} data gradient")
    with pytest.raises(RuntimeError, match="differentiates the parameters and rates, not the data"):
        torch.ops.fastmeta.mlp_meta_loss(*data, params, [], 0.1, 2, [3, 0], 0.01, 0, first_order)
    with torch.no_grad():
        torch.ops.fastmeta.mlp_meta_loss(*data, params, [], 0.1, 2, [3, 0], 0.01, 0, first_order)


def _per_task(backend, params, batch, lr, steps, acts, loss, first_order, slope):
    """Per-task query losses [T] and meta-gradients [T, P] of one backend."""
    if backend == "cpp":
        codes = {None: 0, "relu": 1, "leaky_relu": 2, "tanh": 3, "sigmoid": 4}
        with torch.no_grad():
            out = torch.ops.fastmeta.mlp_inner_loop(*batch, [p.detach() for p in params], [], lr, steps,
                                                    [codes[a] for a in acts], slope, 0 if loss == "mse" else 1,
                                                    first_order, False)
        return out[0], out[1]
    losses, rows = [], []
    for t in range(batch[0].shape[0]):  # a task at a time (in one batched graph 0 * NaN spreads a NaN)
        with fastmeta.use_backend("torch"):
            one = ops.mlp_inner_loop(*[b[t:t + 1] for b in batch], params, lr, steps, acts, slope, loss,
                                     first_order)[0]
        losses.append(one.detach())
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(one, params)]))
    return torch.stack(losses), torch.stack(rows)


@pytest.mark.parametrize("acts", [["relu", "relu", None], ["leaky_relu", "relu", None], ["tanh", "relu", None]])
@pytest.mark.parametrize("where", ["support", "query"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("first_order", [False, True])
def test_non_finite_inputs_give_that_task_nan(acts, where, value, first_order):
    """A task whose inputs hold a NaN gets a NaN loss and a NaN meta-gradient, as in the loop
    (relu(NaN) is NaN), one with an infinity what the loop gives it (NaN, or finite where a ReLU or
    tanh saturates it), and the other tasks are untouched. The fused kernel's ReLU mapped a NaN
    pre-activation to 0: such a task's loss came out finite, hiding a corrupt task or weights that
    had diverged."""
    params, batch = make((3, 16, 9, 2), 3, 5, 6, "mse", torch.float64)
    batch = list(batch)
    i = 0 if where == "support" else 2
    batch[i] = batch[i].clone()
    batch[i][1, 2, 0] = value
    want = _per_task("torch", params, batch, 0.1, 2, acts, "mse", first_order, 0.01)
    rest = _per_task("torch", params, [t[[0, 2]] for t in batch], 0.1, 2, acts, "mse", first_order, 0.01)
    if value != value:
        assert torch.isnan(want[0][1]) and torch.isnan(want[1][1]).all()
    assert_rel_close([want[0][[0, 2]], want[1][[0, 2]]], list(rest), 1e-12, "the other tasks")
    got = _per_task("cpp", params, batch, 0.1, 2, acts, "mse", first_order, 0.01)
    for name, g, w in zip(("losses", "meta-gradients"), got, want):
        assert torch.equal(g.isnan(), w.isnan()), f"{name}: NaN at {g.isnan().nonzero().tolist()[:8]}, the loop's at " \
                                                  f"{w.isnan().nonzero().tolist()[:8]}"
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12, equal_nan=True, msg=name)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("lr_kind", ["scalar", "learned"])
def test_ops_under_no_grad(first_order, lr_kind):
    """mlp_inner_loop and mlp_meta_loss under torch.no_grad (evaluation) on both backends: the
    values of grad mode, detached. The torch backend raised in second order: under no_grad the
    expanded parameters were views that say requires_grad but have no graph."""
    params, batch = make((3, 20, 13, 2), 3, 6, 5, "mse", torch.float64)
    lr = 0.1 if lr_kind == "scalar" else [torch.full_like(p, 0.1).requires_grad_() for p in params]
    for fn in (ops.mlp_inner_loop, ops.mlp_meta_loss):
        for backend in ("torch", "cpp"):
            with fastmeta.use_backend(backend):
                want = fn(*batch, params, lr, 2, ["relu", "tanh", None], 0.0, "mse", first_order)
                with torch.no_grad():
                    got = fn(*batch, params, lr, 2, ["relu", "tanh", None], 0.0, "mse", first_order)
            assert not got.requires_grad, (fn.__name__, backend)
            torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=0, msg=f"{fn.__name__} on {backend}")


@requires_cpp
@pytest.mark.parametrize("op", ["mlp_inner_loop", "mlp_meta_loss"])
def test_fused_ops_refuse_a_second_derivative(op):
    """The fused ops' backward hands out the kernel's meta-gradient, a value: asked for its
    derivative (create_graph=True) they raise, naming the op and the torch backend's way out,
    instead of a derivative that would be zero."""
    params, batch = make_mlp_batch((2, 9, 3), 3, 4, 5, "mse", torch.float64, "cpu")
    with fastmeta.use_backend("cpp"):
        out = getattr(ops, op)(*batch, params, 0.1, 2, ["tanh", None])
    with pytest.raises(RuntimeError, match=rf"fastmeta::{op} returns the meta-gradient directly and is "
                                           r"differentiable once only; use fastmeta.use_backend\('torch'\)"):
        torch.autograd.grad(out.sum(), params, create_graph=True)


@requires_cpp
def test_kernel_activation_accuracy():
    """The fused CPU kernel's smooth activations (fastmeta._C._activation_values: the kernel's own
    functions; float32 on whole SIMD registers) against autograd of PyTorch's in float64 on [-12, 12]
    and at 0, +-1e-30, +-90, +-200: float32 within twice PyTorch's own float32 error (+1e-7),
    float64 within 1e-13; NaN in, NaN out."""
    from fastmeta import _C
    import torch.nn.functional as F
    z64 = torch.cat([torch.linspace(-12, 12, 48001, dtype=torch.float64),
                     torch.tensor([0.0, -0.0, 1e-30, -1e-30, 90.0, -90.0, 200.0, -200.0], dtype=torch.float64)])
    fns = {3: torch.tanh, 4: torch.sigmoid, 5: F.gelu, 6: lambda t: F.gelu(t, approximate="tanh"), 7: F.silu}

    def derivative(f, z, order):
        z = z.clone().requires_grad_()
        y = f(z)
        for _ in range(order):
            (y,) = torch.autograd.grad(y.sum(), z, create_graph=True)
        return y.detach()
    for code, f in fns.items():
        for order in ((0, 1, 2) if code >= 5 else (0,)):
            want = derivative(f, z64, order)
            torch_err = (derivative(f, z64.float(), order).double() - want).abs().max().item()
            got32 = _C._activation_values(z64.float(), code, order)
            got64 = _C._activation_values(z64, code, order)
            assert got32.dtype == torch.float32 and got64.dtype == torch.float64
            err32 = (got32.double() - want).abs().max().item()
            err64 = (got64 - want).abs().max().item()
            assert err32 <= 2 * torch_err + 1e-7, (code, order, err32, torch_err)
            assert err64 <= 1e-13, (code, order, err64)
            nan = torch.tensor([float("nan")] * 20)
            assert torch.isnan(_C._activation_values(nan, code, order)).all(), (code, order)
    with pytest.raises(RuntimeError, match="orders 1 and 2 of codes 5..7"):
        _C._activation_values(z64, 3, 1)
