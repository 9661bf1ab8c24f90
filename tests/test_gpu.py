"""GPU checks (marked gpu; they skip without CUDA and run on the lent GPU through
benchmarks/gpu_check.sh): every path on CUDA against the per-task loop, float32 with TF32 off."""
import pytest
import torch

import fastmeta
from fastmeta import harness as H
from conftest import assert_rel_close, loop_meta_grads

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(autouse=True)
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("backend", ["auto", "torch", "triton", "cuda"])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("tasks", [25, 1000])
def test_sine_on_gpu(backend, first_order, tasks):
    from fastmeta.backend import why_unavailable
    if backend == "cuda" and why_unavailable("cuda", "cuda"):
        pytest.fail(f"the cuda backend did not build: {why_unavailable('cuda', 'cuda')}")
    w = H.make_workload("sine", tasks=tasks, device="cuda")
    with fastmeta.use_backend(backend):
        meta = fastmeta.BatchedMAML(w.model, w.inner_lr, w.steps, first_order=first_order)
        got = torch.autograd.grad(meta(w.xs, w.ys, w.xq, w.yq), list(w.model.parameters()))
    n = min(tasks, 50)  # the oracle loop on a subset keeps the test short: compare on that subset
    with fastmeta.use_backend(backend):
        sub = torch.autograd.grad(meta(w.xs[:n], w.ys[:n], w.xq[:n], w.yq[:n]), list(w.model.parameters()))
    _, want, _ = loop_meta_grads(w.model, w.xs[:n], w.ys[:n], w.xq[:n], w.yq[:n], w.inner_lr, w.steps,
                                 "mse", first_order)
    assert_rel_close(list(sub), want, 1e-4, "meta-grad")
    assert all(torch.isfinite(g).all() for g in got)


@pytest.mark.parametrize("first_order", [False, True])
def test_omniglot_on_gpu(first_order):
    w = H.make_workload("omniglot", tasks=4, device="cuda")
    meta = fastmeta.BatchedMAML(w.model, w.inner_lr, w.steps, first_order=first_order, loss="cross_entropy")
    got = torch.autograd.grad(meta(w.xs, w.ys, w.xq, w.yq), list(w.model.parameters()))
    _, want, _ = loop_meta_grads(w.model, w.xs, w.ys, w.xq, w.yq, w.inner_lr, w.steps, "cross_entropy",
                                 first_order)
    assert_rel_close(list(got), want, 1e-4, "meta-grad")


def test_inner_update_on_gpu():
    from fastmeta import ops
    p = [torch.randn(3, 37, device="cuda"), torch.randn(5, device="cuda").expand(4, 5)]
    g = [torch.randn(3, 37, device="cuda"), torch.randn(4, 5, device="cuda")]
    for backend in ("auto", "torch", "cuda"):
        with fastmeta.use_backend(backend):
            out = ops.inner_update(p, g, 0.3)
        for o, w in zip(out, ops.inner_update_ref(p, g, 0.3)):
            torch.testing.assert_close(o, w, rtol=1e-6, atol=1e-6)  # FMA contraction: not bit-exact
