"""The Triton kernels compile for the GPU (sm_90, ptxas included) without a GPU: catches what the
interpreter lets through (types, layouts, shared memory) before a GPU runs them. Runs in a
subprocess, since this test process has TRITON_INTERPRET=1 on a machine without a GPU."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def compile_in_subprocess(script: str, *args: str) -> dict:
    """Runs a compile script without TRITON_INTERPRET; returns its last stdout line as JSON."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])

SCRIPT = r'''
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from fastmeta.kernels import mlp_inner_loop as K
dtype, loss, meta_sgd, first_order = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4] == "1"
per_step, weighted, adapt = sys.argv[5] == "1", sys.argv[6] == "1", sys.argv[7] == "1"
ptrs = ["xs_ptr", "ys_ptr", "xq_ptr", "yq_ptr", "theta0_ptr", "lr_ptr", "hyper_ptr", "w_ptr", "scratch_ptr",
        "loss_ptr", "dtheta_ptr", "dlr_ptr"]
assert set(ptrs) | {"dims_ptr", "K", "Q", "S", "SCRATCH"} == {
    n for n in K._mlp_inner_loop_kernel.arg_names if n.islower() or n in ("K", "Q", "S", "SCRATCH")}, \
    K._mlp_inner_loop_kernel.arg_names
sig = {n: "*" + dtype for n in ptrs}
if loss == 1:
    sig["ys_ptr"] = sig["yq_ptr"] = "*i64"
sig.update(dims_ptr="*i32", K="i32", Q="i32", S="i32", SCRATCH="i32")
DP, BK, L = 64, 16, 3
const = dict(L=L, DP=DP, BK=BK, LOSS=loss, PER_PARAM_LR=meta_sgd, FIRST_ORDER=first_order, NEED_LR_GRAD=meta_sgd,
             PP=L * (DP * DP + DP), BLOCK_P=1024, LR_PER_STEP=per_step, WEIGHTED=weighted, ADAPT=adapt)
assert set(const) | set(sig) == set(K._mlp_inner_loop_kernel.arg_names), K._mlp_inner_loop_kernel.arg_names
sig.update({n: "constexpr" for n in const})
k = triton.compile(triton.compiler.ASTSource(fn=K._mlp_inner_loop_kernel, signature=sig, constexprs=const),
                   target=GPUTarget("cuda", 90, 32))
print(json.dumps({"cubin": len(k.asm.get("cubin", b"")), "shared": k.metadata.shared}))
'''


@pytest.mark.slow
@pytest.mark.parametrize("dtype,loss,meta_sgd,first_order,per_step,weighted,adapt", [
    ("fp32", 0, False, False, False, False, False), ("fp32", 1, True, False, False, False, False),
    ("fp32", 0, True, True, False, False, False), ("fp32", 1, False, True, False, False, False),
    ("fp32", 0, True, False, True, True, False), ("fp32", 1, True, True, True, True, False),
    ("fp32", 0, True, True, True, False, True)])
def test_mlp_inner_loop_compiles_for_sm90(dtype, loss, meta_sgd, first_order, per_step, weighted, adapt):
    """Every kind of rate (scalar, per entry, per step) and loss (MAML's, the multi-step loss) in
    both orders; the inner loop alone (ADAPT, fastmeta::mlp_adapt_triton)."""
    info = compile_in_subprocess(SCRIPT, dtype, str(loss), *("1" if f else "0" for f in
                                                          (meta_sgd, first_order, per_step, weighted, adapt)))
    assert info["cubin"] > 0
    assert info["shared"] <= 227 * 1024, f"needs {info['shared']} bytes of shared memory"


