"""fastmeta._C built without -march=native (FASTMETA_NATIVE=0, no AVX-512): the fused MLP kernel
then takes its portable register-tile code, which a build on an AVX-512 machine never runs; and
built for AVX2 without AVX-512 (-march=haswell, where this CPU runs it): its AVX2 register tiles and
SIMD activations. Both with tanh / ReLU and GELU's tanh form / SiLU / GELU. The
extension is built into a temporary copy of the package and checked against the torch reference
in a subprocess (second and first order, Meta-SGD's and per-step rates, the multi-step loss,
float32 and float64, the meta-loss op; and
bn_relu_pool, whose pooling windows also have an AVX-512 and a generic form).

The copy is linked by a compiler that links libstdc++ statically, as some toolchains' g++ does, with
Python's -Bsymbolic-functions: setup.py then names the shared libstdc++ so that the extension
uses torch's C++ runtime; with a private copy, formatting a number into a C++ error message cut the
message short here and crashed the process on the GPU machine's toolchain."""
import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest

from conftest import requires_cpp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r'''
import json, os, torch
import fastmeta
from fastmeta import ops
assert fastmeta.__file__.startswith(os.getcwd()), fastmeta.__file__  # the copy built here
assert fastmeta.backend.build_status()["cpp"], fastmeta.backend.build_status()

def rel(a, b):
    return max(float((x - y).norm() / y.norm().clamp_min(1e-30)) for x, y in zip(a, b))

errs = {}
torch.manual_seed(0)
for dtype in (torch.float32, torch.float64):
    for fo in (False, True):
        for rates, weights in (("scalar", None), ("entry", None), ("per_step", None), ("entry", [0.2, 0.3, 0.5]),
                               ("per_step", [0.2, 0.0, 0.8])):
            widths = (2, 37, 11, 3)
            params = []
            for i in range(3):
                params += [(torch.randn(widths[i + 1], widths[i], dtype=dtype) / widths[i] ** 0.5).requires_grad_(),
                           (0.1 * torch.randn(widths[i + 1], dtype=dtype)).requires_grad_()]
            shape = (lambda p: (3,) + p.shape) if rates == "per_step" else (lambda p: p.shape)
            lr = ([torch.empty(shape(p), dtype=dtype).uniform_(0.02, 0.08).requires_grad_() for p in params]
                  if rates != "scalar" else 0.05)
            extra = lr if rates != "scalar" else []
            T = 19
            batch = (torch.randn(T, 7, 2, dtype=dtype), torch.randn(T, 7, 3, dtype=dtype),
                     torch.randn(T, 5, 2, dtype=dtype), torch.randn(T, 5, 3, dtype=dtype))
            for acts in (["tanh", "relu", None], ["gelu_tanh", "silu", "gelu"]):
                out = {}
                for backend in ("cpp", "torch"):
                    with fastmeta.use_backend(backend):
                        losses = ops.mlp_inner_loop(*batch, params, lr, 3, acts, first_order=fo, step_weights=weights)
                        meta = ops.mlp_meta_loss(*batch, params, lr, 3, acts, first_order=fo, step_weights=weights)
                    w = torch.linspace(0.5, 1.5, T, dtype=dtype)
                    g = torch.autograd.grad((losses * w).sum(), params + extra)
                    gm = torch.autograd.grad(meta, params + extra)
                    out[backend] = [losses.detach(), meta.detach().reshape(1)] + list(g) + list(gm)
                errs[f"{dtype} fo={fo} rates={rates} weights={weights} acts={acts}"] = rel(out["cpp"], out["torch"])
    # bn_relu_pool's generic window code (the AVX-512 build runs its intrinsics), integer-valued
    # inputs so that windows hold ties
    x = torch.randint(-3, 4, (2, 5, 3, 9, 7)).to(dtype).requires_grad_()
    wb = [torch.rand(3, dtype=dtype).add(0.5).requires_grad_(), torch.randn(2, 3, dtype=dtype).requires_grad_()]
    out = {}
    for backend in ("cpp", "torch"):
        with fastmeta.use_backend(backend):
            y = ops.bn_relu_pool(x, *wb)
        gy = torch.linspace(-1, 1, y.numel(), dtype=dtype).view(y.shape)
        out[backend] = [y.detach()] + list(torch.autograd.grad(y, [x] + wb, gy))
    errs[f"{dtype} bn_relu_pool"] = rel(out["cpp"], out["torch"])
# a C++ error message with numbers in it, whole (see the module doc)
try:
    torch.ops.fastmeta.bn_relu_pool(torch.randn(2, 3, 4, 4, 4), torch.randn(2, 5), torch.randn(2, 5), 1e-5)
    raise AssertionError("bn_relu_pool took a weight of the wrong shape")
except RuntimeError as e:
    assert "must be [T=2, C=4] of x's dtype, got [2, 5]" in str(e), str(e)
errs["lanes"] = fastmeta._C._mlp_lanes(4)
print(json.dumps(errs))
'''


