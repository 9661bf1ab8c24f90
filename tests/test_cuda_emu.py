"""The CUDA kernels of csrc/cuda run on the CPU through tests/cuda_emu (threads as fibers between
barriers), against the C++ CPU kernels: the fused MLP inner loop in both workspaces (global memory,
shared memory), both orders, Meta-SGD rates, MSE and cross-entropy, odd widths; the multi-tensor
update against its reference. Every case runs with the threads of each barrier interval in
ascending, descending and shuffled order and must give bit-identical results: a difference is a
data race on the GPU. The GPU itself runs the same sources in tests/test_gpu.py."""
import ctypes
import os
import random
import shutil
import subprocess

import pytest
import torch

import fastmeta
from fastmeta import ops
from conftest import RTOL, assert_rel_close, make_mlp_batch, requires_cpp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMU = os.path.join(ROOT, "tests", "cuda_emu")
CXX = shutil.which("g++") or shutil.which("c++")
ACT = {None: 0, "relu": 1, "leaky_relu": 2, "tanh": 3, "sigmoid": 4, "gelu": 5, "gelu_tanh": 6, "silu": 7}
ORDERS = (0, 1, 2)  # ascending, descending, shuffled thread ids in each barrier interval

pytestmark = [requires_cpp, pytest.mark.skipif(CXX is None, reason="no C++ compiler")]


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    lib = str(tmp_path_factory.mktemp("cuda_emu") / "libfastmeta_cuda_emu.so")
    out = subprocess.run([CXX, "-std=c++17", "-O2", "-shared", "-fPIC", "-Wno-unknown-pragmas", "-o", lib,
                          os.path.join(EMU, "emu_kernels.cpp")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    h = ctypes.CDLL(lib)
    h.fm_emu_error.restype = ctypes.c_char_p
    h.fm_emu_set_order.argtypes = [ctypes.c_int, ctypes.c_uint64]
    return h


def ptr(t):
    return ctypes.c_void_p(t.data_ptr() if t is not None else 0)


def emu_mlp(h, params, batch, lrs, lr, steps, acts, slope, loss, first_order, placement, order, threads=128,
            lr_grad=True, step_weights=None, adapt_out=None):
    """Runs the CUDA kernel in the emulator (with lrs, their gradient too unless lr_grad is False;
    rates [steps, *shape] are per step); returns the placement it ran with and its outputs (the rate
    gradients of per-step rates in the op's order: each rate's [steps, n] in turn)."""
    xs, ys, xq, yq = (t.contiguous() for t in batch)
    dt = xs.dtype
    T, K, Q = xs.shape[0], xs.shape[1], xq.shape[1]
    dims = [params[0].shape[1]] + [params[2 * i].shape[0] for i in range(len(params) // 2)]
    theta0 = torch.cat([p.detach().reshape(-1) for p in params])
    lrflat = torch.cat([r.detach().to(dt).reshape(-1) for r in lrs]) if lrs else None
    per_step = bool(lrs) and lrs[0].dim() == params[0].dim() + 1
    P = theta0.numel()
    sets = steps if per_step else 1
    loss_out = torch.full((T,), float("nan"), dtype=dt)
    dtheta = torch.full((T, P), float("nan"), dtype=dt)
    dlr = torch.full((T, sets * P), float("nan"), dtype=dt) if lrs and lr_grad else None
    weights = list(step_weights or [])
    h.fm_emu_set_order(order, 7)
    fn = h.fm_emu_mlp_f64 if dt == torch.float64 else h.fm_emu_mlp_f32
    L = len(dims) - 1
    rc = fn(ctypes.c_int(L), (ctypes.c_int * (L + 1))(*dims), (ctypes.c_int * L)(*[ACT[a] for a in acts]),
            ctypes.c_int64(T), ctypes.c_int64(K), ctypes.c_int64(Q), ctypes.c_int64(steps), ptr(xs), ptr(ys),
            ptr(xq), ptr(yq), ptr(theta0), ptr(lrflat), ctypes.c_double(lr), ctypes.c_double(slope),
            ctypes.c_int(0 if loss == "mse" else 1), ctypes.c_int(int(first_order)), ctypes.c_int(placement),
            ctypes.c_int(threads), ptr(loss_out), ptr(dtheta), ptr(dlr), ctypes.c_int(int(per_step)),
            ctypes.c_int(len(weights)), (ctypes.c_double * max(1, len(weights)))(*weights), ptr(adapt_out))
    assert rc >= 0, h.fm_emu_error().decode()
    if per_step and dlr is not None:  # the kernel's rows are [steps, P]; the op's each rate's [steps, n]
        by_step = dlr.view(T, steps, P)  # (steps may be 0)
        dlr = torch.cat([part.reshape(T, -1) for part in by_step.split([p.numel() for p in params], dim=2)], 1)
    return rc, (loss_out, dtheta, dlr)


def cpu_op(params, batch, lrs, lr, steps, acts, slope, loss, first_order, lr_grad=True, step_weights=None):
    want_lr = bool(lrs) and lr_grad
    with torch.no_grad():
        out = torch.ops.fastmeta.mlp_inner_loop(*batch, [p.detach() for p in params],
                                                [r.detach() for r in lrs], lr, steps, [ACT[a] for a in acts],
                                                slope, 0 if loss == "mse" else 1, first_order, want_lr,
                                                list(step_weights or []))
    return out[0], out[1], out[2] if want_lr else None


def check(h, widths, T, K, Q, steps, acts, loss, first_order, dtype, placement, metasgd=False, slope=0.01, lr=0.05,
          threads=128, lr_grad=True, per_step=False, step_weights=None):
    """The emulated kernel (placement forced where it fits, -1: its own choice) against the CPU
    kernel, in every thread order; returns the placement it ran with. metasgd: learned rates, one
    set a step with per_step; step_weights: the multi-step loss."""
    params, batch = make_mlp_batch(widths, T, K, Q, loss, dtype, "cpu")
    lead = (steps,) if per_step else ()
    lrs = [lr * (1 + 0.5 * torch.rand(*lead, *p.shape, dtype=p.dtype)) for p in params] if metasgd else []
    want = cpu_op(params, batch, lrs, lr, steps, acts, slope, loss, first_order, lr_grad, step_weights)
    runs = [emu_mlp(h, params, batch, lrs, lr, steps, acts, slope, loss, first_order, placement, o, threads, lr_grad,
                    step_weights)
            for o in ORDERS]
    assert all(r[0] == runs[0][0] for r in runs)
    got = runs[0][1]
    for o, (_, r) in zip(ORDERS[1:], runs[1:]):  # bit-identical in every thread order: no races
        for name, a, b in zip(("loss", "dtheta", "dlr"), got, r):
            if a is not None:
                assert torch.equal(a, b), f"{name} differs between thread orders 0 and {o}: a data race"
    rtol = RTOL[dtype]
    assert_rel_close([got[0]], [want[0]], rtol / 10, "losses")
    assert_rel_close([got[1]], [want[1]], rtol, "meta-grad per task")
    if metasgd and lr_grad:
        assert_rel_close([got[2]], [want[2]], rtol, "lr grad per task")
    return runs[0][0]


def test_emulator_detects_races(emu):
    """The harness itself: a kernel whose threads read a neighbour's write without a barrier gives
    different results in different thread orders; with the barrier, the same in all."""
    outs = {}
    for sync in (0, 1):
        for order in ORDERS:
            o = torch.full((64,), float("nan"))
            emu.fm_emu_set_order(order, 3)
            assert emu.fm_emu_neighbours(ptr(o), 64, sync) == 0, emu.fm_emu_error().decode()
            outs[sync, order] = o
    want = torch.arange(1, 65, dtype=torch.float32) % 64
    assert all(torch.equal(outs[1, o], want) for o in ORDERS)
    assert not all(torch.equal(outs[0, o], want) for o in ORDERS)


def test_emulator_smem_limit(emu):
    """A launch asking for more dynamic shared memory than a block may have fails with a message."""
    o = torch.zeros(16384)
    assert emu.fm_emu_neighbours(ptr(o), 1024, 1) == 0
    emu.fm_emu_set_order(0, 1)
    assert emu.fm_emu_neighbours(ptr(o), 16384, 1) == 1  # also more than 1024 threads
    assert "threads a block" in emu.fm_emu_error().decode() or "shared memory" in emu.fm_emu_error().decode()


PLACEMENTS = {"global": 0, "work-in-smem": 1, "all-in-smem": 2}


@pytest.mark.parametrize("placement", PLACEMENTS.values(), ids=PLACEMENTS.keys())
@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
def test_sine_float32(emu, placement, first_order):
    got = check(emu, (1, 40, 40, 1), 3, 10, 10, 5, ["relu", "relu", None], "mse", first_order, torch.float32,
                placement)
    assert got == placement, "the sine task fits every placement"


@pytest.mark.parametrize("placement", PLACEMENTS.values(), ids=PLACEMENTS.keys())
@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
def test_odd_widths_metasgd_float64(emu, placement, first_order):
    got = check(emu, (1, 40, 37, 1), 3, 10, 10, 3, ["relu", "leaky_relu", None], "mse", first_order, torch.float64,
                placement, metasgd=True, slope=-0.3)
    # second order's history in float64 (parameters and gradients of 3 steps) is over 227 KB: the
    # forced placement 2 falls back to 1
    assert got == (1 if placement == 2 and not first_order else placement)


@pytest.mark.parametrize("acts", [["tanh", "sigmoid", None], ["leaky_relu", None, "sigmoid"]])
@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
@pytest.mark.parametrize("placement", [0, 1])
def test_cross_entropy(emu, acts, first_order, placement):
    check(emu, (3, 37, 11, 5), 2, 7, 9, 2, acts, "cross_entropy", first_order, torch.float64, placement, lr=0.1)


@pytest.mark.parametrize("acts,loss", [(["gelu", "silu", None], "mse"), (["gelu_tanh", "gelu", None], "cross_entropy"),
                                       (["silu", "gelu_tanh"], "mse")])
@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
@pytest.mark.parametrize("placement", [0, 1])
def test_gelu_and_silu(emu, acts, loss, first_order, placement):
    """GELU (both forms) and SiLU, whose derivatives the kernel computes from z, against the C++ kernel:
    float64 and float32, Meta-SGD rates."""
    dims = (3, 19, 7, 4)[:len(acts) + 1]
    check(emu, dims, 3, 6, 5, 2, acts, loss, first_order, torch.float64, placement, lr=0.2, metasgd=True)
    check(emu, dims, 3, 6, 5, 2, acts, loss, first_order, torch.float32, placement, lr=0.2)


@pytest.mark.parametrize("steps", [0, 1])
def test_few_steps_and_one_layer(emu, steps):
    check(emu, (5, 17, 3), 2, 4, 3, steps, ["tanh", None], "mse", False, torch.float64, 1, metasgd=True)
    check(emu, (6, 4), 2, 4, 3, steps + 1, [None], "mse", False, torch.float64, 2, metasgd=True)
    check(emu, (6, 4), 2, 4, 3, steps + 1, ["sigmoid"], "mse", True, torch.float64, 0, metasgd=True)


@pytest.mark.parametrize("threads", [32, 96, 256])
def test_block_sizes(emu, threads):
    """Other block sizes (FASTMETA_CUDA_MLP_THREADS; 32: one warp a task): products with more tiles
    than threads, and the reverse, and widths that leave partial tiles, in one phase."""
    check(emu, (2, 33, 8, 3), 2, 5, 6, 2, ["tanh", "relu", None], "mse", False, torch.float64, 1, metasgd=True,
          threads=threads)


def test_block_limits(emu):
    """Blocks of at most 512 threads in float32, 256 in float64 (the kernels' launch bounds, which
    set their registers): more is refused."""
    for dtype, most in ((torch.float32, 512), (torch.float64, 256)):
        params, batch = make_mlp_batch((1, 8, 1), 1, 3, 3, "mse", dtype, "cpu")
        emu_mlp(emu, params, batch, [], 0.1, 1, ["relu", None], 0.01, "mse", False, 0, 0, threads=most)
        with pytest.raises(AssertionError):
            emu_mlp(emu, params, batch, [], 0.1, 1, ["relu", None], 0.01, "mse", False, 0, 0, threads=most + 32)


@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
def test_occupancy_build(emu, first_order):
    """The kernel built for eight blocks an SM (FASTMETA_CUDA_MLP_OCC=8; 64 registers) runs the same
    code: the same results against the reference at up to 128 threads a block; more are refused."""
    emu.fm_emu_set_mlp_occupancy(8)
    try:
        check(emu, (1, 40, 40, 1), 3, 10, 10, 5, ["relu", "relu", None], "mse", first_order, torch.float32, -1,
              threads=128)
        params, batch = make_mlp_batch((1, 8, 1), 1, 3, 3, "mse", torch.float32, "cpu")
        with pytest.raises(AssertionError):
            emu_mlp(emu, params, batch, [], 0.1, 1, ["relu", None], 0.01, "mse", False, 0, 0, threads=256)
    finally:
        emu.fm_emu_set_mlp_occupancy(0)


STEP_WEIGHTS = [[0.2, 0.0, 0.8], [0.5, 0.3, 0.0], [0.0, 0.0, 0.0]]


@pytest.mark.parametrize("placement", PLACEMENTS.values(), ids=PLACEMENTS.keys())
@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
@pytest.mark.parametrize("rates", ["scalar", "per_entry", "per_step"])
def test_step_weights_and_per_step_rates(emu, rates, first_order, placement):
    """MAML++'s settings: the multi-step loss (the reverse pass adds each weighted query gradient;
    first order then keeps each step's parameters) with a scalar rate, per-entry and per-step rates
    (one rate gradient set a step), against the CPU kernel in every thread order and placement."""
    for weights in STEP_WEIGHTS + ([None] if rates == "per_step" else []):
        check(emu, (2, 9, 7, 3), 2, 5, 6, 3, ["tanh", "relu", None], "mse", first_order, torch.float64, placement,
              metasgd=rates != "scalar", per_step=rates == "per_step", step_weights=weights)


@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
def test_step_weights_cross_entropy_float32(emu, first_order):
    check(emu, (3, 17, 5), 3, 5, 7, 2, ["sigmoid", None], "cross_entropy", first_order, torch.float32, 1,
          metasgd=True, per_step=True, step_weights=[0.4, 0.6], lr=0.1)
    check(emu, (1, 40, 40, 1), 2, 10, 10, 5, ["relu", "relu", None], "mse", first_order, torch.float32, -1,
          metasgd=True, per_step=True, step_weights=[0.1, 0.1, 0.2, 0.2, 0.4], lr_grad=False)


@pytest.mark.parametrize("placement", PLACEMENTS.values(), ids=PLACEMENTS.keys())
@pytest.mark.parametrize("rates", ["scalar", "per_entry", "per_step"])
def test_adapt_alone(emu, rates, placement):
    """MLPArgs::adapt_out (fastmeta::mlp_adapt on CUDA): the inner loop alone, theta_S of each task and
    the support loss at theta_0, against the CPU kernel's mlp_adapt in every thread order."""
    for loss, dtype in (("mse", torch.float64), ("cross_entropy", torch.float32)):
        params, batch = make_mlp_batch((3, 9, 7, 3), 3, 5, 5, loss, dtype, "cpu")
        S = 3
        lead = (S,) if rates == "per_step" else ()
        lrs = [] if rates == "scalar" else [0.05 * (1 + torch.rand(*lead, *p.shape, dtype=dtype)) for p in params]
        with torch.no_grad():
            want = torch.ops.fastmeta.mlp_adapt(batch[0], batch[1], [p.detach() for p in params], lrs, 0.05, S,
                                                [ACT[a] for a in ("tanh", "relu", None)], 0.01,
                                                0 if loss == "mse" else 1)
        outs = []
        for order in ORDERS:
            theta = torch.full((3, want[0].shape[1]), float("nan"), dtype=dtype)
            _, (losses, _, _) = emu_mlp(emu, params, batch, lrs, 0.05, S, ["tanh", "relu", None], 0.01, loss, True,
                                        placement, order, lr_grad=False, adapt_out=theta)
            outs.append((theta, losses))
        for theta, losses in outs[1:]:  # bit-identical in every thread order: no races
            assert torch.equal(theta, outs[0][0]) and torch.equal(losses, outs[0][1])
        assert_rel_close([outs[0][0]], [want[0]], RTOL[dtype], "theta_S")
        assert_rel_close([outs[0][1]], [want[1]], RTOL[dtype], "loss at theta_0")


def test_per_step_rates_for_no_steps(emu):
    check(emu, (2, 9, 3), 2, 5, 6, 0, ["tanh", None], "mse", False, torch.float64, 1, metasgd=True, per_step=True)


def test_too_many_weighted_steps_are_refused(emu):
    params, batch = make_mlp_batch((1, 4, 1), 1, 3, 3, "mse", torch.float64, "cpu")
    emu_mlp(emu, params, batch, [], 0.1, 64, ["relu", None], 0.01, "mse", False, 0, 0, step_weights=[1 / 64] * 64)
    with pytest.raises(AssertionError, match="kMaxWeightedSteps"):
        emu_mlp(emu, params, batch, [], 0.1, 65, ["relu", None], 0.01, "mse", False, 0, 0, step_weights=[1 / 65] * 65)


def test_automatic_placement(emu):
    """Few tasks: everything in shared memory (one wave); many: the working set there, the history in
    global memory; a task too wide for shared memory: global."""
    assert check(emu, (1, 40, 40, 1), 3, 10, 10, 5, ["relu", "relu", None], "mse", False, torch.float32, -1) == 2
    params, batch = make_mlp_batch((1, 40, 40, 1), 1, 10, 10, "mse", torch.float32, "cpu")
    many = [t.expand(1000, *t.shape[1:]) for t in batch]
    assert emu_mlp(emu, params, many, [], 0.01, 5, ["relu", "relu", None], 0.01, "mse", False, -1, 0)[0] == 1
    params, batch = make_mlp_batch((2, 200, 200, 2), 1, 4, 4, "mse", torch.float64, "cpu")
    got = emu_mlp(emu, params, batch, [], 0.1, 2, ["relu", "tanh", None], 0.01, "mse", False, 2, 0)
    assert got[0] == 0
    want = cpu_op(params, batch, [], 0.1, 2, ["relu", "tanh", None], 0.01, "mse", False)
    assert_rel_close([got[1][1]], [want[1]], RTOL[torch.float64], "meta-grad per task")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("per_param", [False, True])
def test_inner_update(emu, dtype, per_param):
    """The multi-tensor update over chunks (a tensor longer than one chunk of 65536), periodic
    operands (a meta-parameter shared by all tasks) and per-parameter rates, against the reference."""
    p = [torch.randn(3, 37, dtype=dtype), torch.randn(5, dtype=dtype).expand(70000, 5)]
    g = [torch.randn(3, 37, dtype=dtype), torch.randn(70000, 5, dtype=dtype)]
    lrs = [torch.rand(3, 37, dtype=dtype), torch.rand(5, dtype=dtype)] if per_param else None
    outs = [torch.full(t.shape, float("nan"), dtype=dtype) for t in g]
    bases = [p[0].contiguous(), p[1][0].contiguous()]
    periods = [p[0].numel(), 5]
    arr = lambda ts: (ctypes.c_void_p * len(ts))(*[t.data_ptr() for t in ts])  # noqa: E731
    fn = emu.fm_emu_update_f64 if dtype == torch.float64 else emu.fm_emu_update_f32
    rc = fn(ctypes.c_int(2), arr(outs), arr(bases), arr(g), arr(lrs) if lrs else None, ctypes.c_double(0.3),
            (ctypes.c_int64 * 2)(*[t.numel() for t in g]), (ctypes.c_int64 * 2)(*periods),
            (ctypes.c_int64 * 2)(*[r.numel() for r in lrs]) if lrs else None)
    assert rc == 0, emu.fm_emu_error().decode()
    want = ops.inner_update_ref(p, g, [r.expand_as(t) for r, t in zip(lrs, g)] if lrs else 0.3)
    for o, w in zip(outs, want):
        torch.testing.assert_close(o, w, rtol=1e-12 if dtype == torch.float64 else 1e-6, atol=1e-6)


@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
def test_placements_agree_bit_for_bit(emu, first_order):
    """Where a task's slots live changes no arithmetic: the three placements give identical bits."""
    params, batch = make_mlp_batch((2, 24, 17, 3), 2, 6, 5, "cross_entropy", torch.float32, "cpu")
    lrs = [torch.full_like(p, 0.05) for p in params]
    runs = {}
    for placement in PLACEMENTS.values():
        got, out = emu_mlp(emu, params, batch, lrs, 0.05, 3, ["tanh", "relu", None], 0.01, "cross_entropy",
                           first_order, placement, 2)
        assert got == placement
        runs[placement] = out
    for placement in (1, 2):
        for a, b in zip(runs[0], runs[placement]):
            assert torch.equal(a, b), f"placement {placement} differs from placement 0"


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
@pytest.mark.parametrize("where", ["support", "query"])
def test_nan_input_gives_that_task_nan(emu, loss, first_order, where):
    """A NaN in one task's inputs: that task's loss and meta-gradient are NaN (relu(NaN) is NaN, as
    in PyTorch; the kernel's ReLU returned 0 for it, and the task's loss came out finite), the other
    tasks' as without it, and all of it as the CPU kernel gives, in every thread order."""
    params, batch = make_mlp_batch((3, 20, 13, 4), 3, 6, 5, loss, torch.float64, "cpu")
    batch = list(batch)
    i = 0 if where == "support" else 2
    batch[i] = batch[i].clone()
    batch[i][1, 0, 1] = float("nan")
    acts = ["relu", "relu", None]
    want = cpu_op(params, batch, [], 0.1, 2, acts, 0.0, loss, first_order)
    assert torch.isnan(want[0][1]) and torch.isnan(want[1][1]).all()
    assert not torch.isnan(want[0][[0, 2]]).any() and not torch.isnan(want[1][[0, 2]]).any()
    runs = [emu_mlp(emu, params, batch, [], 0.1, 2, acts, 0.0, loss, first_order, 1, o)[1] for o in ORDERS]
    for o, run in zip(ORDERS, runs):
        for name, g, w in zip(("losses", "meta-gradients"), run[:2], want[:2]):
            assert torch.equal(g.isnan(), w.isnan()), f"order {o}: {name}' NaNs differ from the CPU kernel's"
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12, equal_nan=True, msg=f"order {o}: {name}")


@pytest.mark.parametrize("slope", [0.0, 0.2])
@pytest.mark.parametrize("placement", [1, 2])
def test_slim_activations_cross_entropy(emu, slope, placement):
    """ReLU / leaky ReLU (slope >= 0) / identity layers keep two activation sections (z in a's
    storage, da in dz's): cross-entropy, Meta-SGD rates, second order, against the CPU kernel."""
    check(emu, (3, 20, 13, 4), 2, 6, 5, 3, ["leaky_relu", "relu", None], "cross_entropy", False, torch.float64,
          placement, metasgd=True, slope=slope, lr=0.1)


@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
@pytest.mark.parametrize("placement", [2, 1, 0])
def test_rates_without_their_gradient(emu, first_order, placement):
    """Per-parameter rates whose gradient is not wanted: the reverse pass makes u = lr (.) v a
    phase (no rate gradient to keep), not the scalar rate's folded form; against the CPU kernel."""
    check(emu, (1, 40, 37, 1), 3, 10, 10, 4, ["relu", "tanh", None], "mse", first_order, torch.float64, placement,
          metasgd=True, lr_grad=False)
    check(emu, (3, 11, 4), 2, 6, 5, 3, ["sigmoid", None], "cross_entropy", first_order, torch.float32, placement,
          metasgd=True, lr_grad=False)


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
@pytest.mark.parametrize("widths", [(90, 8, 3), (100, 8, 3), (130, 8, 3)])
def test_inputs_in_the_working_set_or_not(emu, widths, first_order, loss):
    """A task's inputs and MSE targets are copied into its working set where they are at most 1024
    elements, else read where they are: (K + Q) (d_0 + d_L) = 930, 1030, 1330 here with MSE and
    (K + Q) d_0 = 900, 1000, 1300 with cross-entropy (its labels stay where they are), against the
    CPU kernel in each placement."""
    for placement in (2, 1, 0):
        check(emu, widths, 2, 5, 5, 2, ["tanh", None], loss, first_order, torch.float64, placement, metasgd=True)



@pytest.mark.parametrize("seed", range(24))
def test_random_configurations(emu, seed):
    """Drawn by the seed: depth, widths up to 200 (partial tiles, working sets past shared memory),
    activations, loss, T, K, Q, steps, order, dtype, placement (forced or chosen), block size,
    occupancy build, Meta-SGD with and without its rate gradient; each against the CPU kernel in
    every thread order."""
    rnd = random.Random(seed)
    torch.manual_seed(seed)
    L = rnd.randint(1, 4)
    widths = [rnd.choice([1, 2, 5, 17, 40])] + [rnd.choice([1, 3, 9, 33, 40, 63, 100, 129, 200]) for _ in range(L)]
    loss = rnd.choice(["mse", "cross_entropy"])
    if loss == "cross_entropy" and widths[-1] < 2:
        widths[-1] = 5
    acts = [rnd.choice(list(ACT)) for _ in range(L)]
    T, K, Q, steps = rnd.randint(1, 4), rnd.randint(1, 30), rnd.randint(1, 30), rnd.randint(0, 5)
    threads = rnd.choice([32, 64, 96, 128, 256])
    occupancy = threads <= 128 and rnd.random() < 0.3
    # a rate that keeps the wide nets' inner loops from diverging (float32 would then differ by rounding alone)
    kw = dict(metasgd=rnd.random() < 0.4, lr_grad=rnd.random() < 0.7, slope=rnd.choice([0.01, -0.3, 0.2]),
              threads=threads, lr=min(0.05, 1.0 / max(widths)))
    if occupancy:
        emu.fm_emu_set_mlp_occupancy(8)
    try:
        check(emu, tuple(widths), T, K, Q, steps, acts, loss, seed % 2 == 1, rnd.choice([torch.float64, torch.float32]),
              rnd.choice([-1, 0, 1, 2]), **kw)
    finally:
        if occupancy:
            emu.fm_emu_set_mlp_occupancy(0)

@pytest.mark.parametrize("widths,steps", [((1, 40, 40, 1), 5), ((3, 9, 2), 3), ((2, 5, 3), 1)])
@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("placement", [2, 1, 0])
@pytest.mark.parametrize("metasgd", [False, True], ids=["lr", "metasgd"])
def test_barriers_per_task(emu, widths, steps, first_order, loss, placement, metasgd):
    """The kernel's phase structure (its latency): one barrier after loading the parameters; a
    support step is L forward and L backward phases (MSE's loss in the last forward layer's phase,
    the update in each backward layer's), cross-entropy one more for its softmax (and the query one
    more for its loss); in second order a reverse step is L R-forward and L R-backward phases
    (cross-entropy one more for its R-loss), with per-parameter rates plus one for u = lr (.) v but
    in the first reverse step (the query's backward makes it; a scalar rate needs none), and with
    placement 1 one in every step where the step's history is copied in (with the rates)."""
    emu.fm_emu_barriers.restype = ctypes.c_uint64
    params, batch = make_mlp_batch(widths, 1, 6, 5, loss, torch.float32, "cpu")
    lrs = [torch.full_like(p, 0.01) for p in params] if metasgd else []
    L = len(widths) - 1
    acts = ["relu"] * (L - 1) + [None]
    before = emu.fm_emu_barriers()
    ran, _ = emu_mlp(emu, params, batch, lrs, 0.01, steps, acts, 0.01, loss, first_order, placement, 0)
    assert ran == placement
    ce = int(loss == "cross_entropy")
    step = 2 * L + ce
    want = 1 + steps * step + step + ce
    if not first_order:
        want += steps * step + (steps if placement == 1 else (steps - 1 if metasgd else 0))
    assert emu.fm_emu_barriers() - before == want


def slices_of(slices, N):
    """Blocks a task and channel for N images: one an image, or `slices` (at most N)."""
    return N if slices == "per image" else min(slices, N)


def emu_bn_relu_pool(h, x, w, b, eps, order, gy=None, saved=None, slices=1):
    """The CUDA bn_relu_pool kernels (forward, or backward when gy is given with the forward's
    (y, idx, mean, invstd)) in the emulator with `slices` blocks a task and channel; outputs start
    as NaN, in x's layout (task-major, or task-inner when x is a transposed contiguous [N, T, ...]
    tensor; gy then must be too)."""
    T, N, C, H, W = x.shape
    dt = x.dtype
    inner = not x.is_contiguous()
    assert not inner or x.transpose(0, 1).is_contiguous()
    dims = (ctypes.c_int64 * 7)(T, N, C, H, W, int(inner), slices)
    fn = h.fm_emu_bn_relu_pool_f64 if dt == torch.float64 else h.fm_emu_bn_relu_pool_f32
    h.fm_emu_set_order(order, 11)

    def nan(*s, fill=float("nan"), dtype=dt):
        if len(s) == 5 and inner:
            return torch.full((s[1], s[0], *s[2:]), fill, dtype=dtype).transpose(0, 1)
        return torch.full(s, fill, dtype=dtype)
    if gy is None:
        y, idx = nan(T, N, C, H // 2, W // 2), nan(T, N, C, H // 2, W // 2, fill=255, dtype=torch.uint8)
        mean, invstd = nan(T, C), nan(T, C)
        rc = fn(dims, ptr(x), ptr(w), ptr(b), ctypes.c_double(eps), ptr(y), ptr(idx), ptr(mean), ptr(invstd),
                ptr(None), ptr(None), ptr(None), ptr(None))
        assert rc == 0, h.fm_emu_error().decode()
        return y, idx, mean, invstd
    y, idx, mean, invstd = saved
    dx, dw, db = nan(*x.shape), nan(T, C), nan(T, C)
    rc = fn(dims, ptr(x), ptr(w), ptr(None), ctypes.c_double(eps), ptr(y), ptr(idx), ptr(mean), ptr(invstd),
            ptr(gy), ptr(dx), ptr(dw), ptr(db))
    assert rc == 0, h.fm_emu_error().decode()
    return dx, dw, db


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(2, 3, 4, 6, 6), (1, 2, 3, 7, 5), (3, 5, 2, 2, 3), (2, 13, 3, 9, 9),
                                   (1, 3, 2, 23, 25)])
@pytest.mark.parametrize("layout", ["task-major", "task-inner"])
@pytest.mark.parametrize("slices", [1, 3, "per image"])
def test_bn_relu_pool_kernel(emu, shape, dtype, layout, slices):
    """The CUDA bn_relu_pool forward and backward against the C++ CPU kernel: odd sizes (a row and a
    column outside every window), planes and channels smaller and larger than a block (256 threads:
    a thread steps through the 23 x 25 planes by less than a plane), negative
    weights (windows below zero), x task-major or task-inner (as batched_conv2d returns it; the C++
    kernel's outputs then are too), one block a task and channel or several (each over a range of
    its images, the sums combined from the blocks' partials), every thread order bit for bit; the
    window indices exactly."""
    from fastmeta.ops.bn_relu_pool import _register_cpp
    _register_cpp()
    g = torch.Generator().manual_seed(sum(shape))
    T, N, C, H, W = shape
    x = torch.randn(shape, generator=g, dtype=dtype)
    if layout == "task-inner":
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
    w = torch.randn(T, C, generator=g, dtype=dtype)
    b = torch.randn(T, C, generator=g, dtype=dtype)
    want = torch.ops.fastmeta.bn_relu_pool(x, w, b, 1e-5)
    inner = not x.is_contiguous()  # (T = 1: both layouts are one)
    for out in (want[0], want[1]):  # y and idx in x's layout
        assert (out.transpose(0, 1) if inner else out).is_contiguous()
    gy = torch.empty_like(want[0]).copy_(torch.randn(want[0].shape, generator=g, dtype=dtype))
    want_b = torch.ops.fastmeta.bn_relu_pool_backward(gy, x, w, *want[1:2], want[0], *want[2:])
    runs = []
    for order in ORDERS:
        fwd = emu_bn_relu_pool(emu, x, w, b, 1e-5, order, slices=slices_of(slices, N))
        bwd = emu_bn_relu_pool(emu, x, w, None, 1e-5, order, gy=gy, saved=fwd, slices=slices_of(slices, N))
        runs.append(fwd + bwd)
    for other in runs[1:]:
        for a, c in zip(runs[0], other):
            assert torch.equal(a, c), "thread orders disagree: a data race"
    y, idx, mean, invstd, dx, dw, db = runs[0]
    assert torch.equal(idx, want[1])
    tol = RTOL[dtype] / 10
    assert_rel_close([y, mean, invstd], [want[0], want[2], want[3]], tol, "forward")
    assert_rel_close([dx, dw, db], list(want_b), tol, "backward")


# a null ggx is a pointer test that no element type changes: without it in float32 only
@pytest.mark.parametrize("dtype,with_ggx", [(torch.float64, True), (torch.float32, True), (torch.float32, False)])
@pytest.mark.parametrize("shape", [(2, 3, 4, 6, 6), (1, 2, 3, 7, 5), (3, 5, 2, 2, 3), (2, 13, 3, 9, 9),
                                   (1, 3, 2, 23, 25)])
@pytest.mark.parametrize("layout", ["task-major", "task-inner"])
@pytest.mark.parametrize("slices", [1, 3, "per image"])
def test_bn_relu_pool_double_backward_kernel(emu, shape, dtype, layout, with_ggx, slices):
    """The CUDA double backward of bn_relu_pool against the C++ kernel (itself checked against the
    reference's double backward in tests/test_bn_relu_pool.py): odd sizes, planes smaller and larger
    than a block, both layouts, with and without a dx cotangent (null ggx), one block a task and
    channel or several, every thread order bit for bit."""
    from fastmeta.ops.bn_relu_pool import _register_cpp
    _register_cpp()
    g = torch.Generator().manual_seed(7 + sum(shape))
    T, N, C, H, W = shape
    x = torch.randn(shape, generator=g, dtype=dtype)
    if layout == "task-inner":
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
    inner = not x.is_contiguous()
    w = torch.randn(T, C, generator=g, dtype=dtype)
    b = torch.randn(T, C, generator=g, dtype=dtype)
    y, idx, mean, invstd = torch.ops.fastmeta.bn_relu_pool(x, w, b, 1e-5)

    def like(t):  # a copy in x's layout
        return t.transpose(0, 1).contiguous().transpose(0, 1) if inner else t.contiguous()
    gy = like(torch.randn(y.shape, generator=g, dtype=dtype))
    ggx = like(torch.randn(shape, generator=g, dtype=dtype)) if with_ggx else None
    ggw, ggb = torch.randn(T, C, generator=g, dtype=dtype), torch.randn(T, C, generator=g, dtype=dtype)
    want = torch.ops.fastmeta.bn_relu_pool_double_backward(ggx, ggw, ggb, gy, x, w, idx, y, mean, invstd)
    fn = emu.fm_emu_bn_relu_pool_double_f64 if dtype == torch.float64 else emu.fm_emu_bn_relu_pool_double_f32
    dims = (ctypes.c_int64 * 7)(T, N, C, H, W, int(inner), slices_of(slices, N))
    runs = []
    for order in ORDERS:
        emu.fm_emu_set_order(order, 5)
        outs = [like(torch.full(y.shape, float("nan"), dtype=dtype)),
                like(torch.full(shape, float("nan"), dtype=dtype)), torch.full((T, C), float("nan"), dtype=dtype)]
        rc = fn(dims, ptr(x), ptr(w), ptr(mean), ptr(invstd), ptr(y), ptr(idx), ptr(gy), ptr(ggx), ptr(ggw),
                ptr(ggb), *(ptr(o) for o in outs))
        assert rc == 0, emu.fm_emu_error().decode()
        runs.append(outs)
    for other in runs[1:]:
        for a, c in zip(runs[0], other):
            assert torch.equal(a, c), "thread orders disagree: a data race"
    assert_rel_close(runs[0], list(want), RTOL[dtype] / 10, "double backward")


@pytest.mark.parametrize("outer, row, max_blocks", [(1, 1000, 2), (7, 45, 1), (5, 300, 64)])
def test_tf32_split_stack_kernel(emu, outer, row, max_blocks):
    """The tf32x3 operands' CUDA kernel (csrc/cuda/tf32_split.cu: one read and a write a part an
    element, blocks striding over the elements) bit for bit as the CPU loop makes them, for one or
    two parts in any order, with fewer blocks than elements need (the stride) and rows that split
    blocks."""
    g = torch.Generator().manual_seed(outer * row)
    src = torch.randn(outer, row, generator=g) * torch.logspace(-8, 8, row)
    for which in ([0], [1], [0, 1], [1, 0]):
        dst = torch.full((outer, len(which) * row), float("nan"))
        mask = sum(w << p for p, w in enumerate(which))
        for order in ORDERS:
            emu.fm_emu_set_order(order, 3)
            rc = emu.fm_emu_tf32_split_stack(ptr(src), ptr(dst), ctypes.c_int64(outer), ctypes.c_int64(row),
                                             ctypes.c_int(len(which)), ctypes.c_int(mask), ctypes.c_int(max_blocks))
            assert rc == 0, emu.fm_emu_error().decode()
            assert torch.equal(dst, fastmeta._C._tf32_stack_parts(src, 1, which, False)), (which, order)