LINEAR = r'''
import json
import triton
from triton.backends.compiler import GPUTarget
from fastmeta.kernels import batched_linear as K
sig = dict(x_ptr="*fp32", w_ptr="*fp32", b_ptr="*fp32", y_ptr="*fp32", slope_ptr="*fp32", N="i32", O="i32",
           sx_t="i64", sx_n="i64", sx_i="i64", sw_t="i64", sw_o="i64", sw_i="i64", sb_t="i64", sb_o="i64")
const = dict(I=40, HAS_BIAS=True, ACT=1, BLOCK_N=16, BLOCK_O=64, BLOCK_I=32)
sig.update({n: "constexpr" for n in const})
k = triton.compile(triton.compiler.ASTSource(fn=K._batched_linear_fwd_kernel, signature=sig, constexprs=const),
                   target=GPUTarget("cuda", 90, 32))
print(json.dumps({"cubin": len(k.asm.get("cubin", b"")), "shared": k.metadata.shared}))
'''


@pytest.mark.slow
def test_batched_linear_compiles_for_sm90():
    assert compile_in_subprocess(LINEAR)["cubin"] > 0


UPDATE = r'''
import json
import triton
from triton.backends.compiler import GPUTarget
from fastmeta.kernels import inner_update as K
sig = dict(table_ptr="*i64", chunks_ptr="*i64", ref_ptr="*fp32", CHUNK="constexpr", BLOCK="constexpr")
k = triton.compile(triton.compiler.ASTSource(fn=K._inner_update_kernel, signature=sig,
                                             constexprs=dict(CHUNK=K.CHUNK, BLOCK=1024)),
                   target=GPUTarget("cuda", 90, 32))
print(json.dumps({"cubin": len(k.asm.get("cubin", b""))}))
'''


@pytest.mark.slow
def test_inner_update_compiles_for_sm90():
    assert compile_in_subprocess(UPDATE)["cubin"] > 0


LOSSES = r'''
import json
import triton
from triton.backends.compiler import GPUTarget
from fastmeta.kernels import task_loss as K
t = GPUTarget("cuda", 90, 32)
a = triton.compile(triton.compiler.ASTSource(
    fn=K._mse_fwd_kernel, signature=dict(pred_ptr="*fp32", target_ptr="*fp32", loss_ptr="*fp32", grad_ptr="*fp32",
                                         M="constexpr", BLOCK="constexpr"), constexprs=dict(M=10, BLOCK=16)), target=t)
b = triton.compile(triton.compiler.ASTSource(
    fn=K._ce_fwd_kernel, signature=dict(z_ptr="*fp32", y_ptr="*i64", loss_ptr="*fp32", grad_ptr="*fp32", C="i32",
                                        N="constexpr", BLOCK_C="constexpr"), constexprs=dict(N=75, BLOCK_C=16)), target=t)
print(json.dumps({"cubin": min(len(a.asm.get("cubin", b"")), len(b.asm.get("cubin", b"")))}))
'''


@pytest.mark.slow
def test_task_losses_compile_for_sm90():
    assert compile_in_subprocess(LOSSES)["cubin"] > 0