def _static_libstdcxx_compiler(tmp_path):
    """A CXX that links libstdc++ statically (and as Python's Debian/Ubuntu builds link, with
    -Bsymbolic-functions), or None where the compiler has no static libstdc++."""
    cxx = os.environ.get("CXX", "c++")
    found = subprocess.run(shlex.split(cxx) + ["-print-file-name=libstdc++.a"], capture_output=True,
                           text=True).stdout.strip()
    if not os.path.isabs(found):
        return None
    wrapper = tmp_path / "cxx-static-libstdcxx"
    wrapper.write_text(f'#!/bin/sh\nexec {cxx} "$@" -static-libstdc++ -Wl,-Bsymbolic-functions\n')
    wrapper.chmod(0o755)
    return str(wrapper)


def _has_avx2():
    try:
        flags = open("/proc/cpuinfo").read().split()
    except OSError:
        return False
    return "avx2" in flags and "fma" in flags


# generic: no -march (the portable lane code); avx2: -march=haswell, the AVX2 register tiles and
# SIMD activations that a machine without AVX-512 builds (run here where the CPU has AVX2)
TARGETS = [pytest.param("generic", None, 0, id="generic"),
           pytest.param("avx2", "-march=haswell", 8, id="avx2",
                        marks=pytest.mark.skipif(not _has_avx2(), reason="the CPU has no AVX2 and FMA"))]


@requires_cpp
@pytest.mark.slow
@pytest.mark.parametrize("target,cflags,lanes", TARGETS)
def test_portable_kernel_matches_the_reference(tmp_path, target, cflags, lanes):
    for name in ("setup.py", "pyproject.toml", "csrc", "fastmeta", "kernels"):
        src = os.path.join(ROOT, name)
        ignore = shutil.ignore_patterns("*.so", "__pycache__", "_build_status.json")
        (shutil.copytree(src, tmp_path / name, ignore=ignore) if os.path.isdir(src)
         else shutil.copy(src, tmp_path / name))
    env = dict(os.environ, FASTMETA_NATIVE="0", FASTMETA_BUILD_CUDA="0", PYTHONPATH=str(tmp_path))
    if cflags:
        env["CFLAGS"] = (env.get("CFLAGS", "") + " " + cflags).strip()
    cxx = _static_libstdcxx_compiler(tmp_path)
    if cxx is not None:
        env["CXX"] = cxx
    build = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stderr[-3000:]
    (tmp_path / "fastmeta" / "_build_status.json").write_text(json.dumps({"cpp": True, "cuda": False}))
    run = subprocess.run([sys.executable, "-c", SCRIPT], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    errs = json.loads(run.stdout.strip().splitlines()[-1])
    built_lanes = errs.pop("lanes")
    if lanes:  # (the generic build's lane count is its compiler's choice)
        assert built_lanes == lanes, f"{target} build: {built_lanes} float32 lanes, expected {lanes}"
    for case, err in errs.items():
        limit = 1e-4 if "float32" in case else 1e-9
        assert err < limit, f"portable kernel vs reference, {case}: rel err {err:.2e}"


@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++")
@pytest.mark.parametrize("source", ["mlp_inner_loop.cpp", "bn_relu_pool.cpp"])
def test_avx512_paths_compile(source):
    """The AVX-512 register tiles and pooling windows, which an AVX2 or portable build never
    compiles: the source is checked (parsed and its templates instantiated) for an AVX-512 target."""
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    cmd = (["g++", "-std=c++17", "-fsyntax-only", "-fopenmp", "-march=skylake-avx512", "-DTORCH_EXTENSION_NAME=_C",
            "-I" + os.path.join(ROOT, "csrc"), "-I" + sysconfig.get_paths()["include"]]
           + ["-I" + p for p in include_paths()] + [os.path.join(ROOT, "csrc", source)])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    probe = subprocess.run(["g++", "-march=skylake-avx512", "-dM", "-E", "-x", "c++", "/dev/null"],
                           capture_output=True, text=True, timeout=60)
    assert all(f"__AVX512{x}__" in probe.stdout for x in ("F", "BW", "VL")), "the target defines AVX-512F/BW/VL"
