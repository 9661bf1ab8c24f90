"""CUDA sources compile with nvcc (compile only: CI has nvcc but no GPU; they run on the lent GPU
through benchmarks/gpu_check.sh)."""
import glob
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NVCC = shutil.which("nvcc") or next((p for p in glob.glob("/usr/local/cuda*/bin/nvcc") if os.access(p, os.X_OK)), None)
SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))


def test_there_are_cuda_sources():
    assert SOURCES, "csrc/cuda/*.cu missing"


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.parametrize("src", SOURCES, ids=os.path.basename)
def test_cuda_source_compiles(src, tmp_path):
    out = subprocess.run([NVCC, "-c", src, "-o", str(tmp_path / "k.o"), "-std=c++17", "-O3",
                          "-gencode=arch=compute_90,code=sm_90", "-Xcompiler", "-Wall"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "warning" not in out.stderr.lower(), out.stderr


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
def test_mlp_kernel_registers_without_spills(tmp_path):
    """ptxas's report for sm_90: the fused MLP kernels (float and double, 2x2 and 4x4 register
    tiles) have no spills to local memory, the 2x2 ones within the 128 registers their launch
    bound of 512 threads allows; the occupancy build (2x2, eight 128-thread blocks an SM) within 64
    registers, its spills (a few hundred bytes) left to the GPU probe to weigh."""
    import re
    src = os.path.join(ROOT, "csrc", "cuda", "mlp_inner_loop.cu")
    out = subprocess.run([NVCC, "-c", src, "-o", str(tmp_path / "k.o"), "-std=c++17", "-O3",
                          "-gencode=arch=compute_90,code=sm_90", "-Xptxas", "-v"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    kernels = {}
    for part in out.stderr.split("Compiling entry function")[1:]:
        name = re.search(r"mlp_inner_loop_kernelI(\w)Li(\d)ELi(\d)E", part)
        regs = re.search(r"Used (\d+) registers", part)
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", part)
        assert name and regs and spills, part
        kernels[name.group(1), int(name.group(2)), int(name.group(3))] = int(regs.group(1)), spills.groups()
    assert set(kernels) == {("f", 2, 1), ("d", 2, 1), ("f", 4, 1), ("d", 4, 1), ("f", 2, 8), ("d", 2, 8)}, out.stderr
    for (dtype, tile, blocks), (regs, spills) in kernels.items():
        if blocks == 8:
            assert regs <= 64, f"{dtype} occupancy build: {regs} registers"
            continue
        assert spills == ("0", "0"), f"{dtype} tile {tile}: {spills} bytes spilled"
        assert regs <= (128 if tile == 2 else 255), f"{dtype} tile {tile}: {regs} registers"
