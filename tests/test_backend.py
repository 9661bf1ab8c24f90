"""Backend selection, the build report and python -m fastmeta.info."""
import os
import subprocess
import sys

import pytest
import torch

import fastmeta
from fastmeta import backend, ops
from conftest import has_cpp


def test_set_backend_validates_and_restores():
    with pytest.raises(ValueError, match="backend"):
        fastmeta.set_backend("gpu")
    with fastmeta.use_backend("torch"):
        assert fastmeta.get_backend() == "torch"
    assert fastmeta.get_backend() == backend._env_backend()


def test_explicit_unavailable_backend_raises_with_reason():
    with fastmeta.use_backend("cpp"):  # implemented by the op, but not for CUDA tensors
        with pytest.raises(fastmeta.BackendUnavailable, match="inner_update: backend 'cpp' unavailable: "
                                                              "the cpp backend runs on CPU tensors"):
            backend.select("inner_update", "cuda")
    if os.environ.get("TRITON_INTERPRET") != "1":
        with fastmeta.use_backend("triton"):  # no triton kernel for this op: its auto choice runs
            ops.batched_linear(torch.ones(1, 2, 3), torch.ones(4, 3))


def test_auto_falls_back_quietly():
    with fastmeta.use_backend("auto"):
        assert backend.select("batched_linear", "cpu") == "torch"
        assert backend.select("inner_update", "cpu") == "torch"  # measured faster than cpp on CPU
        assert backend.select("mlp_inner_loop", "cpu") == ("cpp" if has_cpp() else "torch")
        assert backend.select("inner_update", "cuda") in ("torch", "triton", "cuda")


def test_cpp_built_when_required():
    """`make test` sets FASTMETA_REQUIRE_CPP=1: a failed C++ build must fail the suite, not skip."""
    if os.environ.get("FASTMETA_REQUIRE_CPP") == "1":
        assert has_cpp(), backend.build_status()


def test_info_tells_the_truth():
    out = subprocess.run([sys.executable, "-m", "fastmeta.info"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"torch {torch.__version__}" in out.stdout
    expected = "[cpu] cpp     available" if has_cpp() else "[cpu] cpp     unavailable"
    assert expected in out.stdout
    assert "mlp_inner_loop" in out.stdout
    js = subprocess.run([sys.executable, "-m", "fastmeta.info", "--json"], capture_output=True, text=True, timeout=120)
    import json
    report = json.loads(js.stdout)
    assert report["build"]["cpp"] == has_cpp()


def test_explain_reports_paths():
    from torch import nn
    mlp = nn.Sequential(nn.Linear(1, 4), nn.ReLU(), nn.Linear(4, 1))
    text = fastmeta.explain(mlp)
    assert "batched_linear+relu" in text and "fused mlp_inner_loop" in text
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(2, 3))
    text = fastmeta.explain(conv)
    assert "batched_conv2d" in text and "bn_relu_pool" in text and "step by step" in text
    assert "task_chunk" in text and "task_chunk" not in fastmeta.explain(mlp)
    assert "backend cpp" in text or not has_cpp()
    # a pooling that is not 2x2 / stride 2 keeps the separate steps
    conv[3] = nn.MaxPool2d(3, stride=1)
    text = fastmeta.explain(conv)
    assert "batched_batch_norm" in text and "bn_relu_pool" not in text
