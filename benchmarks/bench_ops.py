"""The inner_update op per backend: all parameter tensors of T tasks of a model in one call
(sine MLP and Omniglot conv4 shapes, step 0 broadcast meta-parameters and per-task tensors)."""
import pytest
import torch

import fastmeta
from fastmeta import harness as H, ops
from fastmeta.backend import why_unavailable
from conftest import DEVICE

BACKENDS = ["torch", "cpp"] if DEVICE == "cpu" else ["torch", "cuda", "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("workload,tasks", [("sine", 25), ("sine", 1000), ("omniglot", 8)])
def test_inner_update(benchmark, backend, workload, tasks):
    why = why_unavailable(backend, DEVICE)
    if why:
        pytest.skip(why)
    model = H.make_workload(workload, tasks=1, device=DEVICE).model
    params = [p.detach().unsqueeze(0).expand(tasks, *p.shape) for p in model.parameters()]
    grads = [torch.randn(tasks, *p.shape, device=DEVICE) for p in model.parameters()]
    benchmark.group = f"inner_update-{workload}-T{tasks}"
    benchmark.extra_info.update(backend=backend, device=DEVICE, elements=sum(g.numel() for g in grads))

    def run():
        with fastmeta.use_backend(backend):
            out = ops.inner_update(params, grads, 0.01)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return out
    out = benchmark.pedantic(run, rounds=20, iterations=1, warmup_rounds=2)
    for o, w in zip(out, ops.inner_update_ref(params, grads, 0.01)):
        torch.testing.assert_close(o, w)
