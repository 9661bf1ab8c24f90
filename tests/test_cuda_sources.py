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
    """ptxas's report for sm_90: the fused MLP kernel (float and double) keeps within the 128
    registers its launch bound of 512 threads allows, with no spills to local memory."""
    import re
    src = os.path.join(ROOT, "csrc", "cuda", "mlp_inner_loop.cu")
    out = subprocess.run([NVCC, "-c", src, "-o", str(tmp_path / "k.o"), "-std=c++17", "-O3",
                          "-gencode=arch=compute_90,code=sm_90", "-Xptxas", "-v"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    regs = [int(r) for r in re.findall(r"Used (\d+) registers", out.stderr)]
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out.stderr)
    assert len(regs) == 2 and len(spills) == 2, out.stderr
    assert max(regs) <= 128, out.stderr
    assert all(s == ("0", "0") for s in spills), out.stderr
