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