CONV = r'''
import json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from fastmeta.kernels import batched_conv2d as K
p = "*" + sys.argv[1]
t = GPUTarget("cuda", 90, 32)
ints = ["N", "C", "H", "W", "O", "HO", "WO", "sx_t", "sx_n", "sx_c", "sx_h", "sx_w"]
geom = dict(KH=3, KW=3, PH=1, PW=1, F64=sys.argv[1] == "fp64", PIPELINE=True)
ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")

def build(fn, sig, cfg, taps, x3=False):
    blocks = {k: v for k, v in cfg.items() if k.startswith("BLOCK")}
    const = dict(geom, TAPS=taps, X3=x3, **blocks)
    sig = dict(sig, **{n: "constexpr" for n in const})
    k = triton.compile(triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=const), target=t,
                       options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(k.asm["ptx"])
    log = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull],
                         capture_output=True, text=True).stderr
    os.unlink(f.name)
    spills = sum(int(v) for v in re.findall(r"(\d+) bytes spill stores", log))
    return len(k.asm.get("cubin", b"")), k.metadata.shared, spills

out = []
for taps, x3 in [(False, False), (True, False)] + ([(False, True), (True, True)] if sys.argv[1] == "fp32" else []):
    out.append(build(K._conv_fwd_kernel, dict(x_ptr=p, w_ptr=p, y_ptr=p,
                                              **{n: "i32" for n in ints + ["sw_t", "sw_o", "sw_c", "sw_h", "sw_w"]}),
                     K.FWD, taps, x3))
    out.append(build(K._conv_wgrad_kernel, dict(x_ptr=p, g_ptr=p, gw_ptr=p, **{n: "i32" for n in ints + [
        "sg_t", "sg_n", "sg_o", "sg_h", "sg_w", "M_PER", "SPLIT"]}), K.WGRAD, taps, x3))
print(json.dumps({"cubin": min(o[0] for o in out), "shared": max(o[1] for o in out), "spills": [o[2] for o in out]}))
'''


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp32", "fp64"])
def test_conv_kernels_compile_for_sm90(dtype):
    """The conv and weight-gradient kernels in their compiled form (for loops, software-pipelined),
    which the interpreter tests do not run, at their launch configurations, in both reduction orders
    (flat, tap-major), for float32 also with the TF32x3 products: no register spills."""
    info = compile_in_subprocess(CONV, dtype)
    assert info["cubin"] > 0
    assert info["shared"] <= 227 * 1024, f"needs {info['shared']} bytes of shared memory"
    assert info["spills"] == [0] * (8 if dtype == "fp32" else 4), \
        f"register spills (bytes stored: conv, wgrad for flat, tap-major[, both with tf32x3]): {info['spills']}"


BN_POOL = r'''
import json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from fastmeta.kernels import bn_relu_pool as K
p = "*" + sys.argv[1]
t = GPUTarget("cuda", 90, 32)
dims = {n: "i32" for n in ["N", "C", "H", "W", "Ho", "Wo", "ST", "SN"]}
const = dict(BLOCK=1024, F64=sys.argv[1] == "fp64")
sig = dict(x_ptr=p, w_ptr=p, b_ptr=p, y_ptr=p, idx_ptr="*u8", mean_ptr=p, invstd_ptr=p, **dims, eps="fp32",
           **{n: "constexpr" for n in const})
a = triton.compile(triton.compiler.ASTSource(fn=K._bn_relu_pool_fwd_kernel, signature=sig, constexprs=const), target=t)
sig = dict(gy_ptr=p, x_ptr=p, w_ptr=p, idx_ptr="*u8", y_ptr=p, mean_ptr=p, invstd_ptr=p, dx_ptr=p, dw_ptr=p,
           db_ptr=p, **dims, **{n: "constexpr" for n in const})
b = triton.compile(triton.compiler.ASTSource(fn=K._bn_relu_pool_bwd_kernel, signature=sig, constexprs=const), target=t)
sig = dict(ggx_ptr=p, ggw_ptr=p, ggb_ptr=p, gy_ptr=p, x_ptr=p, w_ptr=p, idx_ptr="*u8", y_ptr=p, mean_ptr=p,
           invstd_ptr=p, ggy_ptr=p, gx_ptr=p, gw_ptr=p, **dims, HAS_GGX="constexpr",
           **{n: "constexpr" for n in const})
c = triton.compile(triton.compiler.ASTSource(fn=K._bn_relu_pool_dbwd_kernel, signature=sig,
                                             constexprs=dict(const, HAS_GGX=True)), target=t)
ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
spills = []
for k in (a, b, c):
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(k.asm["ptx"])
    log = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull],
                         capture_output=True, text=True).stderr
    os.unlink(f.name)
    spills.append(sum(int(v) for v in re.findall(r"(\d+) bytes spill stores", log)))
print(json.dumps({"cubin": min(len(k.asm.get("cubin", b"")) for k in (a, b, c)), "spills": spills}))
'''


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp32", "fp64"])
def test_bn_relu_pool_kernels_compile_for_sm90(dtype):
    info = compile_in_subprocess(BN_POOL, dtype)
    assert info["cubin"] > 0
    assert info["spills"] == [0, 0, 0], \
        f"register spills (bytes stored: forward, backward, double backward): {info['spills']}"
