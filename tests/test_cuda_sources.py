"""CUDA sources compile with nvcc (compile only: CI has nvcc but no GPU; they run on the lent GPU
through benchmarks/gpu_check.sh)."""
import concurrent.futures
import functools
import glob
import os
import shutil
import subprocess
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NVCC = shutil.which("nvcc") or next((p for p in glob.glob("/usr/local/cuda*/bin/nvcc") if os.access(p, os.X_OK)), None)
SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))


def test_there_are_cuda_sources():
    assert SOURCES, "csrc/cuda/*.cu missing"


def _compile(src):
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run([NVCC, "-c", src, "-o", os.path.join(tmp, "k.o"), "-std=c++17", "-O3",
                              "-gencode=arch=compute_90,code=sm_90", "-Xcompiler", "-Wall", "-Xptxas", "-v"],
                             capture_output=True, text=True, timeout=600)
    return out.returncode, out.stderr


@functools.lru_cache(maxsize=None)
def _pool():
    return concurrent.futures.ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1))


@functools.lru_cache(maxsize=None)
def _compiles():
    """Every source's compile, started at once on the first call, the largest first (the MLP
    kernel takes over a minute), the C++ files' syntax checks queued behind them: as many at a time
    as there are CPUs."""
    jobs = {src: _pool().submit(_compile, src) for src in sorted(SOURCES, key=os.path.getsize, reverse=True)}
    if shutil.which("g++") is not None:
        _syntax_checks()
    return jobs


def _nvcc(src):
    """(returncode, stderr) of compiling src for sm_90 with host warnings on and ptxas's report (-v);
    each source once per test session."""
    return _compiles()[src].result()


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.parametrize("src", SOURCES, ids=os.path.basename)
def test_cuda_source_compiles(src):
    rc, err = _nvcc(src)
    assert rc == 0, err
    assert "warning" not in err.lower(), err


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
def test_mlp_kernel_registers_without_spills():
    """ptxas's report for sm_90: the fused MLP kernels (float and double) have no spills to local
    memory, float's within the 128 registers its launch bound of 512 threads allows (double's
    bound is 256 threads); the occupancy build (eight 128-thread blocks an SM) within 64
    registers, its spills (a few hundred bytes) left to the GPU probe to weigh."""
    import re
    src = os.path.join(ROOT, "csrc", "cuda", "mlp_inner_loop.cu")
    assert src in SOURCES
    rc, err = _nvcc(src)
    assert rc == 0, err
    kernels = {}
    for part in err.split("Compiling entry function")[1:]:
        name = re.search(r"mlp_inner_loop_kernelI(\w)Li(\d)E", part)
        regs = re.search(r"Used (\d+) registers", part)
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", part)
        assert name and regs and spills, part
        kernels[name.group(1), int(name.group(2))] = int(regs.group(1)), spills.groups()
    assert set(kernels) == {("f", 1), ("d", 1), ("f", 8), ("d", 8)}, err
    for (dtype, blocks), (regs, spills) in kernels.items():
        if blocks == 8:
            assert regs <= 64, f"{dtype} occupancy build: {regs} registers"
            continue
        assert spills == ("0", "0"), f"{dtype}: {spills} bytes spilled"
        assert regs <= (128 if dtype == "f" else 255), f"{dtype}: {regs} registers"


def _cuda_include():
    """The CUDA toolkit's include directory, or None."""
    homes = [os.environ.get("CUDA_HOME", ""), os.path.dirname(os.path.dirname(os.path.realpath(NVCC))),
             "/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"))
    found = [h for h in homes if h and os.path.isfile(os.path.join(h, "include", "cuda_runtime_api.h"))]
    return os.path.join(found[0], "include") if found else None


def _syntax_check(src, cuda_include):
    import sysconfig
    from torch.utils.cpp_extension import include_paths
    with tempfile.TemporaryDirectory() as tmp:
        stub = os.path.join(tmp, "c10", "cuda", "impl")
        os.makedirs(stub)
        with open(os.path.join(stub, "cuda_cmake_macros.h"), "w") as f:
            f.write("#pragma once\n")
        flags = ["-std=c++17", "-fsyntax-only", "-Wall", "-DFASTMETA_WITH_CUDA=1", f"-I{tmp}", f"-I{cuda_include}",
                 f"-I{os.path.join(ROOT, 'csrc')}", f"-I{sysconfig.get_paths()['include']}"]
        flags += [f"-I{p}" for p in include_paths()]
        out = subprocess.run(["g++", *flags, os.path.join(ROOT, "csrc", src)], capture_output=True, text=True,
                             timeout=600)
    return out.returncode, out.stderr


CPP_FILES = ["cuda/bindings_cuda.cpp", "bindings.cpp"]


@functools.lru_cache(maxsize=None)
def _syntax_checks():
    """The syntax checks of CPP_FILES, started on the first call (in the compile pool's threads when
    nvcc is there, so that they overlap the MLP kernel's compile)."""
    inc = _cuda_include()
    if inc is None:
        return None
    return {src: _pool().submit(_syntax_check, src, inc) for src in CPP_FILES}


@pytest.mark.skipif(NVCC is None or shutil.which("g++") is None, reason="nvcc or g++ not found")
@pytest.mark.parametrize("src", CPP_FILES)
def test_cuda_build_cpp_files_compile(src):
    """The C++ files only the CUDA build compiles (the ATen bindings of the CUDA kernels, and the
    CUDA-only parts of bindings.cpp under FASTMETA_WITH_CUDA) pass a syntax check here against
    this torch's headers and the CUDA toolkit's, so that an error in them is found before a GPU
    machine's install. (A CPU torch lacks one generated header of its c10/cuda headers, a list of
    build macros; an empty one stands in.)"""
    checks = _syntax_checks()
    if checks is None:  # (nvcc may be a wrapper script elsewhere than its toolkit)
        pytest.skip("the CUDA toolkit's headers were not found")
    rc, err = checks[src].result()
    assert rc == 0, err[-4000:]
    ours = [line for line in err.splitlines() if "warning" in line and "/csrc/" in line]
    assert not ours, "\n".join(ours)
