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


LINEAR_BACKENDS = ["torch"] + (["triton"] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
@pytest.mark.parametrize("tasks", [25, 1000])
def test_batched_linear_relu(benchmark, backend, tasks):
    """The sine MLP's hidden layer (40 -> 40, K=10 rows) for T tasks, forward and backward."""
    x = torch.randn(tasks, 10, 40, device=DEVICE, requires_grad=True)
    W = torch.randn(tasks, 40, 40, device=DEVICE, requires_grad=True)
    b = torch.randn(tasks, 40, device=DEVICE, requires_grad=True)
    benchmark.group = f"batched_linear-T{tasks}"
    benchmark.extra_info.update(backend=backend, device=DEVICE)

    def run():
        with fastmeta.use_backend(backend):
            y = ops.batched_linear(x, W, b, "relu")
        g = torch.autograd.grad(y.sum(), (x, W, b))
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return g
    benchmark.pedantic(run, rounds=20, iterations=1, warmup_rounds=2)


@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
@pytest.mark.parametrize("shape", ["omniglot-l2", "miniimagenet-l1"])
def test_batched_conv2d_second_order(benchmark, backend, shape):
    """One per-task 3x3 conv (padding 1) of a second-order inner step: forward, the gradients with
    create_graph, and the second derivative (what MAML's meta-gradient runs through it).
    omniglot-l2: T=32 tasks x 80 images, 64 -> 64 channels, 14x14; miniimagenet-l1: T=32 x 100
    images, 3 -> 32 channels, 84x84 (T=2 on CPU)."""
    T = 32 if DEVICE == "cuda" else 2
    N, C, O, H = {"omniglot-l2": (80, 64, 64, 14), "miniimagenet-l1": (100, 3, 32, 84)}[shape]
    x = torch.randn(T, N, C, H, H, device=DEVICE, requires_grad=True)
    w = (0.1 * torch.randn(T, O, C, 3, 3, device=DEVICE)).requires_grad_()
    r = torch.randn(T, N, O, H, H, device=DEVICE)
    benchmark.group = f"batched_conv2d-{shape}"
    benchmark.extra_info.update(backend=backend, device=DEVICE, tasks=T)

    def run():
        with fastmeta.use_backend(backend):
            y = ops.batched_conv2d(x, w, None, 1, 1)
            gx, gw = torch.autograd.grad((y * r).sum(), (x, w), create_graph=True)
            h = torch.autograd.grad((gx * gx).sum() + (gw * gw).sum(), (x, w))
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return h
    out = run()
    if backend != "torch":  # the row is timed only if it agrees with the torch backend
        with fastmeta.use_backend("torch"):
            y = ops.batched_conv2d(x, w, None, 1, 1)
            gx, gw = torch.autograd.grad((y * r).sum(), (x, w), create_graph=True)
            want = torch.autograd.grad((gx * gx).sum() + (gw * gw).sum(), (x, w))
        err = H.max_rel_err(list(out), list(want))
        benchmark.extra_info["max_rel_err_vs_torch"] = err
        assert err < 1e-4, f"{backend} conv second derivative disagrees with torch: {err:.2e}"
    benchmark.pedantic(run, rounds=10, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
@pytest.mark.parametrize("kind", ["mse", "cross_entropy"])
def test_task_loss(benchmark, backend, kind):
    """Per-task loss and its gradient for T=1000 tasks (sine shape / 5-way 15-query shape)."""
    if kind == "mse":
        pred, target, fn = torch.randn(1000, 10, 1, device=DEVICE, requires_grad=True), torch.randn(1000, 10, 1, device=DEVICE), ops.mse
    else:
        pred = torch.randn(1000, 75, 5, device=DEVICE, requires_grad=True)
        target, fn = torch.randint(0, 5, (1000, 75), device=DEVICE), ops.cross_entropy
    benchmark.group = f"task_loss-{kind}"
    benchmark.extra_info.update(backend=backend, device=DEVICE)

    def run():
        with fastmeta.use_backend(backend):
            g = torch.autograd.grad(fn(pred, target).sum(), pred)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return g
    benchmark.pedantic(run, rounds=20, iterations=1, warmup_rounds=2)


BRP_BACKENDS = ["torch"] + (["cpp"] if DEVICE == "cpu" else ["cuda", "triton"])


@pytest.mark.parametrize("backend", BRP_BACKENDS)
@pytest.mark.parametrize("size", [28, 14, 7, 3])
def test_bn_relu_pool(benchmark, backend, size):
    """BatchNorm -> ReLU -> MaxPool2d(2) of one Omniglot query pass (75 images, 64 channels; one
    task at a time as on CPU, all 32 tasks of the meta-batch at once on a GPU), forward and backward."""
    why = why_unavailable(backend, DEVICE)
    if why:
        pytest.skip(why)
    T = 32 if DEVICE == "cuda" else 1
    x = torch.randn(T, 75, 64, size, size, device=DEVICE, requires_grad=True)
    w = torch.rand(64, device=DEVICE).add(0.5).requires_grad_()
    b = torch.randn(64, device=DEVICE, requires_grad=True)
    benchmark.group = f"bn_relu_pool-{size}x{size}"
    benchmark.extra_info.update(backend=backend, device=DEVICE)

    def run():
        with fastmeta.use_backend(backend):
            y = ops.bn_relu_pool(x, w, b)
        g = torch.autograd.grad(y, (x, w, b), torch.ones_like(y))
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return g
    out = benchmark.pedantic(run, rounds=20, iterations=1, warmup_rounds=2)
    with fastmeta.use_backend("torch"):
        y = ops.bn_relu_pool(x, w, b)
    for got, want in zip(out, torch.autograd.grad(y, (x, w, b), torch.ones_like(y))):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BRP_BACKENDS)
@pytest.mark.parametrize("size", [28, 14])
def test_bn_relu_pool_second_order(benchmark, backend, size):
    """The same block in a second-order support pass (5 images, 64 channels, task-inner as the
    convolution returns it; one task on CPU, 32 on a GPU): forward, the backward taken with a graph,
    and its derivative (the double backward), as the outer backward of second-order MAML runs it."""
    why = why_unavailable(backend, DEVICE)
    if why:
        pytest.skip(why)
    T = 32 if DEVICE == "cuda" else 1
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(5, T, 64, size, size, device=DEVICE, generator=g).transpose(0, 1).requires_grad_()
    w = torch.rand(T, 64, device=DEVICE, generator=g).add(0.5).requires_grad_()
    b = torch.randn(T, 64, device=DEVICE, generator=g, requires_grad=True)
    gy = torch.randn(T, 5, 64, size // 2, size // 2, device=DEVICE, generator=g)
    cot = (torch.randn(x.shape, device=DEVICE, generator=g), torch.randn(T, 64, device=DEVICE, generator=g),
           torch.randn(T, 64, device=DEVICE, generator=g))
    benchmark.group = f"bn_relu_pool_second_order-{size}x{size}"
    benchmark.extra_info.update(backend=backend, device=DEVICE, tasks=T)

    def run(be=backend):
        with fastmeta.use_backend(be):
            y = ops.bn_relu_pool(x, w, b)
        first = torch.autograd.grad(y, (x, w, b), gy, create_graph=True)
        out = torch.autograd.grad(first, (x, w), cot)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return out
    out = benchmark.pedantic(run, rounds=20, iterations=1, warmup_rounds=2)
    for got, want in zip(out, run("torch")):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
